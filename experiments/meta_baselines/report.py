"""The baselines' results table and accuracy-vs-wall-clock figure."""

from collections.abc import Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def _pct(value: float | None, digits: int = 2) -> str:
  return '-' if value is None else f'{100 * value:.{digits}f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown table: per method and setting, ours (95% CI) beside the paper."""
  lines = ['| method | setting | ours (%, 95% CI) | paper (%) | iterations | '
           's / iteration | compile s | test s |',
           '|---|---|---:|---:|---:|---:|---:|---:|']
  for sname, runs in results['runs'].items():
    for method, r in runs.items():
      lines.append(
          f'| {method} | {sname} | {_pct(r["accuracy"])} ± '
          f'{_pct(r["ci95"])} | {_pct(r["paper_accuracy"])} | '
          f'{r["iterations"]:,} | {r["step_time_s"]:.3f} | '
          f'{r["compile_s"]:.0f} | {r["curve_eval_s"] + r["final_eval_s"]:.0f}'
          ' |')
  return '\n'.join(lines)


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """Test accuracy vs seconds of training, one panel per setting."""
  settings = list(results['runs'])
  fig = Figure(figsize=(6.5 * len(settings), 4.5), layout='constrained')
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(1, len(settings)))
  for ax, sname in zip(axes, settings):
    for i, (method, r) in enumerate(results['runs'][sname].items()):
      color = f'C{i}'
      t = np.array([p['train_time_s'] for p in r['curve']])
      acc = np.array([p['accuracy'] for p in r['curve']])
      ci = np.array([p['ci95'] for p in r['curve']])
      ax.plot(t, acc, '.-', color=color, label=method)
      ax.fill_between(t, acc - ci, acc + ci, color=color, alpha=0.15)
      ax.errorbar([r['train_time_s']], [r['accuracy']], [r['ci95']],
                  fmt='s', color=color, capsize=3)
      if r['paper_accuracy'] is not None:
        ax.plot([t[-1]], [r['paper_accuracy']], '*', color=color,
                markersize=9)
    curve_tasks = results['config']['num_curve_tasks']
    ax.set_title(f'{sname}: {curve_tasks} test tasks per point; square: '
                 f'{results["config"]["num_test_tasks"]} tasks; star: paper')
    ax.set_xlabel('seconds of meta-training')
    ax.set_ylabel('test accuracy')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
  fig.suptitle(f'{results["device"]}, {results["date"][:10]}',
               fontsize='small')
  fig.savefig(path, dpi=100)
