"""Summaries over seeds, correlations over tasks, and the Markdown table."""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from experiments.common import stats
from experiments.lwf_observability.configs import Config
from experiments.lwf_observability.configs import TaskB
from experiments.lwf_observability.observability import MEASURES
from experiments.lwf_observability.steps import METHODS


SUMMARY_KEYS = ('a_accuracy', 'retention', 'b_test_accuracy',
                'b_train_accuracy', 'a_on_b_kl')


def summarize(config: Config, task: TaskB, observed: Mapping[str, Any],
              runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One task's row: observability and the per-seed means and stds."""
  out: dict[str, Any] = {'task': dataclasses.asdict(task),
                         'observability': dict(observed),
                         'b_warmup_accuracy': stats.mean_std(
                             [r['b_warmup_accuracy'] for r in runs])}
  for method in METHODS:
    out[method] = {k: stats.mean_std([r[method][k] for r in runs])
                   for k in SUMMARY_KEYS}
  out['lwf_gain'] = stats.mean_std([r['lwf']['retention']
                                    - r['finetune']['retention'] for r in runs])
  del config
  return out


def correlation(tasks: Mapping[str, Any]) -> dict[str, Any]:
  """Spearman of each observability measure vs retention, over the tasks."""
  targets = {
      'lwf_retention': [t['lwf']['retention']['mean'] for t in tasks.values()],
      'finetune_retention': [t['finetune']['retention']['mean']
                             for t in tasks.values()],
      'lwf_gain': [t['lwf_gain']['mean'] for t in tasks.values()],
  }
  out: dict[str, Any] = {'num_tasks': len(tasks)}
  for measure in MEASURES:
    x = np.asarray([t['observability'][measure] for t in tasks.values()])
    for name, values in targets.items():
      y = np.asarray(values)
      key = f'{measure}__{name}'
      if len(x) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        rho, pval = scipy_stats.spearmanr(x, y)
        out[key] = {'spearman': float(rho), 'p': float(pval)}
      else:
        out[key] = {'spearman': None, 'p': None}
  return out


# ------------------------------------------------------------------- table


def _num(x: float | None, digits: int = 3) -> str:
  return '-' if x is None else f'{x:.{digits}f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: one row per task B, then the Spearman correlations."""
  cfg = results['config']
  lines = [f'A = MNIST, test accuracy {100 * results["a"]["test_accuracy"]:.1f}'
           f'% before B. Mean ± std over {len(cfg["seeds"])} seeds, '
           'accuracies and retention in %; observability measures (k_a = '
           f'{cfg["k_a"]}, k_b = {cfg["k_b"]}) before B.', '',
           '| B | observability | w. overlap | excitation | A acc FT | '
           'A acc LwF | retention FT | retention LwF | LwF gain | B test FT '
           '| B test LwF | KL(A on B) FT | KL(A on B) LwF |',
           '|---|' + '---:|' * 12]
  for name, t in results['tasks'].items():
    o = t['observability']
    ft, lwf = t['finetune'], t['lwf']
    lines.append('| ' + ' | '.join([
        name, _num(o['observability']), _num(o['weighted_overlap']),
        _num(o['excitation_share']), stats.pct(ft['a_accuracy']),
        stats.pct(lwf['a_accuracy']), stats.pct(ft['retention']),
        stats.pct(lwf['retention']), stats.pct(t['lwf_gain']),
        stats.pct(ft['b_test_accuracy']), stats.pct(lwf['b_test_accuracy']),
        _num(ft['a_on_b_kl']['mean']), _num(lwf['a_on_b_kl']['mean'])]) +
                 ' |')
  corr = results['correlation']
  lines += ['', f'Spearman over the {corr["num_tasks"]} tasks B (p-value):',
            '', '| measure | vs LwF retention | vs FT retention | '
            'vs LwF gain |', '|---|---:|---:|---:|']
  for measure in MEASURES:
    cells = []
    for target in ('lwf_retention', 'finetune_retention', 'lwf_gain'):
      c = corr[f'{measure}__{target}']
      cells.append(f'{_num(c["spearman"])} ({_num(c["p"], 2)})')
    lines.append(f'| {measure} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
