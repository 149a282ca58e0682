"""The meta-learning family on Omniglot at equal compute.

For each setting (5-way 1-shot, 5-way 5-shot) and each method (MAML,
FOMAML, Reptile, iMAML, ProtoNets, ANIL, MAML++), a Conv-4 is meta-trained
from the same initial key under the same wall-clock budget
(``config.time_budget_s`` seconds of training, compilation and the curve
evaluations timed apart), or for the paper's iterations without a budget
(``protocol='paper'``, the default on a GPU). The test accuracy is measured
on ``num_curve_tasks`` test tasks at ``num_curve_points`` equally spaced
points of training progress (the accuracy-vs-wall-clock figure), and at the
end on ``num_test_tasks`` (600) test tasks with its 95% interval. Every
method sees the same test tasks (same keys): a paired comparison.

This module is the driver; the models, steps and scorers are in
``steps.py``, the table and figure in ``report.py``. Runs are short (minutes)
and not checkpointed: an interrupted run starts again.
"""

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from experiments.common import utils
from experiments.maml_omniglot import data as omniglot_data
from experiments.meta_baselines import configs
from experiments.meta_baselines import report
from experiments.meta_baselines import steps as steps_lib
from experiments.meta_baselines.configs import Config
from experiments.meta_baselines.configs import Method
from experiments.meta_baselines.report import format_table  # For main.py.

RESULTS_JSON = 'results.json'
RESULTS_PNG = 'results.png'

logger = logging.getLogger(__name__)


def train_run(method: Method, setting: tuple[int, int], config: Config,
              key: jax.Array, test_key: jax.Array, train_images: jax.Array,
              test_images: jax.Array) -> dict[str, Any]:
  """Trains and tests one method on one setting; returns its record."""
  name = f'{method.name}/{configs.setting_name(setting)}'
  start = time.perf_counter()
  fns = steps_lib.make_method(method, setting, config)
  init, compiled_steps, score = steps_lib.compile_all(fns, config)
  compile_s = time.perf_counter() - start
  key_init, key_tasks = jax.random.split(key)
  state = init(key_init)
  budget = config.time_budget_s
  batch = config.eval_batch_size

  curve, eval_time_s = [], 0.0

  def add_curve_point(params, iteration, train_time_s):
    nonlocal eval_time_s
    t = time.perf_counter()
    acc = steps_lib.evaluate(score, params, test_key, test_images,
                             config.num_curve_tasks, batch)
    eval_time_s += time.perf_counter() - t
    mean, ci = steps_lib.mean_ci95(acc)
    curve.append({'iteration': iteration, 'train_time_s': train_time_s,
                  'accuracy': mean, 'ci95': ci})

  def progress_of(iteration, train_time_s):
    p = iteration / method.num_iterations
    if budget is not None:
      p = max(p, train_time_s / budget)
    return p

  add_curve_point(state.params, 0, 0.0)
  points = [k / config.num_curve_points
            for k in range(1, config.num_curve_points)]
  iteration, train_time_s, losses, step_times = 0, 0.0, [], []
  last_log = time.perf_counter()
  switch_iteration = None
  while progress_of(iteration, train_time_s) < 1.0:
    progress = progress_of(iteration, train_time_s)
    step = compiled_steps[0]
    if len(compiled_steps) > 1 and progress >= method.first_order_fraction:
      step = compiled_steps[1]  # MAML++: second order from here on.
      if switch_iteration is None:
        switch_iteration = iteration
    t = time.perf_counter()
    state, loss = step(state, jax.random.fold_in(key_tasks, iteration),
                       np.float32(progress), train_images)
    loss = float(loss)  # Blocks.
    dt = time.perf_counter() - t
    train_time_s += dt
    step_times.append(dt)
    losses.append(loss)
    iteration += 1
    while points and progress_of(iteration, train_time_s) >= points[0]:
      points.pop(0)
      add_curve_point(state.params, iteration, train_time_s)
    if time.perf_counter() - last_log > config.log_every_s:
      last_log = time.perf_counter()
      logger.info('%s: iteration %d, %.0fs training, loss %.4f', name,
                  iteration, train_time_s, np.mean(losses[-20:]))

  t = time.perf_counter()
  acc = steps_lib.evaluate(score, state.params, test_key, test_images,
                           config.num_test_tasks, batch)
  final_eval_s = time.perf_counter() - t
  accuracy, ci95 = steps_lib.mean_ci95(acc)
  curve_acc = acc[:config.num_curve_tasks]
  curve.append({'iteration': iteration, 'train_time_s': train_time_s,
                'accuracy': float(curve_acc.mean()),
                'ci95': steps_lib.mean_ci95(curve_acc)[1]})
  paper = dict(method.paper).get(setting[1]) if setting[0] == 5 else None
  # Per-iteration time: the median, the first (warm-up) call excluded.
  timed = step_times[1:] or step_times
  record = {
      'method': method.name, 'ways': setting[0], 'shots': setting[1],
      'hyperparameters': utils.jsonable(dataclasses.asdict(method)),
      'accuracy': accuracy, 'ci95': ci95,
      'num_test_tasks': config.num_test_tasks,
      'paper_accuracy': paper, 'paper_source': method.source,
      'iterations': iteration, 'train_time_s': train_time_s,
      'step_time_s': float(np.median(timed)),
      'compile_s': compile_s, 'curve_eval_s': eval_time_s,
      'final_eval_s': final_eval_s,
      'second_order_from_iteration': switch_iteration,
      'losses': losses, 'curve': curve,
  }
  logger.info('%s: %.2f ± %.2f%% after %d iterations (%.0fs training, '
              '%.0fs compiling, %.0fs testing; paper %s)', name,
              100 * accuracy, 100 * ci95, iteration, train_time_s, compile_s,
              eval_time_s + final_eval_s,
              '-' if paper is None else f'{100 * paper:.2f}%')
  return record


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Runs every method on every setting; writes results.json and results.png.

  Args:
    config: Experiment config (its protocol resolved against JAX's backend).
    workdir: Output directory.
    raw_dir: Raw Omniglot zips (``metacf.data`` default:
      ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir.

  Returns:
    The results written to ``results.json``: run info, the resolved config,
    and ``results['runs'][setting][method]``: accuracy and 95% half-width on
    ``num_test_tasks`` test tasks, the paper's number, iterations, median
    seconds per iteration, compile and evaluation seconds, the training
    losses and the accuracy curve (``train_time_s``, ``accuracy``, ...).
  """
  config = configs.resolve(config, jax.default_backend())
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  images = omniglot_data.load_omniglot(config.image_size, raw_dir, data_dir)
  device = jax.devices()[0]
  train_images = jax.device_put(images[:config.num_train_characters], device)
  test_images = jax.device_put(images[config.num_train_characters:], device)
  root_key = jax.random.key(config.seed)
  runs: dict[str, dict[str, Any]] = {}
  for setting in config.settings:
    sname = configs.setting_name(setting)
    # Same initial key and same test tasks for every method of a setting.
    key = utils.name_key(root_key, sname, full_crc32=True)
    test_key = utils.name_key(root_key, 'test', sname, full_crc32=True)
    runs[sname] = {}
    for method in config.methods:
      runs[sname][method.name] = train_run(method, setting, config, key,
                                           test_key, train_images,
                                           test_images)
  results = {
      'experiment': 'meta_baselines',
      **utils.run_info(),
      'device': utils.device_description(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'runs': runs,
  }
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  report.plot_results(results, os.path.join(workdir, RESULTS_PNG))
  return results
