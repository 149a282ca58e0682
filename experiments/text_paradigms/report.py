"""Summaries, the predicted-vs-measured correlation, tables and figures."""

from collections.abc import Mapping
import os
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from experiments.common import stats
from experiments.text_paradigms.configs import Config

# Variants whose deployed model differs from the pre-trained one.
CHANGES_A = ('full', 'lora', 'lwf', 'replay')


def shots_key(k: int | None) -> str:
  return 'all' if k is None else str(k)


def summarize(config: Config, results: Mapping[str, Any]) -> dict[str, Any]:
  """Mean and std over seeds of each objective x variant x K cell."""
  out = {}
  for objective, per in results['objectives'].items():
    out[objective] = {}
    for v in config.variants:
      cells = {}
      for k in config.shots:
        runs = per['runs'][v.name][shots_key(k)]
        cell = {m: stats.mean_std([r[m] for r in runs])
                for m in ('b_accuracy', 'forgetting_loss',
                          'forgetting_exact_match')}
        cell['trainable_params'] = runs[0]['trainable_params']
        cell['params_per_task'] = runs[0]['params_per_task']
        if v.gradient:
          cell['step_ms'] = float(np.median([r['step_ms'] for r in runs]))
        else:
          cell['eval_time_s'] = float(np.median([r['eval_time_s']
                                                 for r in runs]))
          cell['demos_mean'] = float(np.mean([r['demos_mean']
                                              for r in runs]))
        cells[shots_key(k)] = cell
      pred = per['predictions'].get(v.name)
      out[objective][v.name] = {
          'kind': v.kind, 'shots': cells,
          'predicted_forgetting': (None if pred is None
                                   else pred['predicted_forgetting'])}
  return out


def correlation(config: Config, results: Mapping[str, Any]
                ) -> dict[str, Any]:
  """Spearman of predicted vs measured forgetting (loss change) over
  objective x gradient variant x K cells (seed means)."""
  points = []
  for objective, variants in results['summary'].items():
    for name, v in variants.items():
      if v['predicted_forgetting'] is None:
        continue
      for k, cell in v['shots'].items():
        points.append({'objective': objective, 'variant': name,
                       'kind': v['kind'], 'shots': k,
                       'predicted': v['predicted_forgetting'],
                       'measured': cell['forgetting_loss']['mean']})
  out: dict[str, Any] = {'points': points}
  subsets = {'all': points,
             'changing_a': [p for p in points if p['kind'] in CHANGES_A]}
  for objective in results['summary']:
    subsets[objective] = [p for p in points if p['objective'] == objective]
  for name, subset in subsets.items():
    pred = np.asarray([p['predicted'] for p in subset])
    meas = np.asarray([p['measured'] for p in subset])
    out[f'n_{name}'] = len(subset)
    if len(subset) > 2 and np.ptp(pred) > 0 and np.ptp(meas) > 0:
      rho, pval = scipy_stats.spearmanr(pred, meas)
      out[f'spearman_{name}'], out[f'p_{name}'] = float(rho), float(pval)
    else:
      out[f'spearman_{name}'], out[f'p_{name}'] = None, None
  del config
  return out


def _f(x: float | None, digits: int = 3) -> str:
  return '-' if x is None else f'{x:+.{digits}f}'


def format_table(results: Mapping[str, Any]) -> str:
  """B accuracy (%) per variant, objective and K."""
  summary = results['summary']
  objectives = list(summary)
  first = summary[objectives[0]]
  shots = list(next(iter(first.values()))['shots'])
  head = ['variant'] + [f'{o} K={k}' for o in objectives for k in shots]
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for name in first:
    row = [name] + [stats.pct(summary[o][name]['shots'][k]['b_accuracy'])
                    for o in objectives for k in shots]
    lines.append('| ' + ' | '.join(row) + ' |')
  if 'bag_of_words' in results:
    row = ['bag of words (reference)'] + [
        stats.pct(results['bag_of_words'][k]) for _ in objectives
        for k in shots]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def markdown(results: Mapping[str, Any]) -> str:
  """Every table of the study, as Markdown."""
  summary, objs = results['summary'], results['objectives']
  out = [f'Run: {results["date"]}, {results["device"]}, '
         f'{results["wall_time_s"] / 60:.1f} min.', '',
         '## Pre-training and denoising (validation)', '',
         '| model | steps | GFLOP/step | train time | cross: loss / hidden-token '
         'loss / span exact match under t5 | bart | bert |',
         '|---|---|---|---|---|---|---|']
  for o, per in objs.items():
    pre = per['pretrain']
    gf = pre.get('flops_per_step')
    cells = [f'{d["loss"]:.3f} / {d["hidden_loss"]:.3f} / '
             f'{100 * d["exact_match"]:.1f}%'
             for d in per['denoising'].values()]
    out.append(f'| {o} | {pre["steps"]} | '
               f'{"-" if gf is None else f"{gf / 1e9:.1f}"} | '
               f'{pre["train_time_s"]:.0f} s | ' + ' | '.join(cells) + ' |')
  out += ['', '## Task B accuracy (%, mean ± std over seeds)', '',
          format_table(results), '',
          '## Forgetting of the pre-training objective', '',
          'Validation loss change of the objective (after - before), mean '
          'over K and seeds, and the prediction.', '',
          '| variant | ' + ' | '.join(f'{o} measured | {o} predicted'
                                      for o in summary) + ' |',
          '|---|' + '---|---|' * len(summary)]
  first = summary[next(iter(summary))]
  for name in first:
    row = []
    for o in summary:
      v = summary[o][name]
      meas = np.mean([c['forgetting_loss']['mean']
                      for c in v['shots'].values()])
      row += [_f(float(meas)), _f(v['predicted_forgetting'])]
    out.append(f'| {name} | ' + ' | '.join(row) + ' |')
  out += ['', '## Cost', '',
          '| variant | trainable params | params per task | step (ms) or '
          'eval (s) |', '|---|---|---|---|']
  for name, v in first.items():
    cell = next(iter(v['shots'].values()))
    cost = (f'{cell["step_ms"]:.0f} ms' if 'step_ms' in cell
            else f'{cell["eval_time_s"]:.1f} s (eval, '
                 f'{cell["demos_mean"]:.1f} demos)')
    out.append(f'| {name} | {cell["trainable_params"]:,} | '
               f'{cell["params_per_task"]:,} | {cost} |')
  corr = results['correlation']
  out += ['', '## Predicted vs measured forgetting (Spearman)', '']
  for key in [k for k in corr if k.startswith('spearman_')]:
    name = key[len('spearman_'):]
    p = corr['p_' + name]
    out.append(f'- {name}: {_f(corr[key], 2)} (p '
               f'{"-" if p is None else f"{p:.3g}"}, n = {corr["n_" + name]})')
  return '\n'.join(out) + '\n'


def figures(results: Mapping[str, Any], directory: str) -> None:
  """B accuracy against K, and predicted vs measured forgetting."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  summary = results['summary']
  fig, axes = plt.subplots(1, len(summary), figsize=(4.5 * len(summary), 3.6),
                           sharey=True, squeeze=False)
  for ax, (o, variants) in zip(axes[0], summary.items()):
    for name, v in variants.items():
      ks = list(v['shots'])
      acc = [100 * v['shots'][k]['b_accuracy']['mean'] for k in ks]
      ax.plot(range(len(ks)), acc, marker='o', label=name)
      ax.set_xticks(range(len(ks)), [f'K={k}' for k in ks])
    ax.axhline(10, color='grey', lw=0.8, ls=':')
    ax.set_title(f'pre-trained with {o}')
  axes[0][0].set_ylabel('speaker accuracy (%)')
  axes[0][-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1, 1))
  fig.tight_layout()
  fig.savefig(os.path.join(directory, 'accuracy_vs_k.png'), dpi=120)
  plt.close(fig)
  points = results['correlation']['points']
  fig, ax = plt.subplots(figsize=(4.8, 3.8))
  for o in summary:
    sub = [p for p in points if p['objective'] == o]
    ax.scatter([p['predicted'] for p in sub], [p['measured'] for p in sub],
               label=o, s=18)
  ax.set_xlabel('predicted loss change (NTK)')
  ax.set_ylabel('measured loss change')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(directory, 'predicted_vs_measured.png'), dpi=120)
  plt.close(fig)
