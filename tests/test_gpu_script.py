"""benchmarks/gpu.sh (benchmarks/gpu.py) on a CPU, so that it cannot rot.

The runs here are as the lent GPU machine sees them: ``tensorflow_datasets``,
``torch`` and ``torchopt`` blocked (a folder first on ``PYTHONPATH`` whose
packages of those names raise ImportError), the data read from a prepared
``.gpu_data``-like folder. The default tests (about a minute on 2 cores)
parse every part's GPU and tiny arguments without running them, run the
tiny pipeline on three parts (a bench, a second bench, an experiment), and
check the timeout and missing-data paths. Every part in tiny mode
(``bash benchmarks/gpu.sh --tiny``) takes several minutes on 2 cores, too
long for the suite; it is run by hand (benchmarks/README.md).
"""

import json
import os
import subprocess
import sys

import pytest

from _smoke_run import RAW_DIR
from benchmarks import gpu
from benchmarks import gpu_report

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, 'benchmarks', 'gpu.sh')

requires_raw = pytest.mark.skipif(
    RAW_DIR is None or not os.path.isdir(RAW_DIR),
    reason='real raw datasets not found: set METACF_RAW_DIR or stage them in '
    '../shared/data')


def _env(tmp_path):
  blocked = tmp_path / 'blocked'
  for name in ('tensorflow_datasets', 'torch', 'torchopt'):
    (blocked / name).mkdir(parents=True, exist_ok=True)
    (blocked / name / '__init__.py').write_text(
        f'raise ImportError("{name} is absent on the device (test)")\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('METACF_DATA_DIR', 'OUT', 'METACF_BENCH_RESULTS_DIR')}
  env.update(PYTHONPATH=str(blocked), PYTHON=sys.executable,
             METACF_RAW_DIR='/nonexistent')  # The device has no raw files.
  return env


def _run_script(tmp_path, *args, data_dir=None, timeout=600):
  out = tmp_path / 'gpu.json'
  cmd = ['bash', _SCRIPT, '--tiny', '--workdir', str(tmp_path / 'work'),
         '--out', str(out), *args]
  if data_dir is not None:
    cmd += ['--data-dir', str(data_dir)]
  proc = subprocess.run(cmd, cwd=_ROOT, env=_env(tmp_path),
                        capture_output=True, text=True, timeout=timeout)
  assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return proc, json.load(f)


def _check_report(report, parts):
  device = report['device']
  assert device['backend'] == 'cpu'
  assert device['device_kind'] and device['jax'] and device['description']
  assert device['packages']['tensorflow_datasets'] is None  # blocked
  assert device['packages']['torch'] is None
  assert report['mode'] == 'tiny'
  assert list(report['parts']) == list(parts)
  for name, part in report['parts'].items():
    assert part['status'] in ('ok', 'failed', 'timeout', 'skipped'), name
  markdown = gpu_report.render(report)
  assert f'Device: **{device["device_kind"]}**' in markdown
  for name in parts:
    assert f'| {name} | {report["parts"][name]["status"]} |' in markdown


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  if RAW_DIR is None or not os.path.isdir(RAW_DIR):
    pytest.skip('real raw datasets not found')
  folder = tmp_path_factory.mktemp('gpu_data')
  gpu.prepare(str(folder), raw_dir=RAW_DIR)
  return folder


def test_every_part_arguments_parse(tmp_path):
  # GPU and tiny arguments of all 14 parts, through each main()'s own
  # parser (and, for experiments, the config overrides and their checks).
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.gpu', '--check-args', '--workdir',
       str(tmp_path)], cwd=_ROOT, env={**_env(tmp_path), 'PYTHONPATH': _ROOT},
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert f'arguments of {len(gpu.PARTS)} parts parse' in proc.stdout
  assert {p.kind for p in gpu.PARTS} == {'bench', 'experiment'}
  benches = {p.name for p in gpu.PARTS if p.kind == 'bench'}
  on_disk = {f[:-3] for f in os.listdir(os.path.join(_ROOT, 'benchmarks'))
             if f.startswith('bench_') and f.endswith('.py')}
  assert benches == on_disk  # A new bench must join the GPU script.


def test_prepare_copies_every_cache_under_the_carry_limit(data_dir):
  total = 0
  for name, split in gpu.DATASETS:
    path = gpu.cache_file(str(data_dir), name, split)
    assert os.path.isfile(path), path
    total += os.path.getsize(path)
  assert total < 60 * 2**20


@requires_raw
def test_tiny_pipeline_on_three_parts(tmp_path, data_dir):
  parts = ('bench_distill', 'bench_noise', 'prevent_forgetting')
  proc, report = _run_script(tmp_path, '--parts', *parts, data_dir=data_dir)
  _check_report(report, parts)
  failed = {n: (p['status'], p.get('reason'), p.get('log_tail', '')[-1500:])
            for n, p in report['parts'].items() if p['status'] != 'ok'}
  assert not failed, failed
  assert proc.returncode == 0 and report['all_ok']
  distill = report['parts']['bench_distill']
  assert distill['num_records'] >= 1
  assert all(r['bench'] == 'distill' for r in distill['records'])
  # Each line's timing reaches the report (here metacf's and plain's).
  rows = gpu_report.bench_rows(distill['records'])
  assert all('metacf' in timing and 'plain' in timing
             for _, timing, _ in rows), rows
  prevent = report['parts']['prevent_forgetting']
  assert {r['strategy'] for r in prevent['figures']} == {'naive', 'ewc'}
  assert '| EWC |' in prevent['results_md']
  assert os.path.isfile(tmp_path / 'gpu.md')
  # Bench lines went to the run's folder, not to benchmarks/results/.
  assert (tmp_path / 'work' / 'bench_distill' / 'bench_results' /
          'distill.jsonl').is_file()


def test_timeout_and_missing_data_are_recorded(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc, report = _run_script(
      tmp_path, '--parts', 'bench_distill', 'maml_omniglot', '--budget',
      'bench_distill=0.5', data_dir=empty, timeout=120)
  _check_report(report, ('bench_distill', 'maml_omniglot'))
  assert proc.returncode == 1 and not report['all_ok']
  distill = report['parts']['bench_distill']
  assert distill['status'] == 'timeout', distill
  assert distill['wall_s'] < 30
  omniglot = report['parts']['maml_omniglot']
  assert omniglot['status'] == 'skipped'
  assert 'arrays_background.v1.npz' in omniglot['reason']
  assert '--prepare' in omniglot['reason']
