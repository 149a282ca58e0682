"""Conv-4, MAML's jitted training chunk and the test-time evaluation.

Every compiled function is compiled ahead of time once per process, cached
on ``compiled_config(config)`` (the config without the fields they do not
depend on): a run with another seed, length or time budget compiles nothing
again.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import models
from experiments.maml_omniglot import data
from experiments.maml_omniglot.configs import Config
from experiments.maml_omniglot.configs import Setting
from metacf import maml

Params = Any


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState


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


def init_state(key: jax.Array, setting: Setting,
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
      tasks = data.sample_tasks(keys, images, setting, config)
      params, opt_state, metrics = meta_step(state.params, state.opt_state,
                                             tasks)
      return TrainState(params, opt_state), (metrics.loss,
                                             metrics.aux['accuracy'])

    iterations = first_iteration + jnp.arange(config.chunk_size,
                                              dtype=jnp.int32)
    return jax.lax.scan(body, state, iterations)

  return chunk


def compiled_config(config: Config) -> Config:
  """``config`` without the fields compiled functions do not depend on.

  The compiled functions are cached on it: a run with another seed, length
  or time budget compiles nothing again.
  """
  return dataclasses.replace(
      config, seed=0, settings=(), num_iterations=config.chunk_size,
      checkpoint_every=config.chunk_size, eval_schedule=(),
      num_curve_tasks=0, num_test_tasks=0, time_budget_s=None,
      progress_bar=False)




def compile_init(setting: Setting, config: Config):
  """AOT-compiled ``init(key) -> TrainState``; cached per process."""
  return _compile_init(setting, compiled_config(config))


@functools.cache
def _compile_init(setting: Setting, config: Config):
  init = functools.partial(init_state, setting=setting, config=config)
  return _compile(jax.jit(init), _abstract_key())


def compile_train_chunk(setting: Setting, config: Config):
  """AOT-compiles ``make_train_chunk`` (state donated); cached per process."""
  return _compile_train_chunk(setting, compiled_config(config))


@functools.cache
def _compile_train_chunk(setting: Setting, config: Config):
  start = jax.ShapeDtypeStruct((), jnp.int32)
  jitted = jax.jit(make_train_chunk(setting, config), donate_argnums=0)
  return _compile(jitted, _abstract_state(setting, config),
                  _abstract_key(), start, data.images_shape(config, True))


def _abstract_state(setting: Setting, config: Config) -> TrainState:
  return jax.eval_shape(
      functools.partial(init_state, setting=setting, config=config),
      _abstract_key())


def restore_template(setting: Setting, config: Config) -> TrainState:
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
  return _evaluation_fn(setting, compiled_config(config))


@functools.cache
def _evaluation_fn(setting: Setting, config: Config):
  loss_fn = make_loss_fn(setting, config)
  score = lambda p, x, y: loss_fn(p, x, y)[1]['accuracy']

  def evaluate(params, key, task_ids, images):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(task_ids)
    tasks = data.sample_tasks(keys, images, setting, config)

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
                  task_ids, data.images_shape(config, False))


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
