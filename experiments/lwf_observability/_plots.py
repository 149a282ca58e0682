"""Figure of the LwF-observability experiment (matplotlib, Agg).

``retention_vs_observability.png``: left, A's retained test accuracy under
fine-tuning and under LwF against the observability of A by each task B
(mean ± std over seeds, an arrow from fine-tuning to LwF per task); right,
LwF's gain in retention against the same axis. Spearman in the titles.
"""

from collections.abc import Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGURE = 'retention_vs_observability.png'
_STYLE = {'finetune': ('C3', 's', 'naive fine-tuning'),
          'lwf': ('C0', 'o', 'LwF')}


def _fmt(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.2f}'


def plot_retention(results: Mapping[str, Any], path: str,
                   measure: str = 'observability') -> None:
  """Writes the figure to ``path``."""
  tasks = results['tasks']
  corr = results['correlation']
  fig = Figure(figsize=(11.5, 4.8), layout='constrained')
  FigureCanvasAgg(fig)
  ax, ax_gain = fig.subplots(1, 2)
  xs = {n: t['observability'][measure] for n, t in tasks.items()}
  for method, (color, marker, label) in _STYLE.items():
    ax.errorbar([xs[n] for n in tasks],
                [100 * t[method]['retention']['mean'] for t in tasks.values()],
                yerr=[100 * t[method]['retention']['std']
                      for t in tasks.values()],
                color=color, marker=marker, ls='', capsize=3,
                label=f'{label} (Spearman '
                f'{_fmt(corr[f"{measure}__{method}_retention"]["spearman"])})')
  for name, t in tasks.items():
    ft = 100 * t['finetune']['retention']['mean']
    lwf = 100 * t['lwf']['retention']['mean']
    ax.annotate('', xy=(xs[name], lwf), xytext=(xs[name], ft),
                arrowprops={'arrowstyle': '->', 'color': '0.6', 'lw': 0.8})
    ax.annotate(name, (xs[name], max(ft, lwf)), textcoords='offset points',
                xytext=(4, 4), fontsize=8)
  ax.set_xlabel(f'{measure} of A by B (before B)')
  ax.set_ylabel("A's test accuracy retained, % of before B")
  ax.set_title('Retention of A vs observability of A by B', fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)

  gain = corr[f'{measure}__lwf_gain']['spearman']
  ax_gain.errorbar([xs[n] for n in tasks],
                   [100 * t['lwf_gain']['mean'] for t in tasks.values()],
                   yerr=[100 * t['lwf_gain']['std'] for t in tasks.values()],
                   color='C2', marker='D', ls='', capsize=3)
  for name, t in tasks.items():
    ax_gain.annotate(name, (xs[name], 100 * t['lwf_gain']['mean']),
                     textcoords='offset points', xytext=(4, 4), fontsize=8)
  ax_gain.axhline(0.0, color='k', lw=0.8, ls=':')
  ax_gain.set_xlabel(f'{measure} of A by B (before B)')
  ax_gain.set_ylabel('retention LwF − retention fine-tuning, points')
  ax_gain.set_title(f'What distillation protects (Spearman {_fmt(gain)})',
                    fontsize=10)
  ax_gain.grid(alpha=0.3)
  fig.suptitle(f'A = MNIST; {results["device"].split(" (")[0]}, '
               f'{results["date"][:10]}', fontsize=9)
  fig.savefig(path, dpi=120)
