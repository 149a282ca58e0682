"""The forgetting study's summaries (ACC, BWT, forgetting) and tables.

The figures are in ``_plots.py``.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np

from experiments.common import stats
from experiments.forgetting import data
from experiments.forgetting.configs import Strategy
import metacf.metrics

# Seq-MNIST accuracies (%) that Buzzega et al. 2020 report in their Table 2,
# as (class-IL, task-IL), keyed by our strategy names. Only numbers that we
# could check against a copy of the paper go here; see README.md.
PAPER_ACCURACY: dict[str, tuple[float, float]] = {}


def _metrics(matrices: np.ndarray) -> dict[str, Any]:
  """ACC, BWT and forgetting per seed, and their mean and std over seeds.

  Args:
    matrices: ``[S, T, T]`` accuracy matrices.
  """
  per_seed: dict[str, list[float]] = {
      'acc': [], 'bwt': [], 'forgetting_max': [], 'forgetting_diagonal': []}
  for r in matrices:
    per_seed['acc'].append(float(metacf.metrics.average_accuracy(r)))
    per_seed['bwt'].append(float(metacf.metrics.backward_transfer(r)))
    per_seed['forgetting_max'].append(
        float(metacf.metrics.forgetting(r, reference='max')))
    per_seed['forgetting_diagonal'].append(
        float(metacf.metrics.forgetting(r, reference='diagonal')))
  out: dict[str, Any] = {
      'accuracy_matrix': np.mean(matrices, axis=0).tolist(),
      'accuracy_matrix_per_seed': matrices.tolist(),
  }
  for k, v in per_seed.items():
    cell = stats.mean_std(v)
    out[k], out[f'{k}_std'] = cell['mean'], cell['std']
    out[f'{k}_per_seed'] = v
  return out


def summarize(strategy: Strategy, record: Mapping[str, Any],
              stream: data.Stream) -> dict[str, Any]:
  """The results of one strategy from its raw record."""
  # rows [T][S][T] -> [S, T, T]
  class_il = np.transpose(np.asarray(record['class_il_rows']), (1, 0, 2))
  task_il = np.transpose(np.asarray(record['task_il_rows']), (1, 0, 2))
  curve = record['curve']
  paper = PAPER_ACCURACY.get(strategy.name)
  return {
      'strategy': dataclasses.asdict(strategy),
      'class_il': _metrics(class_il),
      'task_il': _metrics(task_il),
      'curve': {
          'step': [p['step'] for p in curve],
          'task': [p['task'] for p in curve],
          # mean over seeds, [num_points][T]
          'class_il': np.mean(np.asarray([p['class_il'] for p in curve]),
                              axis=1).tolist(),
      },
      'task_boundaries': np.cumsum(stream.steps).tolist(),
      'mean_loss_per_chunk': np.mean(np.asarray(record['losses']),
                                     axis=1).tolist(),
      'train_time_s': record['train_time_s'],
      'paper_class_il': None if paper is None else paper[0] / 100,
      'paper_task_il': None if paper is None else paper[1] / 100,
      # iCaRL: exemplars of each class after each task, [T][S][10].
      'exemplars_per_class': record.get('exemplars_per_class'),
  }


def _pct(mean: float, std: float | None = None) -> str:
  return stats.pct(mean, std, digits=2)


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown tables, one per scenario: ACC / BWT / forgetting per strategy.

  Accuracies in %, mean ± std over seeds. Forgetting is given with both
  references (``metacf.metrics.forgetting``): ``max`` (the best accuracy
  ever reached on the task, Chaudhry et al. 2018, as in mammoth) and
  ``diag`` (the accuracy right after learning it, as in Avalanche).
  """
  num_seeds = len(results['config']['seeds'])
  lines = []
  for scenario_name, scenario in results['scenarios'].items():
    single = scenario['classes_per_task'] == 1
    lines.append(f'### {scenario_name}: {scenario["num_tasks"]} tasks of '
                 f'{scenario["classes_per_task"]} digit'
                 f'{"" if single else "s"} ({num_seeds} seed'
                 f'{"" if num_seeds == 1 else "s"}, accuracies in %)')
    lines.append('')
    strategies = scenario['strategies']
    # Only columns with numbers: task-IL is trivially 100% with one class
    # per task, and the paper's numbers are shown once there are any.
    paper = not single and any(s['paper_class_il'] is not None
                               for s in strategies.values())
    header = ['strategy', 'class-IL ACC', 'BWT', 'forgetting (max)',
              'forgetting (diag)']
    if not single:
      header += ['task-IL ACC', 'task-IL forgetting (max)']
    if paper:
      header += ['DER paper class-IL', 'DER paper task-IL']
    header += ['train s']
    lines.append('| ' + ' | '.join(header) + ' |')
    lines.append('|' + '---|' + '---:|' * (len(header) - 1))
    for name, s in strategies.items():
      c, ti = s['class_il'], s['task_il']
      row = [name, _pct(c['acc'], c['acc_std']), _pct(c['bwt'], c['bwt_std']),
             _pct(c['forgetting_max'], c['forgetting_max_std']),
             _pct(c['forgetting_diagonal'], c['forgetting_diagonal_std'])]
      if not single:
        row += [_pct(ti['acc'], ti['acc_std']),
                _pct(ti['forgetting_max'], ti['forgetting_max_std'])]
      if paper:
        for key in ('paper_class_il', 'paper_task_il'):
          row.append('-' if s[key] is None else _pct(s[key]))
      row.append(f'{s["train_time_s"]:.0f}')
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  return '\n'.join(lines).rstrip()
