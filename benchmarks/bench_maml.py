"""Second-order MAML meta-training step: metacf vs plain JAX vs torch.func.

Workload A (Finn et al. 2017, section 5.1): sinusoid regression with an MLP
1-40-40-1 (ReLU), 10 support + 10 query points per task, 25 tasks per
meta-batch, inner SGD step 0.01, exact second-order meta-gradient, outer
Adam 1e-3. One "step" is a whole meta-update (meta-gradient + Adam), on a
fixed batch of tasks.

Variants, timed interleaved (A B C A B C ...) in one process after AOT
compilation (timed apart) and warm-up, in turns of 4 steps of which the last
3 are timed (``_timing.interleaved(..., block=4)``):

* ``metacf``: ``metacf.maml.make_meta_train_step`` (its jit, params and
  optimizer state donated).
* ``plain``: the best a user writes alone in JAX: one ``jax.jit`` (same
  donation) of ``value_and_grad`` of the mean over ``jax.vmap`` over tasks
  of an explicitly unrolled inner loop (a Python ``for``), then
  ``optax.adam``.
* ``torch_func``: PyTorch's functional API (``benchmarks/_torch_maml.py``):
  ``functional_call`` + ``torch.func.grad`` inner steps + ``vmap`` over
  tasks + ``grad_and_value``, ``torch.optim.Adam``; with
  ``torch.set_num_threads`` set to the host's cores. Skipped when torch is
  not installed.

All three start from the same parameters, and their first updates are
checked against each other before anything is timed.

Also measured, metacf only: first-order (FOMAML) against second-order step
time; and ``remat=True`` against ``remat=False`` from 1 to 20 inner steps:
step time, and memory as XLA's compiled ``memory_analysis()``
``temp_size_in_bytes`` (the scratch buffers of one step, not counting
arguments and outputs), also recorded for the metacf and plain variants.
There is no memory figure for torch: a process's peak RSS (tried) is the
runtimes' (about 1 GB), far above the step's working set (about 1 MB here).

  python -m benchmarks.bench_maml [--inner-steps 1 5 --rounds 50]

``--workloads family``: the rest of the MAML family on workload A's MLP and
tasks, for each of ``--inner-steps``: Reptile (``maml.reptile_grad``), iMAML
(``maml.imaml_grad``, lambda 1, 5 CG steps) and MAML with a sequential
support set (``make_meta_train_step(..., sequential_support=True)``: support
``[tasks, num_inner_steps, shots, 1]``, step ``s`` adapts on slice ``s``).
Variants, interleaved as above:

* ``metacf``: the function + ``optax.adam`` in one donated ``jax.jit``
  (sequential: ``make_meta_train_step``, whose step also returns the
  meta-gradient's norm; ``maml_loss`` is its meta-gradient without it).
* ``plain``: what a user writes alone, same jit: Reptile as ``vmap`` over
  tasks of an unrolled SGD loop and the mean of (theta - phi); iMAML as
  ``jax.scipy.sparse.linalg.cg`` (same CG steps, from 0, no early stop) on
  (I + H/lambda) v = g with Hessian-vector products by ``jvp`` of the
  support gradient; sequential as the unrolled loop with step ``s`` on
  support slice ``s``.
* PyTorch peers: Reptile ``torch_func`` (``vmap`` of the SGD loop; TorchOpt
  has no Reptile recipe); iMAML ``torchopt`` (``_torch_imaml``: its
  ``ImplicitMetaGradientModule`` recipe with ``solve_cg``); sequential
  ``torchopt`` (``torchopt.MetaSGD``, a loop over tasks) and
  ``torch_func``.

Each variant's first meta-gradient and Adam update are compared with
metacf's (max relative difference) before timing. The JAX variants are
timed in a pass of their own (``--family-rounds``, many: their ratios are
near 1), then metacf with the PyTorch peers (``--family-peer-rounds``).

  python -m benchmarks.bench_maml --workloads family [--algorithms reptile
      imaml sequential --inner-steps 1 5 --family-rounds 200
      --family-peer-rounds 10]

Workload B also reports each variant's FLOP rate (XLA's cost analysis of
the step; every variant computes the same meta-gradient) as a fraction of
the device's float32 matmul rate measured before and after the timed
rounds, and with ``--profile`` where metacf's step spends its time by HLO
instruction (``jax.profiler``; ``benchmarks/_xla_profile.py``): matmuls,
concatenates, slices and pads, reductions, other element-wise work.

  python -m benchmarks.bench_maml --workloads B --conv-tasks 4 --chunks 1 \
      --no-memory --profile

``--checks`` measures instead what metacf's runtime value checks cost when
on (:mod:`metacf.checks`) on workload A: ``off`` = the step of
``make_meta_train_step`` (plain jit), ``on`` = ``jax.jit(checkify.checkify(
step, errors=user_checks))`` (params and state donated) traced under
``metacf.runtime_checks()``, ``on_throw`` = ``on`` plus ``err.throw()``
after each step. Interleaved, median [min, max], round-by-round ratios,
XLA's static cost analysis of both programs.

  python -m benchmarks.bench_maml --checks [--inner-steps 1 5 --rounds 50]
"""

import argparse
import functools
import os
import statistics
import time

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import optax

import metacf
from benchmarks import _timing
from benchmarks import _xla_profile
from metacf import maml

# torch's OpenMP threads spin-wait after each parallel region. On a shared
# host (other jobs running) that made torch.func 10-20x slower with 2 threads
# than with 1, and steals cores from the JAX steps interleaved with it;
# passive waiting removes both (it must be set before torch is imported).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

WIDTHS = (40, 40)
INNER_LR = 0.01
OUTER_LR = 1e-3


def _init_params(key, widths=WIDTHS):
  """PyTorch's ``nn.Linear`` initialisation, so that torch starts alike."""
  sizes = (1, *widths, 1)
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    kw, kb = jax.random.split(k)
    bound = 1.0 / np.sqrt(m)
    params.append({'w': jax.random.uniform(kw, (m, n), jnp.float32, -bound,
                                           bound),
                   'b': jax.random.uniform(kb, (n,), jnp.float32, -bound,
                                           bound)})
  return params


def _apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'][None, :])
  return x @ params[-1]['w'] + params[-1]['b'][None, :]


def _mse(params, x, y):
  return jnp.mean((_apply(params, x) - y) ** 2)


def _tasks(key, num_tasks, shots, support_steps=None):
  """Sinusoid tasks; support ``[T, support_steps, shots, 1]`` if given."""
  k_amp, k_phase, k_s, k_q = jax.random.split(key, 4)
  amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), jnp.float32, 0.1, 5.0)
  phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), jnp.float32, 0.0,
                             np.pi)
  steps = () if support_steps is None else (support_steps,)
  xs = jax.random.uniform(k_s, (num_tasks, *steps, shots, 1), jnp.float32,
                          -5.0, 5.0)
  xq = jax.random.uniform(k_q, (num_tasks, shots, 1), jnp.float32, -5.0, 5.0)
  s_amp, s_phase = ((amp, phase) if support_steps is None
                    else (amp[:, None], phase[:, None]))
  return maml.Task(xs, s_amp * jnp.sin(xs - s_phase), xq,
                   amp * jnp.sin(xq - phase))


def _metacf_step(num_inner_steps, *, first_order=False, remat=False,
                 sequential_support=False):
  return maml.make_meta_train_step(
      _mse, optax.adam(OUTER_LR), inner_lr=INNER_LR,
      num_inner_steps=num_inner_steps, first_order=first_order, remat=remat,
      sequential_support=sequential_support)


def _plain_meta_loss(loss_fn, inner_lr, num_inner_steps, sequential=False):
  """Mean query loss over ``vmap`` of an explicitly unrolled inner loop.

  ``sequential``: support leaves ``[T, num_inner_steps, ...]``, step ``s``
  on slice ``s``.
  """

  def task_loss(params, sx, sy, qx, qy):
    for s in range(num_inner_steps):
      x, y = (sx[s], sy[s]) if sequential else (sx, sy)
      grads = jax.grad(loss_fn)(params, x, y)
      params = jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)
    return loss_fn(params, qx, qy)

  def meta_loss(params, tasks):
    return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(
        params, *tasks))

  return meta_loss


def _sinusoid_plain_meta_loss(num_inner_steps):
  return _plain_meta_loss(_mse, INNER_LR, num_inner_steps)


def _grad_step(grad_fn):
  """``grad_fn(params, tasks) -> (loss, grads)`` + Adam, one donated jit."""
  optimizer = optax.adam(OUTER_LR)

  def step(params, opt_state, tasks):
    loss, grads = grad_fn(params, tasks)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _plain_step(meta_loss):
  """One ``jax.jit`` (params and state donated) of ``meta_loss``'s grad + Adam."""
  return _grad_step(jax.value_and_grad(meta_loss))


def _copy(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


class _JaxRunner:
  """A compiled step and its own (donated, updated) params and state."""

  def __init__(self, step, params, tasks):
    opt_state = optax.adam(OUTER_LR).init(params)
    self.compiled, self.compile_s = _timing.compile_timed(
        step, params, opt_state, tasks)
    memory = self.compiled.memory_analysis()
    self.temp_bytes = None if memory is None else int(
        memory.temp_size_in_bytes)
    self.params, self.opt_state, self.tasks = _copy(params), opt_state, tasks

  def __call__(self):
    self.params, self.opt_state, out = self.compiled(self.params,
                                                     self.opt_state,
                                                     self.tasks)
    return out


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import _torch_maml  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None
  return torch, _torch_maml


def _from_torch_mlp(tensors):
  """The torch MLP's ``{'0.weight': ..., '0.bias': ...}`` in the JAX layout."""
  names = list(tensors)
  return [{'w': tensors[w].detach().numpy().T, 'b': tensors[b].detach().numpy()}
          for w, b in zip(names[::2], names[1::2])]


class _TorchRunner:

  def __init__(self, torch, torch_maml, params, tasks, num_inner_steps):
    self.model = torch_maml.make_mlp(WIDTHS)
    self.params = torch_maml.params_from_jax(self.model, params)
    self.tasks = [torch.tensor(np.asarray(t)) for t in tasks]
    self.step = torch_maml.make_meta_train_step(
        self.model, self.params, inner_lr=INNER_LR,
        num_inner_steps=num_inner_steps, outer_lr=OUTER_LR)
    self.compile_s = None  # Eager: nothing is compiled ahead.
    self.temp_bytes = None

  def __call__(self):
    return self.step(*self.tasks)


def _check_meta_gradients(params, tasks, num_inner_steps, torch, torch_maml):
  """The variants' meta-gradients agree (float32, relative to their size)."""
  ref = jax.grad(_sinusoid_plain_meta_loss(num_inner_steps))(params, tasks)
  grads = {'metacf': jax.grad(maml.maml_loss, argnums=1)(
      _mse, params, tasks, inner_lr=INNER_LR,
      num_inner_steps=num_inner_steps)}
  if torch is not None:
    model = torch_maml.make_mlp(WIDTHS)
    meta_loss = torch_maml.make_meta_loss(model, inner_lr=INNER_LR,
                                          num_inner_steps=num_inner_steps)
    got = torch.func.grad(meta_loss)(
        torch_maml.params_from_jax(model, params),
        *[torch.tensor(np.asarray(t)) for t in tasks])
    grads['torch_func'] = _from_torch_mlp(got)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref))
  for name, g in grads.items():
    for got_leaf, ref_leaf in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
      np.testing.assert_allclose(
          got_leaf, ref_leaf, rtol=1e-4, atol=1e-5 * scale,
          err_msg=f'{name} meta-gradient disagrees with the plain reference')


def _summary(runner, samples):
  return {**_timing.summary_ms(samples), 'compile_s': runner.compile_s,
          'temp_bytes': runner.temp_bytes}


def bench_variants(inner_steps, rounds, num_tasks, shots, threads):
  """metacf vs plain vs torch.func, one record per number of inner steps."""
  torch, torch_maml = _torch()
  if torch is None:
    print('torch is not installed: skipping the torch.func variant '
          '(pip install torch).')
  else:
    torch.set_num_threads(threads)
  params = _init_params(jax.random.key(0))
  tasks = _tasks(jax.random.key(1), num_tasks, shots)
  records = []
  for n in inner_steps:
    runners = {'metacf': _JaxRunner(_metacf_step(n), params, tasks),
               'plain': _JaxRunner(
                   _plain_step(_sinusoid_plain_meta_loss(n)), params, tasks)}
    if torch is not None:
      runners['torch_func'] = _TorchRunner(torch, torch_maml, params, tasks,
                                           n)
    _check_meta_gradients(params, tasks, n, torch, torch_maml)
    times = _timing.interleaved(runners, rounds=rounds, block=4)
    stats = {name: _summary(runners[name], t) for name, t in times.items()}
    rec = {'workload': 'A', 'kind': 'variants', 'num_inner_steps': n,
           'num_tasks': num_tasks, 'shots': shots, 'widths': list(WIDTHS),
           'second_order': True, 'rounds': rounds, 'timed_per_round': 3,
           **stats,
           'ratio_metacf_plain': (stats['metacf']['median_ms']
                                  / stats['plain']['median_ms']),
           'ratio_metacf_plain_min': (stats['metacf']['min_ms']
                                      / stats['plain']['min_ms'])}
    if 'torch_func' in stats:
      rec['torch'] = torch.__version__
      rec['torch_threads'] = torch.get_num_threads()
      rec['omp_wait_policy'] = os.environ.get('OMP_WAIT_POLICY')
      rec['ratio_torch_metacf'] = (stats['torch_func']['median_ms']
                                   / stats['metacf']['median_ms'])
    records.append(rec)
    line = f'inner steps {n:2d}:'
    for name, s in stats.items():
      line += (f'  {name} {s["median_ms"]:7.3f} ms [{s["min_ms"]:.3f}, '
               f'{s["max_ms"]:.3f}]')
      if s['compile_s'] is not None:
        line += f' (compile {s["compile_s"]:.2f}s)'
    line += (f'  metacf/plain {rec["ratio_metacf_plain"]:.3f} (min '
             f'{rec["ratio_metacf_plain_min"]:.3f})')
    if 'ratio_torch_metacf' in rec:
      line += f'  torch.func/metacf {rec["ratio_torch_metacf"]:.1f}x'
    print(line)
  return records


def bench_order(inner_steps, rounds, num_tasks, shots):
  """metacf first-order (FOMAML) vs second-order step time."""
  params = _init_params(jax.random.key(0))
  tasks = _tasks(jax.random.key(1), num_tasks, shots)
  records = []
  for n in inner_steps:
    runners = {
        'second_order': _JaxRunner(_metacf_step(n), params, tasks),
        'first_order': _JaxRunner(_metacf_step(n, first_order=True), params,
                                  tasks)}
    times = _timing.interleaved(runners, rounds=rounds, block=4)
    stats = {name: _summary(runners[name], t) for name, t in times.items()}
    rec = {'workload': 'A', 'kind': 'order', 'num_inner_steps': n,
           'num_tasks': num_tasks, 'shots': shots, 'rounds': rounds, **stats,
           'ratio_second_first': (stats['second_order']['median_ms']
                                  / stats['first_order']['median_ms'])}
    records.append(rec)
    print(f'inner steps {n:2d}:  second-order '
          f'{stats["second_order"]["median_ms"]:7.3f} ms  first-order '
          f'{stats["first_order"]["median_ms"]:7.3f} ms  ratio '
          f'{rec["ratio_second_first"]:.2f}')
  return records


def bench_remat(inner_steps, rounds, num_tasks, shots):
  """metacf remat=True vs False: step time and compiled temp memory."""
  params = _init_params(jax.random.key(0))
  tasks = _tasks(jax.random.key(1), num_tasks, shots)
  records = []
  for n in inner_steps:
    runners = {'remat': _JaxRunner(_metacf_step(n, remat=True), params,
                                   tasks),
               'no_remat': _JaxRunner(_metacf_step(n), params, tasks)}
    times = _timing.interleaved(runners, rounds=rounds, block=4)
    stats = {name: _summary(runners[name], t) for name, t in times.items()}
    rec = {'workload': 'A', 'kind': 'remat', 'num_inner_steps': n,
           'num_tasks': num_tasks, 'shots': shots, 'rounds': rounds,
           'memory': 'compiled memory_analysis().temp_size_in_bytes',
           **stats}
    records.append(rec)
    print(f'inner steps {n:2d}:  remat {stats["remat"]["median_ms"]:7.3f} ms '
          f'{_kib(stats["remat"]["temp_bytes"])}  no remat '
          f'{stats["no_remat"]["median_ms"]:7.3f} ms '
          f'{_kib(stats["no_remat"]["temp_bytes"])}')
  return records


# The MAML family on workload A (--workloads family): Reptile, iMAML and MAML
# with a sequential support set (one support batch per inner step, as OML,
# MER and La-MAML adapt), each against what a user writes alone in one
# jax.jit and against a PyTorch peer.
FAMILY = ('reptile', 'imaml', 'sequential')
IMAML_REG = 1.0  # iMAML's proximal strength lambda (as bench_meta_family).
CG_STEPS = 5     # iMAML's conjugate-gradient iterations (the paper's 5).
# The PyTorch peers of each algorithm: Reptile has no TorchOpt recipe (it
# differentiates nothing), so its peer is torch.func.
FAMILY_PEERS = {'reptile': ('torch_func',), 'imaml': ('torchopt',),
                'sequential': ('torchopt', 'torch_func')}


def _family_tasks(algorithm, num_tasks, shots, num_inner_steps):
  """Workload A's tasks; ``sequential``: ``shots`` support points per step."""
  return _tasks(jax.random.key(1), num_tasks, shots,
                num_inner_steps if algorithm == 'sequential' else None)


def _metacf_family_grad(algorithm, n):
  """metacf's ``(params, tasks) -> (loss, meta-gradient)`` (Reptile: loss 0)."""
  if algorithm == 'reptile':
    return lambda params, tasks: (jnp.zeros(()), maml.reptile_grad(
        _mse, params, tasks, inner_lr=INNER_LR, num_inner_steps=n))
  if algorithm == 'imaml':
    return lambda params, tasks: maml.imaml_grad(
        _mse, params, tasks, reg=IMAML_REG, inner_lr=INNER_LR,
        num_inner_steps=n, cg_steps=CG_STEPS)
  return jax.value_and_grad(lambda params, tasks: maml.maml_loss(
      _mse, params, tasks, inner_lr=INNER_LR, num_inner_steps=n,
      sequential_support=True))


def _sgd_steps(loss_fn, params, n):
  """``n`` unrolled SGD steps on ``loss_fn(params)`` (a Python ``for``)."""
  for _ in range(n):
    grads = jax.grad(loss_fn)(params)
    params = jax.tree.map(lambda p, g: p - INNER_LR * g, params, grads)
  return params


def _plain_reptile_grad(n):
  """Reptile as a user writes it: ``vmap`` of an unrolled SGD loop."""

  def grad_fn(params, tasks):
    adapted = jax.vmap(
        lambda sx, sy: _sgd_steps(lambda p: _mse(p, sx, sy), params, n))(
            tasks.support_x, tasks.support_y)
    return jnp.zeros(()), jax.tree.map(lambda p, a: jnp.mean(p - a, axis=0),
                                       params, adapted)

  return grad_fn


def _plain_imaml_grad(n):
  """iMAML as a user writes it: ``jax.scipy.sparse.linalg.cg`` on
  (I + H/lambda) v = g, HVPs by ``jvp`` of the support gradient."""

  def task_grad(params, sx, sy, qx, qy):
    def proximal(phi):
      sq = sum(jnp.sum((a - b) ** 2) for a, b in
               zip(jax.tree.leaves(phi), jax.tree.leaves(params)))
      return _mse(phi, sx, sy) + 0.5 * IMAML_REG * sq

    phi = _sgd_steps(proximal, params, n)
    loss, query_grad = jax.value_and_grad(_mse)(phi, qx, qy)

    def matvec(v):
      hv = jax.jvp(lambda p: jax.grad(_mse)(p, sx, sy), (phi,), (v,))[1]
      return jax.tree.map(lambda a, b: a + b / IMAML_REG, v, hv)

    v, _ = jax.scipy.sparse.linalg.cg(matvec, query_grad, tol=0.0,
                                      maxiter=CG_STEPS)
    return loss, v

  def grad_fn(params, tasks):
    losses, grads = jax.vmap(task_grad, in_axes=(None, 0, 0, 0, 0))(params,
                                                                   *tasks)
    return jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, axis=0),
                                          grads)

  return grad_fn


def _plain_family_grad(algorithm, n):
  if algorithm == 'reptile':
    return _plain_reptile_grad(n)
  if algorithm == 'imaml':
    return _plain_imaml_grad(n)
  return jax.value_and_grad(_plain_meta_loss(_mse, INNER_LR, n,
                                             sequential=True))


class _TorchFamilyRunner:
  """A PyTorch peer's step; ``named`` are the leaf tensors it updates."""

  def __init__(self, torch, algorithm, peer, params, tasks, n):
    from benchmarks import _torch_maml  # pylint: disable=g-import-not-at-top
    model = _torch_maml.make_mlp(WIDTHS)
    named = _torch_maml.params_from_jax(model, params)
    sequential = algorithm == 'sequential'
    if peer == 'torchopt':
      model.load_state_dict(named)
      named = dict(model.named_parameters())
      if algorithm == 'imaml':
        import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
        from benchmarks import _torch_imaml  # pylint: disable=g-import-not-at-top
        self.step = _torch_imaml.make_torchopt_imaml_step(
            model, inner_lr=INNER_LR, num_inner_steps=n, reg=IMAML_REG,
            cg_steps=CG_STEPS, outer_lr=OUTER_LR, loss=F.mse_loss)
      else:
        self.step = _torch_maml.make_torchopt_step(
            model, inner_lr=INNER_LR, num_inner_steps=n, outer_lr=OUTER_LR,
            sequential_support=sequential)
    elif algorithm == 'reptile':
      self.step = _torch_maml.make_reptile_step(
          model, named, inner_lr=INNER_LR, num_inner_steps=n,
          outer_lr=OUTER_LR)
    else:
      self.step = _torch_maml.make_meta_train_step(
          model, named, inner_lr=INNER_LR, num_inner_steps=n,
          outer_lr=OUTER_LR, sequential_support=sequential)
    self.named = named
    self.tasks = [torch.tensor(np.asarray(t)) for t in tasks]
    self.compile_s = None  # Eager: nothing is compiled ahead.
    self.temp_bytes = None

  def __call__(self):
    return self.step(*self.tasks)

  def read(self):
    """(parameters, last meta-gradient) in the JAX layout."""
    return (_from_torch_mlp(self.named),
            _from_torch_mlp({k: v.grad for k, v in self.named.items()}))


def _relative_error(got, ref):
  """Largest |got - ref| entry over the largest |ref| entry."""
  scale = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(ref))
  return max(float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
             for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
             ) / scale


def _check_first_update(runners, grad_fns, params, tasks, tolerance):
  """Runs each variant's first step; its meta-gradient and Adam update
  against metacf's (max relative difference).

  JAX variants' meta-gradients come from their ``grad_fns``, jitted; the
  PyTorch peers' from the ``.grad`` their step left. A JAX variant's
  meta-gradient off by more than ``tolerance`` raises; a peer's is reported:
  float32 iMAML meta-gradients legitimately differ where CG meets a nearly
  singular (I + H/lambda) (2 tasks of 3 points, 2 steps: TorchOpt 0.93 off
  in float32, 1.8e-9 in float64).
  """
  errors, grads, updates = {}, {}, {}
  for name, runner in runners.items():
    jax.block_until_ready(runner())
    if name in grad_fns:
      grads[name] = jax.jit(grad_fns[name])(params, tasks)[1]
      new = runner.params
    else:
      new, grads[name] = runner.read()
    updates[name] = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                                 new, params)
  for name in runners:
    if name == 'metacf':
      continue
    errors[name] = {
        'meta_gradient': _relative_error(grads[name], grads['metacf']),
        'first_update': _relative_error(updates[name], updates['metacf'])}
    print(f'  first update vs metacf: {name:10s} meta-gradient '
          f'{errors[name]["meta_gradient"]:.1e}, Adam update '
          f'{errors[name]["first_update"]:.1e} (max relative difference)',
          flush=True)
    if errors[name]['meta_gradient'] > tolerance and name in grad_fns:
      raise AssertionError(
          f'{name} meta-gradient disagrees with metacf\'s: '
          f'{errors[name]["meta_gradient"]:.2e} > {tolerance}')
  return errors


def _family_pass(runners, rounds):
  """Interleaved timing of ``runners``: (stats by name, paired ratios, wall s,
  load averages before and after)."""
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  times = _timing.interleaved(runners, rounds=rounds, block=4)
  wall_s = time.perf_counter() - t0
  stats = {name: _summary(runners[name], t) for name, t in times.items()}
  for name, t in times.items():
    if name != 'metacf':
      # metacf's k-th time over this variant's k-th (same round and turn).
      stats[name]['paired_ratio_metacf_over'] = statistics.median(
          a / b for a, b in zip(times['metacf'], t))
  return stats, {'rounds': rounds, 'timed_per_round': 3, 'wall_s': wall_s,
                 'load_average_before': [round(x, 2) for x in load_before],
                 'load_average_after': [round(x, 2)
                                        for x in os.getloadavg()]}


def _print_family(stats, info):
  for name, st in stats.items():
    line = (f'  {name:10s} {st["median_ms"]:8.3f} ms [{st["min_ms"]:.3f}, '
            f'{st["max_ms"]:.3f}]')
    if st['compile_s'] is not None:
      line += f'  compile {st["compile_s"]:.2f}s  {_kib(st["temp_bytes"])}'
    if name != 'metacf':
      ratio = stats['metacf']['median_ms'] / st['median_ms']
      line += (f'  metacf/{name} {ratio:.3f} (paired '
               f'{st["paired_ratio_metacf_over"]:.3f})')
    print(line)
  print(f'  ({info["rounds"]} rounds, {info["wall_s"]:.0f}s, load average '
        f'{info["load_average_before"]} -> {info["load_average_after"]})',
        flush=True)


def bench_family(algorithms, inner_steps, rounds, peer_rounds, num_tasks,
                 shots, threads, tolerance=1e-3, save=True):
  """Reptile, iMAML, sequential MAML: metacf vs plain jit vs PyTorch peers.

  Two interleaved passes per algorithm and number of inner steps: the JAX
  variants alone for ``rounds`` rounds (metacf/plain is near 1 and needs
  many samples on a shared machine), then metacf with the PyTorch peers
  for ``peer_rounds`` (one or two orders of magnitude apart, and slow).
  One record each, appended as soon as measured (unless ``save`` is False).
  """
  torch, _ = _torch()
  has_torchopt = False
  if torch is None:
    print('torch is not installed: skipping the PyTorch peers.')
  else:
    torch.set_num_threads(threads)
    try:
      import torchopt  # pylint: disable=g-import-not-at-top,unused-import
      has_torchopt = True
    except ImportError:
      print('torchopt is not installed: skipping it (pip install torchopt).')
  params = _init_params(jax.random.key(0))
  records = []
  for algorithm in algorithms:
    for n in inner_steps:
      tasks = _family_tasks(algorithm, num_tasks, shots, n)
      grad_fns = {'metacf': _metacf_family_grad(algorithm, n),
                  'plain': _plain_family_grad(algorithm, n)}
      metacf_step = (_metacf_step(n, sequential_support=True)
                     if algorithm == 'sequential'
                     else _grad_step(grad_fns['metacf']))
      runners = {'metacf': _JaxRunner(metacf_step, params, tasks)}
      if algorithm == 'sequential':
        # make_meta_train_step's step also returns the meta-gradient's norm;
        # maml_loss's meta-gradient + Adam alone, as plain, for comparison.
        grad_fns['maml_loss'] = grad_fns['metacf']
        runners['maml_loss'] = _JaxRunner(_grad_step(grad_fns['metacf']),
                                          params, tasks)
      runners['plain'] = _JaxRunner(_grad_step(grad_fns['plain']), params,
                                    tasks)
      peers = {}
      for peer in FAMILY_PEERS[algorithm]:
        if torch is not None and (peer != 'torchopt' or has_torchopt):
          peers[peer] = _TorchFamilyRunner(torch, algorithm, peer, params,
                                           tasks, n)
      print(f'{algorithm}, {n} inner steps:', flush=True)
      errors = _check_first_update({**runners, **peers}, grad_fns, params,
                                   tasks, tolerance)
      stats, info = _family_pass(runners, rounds)
      rec = {'workload': 'A', 'kind': 'family', 'algorithm': algorithm,
             'num_inner_steps': n, 'num_tasks': num_tasks, 'shots': shots,
             'widths': list(WIDTHS), 'inner_lr': INNER_LR, **info,
             'first_update_vs_metacf': errors, **stats}
      if algorithm == 'imaml':
        rec.update(imaml_reg=IMAML_REG, cg_steps=CG_STEPS)
      if algorithm == 'sequential':
        rec['support_per_step'] = shots
      for name in stats:
        if name != 'metacf':
          rec[f'ratio_metacf_{name}'] = (stats['metacf']['median_ms']
                                         / stats[name]['median_ms'])
          rec[f'ratio_metacf_{name}_min'] = (stats['metacf']['min_ms']
                                             / stats[name]['min_ms'])
      _print_family(stats, info)
      if peers:
        peer_stats, peer_info = _family_pass(
            {'metacf': runners['metacf'], **peers}, peer_rounds)
        rec['with_peers'] = {**peer_info, **peer_stats}
        for name in peers:
          rec[f'ratio_metacf_{name}'] = (peer_stats['metacf']['median_ms']
                                         / peer_stats[name]['median_ms'])
        rec.update(torch=torch.__version__,
                   torch_threads=torch.get_num_threads(),
                   omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'))
        if has_torchopt:
          rec['torchopt'] = torchopt.__version__
        _print_family(peer_stats, peer_info)
      records.append(rec)
      if save:
        _timing.write_jsonl('maml', [rec])
  return records



# Workload B: Conv-4 + transductive BatchNorm, 5-way 1-shot, 15 queries per
# class, 28x28x1, one inner SGD step 0.4, second order, outer Adam 1e-3.
WAYS, SHOTS_B, QUERIES_B, INNER_LR_B = 5, 1, 15, 0.4


def _conv4(fast):
  from experiments.common import models  # pylint: disable=g-import-not-at-top
  return models.Conv4(num_classes=WAYS, fast=fast)


def _ce_loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def _conv_tasks(key, num_tasks):
  """Random images: the step's cost does not depend on pixel values."""
  k_s, k_q = jax.random.split(key)
  sx = jax.random.uniform(k_s, (num_tasks, WAYS * SHOTS_B, 28, 28, 1))
  qx = jax.random.uniform(k_q, (num_tasks, WAYS * QUERIES_B, 28, 28, 1))
  sy = jnp.tile(jnp.repeat(jnp.arange(WAYS), SHOTS_B), (num_tasks, 1))
  qy = jnp.tile(jnp.repeat(jnp.arange(WAYS), QUERIES_B), (num_tasks, 1))
  return maml.Task(sx, sy, qx, qy)


def _conv_params(key):
  return _conv4(True).init(key, jnp.zeros((1, 28, 28, 1)))['params']


def _conv_metacf_step(task_chunk_size, first_order=False):
  return maml.make_meta_train_step(
      _ce_loss(_conv4(True)), optax.adam(OUTER_LR), inner_lr=INNER_LR_B,
      task_chunk_size=task_chunk_size, first_order=first_order)


def _conv_plain_meta_loss():
  """What a user writes alone: flax's Conv-4, vmap over tasks, one grad."""
  return _plain_meta_loss(_ce_loss(_conv4(False)), INNER_LR_B, 1)


class _TorchConvRunner:

  def __init__(self, kind, torch, params, tasks):
    from benchmarks import _torch_conv4  # pylint: disable=g-import-not-at-top
    self.model = _torch_conv4.make_conv4(WAYS)
    _torch_conv4.load_jax_params(self.model, params)
    make = {'torchopt': _torch_conv4.make_torchopt_step,
            'torch_func': _torch_conv4.make_func_step}[kind]
    self.step = make(self.model, inner_lr=INNER_LR_B, outer_lr=OUTER_LR)
    self.tasks = _torch_tasks(torch, tasks)
    self.compile_s = None
    self.temp_bytes = None

  def __call__(self):
    return self.step(*self.tasks)


def _torch_tasks(torch, tasks):
  from benchmarks import _torch_conv4  # pylint: disable=g-import-not-at-top
  sx, sy, qx, qy = tasks
  return (_torch_conv4.to_nchw(sx), torch.tensor(np.asarray(sy),
                                                 dtype=torch.long),
          _torch_conv4.to_nchw(qx), torch.tensor(np.asarray(qy),
                                                 dtype=torch.long))


def _from_torch(got):
  """A torch Conv-4 gradient dict in the flax Conv-4's pytree layout."""
  back = {}
  for i in range(4):
    back[f'conv{i}'] = {'kernel': got[f'{4 * i}.weight'].transpose(2, 3, 1, 0),
                        'bias': got[f'{4 * i}.bias']}
    back[f'bn{i}'] = {'scale': got[f'{4 * i + 1}.weight'],
                      'bias': got[f'{4 * i + 1}.bias']}
  back['head'] = {'kernel': got['17.weight'].T, 'bias': got['17.bias']}
  return back


def _check_conv_meta_gradients(params, tasks, torch, has_torchopt):
  """Each variant's float32 meta-gradient vs a float64 ``lax.conv`` reference.

  Returns the largest error of each, relative to the largest reference entry,
  and raises if metacf's exceeds 1e-4. The plain float32 formulation (flax's
  conv, autodiff through BatchNorm's mean and variance) is about 2.5e-3 off,
  all of it in the first layer: the second-order meta-gradient amplifies the
  float32 rounding of the batch mean (xhat's mean is 4e-7 instead of 0);
  ``metacf.layers.batch_norm`` computes the moments of shifted data and is
  about 2e-5 off. In float64 (checked once, 2026-11-25) TorchOpt's recipe
  matches the reference to 5e-15; torch.func + ``vmap`` is off by 1.8% even
  in float64 (the same code looped over tasks without ``vmap`` agrees with
  TorchOpt): an error in torch.func's batching rules on this model, not float
  rounding. The PyTorch peers are reported, not asserted.
  """
  with jax.enable_x64(True):
    to64 = lambda a: (a.astype(jnp.float64)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a)
    ref = jax.grad(_conv_plain_meta_loss())(jax.tree.map(to64, params),
                                            jax.tree.map(to64, tasks))
    ref = jax.tree.map(np.asarray, ref)
  # Jitted, as the steps run: an XLA:CPU miscompilation of an earlier
  # max-pool formulation gave a wrong meta-gradient only under jit.
  metacf_grad = jax.jit(jax.grad(functools.partial(
      maml.maml_loss, _ce_loss(_conv4(True)), inner_lr=INNER_LR_B)))
  grads = {
      'lax.conv float32': jax.jit(jax.grad(_conv_plain_meta_loss()))(
          params, tasks),
      'metacf': metacf_grad(params, tasks)}
  if torch is not None:
    from benchmarks import _torch_conv4  # pylint: disable=g-import-not-at-top
    model = _torch_conv4.make_conv4(WAYS)
    _torch_conv4.load_jax_params(model, params)
    ttasks = _torch_tasks(torch, tasks)
    grads['torch_func'] = _from_torch(_torch_conv4.func_meta_gradient(
        model, INNER_LR_B, *ttasks))
    if has_torchopt:
      grads['torchopt'] = _from_torch(_torch_conv4.torchopt_meta_gradient(
          model, INNER_LR_B, *ttasks))
  # Conv biases feed a BatchNorm, so their exact gradient is 0 and what is
  # there is float noise: errors are relative to the largest entry.
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref))
  errors = {}
  for name, g in grads.items():
    errors[name] = max(
        float(np.max(np.abs(np.asarray(leaf) - _get(ref, path))))
        for path, leaf in jax.tree.leaves_with_path(g)) / scale
    print(f'  float32 meta-gradient vs float64 lax.conv reference: {name} '
          f'max error {errors[name]:.1e} (relative to the largest entry)')
  if errors['metacf'] > 1e-4:
    raise AssertionError('metacf meta-gradient disagrees with the float64 '
                         f'reference: {errors["metacf"]:.2e}')
  return errors


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _conv_flops(params, num_tasks):
  """FLOPs of one workload-B meta-step over ``num_tasks`` tasks.

  XLA's cost analysis of metacf's step on one task (its loop over task
  chunks is counted once), times the tasks; the outer Adam update (about
  1 MFLOP) is counted once per task, within rounding. Every variant computes
  the same meta-gradient, so this is the work each of them does.
  """
  one = _conv_tasks(jax.random.key(1), 1)
  state = optax.adam(OUTER_LR).init(params)
  return num_tasks * _xla_profile.flops(_conv_metacf_step(1), params, state,
                                        one)


def bench_conv(num_tasks_list, rounds, chunk_sizes, plain_max_tasks,
               func_max_tasks, threads, profile=False):
  """Workload B: metacf (chunked) vs plain lax.conv vs TorchOpt/torch.func.

  Also the FLOP rate of each variant against this machine's matmul peak
  (:func:`benchmarks._xla_profile.matmul_peak`, measured before and after
  the timed rounds), and with ``profile`` where metacf's step spends its
  time (:func:`benchmarks._xla_profile.breakdown`, first chunk size).
  """
  torch, _ = _torch()
  if torch is None:
    print('torch is not installed: skipping the PyTorch peers.')
  else:
    torch.set_num_threads(threads)
  try:
    import torchopt  # pylint: disable=g-import-not-at-top,unused-import
    has_torchopt = torch is not None
  except ImportError:
    has_torchopt = False
    print('torchopt is not installed: skipping it (pip install torchopt).')
  params = _conv_params(jax.random.key(0))
  records = []
  for num_tasks in num_tasks_list:
    tasks = _conv_tasks(jax.random.key(1), num_tasks)
    step_flops = _conv_flops(params, num_tasks)
    errors = (_check_conv_meta_gradients(params, tasks, torch, has_torchopt)
              if num_tasks <= plain_max_tasks else {})
    runners = {}
    for c in chunk_sizes:
      if num_tasks % c == 0:
        runners[f'metacf_chunk{c}'] = _JaxRunner(_conv_metacf_step(c),
                                                 params, tasks)
    if num_tasks <= plain_max_tasks:
      runners['plain'] = _JaxRunner(_plain_step(_conv_plain_meta_loss()),
                                    params, tasks)
    if has_torchopt:
      runners['torchopt'] = _TorchConvRunner('torchopt', torch, params, tasks)
    if torch is not None and num_tasks <= func_max_tasks:
      runners['torch_func'] = _TorchConvRunner('torch_func', torch, params,
                                               tasks)
    peak_before = _xla_profile.matmul_peak()
    times = _timing.interleaved(runners, rounds=rounds, warmup=2)
    peak_after = _xla_profile.matmul_peak()
    peak = max(peak_before['median_gflops'], peak_after['median_gflops'])
    stats = {name: _summary(runners[name], t) for name, t in times.items()}
    for stat in stats.values():
      stat['gflops'] = step_flops / stat['median_ms'] / 1e6
      stat['fraction_of_matmul_peak'] = stat['gflops'] / peak
    rec = {'workload': 'B', 'kind': 'variants', 'num_tasks': num_tasks,
           'ways': WAYS, 'shots': SHOTS_B, 'queries': QUERIES_B,
           'num_inner_steps': 1, 'second_order': True, 'rounds': rounds,
           'meta_gradient_error': errors, 'step_gflop': step_flops / 1e9,
           'matmul_peak_gflops': [peak_before['median_gflops'],
                                  peak_after['median_gflops']],
           'load_average': os.getloadavg(), **stats}
    if profile:
      name = next(n for n in runners if n.startswith('metacf'))
      runner = runners[name]
      prof = _xla_profile.breakdown(
          runner.compiled, lambda r=runner: jax.block_until_ready(r()))
      matmul_ms = prof['categories'].get('matmuls', 0.0)
      # All of the step's FLOPs over the matmul time: an upper bound (XLA
      # also counts element-wise FLOPs, a few % here).
      rec['profile'] = {'variant': name, **prof,
                        'matmul_gflops': step_flops / matmul_ms / 1e6
                        if matmul_ms else None}
    peers = [n for n in ('torchopt', 'torch_func') if n in stats]
    if peers:
      rec['torch'] = torch.__version__
      rec['torch_threads'] = torch.get_num_threads()
      fastest = min(peers, key=lambda n: stats[n]['median_ms'])
      for name in stats:
        if name.startswith('metacf'):
          rec[f'speedup_{name}_vs_{fastest}'] = (
              stats[fastest]['median_ms'] / stats[name]['median_ms'])
    records.append(rec)
    print(f'{num_tasks} tasks: {step_flops / 1e9:.1f} GFLOP a step; float32 '
          f'matmul peak {peak_before["median_gflops"]:.0f} / '
          f'{peak_after["median_gflops"]:.0f} GFLOP/s (before / after)')
    for name, s in stats.items():
      line = (f'  {name:16s} {s["median_ms"]:9.1f} ms [{s["min_ms"]:.1f}, '
              f'{s["max_ms"]:.1f}]  {s["gflops"]:5.1f} GFLOP/s '
              f'({100 * s["fraction_of_matmul_peak"]:.0f}% of peak)')
      if s['compile_s'] is not None:
        line += (f'  compile {s["compile_s"]:.1f}s  temp '
                 f'{s["temp_bytes"] / 2**30:.2f} GiB')
      print(line)
    for key, value in rec.items():
      if key.startswith('speedup_'):
        print(f'  {key}: {value:.2f}x')
    if profile:
      prof = rec['profile']
      print(f'  profile of {prof["variant"]} (op time summed over threads, '
            f'{prof["total_ms"]:.0f} ms a step):')
      for cat, ms in prof['categories'].items():
        print(f'    {cat:20s} {ms:7.1f} ms  {100 * ms / prof["total_ms"]:4.1f}%')
      if prof['matmul_gflops']:
        print(f'    matmuls run at {prof["matmul_gflops"]:.0f} GFLOP/s')
      for ms, shape, instr, op in prof['top']:
        print(f'    {ms:7.1f} ms  {shape[:32]:32s} {instr:24s} {op[-50:]}')
  return records


def probe_memory(variant, num_tasks, threads):
  """Peak RSS growth over 3 steps of one workload-B variant (own process).

  The peak is reset (``/proc/self/clear_refs``) after set-up and compilation,
  so the figure is the steps' working set above what was resident then.
  """
  torch, _ = _torch()
  if torch is not None:
    torch.set_num_threads(threads)
  params = _conv_params(jax.random.key(0))
  tasks = _conv_tasks(jax.random.key(1), num_tasks)
  if variant.startswith('metacf_chunk'):
    runner = _JaxRunner(
        _conv_metacf_step(int(variant[len('metacf_chunk'):])), params, tasks)
  elif variant == 'plain':
    runner = _JaxRunner(_plain_step(_conv_plain_meta_loss()), params, tasks)
  else:
    runner = _TorchConvRunner(variant, torch, params, tasks)
  jax.block_until_ready(runner())
  before = _timing.reset_peak_rss()
  for _ in range(3):
    jax.block_until_ready(runner())
  peak = _timing.rss_bytes('VmHWM')
  return {'variant': variant, 'num_tasks': num_tasks,
          'rss_before_bytes': before, 'peak_rss_bytes': peak,
          'peak_growth_bytes': peak - before}


def bench_memory(variants_by_tasks, threads):
  """Runs ``probe_memory`` for each variant in a fresh process."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  records = []
  for num_tasks, variants in variants_by_tasks.items():
    for variant in variants:
      out = subprocess.run(
          [sys.executable, '-m', 'benchmarks.bench_maml', '--probe-memory',
           f'{variant}:{num_tasks}', '--threads', str(threads)],
          capture_output=True, text=True, check=True)
      rec = json.loads(out.stdout.strip().splitlines()[-1])
      rec.update(workload='B', kind='memory')
      records.append(rec)
      print(f'  {num_tasks:3d} tasks {variant:16s} peak RSS growth '
            f'{rec["peak_growth_bytes"] / 2**30:6.2f} GiB (process peak '
            f'{rec["peak_rss_bytes"] / 2**30:.2f} GiB)')
  return records

class _CheckedRunner(_JaxRunner):
  """``_JaxRunner`` of ``checkify(step)``, traced with runtime checks on."""

  def __init__(self, step, params, tasks, throw):
    checked = jax.jit(checkify.checkify(step, errors=checkify.user_checks),
                      donate_argnums=(0, 1))
    with metacf.runtime_checks():
      super().__init__(checked, params, tasks)
    self.throw = throw

  def __call__(self):
    err, (self.params, self.opt_state, out) = self.compiled(
        self.params, self.opt_state, self.tasks)
    if self.throw:
      err.throw()
    return err, out


def _cost(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # Older jax: one dict per computation.
    analysis = analysis[0]
  return {k: float(analysis[k]) for k in ('flops', 'bytes accessed')
          if k in analysis}


def bench_checks(inner_steps, rounds, num_tasks, shots):
  """Runtime checks off (plain jit) vs on (checkify + jit), workload A."""
  params = _init_params(jax.random.key(0))
  tasks = _tasks(jax.random.key(1), num_tasks, shots)
  records = []
  for n in inner_steps:
    runners = {'off': _JaxRunner(_metacf_step(n), params, tasks),
               'on': _CheckedRunner(_metacf_step(n), params, tasks, False),
               'on_throw': _CheckedRunner(_metacf_step(n), params, tasks,
                                          True)}
    err, _ = runners['on']()
    err.throw()  # Valid inputs: nothing to report.
    times = _timing.interleaved(runners, rounds=rounds, block=4)
    stats = {name: _summary(runners[name], t) for name, t in times.items()}
    paired = sorted(a / b for a, b in zip(times['on'], times['off']))
    quartiles = statistics.quantiles(paired, n=4)
    cost = {name: _cost(runners[name].compiled) for name in ('off', 'on')}
    rec = {'workload': 'A', 'kind': 'runtime_checks', 'num_inner_steps': n,
           'num_tasks': num_tasks, 'shots': shots, 'rounds': rounds,
           'timed_per_round': 3, **stats,
           'ratio_on_off_median': (stats['on']['median_ms']
                                   / stats['off']['median_ms']),
           'ratio_on_off_min': stats['on']['min_ms'] / stats['off']['min_ms'],
           'ratio_on_throw_off_median': (stats['on_throw']['median_ms']
                                         / stats['off']['median_ms']),
           'paired_ratio_median': statistics.median(paired),
           'paired_ratio_quartiles': [quartiles[0], quartiles[2]],
           'xla_cost_off': cost['off'], 'xla_cost_on': cost['on'],
           'ratio_bytes_accessed': (cost['on']['bytes accessed']
                                    / cost['off']['bytes accessed']),
           'ratio_flops': cost['on']['flops'] / cost['off']['flops']}
    records.append(rec)
    print(f'inner steps {n:2d}:  off {stats["off"]["median_ms"]:7.3f} ms '
          f'[{stats["off"]["min_ms"]:.3f}, {stats["off"]["max_ms"]:.3f}]  on '
          f'{stats["on"]["median_ms"]:7.3f} ms [{stats["on"]["min_ms"]:.3f}, '
          f'{stats["on"]["max_ms"]:.3f}]  on+throw '
          f'{stats["on_throw"]["median_ms"]:7.3f} ms  on/off median '
          f'{rec["ratio_on_off_median"]:.3f} min {rec["ratio_on_off_min"]:.3f}'
          f' paired {rec["paired_ratio_median"]:.3f} [{quartiles[0]:.3f}, '
          f'{quartiles[2]:.3f}]  compile {stats["off"]["compile_s"]:.2f}s / '
          f'{stats["on"]["compile_s"]:.2f}s  XLA bytes '
          f'x{rec["ratio_bytes_accessed"]:.4f} flops x{rec["ratio_flops"]:.4f}')
  return records


def _kib(num_bytes):
  return '?' if num_bytes is None else f'{num_bytes / 1024:8.1f} KiB temp'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workloads', nargs='+', default=['A', 'B'],
                      choices=['A', 'B', 'family'])
  parser.add_argument('--algorithms', nargs='+', default=list(FAMILY),
                      choices=FAMILY, help='workload family: which ones')
  parser.add_argument('--family-rounds', type=int, default=200,
                      help='workload family: interleaved rounds of the JAX '
                      'variants, 3 timed steps each')
  parser.add_argument('--family-peer-rounds', type=int, default=10,
                      help='workload family: interleaved rounds of metacf '
                      'and the PyTorch peers, 3 timed steps each')
  parser.add_argument('--inner-steps', type=int, nargs='+', default=[1, 5])
  parser.add_argument('--remat-steps', type=int, nargs='+',
                      default=[1, 2, 5, 10, 20])
  parser.add_argument('--num-tasks', type=int, default=25)
  parser.add_argument('--shots', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=50,
                      help='workload A: interleaved rounds, 3 timed steps each')
  parser.add_argument('--conv-tasks', type=int, nargs='+', default=[4, 32])
  parser.add_argument('--conv-rounds', type=int, default=20,
                      help='workload B: interleaved rounds, 1 timed step each')
  parser.add_argument('--chunks', type=int, nargs='+', default=[1, 4],
                      help='workload B: metacf task_chunk_size values')
  parser.add_argument('--plain-max-tasks', type=int, default=4,
                      help='run the lax.conv vmap reference up to this many '
                      'tasks (it takes minutes per step beyond)')
  parser.add_argument('--func-max-tasks', type=int, default=32)
  parser.add_argument('--profile', action='store_true',
                      help='workload B: where metacf\'s step spends its time '
                      '(jax.profiler, by HLO instruction)')
  parser.add_argument('--no-memory', action='store_true',
                      help='workload B: skip the per-process peak RSS probes')
  parser.add_argument('--probe-memory', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='torch.set_num_threads (default: host cores)')
  parser.add_argument('--checks', action='store_true',
                      help='workload A: runtime value checks off vs on')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  if args.checks:
    print(f'device: {_timing.device_description()}, jax {jax.__version__}')
    print(f'runtime checks, workload A: {args.num_tasks} tasks x '
          f'{args.shots}+{args.shots} points, {args.rounds} interleaved rounds '
          'of 3 timed steps')
    records = bench_checks(args.inner_steps, args.rounds, args.num_tasks,
                           args.shots)
    if not args.no_save:
      print('appended to', _timing.write_jsonl('maml', records))
    return
  if args.probe_memory:
    import json  # pylint: disable=g-import-not-at-top
    variant, num_tasks = args.probe_memory.split(':')
    print(json.dumps(probe_memory(variant, int(num_tasks), args.threads)))
    return
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  start = time.perf_counter()
  records = []
  if 'A' in args.workloads:
    print(f'\nworkload A: {args.num_tasks} tasks x {args.shots}+{args.shots} '
          f'points, MLP 1-{"-".join(map(str, WIDTHS))}-1, second order, '
          f'outer Adam; {args.rounds} interleaved rounds of 3 timed steps')
    records += bench_variants(args.inner_steps, args.rounds, args.num_tasks,
                              args.shots, args.threads)
    print('\nmetacf first-order (FOMAML) vs second-order')
    records += bench_order(args.inner_steps, args.rounds, args.num_tasks,
                           args.shots)
    print('\nmetacf remat=True vs False (memory: compiled temp buffers)')
    records += bench_remat(args.remat_steps, args.rounds, args.num_tasks,
                           args.shots)
  if 'B' in args.workloads:
    print(f'\nworkload B: Conv-4 + BatchNorm, {WAYS}-way {SHOTS_B}-shot, '
          f'{QUERIES_B} queries/class, 1 inner step, second order, outer '
          f'Adam; {args.conv_rounds} interleaved rounds')
    records += bench_conv(args.conv_tasks, args.conv_rounds, args.chunks,
                          args.plain_max_tasks, args.func_max_tasks,
                          args.threads, profile=args.profile)
    if not args.no_memory:
      print('\nworkload B peak memory (one process per variant)')
      by_tasks = {}
      for n in args.conv_tasks:
        names = [f'metacf_chunk{c}' for c in args.chunks if n % c == 0]
        names += ['plain'] if n <= args.plain_max_tasks else []
        names += ['torchopt', 'torch_func'] if n <= args.func_max_tasks else [
            'torchopt']
        by_tasks[n] = names
      records += bench_memory(by_tasks, args.threads)
  if 'family' in args.workloads:
    print(f'\nworkload family: Reptile, iMAML (lambda {IMAML_REG}, '
          f'{CG_STEPS} CG steps), MAML with a sequential support set '
          f'({args.shots} points a step) on workload A ({args.num_tasks} '
          f'tasks x {args.shots}+{args.shots} points); '
          f'{args.family_rounds} interleaved rounds of 3 timed steps, '
          f'{args.family_peer_rounds} with the PyTorch peers')
    bench_family(args.algorithms, args.inner_steps, args.family_rounds,
                 args.family_peer_rounds, args.num_tasks, args.shots,
                 args.threads, save=not args.no_save)
  print(f'\ntotal {time.perf_counter() - start:.0f}s')
  if not args.no_save and records:
    print('appended to', _timing.write_jsonl('maml', records))


if __name__ == '__main__':
  main()
