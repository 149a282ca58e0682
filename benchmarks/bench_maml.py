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
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _timing
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


def _tasks(key, num_tasks, shots):
  k_amp, k_phase, k_s, k_q = jax.random.split(key, 4)
  amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), jnp.float32, 0.1, 5.0)
  phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), jnp.float32, 0.0,
                             np.pi)
  xs = jax.random.uniform(k_s, (num_tasks, shots, 1), jnp.float32, -5.0, 5.0)
  xq = jax.random.uniform(k_q, (num_tasks, shots, 1), jnp.float32, -5.0, 5.0)
  return maml.Task(xs, amp * jnp.sin(xs - phase), xq,
                   amp * jnp.sin(xq - phase))


def _metacf_step(num_inner_steps, *, first_order=False, remat=False):
  return maml.make_meta_train_step(
      _mse, optax.adam(OUTER_LR), inner_lr=INNER_LR,
      num_inner_steps=num_inner_steps, first_order=first_order, remat=remat)


def _plain_meta_loss(num_inner_steps):
  """Mean query loss over ``vmap`` of an explicitly unrolled inner loop."""

  def task_loss(params, sx, sy, qx, qy):
    for _ in range(num_inner_steps):
      grads = jax.grad(_mse)(params, sx, sy)
      params = jax.tree.map(lambda p, g: p - INNER_LR * g, params, grads)
    return _mse(params, qx, qy)

  def meta_loss(params, tasks):
    return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(
        params, *tasks))

  return meta_loss


def _plain_step(num_inner_steps):
  optimizer = optax.adam(OUTER_LR)
  meta_loss = _plain_meta_loss(num_inner_steps)

  def step(params, opt_state, tasks):
    loss, grads = jax.value_and_grad(meta_loss)(params, tasks)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


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
  ref = jax.grad(_plain_meta_loss(num_inner_steps))(params, tasks)
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
    names = list(got)
    grads['torch_func'] = [{'w': got[w].numpy().T, 'b': got[b].numpy()}
                           for w, b in zip(names[::2], names[1::2])]
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
               'plain': _JaxRunner(_plain_step(n), params, tasks)}
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


def _kib(num_bytes):
  return '?' if num_bytes is None else f'{num_bytes / 1024:8.1f} KiB temp'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--inner-steps', type=int, nargs='+', default=[1, 5])
  parser.add_argument('--remat-steps', type=int, nargs='+',
                      default=[1, 2, 5, 10, 20])
  parser.add_argument('--num-tasks', type=int, default=25)
  parser.add_argument('--shots', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=50,
                      help='interleaved rounds; 3 timed steps each')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='torch.set_num_threads (default: host cores)')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  start = time.perf_counter()
  print(f'\nworkload A: {args.num_tasks} tasks x {args.shots}+{args.shots} '
        f'points, MLP 1-{"-".join(map(str, WIDTHS))}-1, second order, '
        f'outer Adam; {args.rounds} interleaved rounds of 3 timed steps')
  records = bench_variants(args.inner_steps, args.rounds, args.num_tasks,
                           args.shots, args.threads)
  print('\nmetacf first-order (FOMAML) vs second-order')
  records += bench_order(args.inner_steps, args.rounds, args.num_tasks,
                         args.shots)
  print('\nmetacf remat=True vs False (memory: compiled temp buffers)')
  records += bench_remat(args.remat_steps, args.rounds, args.num_tasks,
                         args.shots)
  print(f'\ntotal {time.perf_counter() - start:.0f}s')
  if not args.no_save:
    print('appended to', _timing.write_jsonl('maml', records))


if __name__ == '__main__':
  main()
