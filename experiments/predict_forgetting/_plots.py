"""Figures of the forgetting-prediction experiment.

* ``scatter.png``: predicted against measured forgetting of A (loss change,
  and accuracy drop), one point per pair, coloured by family, with the
  Spearman and Pearson correlations; and the rank-k predictions.
* ``overlap_vs_angle.png``: for MNIST -> rotated MNIST, the overlap of the
  two tasks' top Jacobian subspaces and the forgetting, against the angle.
* ``regime.png``: the width / learning-rate sweep: ratio predicted /
  measured and relative error against the width, one line per learning rate.
"""

from collections.abc import Mapping
import os
from typing import Any

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

SCATTER_PNG = 'scatter.png'
OVERLAP_PNG = 'overlap_vs_angle.png'
REGIME_PNG = 'regime.png'
FIGURES = (SCATTER_PNG, OVERLAP_PNG, REGIME_PNG)
_FAMILY_STYLE = {'rotation': ('C0', 'o'), 'permutation': ('C1', 's'),
                 'split': ('C3', '^'), 'dataset': ('C2', 'D')}


def _subtitle(results: Mapping[str, Any]) -> str:
  return (f'{results["device"].split(" (")[0]}, jax {results["jax_version"]}'
          f', {results["date"][:10]}')


def _fmt(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.3f}'


def _identity(ax, values) -> None:
  lo, hi = float(np.min(values)), float(np.max(values))
  ax.plot([lo, hi], [lo, hi], 'k--', lw=0.8, label='predicted = measured')


def _symlog(ax, which: str, values) -> None:
  """Symmetric log scale on axis ``which`` ('x' or 'y'), readable ticks."""
  getattr(ax, f'set_{which}scale')('symlog', linthresh=0.05)
  top = max(1.0, float(np.max(np.abs(values))))
  ticks = [t for t in (-10.0, -1.0, -0.1, 0.0, 0.1, 1.0, 10.0)
           if abs(t) <= 10 * top]
  axis = getattr(ax, f'{which}axis')
  axis.set_major_locator(ticker.FixedLocator(ticks))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  axis.set_minor_locator(ticker.NullLocator())


def plot_scatter(results: Mapping[str, Any], path: str) -> None:
  pairs = results['pairs']
  summary = results['summary']
  low_ks = list(summary['low_rank'])
  fig = Figure(figsize=(5.2 * (2 + bool(low_ks)), 4.6), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2 + bool(low_ks))
  ax = axes[0]
  for family, (color, marker) in _FAMILY_STYLE.items():
    rs = [r for r in pairs if r['family'] == family]
    if rs:
      ax.scatter([r['measured'] for r in rs], [r['predicted'] for r in rs],
                 c=color, marker=marker, label=family)
  values = ([r['measured'] for r in pairs] +
            [r['predicted'] for r in pairs])
  _identity(ax, values)
  _symlog(ax, 'x', values)
  _symlog(ax, 'y', values)
  ax.set_xlabel('measured  L_A(after B) - L_A(before)')
  ax.set_ylabel('predicted (linearised network, empirical NTK)')
  s = summary['loss']
  ax.set_title(f'{len(pairs)} pairs: Spearman {_fmt(s["spearman"])}, '
               f'Pearson {_fmt(s["pearson"])}', fontsize='medium')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize='small')

  ax = axes[1]
  for family, (color, marker) in _FAMILY_STYLE.items():
    rs = [r for r in pairs if r['family'] == family]
    if rs:
      ax.scatter([r['predicted'] for r in rs],
                 [100 * r['accuracy_drop'] for r in rs], c=color,
                 marker=marker, label=family)
  _symlog(ax, 'x', values)
  ax.set_xlabel('predicted forgetting (loss)')
  ax.set_ylabel('measured accuracy drop on A (points)')
  a = summary['accuracy_drop']
  ax.set_title(f'accuracy drop: Spearman {_fmt(a["spearman"])}, Pearson '
               f'{_fmt(a["pearson"])}', fontsize='medium')
  ax.grid(True, alpha=0.3)

  if low_ks:
    ax = axes[2]
    measured = [r['measured'] for r in pairs]
    ax.scatter(measured, [r['predicted'] for r in pairs], c='k', marker='x',
               label='full NTK')
    for i, k in enumerate(low_ks):
      ax.scatter(measured, [r['low_rank'][k]['predicted'] for r in pairs],
                 c=f'C{i + 4}', marker='.',
                 label=f'rank {k} (Spearman '
                 f'{_fmt(summary["low_rank"][k]["spearman"])})')
    _identity(ax, values)
    _symlog(ax, 'x', values)
    _symlog(ax, 'y', values + [r['low_rank'][k]['predicted']
                                for r in pairs for k in low_ks])
    ax.set_xlabel('measured forgetting (loss)')
    ax.set_ylabel('predicted')
    ax.set_title("low-rank predictions (B's top-k Jacobian directions)",
                 fontsize='medium')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
  fig.suptitle(f'Forgetting of A after training on B ({_subtitle(results)})')
  fig.savefig(path, dpi=100)


def plot_overlap_vs_angle(results: Mapping[str, Any], path: str) -> None:
  curve = results['overlap_vs_angle']
  k = results['config']['overlap_k']
  fig = Figure(figsize=(6.4, 5.0), layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.plot(curve['angle'], curve['overlap'], 'o-', color='C0',
          label=f'overlap, top-{k} subspaces')
  ax.plot(curve['angle'], curve['weighted_overlap'], 's-', color='C9',
          label='weighted overlap')
  ax.set_xlabel('rotation of task B (degrees)')
  ax.set_ylabel('overlap of A and B Jacobians at theta_A')
  ax.set_ylim(0, 1.02)
  ax.grid(True, alpha=0.3)
  twin = ax.twinx()
  twin.plot(curve['angle'], curve['measured'], 'x--', color='C3',
            label='measured forgetting')
  twin.plot(curve['angle'], curve['predicted'], '+:', color='C1',
            label='predicted forgetting')
  twin.set_ylabel('change of A\'s loss')
  handles = ax.get_legend_handles_labels()
  twin_handles = twin.get_legend_handles_labels()
  fig.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1],
             fontsize='small', loc='outside lower center', ncols=2)
  ax.set_title(f'MNIST -> rotated MNIST ({_subtitle(results)})',
               fontsize='medium')
  fig.savefig(path, dpi=100)


def plot_regime(results: Mapping[str, Any], path: str) -> None:
  rows = results['regime']
  fig = Figure(figsize=(10.4, 4.2), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  lrs = sorted({r['lr'] for r in rows})
  for i, lr in enumerate(lrs):
    cell = [r for r in rows if r['lr'] == lr]
    widths = [r['width'] for r in cell]
    axes[0].plot(widths, [np.nan if r['slope'] is None else r['slope']
                          for r in cell], 'o-', color=f'C{i}',
                 label=f'lr on B = {lr:g}')
    axes[1].plot(widths, [np.nan if r['relative_error'] is None
                          else r['relative_error'] for r in cell], 'o-',
                 color=f'C{i}', label=f'lr on B = {lr:g}')
  axes[0].axhline(1.0, color='k', ls='--', lw=0.8)
  axes[0].set_ylabel('predicted / measured (least squares)')
  axes[1].set_ylabel('|predicted - measured| / |measured|')
  axes[1].set_yscale('log')
  for ax in axes:
    ax.set_xscale('log', base=2)
    ax.set_xlabel('hidden width')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize='small')
  names = ', '.join(rows[0]['predicted']) if rows else ''
  fig.suptitle(f'Linear prediction vs width and learning rate ({names}; '
               f'{_subtitle(results)})', fontsize='medium')
  fig.savefig(path, dpi=100)


def plot_all(results: Mapping[str, Any], workdir: str) -> list[str]:
  """Writes every figure that has data into ``workdir``; returns the paths."""
  paths = []
  for name, plot, has_data in (
      (SCATTER_PNG, plot_scatter, bool(results['pairs'])),
      (OVERLAP_PNG, plot_overlap_vs_angle,
       bool(results['overlap_vs_angle']['angle'])),
      (REGIME_PNG, plot_regime, bool(results['regime']))):
    if has_data:
      path = os.path.join(workdir, name)
      plot(results, path)
      paths.append(path)
  return paths
