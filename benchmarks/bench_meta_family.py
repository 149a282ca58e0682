"""Meta-step time and compiled memory of the MAML family against inner steps.

Workload B of ``bench_maml`` (Conv-4 + transductive BatchNorm, 28x28x1,
5-way 1-shot, 15 queries per class, inner SGD lr 0.4, outer Adam 1e-3) on a
small meta-batch (4 tasks by default, ``vmap`` over tasks, no task chunks),
for each ``num_inner_steps`` in ``--inner-steps`` (default 1 5 20 100):

* ``maml``: ``metacf.maml.make_meta_train_step`` (second order).
* ``maml_remat``: the same with ``remat=True``.
* ``fomaml``: the same with ``first_order=True``.
* ``reptile``: ``metacf.maml.reptile_grad`` + ``optax.adam`` in one
  ``jax.jit`` (params and state donated, as ``make_meta_train_step``).
* ``imaml``: ``metacf.maml.imaml_grad`` (``reg`` 1.0, 5 CG steps) + Adam,
  same jit.
* ``torchopt_imaml``: the PyTorch peer, TorchOpt's implicit-gradient iMAML
  (``benchmarks/_torch_imaml.make_torchopt_imaml_step``: its
  ``ImplicitMetaGradientModule`` recipe with ``solve_cg``, same inner steps,
  same 5 CG steps, no early stop). Its meta-gradient is checked against
  ``imaml_grad``'s on the same params and tasks (error relative to the
  largest entry) before anything is timed. Skipped without torch/torchopt.

All start from the same parameters. Each JAX step is AOT-compiled apart
(compile seconds) and XLA's ``memory_analysis()`` of the compiled step is
recorded (temporaries, arguments, outputs; its ``peak_memory_in_bytes``
reads as the arguments' size on CPU, so temporaries are the figure):
compile-only, not a measurement of a run. The variants are then timed interleaved (A B C ... A B
C ...), one step per variant per round, after untimed warm-up rounds.

  python -m benchmarks.bench_meta_family [--inner-steps 1 5 20 100]
      [--rounds 15 10 8 5] [--num-tasks 4] [--memory-only]

``--check-float64 N`` only compares metacf's and TorchOpt's iMAML
meta-gradients at N inner steps in float32 and float64 (errors relative to
the largest entry of metacf's float64 one): a formulation difference shows
in float64, rounding amplified by the inner loop and the truncated CG only in
float32.

  python -m benchmarks.bench_meta_family --check-float64 5
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _timing
from benchmarks import bench_maml as bm  # Sets OMP_WAIT_POLICY before torch.
from metacf import maml

REG = 1.0       # iMAML's proximal strength lambda.
CG_STEPS = 5    # iMAML's conjugate-gradient iterations (the paper's 5).
JAX_VARIANTS = ('maml', 'maml_remat', 'fomaml', 'reptile', 'imaml')


def _loss_fn():
  return bm._ce_loss(bm._conv4(True))  # pylint: disable=protected-access


def _imaml_grad_fn(n):
  loss_fn = _loss_fn()
  return lambda params, tasks: maml.imaml_grad(
      loss_fn, params, tasks, reg=REG, inner_lr=bm.INNER_LR_B,
      num_inner_steps=n, cg_steps=CG_STEPS)


def make_step(variant, n):
  """The jitted ``step(params, opt_state, tasks)`` of a JAX variant."""
  loss_fn = _loss_fn()
  if variant in ('maml', 'maml_remat', 'fomaml'):
    return maml.make_meta_train_step(
        loss_fn, optax.adam(bm.OUTER_LR), inner_lr=bm.INNER_LR_B,
        num_inner_steps=n, first_order=variant == 'fomaml',
        remat=variant == 'maml_remat')
  if variant == 'reptile':
    # Reptile reads no query set and computes no loss: the step returns 0.
    return bm._grad_step(  # pylint: disable=protected-access
        lambda params, tasks: (jnp.zeros(()), maml.reptile_grad(
            loss_fn, params, tasks, inner_lr=bm.INNER_LR_B,
            num_inner_steps=n)))
  if variant == 'imaml':
    return bm._grad_step(_imaml_grad_fn(n))  # pylint: disable=protected-access
  raise ValueError(variant)


class _Runner(bm._JaxRunner):  # pylint: disable=protected-access
  """``bench_maml._JaxRunner`` plus XLA's whole memory analysis."""

  def __init__(self, step, params, tasks):
    super().__init__(step, params, tasks)
    self.memory = _timing.compiled_memory(self.compiled)
    stats = self.compiled.memory_analysis()
    if self.memory is not None and hasattr(stats, 'peak_memory_in_bytes'):
      self.memory['peak_bytes'] = int(stats.peak_memory_in_bytes)


def _torchopt():
  torch, _ = bm._torch()  # pylint: disable=protected-access
  if torch is None:
    return None, 'torch is not installed'
  try:
    import torchopt  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return None, f'torchopt does not import: {e}'
  return torch, None


class _TorchoptImamlRunner:

  def __init__(self, torch, params, tasks, n):
    from benchmarks import _torch_conv4  # pylint: disable=g-import-not-at-top
    from benchmarks import _torch_imaml  # pylint: disable=g-import-not-at-top
    self.model = _torch_conv4.make_conv4(bm.WAYS)
    _torch_conv4.load_jax_params(self.model, params)
    self.step = _torch_imaml.make_torchopt_imaml_step(
        self.model, inner_lr=bm.INNER_LR_B, num_inner_steps=n, reg=REG,
        cg_steps=CG_STEPS, outer_lr=bm.OUTER_LR)
    self.tasks = bm._torch_tasks(torch, tasks)  # pylint: disable=protected-access
    self.compile_s = None
    self.memory = None

  def __call__(self):
    return self.step(*self.tasks)


def check_imaml_against_torchopt(torch, params, tasks, n):
  """Largest |metacf - TorchOpt| iMAML meta-gradient entry / largest entry."""
  from benchmarks import _torch_conv4  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_imaml  # pylint: disable=g-import-not-at-top
  loss, ours = jax.jit(_imaml_grad_fn(n))(params, tasks)
  model = _torch_conv4.make_conv4(bm.WAYS)
  _torch_conv4.load_jax_params(model, params)
  got, torch_loss = _torch_imaml.torchopt_imaml_meta_gradient(
      model, *bm._torch_tasks(torch, tasks), inner_lr=bm.INNER_LR_B,  # pylint: disable=protected-access
      num_inner_steps=n, reg=REG, cg_steps=CG_STEPS)
  theirs = bm._from_torch(got)  # pylint: disable=protected-access
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ours))
  err = max(float(np.max(np.abs(np.asarray(leaf) - bm._get(theirs, path))))  # pylint: disable=protected-access
            for path, leaf in jax.tree.leaves_with_path(ours)) / scale
  return {'relative_error': err, 'metacf_loss': float(loss),
          'torchopt_loss': torch_loss, 'largest_entry': scale}


def check_imaml_float64(n):
  """metacf and TorchOpt iMAML meta-gradients, float32 and float64.

  Errors relative to the largest entry of metacf's float64 meta-gradient:
  separates a formulation difference (float64 disagreement) from float32
  rounding that the truncated CG amplifies. Needs ``jax_enable_x64``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_conv4  # pylint: disable=g-import-not-at-top
  from benchmarks import _torch_imaml  # pylint: disable=g-import-not-at-top

  def cast(dtype):
    return lambda a: (a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                      else a)

  params = bm._conv_params(jax.random.key(0))  # pylint: disable=protected-access
  tasks = bm._conv_tasks(jax.random.key(1), 4)  # pylint: disable=protected-access
  grads = {}
  for name, dtype in (('float32', jnp.float32), ('float64', jnp.float64)):
    p, t = jax.tree.map(cast(dtype), params), jax.tree.map(cast(dtype), tasks)
    _, ours = jax.jit(_imaml_grad_fn(n))(p, t)
    model = _torch_conv4.make_conv4(bm.WAYS)
    if dtype == jnp.float64:
      model = model.double()
    _torch_conv4.load_jax_params(model, p)
    got, _ = _torch_imaml.torchopt_imaml_meta_gradient(
        model, *bm._torch_tasks(torch, t), inner_lr=bm.INNER_LR_B,  # pylint: disable=protected-access
        num_inner_steps=n, reg=REG, cg_steps=CG_STEPS)
    grads[f'metacf_{name}'] = jax.tree.map(np.asarray, ours)
    grads[f'torchopt_{name}'] = bm._from_torch(got)  # pylint: disable=protected-access
  ref = grads['metacf_float64']
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref))
  errors = {name: max(float(np.max(np.abs(bm._get(g, path) - leaf)))  # pylint: disable=protected-access
                      for path, leaf in jax.tree.leaves_with_path(ref)) / scale
            for name, g in grads.items() if name != 'metacf_float64'}
  print(f'n={n}: error vs metacf float64, relative to its largest entry: '
        + ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
  return errors


def _mb(num_bytes):
  return num_bytes / 2**20


def bench(inner_steps, rounds_list, num_tasks, variants, memory_only,
          threads, save=True):
  """One record per number of inner steps, appended as soon as measured."""
  torch, why_not = (None, 'not requested') if (
      memory_only or 'torchopt_imaml' not in variants) else _torchopt()
  if torch is not None:
    torch.set_num_threads(threads)
  elif 'torchopt_imaml' in variants and not memory_only:
    print(f'skipping torchopt_imaml: {why_not}')
  params = bm._conv_params(jax.random.key(0))  # pylint: disable=protected-access
  tasks = bm._conv_tasks(jax.random.key(1), num_tasks)  # pylint: disable=protected-access
  records = []
  for n, rounds in zip(inner_steps, rounds_list):
    runners = {}
    for v in variants:
      if v in JAX_VARIANTS:
        runners[v] = _Runner(make_step(v, n), params, tasks)
        m = runners[v].memory
        print(f'  n={n:3d} {v:14s} compile {runners[v].compile_s:6.1f}s  '
              f'temp {_mb(m["temp_bytes"]):8.1f} MB  args '
              f'{_mb(m["argument_bytes"]):5.1f} MB  out '
              f'{_mb(m["output_bytes"]):5.1f} MB  peak '
              f'{_mb(m.get("peak_bytes", 0)):8.1f} MB', flush=True)
    check = None
    if torch is not None and 'torchopt_imaml' in variants:
      check = check_imaml_against_torchopt(torch, params, tasks, n)
      print(f'  n={n:3d} iMAML meta-gradient metacf vs TorchOpt: max error '
            f'{check["relative_error"]:.1e} of the largest entry '
            f'({check["largest_entry"]:.2e}); query loss '
            f'{check["metacf_loss"]:.5f} vs {check["torchopt_loss"]:.5f}',
            flush=True)
      runners['torchopt_imaml'] = _TorchoptImamlRunner(torch, params, tasks, n)
    rec = {'workload': 'B', 'kind': 'meta_family', 'num_inner_steps': n,
           'num_tasks': num_tasks, 'ways': bm.WAYS, 'shots': bm.SHOTS_B,
           'queries': bm.QUERIES_B, 'inner_lr': bm.INNER_LR_B,
           'imaml_reg': REG, 'cg_steps': CG_STEPS,
           'memory': 'compiled memory_analysis() (compile only)',
           'imaml_check_vs_torchopt': check}
    if memory_only:
      rec.update({v: {'compile_s': r.compile_s, **r.memory}
                  for v, r in runners.items()})
      records.append(rec)
      if save:
        _timing.write_jsonl('meta_family', [rec])
      continue
    t0 = time.perf_counter()
    times = _timing.interleaved(runners, rounds=rounds, warmup=1)
    # One more (untimed) step for the query loss: make_meta_train_step
    # returns MetaTrainMetrics, the other JAX steps the loss, TorchOpt a float.
    losses = {v: float(np.asarray(getattr(out, 'loss', out)))
              for v, out in ((v, r()) for v, r in runners.items())}
    rec.update(rounds=rounds, wall_s=time.perf_counter() - t0,
               load_average=[round(x, 2) for x in os.getloadavg()])
    for v, t in times.items():
      r = runners[v]
      rec[v] = {**_timing.summary_ms(t), 'compile_s': r.compile_s,
                **(r.memory or {}), 'last_loss': losses[v]}
    if torch is not None and 'torchopt_imaml' in rec:
      rec['torch'] = torch.__version__
      rec['torch_threads'] = torch.get_num_threads()
      rec['ratio_torchopt_imaml_over_imaml'] = (
          rec['torchopt_imaml']['median_ms'] / rec['imaml']['median_ms'])
    records.append(rec)
    if save:
      print('appended to', _timing.write_jsonl('meta_family', [rec]))
    print(f'n={n:3d} ({rounds} rounds, {rec["wall_s"]:.0f}s, load '
          f'{rec["load_average"]}):')
    for v in times:
      s = rec[v]
      line = (f'  {v:14s} {s["median_ms"]:9.1f} ms [{s["min_ms"]:.1f}, '
              f'{s["max_ms"]:.1f}]')
      if s['compile_s'] is not None:
        line += (f'  compile {s["compile_s"]:.1f}s  temp '
                 f'{_mb(s["temp_bytes"]):.1f} MB')
      print(line + f'  loss {s["last_loss"]:.4f}', flush=True)
  return records


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--inner-steps', type=int, nargs='+',
                      default=[1, 5, 20, 100])
  parser.add_argument('--rounds', type=int, nargs='+', default=[15, 10, 8, 5],
                      help='timed interleaved rounds, one per --inner-steps')
  parser.add_argument('--num-tasks', type=int, default=4)
  parser.add_argument('--variants', nargs='+',
                      default=[*JAX_VARIANTS, 'torchopt_imaml'],
                      choices=[*JAX_VARIANTS, 'torchopt_imaml'])
  parser.add_argument('--memory-only', action='store_true',
                      help='compile and report memory_analysis(); no timing')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='torch.set_num_threads')
  parser.add_argument('--check-float64', type=int, default=None,
                      metavar='N', help='only compare the iMAML meta-gradients '
                      'of metacf and TorchOpt at N inner steps, float32 and '
                      'float64')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  if args.check_float64 is not None:
    jax.config.update('jax_enable_x64', True)
    check_imaml_float64(args.check_float64)
    return
  if len(args.rounds) != len(args.inner_steps):
    parser.error('--rounds needs one value per --inner-steps value')
  print(f'device: {_timing.device_description()}, jax {jax.__version__}; '
        f'Conv-4, {bm.WAYS}-way {bm.SHOTS_B}-shot, {args.num_tasks} tasks')
  bench(args.inner_steps, args.rounds, args.num_tasks, args.variants,
        args.memory_only, args.threads, save=not args.no_save)


if __name__ == '__main__':
  main()
