"""Figures of the forgetting experiment: accuracy matrices and curves.

For each scenario ``<name>`` of the results:

* ``<name>_class_il_matrices.png``: one heatmap per strategy of the
  class-incremental accuracy matrix ``R[i, j]`` (mean over seeds).
* ``<name>_task_il_matrices.png``: the same, task-incremental (not drawn
  for one-digit tasks, where it is trivially 100%).
* ``<name>_curves.png``: one panel per strategy, the class-incremental
  accuracy on each task's test images along training (thin lines) and the
  mean over the tasks seen so far (thick black; all tasks for ``joint``),
  task boundaries dashed.
"""

from collections.abc import Mapping
import math
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def figure_names(results: Mapping[str, Any]) -> list[str]:
  """File names (in the workdir) that ``plot_all`` writes."""
  names = []
  for name, scenario in results['scenarios'].items():
    names.append(f'{name}_class_il_matrices.png')
    if scenario['classes_per_task'] > 1:
      names.append(f'{name}_task_il_matrices.png')
    names.append(f'{name}_curves.png')
  return names


def plot_all(results: Mapping[str, Any], workdir: str) -> list[str]:
  """Writes every figure into ``workdir``; returns their paths."""
  paths = []
  subtitle = (f'{results["device"].split(" (")[0]}, jax '
              f'{results["jax_version"]}, {results["date"][:10]}, '
              f'{len(results["config"]["seeds"])} seed(s)')
  for name, scenario in results['scenarios'].items():
    settings = ['class_il'] + (['task_il']
                               if scenario['classes_per_task'] > 1 else [])
    for setting in settings:
      path = os.path.join(workdir, f'{name}_{setting}_matrices.png')
      label = {'class_il': 'class-IL', 'task_il': 'task-IL'}[setting]
      plot_matrices(scenario, setting,
                    f'{name}: {label} accuracy R[i, j] ({subtitle})', path)
      paths.append(path)
    path = os.path.join(workdir, f'{name}_curves.png')
    plot_curves(scenario, f'{name}: class-IL accuracy along training '
                f'({subtitle})', path)
    paths.append(path)
  return paths


def _grid(fig: Figure, count: int, max_cols: int = 4):
  cols = min(count, max_cols)
  rows = math.ceil(count / cols)
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
  for ax in axes[count:]:
    ax.set_visible(False)
  return axes[:count]


def plot_matrices(scenario: Mapping[str, Any], setting: str, title: str,
                  path: str) -> None:
  """Heatmaps of the accuracy matrices of every strategy of a scenario."""
  strategies = scenario['strategies']
  num_tasks = scenario['num_tasks']
  cols = min(len(strategies), 4)
  rows = math.ceil(len(strategies) / cols)
  cell = 0.42 * num_tasks + 1.2
  width, height = cols * cell + 1.2, rows * cell + 0.8
  fig = Figure(figsize=(width, height))
  # Fixed margins in inches (constrained layout doubles the drawing time).
  fig.subplots_adjust(left=0.75 / width, right=1 - 1.1 / width,
                      bottom=0.5 / height, top=1 - 0.75 / height,
                      wspace=0.3, hspace=0.55)
  FigureCanvasAgg(fig)
  annotate = num_tasks <= 10
  image = None
  for ax, (name, s) in zip(_grid(fig, len(strategies)), strategies.items()):
    r = np.asarray(s[setting]['accuracy_matrix'])
    image = ax.imshow(r, vmin=0.0, vmax=1.0, cmap='viridis')
    ax.set_title(f'{name}\nACC {100 * s[setting]["acc"]:.1f}%, '
                 f'F {100 * s[setting]["forgetting_max"]:.1f}%',
                 fontsize='small')
    ticks = np.arange(num_tasks)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize='x-small')
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize='x-small')
    ax.set_xlabel('evaluated on task j', fontsize='x-small')
    ax.set_ylabel('trained through task i', fontsize='x-small')
    if annotate:
      for i in range(num_tasks):
        for j in range(num_tasks):
          ax.text(j, i, f'{100 * r[i, j]:.0f}', ha='center', va='center',
                  fontsize=6 if num_tasks > 5 else 7,
                  color='white' if r[i, j] < 0.5 else 'black')
  if image is not None:
    cax = fig.add_axes((1 - 0.8 / width, 0.2, 0.15 / width, 0.6))
    fig.colorbar(image, cax=cax, label='accuracy')
  fig.suptitle(title, fontsize='small')
  fig.savefig(path, dpi=100)


def plot_curves(scenario: Mapping[str, Any], title: str, path: str) -> None:
  """Per-task class-IL accuracy along training, one panel per strategy."""
  strategies = scenario['strategies']
  num_tasks = scenario['num_tasks']
  cols = min(len(strategies), 4)
  rows = math.ceil(len(strategies) / cols)
  width, height = 4.2 * cols, 3.0 * rows + 0.6
  fig = Figure(figsize=(width, height))
  fig.subplots_adjust(left=0.6 / width, right=1 - 0.2 / width,
                      bottom=0.5 / height, top=1 - 0.6 / height,
                      wspace=0.25, hspace=0.45)
  FigureCanvasAgg(fig)
  colors = [f'C{t % 10}' for t in range(num_tasks)]
  for ax, (name, s) in zip(_grid(fig, len(strategies)), strategies.items()):
    curve = s['curve']
    steps = np.asarray(curve['step'])
    acc = np.asarray(curve['class_il'])          # [points, T]
    current = np.asarray(curve['task'])          # task being trained
    for t in range(num_tasks):
      ax.plot(steps, acc[:, t], color=colors[t], lw=1.0,
              label=f'task {t}' if num_tasks <= 5 else None)
    if s['strategy']['kind'] == 'joint':  # Its stream has every task.
      current = np.full_like(current, num_tasks - 1)
    seen = np.arange(num_tasks)[None, :] <= current[:, None]
    mean_seen = np.sum(acc * seen, axis=1) / np.sum(seen, axis=1)
    ax.plot(steps, mean_seen, color='black', lw=2.0,
            label='mean over tasks seen')
    for boundary in s['task_boundaries'][:-1]:
      ax.axvline(boundary, color='grey', ls='--', lw=0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(name, fontsize='small')
    ax.set_xlabel('training step (batch of 10)', fontsize='x-small')
    ax.set_ylabel('test accuracy', fontsize='x-small')
    ax.tick_params(labelsize='x-small')
    ax.grid(True, alpha=0.3)
  fig.axes[0].legend(fontsize='x-small', loc='center right')
  fig.suptitle(title, fontsize='small')
  fig.savefig(path, dpi=100)
