"""Few-shot Omniglot classification with MAML.

Reproduces section 5.2 of Finn, Abbeel & Levine 2017
(https://arxiv.org/abs/1703.03400). Omniglot's 1623 characters (20 drawings
each) are resized to 28x28; the first 1200 characters meta-train, the other
423 are for testing. A task is N characters, each at a random rotation by a
multiple of 90 degrees (a new class, Santoro et al. 2016), with K support
and K query drawings of each (``config.num_query`` to change the latter).
For each N-way K-shot setting in ``config.settings``, Conv-4 (transductive
BatchNorm) is meta-trained with ``metacf.maml.make_meta_train_step``:
``num_inner_steps`` SGD steps of size ``inner_lr`` on the support set,
second order, Adam on the query loss of ``meta_batch_size`` tasks.

Evaluation: fresh tasks of test characters, adapted with 0 to
``max_eval_steps`` SGD steps of size ``inner_lr`` on their support set and
scored on their query set. The test accuracy curve is evaluated during
training on ``num_curve_tasks`` tasks; the final accuracy on
``num_test_tasks`` (600, as the authors) with its 95% half-width
``1.96 std / sqrt(num_tasks)`` (the authors' ``main.py``). The paper's
number is the accuracy after ``paper_eval_steps`` steps.

Tasks are sampled on the device inside the jitted training chunk (a
``lax.scan`` over ``chunk_size`` iterations): the images of iteration ``i``
come from ``fold_in(run_key, i)``, so nothing crosses from the host during
training. Runs are checkpointed every ``checkpoint_every`` iterations and
where a time budget stops them; a run started again in the same ``workdir``
resumes where it stopped and gives bitwise the same numbers.

This module is the driver; the images and tasks are in ``data.py``, the
model, jitted training chunk and evaluation in ``steps.py``, the table and
figure in ``report.py``.
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from experiments.common import loop
from experiments.common import utils
from experiments.maml_omniglot import data
from experiments.maml_omniglot import report
from experiments.maml_omniglot import steps as steps_lib
from experiments.maml_omniglot.configs import Config
from experiments.maml_omniglot.configs import Setting
from experiments.maml_omniglot.configs import SETTINGS
from experiments.maml_omniglot.report import format_table  # For main.py.

PAPER = {
    'source': ('Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning '
               'for Fast Adaptation of Deep Networks", arXiv:1703.03400, '
               'Table 1 (MAML), hyperparameters in appendix A.1'),
    'metric': ('test accuracy after paper_eval_steps test-time gradient '
               'steps, mean and 95% half-width over 600 tasks'),
}
RESULTS_JSON = 'results.json'
RESULTS_PNG = 'results.png'
# Training progress is logged at checkpoints, and between them at most this
# often.
LOG_EVERY_S = 60

logger = logging.getLogger(__name__)


def check_config(config: Config) -> None:
  """Raises ValueError on numbers that do not fit together."""
  fn = 'check_config'
  if not config.settings:
    raise ValueError(f'{fn}: settings must not be empty.')
  names = [s.name for s in config.settings]
  if len(set(names)) != len(names):
    raise ValueError(f'{fn}: settings must be distinct, got {names}.')
  utils.check_positive_multiples(
      config, ('num_iterations', 'checkpoint_every'), 'chunk_size', fn)
  until = 0
  for end, every in config.eval_schedule:
    if end <= until or every <= 0 or every % config.chunk_size:
      raise ValueError(
          f'{fn}: eval_schedule must be (until, every) pairs with until '
          f'increasing and every a positive multiple of chunk_size '
          f'({config.chunk_size}), got {config.eval_schedule}.')
    until = end
  utils.check_positive_multiples(
      config, ('num_curve_tasks', 'num_test_tasks'), 'eval_batch_size', fn)
  if config.num_curve_tasks > config.num_test_tasks:
    raise ValueError(
        f'{fn}: num_curve_tasks must be <= num_test_tasks '
        f'({config.num_test_tasks}), got {config.num_curve_tasks}.')
  if not 0 < config.num_train_characters < 1623:
    raise ValueError(f'{fn}: num_train_characters must be in [1, 1622], got '
                     f'{config.num_train_characters}.')
  for s in config.settings:
    if not 0 <= s.paper_eval_steps <= config.max_eval_steps:
      raise ValueError(
          f'{fn}: max_eval_steps must be >= paper_eval_steps of every '
          f'setting, got {config.max_eval_steps} < {s.paper_eval_steps} '
          f'({s.name}).')
    if s.shots + data.num_query(s, config) > data.NUM_DRAWERS:
      raise ValueError(
          f'{fn}: shots + num_query must be <= {data.NUM_DRAWERS} (drawers '
          f'of a character), got {s.shots + data.num_query(s, config)} '
          f'({s.name}).')
  if config.time_budget_s is not None and config.time_budget_s <= 0:
    raise ValueError(f'{fn}: time_budget_s must be > 0 or None, got '
                     f'{config.time_budget_s}.')


def curve_iterations(config: Config) -> list[int]:
  """Iterations at which the test accuracy curve is evaluated."""
  points, start = {0, config.num_iterations}, 0
  for until, every in config.eval_schedule:
    points.update(range(start + every, min(until, config.num_iterations) + 1,
                        every))
    start = until
  return sorted(p for p in points if p <= config.num_iterations)


def recipe(setting: Setting, config: Config) -> dict[str, Any]:
  """Everything that changes a run's numbers (checked on resume)."""
  fields = ('seed', 'num_iterations', 'outer_lr', 'num_query',
            'loss_times_ways', 'features', 'image_size',
            'num_train_characters', 'rotations', 'chunk_size',
            'eval_schedule', 'num_curve_tasks', 'max_eval_steps')
  return utils.jsonable({'setting': dataclasses.asdict(setting),
                         **{f: getattr(config, f) for f in fields}})


def train_run(setting: Setting, config: Config, key: jax.Array,
              test_key: jax.Array, train_images: jax.Array,
              test_images: jax.Array, workdir: str
              ) -> tuple[steps_lib.Params, dict[str, Any]]:
  """Meta-trains one setting, resuming from its checkpoints.

  Args:
    setting: The N-way K-shot problem.
    config: Experiment config.
    key: This run's PRNG key (initialisation and training tasks).
    test_key: This setting's test tasks' key.
    train_images: Training characters, uint8 ``[num, 20, S*S]``.
    test_images: Test characters, likewise.
    workdir: Checkpoints go to ``workdir/checkpoints/<setting.name>``.

  Returns:
    ``(params, record)``; ``record`` holds the iterations done, whether the
    run is complete or was stopped by the time budget, the training history
    (mean meta-loss of each chunk), the test accuracy curve, the devices it
    trained on and the time spent training, compiling and evaluating (over
    all sessions of the run).

  Raises:
    ValueError: if the checkpoints were written by a different recipe.
  """
  name = setting.name
  key_init, key_tasks = jax.random.split(key)
  curve_at = set(curve_iterations(config))
  meta = {'iteration': 0, 'history': [], 'curve': [], 'train_time_s': 0.0,
          'compile_s': 0.0, 'eval_time_s': 0.0, 'sessions': 0,
          'devices': []}

  def add_curve_point(params):
    start = time.perf_counter()
    point = steps_lib.evaluate(params, test_key, test_images, setting, config,
                               config.num_curve_tasks)
    meta['eval_time_s'] += time.perf_counter() - start
    meta['curve'].append({'iteration': meta['iteration'], **point})
    logger.info('%s iteration %d: test accuracy %.4f ± %.4f after %d '
                'steps (%d tasks)', name, meta['iteration'],
                point['accuracy'][setting.paper_eval_steps],
                point['ci95'][setting.paper_eval_steps],
                setting.paper_eval_steps, config.num_curve_tasks)

  def start_session(state):
    start = time.perf_counter()
    steps_lib.compile_train_chunk(setting, config)  # Cached for train_chunks.
    meta['compile_s'] += time.perf_counter() - start
    meta['sessions'] += 1
    device = utils.device_description()
    if device not in meta['devices']:
      meta['devices'].append(device)
    if not meta['curve']:
      add_curve_point(state.params)  # Iteration 0: the initial network.

  def train_chunk(state, iteration):
    start = time.perf_counter()
    state, (losses, accuracies) = steps_lib.compile_train_chunk(
        setting, config)(state, key_tasks, np.int32(iteration), train_images)
    loss = float(np.mean(np.asarray(losses)))
    meta['train_time_s'] += time.perf_counter() - start
    meta['iteration'] = iteration + config.chunk_size
    meta['history'].append({
        'iteration': meta['iteration'], 'loss': loss,
        'train_query_accuracy': float(np.mean(np.asarray(accuracies)))})
    if meta['iteration'] in curve_at:
      add_curve_point(state.params)
    return state, f'loss {loss:.4f} ({meta["train_time_s"]:.0f}s training)'

  state, meta, stopped = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', name), name=name,
      unit='iteration', total=config.num_iterations,
      stride=config.chunk_size,
      init=lambda: steps_lib.compile_init(setting, config)(key_init),
      state_like=lambda: steps_lib.restore_template(setting, config),
      start=start_session, step=train_chunk,
      recipe=recipe(setting, config), meta=meta,
      checkpoint_every=config.checkpoint_every,
      time_budget_s=config.time_budget_s,
      max_to_keep=config.checkpoint_max_to_keep,
      progress_bar=config.progress_bar, log_every_s=LOG_EVERY_S)
  record = {field: meta[field] for field in (
      'iteration', 'train_time_s', 'compile_s', 'eval_time_s', 'sessions',
      'devices', 'history', 'curve')}
  record['iterations'] = record.pop('iteration')
  record.update(complete=record['iterations'] == config.num_iterations,
                stopped_by_time_budget=stopped)
  return state.params, record


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Runs the whole experiment; resumes from checkpoints in ``workdir``.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.png`` and
      ``checkpoints/``.
    raw_dir: Raw Omniglot zips (``metacf.data`` default:
      ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir (``metacf.data`` default).

  Returns:
    The results written to ``results.json``: run info, config, data split,
    and per setting (``results['settings'][name]``) the paper's accuracy,
    the iterations done, the final test accuracy after 0..max_eval_steps
    steps with its 95% interval, the accuracy curve and the training
    history.
  """
  check_config(config)
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  images = data.load_omniglot(config.image_size, raw_dir, data_dir)
  device = jax.devices()[0]
  train_images = jax.device_put(images[:config.num_train_characters], device)
  test_images = jax.device_put(images[config.num_train_characters:], device)
  root_key = jax.random.key(config.seed)
  key_test = utils.name_key(root_key, 'test', full_crc32=True)

  per_setting: dict[str, Any] = {}
  for setting in config.settings:
    setting_start = time.perf_counter()
    test_key = utils.name_key(key_test, setting.name, full_crc32=True)
    params, run = train_run(
        setting, config,
        utils.name_key(root_key, setting.name, full_crc32=True), test_key,
        train_images, test_images, workdir)
    start = time.perf_counter()
    final = steps_lib.evaluate(params, test_key, test_images, setting, config,
                               config.num_test_tasks)
    final_eval_s = time.perf_counter() - start
    steps = setting.paper_eval_steps
    record = {
        **dataclasses.asdict(setting),
        'name': setting.name,
        'num_query': data.num_query(setting, config),
        'accuracy': final['accuracy'][steps],
        'ci95': final['ci95'][steps],
        **run,
        'final': {'iteration': run['iterations'], **final},
        'final_eval_s': final_eval_s,
        'wall_time_s': (run['train_time_s'] + run['compile_s']
                        + run['eval_time_s'] + final_eval_s),
        'session_wall_time_s': time.perf_counter() - setting_start,
        'date': utils.run_info()['date'],
        'device': utils.device_description(),
    }
    logger.info('%s: test accuracy %s after %d steps, %d iterations (paper: '
                '%s)', setting.name, report.format_accuracy(record), steps,
                run['iterations'], report.format_paper(record))
    per_setting[setting.name] = record

  # A session may train only some settings (--settings): keep the latest
  # results of the others from earlier sessions in this workdir.
  earlier = _earlier_settings(os.path.join(workdir, RESULTS_JSON))
  carried = [name for name in earlier if name not in per_setting]
  for name in carried:
    per_setting[name] = earlier[name]
  order = [s.name for s in SETTINGS]
  per_setting = dict(sorted(
      per_setting.items(),
      key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
  results = {
      'experiment': 'maml_omniglot',
      **utils.run_info(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'paper': PAPER,
      'data': {'num_characters': int(images.shape[0]),
               'num_train_characters': config.num_train_characters,
               'num_test_characters': int(images.shape[0]
                                          - config.num_train_characters),
               'image_size': config.image_size},
      'settings': per_setting,
      'settings_from_earlier_sessions': carried,
  }
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  report.plot_results(results, os.path.join(workdir, RESULTS_PNG))
  return results


def _earlier_settings(path: str) -> dict[str, Any]:
  """The per-setting records of an earlier ``results.json``, if any."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return dict(json.load(f).get('settings', {}))
