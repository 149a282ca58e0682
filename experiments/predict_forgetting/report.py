"""Correlations of predicted and measured forgetting, summaries and tables.

Everything here works on the JSON records of ``train.py`` (plain floats and
lists), after the runs.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from experiments.predict_forgetting.configs import Config

GOAL_SPEARMAN = 0.9


# ----------------------------------------------------------- correlations


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Pearson's r (``scipy.stats.pearsonr``); None if there are fewer than 2
  values or one of ``x``, ``y`` is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if _degenerate(x, y):
    return None
  return float(stats.pearsonr(x, y).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Spearman's rho (``scipy.stats.spearmanr``: Pearson's r of the ranks,
  ties averaged); None where :func:`pearson` is."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if _degenerate(x, y):
    return None
  return float(stats.spearmanr(x, y).statistic)


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
  # No correlation to speak of (scipy would warn and return nan).
  return len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0


def agreement(predicted: Sequence[float],
              measured: Sequence[float]) -> dict[str, float | None]:
  r"""How well ``predicted`` matches ``measured``, by rank and by value.

  Returns:
    ``spearman``, ``pearson``; ``slope``, the least-squares ratio through
    the origin :math:`\sum p m / \sum m^2` (1: right on average);
    ``relative_error`` :math:`\lVert p - m \rVert / \lVert m \rVert`;
    ``median_ratio`` of ``p / m``.
  """
  p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  norm = float(np.dot(m, m))
  return {
      'spearman': spearman(p, m),
      'pearson': pearson(p, m),
      'slope': float(np.dot(p, m) / norm) if norm else None,
      'relative_error': (float(np.linalg.norm(p - m) / np.sqrt(norm))
                         if norm else None),
      'median_ratio': (float(np.median(p[m != 0] / m[m != 0]))
                       if np.any(m != 0) else None),
  }


# -------------------------------------------------------------- summaries


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Correlations over the pairs of the main sweep."""
  predicted = [r['predicted'] for r in records]
  measured = [r['measured'] for r in records]
  summary = {
      'loss': agreement(predicted, measured),
      'accuracy_drop': {
          'spearman': spearman(predicted, [r['accuracy_drop']
                                           for r in records]),
          'pearson': pearson(predicted, [r['accuracy_drop']
                                         for r in records])},
      # The overlap alone, without the NTK dynamics, as a predictor.
      'overlap': {
          name: {'spearman': spearman([r[name] for r in records], measured)}
          for name in ('overlap', 'weighted_overlap')},
      'low_rank': {},
  }
  for k in records[0]['low_rank']:
    low = [r['low_rank'][k]['predicted'] for r in records]
    errors = [r['low_rank'][k]['relative_error_vs_full'] for r in records]
    errors = [e for e in errors if e is not None]
    summary['low_rank'][k] = {
        **agreement(low, measured),
        'median_relative_error_vs_full': (float(np.median(errors))
                                          if errors else None),
        'max_relative_error_vs_full': (float(np.max(errors))
                                       if errors else None)}
  spearman_loss = summary['loss']['spearman']
  summary['meets_goal'] = (spearman_loss is not None
                           and spearman_loss >= GOAL_SPEARMAN)
  return summary


def overlap_vs_angle(records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
  """The rotation pairs, by angle: overlaps and forgetting."""
  rotations = sorted((r for r in records if r['family'] == 'rotation'),
                     key=lambda r: r['task_b']['rotation'])
  return {
      'angle': [r['task_b']['rotation'] for r in rotations],
      **{name: [r[name] for r in rotations]
         for name in ('overlap', 'weighted_overlap', 'predicted',
                      'measured', 'accuracy_drop')}}


def summarize_regime(records: Sequence[Mapping[str, Any]],
                     config: Config) -> list[dict[str, Any]]:
  """One row per (width, lr): agreement over the sweep's pairs."""
  rows = []
  for width in config.regime_widths:
    cell = [r for r in records if r['width'] == width]
    for i, lr in enumerate(config.regime_lrs):
      predicted = [r['predicted'][i] for r in cell]
      measured = [r['measured'][i] for r in cell]
      rows.append({
          'width': width, 'lr': lr, **agreement(predicted, measured),
          'predicted': dict(zip((r['name'] for r in cell), predicted)),
          'measured': dict(zip((r['name'] for r in cell), measured)),
          'accuracy_b_after': float(np.mean([r['accuracy_b_after'][i]
                                             for r in cell]))})
  return rows


# ------------------------------------------------------------------ tables


def _num(value: float | None, digits: int = 3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: the correlations, one row per pair, the regime sweep."""
  s = results['summary']
  config = results['config']
  lines = [
      f'Predicted vs measured forgetting of A (change of its '
      f'{config["loss"]} loss on {config["num_eval"]} held-out examples) '
      f'over {results["num_pairs"]} pairs: **Spearman '
      f'{_num(s["loss"]["spearman"])}** (goal >= {results["goal_spearman"]}'
      f': {"met" if s["meets_goal"] else "NOT met"}), Pearson '
      f'{_num(s["loss"]["pearson"])}; least-squares ratio predicted / '
      f'measured {_num(s["loss"]["slope"])}, relative error '
      f'{_num(s["loss"]["relative_error"])}. Predicted forgetting vs '
      f'accuracy drop: Spearman {_num(s["accuracy_drop"]["spearman"])}. '
      f'Overlap alone vs measured: Spearman '
      f'{_num(s["overlap"]["overlap"]["spearman"])} (top-'
      f'{config["overlap_k"]}), '
      f'{_num(s["overlap"]["weighted_overlap"]["spearman"])} (weighted).',
      '']
  low = s['low_rank']
  header = ['pair', 'family', 'predicted', 'measured', 'ratio',
            'acc. A before', 'acc. drop', 'acc. B after', 'overlap',
            'w. overlap'] + [f'rank-{k} rel. err.' for k in low]
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|---|---|' + '---:|' * (len(header) - 2))
  for r in results['pairs']:
    row = [r['name'], r['family'], _num(r['predicted'], 4),
           _num(r['measured'], 4), _num(r['ratio'], 2),
           _num(r['accuracy_a_before']), _num(r['accuracy_drop']),
           _num(r['accuracy_b_after']), _num(r['overlap']),
           _num(r['weighted_overlap'])]
    row += [_num(r['low_rank'][k]['relative_error_vs_full'])
            for k in low]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  lines.append('| rank k | Spearman vs measured | median rel. error vs '
               'full | max rel. error vs full |')
  lines.append('|---:|---:|---:|---:|')
  for k, v in low.items():
    lines.append(f'| {k} | {_num(v["spearman"])} | '
                 f'{_num(v["median_relative_error_vs_full"])} | '
                 f'{_num(v["max_relative_error_vs_full"])} |')
  if results['regime']:
    names = list(results['regime'][0]['predicted'])
    lines += ['', f'Regime sweep ({", ".join(names)}; '
              f'{config["regime_num_train"]} examples per task, '
              f'{config["num_steps_b"]} steps on B):', '',
              '| width | lr on B | ratio pred./meas. (LS) | median ratio | '
              'relative error | Spearman | mean acc. B after |',
              '|---:|---:|---:|---:|---:|---:|---:|']
    for row in results['regime']:
      lines.append(
          f'| {row["width"]} | {row["lr"]:g} | {_num(row["slope"])} | '
          f'{_num(row["median_ratio"])} | {_num(row["relative_error"])} | '
          f'{_num(row["spearman"], 2)} | {_num(row["accuracy_b_after"])} |')
  return '\n'.join(lines)
