"""Cost of :mod:`metacf.protect`: projections and EWC in an SGD step, Fisher.

Part 1, one optimizer step. The step is ``tx.update`` + ``optax.apply_updates``
in one ``jax.jit`` (params donated), on a params pytree of ``P`` float32
numbers, with the same fixed gradient input for every variant:

* ``sgd``: plain ``optax.sgd(lr)``, the reference, timed in every group;
* ``orthogonal_k{k}``: ``optax.chain(protect.orthogonal_projection(V),
  optax.sgd(lr))`` on 4 dense kernels with ``P`` numbers in all, ``V [k, P]``
  with orthonormal rows. The transformation is built once from the concrete
  ``V``, which lives in its state (``OrthogonalProjectionState.basis``), an
  argument of the jitted step (``orthogonal_closure_k{k}`` closes over
  ``V`` instead, as the transformation did before issue 24, so ``V`` is a
  constant of the executable). ``V`` is built cheaply and exactly: ``Q``
  from the QR of a random ``[k, k]`` matrix, ``V = [Q D_1, ..., Q D_m] /
  sqrt(m)`` with random column-sign diagonals ``D_j`` (``P = m k``), so ``V V^T = Q Q^T = I`` and
  every entry is dense; ``orthogonal_projection`` checks it (its probe).
  ``matvec_k{k}``, timed in the same group, is ``V @ g`` alone, one read of
  ``V``: the measured streaming rate of this machine on that matrix.
* ``gpm_r{r}``: ``gpm_projection(bases)`` on an MLP's params (kernels and
  biases; bases ``[d_in, r]`` with orthonormal columns on every kernel,
  ``None`` on biases), 784-100-100-10 (89,610 params, the GPM paper's
  PMNIST MLP) for ``P = 1e5`` and 784-1000-200-10 (987,210) for ``P = 1e6``.
* ``agem``: ``optax.chain(protect.agem(), optax.sgd(lr))`` with a fixed
  ``reference_grads`` (chosen so that ``g . r < 0``: the projection fires).
* ``ewc``: ``optax.chain(protect.ewc(anchor, fisher, strength),
  optax.sgd(lr))``, anchor and fisher in the state, an argument of the step.

Each group (one transformation at one size, with ``sgd`` at that size) is
timed interleaved, A B A B ..., after AOT compilation (timed apart) and
warm-up; the ratio to ``sgd`` is reported as the ratio of medians and as the
median of the per-round ratios. The roofline columns are the
transformation's own extra work: ``orthogonal``: ``4kP`` flops (two
matrix-vector products) and ``V`` (``4kP`` bytes) read once per product,
``8kP`` bytes (the second product needs all of the first's result, so ``V``
is read twice unless it fits in cache); ``gpm``:
``4 r P_kernels`` flops, the kernels' updates read twice and written once;
``agem``: two dot products and an axpy, ``6P`` flops, ``g`` and ``r`` read
twice; ``ewc``: ``4P`` flops, ``u, p, anchor, fisher`` read. A streaming
probe (a matrix-vector product over 256 MiB, timed at start) gives the machine's
bandwidth under the current load.

Part 2, ``protect.fisher_diagonal(apply_fn, params, x)`` (true Fisher,
``labels=None``, and empirical, ``labels=y``; default ``chunk_size``) on the
MLP 784-100-100-10 with ``N`` random inputs, jitted, against a per-example
Python loop (``chunk_size`` 32, the default, and 1): one jitted call per example that adds that example's squared
gradient (true: ``sum_c p_c (grad log p_c)^2`` from ``jax.jacrev``) to a
running sum, then a division by ``N``. The two are checked to agree
(``allclose``) before anything is timed; reported in µs per example.

Part 3 (``--program-size``), what keeping the basis in the optax state
buys: a user's ``jax.jit(step)`` with ``optax.chain(orthogonal_projection(V),
optax.sgd(lr))`` at ``P = 10^6``, ``k = 100``, across 10 tasks' bases
swapped with ``optax.tree.set(opt_state, basis=V_t)``: the lowered
StableHLO text size (``jit(step).lower(...).as_text()``) and the number of
XLA compiles (``jax.monitoring``'s backend-compile events) and traces. The
closure baseline (V a constant, as before issue 24) is lowered at smaller
``P`` (its text holds V in hex, about ``8kP`` bytes) and, at the smallest,
run over the 10 tasks to count its compiles.

  python -m benchmarks.bench_protect [--quick] [--parts orthogonal gpm agem
      ewc fisher program_size] [--sizes 100000 1000000] [--ks 100 1000]
      [--ranks 10 50] [--num-examples 1000] [--target-s 6] [--no-save]
  python -m benchmarks.bench_protect --program-size [--program-size-params
      1000000] [--program-size-k 100] [--program-size-tasks 10]
      [--closure-sizes 10000 100000]
"""

import argparse
import functools
import gc
import math
import os
import statistics
import time

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _timing
from metacf import protect

LEARNING_RATE = 0.01
NUM_KERNELS = 4
MLPS = {100_000: (784, 100, 100, 10), 1_000_000: (784, 1000, 200, 10)}
FISHER_MLP = (784, 100, 100, 10)
_HIGHEST = jax.lax.Precision.HIGHEST
_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


# ----------------------------------------------------------------- helpers


def _dense_tree(num_params: int, key) -> dict:
  """``NUM_KERNELS`` kernels ``[d, P / (NUM_KERNELS d)]``, ``P`` in all."""
  per = num_params // NUM_KERNELS
  if per * NUM_KERNELS != num_params:
    raise ValueError(f'P = {num_params} must be a multiple of {NUM_KERNELS}.')
  rows = max(d for d in range(1, int(math.isqrt(per)) + 1) if per % d == 0)
  keys = jax.random.split(key, NUM_KERNELS)
  return {f'dense{i}': {'kernel': jax.random.normal(
      keys[i], (rows, per // rows), jnp.float32)} for i in range(NUM_KERNELS)}


def _mlp_params(sizes, key) -> dict:
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f'dense{i}'] = {
        'kernel': jax.random.normal(keys[i], (d_in, d_out), jnp.float32) /
                  np.sqrt(d_in).astype(np.float32),
        'bias': jnp.zeros((d_out,), jnp.float32)}
  return params


def _mlp_apply(params, x):
  layers = sorted(params, key=lambda name: int(name[len('dense'):]))
  for i, name in enumerate(layers):
    x = x @ params[name]['kernel'] + params[name]['bias']
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def _num_params(tree) -> int:
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _tiled_basis(key, k: int, num_params: int) -> jax.Array:
  """``[k, P]`` with orthonormal rows: ``[Q D_1, ..., Q D_m] / sqrt(m)``."""
  m = num_params // k
  key_q, key_s = jax.random.split(key)
  q, _ = jnp.linalg.qr(jax.random.normal(key_q, (k, k), jnp.float32))
  signs = jnp.where(jax.random.bernoulli(key_s, 0.5, (m, k)), 1.0, -1.0)
  v = (q[:, None, :] * signs[None].astype(jnp.float32)).reshape(k, m * k)
  return v / jnp.sqrt(jnp.float32(m))


def _orthonormal_columns(key, d: int, r: int) -> jax.Array:
  q, _ = jnp.linalg.qr(jax.random.normal(key, (d, r), jnp.float32))
  return q


def _step_variant(tx, params, grads, reference=None):
  """Jitted ``tx.update`` + ``apply_updates``, params and state donated.

  ``tx`` is built once, outside the step, from concrete arrays: metacf's
  transformations keep them in their state (``basis``, ``bases``,
  ``anchor``/``fisher``), an argument of the step, donated so that the
  state the step returns reuses their buffers (not donated, each call
  would copy them). ``reference`` (A-GEM's ``reference_grads``) is an
  extra argument of the step when given. Returns a zero-argument closure
  that runs one step on the current params and state (both in its
  ``holder``), the compile seconds and the compiled executable.
  """
  opt_state = tx.init(params)
  extra = () if reference is None else (reference,)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, grads, *extra):
    kwargs = {'reference_grads': extra[0]} if extra else {}
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.copy, params)  # each variant donates its own
  compiled, compile_s = _timing.compile_timed(step, params, opt_state, grads,
                                              *extra)
  holder = {'params': params, 'opt_state': opt_state}

  def run():
    holder['params'], holder['opt_state'] = compiled(
        holder['params'], holder['opt_state'], grads, *extra)
    return holder['params']

  run.holder = holder
  return run, compile_s, compiled


def _rounds_for(variants, target_s: float, min_rounds: int, max_rounds: int,
                block: int) -> int:
  """Rounds so that one interleaved pass takes about ``target_s``.

  Also the first (untimed) call of every variant.
  """
  total = 0.0
  for f in variants.values():
    jax.block_until_ready(f())  # first call, never timed
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    total += time.perf_counter() - t0
  calls = max(block, 1)
  return int(min(max_rounds, max(min_rounds, target_s / (calls * total))))


def _time_group(variants, reference: str, *, target_s, min_rounds,
                max_rounds, block):
  rounds = _rounds_for(variants, target_s, min_rounds, max_rounds, block)
  times = _timing.interleaved(variants, rounds=rounds, warmup=1, block=block)
  stats = {name: _timing.summary_ms(t) for name, t in times.items()}
  ref = times[reference]
  for name, t in times.items():
    stats[name]['ratio_of_medians'] = (stats[name]['median_ms'] /
                                       stats[reference]['median_ms'])
    stats[name]['median_of_ratios'] = statistics.median(
        a / b for a, b in zip(t, ref))
    stats[name]['samples'] = len(t)
  return stats, rounds


def bandwidth_probe(mib: int = 256, reps: int = 10) -> float:
  """GB/s of a jitted matrix-vector product over ``mib`` MiB of float32."""
  cols = 4096
  a = jnp.ones((mib * 2**20 // 4 // cols, cols), jnp.float32)
  v = jnp.ones((cols,), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, v))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, v))
    ts.append(time.perf_counter() - t0)
  del a
  return mib * 2**20 / statistics.median(ts) / 1e9


# ------------------------------------------------------------ part 1: steps


def _sgd():
  return optax.sgd(LEARNING_RATE)


def _record(part, variant, num_params, stats, rounds, compile_s, extra):
  return {'part': part, 'variant': variant, 'num_params': num_params,
          'rounds': rounds, **stats, 'compile_s': compile_s, **extra}


def _roofline(stats_v, stats_sgd, flops, bytes_):
  extra_ms = stats_v['median_ms'] - stats_sgd['median_ms']
  out = {'extra_flops': flops, 'extra_bytes': bytes_,
         'extra_median_ms': extra_ms}
  if extra_ms > 0:
    out['achieved_gflops'] = flops / (extra_ms * 1e-3) / 1e9
    out['achieved_gbs'] = bytes_ / (extra_ms * 1e-3) / 1e9
  return out


def _closure_projection(basis) -> optax.GradientTransformation:
  """``orthogonal_projection`` as it was before issue 24: V in the closure.

  ``update`` reads the concrete ``basis`` it closes over, so a jitted step
  holds V as a constant of its program (``4kP`` bytes, printed as hex in
  the StableHLO text) and a new basis is a new transformation, a new trace
  and a new compile. Kept here to measure what the state-held basis saves.
  """
  basis = jnp.asarray(basis)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    flat, unravel = flatten_util.ravel_pytree(updates)
    coefficients = jnp.matmul(basis, flat, precision=_HIGHEST)
    flat = flat - jnp.matmul(coefficients, basis, precision=_HIGHEST)
    return unravel(flat), state

  return optax.GradientTransformation(init_fn, update_fn)


def _closure_variant(basis, params, grads):
  """The step with a concrete ``V`` closed over (a constant of the HLO)."""
  tx = optax.chain(_closure_projection(basis), optax.sgd(LEARNING_RATE))
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.copy, params)
  compiled, compile_s = _timing.compile_timed(step, params, opt_state, grads)
  holder = {'params': params}

  def run():
    holder['params'], _ = compiled(holder['params'], opt_state, grads)
    return holder['params']

  return run, compile_s


def run_orthogonal(sizes, ks, timing, closure_max=0) -> list[dict]:
  records = []
  for num_params in sizes:
    for k in ks:
      key = jax.random.key(k + num_params)
      key_p, key_g, key_v = jax.random.split(key, 3)
      params = _dense_tree(num_params, key_p)
      grads = _dense_tree(num_params, key_g)
      t0 = time.perf_counter()
      basis = jax.block_until_ready(_tiled_basis(key_v, k, num_params))
      make_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      protect.orthogonal_projection(basis)  # the eager orthonormality probe
      check_s = time.perf_counter() - t0
      sgd, sgd_c, sgd_exe = _step_variant(_sgd(), params, grads)
      proj, proj_c, proj_exe = _step_variant(
          optax.chain(protect.orthogonal_projection(basis), _sgd()), params,
          grads)
      flat = flatten_util.ravel_pytree(grads)[0]
      matvec_jit = jax.jit(lambda v, g: jnp.matmul(
          v, g, precision=jax.lax.Precision.HIGHEST))
      matvec_exe, matvec_c = _timing.compile_timed(matvec_jit, basis, flat)
      matvec = lambda: matvec_exe(basis, flat)
      # Correctness of what is timed: the step's update is orthogonal to V.
      before = jax.tree.map(jnp.copy, proj.holder['params'])
      after = proj()
      delta = (flatten_util.ravel_pytree(after)[0] -
               flatten_util.ravel_pytree(before)[0])
      leak = float(jnp.max(jnp.abs(basis @ delta)) /
                   jnp.max(jnp.abs(delta)))
      del before, after, delta
      names = {'sgd': sgd, f'orthogonal_k{k}': proj, f'matvec_k{k}': matvec}
      compiles = {'sgd': sgd_c, f'orthogonal_k{k}': proj_c,
                  f'matvec_k{k}': matvec_c}
      if k * num_params <= closure_max:
        name = f'orthogonal_closure_k{k}'
        names[name], compiles[name] = _closure_variant(basis, params, grads)
      stats, rounds = _time_group(names, 'sgd', **timing)
      mem = _timing.compiled_memory(proj_exe)
      for name, c in compiles.items():
        extra = {'k': k, 'kernels': [list(leaf.shape) for leaf in
                                     jax.tree.leaves(params)]}
        if name.startswith('orthogonal'):
          # V (4kP bytes) is read twice: V^T c needs all of c = V g first.
          extra.update(_roofline(stats[name], stats['sgd'], 4 * k * num_params,
                                 8 * k * num_params))
          extra['v_bytes'] = 4 * k * num_params
          extra['basis_make_s'] = make_s
          extra['basis_check_s'] = check_s
          extra['max_abs_V_delta_over_max_abs_delta'] = leak
          if name == f'orthogonal_k{k}':
            extra['compiled_memory'] = mem
        elif name.startswith('matvec'):
          ms = stats[name]['median_ms']
          extra['v_read_gbs'] = 4 * k * num_params / (ms * 1e-3) / 1e9
        if name.startswith('orthogonal'):
          extra['ratio_vs_matvec'] = (stats[name]['median_ms'] /
                                      stats[f'matvec_k{k}']['median_ms'])
        records.append(_record('step', name, num_params, stats[name], rounds,
                               c, extra))
      _print_group(records[-len(names):])
      del basis, flat, params, grads, names, sgd, proj, matvec, matvec_exe
      del proj_exe, sgd_exe
      gc.collect()
  return records


def run_gpm(sizes, ranks, timing) -> list[dict]:
  records = []
  for num_params in sizes:
    sizes_mlp = MLPS[num_params]
    key_p, key_g, key_b = jax.random.split(jax.random.key(num_params), 3)
    params = _mlp_params(sizes_mlp, key_p)
    grads = jax.tree.map(lambda x: x * 0.5 + 0.1, _mlp_params(sizes_mlp,
                                                              key_g))
    p_total = _num_params(params)
    p_kernels = sum(a * b for a, b in zip(sizes_mlp[:-1], sizes_mlp[1:]))
    sgd, sgd_c, _ = _step_variant(_sgd(), params, grads)
    variants = {'sgd': sgd}
    compile_s, meta = {'sgd': sgd_c}, {}
    for r in ranks:
      keys = jax.random.split(jax.random.fold_in(key_b, r), len(params))
      bases = {name: {'kernel': _orthonormal_columns(
          keys[i], params[name]['kernel'].shape[0], r), 'bias': None}
               for i, name in enumerate(params)}
      run, c, _ = _step_variant(
          optax.chain(protect.gpm_projection(bases), _sgd()), params, grads)
      variants[f'gpm_r{r}'] = run
      compile_s[f'gpm_r{r}'] = c
      read = 4 * (p_kernels * 3 + r * sum(sizes_mlp[:-1]))
      meta[f'gpm_r{r}'] = {'r': r, 'extra_flops': 4 * r * p_kernels,
                           'extra_bytes': read}
    stats, rounds = _time_group(variants, 'sgd', **timing)
    for name in variants:
      extra = {'mlp': list(sizes_mlp)}
      if name in meta:
        extra.update(meta[name])
        extra.update(_roofline(stats[name], stats['sgd'],
                               meta[name]['extra_flops'],
                               meta[name]['extra_bytes']))
      records.append(_record('step', name, p_total, stats[name], rounds,
                             compile_s[name], extra))
    _print_group(records[-len(variants):])
    del variants
    gc.collect()
  return records


def run_agem_ewc(sizes, timing) -> list[dict]:
  records = []
  for num_params in sizes:
    key_p, key_g, key_a, key_f = jax.random.split(jax.random.key(num_params),
                                                  4)
    params = _dense_tree(num_params, key_p)
    grads = _dense_tree(num_params, key_g)
    reference = jax.tree.map(lambda g: -g + 0.1, grads)  # g . r < 0
    dot = sum(float(jnp.vdot(g, r)) for g, r in zip(
        jax.tree.leaves(grads), jax.tree.leaves(reference)))
    assert dot < 0, 'reference_grads must make A-GEM project'
    anchor = _dense_tree(num_params, key_a)
    fisher = jax.tree.map(jnp.abs, _dense_tree(num_params, key_f))
    sgd, sgd_c, _ = _step_variant(_sgd(), params, grads)
    agem, agem_c, _ = _step_variant(optax.chain(protect.agem(), _sgd()),
                                    params, grads, reference)
    ewc, ewc_c, _ = _step_variant(
        optax.chain(protect.ewc(anchor, fisher, 10.0), _sgd()), params,
        grads)
    variants = {'sgd': sgd, 'agem': agem, 'ewc': ewc}
    stats, rounds = _time_group(variants, 'sgd', **timing)
    roof = {'agem': (6 * num_params, 4 * 4 * num_params),
            'ewc': (4 * num_params, 4 * 4 * num_params)}
    for name, c in (('sgd', sgd_c), ('agem', agem_c), ('ewc', ewc_c)):
      extra = {}
      if name in roof:
        extra = _roofline(stats[name], stats['sgd'], *roof[name])
      records.append(_record('step', name, num_params, stats[name], rounds, c,
                             extra))
    _print_group(records[-3:])
    del variants, sgd, agem, ewc
    gc.collect()
  return records


def _print_group(records) -> None:
  for rec in records:
    tag = rec['variant']
    line = (f"  P={rec['num_params']:>9,d} {tag:15s} "
            f"{rec['median_ms']:9.3f} ms [{rec['min_ms']:.3f}, "
            f"{rec['max_ms']:.3f}]  x sgd {rec['ratio_of_medians']:7.2f} "
            f"(median of ratios {rec['median_of_ratios']:7.2f})  "
            f"compile {rec['compile_s']:.2f} s  n={rec['samples']}")
    if 'achieved_gbs' in rec:
      line += (f"  extra {rec['extra_flops'] / 1e6:.1f} MFLOP "
               f"{rec['achieved_gflops']:.1f} GFLOP/s "
               f"{rec['achieved_gbs']:.1f} GB/s")
    if 'v_read_gbs' in rec:
      line += f"  V read {rec['v_read_gbs']:.1f} GB/s"
    print(line, flush=True)


# ----------------------------------------------------------- part 2: Fisher


def _loop_fisher(apply_fn, empirical: bool):
  """Per-example jitted accumulate: ``total + squared grads of one example``."""

  def log_probs(p, xi):
    return jax.nn.log_softmax(apply_fn(p, xi[None])[0])

  def accumulate(total, params, xi, yi):
    if empirical:
      g = jax.grad(lambda p: log_probs(p, xi)[yi])(params)
      sq = jax.tree.map(jnp.square, g)
    else:
      probs = jnp.exp(log_probs(params, xi))
      jac = jax.jacrev(log_probs)(params, xi)  # leaves [C, ...]
      sq = jax.tree.map(lambda j: jnp.tensordot(probs, jnp.square(j), 1), jac)
    return jax.tree.map(jnp.add, total, sq)

  return jax.jit(accumulate)


def run_fisher(num_examples, chunks, timing) -> list[dict]:
  key_p, key_x, key_y = jax.random.split(jax.random.key(1), 3)
  params = _mlp_params(FISHER_MLP, key_p)
  x = jax.random.normal(key_x, (num_examples, FISHER_MLP[0]), jnp.float32)
  y = jax.random.randint(key_y, (num_examples,), 0, FISHER_MLP[-1])
  rows = [x[i] for i in range(num_examples)]
  labels = [y[i] for i in range(num_examples)]
  zeros = jax.tree.map(jnp.zeros_like, params)
  scale = jnp.float32(1.0 / num_examples)
  divide = jax.jit(lambda t: jax.tree.map(lambda a: a * scale, t))
  variants, compile_s, results, meta = {}, {}, {}, {}
  for kind, empirical in (('true', False), ('empirical', True)):
    lab = y if empirical else None
    outputs = []
    for chunk in chunks:
      fisher_jit = jax.jit(lambda p, x, lab=lab, chunk=chunk:
                           protect.fisher_diagonal(_mlp_apply, p, x,
                                                   labels=lab,
                                                   chunk_size=chunk))
      exe, c = _timing.compile_timed(fisher_jit, params, x)
      name = f'fisher_diagonal_{kind}_chunk{chunk}'
      variants[name] = lambda exe=exe: exe(params, x)
      compile_s[name] = c
      meta[name] = (kind, chunk)
      outputs.append(jax.block_until_ready(exe(params, x)))
    acc = _loop_fisher(_mlp_apply, empirical)
    acc_exe, acc_c = _timing.compile_timed(acc, zeros, params, rows[0],
                                           labels[0])

    def loop(acc_exe=acc_exe):
      total = zeros
      for xi, yi in zip(rows, labels):
        total = acc_exe(total, params, xi, yi)
      return divide(total)

    variants[f'python_loop_{kind}'] = loop
    compile_s[f'python_loop_{kind}'] = acc_c
    meta[f'python_loop_{kind}'] = (kind, None)
    ref = jax.block_until_ready(loop())
    worst = 0.0
    for ours in outputs:
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-6 * float(np.max(np.abs(b))))
        worst = max(worst, float(np.max(np.abs(np.asarray(a) -
                                               np.asarray(b)))) /
                    float(np.max(np.abs(b))))
    results[kind] = worst
    print(f'  fisher {kind}: metacf vs loop agree, max |diff| / max |F| = '
          f'{worst:.2e}', flush=True)
  fisher_timing = dict(timing, block=1)
  stats, rounds = _time_group(variants, 'python_loop_true', **fisher_timing)
  records = []
  for name in variants:
    kind, chunk = meta[name]
    ref = stats[f'python_loop_{kind}']
    rec = {'part': 'fisher', 'variant': name, 'kind': kind,
           'mlp': list(FISHER_MLP), 'num_params': _num_params(params),
           'num_examples': num_examples, 'rounds': rounds,
           **{k: v for k, v in stats[name].items()
              if k not in ('ratio_of_medians', 'median_of_ratios')},
           'us_per_example': stats[name]['median_ms'] * 1e3 / num_examples,
           'min_us_per_example': stats[name]['min_ms'] * 1e3 / num_examples,
           'speedup_vs_loop': ref['median_ms'] / stats[name]['median_ms'],
           'compile_s': compile_s[name],
           'max_rel_diff_vs_loop': results[kind]}
    if chunk is not None:
      rec['chunk_size'] = chunk
    records.append(rec)
    print(f"  {name:34s} {rec['median_ms']:9.2f} ms [{rec['min_ms']:.2f}, "
          f"{rec['max_ms']:.2f}]  {rec['us_per_example']:8.1f} us/example  "
          f"speedup vs loop {rec['speedup_vs_loop']:6.2f}  compile "
          f"{rec['compile_s']:.2f} s", flush=True)
  return records


# ------------------------------------------------ part 3: program size


class _CompileCounter:
  """Counts XLA backend compiles (``jax.monitoring``) while active."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0

  def _listener(self, event, duration, **kwargs):
    del kwargs
    if event == _BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def _user_step(tx, traces, donate=()):
  """A user's own jitted SGD step; appends to ``traces`` when traced."""

  @functools.partial(jax.jit, donate_argnums=donate)
  def step(params, opt_state, grads):
    traces.append(None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _step_times(steps, params, opt_state, grads, rounds: int):
  """Median ms of each of ``steps`` (interleaved), each on its own copies."""
  carry = {name: (jax.tree.map(jnp.copy, params),
                  jax.tree.map(jnp.copy, opt_state)) for name in steps}
  times = {name: [] for name in steps}
  for r in range(rounds + 1):
    for name, step in steps.items():
      t0 = time.perf_counter()
      carry[name] = jax.block_until_ready(step(*carry[name], grads))
      if r:  # The first round is warm-up.
        times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _lowered(step, *args):
  """``(StableHLO text bytes, lowering seconds)`` of ``step`` at ``args``."""
  t0 = time.perf_counter()
  text = step.lower(*args).as_text()
  return len(text.encode()), time.perf_counter() - t0


def run_program_size(num_params: int, k: int, num_tasks: int,
                     closure_sizes) -> list[dict]:
  """Program size and compiles of a user's jitted SGD step across tasks.

  ``orthogonal_projection`` keeps its basis in the optax state: one
  ``tx = optax.chain(protect.orthogonal_projection(V_0), optax.sgd(lr))``,
  one ``jax.jit(step)`` written as a user would, and ``num_tasks`` bases
  ``[k, P]`` swapped in with ``optax.tree.set(opt_state, basis=V_t)``, one
  step each (checked: the step's change of params is orthogonal to V_t).
  Recorded: the step's lowered StableHLO text size, the XLA compiles
  counted by ``jax.monitoring`` during the tasks (everything else the loop
  runs is compiled before), the step's traces and jit cache size.

  The closure baseline (:func:`_closure_projection`, V a constant of the
  program, as before issue 24) is lowered once at each of
  ``closure_sizes`` (P, with the same k); at the smallest it also runs the
  ``num_tasks`` tasks the only way it can, a new transformation and a new
  ``jax.jit`` per task, to count its compiles.
  """
  key_p, key_g, key_v = jax.random.split(jax.random.key(24), 3)
  params = _dense_tree(num_params, key_p)
  grads = _dense_tree(num_params, key_g)
  keys = [jax.random.fold_in(key_v, t) for t in range(num_tasks)]
  basis = jax.block_until_ready(_tiled_basis(keys[0], k, num_params))
  tx = optax.chain(protect.orthogonal_projection(basis),
                   optax.sgd(LEARNING_RATE))
  opt_state = tx.init(params)
  traces = []
  step = _user_step(tx, traces)

  @jax.jit
  def leak(v, before, after):
    delta = (flatten_util.ravel_pytree(after)[0] -
             flatten_util.ravel_pytree(before)[0])
    return (jnp.max(jnp.abs(jnp.matmul(v, delta, precision=_HIGHEST))) /
            jnp.max(jnp.abs(delta)))

  jax.block_until_ready(leak(basis, params, params))  # compiled before
  worst = 0.0
  t0 = time.perf_counter()
  with _CompileCounter() as counter:
    for t in range(num_tasks):
      if t:
        basis = _tiled_basis(keys[t], k, num_params)
      opt_state = optax.tree.set(opt_state, basis=basis)
      before = params
      params, opt_state = step(params, opt_state, grads)
      worst = max(worst, float(leak(basis, before, params)))
  loop_s = time.perf_counter() - t0
  num_traces, cache_size = len(traces), step._cache_size()
  size, lower_s = _lowered(step, params, opt_state, grads)
  # A step returns the state it was given; donated, the basis buffer is
  # reused, not donated, it is copied (4kP bytes) on every call.
  step_ms = _step_times(
      {'not_donated': step,
       'donated': _user_step(tx, [], donate=(0, 1))}, params, opt_state,
      grads, rounds=5)
  records = [{
      'part': 'program_size', 'variant': 'orthogonal_state',
      'num_params': num_params, 'k': k, 'num_tasks': num_tasks,
      'v_bytes': 4 * k * num_params, 'lowered_stablehlo_bytes': size,
      'lower_s': lower_s, 'compiles_during_tasks': counter.count,
      'compile_s_during_tasks': counter.seconds, 'traces': num_traces,
      'jit_cache_size': cache_size, 'tasks_wall_s': loop_s,
      'step_ms_state_not_donated': step_ms['not_donated'],
      'step_ms_state_donated': step_ms['donated'],
      'max_abs_V_delta_over_max_abs_delta': worst}]
  print(f'  state-held basis: P={num_params:,d} k={k}, {num_tasks} bases '
        f'swapped with optax.tree.set: lowered StableHLO {size:,d} bytes, '
        f'{counter.count} compile(s) ({counter.seconds:.2f} s), '
        f'{num_traces} trace(s), cache size {cache_size}; max |V_t delta| / '
        f'max |delta| = {worst:.1e}; step {step_ms["donated"]:.1f} ms with '
        f'the state donated, {step_ms["not_donated"]:.1f} ms not', flush=True)
  del basis, opt_state, tx, step
  gc.collect()

  for p in sorted(closure_sizes):
    key_p, key_g = jax.random.split(jax.random.key(p), 2)
    small_params = _dense_tree(p, key_p)
    small_grads = _dense_tree(p, key_g)
    small_keys = [jax.random.fold_in(key_v, t) for t in range(num_tasks)]
    v = jax.block_until_ready(_tiled_basis(small_keys[0], k, p))
    tx_c = optax.chain(_closure_projection(v), optax.sgd(LEARNING_RATE))
    state_c = tx_c.init(small_params)
    size_c, lower_c = _lowered(_user_step(tx_c, []), small_params, state_c,
                               small_grads)
    rec = {'part': 'program_size', 'variant': 'orthogonal_closure',
           'num_params': p, 'k': k, 'v_bytes': 4 * k * p,
           'lowered_stablehlo_bytes': size_c, 'lower_s': lower_c}
    line = (f'  closure (V a constant): P={p:,d} k={k}: lowered StableHLO '
            f'{size_c:,d} bytes ({size_c / (4 * k * p):.2f} x V\'s bytes), '
            f'lowered in {lower_c:.2f} s')
    if p == min(closure_sizes):
      # Each task: a new transformation, a new jitted step, a new compile.
      vs = [v] + [_tiled_basis(small_keys[t], k, p)
                  for t in range(1, num_tasks)]
      jax.block_until_ready(vs)
      c_traces = []
      t0 = time.perf_counter()
      with _CompileCounter() as counter_c:
        for t in range(num_tasks):
          tx_t = optax.chain(_closure_projection(vs[t]),
                             optax.sgd(LEARNING_RATE))
          small_params, _ = _user_step(tx_t, c_traces)(
              small_params, tx_t.init(small_params), small_grads)
        jax.block_until_ready(small_params)
      rec.update({'num_tasks': num_tasks,
                  'compiles_during_tasks': counter_c.count,
                  'compile_s_during_tasks': counter_c.seconds,
                  'traces': len(c_traces),
                  'tasks_wall_s': time.perf_counter() - t0})
      line += (f'; {num_tasks} tasks: {counter_c.count} compiles '
               f'({counter_c.seconds:.2f} s), {len(c_traces)} traces')
      del vs
    print(line, flush=True)
    records.append(rec)
    del v, tx_c, state_c
    gc.collect()
  return records


# -------------------------------------------------------------------- main


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='P = 1e5 only, k = 100, r = 10, N = 256, short '
                      'timing (about a minute)')
  parser.add_argument('--parts', nargs='+',
                      default=['orthogonal', 'gpm', 'agem', 'ewc', 'fisher',
                               'program_size'])
  parser.add_argument('--program-size', action='store_true',
                      help='only part 3: lowered program size and compile '
                      'count of a jitted SGD step with orthogonal_projection '
                      'across tasks (same as --parts program_size)')
  parser.add_argument('--program-size-params', type=int, default=1_000_000)
  parser.add_argument('--program-size-k', type=int, default=100)
  parser.add_argument('--program-size-tasks', type=int, default=10)
  parser.add_argument('--closure-sizes', type=int, nargs='*',
                      default=[10_000, 100_000],
                      help='P at which the closure baseline (V a constant) '
                      'is lowered; its StableHLO holds V as hex, about 8kP '
                      'bytes')
  parser.add_argument('--sizes', type=int, nargs='+',
                      default=[100_000, 1_000_000])
  parser.add_argument('--ks', type=int, nargs='+', default=[100, 1000])
  parser.add_argument('--ranks', type=int, nargs='+', default=[10, 50])
  parser.add_argument('--num-examples', type=int, default=1000)
  parser.add_argument('--fisher-chunks', type=int, nargs='+', default=[32, 1],
                      help='chunk_size values of fisher_diagonal (1: its '
                      'CPU default, 32: its accelerator default)')
  parser.add_argument('--target-s', type=float, default=6.0,
                      help='seconds of timed calls per group (sets rounds)')
  parser.add_argument('--min-rounds', type=int, default=10)
  parser.add_argument('--max-rounds', type=int, default=300)
  parser.add_argument('--block', type=int, default=3,
                      help='calls per turn in part 1, all but the first timed')
  parser.add_argument('--closure-max-elements', type=float, default=1e7,
                      help='also time the step with V closed over (an HLO '
                      'constant) where k * P <= this (0: never)')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  if args.program_size:
    args.parts = ['program_size']
  if args.quick:
    args.sizes, args.ks, args.ranks = [100_000], [100], [10]
    args.num_examples, args.target_s, args.min_rounds = 256, 1.5, 5
    args.program_size_params, args.closure_sizes = 100_000, [10_000]
  timing = {'target_s': args.target_s, 'min_rounds': args.min_rounds,
            'max_rounds': args.max_rounds, 'block': args.block}
  start = time.perf_counter()
  load = os.getloadavg()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}, '
        f'optax {optax.__version__}; load average {load[0]:.2f} (1 min)',
        flush=True)
  gbs = bandwidth_probe()
  print(f'streaming probe (matvec over 256 MiB): {gbs:.1f} GB/s', flush=True)
  records = []
  if 'orthogonal' in args.parts:
    print('orthogonal_projection + sgd vs sgd:', flush=True)
    records += run_orthogonal(args.sizes, args.ks, timing,
                              args.closure_max_elements)
  if 'gpm' in args.parts:
    print('gpm_projection + sgd vs sgd (MLP):', flush=True)
    records += run_gpm([s for s in args.sizes if s in MLPS], args.ranks,
                       timing)
  if 'agem' in args.parts or 'ewc' in args.parts:
    print('agem + sgd, ewc + sgd vs sgd:', flush=True)
    records += run_agem_ewc(args.sizes, timing)
  if 'fisher' in args.parts:
    print(f'fisher_diagonal vs per-example loop, MLP {FISHER_MLP}, '
          f'N = {args.num_examples}:', flush=True)
    records += run_fisher(args.num_examples, args.fisher_chunks, timing)
  if 'program_size' in args.parts:
    print('program size and compiles of a jitted SGD step with '
          'orthogonal_projection across tasks:', flush=True)
    records += run_program_size(args.program_size_params, args.program_size_k,
                                args.program_size_tasks, args.closure_sizes)
  wall = time.perf_counter() - start
  load_end = os.getloadavg()
  for rec in records:
    rec.update({'stream_probe_gbs': gbs, 'load_start': load[0],
                'load_end': load_end[0], 'quick': args.quick,
                'host_cores': os.cpu_count(), 'shared_machine': True})
  print(f'wall {wall:.0f} s; load average {load_end[0]:.2f} at the end')
  if not args.no_save:
    name = 'bench_protect_quick' if args.quick else 'bench_protect'
    print('appended to', _timing.write_jsonl(name, records))


if __name__ == '__main__':
  main()
