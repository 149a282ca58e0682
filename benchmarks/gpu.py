r"""One command for a lent GPU: every benchmark, then the GPU experiments.

  bash benchmarks/gpu.sh              # = python -m benchmarks.gpu
  bash benchmarks/gpu.sh --tiny       # the same pipeline, smallest settings
  bash benchmarks/gpu.sh --prepare    # here, with tfds: the data to carry

On a machine where JAX sees a GPU it runs, within ``--deadline-s`` (560 s:
one device call is at most 10 minutes, and a lent machine's whole time 15,
its start included):

1. every ``benchmarks/bench_*.py`` in its GPU configuration (:data:`PARTS`),
   one after the other with the GPU to itself, so that their timings are
   not shared; each bench's JSON lines go to a folder of its own under the
   workdir (``$METACF_BENCH_RESULTS_DIR``), not to ``benchmarks/results/``;
2. then, side by side (three processes on the GPU, each held to a third of
   its memory): Omniglot MAML 5-way 1-shot (Finn et al. 2017) toward the
   paper's 60,000 iterations, trained for whatever time is left
   (``--time_budget_s``; the iterations reached are reported); the
   meta-learning comparison (``experiments.meta_baselines``: the seven
   methods under one equal wall-clock budget, at the papers' meta-batch
   sizes and test-time steps); and the fine-tuning paradigms and
   prevent-forgetting defaults, one after the other.

Every part has its own time limit (``--budget NAME=SECONDS`` changes one)
and is killed at it; the script goes on with the next part and records
what happened. It writes one JSON (``--out``, default
``benchmarks/results/gpu_<UTC time>.json``): the device (``device_kind``,
backend, jax version), and per part the command, wall seconds, ``status``
(``ok``, ``failed``, ``timeout`` or ``skipped``, with ``reason``), the key
figures (the bench's JSON lines; the experiment's ``results.json``
summary, or, after a timeout, the per-run records it had written) and the
end of its log. ``python -m benchmarks.gpu_report`` turns it into the
markdown tables of ``benchmarks/README.md``. The exit status is 0 when
every part is ``ok``, else 1.

The device has no tensorflow-datasets and no internet: ``--prepare``
(here) copies the cached arrays of MNIST, Fashion-MNIST and Omniglot
(``metacf.data.load_arrays``' ``.npz`` files, about 56 MB) into
``.gpu_data/`` (git-ignored), which the device run carries and reads with
NumPy alone (``METACF_DATA_DIR``).

``--tiny`` runs the same parts on a CPU in a minute or two (the benches'
smallest flags, the experiments' smoke configs cut further): what
``tests/test_gpu_script.py`` runs, so that the script cannot rot.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, '.gpu_data')
RESULTS_DIR = os.path.join(ROOT, 'benchmarks', 'results')
DEADLINE_S = 560.0
TINY_DEADLINE_S = 1200.0
# On the GPU the benches end by this many seconds before the deadline, left
# to the experiments (a bench that would run past it is cut or skipped).
PHASE2_S = 300.0
# Seconds a phase-1 (bench) part may still start with; experiments need more.
_MIN_START_S = {'bench': 10.0, 'experiment': 30.0}
_LOG_TAIL_CHARS = 2000

# (dataset, split) each part reads through metacf.data.load_arrays.
OMNIGLOT = (('omniglot', 'background'), ('omniglot', 'evaluation'))
MNIST = (('mnist', 'train'), ('mnist', 'test'))
FASHION = (('fashion_mnist', 'train'), ('fashion_mnist', 'test'))
DATASETS = MNIST + FASHION + OMNIGLOT

# meta_baselines' methods (configs.paper_methods order) on the GPU: the
# papers' meta-batch sizes, inner and test-time steps, Reptile's 10 training
# shots; the default config keeps its CPU values for these.
_BASELINE_PAPER = (
    ('0.meta_batch_size', '32'),       # maml
    ('1.meta_batch_size', '32'),       # fomaml
    ('2.num_eval_steps', '50'),        # reptile
    ('2.train_shots', '10'),
    ('3.meta_batch_size', '32'),       # imaml
    ('3.num_inner_steps', '16'),
    ('3.num_eval_steps', '16'),
    ('5.meta_batch_size', '32'),       # anil
    ('6.meta_batch_size', '16'),       # maml++
)


@dataclasses.dataclass(frozen=True)
class Part:
  """One command of the script.

  Attributes:
    name: Key in the JSON (``bench_maml``, ``maml_omniglot``, ...).
    kind: ``'bench'`` (phase 1, alone on the device) or ``'experiment'``.
    module: ``python -m`` module.
    gpu_args: Arguments on the GPU.
    tiny_args: Arguments in ``--tiny`` mode.
    budget_s: Time limit on the GPU (``--tiny``: ``tiny_budget_s``).
    tiny_budget_s: Time limit in ``--tiny`` mode.
    lane: Phase-2 lane: parts of one lane run in turn, lanes side by side.
    datasets: ``(name, split)`` pairs it loads (checked before it starts).
    time_budget_flag: The experiment's own training budget flag, set to
      the time left minus ``reserve_s`` (compilation, evaluation, start).
    reserve_s: See ``time_budget_flag`` (``--tiny``: not set).
  """
  name: str
  kind: str
  module: str
  gpu_args: tuple[str, ...]
  tiny_args: tuple[str, ...]
  budget_s: float
  tiny_budget_s: float = 240.0
  lane: str = 'bench'
  datasets: tuple[tuple[str, str], ...] = ()
  time_budget_flag: str | None = None
  reserve_s: float = 0.0


def _bench(name: str, gpu_args: Sequence[str], tiny_args: Sequence[str],
           budget_s: float, datasets=()) -> Part:
  return Part(name, 'bench', f'benchmarks.{name}', tuple(gpu_args),
              tuple(tiny_args), budget_s, tiny_budget_s=180.0,
              datasets=tuple(datasets))


PARTS: tuple[Part, ...] = (
    # Phase 1: the benchmarks, each alone on the device. GPU configurations:
    # the README's sizes, rounds cut to fit, no per-process host-RSS probes
    # (host memory says nothing of a GPU run).
    _bench('bench_distill', [], ['--batch', '64', '--classes', '10',
                                 '--rounds', '2', '--dtypes', 'float32'], 30),
    _bench('bench_replay', [], ['--capacities', '100', '--batch', '8',
                                '--rounds', '2', '--num-classes', '4'], 40),
    _bench('bench_noise', [], ['--batch', '2', '--length', '64', '--rounds',
                               '2', '--block', '2'], 40),
    _bench('bench_meta_continual', [], [], 40),
    _bench('bench_adapters', ['--no-memory'],
           ['--batches', '4', '--ranks', '1', '--rounds', '2', '--block', '2',
            '--no-memory', '--no-deep-prompt'], 50),
    _bench('bench_protect', ['--quick'],
           ['--parts', 'ewc', '--sizes', '1000', '--ks', '10', '--ranks', '2',
            '--num-examples', '8', '--target-s', '0.05', '--min-rounds', '2',
            '--max-rounds', '2', '--block', '2'], 60),
    _bench('bench_cl_baselines', ['--quick'],
           ['--parts', 'steps', '--mlps', 'mlp_100', '--target-s', '0.05',
            '--min-rounds', '2', '--max-rounds', '2', '--block', '2'], 60),
    _bench('bench_jacobian', ['--quick'],
           ['--params', '1e3', '--rows', '--largest-n', '0', '--k', '2',
            '--variants', 'randomized', '--rounds', '2', '--min-rounds', '1',
            '--case-budget-s', '0.5', '--accuracy-settings', '--no-memory'],
           70, datasets=MNIST[:1]),
    _bench('bench_maml', ['--workloads', 'A', 'B', 'family', '--conv-tasks',
                          '32', '--conv-rounds', '10', '--chunks', '1',
                          '--rounds', '20', '--remat-steps', '1', '5', '20',
                          '--family-rounds', '50', '--family-peer-rounds',
                          '5', '--no-memory'],
           ['--workloads', 'A', 'family', '--inner-steps', '1',
            '--remat-steps', '1', '--num-tasks', '2', '--shots', '2',
            '--rounds', '2', '--family-rounds', '1', '--family-peer-rounds',
            '1'], 120),
    _bench('bench_meta_family', ['--inner-steps', '1', '5', '20', '--rounds',
                                 '10', '8', '5'],
           ['--inner-steps', '1', '--rounds', '1', '--num-tasks', '1',
            '--variants', 'fomaml'], 70),
    # Phase 2: the experiments, three lanes side by side.
    Part('maml_omniglot', 'experiment', 'experiments.maml_omniglot.main',
         ('--config=default', '--settings=5way1shot'),
         ('--config=smoke', '--config.num_iterations=2',
          '--config.chunk_size=1', '--config.checkpoint_every=2',
          '--config.eval_schedule=((2, 2),)', '--config.features=2',
          '--config.num_curve_tasks=2', '--config.num_test_tasks=2',
          '--config.eval_batch_size=2', '--config.max_eval_steps=1',
          '--config.settings.0.meta_batch_size=1',
          '--config.settings.0.paper_eval_steps=1'),
         budget_s=330, lane='omniglot', datasets=OMNIGLOT,
         time_budget_flag='--time_budget_s', reserve_s=90),
    Part('meta_baselines', 'experiment', 'experiments.meta_baselines.main',
         ('--config=default', '--config.protocol=cpu',
          '--config.settings=((5, 1),)', '--config.time_budget_s=6',
          '--config.test_query=15', '--config.num_curve_points=2',
          *(f'--config.methods.{k}={v}' for k, v in _BASELINE_PAPER)),
         ('--config=smoke', '--config.settings=((5, 1),)',
          '--config.num_curve_points=1', '--config.num_test_tasks=5'),
         budget_s=330, lane='baselines', datasets=OMNIGLOT),
    Part('finetune_paradigms', 'experiment',
         'experiments.finetune_paradigms.main',
         ('--config=default', '--config.seeds=(0,)'),
         ('--config=smoke', '--config.seeds=(0,)', '--config.shots=(2,)'),
         budget_s=170, lane='cl', datasets=MNIST + FASHION),
    Part('prevent_forgetting', 'experiment',
         'experiments.prevent_forgetting.main',
         ('--config=default', '--config.seeds=(0,)', '--config.workers=4'),
         ('--config=smoke', '--config.pairs=()', '--config.num_tasks=2',
          "--config.benchmarks=('permuted',)",
          "--config.strategies=('naive', 'ewc')"),
         budget_s=160, lane='cl', datasets=MNIST),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ----------------------------------------------------------------- device


_PROBE = r"""
import json, os, platform, sys
import jax
dev = jax.devices()[0]
info = {
    'device_kind': getattr(dev, 'device_kind', '') or platform.processor(),
    'backend': jax.default_backend(), 'device_count': jax.device_count(),
    'jax': jax.__version__, 'python': platform.python_version(),
    'host_cores': os.cpu_count(), 'host': platform.node(), 'packages': {}}
try:
  from benchmarks import _timing
  info['description'] = _timing.device_description()
except Exception as e:
  info['description'] = f'? ({type(e).__name__}: {e})'
for mod in ('jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'torch',
            'torchopt', 'tensorflow_datasets'):
  try:
    module = __import__(mod, fromlist=['_'])
    info['packages'][mod] = getattr(module, '__version__', 'present')
  except Exception:
    info['packages'][mod] = None
print('PROBE' + json.dumps(info))
"""


def device_info(env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """The device JAX sees (kind, backend, count), versions, host.

  Read in a child process: JAX in this one would hold a share of the GPU's
  memory while the parts run.
  """
  env = dict(os.environ if env is None else env)
  env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  try:
    proc = subprocess.run([sys.executable, '-c', _PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    line = [l for l in proc.stdout.splitlines() if l.startswith('PROBE')]
    if line:
      return json.loads(line[-1][len('PROBE'):])
    error = (proc.stderr or proc.stdout)[-1000:]
  except (OSError, subprocess.SubprocessError) as e:
    error = f'{type(e).__name__}: {e}'
  return {'device_kind': None, 'backend': None, 'description': None,
          'error': error}


# ------------------------------------------------------------------- data


def cache_file(data_dir: str, name: str, split: str) -> str:
  from metacf.data import _arrays  # pylint: disable=g-import-not-at-top
  return _arrays.cache_path(name, split, data_dir)


def prepare(out_dir: str = DATA_DIR, *, source_dir: str | None = None,
            raw_dir: str | None = None,
            datasets: Sequence[tuple[str, str]] = DATASETS,
            limit_bytes: int = 60 * 2**20) -> list[str]:
  """Copies the cached arrays the parts read into ``out_dir``; returns paths.

  Builds a missing cache first (``metacf.data.load_arrays``: needs the
  ``[data]`` extra and the raw files, ``raw_dir`` or ``$METACF_RAW_DIR``)
  in ``source_dir`` (default: ``$METACF_DATA_DIR``, else tfds's default).

  Raises:
    ValueError: if the copies exceed ``limit_bytes`` (a device call
      carries at most 64 MiB with the working tree).
  """
  import metacf.data  # pylint: disable=g-import-not-at-top
  from metacf.data import _arrays  # pylint: disable=g-import-not-at-top
  paths, total = [], 0
  for name, split in datasets:
    src = _arrays.cache_path(name, split, source_dir)
    if _arrays._read_cache(src, name) is None:  # pylint: disable=protected-access
      metacf.data.load_arrays(name, split, raw_dir=raw_dir,
                              data_dir=source_dir)
    dst = _arrays.cache_path(name, split, out_dir)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not (os.path.isfile(dst) and os.path.getsize(dst) ==
            os.path.getsize(src)):
      shutil.copyfile(src, dst)
    total += os.path.getsize(dst)
    paths.append(dst)
    print(f'{name} {split}: {os.path.getsize(dst) / 1e6:.1f} MB -> {dst}')
  print(f'total {total / 2**20:.1f} MiB in {out_dir}')
  if total > limit_bytes:
    raise ValueError(f'prepare: the caches take {total / 2**20:.1f} MiB, '
                     f'more than {limit_bytes / 2**20:.0f} MiB.')
  return paths


# ------------------------------------------------------------------ parts


def _read_jsonl(folder: str) -> list[dict[str, Any]]:
  records = []
  if not os.path.isdir(folder):
    return records
  for fname in sorted(os.listdir(folder)):
    if fname.endswith('.jsonl'):
      with open(os.path.join(folder, fname)) as f:
        records += [json.loads(line) for line in f if line.strip()]
  return records


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _partial_records(workdir: str) -> list[dict[str, Any]]:
  """Per-run records (``loop.resumable_records``) an experiment has written."""
  found = []
  for sub in ('runs', 'pairs', 'records', 'predictions'):
    top = os.path.join(workdir, sub)
    for dirpath, _, files in os.walk(top):
      for fname in sorted(files):
        if fname.endswith('.json'):
          data = _read_json(os.path.join(dirpath, fname))
          if isinstance(data, dict):
            found.append({'path': os.path.relpath(
                os.path.join(dirpath, fname), workdir),
                          'record': data.get('record', data)})
  return found


def _omniglot_figures(results: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for name, s in results.get('settings', {}).items():
    out[name] = {k: s.get(k) for k in (
        'iterations', 'complete', 'stopped_by_time_budget', 'accuracy',
        'ci95', 'paper_eval_steps', 'paper_accuracy', 'paper_ci95',
        'meta_batch_size', 'train_time_s', 'compile_s', 'final_eval_s',
        'wall_time_s')}
    if s.get('iterations') and s.get('train_time_s'):
      out[name]['iterations_per_s'] = s['iterations'] / s['train_time_s']
  out['paper_iterations'] = results.get('config', {}).get('num_iterations')
  return out


def _baselines_figures(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for setting, methods in results.get('runs', {}).items():
    for method, r in methods.items():
      rows.append({'setting': setting, 'method': method, **{
          k: r.get(k) for k in ('accuracy', 'ci95', 'num_test_tasks',
                                'paper_accuracy', 'iterations',
                                'train_time_s', 'step_time_s', 'compile_s')},
                   'meta_batch_size': r.get('hyperparameters', {}).get(
                       'meta_batch_size')})
  return rows


def _prevent_figures(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for bench, strategies in results.get('summary', {}).items():
    for strategy, r in strategies.items():
      mean = lambda key, r=r: (r.get(key) or {}).get('mean')
      rows.append({'benchmark': bench, 'strategy': strategy,
                   'acc': mean('acc'), 'bwt': mean('bwt'),
                   'forgetting': mean('forgetting'),
                   'us_per_step': r.get('us_per_step'),
                   'time_s': r.get('time_s')})
  return rows


def _paradigms_figures(results: Mapping[str, Any]) -> dict[str, Any]:
  pretrain = {k: v for k, v in results.get('pretrain', {}).items()
              if k != 'history'}
  return {'sizes': results.get('sizes'), 'pretrain': pretrain,
          'num_variants': len(results.get('variants', {}))}


def _experiment_figures(name: str, results: Mapping[str, Any]) -> Any:
  """The key figures of an experiment's ``results.json``."""
  if name == 'maml_omniglot':
    return _omniglot_figures(results)
  if name == 'meta_baselines':
    return _baselines_figures(results)
  if name == 'prevent_forgetting':
    return _prevent_figures(results)
  if name == 'finetune_paradigms':
    return _paradigms_figures(results)
  return results.get('summary')


def _command(part: Part, tiny: bool, workdir: str,
             time_left: float) -> list[str]:
  cmd = [sys.executable, '-m', part.module]
  cmd += list(part.tiny_args if tiny else part.gpu_args)
  if part.kind == 'experiment':
    cmd.append(f'--workdir={workdir}')
    if part.time_budget_flag and not tiny:
      cmd.append(f'{part.time_budget_flag}='
                 f'{max(time_left - part.reserve_s, 10.0):.0f}')
  return cmd


def _tail(path: str) -> str:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(f.tell() - _LOG_TAIL_CHARS, 0))
      return f.read().decode('utf-8', 'replace')
  except OSError:
    return ''


def _run(cmd: Sequence[str], env: Mapping[str, str], log: str,
         timeout: float) -> tuple[int | None, float]:
  """Runs ``cmd`` (its own process group) to ``log``; (rc or None, wall)."""
  start = time.monotonic()
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env), stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      rc = None
      for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
          os.killpg(proc.pid, sig)
        except ProcessLookupError:
          break
        try:
          proc.wait(timeout=grace)
          break
        except subprocess.TimeoutExpired:
          continue
  return rc, time.monotonic() - start


def run_part(part: Part, *, tiny: bool, workdir: str, data_dir: str | None,
             deadline: float, budget_s: float,
             base_env: Mapping[str, str]) -> dict[str, Any]:
  """Runs one part; its JSON entry."""
  part_dir = os.path.join(workdir, part.name)
  entry: dict[str, Any] = {'kind': part.kind, 'lane': part.lane,
                           'budget_s': budget_s}
  time_left = deadline - time.monotonic()
  timeout = min(budget_s, time_left)
  missing = [cache_file(data_dir, n, s) for n, s in part.datasets
             if data_dir is not None
             and not os.path.isfile(cache_file(data_dir, n, s))]
  if missing:
    return {**entry, 'status': 'skipped', 'reason': (
        f'no cached arrays: {", ".join(missing)}; run `bash '
        'benchmarks/gpu.sh --prepare` on a machine with tfds and carry '
        '.gpu_data')}
  if timeout < _MIN_START_S[part.kind] and not tiny:
    return {**entry, 'status': 'skipped', 'reason': (
        f'the script\'s time ran out ({time_left:.0f} s left)')}
  shutil.rmtree(part_dir, ignore_errors=True)
  os.makedirs(part_dir)
  cmd = _command(part, tiny, os.path.join(part_dir, 'workdir'), timeout)
  env = dict(base_env)
  env['METACF_BENCH_RESULTS_DIR'] = os.path.join(part_dir, 'bench_results')
  log = os.path.join(part_dir, 'log.txt')
  entry['command'] = ' '.join(
      [os.path.basename(cmd[0]), *cmd[1:]]).replace(workdir, '<workdir>')
  entry['started_utc'] = _utc()
  rc, wall = _run(cmd, env, log, timeout)
  entry.update(wall_s=round(wall, 1), timeout_s=round(timeout, 1),
               returncode=rc)
  if part.kind == 'bench':
    records = _read_jsonl(env['METACF_BENCH_RESULTS_DIR'])
    entry['records'] = records
    entry['num_records'] = len(records)
  else:
    results = _read_json(os.path.join(part_dir, 'workdir', 'results.json'))
    if results is not None:
      entry['figures'] = _experiment_figures(part.name, results)
      try:  # The experiment's own markdown table, where it writes one.
        with open(os.path.join(part_dir, 'workdir', 'results.md')) as f:
          entry['results_md'] = f.read()
      except OSError:
        pass
      entry['wall_time_s_inside'] = results.get('wall_time_s')
      entry['results_device'] = results.get('device')
    else:
      partial = _partial_records(os.path.join(part_dir, 'workdir'))
      if partial:
        entry['partial_records'] = partial
  if rc is None:
    entry['status'] = 'timeout'
    entry['reason'] = f'killed at its limit of {timeout:.0f} s'
  elif rc != 0:
    entry['status'] = 'failed'
    entry['reason'] = f'exit status {rc} (see log_tail)'
  elif part.kind == 'bench' and not entry['records']:
    entry['status'] = 'failed'
    entry['reason'] = 'exit status 0 but no JSON lines written'
  elif part.kind == 'experiment' and 'figures' not in entry:
    entry['status'] = 'failed'
    entry['reason'] = 'exit status 0 but no results.json'
  else:
    entry['status'] = 'ok'
  entry['log_tail'] = _tail(log)
  print(f'[gpu] {part.name}: {entry["status"]} in {wall:.0f}s'
        + (f' ({entry["reason"]})' if 'reason' in entry else ''), flush=True)
  return entry


def _utc() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')


def run_all(*, tiny: bool, out: str, workdir: str, data_dir: str | None,
            deadline_s: float, parts: Sequence[str] = PART_NAMES,
            budgets: Mapping[str, float] | None = None,
            lanes_in_parallel: bool | None = None) -> dict[str, Any]:
  """Runs the parts; writes and returns the JSON."""
  start = time.monotonic()
  deadline = start + deadline_s
  budgets = dict(budgets or {})
  if lanes_in_parallel is None:
    lanes_in_parallel = not tiny
  os.makedirs(workdir, exist_ok=True)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  env['PYTHONUNBUFFERED'] = '1'
  if data_dir is not None:
    env['METACF_DATA_DIR'] = os.path.abspath(data_dir)
  selected = [p for p in PARTS if p.name in parts]
  report: dict[str, Any] = {
      'script': 'benchmarks/gpu.py', 'mode': 'tiny' if tiny else 'gpu',
      'date_utc': _utc(), 'deadline_s': deadline_s,
      'data_dir': None if data_dir is None else os.path.relpath(
          os.path.abspath(data_dir), ROOT),
      'device': device_info(env), 'parts': {},
  }
  try:
    report['git_commit'] = subprocess.run(
        ['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
        text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    report['git_commit'] = None
  print(f'[gpu] device: {report["device"]["description"]}; mode '
        f'{report["mode"]}; {len(selected)} parts; deadline {deadline_s:.0f}s',
        flush=True)
  results: dict[str, dict[str, Any]] = {}

  def budget(p: Part) -> float:
    return budgets.get(p.name, p.tiny_budget_s if tiny else p.budget_s)

  def one(p: Part, part_env: Mapping[str, str]) -> None:
    try:
      results[p.name] = run_part(p, tiny=tiny, workdir=workdir,
                                 data_dir=data_dir, deadline=deadline,
                                 budget_s=budget(p), base_env=part_env)
    except Exception as e:  # pylint: disable=broad-except
      results[p.name] = {'kind': p.kind, 'status': 'failed',
                         'reason': f'the script failed: {type(e).__name__}: '
                                   f'{e}'}

  full_deadline = deadline
  if not tiny and any(p.kind == 'experiment' for p in selected):
    deadline = full_deadline - PHASE2_S
  for p in selected:  # Phase 1: the benches, alone.
    if p.kind == 'bench':
      one(p, env)
  deadline = full_deadline
  lanes: dict[str, list[Part]] = {}
  for p in selected:
    if p.kind == 'experiment':
      lanes.setdefault(p.lane, []).append(p)
  lane_env = dict(env)
  if lanes_in_parallel and len(lanes) > 1:
    # Each process takes a share of the GPU memory, not JAX's default 75%.
    lane_env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / len(lanes):.2f}'
  threads = [threading.Thread(target=lambda ps=ps: [one(p, lane_env)
                                                    for p in ps])
             for ps in lanes.values()]
  for t in threads:
    t.start()
    if not lanes_in_parallel:
      t.join()
  for t in threads:
    t.join()
  report['parts'] = {p.name: results[p.name] for p in selected}
  report['experiment_lanes_in_parallel'] = lanes_in_parallel
  report['wall_s'] = round(time.monotonic() - start, 1)
  statuses = [r['status'] for r in report['parts'].values()]
  report['all_ok'] = all(s == 'ok' for s in statuses)
  report['status_counts'] = {s: statuses.count(s) for s in sorted(set(
      statuses))}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(report, f, indent=1, default=str)
    f.write('\n')
  from benchmarks import gpu_report  # pylint: disable=g-import-not-at-top
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(gpu_report.render(json.loads(json.dumps(report, default=str))))
  print(f'[gpu] {report["status_counts"]} in {report["wall_s"]:.0f}s; wrote '
        f'{out}', flush=True)
  return report


class _ArgsOK(Exception):
  """Raised once a part's arguments are parsed (``check_args``)."""


def check_args(part: Part, *, tiny: bool, workdir: str) -> None:
  """Parses ``part``'s arguments as its command would, running nothing.

  A bench's ``main()`` stops right after ``parse_args``; an experiment's
  ``main()`` right before ``train_and_evaluate``, with its config built and
  every ``--config.*`` override applied (and checked).

  Raises:
    ValueError: naming the part, if its arguments do not parse.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  args = list(part.tiny_args if tiny else part.gpu_args)
  if part.kind == 'bench' and not args:
    return  # Nothing to parse (bench_meta_continual takes no flags).
  # Nothing may reach the committed results, whatever happens.
  os.environ['METACF_BENCH_RESULTS_DIR'] = os.path.join(workdir,
                                                        'bench_results')
  from benchmarks import _timing  # pylint: disable=g-import-not-at-top
  _timing.RESULTS_DIR = os.environ['METACF_BENCH_RESULTS_DIR']
  module = importlib.import_module(part.module)
  if part.kind == 'bench':
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, *a, **k):
      original(parser, *a, **k)
      raise _ArgsOK

    patch = mock.patch.object(argparse.ArgumentParser, 'parse_args',
                              parse_then_stop)
    call = module.main
    argv = [part.module, *args]
  else:
    train = importlib.import_module(part.module.rsplit('.', 1)[0] + '.train')

    def stop(config, *a, **k):
      raise _ArgsOK(config)

    patch = mock.patch.object(train, 'train_and_evaluate', stop)
    call = lambda: module.main(_command(part, tiny, workdir, 100.0)[3:])
    argv = [part.module]
  with patch, mock.patch.object(sys, 'argv', argv):
    try:
      call()
    except _ArgsOK:
      return
    except SystemExit as e:
      raise ValueError(f'{part.name} ({"tiny" if tiny else "gpu"}): its '
                       f'arguments {args} do not parse (exit {e.code}).'
                       ) from e
  raise ValueError(f'{part.name}: main() returned without parsing.')


def _parse_budgets(items: Sequence[str]) -> dict[str, float]:
  out = {}
  for item in items:
    name, eq, value = item.partition('=')
    if not eq or name not in PART_NAMES:
      raise SystemExit(f'--budget: NAME=SECONDS with NAME in {PART_NAMES}, '
                       f'got {item!r}')
    out[name] = float(value)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tiny', action='store_true',
                      help='smallest settings (a CPU check of the pipeline)')
  parser.add_argument('--prepare', action='store_true',
                      help='only copy the data caches into --data-dir')
  parser.add_argument('--data-dir', default=None,
                      help='folder of cached arrays (default: .gpu_data if '
                      'it exists, else $METACF_DATA_DIR / tfds default)')
  parser.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'gpu'))
  parser.add_argument('--out', default=None,
                      help='JSON path (default benchmarks/results/'
                      'gpu_<UTC>.json; --tiny: <workdir>/gpu_tiny.json)')
  parser.add_argument('--deadline-s', type=float, default=None,
                      help=f'whole run (default {DEADLINE_S:.0f}; --tiny '
                      f'{TINY_DEADLINE_S:.0f})')
  parser.add_argument('--parts', nargs='+', default=list(PART_NAMES),
                      choices=PART_NAMES)
  parser.add_argument('--budget', action='append', default=[],
                      metavar='NAME=SECONDS', help='one part\'s time limit')
  parser.add_argument('--sequential', action='store_true',
                      help='run the experiment lanes one after the other')
  parser.add_argument('--check-args', action='store_true',
                      help='only parse every part\'s arguments (GPU and '
                      'tiny), running nothing')
  args = parser.parse_args(argv)
  if args.prepare:
    prepare(args.data_dir or DATA_DIR)
    return 0
  if args.check_args:
    for p in PARTS:
      if p.name in args.parts:
        for tiny in (False, True):
          check_args(p, tiny=tiny, workdir=os.path.join(args.workdir,
                                                        'check_args'))
    print(f'[gpu] arguments of {len(args.parts)} parts parse (GPU and tiny)')
    return 0
  data_dir = args.data_dir
  if data_dir is None and os.path.isdir(DATA_DIR):
    data_dir = DATA_DIR
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y%m%dT%H%M%SZ')
  out = args.out or (os.path.join(args.workdir, 'gpu_tiny.json') if args.tiny
                     else os.path.join(RESULTS_DIR, f'gpu_{stamp}.json'))
  deadline_s = args.deadline_s or (TINY_DEADLINE_S if args.tiny
                                   else DEADLINE_S)
  report = run_all(tiny=args.tiny, out=out, workdir=args.workdir,
                   data_dir=data_dir, deadline_s=deadline_s, parts=args.parts,
                   budgets=_parse_budgets(args.budget),
                   lanes_in_parallel=False if args.sequential else None)
  return 0 if report['all_ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
