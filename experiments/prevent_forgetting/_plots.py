"""Figures of the forgetting-prevention study (matplotlib, Agg).

* ``accuracy_matrices_<benchmark>.png``: one heatmap per strategy of the
  accuracy matrix ``R[i, j]`` (test accuracy on task j after training task
  i), mean over seeds, ACC and BWT in the panel titles.
* ``protection_vs_k.png``: forgetting of task A (change of its mean
  cross-entropy) after B is learnt with A's top-k Jacobian directions
  protected, predicted (dashed) and measured (solid), one colour per pair;
  left on the SVD examples of A, right on held-out examples.
"""

from collections.abc import Mapping
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

PROTECTION_FIGURE = 'protection_vs_k.png'
LABELS = {'naive': 'Naive SGD', 'ewc': 'EWC', 'online_ewc': 'Online EWC',
          'si': 'SI', 'mas': 'MAS', 'agem': 'A-GEM', 'gem': 'GEM', 'er': 'ER',
          'ogd': 'OGD', 'pca_ogd': 'PCA-OGD',
          'gpm': 'GPM', 'joint': 'Joint (upper bound)'}


def matrix_figure(benchmark: str) -> str:
  return f'accuracy_matrices_{benchmark}.png'


def figures(results: Mapping[str, Any]) -> list[str]:
  names = [matrix_figure(b) for b in results['summary']]
  return names + ([PROTECTION_FIGURE] if results['pairs'] else [])


def _footer(results: Mapping[str, Any]) -> str:
  return f'{results["device"].split(" (")[0]}, {results["date"][:10]}'


def plot_matrices(results: Mapping[str, Any], benchmark: str, path: str
                  ) -> None:
  """Writes the heatmaps of ``benchmark`` to ``path``."""
  rows = {s: r for s, r in results['summary'][benchmark].items()
          if 'mean_accuracy_matrix' in r}
  cols = min(4, len(rows))
  nrows = -(-len(rows) // cols)
  fig = Figure(figsize=(3.2 * cols, 3.0 * nrows + 0.4), layout='constrained')
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
  image = None
  for ax, (strategy, row) in zip(axes, rows.items()):
    m = 100 * np.asarray(row['mean_accuracy_matrix'])
    image = ax.imshow(m, vmin=0, vmax=100, cmap='viridis')
    t = m.shape[0]
    if t <= 10:
      for i in range(t):
        for j in range(t):
          ax.text(j, i, f'{m[i, j]:.0f}', ha='center', va='center',
                  fontsize=6, color='w' if m[i, j] < 60 else 'k')
    ax.set_title(f'{LABELS[strategy]}\nACC {100 * row["acc"]["mean"]:.1f}'
                 f', BWT {100 * row["bwt"]["mean"]:.1f}', fontsize=9)
    ax.set_xlabel('task evaluated j', fontsize=8)
    ax.set_ylabel('after training task i', fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes[len(rows):]:
    ax.axis('off')
  if image is not None:
    fig.colorbar(image, ax=list(axes), shrink=0.6, label='test accuracy, %')
  fig.suptitle(f'{benchmark} MNIST: accuracy matrices (mean over '
               f'{len(results["config"]["seeds"])} seeds); '
               f'{_footer(results)}', fontsize=10)
  fig.savefig(path, dpi=110)


def plot_protection(results: Mapping[str, Any], path: str) -> None:
  """Writes the predicted/measured forgetting vs k figure to ``path``."""
  ks = results['config']['protect_ks']
  fig = Figure(figsize=(11, 4.3), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  for ax, which, title in ((axes[0], 'jac', 'on the SVD examples of A'),
                           (axes[1], 'heldout', 'on held-out examples of A')):
    for i, pair in enumerate(results['pairs']):
      pred = [pair['per_k'][str(k)][which]['predicted'] for k in ks]
      meas = [pair['per_k'][str(k)][which]['measured'] for k in ks]
      ax.plot(ks, meas, color=f'C{i}', marker='o', label=f'{pair["name"]} '
              'measured')
      ax.plot(ks, pred, color=f'C{i}', marker='x', ls='--',
              label=f'{pair["name"]} predicted')
    ax.set_xscale('symlog', linthresh=1)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.axhline(0.0, color='k', lw=0.8, ls=':')
    ax.set_xlabel("k: top rows of A's Jacobian SVD protected")
    ax.set_ylabel("forgetting: change of A's cross-entropy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle('Forgetting under orthogonal_projection(V_k): NTK prediction '
               f'vs training; {_footer(results)}', fontsize=10)
  fig.savefig(path, dpi=120)


def plot_all(results: Mapping[str, Any], workdir: str) -> None:
  for bench in results['summary']:
    plot_matrices(results, bench, os.path.join(workdir, matrix_figure(bench)))
  if results['pairs']:
    plot_protection(results, os.path.join(workdir, PROTECTION_FIGURE))
