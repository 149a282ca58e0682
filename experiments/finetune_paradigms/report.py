"""Summaries over seeds, predicted vs measured forgetting, and the tables."""

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from experiments.common import stats
from experiments.finetune_paradigms.configs import Config
from experiments.finetune_paradigms.configs import Variant
from experiments.finetune_paradigms.data import shots_key

# Paradigms under which A's model (body or A's head) changes.
CHANGES_A = ('full_finetune', 'partial_finetune', 'lora', 'lwf', 'replay')

# The lecture's table (feature extraction, full fine-tuning, prompt
# engineering, prompt tuning, low-rank adapters) mapped onto our variants.
# Words marked '*' are our reading, not quoted from the lecture.
LECTURE = {
    'linear_probe': ('feature extraction', 'Small', 'Good*', 'OK*'),
    'full_finetune': ('full fine-tuning', 'Huge', 'Bad*', 'Good*'),
    'nearest_class_mean': ('prompt engineering (stand-in)', 'None', 'Good*',
                           'OK*'),
    'prompt_tuning': ('prompt tuning', 'Small', 'Good*', 'OK*'),
    'lora': ('low-rank adapters', 'Small', 'Good*', 'Good*'),
}


def summarize(config: Config, variant: Variant,
              records: Mapping[tuple[str, int], Mapping[str, Any]],
              prediction: Mapping[str, Any] | None,
              counts: Mapping[str, int]) -> dict[str, Any]:
  out: dict[str, Any] = {'paradigm': variant.kind,
                         'variant': dataclasses.asdict(variant), **counts,
                         'predicted_forgetting': None if prediction is None
                         else prediction['predicted_forgetting'],
                         'prediction': prediction, 'shots': {}}
  for k in config.shots:
    rows = [records[shots_key(k), s] for s in config.seeds]
    cell: dict[str, Any] = {}
    keys = ['b_accuracy', 'a_accuracy', 'forgetting', 'a_loss_change',
            'step_time_s']
    if variant.kind == 'lora':
      keys += ['a_accuracy_lora_off', 'forgetting_lora_off']
    for name in keys:
      values = [r[name] for r in rows]
      cell_stats = stats.mean_std(values)
      cell[name], cell[f'{name}_std'] = cell_stats['mean'], cell_stats['std']
      cell[f'{name}_per_seed'] = values
    cell['final_loss_per_seed'] = [r['final_loss'] for r in rows]
    out['shots'][shots_key(k)] = cell
  return out


def correlation(config: Config, variants: Mapping[str, Any]
                ) -> dict[str, Any]:
  """Spearman of predicted vs measured forgetting over gradient variants x K."""
  points = []
  for name, v in variants.items():
    if v['predicted_forgetting'] is None:
      continue
    for k, cell in v['shots'].items():
      points.append({'variant': name, 'shots': k,
                     'predicted': v['predicted_forgetting'],
                     'measured_accuracy_drop': cell['forgetting'],
                     'measured_loss_change': cell['a_loss_change']})
  out: dict[str, Any] = {'points': points, 'num_points': len(points)}
  # Also over the variants whose A model changes at all (not the probe or
  # the prompts, whose A outputs do not depend on what they train).
  changing = [p for p in points
              if variants[p['variant']]['paradigm'] in CHANGES_A]
  out['num_points_changing_a'] = len(changing)
  for suffix, subset in (('', points), ('_changing_a', changing)):
    pred = np.asarray([p['predicted'] for p in subset])
    for key in ('measured_accuracy_drop', 'measured_loss_change'):
      meas = np.asarray([p[key] for p in subset])
      name = f'spearman_{key}{suffix}'
      if len(subset) > 2 and np.ptp(pred) > 0 and np.ptp(meas) > 0:
        rho, pval = scipy_stats.spearmanr(pred, meas)
        out[name], out[f'{name}_p'] = float(rho), float(pval)
      else:
        out[name], out[f'{name}_p'] = None, None
  del config
  return out


# ------------------------------------------------------------------- table


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: the measured cells per variant and K, then the lecture table."""
  shots = [shots_key(k) for k in results['config']['shots']]
  lines = [f'A = MNIST, pre-trained: A test accuracy '
           f'{stats.pct(results["pretrain"]["a_accuracy"])}%. '
           f'B = Fashion-MNIST; mean ± std over '
           f'{len(results["config"]["seeds"])} seeds, accuracies in %.', '']
  header = ['variant', 'trainable', 'added/task']
  for k in shots:
    header += [f'B acc K={k}', f'forget K={k}']
  header += ['ms/step', 'predicted ΔL_A']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|---|' + '---:|' * (len(header) - 1))
  for name, v in results['variants'].items():
    row = [name, f'{v["trainable_params"]:,}',
           f'{v["params_added_per_task"]:,}']
    for k in shots:
      c = v['shots'][k]
      row += [stats.pct(c['b_accuracy'], c['b_accuracy_std']),
              stats.pct(c['forgetting'], c['forgetting_std'])]
    step_ms = np.mean([v['shots'][k]['step_time_s'] for k in shots]) * 1e3
    row.append(f'{step_ms:.1f}')
    p = v['predicted_forgetting']
    row.append('-' if p is None else f'{p:+.4f}')
    lines.append('| ' + ' | '.join(row) + ' |')
  lora = [n for n, v in results['variants'].items()
          if v['paradigm'] == 'lora']
  if lora:
    lines += ['', 'LoRA, A accuracy (%) with the adapters merged (deployed) '
              'and switched off:', '',
              '| variant | ' + ' | '.join(f'merged K={k} | off K={k}'
                                          for k in shots) + ' |',
              '|---|' + '---:|' * (2 * len(shots))]
    for n in lora:
      c = results['variants'][n]['shots']
      lines.append(f'| {n} | ' + ' | '.join(
          f'{stats.pct(c[k]["a_accuracy"])} | '
          f'{stats.pct(c[k]["a_accuracy_lora_off"])}'
          for k in shots) + ' |')
  corr = results['correlation']
  lines += ['', f'Predicted vs measured forgetting over '
            f'{corr["num_points"]} (variant, K) points: Spearman '
            f'{_fmt(corr["spearman_measured_accuracy_drop"])} (accuracy '
            f'drop), {_fmt(corr["spearman_measured_loss_change"])} (loss '
            f'change on the same A subset); over the '
            f'{corr["num_points_changing_a"]} points of the variants whose A '
            f'model changes: '
            f'{_fmt(corr["spearman_measured_accuracy_drop_changing_a"])} and '
            f'{_fmt(corr["spearman_measured_loss_change_changing_a"])}.']
  lines += ['', lecture_table(results)]
  return '\n'.join(lines)


def _fmt(x: float | None) -> str:
  return '-' if x is None else f'{x:.3f}'


def lecture_table(results: Mapping[str, Any]) -> str:
  """The lecture's table, measured cells beside its words."""
  shots = [shots_key(k) for k in results['config']['shots']]
  few, many = shots[0], shots[-1]
  lines = ['| lecture row | ours | trainable params (lecture) | measured | '
           'multi-task scalability (lecture) | added per task | '
           f'performance (lecture) | B acc K={few} / K={many} | '
           f'forgetting K={few} / K={many} |',
           '|---|---|---|---:|---|---:|---|---:|---:|']
  for kind, (row, params, scal, perf) in LECTURE.items():
    names = results['paradigms'].get(kind, [])
    for name in names:
      v = results['variants'][name]
      c = v['shots']
      lines.append(
          f'| {row} | {name} | {params} | {v["trainable_params"]:,} | '
          f'{scal} | {v["params_added_per_task"]:,} | {perf} | '
          f'{stats.pct(c[few]["b_accuracy"])} / '
          f'{stats.pct(c[many]["b_accuracy"])} | '
          f'{stats.pct(c[few]["forgetting"])} / '
          f'{stats.pct(c[many]["forgetting"])} |')
  return '\n'.join(lines)
