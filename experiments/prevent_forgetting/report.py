"""Summaries over seeds and the Markdown tables of the results."""

from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.common import stats
from experiments.prevent_forgetting import _plots
from experiments.prevent_forgetting.configs import Config

LABELS = _plots.LABELS


def summarize(config: Config, runs: Mapping[tuple[str, str, int], Any]
              ) -> dict[str, Any]:
  """Per benchmark and strategy: metrics' mean and std over seeds."""
  out: dict[str, Any] = {}
  for bench in config.benchmarks:
    out[bench] = {}
    for strategy in config.strategies:
      records = [runs[bench, strategy, s] for s in config.seeds]
      row: dict[str, Any] = {}
      for key in ('acc', 'bwt', 'forgetting'):
        values = [r[key] for r in records]
        row[key] = None if values[0] is None else stats.mean_std(values)
      row['memory'] = records[0]['memory']
      row['time_s'] = float(np.mean([r['time_s'] for r in records]))
      row['us_per_step'] = step_time_us(records)
      if records[0]['accuracy_matrix'] is not None:
        row['mean_accuracy_matrix'] = np.mean(
            [r['accuracy_matrix'] for r in records], axis=0).tolist()
      out[bench][strategy] = row
  return out


def step_time_us(records: Any) -> float | None:
  """Microseconds per SGD step: the median over runs and calls.

  A run's first call of a trainer includes its compilation; the median over
  the calls of all seeds leaves those out (OGD's compile once per basis
  size, in the first seed).
  """
  times = [t / r['steps_per_call'] for r in records
           for t in r.get('train_time_s', [])]
  return 1e6 * float(np.median(times)) if times else None


# ------------------------------------------------------------------- table


def _floats(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e5 else f'{n:,}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: one table per benchmark, then predicted vs measured."""
  cfg = results['config']
  lines = []
  for bench, rows in results['summary'].items():
    lines += [f'**{bench} MNIST** ({cfg["num_tasks"]} tasks, mean ± std '
              f'over {len(cfg["seeds"])} seeds, %)', '',
              '| strategy | ACC | BWT | forgetting | memory (floats) | '
              'memory layout | time/run (s) | µs/step |',
              '|---|---:|---:|---:|---:|---|---:|---:|']
    for strategy, row in rows.items():
      lines.append('| ' + ' | '.join([
          LABELS[strategy], stats.pct(row['acc']), stats.pct(row['bwt']),
          stats.pct(row['forgetting']), _floats(row['memory']['floats']),
          row['memory']['what'], f'{row["time_s"]:.1f}',
          '-' if row.get('us_per_step') is None
          else f'{row["us_per_step"]:.0f}']) + ' |')
    lines.append('')
  if results['pairs']:
    ks = [str(k) for k in cfg['protect_ks']]
    lines += ['**Forgetting of A under protection of its top-k Jacobian '
              'directions** (change of A\'s mean cross-entropy after '
              f'{cfg["b_steps"]} full-batch GD steps on B, lr '
              f'{cfg["b_lr"]}; predicted (NTK) / measured)', '',
              '| pair | examples of A | ' + ' | '.join(
                  f'k={k}' for k in ks) + ' |',
              '|---|---|' + '---:|' * len(ks)]
    for pair in results['pairs']:
      for which, label in (('jac', f'{cfg["jac_examples"]} (SVD set)'),
                           ('heldout', f'{cfg["heldout_examples"]} '
                            'held-out')):
        cells = [f'{pair["per_k"][k][which]["predicted"]:.4f} / '
                 f'{pair["per_k"][k][which]["measured"]:.4f}' for k in ks]
        lines.append(f'| {pair["name"]} | {label} | ' + ' | '.join(cells)
                     + ' |')
  return '\n'.join(lines).rstrip()
