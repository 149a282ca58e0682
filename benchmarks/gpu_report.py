"""Markdown tables of a ``benchmarks/gpu.py`` JSON, for the docs.

  python -m benchmarks.gpu_report benchmarks/results/gpu_<UTC>.json \
      [--out gpu_<UTC>.md]

Prints (or writes) the device line, one status table of every part, one
table per benchmark (each JSON line: what it measured, median [min, max]
ms, compile seconds) and the experiments' key figures (Omniglot MAML's
iterations reached out of the paper's 60,000 and its test accuracy beside
the paper's; the other experiments' summaries).
"""

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

# Record fields that say what a bench line measured, in this order.
LABEL_KEYS = ('part', 'kind', 'case', 'workload', 'loss', 'model', 'mlp',
              'variant', 'dtype', 'batch', 'capacity', 'num_tasks',
              'num_inner_steps', 'num_params', 'n', 'k', 'rank', 'chunk')
_MAX_ROWS = 60


def _fmt(x: Any, digits: int = 3) -> str:
  if x is None:
    return ''
  if isinstance(x, bool):
    return 'yes' if x else 'no'
  if isinstance(x, float):
    if x != 0 and abs(x) < 1e-3:
      return f'{x:.{digits}g}'
    if abs(x) >= 100:
      return f'{x:,.0f}'
    return f'{x:.{digits}g}'
  if isinstance(x, (list, tuple)):
    return 'x'.join(_fmt(v) for v in x)
  return str(x).replace('|', '/').replace('\n', ' ')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |'
            for row in rows[:_MAX_ROWS]]
  if len(rows) > _MAX_ROWS:
    lines.append(f'| ... {len(rows) - _MAX_ROWS} more rows in the JSON |'
                 + ' |' * (len(header) - 1))
  return lines


def _timing(rec: Mapping[str, Any]) -> str:
  """``median [min, max]`` ms, or the same per nested variant (off/on...)."""
  if isinstance(rec.get('median_ms'), (int, float)):
    text = _fmt(rec['median_ms'])
    if isinstance(rec.get('min_ms'), (int, float)):
      text += f' [{_fmt(rec["min_ms"])}, {_fmt(rec.get("max_ms"))}]'
    return text
  parts = [f'{k} {_fmt(v["median_ms"])}' for k, v in rec.items()
           if isinstance(v, Mapping) and isinstance(v.get('median_ms'),
                                                     (int, float))]
  if parts:
    return '; '.join(parts)
  if rec.get('skipped') or rec.get('status'):
    return _fmt(rec.get('skipped') or rec.get('status'))
  return ''


def bench_rows(records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
  rows = []
  for rec in records:
    label = ', '.join(f'{k}={_fmt(rec[k])}' for k in LABEL_KEYS
                      if rec.get(k) not in (None, '', [], {}))
    rows.append([label or rec.get('bench', '?'), _timing(rec),
                 rec.get('compile_s')])
  return rows


def _omniglot_lines(figures: Mapping[str, Any]) -> list[str]:
  total = figures.get('paper_iterations')
  rows = []
  for name, s in figures.items():
    if not isinstance(s, Mapping):
      continue
    acc = ('' if s.get('accuracy') is None else
           f'{100 * s["accuracy"]:.1f} ± {100 * (s.get("ci95") or 0):.1f}%')
    paper = ('' if s.get('paper_accuracy') is None else
             f'{100 * s["paper_accuracy"]:.1f} ± '
             f'{100 * (s.get("paper_ci95") or 0):.1f}%')
    rows.append([name, f'{_fmt(s.get("iterations"))} of {_fmt(total)}',
                 s.get('iterations_per_s'), s.get('meta_batch_size'), acc,
                 s.get('paper_eval_steps'), paper, s.get('compile_s')])
  return _table(['setting', 'iterations', 'iterations/s', 'meta-batch',
                 'test accuracy', 'test steps', 'paper', 'compile s'], rows)


def _scalar_items(d: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in d.items()
          if isinstance(v, (int, float, str, bool)) or v is None}


def _summary_lines(summary: Any) -> list[str]:
  """A summary (list of row dicts, or dict of row dicts) as a table."""
  if isinstance(summary, Mapping) and all(isinstance(v, Mapping)
                                          for v in summary.values()):
    rows = [{'': k, **_scalar_items(v)} for k, v in summary.items()]
  elif isinstance(summary, Sequence) and all(isinstance(v, Mapping)
                                             for v in summary):
    rows = [_scalar_items(v) for v in summary]
  elif isinstance(summary, Mapping):
    rows = [{'': k, 'value': v} for k, v in _scalar_items(summary).items()]
  else:
    rows = []
  if not rows:
    return ['(summary in the JSON)']
  header = []
  for row in rows:
    header += [k for k in row if k not in header]
  return _table(header, [[row.get(k) for k in header] for row in rows])


def render(report: Mapping[str, Any]) -> str:
  """The markdown of a ``gpu.py`` report."""
  dev = report.get('device', {})
  lines = [
      f'## GPU run {report.get("date_utc", "?")} ({report.get("mode")})',
      '',
      f'Device: **{dev.get("device_kind", "?")}** (backend '
      f'{dev.get("backend", "?")}, {dev.get("device_count", "?")} device(s),'
      f' {dev.get("host_cores", "?")} host cores), jax {dev.get("jax", "?")}'
      f'; `{dev.get("description", "")}`; commit '
      f'{(report.get("git_commit") or "?")[:10]}; whole run '
      f'{_fmt(report.get("wall_s"))} s of a {_fmt(report.get("deadline_s"))}'
      ' s deadline.',
      '',
  ]
  parts = report.get('parts', {})
  lines += _table(
      ['part', 'status', 'wall s', 'limit s', 'command', 'why'],
      [[name, p.get('status'), p.get('wall_s'), p.get('timeout_s'),
        f'`{p["command"]}`' if p.get('command') else '', p.get('reason')]
       for name, p in parts.items()])
  for name, p in parts.items():
    if p.get('kind') == 'bench' and p.get('records'):
      lines += ['', f'### {name}', '']
      lines += _table(['what', 'median ms [min, max]', 'compile s'],
                      bench_rows(p['records']))
    elif p.get('kind') == 'experiment' and (p.get('figures') or
                                            p.get('partial_records')):
      lines += ['', f'### {name}', '']
      if 'figures' not in p:
        lines.append(f'Stopped ({p.get("status")}): '
                     f'{len(p["partial_records"])} runs had finished; their '
                     'records are in the JSON.')
      elif name == 'maml_omniglot':
        lines += _omniglot_lines(p['figures'])
      elif p.get('results_md'):  # The experiment's own table.
        lines.append(p['results_md'].rstrip('\n'))
      else:
        lines += _summary_lines(p['figures'])
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('json_path')
  parser.add_argument('--out', default=None, help='markdown file (default: '
                      'print)')
  args = parser.parse_args(argv)
  with open(args.json_path) as f:
    text = render(json.load(f))
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
