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
"""

from collections.abc import Mapping
import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import optax

from experiments.common import loop
from experiments.common import models
from experiments.common import utils
from experiments.maml_omniglot.configs import Config
from experiments.maml_omniglot.configs import Setting
from experiments.maml_omniglot.configs import SETTINGS
from metacf import maml

PAPER = {
    'source': ('Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning '
               'for Fast Adaptation of Deep Networks", arXiv:1703.03400, '
               'Table 1 (MAML), hyperparameters in appendix A.1'),
    'metric': ('test accuracy after paper_eval_steps test-time gradient '
               'steps, mean and 95% half-width over 600 tasks'),
}
RESULTS_JSON = 'results.json'
RESULTS_PNG = 'results.png'
NUM_DRAWERS = 20
# Training progress is logged at checkpoints, and between them at most this
# often.
LOG_EVERY_S = 60

Params = Any
logger = logging.getLogger(__name__)


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState


# ------------------------------------------------------------------- data


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of ``[..., H, H]`` images to side ``size``.

  Output pixel ``i`` takes input pixel ``floor((i + 0.5) * H / size)``:
  exactly what Pillow's ``Image.resize`` gives for Omniglot's 1-bit (mode
  ``'1'``) PNGs, for which it always uses ``NEAREST``, whatever filter is
  asked for. So this is the data the authors' ``resize_images.py``
  (``im.resize((28, 28), resample=Image.LANCZOS)``) produced.
  """
  height = images.shape[-1]
  idx = np.floor((np.arange(size) + 0.5) * (height / size)).astype(np.intp)
  return images[..., idx[:, None], idx[None, :]]


def load_omniglot(image_size: int, raw_dir: str | None = None,
                  data_dir: str | None = None) -> np.ndarray:
  """All of Omniglot as uint8 ``[1623, 20, image_size ** 2]``, strokes 255.

  Characters in Omniglot's order (the 964 of the background split, then the
  659 of the evaluation split), drawers in order. Pixels are inverted (255
  is a stroke, 0 the background), as the authors' ``1.0 - image``. Cached
  per process.

  Raises:
    ValueError: if a split is not ordered by character, 20 drawings each.
  """
  return _load_omniglot(image_size, raw_dir, data_dir)


@functools.cache
def _load_omniglot(image_size: int, raw_dir: str | None,
                   data_dir: str | None) -> np.ndarray:
  import metacf.data  # pylint: disable=g-import-not-at-top  # needs tfds
  characters = []
  for split in ('background', 'evaluation'):
    arrays = metacf.data.load_arrays('omniglot', split, raw_dir=raw_dir,
                                     data_dir=data_dir)
    num_characters = len(arrays.labels) // NUM_DRAWERS
    if not np.array_equal(arrays.labels, np.repeat(
        np.arange(num_characters, dtype=arrays.labels.dtype), NUM_DRAWERS)):
      raise ValueError(
          f'load_omniglot: the {split} split must be ordered by character, '
          f'{NUM_DRAWERS} drawings each, got labels {arrays.labels[:25]}...')
    images = arrays.images[..., 0].reshape(
        num_characters, NUM_DRAWERS, *arrays.images.shape[1:3])
    characters.append(resize_nearest(255 - images, image_size))
  images = np.concatenate(characters)
  images = images.reshape(*images.shape[:2], image_size * image_size)
  images.flags.writeable = False  # Shared by the callers.
  return images


def rotation_tables(image_size: int) -> np.ndarray:
  """int32 ``[4, image_size ** 2]``: ``flat[tables[r]]`` is ``rot90(., r)``."""
  idx = np.arange(image_size * image_size).reshape(image_size, image_size)
  return np.stack([np.rot90(idx, r).ravel() for r in range(4)]).astype(
      np.int32)


def sample_task(key: jax.Array, images: jax.Array, *, ways: int, shots: int,
                num_query: int, rotations: bool) -> maml.Task:
  """One N-way K-shot task from ``images`` (uint8 ``[characters, 20, S*S]``).

  ``ways`` distinct characters in random order (class ``c`` is the ``c``-th),
  each at a random multiple of 90 degrees if ``rotations``; ``shots +
  num_query`` distinct drawers of each, the first ``shots`` for support.

  Returns:
    A :class:`metacf.maml.Task`: ``support_x`` float32 ``[ways * shots, S,
    S, 1]`` in [0, 1] (strokes 1), ``support_y`` int32 ``[ways * shots]``
    (class-major), ``query_x``/``query_y`` likewise with ``num_query``.
  """
  num_characters, num_drawers, num_pixels = images.shape
  size = math.isqrt(num_pixels)
  key_chars, key_drawers, key_rotations = jax.random.split(key, 3)
  chars = jax.random.choice(key_chars, num_characters, (ways,), replace=False)
  num_per_class = shots + num_query
  drawers = jax.vmap(
      lambda k: jax.random.permutation(k, num_drawers)[:num_per_class])(
          jax.random.split(key_drawers, ways))
  pixels = images[chars[:, None], drawers]  # [ways, num_per_class, S*S]
  if rotations:
    turns = jax.random.randint(key_rotations, (ways,), 0, 4)
    table = jnp.asarray(rotation_tables(size))[turns]  # [ways, S*S]
    pixels = pixels[jnp.arange(ways)[:, None, None],
                    jnp.arange(num_per_class)[None, :, None],
                    table[:, None, :]]
  x = (pixels.astype(jnp.float32) / 255.0).reshape(
      ways, num_per_class, size, size, 1)

  def split(part, n):
    return (part.reshape(ways * n, size, size, 1),
            jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n))

  support_x, support_y = split(x[:, :shots], shots)
  query_x, query_y = split(x[:, shots:], num_query)
  return maml.Task(support_x, support_y, query_x, query_y)


def sample_tasks(keys: jax.Array, images: jax.Array, setting: Setting,
                 config: Config) -> maml.Task:
  """``sample_task`` for each key of ``keys`` ``[num_tasks]``, stacked."""
  return jax.vmap(functools.partial(
      sample_task, images=images, ways=setting.ways, shots=setting.shots,
      num_query=num_query(setting, config), rotations=config.rotations))(keys)


def num_query(setting: Setting, config: Config) -> int:
  return setting.shots if config.num_query is None else config.num_query


# ------------------------------------------------------------------ model


def make_model(setting: Setting, config: Config) -> models.Conv4:
  return models.Conv4(num_classes=setting.ways, features=config.features)


def make_loss_fn(setting: Setting, config: Config):
  """``loss_fn(params, x, y) -> (loss, {'accuracy': ...})``, integer labels.

  The loss is softmax cross-entropy, scaled by N if ``config.loss_times_ways``
  (the authors' scale, see :class:`Config`); the aux is the fraction of ``x``
  classified as ``y`` from the same logits (BatchNorm on ``x``'s statistics),
  for ``metacf.maml``'s ``has_aux=True``.
  """
  model = make_model(setting, config)
  scale = float(setting.ways) if config.loss_times_ways else 1.0

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    loss = scale * jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, y))
    accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return loss, {'accuracy': accuracy}

  return loss_fn


# --------------------------------------------------------------- training


def _init_state(key: jax.Array, setting: Setting,
                config: Config) -> TrainState:
  size = config.image_size
  params = make_model(setting, config).init(
      key, jnp.zeros((1, size, size, 1), jnp.float32))['params']
  return TrainState(params, optax.adam(config.outer_lr).init(params))


def make_train_chunk(setting: Setting, config: Config):
  """``chunk(state, key, first_iteration, images) -> (state, (losses, accs))``.

  Runs ``config.chunk_size`` meta-iterations in a ``lax.scan``; iteration
  ``i`` trains on ``meta_batch_size`` tasks drawn from ``fold_in(key, i)``
  and the training characters ``images``. ``losses`` and ``accs`` (float32
  ``[chunk_size]``) are the meta-loss and the mean query accuracy of each
  iteration (after adaptation, before the update; the accuracy comes from the
  loss function's aux through ``has_aux=True``). Not jitted: see
  ``compile_train_chunk``.
  """
  meta_step = maml.make_meta_train_step(
      make_loss_fn(setting, config), optax.adam(config.outer_lr),
      inner_lr=setting.inner_lr, num_inner_steps=setting.num_inner_steps,
      task_chunk_size=config.task_chunk_size, donate=False, has_aux=True)

  def chunk(state, key, first_iteration, images):
    def body(state, iteration):
      keys = jax.random.split(jax.random.fold_in(key, iteration),
                              setting.meta_batch_size)
      tasks = sample_tasks(keys, images, setting, config)
      params, opt_state, metrics = meta_step(state.params, state.opt_state,
                                             tasks)
      return TrainState(params, opt_state), (metrics.loss,
                                             metrics.aux['accuracy'])

    iterations = first_iteration + jnp.arange(config.chunk_size,
                                              dtype=jnp.int32)
    return jax.lax.scan(body, state, iterations)

  return chunk


def _compiled_config(config: Config) -> Config:
  """``config`` without the fields compiled functions do not depend on.

  The compiled functions are cached on it: a run with another seed, length
  or time budget compiles nothing again.
  """
  return dataclasses.replace(
      config, seed=0, settings=(), num_iterations=config.chunk_size,
      checkpoint_every=config.chunk_size, eval_schedule=(),
      num_curve_tasks=0, num_test_tasks=0, time_budget_s=None,
      progress_bar=False)


def _images_shape(config: Config, train: bool) -> jax.ShapeDtypeStruct:
  total = 1623  # Omniglot's characters.
  num = (config.num_train_characters if train
         else total - config.num_train_characters)
  return jax.ShapeDtypeStruct((num, NUM_DRAWERS, config.image_size ** 2),
                              jnp.uint8)


def compile_init(setting: Setting, config: Config):
  """AOT-compiled ``init(key) -> TrainState``; cached per process."""
  return _compile_init(setting, _compiled_config(config))


@functools.cache
def _compile_init(setting: Setting, config: Config):
  init = functools.partial(_init_state, setting=setting, config=config)
  return _compile(jax.jit(init), _abstract_key())


def compile_train_chunk(setting: Setting, config: Config):
  """AOT-compiles ``make_train_chunk`` (state donated); cached per process."""
  return _compile_train_chunk(setting, _compiled_config(config))


@functools.cache
def _compile_train_chunk(setting: Setting, config: Config):
  start = jax.ShapeDtypeStruct((), jnp.int32)
  jitted = jax.jit(make_train_chunk(setting, config), donate_argnums=0)
  return _compile(jitted, _abstract_state(setting, config),
                  _abstract_key(), start, _images_shape(config, True))


def _abstract_state(setting: Setting, config: Config) -> TrainState:
  return jax.eval_shape(
      functools.partial(_init_state, setting=setting, config=config),
      _abstract_key())


def _restore_template(setting: Setting, config: Config) -> TrainState:
  """The abstract state, committed to the default device (as restored)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      _abstract_state(setting, config))


def _abstract_key() -> jax.ShapeDtypeStruct:
  return jax.eval_shape(jax.random.key, 0)


def _compile(jitted, *abstract_args):
  """Ahead-of-time compiles ``jitted`` for ``abstract_args``.

  Compiled executables take committed (restored) and uncommitted arrays
  alike, where a ``jax.jit`` function would compile again.
  """
  return jitted.lower(*abstract_args).compile()


# ------------------------------------------------------------- evaluation


def evaluation_fn(setting: Setting, config: Config):
  """Compiled ``evaluate(params, key, task_ids, images) -> accuracy``.

  ``task_ids`` is int32 ``[eval_batch_size]``; ``accuracy`` is float32
  ``[eval_batch_size, max_eval_steps + 1]``: column
  ``s`` is the query accuracy of test task ``fold_in(key, task_id)`` after
  ``s`` SGD steps of size ``inner_lr`` on its support set. Cached per
  process.
  """
  return _evaluation_fn(setting, _compiled_config(config))


@functools.cache
def _evaluation_fn(setting: Setting, config: Config):
  loss_fn = make_loss_fn(setting, config)
  score = lambda p, x, y: loss_fn(p, x, y)[1]['accuracy']

  def evaluate(params, key, task_ids, images):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(task_ids)
    tasks = sample_tasks(keys, images, setting, config)

    def per_task(task):
      def body(p, _):
        p = maml.inner_adapt(loss_fn, p, task.support_x, task.support_y,
                             inner_lr=setting.inner_lr, num_inner_steps=1,
                             has_aux=True)
        return p, score(p, task.query_x, task.query_y)

      _, after = jax.lax.scan(body, params, None,
                              length=config.max_eval_steps)
      return jnp.concatenate(
          [score(params, task.query_x, task.query_y)[None], after])

    return jax.vmap(per_task)(tasks)

  task_ids = jax.ShapeDtypeStruct((config.eval_batch_size,), jnp.int32)
  return _compile(jax.jit(evaluate), _abstract_state(setting, config).params,
                  _abstract_key(),
                  task_ids, _images_shape(config, False))


def evaluate(params: Params, key: jax.Array, images: jax.Array,
             setting: Setting, config: Config,
             num_tasks: int) -> dict[str, Any]:
  """Accuracy on test tasks ``0 .. num_tasks - 1`` after 0..max steps.

  Returns:
    ``{'num_tasks', 'accuracy': [steps + 1], 'ci95': [steps + 1]}``: the
    mean over tasks and its 95% half-width ``1.96 std / sqrt(num_tasks)``,
    as the authors' ``main.py``.
  """
  fn = evaluation_fn(setting, config)
  batch = config.eval_batch_size
  acc = np.concatenate([
      np.asarray(fn(params, key, np.arange(start, start + batch,
                                           dtype=np.int32), images))
      for start in range(0, num_tasks, batch)]).astype(np.float64)
  return {'num_tasks': num_tasks,
          'accuracy': acc.mean(0).tolist(),
          'ci95': (1.96 * acc.std(0) / np.sqrt(num_tasks)).tolist()}


# ------------------------------------------------------------- the runs


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
    if s.shots + num_query(s, config) > NUM_DRAWERS:
      raise ValueError(
          f'{fn}: shots + num_query must be <= {NUM_DRAWERS} (drawers of a '
          f'character), got {s.shots + num_query(s, config)} ({s.name}).')
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
              ) -> tuple[Params, dict[str, Any]]:
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
    point = evaluate(params, test_key, test_images, setting, config,
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
    compile_train_chunk(setting, config)  # Cached for train_chunks.
    meta['compile_s'] += time.perf_counter() - start
    meta['sessions'] += 1
    device = utils.device_description()
    if device not in meta['devices']:
      meta['devices'].append(device)
    if not meta['curve']:
      add_curve_point(state.params)  # Iteration 0: the initial network.

  def train_chunk(state, iteration):
    start = time.perf_counter()
    state, (losses, accuracies) = compile_train_chunk(setting, config)(
        state, key_tasks, np.int32(iteration), train_images)
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
      init=lambda: compile_init(setting, config)(key_init),
      state_like=lambda: _restore_template(setting, config),
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
  images = load_omniglot(config.image_size, raw_dir, data_dir)
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
    final = evaluate(params, test_key, test_images, setting, config,
                     config.num_test_tasks)
    final_eval_s = time.perf_counter() - start
    steps = setting.paper_eval_steps
    record = {
        **dataclasses.asdict(setting),
        'name': setting.name,
        'num_query': num_query(setting, config),
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
                '%s)', setting.name, format_accuracy(record), steps,
                run['iterations'], format_paper(record))
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
  plot_results(results, os.path.join(workdir, RESULTS_PNG))
  return results


def _earlier_settings(path: str) -> dict[str, Any]:
  """The per-setting records of an earlier ``results.json``, if any."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return dict(json.load(f).get('settings', {}))


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


# ------------------------------------------------------------------ plots


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
