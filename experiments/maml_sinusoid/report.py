"""The sinusoid study's results table and figures."""

from collections.abc import Mapping
from typing import Any

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from experiments.maml_sinusoid import steps as steps_lib

# Display names and colours of the runs.
NAMES = {'maml': 'MAML', 'reptile': 'Reptile', 'imaml': 'iMAML',
         'pretrained': 'pretrained'}
COLORS = {'maml': 'C0', 'reptile': 'C3', 'imaml': 'C4', 'pretrained': 'C1'}


def format_mse(run: Mapping[str, Any], step: int) -> str:
  """``'mean ± ci95'`` after ``step`` steps, or the median if SGD diverged."""
  mean, ci = run['mse_mean'][step], run['mse_ci95'][step]
  if mean is None:
    return (f'diverged on {run["num_diverged"][step]} tasks (median '
            f'{run["mse_median"][step]:.3f})')
  return f'{mean:.3f} ± {ci:.3f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown table: test MSE after 1 and 10 steps, paper vs ours.

  One pair of columns per method (``-`` where it was not run), then the
  pretrained baseline.
  """
  steps = results['config']['max_eval_steps']
  header = ['K', 'MAML, paper (1 step)']
  for kind in (*steps_lib.METHODS, 'pretrained'):
    name = NAMES[kind] if kind in steps_lib.METHODS else 'pretrained'
    header += [f'{name}, ours (1 step)', f'{name}, ours ({steps} steps)']
  header.append('pretrained lr')
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---:|' * len(header)]
  for shots, record in results['shots'].items():
    paper = record['paper_maml_mse_1_step']
    cells = ['-' if paper is None else f'{paper:.2f}']
    for kind in (*steps_lib.METHODS, 'pretrained'):
      run = record.get(kind)
      cells += ([format_mse(run, 1), format_mse(run, steps)] if run
                else ['-'] * 2)
    pre = record.get('pretrained')
    cells.append(f'{pre["lr"]:g}' if pre else '-')
    lines.append(f'| {shots} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ------------------------------------------------------------------ plots


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """MSE vs test-time steps per K (as Finn et al. Fig. 3), training losses."""
  shots = list(results['shots'])
  fig = Figure(figsize=(4.2 * (len(shots) + 1), 4), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(shots) + 1, squeeze=False)[0]
  steps = np.arange(results['config']['max_eval_steps'] + 1)
  inner_lr = results['config']['inner_lr']
  for ax, k in zip(axes, shots):
    record = results['shots'][k]
    curves = [(NAMES[m], record[m], COLORS[m], '-')
              for m in steps_lib.METHODS if m in record]
    if 'pretrained' in record:
      pre = record['pretrained']
      curves.append((f'pretrained, step={pre["lr"]:g}', pre, 'C1', '-'))
      curves.append((f'pretrained, step={inner_lr:g}', pre['at_inner_lr'],
                     'C1', ':'))
    for label, run, color, style in curves:
      # Steps where SGD diverged on some task have no mean: a gap, and the
      # median instead.
      mean, ci = (np.array([np.nan if v is None else v for v in run[k]])
                  for k in ('mse_mean', 'mse_ci95'))
      ax.plot(steps, mean, style, color=color, marker='.', label=label)
      ax.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.2)
      if np.isnan(mean).any():
        ax.plot(steps, run['mse_median'], style, color=color, marker='x',
                alpha=0.6, label=f'{label} (median: diverged on '
                f'{max(run["num_diverged"])} tasks)')
    paper = record['paper_maml_mse_1_step']
    if paper is not None:
      ax.plot([1], [paper], 'kx', markersize=9,
              label='MAML, Meta-SGD paper Tab. 1')
    ax.set_xlabel('number of gradient steps')
    ax.set_ylabel('test MSE')
    ax.set_yscale('log')
    # A diverging mean would flatten everything else: it leaves the top.
    ax.set_ylim(top=3 * max(c[1]['mse_median'][0] for c in curves))
    ax.grid(True, which='both', alpha=0.3)
    ax.set_title(f'K = {k}')
    ax.legend(fontsize='small')
  ax = axes[-1]
  # Colour: the method; line style: K. Reptile's loss is its query MSE
  # before adaptation, the others' after their inner steps.
  for k, style in zip(shots, ('-', '--', ':', '-.') * len(shots)):
    for kind in steps_lib.KINDS:
      if kind in results['shots'][k]:
        history = results['shots'][k][kind]['history']
        ax.plot([h['iteration'] for h in history],
                [h['loss'] for h in history], style, color=COLORS[kind],
                label=f'{NAMES[kind]}, K={k}')
  ax.set_xlabel('training iteration')
  ax.xaxis.set_major_formatter(
      ticker.FuncFormatter(lambda v, _: f'{v / 1000:g}k'))
  ax.set_ylabel('training loss (mean per chunk)')
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize='small')
  ax.set_title(f'Training ({results["device"].split(" (")[0]}, '
               f'{results["date"][:10]})')
  fig.savefig(path, dpi=100)


def plot_fits(results: Mapping[str, Any], path: str) -> None:
  """One test task: pre-update, after 1 and N steps, truth (Finn Fig. 2)."""
  shots = list(results['shots'])
  kinds = [k for k in steps_lib.KINDS
           if k in results['shots'][shots[0]]['fit']]
  fig = Figure(figsize=(4.2 * len(shots), 3.6 * len(kinds)),
               layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(kinds), len(shots), squeeze=False)
  x = np.asarray(results['fits_x'])
  steps = results['config']['max_eval_steps']
  for col, k in enumerate(shots):
    fit = results['shots'][k]['fit']
    truth = fit['amplitude'] * np.sin(x - fit['phase'])
    for row, kind in enumerate(kinds):
      ax = axes[row, col]
      ax.plot(x, truth, 'r-', label='ground truth')
      pred = fit[kind]['pred']
      ax.plot(x, pred['0'], ':', color='C2', label='pre-update')
      ax.plot(x, pred['1'], '--', color='C0', label='1 grad step')
      ax.plot(x, pred[str(steps)], '-', color='C0', alpha=0.6,
              label=f'{steps} grad steps')
      ax.plot(fit['support_x'], fit['support_y'], 'k^',
              label=f'{k} support points')
      ax.set_title(f'{NAMES[kind]}, K={k}, step={fit[kind]["lr"]:g}')
      ax.grid(True, alpha=0.3)
      if row == 0 and col == 0:
        ax.legend(fontsize='small')
  fig.savefig(path, dpi=100)
