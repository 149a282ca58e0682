r"""Top-k Jacobian SVD (`jacobian_svd`) time and memory vs P and N·C.

``J = d apply_fn(params, x) / d params`` has ``N * C`` rows (examples x
outputs) and ``P`` columns. Swept, with ``k = 20`` and C = 10 logits:

* P from 1e4 to 1e7 at N·C = 100: one-hidden-layer ReLU MLPs 784-h-10 on
  flattened MNIST, ``P = 795 h + 10``;
* N·C from 1e2 to 1e4 at P = 1e4 (the same MLPs; N = 10, 100, 1000);
* the largest case: top-20 of a 1,025,866-parameter CNN (3x3 conv 32, stride
  2; 3x3 conv 64, stride 2; dense 320; dense 10; ReLU) on 1,000 MNIST images
  x 10 logits, whose dense J would take 41 GB.

Inputs are real MNIST training images (``metacf.data.load_arrays``, with
``$METACF_RAW_DIR`` as the Makefile sets it); if they cannot be loaded the
run falls back to uniform noise and says so in every record.

Variants, all under one ``jax.jit`` with ``k`` and the method static:

* ``dense``, ``gram``, ``randomized``, ``subspace_iteration``:
  ``metacf.jacobian.jacobian_svd`` with that ``method`` and its defaults
  (``randomized``: Lanczos / block Krylov, ``krylov_dim = 4k + 20``, no
  early stop; ``subspace_iteration``: the default before 2026-12-03,
  ``oversampling=10``, ``num_power_iters=2``), one chunk. The case line
  also names what ``method='auto'`` picks.
* ``naive``: what a user writes alone: ``jax.jacrev`` of the flattened
  parameters on the whole batch, reshaped to ``[N*C, P]``, then
  ``jnp.linalg.svd(full_matrices=False)``.
* ``nt``: neural-tangents' ``empirical_ntk_fn(f, trace_axes=(),
  vmap_axes=0)`` (its default implementation), ``eigh`` of the
  ``[N*C, N*C]`` kernel, and ``V = J^T U / s`` by ``k`` VJPs. Run only if
  ``import neural_tangents`` works in this environment; it is not a
  dependency. neural-tangents 0.6.5, the newest on PyPI, installs with our
  JAX 0.10.2 into a scratch venv but does not import (``ImportError: cannot
  import name 'Jaxpr' from 'jax.core'``); in a venv with JAX 0.4.30 it
  imports. The import error of this run is recorded.

Protocol. Per case, every variant is compiled ahead of time (``compile_s``)
and its XLA buffer sizes read (``memory_analysis()``: arguments + outputs +
temporaries; it leaves out the LAPACK workspaces of ``svd``/``eigh``/``qr``).
A variant is skipped, and recorded with the reason, when

* those XLA buffers exceed ``--mem-limit-gb`` (12 GB by default: the host has
  24 GB and other jobs share it): "skipped: would need X GB";
* it forms the Jacobian (``naive``, ``dense``, ``nt``) and J has more than
  ``--dense-max-entries`` entries (2e7 by default): the LAPACK SVD of a wide
  ``[N*C, P]`` J costs about 0.2-0.4 us per entry on this shared 2-core
  host (``naive`` took 18 s at 100 x 1e6), so larger cases do not fit the
  run's time;
* it takes an ``eigh`` of the ``[N*C, N*C]`` NTK (``gram``, ``nt``) and
  ``N*C > --gram-max-rows`` (4096, where ``'auto'`` switches to
  ``'randomized'``; ``eigh`` of a 4096^2 matrix took 37 s here under load,
  and the NTK costs N*C VJPs and JVPs over the whole batch).

Peak memory is measured per variant in a fresh process (``--probe-memory``):
set-up and compilation, then ``VmHWM`` is reset through
``/proc/self/clear_refs`` and the peak RSS growth over the first call is
reported (``_timing.peak_rss_growth``). A variant whose probe fails (killed
for memory) is not timed. Then, in this process, each remaining variant is
called once untimed (its output is kept for the accuracy check), and all are
timed interleaved (``_timing.interleaved``, A B C A B C ...), for as many
rounds as fit ``--case-budget-s`` (at least ``--min-rounds``, at most
``--rounds``). Times are medians [min, max] per call.

Accuracy: ``randomized`` (and ``gram``, ``naive``, ``nt``) against ``dense``
where dense ran, and ``randomized`` against ``gram`` where both ran: the
largest relative error of the top-k singular values (target 1e-3), and the
distances of the rank-k projectors ``V^T V`` (Frobenius and spectral; the
spectral one is the sine of the largest principal angle), computed in
float64 from the float32 outputs of the untimed first calls. Where dense
ran, ``randomized`` is also checked (not timed) with the
``--accuracy-settings`` pairs of ``oversampling:num_power_iters``. The gap
``s_k / s_(k+1)`` (from ``naive``'s full spectrum) is printed with them: the
rank-k projector is only as well defined as that gap.

LAPACK. jaxlib's CPU ``svd``/``eigh``/``qr`` run in scipy's OpenBLAS. With
its default thread count, on this shared 2-core host, a QR of a [1e5, 30]
matrix took 1.9 s against 0.11 s with one thread (SVD of 100 x 1e5: 17 s vs
9 s). ``OPENBLAS_NUM_THREADS`` is therefore set to 1 unless already set;
the value is recorded. XLA's own ops still use both cores.

``--peers`` (instead of the sweep): metacf's ``randomized`` default against
what a user without metacf would run, on the MLPs at P = 1e4 ... 1e7 with
``--peer-n`` = 100 images (N·C = 1,000) and the CNN on ``--largest-n``
images: ``scipy.sparse.linalg.svds`` with ``solver='propack'`` and
``'arpack'`` (``tol = --scipy-tol``, 1e-3) on a ``LinearOperator`` whose
matvec / rmatvec are jitted JVP / VJP of the flattened parameters (the
compilation warmed up first and not timed), and ``subspace_iteration``
(the old default). Per variant: time (interleaved rounds, as above), the
number of Jacobian products (counted in the matvecs for SciPy, returned by
metacf), peak RSS growth over the first call, and the largest relative
error of s_1..s_k against dense SVD where J has at most
``--dense-max-entries`` entries, else against ``randomized`` with
``krylov_dim = 8k + 40`` (its largest relative residual printed). A solver
that raises (PROPACK's "did not converge within kmax") is recorded with the
time and products it took, and not timed.

``--quick`` (about a minute): P = 1e4 at N·C 100 and 1000 and the CNN on 2
images, at most 3 rounds, no memory processes (XLA buffer sizes only).

  python -m benchmarks.bench_jacobian [--quick] [--params 1e4 1e5 1e6 1e7]
      [--rows 100 1000 10000 --rows-params 1e4] [--largest-n 1000]
      [--no-memory] [--dense-max-entries 2e7] [--no-save]
"""

import os

# Before jax (and so scipy's OpenBLAS) is loaded: see "LAPACK" above.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import subprocess
import sys
import time
from typing import NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing
from metacf import jacobian as jac
# pylint: enable=g-import-not-at-top,wrong-import-position

NUM_CLASSES = 10
METACF_METHODS = ('dense', 'gram', 'randomized', 'subspace_iteration')
VARIANTS = ('naive', 'nt') + METACF_METHODS
# Variants that form the [N*C, P] Jacobian, and ones that eigh the NTK.
_FORMS_J = ('naive', 'dense', 'nt')
_EIGH_NTK = ('gram', 'nt')
_ACCURACY_TOL = 1e-3


# ---------------------------------------------------------------------------
# Models and inputs.


def _mlp_width(num_params: int) -> int:
  """Hidden width h of a 784-h-10 MLP with about ``num_params`` parameters."""
  return max(1, round((num_params - NUM_CLASSES) / (784 + 1 + NUM_CLASSES)))


def _mlp_init(key, width):
  k1, k2 = jax.random.split(key)
  return {'w1': jax.random.normal(k1, (784, width)) * np.sqrt(2 / 784),
          'b1': jnp.zeros(width),
          'w2': jax.random.normal(k2, (width, NUM_CLASSES)) / np.sqrt(width),
          'b2': jnp.zeros(NUM_CLASSES)}


def _mlp_apply(params, x):
  x = x.reshape(x.shape[0], -1)
  h = jax.nn.relu(x @ params['w1'] + params['b1'][None, :])
  return h @ params['w2'] + params['b2'][None, :]


def _cnn_init(key):
  ks = jax.random.split(key, 4)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape) * np.sqrt(
      2 / fan_in)
  return {'c1': he(ks[0], (3, 3, 1, 32), 9), 'cb1': jnp.zeros(32),
          'c2': he(ks[1], (3, 3, 32, 64), 9 * 32), 'cb2': jnp.zeros(64),
          'w3': he(ks[2], (7 * 7 * 64, 320), 7 * 7 * 64),
          'b3': jnp.zeros(320),
          'w4': jax.random.normal(ks[3], (320, NUM_CLASSES)) / np.sqrt(320),
          'b4': jnp.zeros(NUM_CLASSES)}


def _cnn_apply(params, x):
  """[N, 28, 28, 1] -> [N, 10]: two stride-2 3x3 convs, two dense layers."""
  dims = ('NHWC', 'HWIO', 'NHWC')
  for w, b in (('c1', 'cb1'), ('c2', 'cb2')):
    x = jax.lax.conv_general_dilated(x, params[w], (2, 2), 'SAME',
                                     dimension_numbers=dims)
    x = jax.nn.relu(x + params[b][None, None, None, :])
  x = x.reshape(x.shape[0], -1)
  x = jax.nn.relu(x @ params['w3'] + params['b3'][None, :])
  return x @ params['w4'] + params['b4'][None, :]


class Case(NamedTuple):
  model: str  # 'mlp' or 'cnn'
  width: int  # MLP hidden width (0 for the CNN)
  n: int      # examples; rows of J = n * NUM_CLASSES

  def build(self):
    key = jax.random.key(0)
    if self.model == 'mlp':
      return _mlp_apply, _mlp_init(key, self.width)
    return _cnn_apply, _cnn_init(key)

  def label(self, num_params):
    name = 'CNN' if self.model == 'cnn' else f'MLP 784-{self.width}-10'
    return f'{name}, P={num_params:,}, N·C={self.n * NUM_CLASSES:,}'


_IMAGES = {}


def _images(n: int) -> tuple[np.ndarray, str]:
  """The first ``n`` MNIST training images [n, 28, 28, 1] in [0, 1]."""
  if 'x' not in _IMAGES:
    try:
      from metacf import data  # pylint: disable=g-import-not-at-top
      _IMAGES['x'] = data.load_arrays('mnist', 'train',
                                      dtype=np.float32).images
      _IMAGES['source'] = 'mnist train'
    except Exception as e:  # pylint: disable=broad-except
      rng = np.random.default_rng(0)
      _IMAGES['x'] = rng.uniform(size=(60000, 28, 28, 1)).astype(np.float32)
      _IMAGES['source'] = (f'uniform noise (MNIST not loaded: '
                           f'{type(e).__name__}: {e})')
  return _IMAGES['x'][:n], _IMAGES['source']


# ---------------------------------------------------------------------------
# Variants: f(params, x, key) -> (s, vt), s descending (at least k), vt [k, P].


def _nt_import_error() -> str | None:
  try:
    import neural_tangents  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def _naive_fn(apply_fn, k):
  def f(params, x, key):
    del key
    flat, unravel = ravel_pytree(params)
    j = jax.jacrev(lambda theta: apply_fn(unravel(theta), x))(flat)
    _, s, vt = jnp.linalg.svd(j.reshape(-1, flat.size), full_matrices=False)
    return s, vt[:k]  # All singular values: s[k] gives the spectral gap.
  return f


def _nt_fn(apply_fn, k):
  """neural-tangents' empirical NTK, eigh, then V = J^T U / s."""
  import neural_tangents as nt  # pylint: disable=g-import-not-at-top
  ntk_fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0)

  def f(params, x, key):
    del key
    kernel = ntk_fn(x, None, params)  # [N, N, C, C].
    n, c = kernel.shape[0], kernel.shape[2]
    kernel = kernel.transpose(0, 2, 1, 3).reshape(n * c, n * c)
    eigvals, eigvecs = jnp.linalg.eigh(kernel)  # Ascending.
    u = eigvecs[:, ::-1][:, :k]
    s = jnp.sqrt(jnp.maximum(eigvals[::-1][:k], 0))
    flat, unravel = ravel_pytree(params)
    _, vjp = jax.vjp(lambda theta: apply_fn(unravel(theta), x), flat)
    b = jax.vmap(lambda col: vjp(col.reshape(n, c))[0])(u.T)  # U^T J.
    return s, b / s[:, None]
  return f


def _metacf_fn(apply_fn, k, method, with_products=False, **options):
  def f(params, x, key):
    svd = jac.jacobian_svd(apply_fn, params, x, k, method=method, key=key,
                           **options)
    if with_products:
      return svd.s, svd.vt, svd.num_products
    return svd.s, svd.vt
  return f


def _variant_fn(variant, apply_fn, k):
  if variant == 'naive':
    return _naive_fn(apply_fn, k)
  if variant == 'nt':
    return _nt_fn(apply_fn, k)
  return _metacf_fn(apply_fn, k, variant)


def _skip_reason(variant, num_rows, num_params, memory, args,
                 nt_error) -> str | None:
  """Why ``variant`` is not run on this case, or None."""
  if variant == 'nt' and nt_error:
    return f'skipped: neural-tangents does not import ({nt_error})'
  j_gb = num_rows * num_params * 4 / 1e9
  if memory is not None and memory['total_bytes'] > args.mem_limit_gb * 1e9:
    return (f'skipped: would need {memory["total_bytes"] / 1e9:,.1f} GB '
            f'(XLA buffers, > --mem-limit-gb {args.mem_limit_gb:g}; dense J '
            f'alone {j_gb:,.1f} GB)')
  if variant in _FORMS_J and num_rows * num_params > args.dense_max_entries:
    xla = ('' if memory is None else
           f', XLA buffers {memory["total_bytes"] / 1e9:.1f} GB')
    return (f'skipped for time: J has {num_rows * num_params:.2g} entries > '
            f'--dense-max-entries {args.dense_max_entries:.2g} (J '
            f'{j_gb:.2f} GB{xla})')
  if variant in _EIGH_NTK and num_rows > args.gram_max_rows:
    return (f'skipped for time: eigh of the {num_rows}x{num_rows} NTK, '
            f'N·C > --gram-max-rows {args.gram_max_rows}')
  return None


# ---------------------------------------------------------------------------
# Memory probe (one variant, fresh process).


def probe_memory(spec: dict) -> dict:
  case = Case(spec['model'], spec['width'], spec['n'])
  apply_fn, params = case.build()
  x = jnp.asarray(_images(case.n)[0])
  key = jax.random.key(1)
  fn = jax.jit(_variant_fn(spec['variant'], apply_fn, spec['k']))
  compiled, compile_s = _timing.compile_timed(fn, params, x, key)
  t0 = time.perf_counter()
  rec = _timing.peak_rss_growth(lambda: compiled(params, x, key))
  return {**rec, 'compile_s': compile_s,
          'first_call_s': time.perf_counter() - t0}


def _run_probe(case: Case, variant: str, k: int, timeout_s: float) -> dict:
  spec = json.dumps({'model': case.model, 'width': case.width, 'n': case.n,
                     'variant': variant, 'k': k})
  try:
    out = subprocess.run(
        [sys.executable, '-m', 'benchmarks.bench_jacobian', '--probe-memory',
         spec], capture_output=True, text=True, timeout=timeout_s,
        check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'memory probe timed out after {timeout_s:g} s'}
  if out.returncode != 0:
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
    return {'error': f'memory probe exited with {out.returncode}: '
                     f'{" ".join(tail)[:300]}'}
  return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Accuracy.


_CHUNK = 1 << 20  # Columns of a [k, P] matrix converted to float64 at once.


def _gram64(a, b):
  """``a @ b.T`` in float64, over column chunks (a, b: [k, P] float32)."""
  out = np.zeros((a.shape[0], b.shape[0]))
  for i in range(0, a.shape[1], _CHUNK):
    out += (np.asarray(a[:, i:i + _CHUNK], np.float64)
            @ np.asarray(b[:, i:i + _CHUNK], np.float64).T)
  return out


def _projector_distances(vt, vt_ref) -> tuple[float, float]:
  """``||V^T V - W^T W||`` (Frobenius, spectral) for [k, P] row bases.

  Frobenius from the k x k Gram matrices (exact for any V, W). Spectral from
  ``R = V - (V W^T) W``, formed chunk by chunk in float64: for orthonormal
  rows its singular values are the sines of the principal angles, and
  ``||P_V - P_W||_2`` is the largest. Forming R directly avoids
  ``sqrt(1 - cos^2)``, which turns float32 rounding (cos = 1 - 1e-7) into a
  1e-3 floor.
  """
  cross = _gram64(vt, vt_ref)
  frob2 = (np.sum(_gram64(vt, vt)**2) + np.sum(_gram64(vt_ref, vt_ref)**2)
           - 2 * np.sum(cross**2))
  rrt = np.zeros_like(cross)
  for i in range(0, vt.shape[1], _CHUNK):
    r = (np.asarray(vt[:, i:i + _CHUNK], np.float64)
         - cross @ np.asarray(vt_ref[:, i:i + _CHUNK], np.float64))
    rrt += r @ r.T
  sin_max = np.sqrt(max(np.linalg.eigvalsh(rrt)[-1], 0.0))
  return float(np.sqrt(max(frob2, 0.0))), float(sin_max)


def _accuracy(out, ref, k) -> dict:
  s, vt = np.asarray(out[0][:k], np.float64), np.asarray(out[1])
  s_ref, vt_ref = np.asarray(ref[0][:k], np.float64), np.asarray(ref[1])
  rel = np.abs(s - s_ref) / s_ref
  frob, spectral = _projector_distances(vt, vt_ref)
  return {'max_rel_err_s': float(rel.max()), 'rel_err_s': rel.tolist(),
          'rel_err_s_1': float(rel[0]), 'rel_err_s_k': float(rel[-1]),
          'within_tol': bool(rel.max() <= _ACCURACY_TOL),
          'projector_dist_fro': frob, 'projector_dist_spectral': spectral}


# ---------------------------------------------------------------------------
# One case.


def _fmt_ms(stats):
  return (f'{stats["median_ms"]:,.1f} ms [{stats["min_ms"]:,.1f}, '
          f'{stats["max_ms"]:,.1f}]')


def _fmt_gb(num_bytes):
  return '-' if num_bytes is None else f'{num_bytes / 1e9:.2f} GB'


def run_case(case: Case, args, nt_error) -> list[dict]:
  apply_fn, params = case.build()
  images, source = _images(case.n)
  x = jnp.asarray(images)
  key = jax.random.key(1)
  num_params = int(ravel_pytree(params)[0].size)
  num_rows = case.n * NUM_CLASSES
  k = args.k
  base = {'model': case.model, 'width': case.width or None,
          'num_params': num_params, 'n': case.n, 'num_outputs': NUM_CLASSES,
          'num_rows': num_rows, 'k': k, 'inputs': source,
          'auto_method': jac.auto_svd_method(num_rows, num_params)}
  print(f'\n{case.label(num_params)} (auto -> {base["auto_method"]}; dense J '
        f'{num_rows * num_params * 4 / 1e9:,.2f} GB)', flush=True)
  records, compiled, compile_s, memory = {}, {}, {}, {}
  for variant in args.variants:
    rec = {**base, 'kind': 'timing', 'variant': variant,
           'status': 'pending'}
    records[variant] = rec
    if variant == 'nt' and nt_error:
      rec.update(status=_skip_reason(variant, num_rows, num_params, None,
                                     args, nt_error))
      continue
    fn = jax.jit(_variant_fn(variant, apply_fn, k))
    compiled[variant], compile_s[variant] = _timing.compile_timed(
        fn, params, x, key)
    memory[variant] = _timing.compiled_memory(compiled[variant])
    rec.update(compile_s=compile_s[variant], xla_memory=memory[variant])
    reason = _skip_reason(variant, num_rows, num_params, memory[variant],
                          args, nt_error)
    if reason:
      rec['status'] = reason
      del compiled[variant]
  if not args.no_memory:
    for variant in list(compiled):
      probe = _run_probe(case, variant, k, args.probe_timeout_s)
      records[variant]['peak_rss'] = probe
      if 'error' in probe:
        records[variant]['status'] = f'skipped: {probe["error"]}'
        del compiled[variant]
  # Untimed first calls; their outputs are kept for the accuracy check.
  outputs, first_s, calls = {}, {}, {}
  for variant, c in compiled.items():
    calls[variant] = lambda c=c: c(params, x, key)
    t0 = time.perf_counter()
    outputs[variant] = jax.block_until_ready(calls[variant]())
    first_s[variant] = time.perf_counter() - t0
  rounds = 0
  if calls:
    round_s = sum(first_s.values())
    rounds = int(min(args.rounds, max(args.min_rounds,
                                      args.case_budget_s // max(round_s,
                                                                1e-9))))
    times = _timing.interleaved(calls, rounds=rounds, warmup=0)
    for variant, samples in times.items():
      records[variant].update(status='ok', rounds=rounds,
                              first_call_s=first_s[variant],
                              **_timing.summary_ms(samples))
  for variant in args.variants:
    rec = records[variant]
    if rec['status'] == 'ok':
      rss = rec.get('peak_rss', {}).get('peak_growth_bytes')
      print(f'  {variant:10s} {_fmt_ms(rec):>34s}  compile '
            f'{rec["compile_s"]:5.1f}s  peak RSS growth {_fmt_gb(rss)}  XLA '
            f'{_fmt_gb(rec["xla_memory"]["total_bytes"])}  ({rounds} rounds)',
            flush=True)
    else:
      print(f'  {variant:10s} {rec["status"]}', flush=True)
  acc = []
  gap = None
  if 'naive' in outputs and outputs['naive'][0].size > k:
    s = np.asarray(outputs['naive'][0])
    gap = float(s[k - 1] / s[k])
    print(f'  spectral gap s_{k} / s_{k + 1} = {gap:.4f}')
  refs = [('dense', v) for v in outputs if v != 'dense']
  if 'gram' in outputs and 'randomized' in outputs:
    refs.append(('gram', 'randomized'))
  for ref, variant in refs:
    if ref not in outputs:
      continue
    a = {**base, 'kind': 'accuracy', 'variant': variant, 'reference': ref,
         **_accuracy(outputs[variant], outputs[ref], k)}
    if variant == 'randomized':  # jacobian_svd defaults.
      a.update(krylov_dim=jac.default_krylov_dim(k), block_size=1)
    if variant == 'subspace_iteration':
      a.update(oversampling=10, num_power_iters=2)
    a['gap_s_k_over_s_k1'] = gap
    acc.append(a)
    verdict = 'ok' if a['within_tol'] else 'FAIL'
    print(f'  accuracy {variant:10s} vs {ref:5s}: max rel err s '
          f'{a["max_rel_err_s"]:.1e} ({verdict} at {_ACCURACY_TOL:g}), '
          f'projector dist F {a["projector_dist_fro"]:.1e} / 2 '
          f'{a["projector_dist_spectral"]:.1e}', flush=True)
  if 'dense' in outputs:
    acc += _accuracy_settings(apply_fn, params, x, key, outputs['dense'],
                              base, args, gap)
  return list(records.values()) + acc


def _accuracy_settings(apply_fn, params, x, key, ref, base, args, gap):
  """Randomized SVD accuracy vs dense for other oversampling/power iters."""
  acc = []
  for setting in args.accuracy_settings:
    oversampling, power_iters = (int(v) for v in setting.split(':'))
    fn = jax.jit(_metacf_fn(apply_fn, args.k, 'randomized',
                            oversampling=oversampling,
                            num_power_iters=power_iters))
    out = jax.block_until_ready(fn(params, x, key))
    a = {**base, 'kind': 'accuracy', 'variant': 'randomized',
         'reference': 'dense', 'oversampling': oversampling,
         'num_power_iters': power_iters, 'gap_s_k_over_s_k1': gap,
         **_accuracy(out, ref, args.k)}
    acc.append(a)
    verdict = 'ok' if a['within_tol'] else 'FAIL'
    print(f'  accuracy randomized(oversampling={oversampling}, '
          f'num_power_iters={power_iters}) vs dense: max rel err s '
          f'{a["max_rel_err_s"]:.1e} ({verdict}), projector dist F '
          f'{a["projector_dist_fro"]:.1e} / 2 '
          f'{a["projector_dist_spectral"]:.1e}', flush=True)
  return acc


# ---------------------------------------------------------------------------
# --peers: the randomized default against SciPy's svds and subspace iteration.

PEER_VARIANTS = ('randomized', 'subspace_iteration', 'scipy_propack',
                 'scipy_arpack')


def _jitted_products(apply_fn, params, x):
  """Jitted ``J v`` and ``J^T u`` on flat float32 vectors (SciPy's matvecs)."""
  flat, unravel = ravel_pytree(params)
  f = lambda theta: apply_fn(unravel(theta), x)
  jvp = jax.jit(lambda theta, v: jax.jvp(f, (theta,), (v,))[1].reshape(-1))
  out_shape = jax.eval_shape(f, flat).shape
  vjp = jax.jit(lambda theta, u: jax.vjp(f, theta)[1](u.reshape(out_shape))[0])
  return flat, jvp, vjp


def _scipy_fn(solver, apply_fn, params, x, k, tol, seed=0):
  """What a user writes without metacf: svds on a LinearOperator."""
  from scipy.sparse import linalg as sla  # pylint: disable=g-import-not-at-top
  flat, jvp, vjp = _jitted_products(apply_fn, params, x)
  num_rows = x.shape[0] * NUM_CLASSES
  counter = {'products': 0}

  def matvec(v):
    counter['products'] += 1
    return np.asarray(jvp(flat, jnp.asarray(np.ravel(v), jnp.float32)))

  def rmatvec(u):
    counter['products'] += 1
    return np.asarray(vjp(flat, jnp.asarray(np.ravel(u), jnp.float32)))

  op = sla.LinearOperator((num_rows, flat.size), matvec=matvec,
                          rmatvec=rmatvec, dtype=np.float32)

  def call():
    counter['products'] = 0
    u, s, vt = sla.svds(op, k=k, tol=tol, solver=solver,
                        random_state=np.random.default_rng(seed))
    order = np.argsort(s)[::-1]
    return s[order], vt[order]

  # Warm the two jitted products (compilation is not the solver's time).
  jax.block_until_ready(jvp(flat, jnp.zeros_like(flat)))
  jax.block_until_ready(vjp(flat, jnp.zeros(num_rows, flat.dtype)))
  return call, counter


def _metacf_products(variant, k, num_rows, num_params, **options):
  from metacf.jacobian import _svd  # pylint: disable=g-import-not-at-top
  method = 'randomized' if variant.startswith('randomized') else variant
  opts = _svd.check_svd_options(method, True, options.get('oversampling'),
                                options.get('num_power_iters'), num_rows,
                                num_params, 'bench', k=k,
                                krylov_dim=options.get('krylov_dim'),
                                block_size=options.get('block_size'))
  if method == 'randomized':
    return opts.block_size * (1 + 2 * opts.num_blocks) + k
  l = min(k + opts.oversampling, num_rows, num_params)
  return 2 * l * (opts.num_power_iters + 1)


def run_peers_case(case: Case, args) -> list[dict]:
  apply_fn, params = case.build()
  images, source = _images(case.n)
  x = jnp.asarray(images)
  key = jax.random.key(1)
  k = args.k
  num_params = int(ravel_pytree(params)[0].size)
  num_rows = case.n * NUM_CLASSES
  base = {'kind': 'peers', 'model': case.model, 'width': case.width or None,
          'num_params': num_params, 'n': case.n, 'num_rows': num_rows,
          'k': k, 'inputs': source}
  print(f'\n[peers] {case.label(num_params)}', flush=True)
  # Reference: dense SVD where J is small, else a deep Krylov run (8k + 40
  # columns, no early stop) whose relative residuals are printed.
  if num_rows * num_params <= args.dense_max_entries:
    ref_name = 'dense'
    ref = jax.jit(_metacf_fn(apply_fn, k, 'dense'))(params, x, key)
    ref_residual = None
  else:
    ref_name = f'randomized(krylov_dim={8 * k + 40}, tol=0)'
    svd = jax.jit(lambda p, x, key: jac.jacobian_svd(
        apply_fn, p, x, k, method='randomized', key=key,
        krylov_dim=8 * k + 40, tol=0.0))(params, x, jax.random.key(123))
    ref = (svd.s, svd.vt)
    ref_residual = float(np.max(np.asarray(svd.residual) /
                                np.asarray(svd.s)))
    print(f'  reference {ref_name}: max residual / s = {ref_residual:.1e}')
  calls, products, records = {}, {}, {}
  for variant in args.peer_variants:
    rec = {**base, 'variant': variant, 'reference': ref_name,
           'reference_max_rel_residual': ref_residual}
    if variant.startswith('scipy_'):
      solver = variant[len('scipy_'):]
      call, counter = _scipy_fn(solver, apply_fn, params, x, k,
                                args.scipy_tol)
      rec.update(tol=args.scipy_tol, compile_s=None)
      calls[variant] = call
      products[variant] = counter
    else:
      fn = jax.jit(_metacf_fn(apply_fn, k, variant, with_products=True))
      compiled, rec['compile_s'] = _timing.compile_timed(fn, params, x, key)
      rec['xla_memory'] = _timing.compiled_memory(compiled)
      calls[variant] = lambda c=compiled: c(params, x, key)
      rec['max_products'] = _metacf_products(variant, k, num_rows,
                                             num_params)
    records[variant] = rec
  # Untimed first calls, with peak RSS growth and the output for accuracy.
  first_s = {}
  for variant, call in list(calls.items()):
    out = {}
    t0 = time.perf_counter()
    rec = records[variant]
    try:
      rss = _timing.peak_rss_growth(lambda call=call: out.setdefault(
          'v', call()))
    except Exception as e:  # pylint: disable=broad-except
      # E.g. PROPACK: "k=20 singular triplets did not converge within
      # kmax=200 iterations". Recorded, not timed.
      rec.update(status=f'failed: {type(e).__name__}: {e}',
                 seconds_to_fail=time.perf_counter() - t0,
                 products=products[variant]['products']
                 if variant in products else None)
      print(f'  {variant:19s} {rec["status"]} (after '
            f'{rec["seconds_to_fail"]:.1f} s, {rec["products"]} products)',
            flush=True)
      del calls[variant]
      continue
    first_s[variant] = time.perf_counter() - t0
    rec['status'] = 'ok'
    rec['peak_rss'] = rss
    if variant in products:
      rec['products'] = products[variant]['products']
    else:
      rec['products'] = int(out['v'][2])
    rec.update(_accuracy(out['v'][:2], ref, k))
  round_s = sum(first_s.values())
  rounds = int(min(args.rounds, max(args.min_rounds,
                                    args.case_budget_s // max(round_s,
                                                              1e-9))))
  times = _timing.interleaved(
      {v: (lambda c=c: jax.block_until_ready(c())) for v, c in calls.items()},
      rounds=rounds, warmup=0)
  for variant, samples in times.items():
    rec = records[variant]
    rec.update(rounds=rounds, first_call_s=first_s[variant],
               **_timing.summary_ms(samples))
    compile_txt = ('-' if rec['compile_s'] is None
                   else f'{rec["compile_s"]:.1f}s')
    print(f'  {variant:19s} {_fmt_ms(rec):>34s}  compile {compile_txt:>6s}  '
          f'products {rec["products"]:5d}  peak RSS growth '
          f'{_fmt_gb(rec["peak_rss"]["peak_growth_bytes"])}  max rel err s '
          f'{rec["max_rel_err_s"]:.1e}  ({rounds} rounds)', flush=True)
  return list(records.values())


def _peers_markdown(records) -> str:
  rows = ['| case | P | N·C | variant | median s [min, max] | products | '
          'peak RSS growth | max rel. error of s₁..s₂₀ | reference |',
          '|---' * 9 + '|']
  for r in records:
    if r.get('kind') != 'peers':
      continue
    case = 'CNN' if r['model'] == 'cnn' else f'MLP h={r["width"]}'
    if r.get('status') != 'ok':
      rows.append(f'| {case} | {r["num_params"]:,} | {r["num_rows"]:,} | '
                  f'{r["variant"]} | {r.get("status")} | '
                  f'{r.get("products")} | - | - | {r["reference"]} |')
      continue
    t = (f'{r["median_ms"] / 1e3:.2f} [{r["min_ms"] / 1e3:.2f}, '
         f'{r["max_ms"] / 1e3:.2f}]')
    rows.append(
        f'| {case} | {r["num_params"]:,} | {r["num_rows"]:,} | '
        f'{r["variant"]} | {t} | {r["products"]} | '
        f'{_fmt_gb(r["peak_rss"]["peak_growth_bytes"])} | '
        f'{r["max_rel_err_s"]:.1e} | {r["reference"]} |')
  return '\n'.join(rows)


# ---------------------------------------------------------------------------
# Report.


def _ratios(records) -> list[dict]:
  """Each variant vs naive at the largest case naive ran (by N·C·P)."""
  timing = [r for r in records if r['kind'] == 'timing']
  naive = [r for r in timing if r['variant'] == 'naive'
           and r['status'] == 'ok']
  out = []
  largest = {}
  for r in timing:
    if r['status'] == 'ok':
      size = r['num_rows'] * r['num_params']
      if size >= largest.get(r['variant'], (0, None))[0]:
        largest[r['variant']] = (size, r)
  print('\nlargest case each variant ran:')
  for variant, (_, r) in largest.items():
    print(f'  {variant:10s} P={r["num_params"]:,} N·C={r["num_rows"]:,} '
          f'({r["model"]}): {_fmt_ms(r)}')
  if not naive:
    return out
  top = max(naive, key=lambda r: r['num_rows'] * r['num_params'])
  same = [r for r in timing if r['status'] == 'ok'
          and (r['model'], r['num_params'], r['num_rows'])
          == (top['model'], top['num_params'], top['num_rows'])]
  print(f'\nvs naive at its largest case (P={top["num_params"]:,}, '
        f'N·C={top["num_rows"]:,}):')
  for r in same:
    rss = r.get('peak_rss', {}).get('peak_growth_bytes')
    rss_naive = top.get('peak_rss', {}).get('peak_growth_bytes')
    rec = {'kind': 'ratio_vs_naive', 'model': r['model'],
           'num_params': r['num_params'], 'num_rows': r['num_rows'],
           'variant': r['variant'],
           'time_ratio_median': r['median_ms'] / top['median_ms'],
           'time_ratio_min': r['min_ms'] / top['min_ms'],
           'peak_rss_ratio': (rss / rss_naive if rss and rss_naive else None)}
    out.append(rec)
    mem = ('' if rec['peak_rss_ratio'] is None else
           f', peak RSS x{rec["peak_rss_ratio"]:.2f}')
    print(f'  {r["variant"]:10s} time x{rec["time_ratio_median"]:.3f} '
          f'(median), x{rec["time_ratio_min"]:.3f} (min){mem}')
  return out


def _markdown(records) -> str:
  rows = ['| case | P | N·C | variant | median ms [min, max] | compile s | '
          'peak RSS growth | XLA buffers |', '|---' * 8 + '|']
  for r in records:
    if r['kind'] != 'timing':
      continue
    case = 'CNN' if r['model'] == 'cnn' else f'MLP h={r["width"]}'
    if r['status'] == 'ok':
      rss = r.get('peak_rss', {}).get('peak_growth_bytes')
      cells = [_fmt_ms(r), f'{r["compile_s"]:.1f}', _fmt_gb(rss),
               _fmt_gb(r['xla_memory']['total_bytes'])]
    else:
      cells = [r['status'], f'{r["compile_s"]:.1f}' if 'compile_s' in r
               else '-', '-',
               _fmt_gb(r['xla_memory']['total_bytes'])
               if r.get('xla_memory') else '-']
    rows.append(f'| {case} | {r["num_params"]:,} | {r["num_rows"]:,} | '
                f'{r["variant"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def _cases(args) -> list[Case]:
  cases = []
  for p in args.params:
    cases.append(Case('mlp', _mlp_width(int(p)), args.sweep_n))
  for rows in args.rows:
    if int(rows) % NUM_CLASSES:
      raise SystemExit(f'--rows must be multiples of {NUM_CLASSES}, got '
                       f'{rows}.')
    cases.append(Case('mlp', _mlp_width(int(args.rows_params)),
                      int(rows) // NUM_CLASSES))
  if args.largest_n:
    cases.append(Case('cnn', 0, args.largest_n))
  unique = []
  for c in cases:
    if c not in unique:
      unique.append(c)
  return unique


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='about a minute: P=1e4, N·C 100 and 1000, CNN '
                      'on 2 images, no memory processes')
  parser.add_argument('--params', type=float, nargs='*',
                      default=[1e4, 1e5, 1e6, 1e7],
                      help='P sweep (MLP sizes) at N = --sweep-n')
  parser.add_argument('--sweep-n', type=int, default=10)
  parser.add_argument('--rows', type=float, nargs='*',
                      default=[100, 1000, 10000],
                      help='N·C sweep (C = 10) at P = --rows-params')
  parser.add_argument('--rows-params', type=float, default=1e4)
  parser.add_argument('--largest-n', type=int, default=1000,
                      help='CNN case on this many images (0: none)')
  parser.add_argument('--k', type=int, default=20)
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                      choices=VARIANTS)
  parser.add_argument('--rounds', type=int, default=10,
                      help='most interleaved timed rounds per case')
  parser.add_argument('--min-rounds', type=int, default=2)
  parser.add_argument('--case-budget-s', type=float, default=60.0,
                      help='rounds per case = this / one round, clamped')
  parser.add_argument('--mem-limit-gb', type=float, default=12.0)
  parser.add_argument('--dense-max-entries', type=float, default=2e7)
  parser.add_argument('--gram-max-rows', type=int, default=4096)
  parser.add_argument('--accuracy-settings', nargs='*',
                      default=['10:4', '20:4', '40:4'],
                      help='extra randomized OVERSAMPLING:POWER_ITERS pairs '
                      'checked against dense (accuracy only)')
  parser.add_argument('--no-memory', action='store_true',
                      help='skip the per-variant peak RSS processes')
  parser.add_argument('--probe-timeout-s', type=float, default=900.0)
  parser.add_argument('--probe-memory', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--no-save', action='store_true')
  parser.add_argument('--peers', action='store_true',
                      help='instead of the sweep: the randomized default vs '
                      'SciPy svds (PROPACK, ARPACK) and subspace iteration '
                      'on the MLPs at N = --peer-n and the CNN')
  parser.add_argument('--peer-params', type=float, nargs='*',
                      default=[1e4, 1e5, 1e6, 1e7])
  parser.add_argument('--peer-n', type=int, default=100)
  parser.add_argument('--peer-variants', nargs='+',
                      default=list(PEER_VARIANTS), choices=PEER_VARIANTS)
  parser.add_argument('--scipy-tol', type=float, default=1e-3,
                      help="svds' tol (relative accuracy of the values)")
  args = parser.parse_args()
  if args.probe_memory:
    print(json.dumps(probe_memory(json.loads(args.probe_memory))))
    return
  if args.quick:
    args.params, args.rows, args.largest_n = [1e4], [100, 1000], 2
    args.rounds, args.min_rounds, args.case_budget_s = 3, 2, 3.0
    args.accuracy_settings, args.no_memory = ['40:4'], True
  nt_error = _nt_import_error() if 'nt' in args.variants else None
  print(f'device: {_timing.device_description()}, jax {jax.__version__}, '
        f'OPENBLAS_NUM_THREADS={os.environ.get("OPENBLAS_NUM_THREADS")}')
  if nt_error:
    print(f'neural-tangents: not run ({nt_error})')
  start = time.perf_counter()
  records = []
  if args.peers:
    cases = [Case('mlp', _mlp_width(int(p)), args.peer_n)
             for p in args.peer_params]
    if args.largest_n:
      cases.append(Case('cnn', 0, args.largest_n))
    for case in cases:
      records += run_peers_case(case, args)
    wall_s = time.perf_counter() - start
    print('\n' + _peers_markdown(records))
  else:
    for case in _cases(args):
      records += run_case(case, args, nt_error)
    records += _ratios(records)
    wall_s = time.perf_counter() - start
    print('\n' + _markdown(records))
  print(f'\ntotal {wall_s:.0f}s')
  settings = {'openblas_num_threads': os.environ.get('OPENBLAS_NUM_THREADS'),
              'mem_limit_gb': args.mem_limit_gb,
              'dense_max_entries': args.dense_max_entries,
              'gram_max_rows': args.gram_max_rows,
              'case_budget_s': args.case_budget_s, 'quick': args.quick,
              'memory': None if args.no_memory else
                        'peak RSS growth over the first call after compile, '
                        'fresh process per variant (VmHWM after clear_refs)',
              'neural_tangents': nt_error or 'imported',
              'wall_s': wall_s}
  if not args.no_save:
    print('appended to', _timing.write_jsonl(
        'jacobian', [{**settings, **r} for r in records]))


if __name__ == '__main__':
  main()
