"""Cost of issue 27's continual-learning baselines: SI, MAS, GEM, iCaRL.

Part 1 (``steps``), one optimizer step, as in ``bench_protect``: ``tx.update``
+ ``optax.apply_updates`` in one ``jax.jit`` (params and state donated), the
same fixed float32 gradient for every variant, on the MLPs 784-100-100-10
(89,610 params, the GPM/PMNIST MLP) and 784-1000-200-10 (987,210):

* ``sgd``: ``optax.sgd(lr)``, the reference, timed in every group;
* ``path_integral``: ``protect.path_integral(optax.sgd(lr))`` (SI's running
  ``omega -= g * u``);
* ``ewc_si``, ``ewc_mas``: ``optax.chain(protect.ewc(anchor, importance,
  strength), optax.sgd(lr))`` with the importance from ``si_importance``
  (of a path integral over 5 steps) and from ``mas_importance`` (on 64
  random inputs); the same arithmetic, timed apart;
* ``si_full``: SI's whole step, ``path_integral(optax.chain(ewc(anchor,
  si), optax.sgd(lr)))``;
* ``gem_t{t}``: ``optax.chain(protect.gem(), optax.sgd(lr))`` with
  ``memory_grads`` of ``t`` = 1, 5, 20 earlier tasks (an argument of the
  step), random, the first row ``-g`` plus noise so that the projection
  fires, default 200 coordinate-descent sweeps.

Each group (one MLP) is timed interleaved A B A B ..., turns of ``--block``
calls of which all but the first are timed, after AOT compilation (timed
apart) and warm-up; ratios to ``sgd`` are the ratio of medians and the
median of per-round ratios.

Part 2 (``mas``), ``protect.mas_importance(apply_fn, params, x)`` on the MLP
784-100-100-10 with ``N`` random inputs, jitted (``chunk_size`` None, 32
and 1), against (i) a per-example Python loop: one jitted call per example
adding ``|grad ||f(x_n)||^2|`` to a running sum, then ``/ N``, and (ii) the
same loop as one ``jax.jit`` of a ``lax.scan`` over the examples. All are
checked to agree (``allclose``) before timing.

Part 3 (``herding``), ``replay.herding_selection(features, m)`` jitted
(``m`` static) against a NumPy loop of iCaRL's Algorithm 4 (each of the
``m`` steps computes the ``N`` candidate means' distances to the class mean
vectorised, masks used examples, takes the argmin), on ``N`` = 500, 5000
random L2-normalised float32 features of dimension 64 (ResNet-32's, iCaRL on
CIFAR-100), ``m`` = 20, 200. The NumPy loop runs in float32 and float64; the
selections are compared.

Part 4 (``gem_qp``), ``protect.gem_project(g, G)`` (jitted, float32,
default and 1000 sweeps) against QP solvers on the same problem, ``P`` =
89,610 numbers in the MLP's pytree, ``t`` = 1, 5, 20 memories, two kinds:
``random`` (independent normal rows, nearly orthogonal) and ``correlated``
(rows ``b + 0.3 n_k``, pairwise cosine about 0.92, where coordinate descent
may need more sweeps, per ``gem_project``'s docstring); the first row is ``-g`` plus noise. Solvers, float64 NumPy:
``quadprog``: GEM's authors' ``project2cone2`` (the dual through
``quadprog.solve_qp``, with their ``eps`` = 1e-3 on the Gram diagonal, and
with ``eps`` = 0), timed with the Gram matrix built in NumPy as they do;
``nnls``: ``scipy.optimize.nnls`` on the dual as least squares, ``v =
argmin_{v >= 0} |G^T v + g|`` (exact, the accuracy reference). Without
quadprog (``pip install quadprog``, in the ``bench`` extra) only SciPy runs.
NumPy's OpenBLAS runs on one thread unless ``OPENBLAS_NUM_THREADS`` is set
(see the top of this file). Timed in turns of ``--block`` calls like part 1
(parts 2 and 3: one call per turn). Accuracy: the largest constraint
violation ``max_k max(0, -<g~, g_k>) / (|g~| |g_k|)`` and the distance
``|g~ - g~_nnls| / |g~_nnls|``.

  python -m benchmarks.bench_cl_baselines [--quick] [--parts steps mas
      herding gem_qp] [--num-examples 1000] [--target-s 4] [--no-save]
"""

import os

# NumPy's OpenBLAS on one thread, set before NumPy loads (export
# OPENBLAS_NUM_THREADS to override): its worker threads spin after each
# call, and on 2 shared cores a multithreaded quadprog / NNLS solve took up
# to 16x longer (t = 20: NNLS 161-506 ms against 28-31 ms) and slowed the
# JAX call timed next to it (benchmarks/README.md).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import functools
import gc
import time

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from benchmarks import _timing
from benchmarks import bench_protect
from metacf import protect
from metacf import replay

try:
  import quadprog  # pylint: disable=g-import-not-at-top
except ImportError:  # the bench extra; SciPy alone otherwise.
  quadprog = None

LEARNING_RATE = 0.01
STRENGTH = 10.0
MLPS = {'mlp_100': (784, 100, 100, 10), 'mlp_1000': (784, 1000, 200, 10)}
MAS_MLP = (784, 100, 100, 10)
GEM_TS = (1, 5, 20)
HERDING_DIM = 64


def _sgd():
  return optax.sgd(LEARNING_RATE)


def _flat(tree) -> jax.Array:
  return flatten_util.ravel_pytree(tree)[0]


# ------------------------------------------------------------ part 1: steps


def _step_variant(tx, params, grads, memory_grads=None):
  """``bench_protect._step_variant`` with GEM's ``memory_grads=`` argument."""
  opt_state = tx.init(params)
  extra = () if memory_grads is None else (memory_grads,)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, grads, *extra):
    kwargs = {'memory_grads': extra[0]} if extra else {}
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.copy, params)
  compiled, compile_s = _timing.compile_timed(step, params, opt_state, grads,
                                              *extra)
  holder = {'params': params, 'opt_state': opt_state}

  def run():
    holder['params'], holder['opt_state'] = compiled(
        holder['params'], holder['opt_state'], grads, *extra)
    return holder['params']

  run.holder = holder
  return run, compile_s


def _importances(params, grads, key):
  """SI's (5 path-integral steps) and MAS's (64 inputs) importances."""
  tx = protect.path_integral(_sgd())
  state, p = tx.init(params), params
  for i in range(5):
    g = jax.tree.map(lambda a, i=i: a * (1.0 + 0.1 * i), grads)
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  delta = jax.tree.map(jnp.subtract, p, params)
  si = protect.si_importance(optax.tree.get(state, 'omega'), delta)
  x = jax.random.normal(key, (64, params['dense0']['kernel'].shape[0]),
                        jnp.float32)
  mas = jax.jit(lambda p, x: protect.mas_importance(
      bench_protect._mlp_apply, p, x))(params, x)
  return si, mas


def _memory_grads(grads, t: int, key, correlated: bool = False):
  """``t`` memory gradients like ``grads``; row 0 = ``-g`` + noise."""
  flat, unravel = flatten_util.ravel_pytree(grads)
  noise = jax.random.normal(key, (t + 1, flat.size), jnp.float32)
  scale = jnp.linalg.norm(flat) / jnp.sqrt(jnp.float32(flat.size))
  if correlated:
    rows = (noise[t] + 0.3 * noise[:t]) * scale
  else:
    rows = noise[:t] * scale
  rows = rows.at[0].set(-flat + 0.3 * noise[0] * scale)
  return jax.vmap(unravel)(rows)


def run_steps(mlps, timing) -> list[dict]:
  records = []
  for name in mlps:
    sizes = MLPS[name]
    key_p, key_g, key_m, key_x = jax.random.split(jax.random.key(27), 4)
    params = bench_protect._mlp_params(sizes, key_p)
    grads = jax.tree.map(lambda a: a * 0.5 + 0.01,
                         bench_protect._mlp_params(sizes, key_g))
    num_params = bench_protect._num_params(params)
    si, mas = _importances(params, grads, key_x)
    anchor = jax.tree.map(lambda a: a + 0.01, params)
    variants, compile_s, meta = {}, {}, {}
    variants['sgd'], compile_s['sgd'] = _step_variant(_sgd(), params, grads)
    variants['path_integral'], compile_s['path_integral'] = _step_variant(
        protect.path_integral(_sgd()), params, grads)
    for tag, importance in (('ewc_si', si), ('ewc_mas', mas)):
      variants[tag], compile_s[tag] = _step_variant(
          optax.chain(protect.ewc(anchor, importance, STRENGTH), _sgd()),
          params, grads)
    variants['si_full'], compile_s['si_full'] = _step_variant(
        protect.path_integral(optax.chain(
            protect.ewc(anchor, si, STRENGTH), _sgd())), params, grads)
    for t in GEM_TS:
      memory = _memory_grads(grads, t, jax.random.fold_in(key_m, t))
      g, rows = _flat(grads), jax.vmap(_flat)(memory)
      assert float(jnp.min(rows @ g)) < 0, 'GEM must project'
      tag = f'gem_t{t}'
      variants[tag], compile_s[tag] = _step_variant(
          optax.chain(protect.gem(), _sgd()), params, grads, memory)
      meta[tag] = {'t': t, 'num_sweeps': 200,
                   'gram_flops': 2 * t * t * num_params,
                   'memory_bytes': 4 * t * num_params}
    stats, rounds = bench_protect._time_group(variants, 'sgd', **timing)
    group = []
    for tag in variants:
      group.append({'part': 'step', 'variant': tag, 'mlp': list(sizes),
                    'num_params': num_params, 'rounds': rounds,
                    **stats[tag], 'compile_s': compile_s[tag],
                    **meta.get(tag, {})})
    bench_protect._print_group(group)
    records += group
    del variants
    gc.collect()
  return records


# -------------------------------------------------------------- part 2: MAS


def _sq_norm_abs_grad(params, xi):
  g = jax.grad(lambda p: jnp.sum(jnp.square(
      bench_protect._mlp_apply(p, xi[None]))))(params)
  return jax.tree.map(jnp.abs, g)


def run_mas(num_examples: int, timing) -> list[dict]:
  key_p, key_x = jax.random.split(jax.random.key(2), 2)
  params = bench_protect._mlp_params(MAS_MLP, key_p)
  x = jax.random.normal(key_x, (num_examples, MAS_MLP[0]), jnp.float32)
  rows = [x[i] for i in range(num_examples)]
  zeros = jax.tree.map(jnp.zeros_like, params)
  scale = jnp.float32(1.0 / num_examples)
  divide = jax.jit(lambda t: jax.tree.map(lambda a: a * scale, t))
  variants, compile_s = {}, {}
  for chunk in (None, 32, 1):
    fn = jax.jit(lambda p, x, chunk=chunk: protect.mas_importance(
        bench_protect._mlp_apply, p, x, chunk_size=chunk))
    exe, c = _timing.compile_timed(fn, params, x)
    name = f'mas_importance_chunk{chunk or "_all"}'
    variants[name] = lambda exe=exe: exe(params, x)
    compile_s[name] = c
  acc = jax.jit(lambda total, p, xi: jax.tree.map(
      jnp.add, total, _sq_norm_abs_grad(p, xi)))
  acc_exe, acc_c = _timing.compile_timed(acc, zeros, params, rows[0])

  def python_loop():
    total = zeros
    for xi in rows:
      total = acc_exe(total, params, xi)
    return divide(total)

  variants['python_loop'], compile_s['python_loop'] = python_loop, acc_c

  @jax.jit
  def scan_loop(p, x):
    def body(total, xi):
      return jax.tree.map(jnp.add, total, _sq_norm_abs_grad(p, xi)), None
    total, _ = jax.lax.scan(body, zeros, x)
    return jax.tree.map(lambda a: a * scale, total)

  scan_exe, scan_c = _timing.compile_timed(scan_loop, params, x)
  variants['scan_loop'] = lambda: scan_exe(params, x)
  compile_s['scan_loop'] = scan_c
  ref = _flat(jax.block_until_ready(python_loop()))
  worst = {}
  for name, f in variants.items():
    out = _flat(jax.block_until_ready(f()))
    np.testing.assert_allclose(out, ref, rtol=1e-4,
                               atol=1e-6 * float(jnp.max(ref)))
    worst[name] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(ref))
  print(f'  all agree with the Python loop: max |diff| / max |Omega| <= '
        f'{max(worst.values()):.1e}', flush=True)
  stats, rounds = bench_protect._time_group(
      variants, 'python_loop', **dict(timing, block=1))
  records = []
  for name in variants:
    ref_ms = stats['python_loop']['median_ms']
    rec = {'part': 'mas', 'variant': name, 'mlp': list(MAS_MLP),
           'num_params': bench_protect._num_params(params),
           'num_examples': num_examples, 'rounds': rounds,
           **{k: v for k, v in stats[name].items()
              if k not in ('ratio_of_medians', 'median_of_ratios')},
           'us_per_example': stats[name]['median_ms'] * 1e3 / num_examples,
           'speedup_vs_python_loop': ref_ms / stats[name]['median_ms'],
           'compile_s': compile_s[name],
           'max_rel_diff_vs_python_loop': worst[name]}
    records.append(rec)
    print(f"  {name:28s} {rec['median_ms']:9.2f} ms [{rec['min_ms']:.2f}, "
          f"{rec['max_ms']:.2f}]  {rec['us_per_example']:8.1f} us/example  "
          f"speedup vs Python loop {rec['speedup_vs_python_loop']:6.2f}  "
          f"compile {rec['compile_s']:.2f} s", flush=True)
  return records


# ---------------------------------------------------------- part 3: herding


def herding_numpy(features: np.ndarray, num_exemplars: int) -> np.ndarray:
  """iCaRL's Algorithm 4, one vectorised NumPy step per exemplar."""
  mean = features.mean(axis=0)
  total = np.zeros_like(mean)
  used = np.zeros(features.shape[0], bool)
  chosen = np.empty(num_exemplars, np.int32)
  for k in range(num_exemplars):
    candidate = (total[None] + features) / features.dtype.type(k + 1)
    dist = np.sum(np.square(mean[None] - candidate), axis=-1)
    dist[used] = np.inf
    i = int(np.argmin(dist))
    chosen[k], used[i] = i, True
    total = total + features[i]
  return chosen


def _common_prefix(a, b) -> int:
  a, b = np.asarray(a), np.asarray(b)
  diff = np.nonzero(a != b)[0]
  return int(diff[0]) if diff.size else len(a)


def run_herding(sizes, ms, timing) -> list[dict]:
  records = []
  for n in sizes:
    f = jax.random.normal(jax.random.key(n), (n, HERDING_DIM), jnp.float32)
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    f_np, f64 = np.asarray(f), np.asarray(f, np.float64)
    for m in ms:
      fn = jax.jit(lambda f, m=m: replay.herding_selection(f, m))
      exe, c = _timing.compile_timed(fn, f)
      ours = np.asarray(exe(f))
      np32, np64 = herding_numpy(f_np, m), herding_numpy(f64, m)
      same32, same64 = _common_prefix(ours, np32), _common_prefix(ours, np64)
      variants = {'herding_selection': lambda exe=exe: exe(f),
                  'numpy_loop_f32': lambda m=m: herding_numpy(f_np, m),
                  'numpy_loop_f64': lambda m=m: herding_numpy(f64, m)}
      stats, rounds = bench_protect._time_group(
          variants, 'numpy_loop_f32', **dict(timing, block=1))
      for name in variants:
        rec = {'part': 'herding', 'variant': name, 'num_examples': n,
               'dim': HERDING_DIM, 'num_exemplars': m, 'rounds': rounds,
               **stats[name],
               'speedup_vs_numpy_f32': 1.0 / stats[name]['ratio_of_medians'],
               'same_prefix_vs_numpy_f32': same32,
               'same_prefix_vs_numpy_f64': same64}
        if name == 'herding_selection':
          rec['compile_s'] = c
        records.append(rec)
        print(f"  N={n:5d} m={m:3d} {name:18s} {rec['median_ms']:9.3f} ms "
              f"[{rec['min_ms']:.3f}, {rec['max_ms']:.3f}]  speedup vs "
              f"NumPy f32 {rec['speedup_vs_numpy_f32']:6.2f}"
              + (f'  compile {c:.2f} s' if name == 'herding_selection'
                 else ''), flush=True)
      print(f'    selections equal to NumPy f32 / f64 for the first '
            f'{same32} / {same64} of {m}', flush=True)
  return records


# ----------------------------------------------------------- part 4: GEM QP


def g64_from(g32) -> np.ndarray:
  """The float32 gradient as a float64 NumPy vector (a device-to-host copy)."""
  return np.asarray(g32, np.float64)


def project2cone2(g: np.ndarray, rows: np.ndarray, margin: float = 0.0,
                  eps: float = 1e-3) -> np.ndarray:
  """GEM's authors' projection (``gem.py``), float64, via ``quadprog``."""
  t = rows.shape[0]
  gram = rows @ rows.T
  gram = 0.5 * (gram + gram.T) + np.eye(t) * eps
  q = -(rows @ g)
  v = quadprog.solve_qp(gram, q, np.eye(t), np.zeros(t) + margin)[0]
  return v @ rows + g


def nnls_projection(g: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """The dual as non-negative least squares, exactly (Lawson-Hanson)."""
  v, _ = optimize.nnls(rows.T, -g)
  return g + rows.T @ v


def _accuracy(x, rows, ref) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  cos = (rows @ x) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(x))
  return {'max_violation': float(max(0.0, -cos.min())),
          'rel_dist_to_nnls': float(np.linalg.norm(x - ref) /
                                    np.linalg.norm(ref))}


def run_gem_qp(ts, timing) -> list[dict]:
  sizes = MLPS['mlp_100']
  key_g, key_m = jax.random.split(jax.random.key(17), 2)
  grads = bench_protect._mlp_params(sizes, key_g)
  num_params = bench_protect._num_params(grads)
  g32 = _flat(grads)
  g64 = np.asarray(g32, np.float64)
  records = []
  for kind in ('random', 'correlated'):
    for t in ts:
      memory = _memory_grads(grads, t, jax.random.fold_in(key_m, t),
                             correlated=kind == 'correlated')
      rows32 = jax.vmap(_flat)(memory)
      rows64 = np.asarray(rows32, np.float64)
      rows_np32 = np.asarray(rows32)
      variants, compile_s, solutions = {}, {}, {}
      for sweeps in (200, 1000):
        fn = jax.jit(lambda g, m, s=sweeps: protect.gem_project(
            g, m, num_sweeps=s))
        exe, c = _timing.compile_timed(fn, grads, memory)
        name = f'gem_project_sweeps{sweeps}'
        variants[name] = lambda exe=exe: exe(grads, memory)
        compile_s[name] = c
        solutions[name] = np.asarray(_flat(exe(grads, memory)), np.float64)
      if quadprog is not None:
        for eps in (1e-3, 0.0):
          name = f'quadprog_eps{eps:g}'
          # The authors convert the float32 tensors to float64 each call.
          variants[name] = lambda eps=eps: project2cone2(
              g64_from(g32), rows_np32.astype(np.float64), eps=eps)
          solutions[name] = project2cone2(g64, rows64, eps=eps)
      variants['scipy_nnls'] = lambda: nnls_projection(
          g64_from(g32), rows_np32.astype(np.float64))
      ref = nnls_projection(g64, rows64)
      solutions['scipy_nnls'] = ref
      reference = ('quadprog_eps0.001' if quadprog is not None
                   else 'scipy_nnls')
      # Turns of --block calls (all but the first timed): right after a
      # SciPy solve, the first call runs on caches the solver evicted.
      stats, rounds = bench_protect._time_group(variants, reference,
                                                **timing)
      violated = float(np.min(rows64 @ g64)) < 0
      for name in variants:
        rec = {'part': 'gem_qp', 'variant': name, 'kind': kind, 't': t,
               'num_params': num_params, 'rounds': rounds, **stats[name],
               'ratio_reference': reference, 'projection_fires': violated,
               **_accuracy(solutions[name], rows64, ref)}
        if name in compile_s:
          rec['compile_s'] = compile_s[name]
        records.append(rec)
        print(f"  {kind:10s} t={t:2d} {name:24s} {rec['median_ms']:9.3f} ms "
              f"[{rec['min_ms']:.3f}, {rec['max_ms']:.3f}]  x {reference} "
              f"{rec['ratio_of_medians']:6.3f}  violation "
              f"{rec['max_violation']:.1e}  |x - x_nnls| / |x_nnls| "
              f"{rec['rel_dist_to_nnls']:.1e}", flush=True)
  return records


# -------------------------------------------------------------------- main


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='MLP 784-100-100-10 only, N = 256 for MAS, '
                      'herding N = 500, short timing (under a minute)')
  parser.add_argument('--parts', nargs='+',
                      default=['steps', 'mas', 'herding', 'gem_qp'])
  parser.add_argument('--mlps', nargs='+', default=list(MLPS),
                      choices=list(MLPS))
  parser.add_argument('--num-examples', type=int, default=1000)
  parser.add_argument('--herding-sizes', type=int, nargs='+',
                      default=[500, 5000])
  parser.add_argument('--herding-exemplars', type=int, nargs='+',
                      default=[20, 200])
  parser.add_argument('--target-s', type=float, default=4.0,
                      help='seconds of timed calls per group (sets rounds)')
  parser.add_argument('--min-rounds', type=int, default=10)
  parser.add_argument('--max-rounds', type=int, default=300)
  parser.add_argument('--block', type=int, default=3,
                      help='calls per turn in part 1, all but the first timed')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  if args.quick:
    args.mlps, args.num_examples = ['mlp_100'], 256
    args.herding_sizes, args.target_s, args.min_rounds = [500], 1.0, 5
  timing = {'target_s': args.target_s, 'min_rounds': args.min_rounds,
            'max_rounds': args.max_rounds, 'block': args.block}
  start = time.perf_counter()
  load = os.getloadavg()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}, '
        f'optax {optax.__version__}, quadprog '
        f'{"yes" if quadprog is not None else "absent (SciPy only)"}, '
        f'OPENBLAS_NUM_THREADS={os.environ["OPENBLAS_NUM_THREADS"]}; '
        f'load average {load[0]:.2f} (1 min)', flush=True)
  records = []
  if 'steps' in args.parts:
    print('path_integral, ewc (SI / MAS importances), SI, gem + sgd vs sgd:',
          flush=True)
    records += run_steps(args.mlps, timing)
  if 'mas' in args.parts:
    print(f'mas_importance vs per-example loops, MLP {MAS_MLP}, '
          f'N = {args.num_examples}:', flush=True)
    records += run_mas(args.num_examples, timing)
  if 'herding' in args.parts:
    print(f'herding_selection vs NumPy loop, D = {HERDING_DIM}:', flush=True)
    records += run_herding(args.herding_sizes, args.herding_exemplars,
                           timing)
  if 'gem_qp' in args.parts:
    print('gem_project vs QP solvers (float64), P = 89,610:', flush=True)
    records += run_gem_qp(GEM_TS, timing)
  wall = time.perf_counter() - start
  load_end = os.getloadavg()
  for rec in records:
    rec.update({'load_start': load[0], 'load_end': load_end[0],
                'quick': args.quick, 'host_cores': os.cpu_count(),
                'quadprog': quadprog is not None, 'shared_machine': True,
                'openblas_num_threads': os.environ['OPENBLAS_NUM_THREADS']})
  print(f'wall {wall:.0f} s; load average {load_end[0]:.2f} at the end')
  if not args.no_save:
    name = 'cl_baselines_quick' if args.quick else 'cl_baselines'
    print('appended to', _timing.write_jsonl(name, records))


if __name__ == '__main__':
  main()
