"""Figures of the fine-tuning paradigms experiment (matplotlib, Agg)."""

from collections.abc import Mapping
import os
from typing import Any

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

B_VS_K = 'b_accuracy_vs_k.png'
TRADE_OFF = 'a_retained_vs_b_gained.png'
PREDICTED = 'predicted_vs_measured_forgetting.png'


def figure_names(results: Mapping[str, Any]) -> list[str]:
  del results
  return [B_VS_K, TRADE_OFF, PREDICTED]


def _shots_x(results: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
  keys = ['all' if k is None else str(k) for k in results['config']['shots']]
  full = results['sizes']['b_train'] / 10
  x = np.asarray([full if k == 'all' else float(k) for k in keys])
  return keys, x


def _styles(results):
  cmap = plt.get_cmap('tab20')
  names = list(results['variants'])
  return {n: cmap(i % 20) for i, n in enumerate(names)}


def plot_all(results: Mapping[str, Any], workdir: str) -> None:
  """Writes every figure of ``figure_names`` into ``workdir``."""
  keys, x = _shots_x(results)
  colors = _styles(results)
  variants = results['variants']

  fig, ax = plt.subplots(figsize=(7, 5))
  for name, v in variants.items():
    y = np.asarray([v['shots'][k]['b_accuracy'] for k in keys])
    e = np.asarray([v['shots'][k]['b_accuracy_std'] for k in keys])
    ax.errorbar(x, 100 * y, yerr=100 * e, marker='o', ms=3, capsize=2,
                label=name, color=colors[name])
  ax.set_xscale('log')
  ax.set_xticks(x, [f'{k}' for k in keys])
  ax.set_xlabel('K, labelled Fashion-MNIST examples per class')
  ax.set_ylabel('task B (Fashion-MNIST) test accuracy, %')
  ax.set_title('B accuracy vs K (mean ± std over seeds)')
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, B_VS_K), dpi=120)
  plt.close(fig)

  before = results['pretrain']['a_accuracy']
  fig, ax = plt.subplots(figsize=(7, 5))
  markers = dict(zip(keys, 'os^D*v'))
  for name, v in variants.items():
    bx = [100 * v['shots'][k]['b_accuracy'] for k in keys]
    ay = [100 * v['shots'][k]['a_accuracy'] for k in keys]
    ax.plot(bx, ay, '-', color=colors[name], alpha=0.5, lw=1)
    for k, b, a in zip(keys, bx, ay):
      ax.plot(b, a, markers[k], color=colors[name], ms=5,
              label=name if k == keys[0] else None)
  ax.axhline(100 * before, color='k', ls=':', lw=1,
             label='A before adaptation')
  ax.set_xlabel('task B (Fashion-MNIST) test accuracy, % (learnt)')
  ax.set_ylabel("task A (MNIST) test accuracy with A's head, % (retained)")
  ax.set_title('Learning vs forgetting; markers: K = '
               + ', '.join(f'{k} {m}' for k, m in markers.items()))
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, TRADE_OFF), dpi=120)
  plt.close(fig)

  corr = results['correlation']
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for ax, key, label in (
      (axes[0], 'measured_accuracy_drop', 'measured forgetting (A accuracy '
       'drop, %)'),
      (axes[1], 'measured_loss_change', 'measured change of A loss (NTK '
       'subset)')):
    for p in corr['points']:
      y = p[key] * (100 if key == 'measured_accuracy_drop' else 1)
      ax.plot(p['predicted'], y, markers.get(p['shots'], 'o'),
              color=colors[p['variant']], ms=5)
    rho = corr[f'spearman_{key}']
    rho_c = corr.get(f'spearman_{key}_changing_a')
    fmt = lambda r: '-' if r is None else f'{r:.3f}'
    ax.set_title(f'Spearman {fmt(rho)} (all), {fmt(rho_c)} (A model '
                 'changes)', fontsize=10)
    ax.set_xscale('symlog', linthresh=1e-3)
    ax.set_xlabel('predicted change of A loss (linearised, before training; '
                  'symlog)')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  handles = [plt.Line2D([], [], color=colors[n], marker='o', ls='',
                        label=n) for n in variants
             if variants[n]['predicted_forgetting'] is not None]
  axes[1].legend(handles=handles, fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, PREDICTED), dpi=120)
  plt.close(fig)
