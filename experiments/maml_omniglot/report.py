"""The Omniglot study's results table and figure."""

from collections.abc import Mapping
from typing import Any

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def format_accuracy(record: Mapping[str, Any]) -> str:
  return f'{100 * record["accuracy"]:.1f} ± {100 * record["ci95"]:.1f}%'


def format_paper(record: Mapping[str, Any]) -> str:
  if record['paper_accuracy'] is None:
    return '-'
  return (f'{100 * record["paper_accuracy"]:.1f} ± '
          f'{100 * record["paper_ci95"]:.1f}%')


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown table: paper vs ours, iterations, device."""
  lines = ['| setting | paper | ours | test steps | iterations | device |',
           '|---|---:|---:|---:|---:|---|']
  for name, r in results['settings'].items():
    iterations = f'{r["iterations"]:,}'
    if not r['complete']:
      iterations += f' of {results["config"]["num_iterations"]:,}'
    lines.append(f'| {name} | {format_paper(r)} | {format_accuracy(r)} | '
                 f'{r["paper_eval_steps"]} | {iterations} | '
                 f'{"; ".join(r["devices"]) or results["device"]} |')
  return '\n'.join(lines)


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """Test accuracy vs iteration, vs test-time steps, and training loss."""
  fig = Figure(figsize=(15, 4.2), layout='constrained')
  FigureCanvasAgg(fig)
  ax_curve, ax_steps, ax_loss = fig.subplots(1, 3)
  for i, (name, r) in enumerate(results['settings'].items()):
    color, steps = f'C{i}', r['paper_eval_steps']
    its = np.array([p['iteration'] for p in r['curve']])
    acc = np.array([p['accuracy'][steps] for p in r['curve']])
    ci = np.array([p['ci95'][steps] for p in r['curve']])
    ax_curve.plot(its, acc, '.-', color=color,
                  label=f'{name} ({steps} steps, {r["curve"][0]["num_tasks"]}'
                  ' tasks)')
    ax_curve.fill_between(its, acc - ci, acc + ci, color=color, alpha=0.2)
    final = r['final']
    ax_curve.errorbar([final['iteration']], [r['accuracy']], [r['ci95']],
                      fmt='s', color=color, capsize=3)
    if r['paper_accuracy'] is not None:
      ax_curve.axhline(r['paper_accuracy'], color=color, ls='--', lw=1,
                       label=f'{name}, paper')
    x = np.arange(len(final['accuracy']))
    mean, ci = np.array(final['accuracy']), np.array(final['ci95'])
    ax_steps.plot(x, mean, '.-', color=color,
                  label=f'{name}, iteration {final["iteration"]:,}')
    ax_steps.fill_between(x, mean - ci, mean + ci, color=color, alpha=0.2)
    if r['paper_accuracy'] is not None:
      ax_steps.plot([steps], [r['paper_accuracy']], 'x', color=color,
                    markersize=9, label=f'{name}, paper')
    ax_loss.plot([h['iteration'] for h in r['history']],
                 [h['loss'] for h in r['history']], color=color, label=name)
  ax_curve.set_xlabel('meta-training iteration')
  ax_curve.set_ylabel('test accuracy')
  ax_curve.set_title('Test accuracy during training (square: final, 95% CI)')
  ax_steps.set_xlabel('test-time gradient steps')
  ax_steps.set_ylabel('test accuracy')
  ax_steps.set_title(f'Final, {results["config"]["num_test_tasks"]} test '
                     'tasks')
  ax_loss.set_xlabel('meta-training iteration')
  ax_loss.set_ylabel('meta-loss (mean per chunk)')
  ax_loss.set_yscale('log')
  ax_loss.set_title(f'Training ({results["device"].split(" (")[0]}, '
                    f'{results["date"][:10]})')
  for ax in (ax_curve, ax_steps, ax_loss):
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize='small')
  ax_steps.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  for ax in (ax_curve, ax_loss):
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: f'{v / 1000:g}k' if abs(v) >= 1000 else f'{v:g}'))
  fig.savefig(path, dpi=100)
