"""The distillation study's results table and figure."""

from collections.abc import Mapping
from typing import Any

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown table: model | test errors | paper; then the born-again line."""
  num_test = results['num_test']
  lines = [f'| model | test errors (of {num_test}) | paper (of 10000) |',
           '|---|---:|---:|']
  for name, record in results['models'].items():
    paper = record['paper_test_errors']
    lines.append(f'| {name} | {record["test_errors"]} | '
                 f'{"-" if paper is None else paper} |')
  if 'born_again_beats_teacher' in results:
    lines.append(f'born-again student beats the teacher: '
                 f'{results["born_again_beats_teacher"]}')
  return '\n'.join(lines)


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """Test errors per epoch (left) and final test errors vs the paper (right)."""
  fig = Figure(figsize=(12, 4.5), layout='constrained')
  FigureCanvasAgg(fig)
  ax_curve, ax_bar = fig.subplots(1, 2)
  num_test = results['num_test']
  names = list(results['models'])
  for name in names:
    history = results['models'][name]['history']
    ax_curve.plot([h['epoch'] for h in history],
                  [h['test_errors'] for h in history], marker='.', label=name)
  ax_curve.set_xlabel('epoch')
  ax_curve.set_ylabel(f'test errors (of {num_test})')
  ax_curve.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax_curve.grid(True, alpha=0.3)
  ax_curve.legend(fontsize='small')
  ax_curve.set_title('Test errors after each epoch')

  positions = np.arange(len(names))
  ours = [results['models'][n]['test_errors'] for n in names]
  ax_bar.bar(positions - 0.2, ours, width=0.4, label='ours')
  # The paper's counts are of MNIST's 10,000 test images: only comparable on
  # the full test set.
  if num_test == 10_000:
    paper = [(x, results['models'][n]['paper_test_errors'])
             for x, n in zip(positions, names)
             if results['models'][n]['paper_test_errors'] is not None]
    ax_bar.bar([x + 0.2 for x, _ in paper], [v for _, v in paper],
               width=0.4, label='Hinton et al. 2015')
    for x, v in paper:
      ax_bar.annotate(str(v), (x + 0.2, v), ha='center', va='bottom',
                      fontsize='small')
  for x, v in zip(positions, ours):
    ax_bar.annotate(str(v), (x - 0.2, v), ha='center', va='bottom',
                    fontsize='small')
  tallest = max(ours + [results['models'][n]['paper_test_errors'] or 0
                        for n in names])
  ax_bar.set_ylim(0, 1.3 * max(tallest, 1))  # Room for the legend.
  ax_bar.set_xticks(positions, names, rotation=30, ha='right')
  ax_bar.set_ylabel(f'test errors (of {num_test})')
  ax_bar.legend(fontsize='small')
  ax_bar.set_title(f'Final test errors ({results["device"].split(" (")[0]}, '
                   f'{results["date"][:10]})')
  fig.savefig(path, dpi=100)
