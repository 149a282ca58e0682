"""Models, jitted training steps and test-time evaluation of every method.

``make_method(method, setting, config)`` returns a :class:`MethodFns`:
``init(key) -> TrainState``, ``steps`` (one or two jitted meta-updates
``step(state, key, progress, images) -> (state, loss)``; MAML++ has a
first-order and a second-order one) and ``score(params, key, task_ids,
images) -> accuracy [eval_batch_size]``. ``progress`` in [0, 1] is the
fraction of training done (seconds of the budget, or iterations): the
annealing schedules (Reptile's outer step, MAML++'s multi-step-loss
weights) are functions of it, so they work the same under a time budget.

Tasks are drawn on the device inside the jitted functions with
``experiments.maml_omniglot.data.sample_tasks``; the Conv-4 is
``experiments.common.models.Conv4`` (im2col convolutions, transductive
BatchNorm), and for MAML++ the same network with per-step BatchNorm
weights and biases (:class:`Conv4StepBN`).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import models
from experiments.common import utils
from experiments.maml_omniglot import configs as omniglot_configs
from experiments.maml_omniglot import data as omniglot_data
from experiments.meta_baselines.configs import Config
from experiments.meta_baselines.configs import Method
from metacf import layers
from metacf import maml

Params = Any


class TrainState(NamedTuple):
  params: Params        # MAML++: {'net': ..., 'lrs': ...}
  opt_state: optax.OptState


class MethodFns(NamedTuple):
  init: Callable[[jax.Array], TrainState]
  steps: tuple[Callable[..., Any], ...]  # jitted, not yet compiled
  score: Callable[..., jax.Array]        # jitted
  train_sampler: Callable[..., maml.Task]


# ------------------------------------------------------------------ data


def task_sampler(ways: int, shots: int, num_query: int, config: Config):
  """``sample(keys [num_tasks], images) -> Task``: ``maml_omniglot``'s tasks."""
  setting = omniglot_configs.Setting(
      ways=ways, shots=shots, meta_batch_size=1, inner_lr=0.0,
      num_inner_steps=1, paper_eval_steps=0)
  omniglot_config = omniglot_configs.Config(
      settings=(setting,), num_query=num_query, rotations=config.rotations,
      image_size=config.image_size)
  return functools.partial(omniglot_data.sample_tasks, setting=setting,
                           config=omniglot_config)


def images_shape(config: Config, train: bool) -> jax.ShapeDtypeStruct:
  num = (config.num_train_characters if train
         else 1623 - config.num_train_characters)
  return jax.ShapeDtypeStruct(
      (num, omniglot_data.NUM_DRAWERS, config.image_size ** 2), jnp.uint8)


# ---------------------------------------------------------------- models


class ConvEmbedding(nn.Module):
  """Conv-4 without its head: ``[batch, features]`` embeddings (ProtoNets).

  Layers and names as :class:`experiments.common.models.Conv4`
  (``num_layers`` blocks; 4 is Conv-4, fewer only for the smoke config).
  """
  features: int = 64
  num_layers: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv_blocks(x, self.features, self.num_layers)


def _conv_blocks(x: jax.Array, features: int, num_layers: int) -> jax.Array:
  """The conv blocks of Conv-4, flattened; called inside a compact method,
  so the layers (``conv{i}``, ``bn{i}``) belong to the calling module."""
  for i in range(num_layers):
    x = nn.Conv(features, (3, 3), padding='SAME',
                conv_general_dilated=layers.conv_general_dilated,
                name=f'conv{i}')(x)
    x = models.TransductiveBatchNorm(name=f'bn{i}')(x)
    x = layers.max_pool(nn.relu(x), (2, 2), (2, 2))
  return jnp.reshape(x, (x.shape[0], -1))


class ConvStepBN(nn.Module):
  """Conv-4 with per-step BatchNorm weights and biases (MAML++'s BNWB).

  BatchNorm ``i`` has ``scale`` and ``bias`` of shape ``[num_inner_steps +
  1, features]``; ``__call__(x, step)`` uses row ``step`` (a Python int or
  an int32 scalar): row ``s`` in inner step ``s``, row ``k`` for the query
  evaluation after ``k`` steps, as ``metacf.maml``'s ``pass_step=True``
  passes them. Statistics are the batch's (transductive); MAML++'s
  per-step running statistics (BNRS) are not used.
  """
  num_classes: int
  num_inner_steps: int
  features: int = 64
  num_layers: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, step: Any) -> jax.Array:
    rows = self.num_inner_steps + 1
    for i in range(self.num_layers):
      x = nn.Conv(self.features, (3, 3), padding='SAME',
                  conv_general_dilated=layers.conv_general_dilated,
                  name=f'conv{i}')(x)
      scale = self.param(f'bn{i}_scale', nn.initializers.ones,
                         (rows, self.features), jnp.float32)
      bias = self.param(f'bn{i}_bias', nn.initializers.zeros,
                        (rows, self.features), jnp.float32)
      x = layers.batch_norm(x, scale[step], bias[step])
      x = layers.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = jnp.reshape(x, (x.shape[0], -1))
    return nn.Dense(self.num_classes, name='head')(x)


def classification(logits: jax.Array, y: jax.Array):
  """``(mean cross-entropy, {'accuracy': ...})``."""
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
  return loss, {'accuracy': accuracy}


class ConvNet(nn.Module):
  """:class:`ConvEmbedding` then a Dense head: Conv-4's layers, any depth."""
  num_classes: int
  features: int = 64
  num_layers: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _conv_blocks(x, self.features, self.num_layers)
    return nn.Dense(self.num_classes, name='head')(x)


def conv4_loss_fn(ways: int, config: Config):
  """Conv-4 (``experiments.common.models.Conv4``) and its loss function."""
  if config.num_layers == 4:
    model = models.Conv4(num_classes=ways, features=config.features)
  else:  # The smoke config's shallower net (faster to compile).
    model = ConvNet(num_classes=ways, features=config.features,
                    num_layers=config.num_layers)

  def loss_fn(params, x, y):
    return classification(model.apply({'params': params}, x), y)

  return model, loss_fn


def step_bn_loss_fn(ways: int, num_inner_steps: int, config: Config):
  """MAML++'s ``loss_fn(params, x, y, *, step)`` (for ``pass_step=True``)."""
  model = ConvStepBN(num_classes=ways, num_inner_steps=num_inner_steps,
                     features=config.features, num_layers=config.num_layers)

  def loss_fn(params, x, y, *, step):
    return classification(model.apply({'params': params}, x, step), y)

  return model, loss_fn


def msl_weights(progress: jax.typing.ArrayLike, num_steps: int,
                anneal_fraction: float) -> jax.Array:
  """MAML++'s multi-step-loss weights at ``progress`` in [0, 1].

  Uniform ``1/S`` at the start; the non-final weights fall linearly to
  ``0.03/S`` (Antoniou et al.'s code's floor) over the first
  ``anneal_fraction`` of training while the final one takes the rest (they
  sum to 1); after that the final step only (``[0, ..., 0, 1]``), as their
  code does after ``multi_step_loss_num_epochs``.

  Returns:
    float32 ``[num_steps]``.
  """
  progress = jnp.asarray(progress, jnp.float32)
  t = jnp.clip(progress / anneal_fraction, 0.0, 1.0)
  non_final = jnp.maximum((1.0 - t) / num_steps, 0.03 / num_steps)
  annealing = jnp.concatenate([
      jnp.full((num_steps - 1,), non_final),
      (1.0 - (num_steps - 1) * non_final)[None]])
  final_only = jnp.zeros((num_steps,), jnp.float32).at[-1].set(1.0)
  return jnp.where(progress < anneal_fraction, annealing, final_only)


# ------------------------------------------------------------ the methods


def make_method(method: Method, setting: tuple[int, int],
                config: Config) -> MethodFns:
  """The init, jitted meta-update(s) and jitted scorer of ``method``."""
  ways, shots = setting
  size = config.image_size
  dummy = jnp.zeros((1, size, size, 1), jnp.float32)
  name = method.name
  if name == 'protonets':
    train_ways = method.train_ways or ways
    sample_train = task_sampler(train_ways, shots, config.train_query, config)
  elif name == 'reptile':
    sample_train = task_sampler(ways, method.train_shots or shots, 1, config)
  else:
    sample_train = task_sampler(ways, shots, config.train_query, config)
  sample_test = task_sampler(ways, shots, config.test_query, config)
  adam = optax.adam(method.outer_lr)
  steps, inner_lr = method.num_inner_steps, method.inner_lr

  def tasks_of(key, images, num_tasks):
    return sample_train(jax.random.split(key, num_tasks), images)

  # ---- ProtoNets
  if name == 'protonets':
    model = ConvEmbedding(features=config.features,
                          num_layers=config.num_layers)

    def episode_logits(params, task, num_classes):
      embed = lambda x: model.apply({'params': params}, x)
      return maml.prototype_logits(embed(task.support_x), task.support_y,
                                   embed(task.query_x), num_classes)

    def init(key):
      params = model.init(key, dummy)['params']
      return TrainState(params, adam.init(params))

    def proto_loss(params, tasks):
      logits = jax.vmap(lambda t: episode_logits(params, t, train_ways))(tasks)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits, tasks.query_y))

    def step(state, key, progress, images):
      del progress
      tasks = tasks_of(key, images, method.meta_batch_size)
      loss, grads = jax.value_and_grad(proto_loss)(state.params, tasks)
      updates, opt_state = utils.optimizer_update(
          adam, grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates),
                        opt_state), loss

    def score_task(params, task):
      logits = episode_logits(params, task, ways)
      return jnp.mean((jnp.argmax(logits, -1) == task.query_y).astype(
          jnp.float32))

    return _finish(init, (step,), score_task, sample_test, sample_train)

  # ---- MAML++: LSLR + multi-step loss + derivative-order annealing + BNWB
  if name == 'maml++':
    model, loss_fn = step_bn_loss_fn(ways, steps, config)

    def init(key):
      net = model.init(key, dummy, 0)['params']
      # LSLR: one learnable rate per layer (leaf) and step.
      lrs = jax.tree.map(lambda _: jnp.full((steps,), inner_lr, jnp.float32),
                         net)
      params = {'net': net, 'lrs': lrs}
      return TrainState(params, adam.init(params))

    def make_step(first_order):
      def meta_loss(params, tasks, weights):
        return maml.maml_loss(
            loss_fn, params['net'], tasks, inner_lr=params['lrs'],
            num_inner_steps=steps, per_step_inner_lr=True,
            step_weights=weights, pass_step=True, has_aux=True,
            first_order=first_order)

      def step(state, key, progress, images):
        tasks = tasks_of(key, images, method.meta_batch_size)
        weights = msl_weights(progress, steps, method.msl_fraction)
        (loss, _), grads = jax.value_and_grad(meta_loss, has_aux=True)(
            state.params, tasks, weights)
        updates, opt_state = utils.optimizer_update(
            adam, grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates),
                          opt_state), loss

      return step

    def score_task(params, task):
      net = maml.inner_adapt(loss_fn, params['net'], task.support_x,
                             task.support_y, inner_lr=params['lrs'],
                             num_inner_steps=steps, per_step_inner_lr=True,
                             pass_step=True, has_aux=True)
      _, aux = loss_fn(net, task.query_x, task.query_y, step=steps)
      return aux['accuracy']

    # Derivative-order annealing: steps[0] (first order) until
    # progress >= first_order_fraction, then steps[1] (second order).
    return _finish(init, (make_step(True), make_step(False)), score_task,
                   sample_test, sample_train)

  # ---- Conv-4 with a head: MAML, FOMAML, ANIL, iMAML, Reptile
  model, loss_fn = conv4_loss_fn(ways, config)

  def init(key):
    params = model.init(key, dummy)['params']
    opt = () if name == 'reptile' else adam.init(params)
    return TrainState(params, opt)

  def accuracy(params, task):
    return loss_fn(params, task.query_x, task.query_y)[1]['accuracy']

  if name in ('maml', 'fomaml', 'anil'):
    adapt_mask = 'head' if name == 'anil' else None
    meta_step = maml.make_meta_train_step(
        loss_fn, adam, inner_lr=inner_lr, num_inner_steps=steps,
        first_order=name == 'fomaml', adapt_mask=adapt_mask, donate=False,
        has_aux=True)

    def step(state, key, progress, images):
      del progress
      tasks = tasks_of(key, images, method.meta_batch_size)
      params, opt_state, metrics = meta_step(state.params, state.opt_state,
                                             tasks)
      return TrainState(params, opt_state), metrics.loss

    def score_task(params, task):
      adapted = maml.inner_adapt(
          loss_fn, params, task.support_x, task.support_y, inner_lr=inner_lr,
          num_inner_steps=method.num_eval_steps, adapt_mask=adapt_mask,
          has_aux=True)
      return accuracy(adapted, task)

  elif name == 'imaml':
    def step(state, key, progress, images):
      del progress
      tasks = tasks_of(key, images, method.meta_batch_size)
      (loss, _), grads = maml.imaml_grad(
          loss_fn, state.params, tasks, reg=method.reg, inner_lr=inner_lr,
          num_inner_steps=steps, cg_steps=method.cg_steps, has_aux=True)
      updates, opt_state = utils.optimizer_update(
          adam, grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates),
                        opt_state), loss

    def score_task(params, task):
      # The inner problem of training: GD on the proximally regularised
      # support loss, from the meta-parameters.
      def proximal(phi, x, y):
        loss, aux = loss_fn(phi, x, y)
        sq = sum(jnp.sum(jnp.square(p - t)) for p, t in zip(
            jax.tree.leaves(phi), jax.tree.leaves(params)))
        return loss + 0.5 * method.reg * sq, aux

      adapted = maml.inner_adapt(
          proximal, params, task.support_x, task.support_y,
          inner_lr=inner_lr, num_inner_steps=method.num_eval_steps,
          has_aux=True)
      return accuracy(adapted, task)

  elif name == 'reptile':
    # Nichol et al.: inner Adam with beta1 = 0; outer SGD step epsilon
    # annealed linearly from outer_lr to 0.
    inner_opt = optax.adam(inner_lr, b1=0.0)

    def step(state, key, progress, images):
      tasks = tasks_of(key, images, method.meta_batch_size)
      with jax.numpy_dtype_promotion('standard'):  # Adam: see utils.
        grads = maml.reptile_grad(loss_fn, state.params, tasks,
                                  inner_optimizer=inner_opt,
                                  num_inner_steps=steps, has_aux=True)
      eps = method.outer_lr * (1.0 - jnp.clip(progress, 0.0, 1.0))
      params = jax.tree.map(lambda p, g: p - eps * g, state.params, grads)
      # Reported loss: the support loss of the meta-parameters.
      loss = jnp.mean(jax.vmap(
          lambda t: loss_fn(state.params, t.support_x, t.support_y)[0])(
              tasks))
      return TrainState(params, state.opt_state), loss

    def score_task(params, task):
      with jax.numpy_dtype_promotion('standard'):  # Adam: see utils.
        adapted = maml.inner_adapt(
            loss_fn, params, task.support_x, task.support_y,
            inner_optimizer=inner_opt,
            num_inner_steps=method.num_eval_steps, has_aux=True)
      return accuracy(adapted, task)

  else:
    raise ValueError(f'make_method: unknown method {name!r}.')

  return _finish(init, (step,), score_task, sample_test, sample_train)


def _finish(init, steps, score_task, sample_test, sample_train) -> MethodFns:
  def score(params, key, task_ids, images):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(task_ids)
    tasks = sample_test(keys, images)
    return jax.vmap(lambda t: score_task(params, t))(tasks)

  return MethodFns(init,
                   tuple(jax.jit(s, donate_argnums=0) for s in steps),
                   jax.jit(score), sample_train)


def abstract_key() -> jax.ShapeDtypeStruct:
  return jax.eval_shape(jax.random.key, 0)


def compile_all(fns: MethodFns, config: Config
                ) -> tuple[Callable[..., Any], tuple[Any, ...], Any]:
  """AOT-compiles the step(s) and the scorer for ``config``'s shapes.

  ``init`` runs eagerly (compiling it took seconds for a call that takes
  less). With ``config.fast_compile``, XLA's backend optimisations are off:
  compiles about 2.5x faster, runs about 4x slower (the smoke config).
  """
  key = abstract_key()
  init = fns.init
  state = jax.eval_shape(fns.init, key)
  options = ({'xla_backend_optimization_level': 0,
              'xla_llvm_disable_expensive_passes': True}
             if config.fast_compile else {})
  progress = jax.ShapeDtypeStruct((), jnp.float32)
  steps = tuple(s.lower(state, key, progress, images_shape(config, True))
                .compile(compiler_options=options) for s in fns.steps)
  task_ids = jax.ShapeDtypeStruct((config.eval_batch_size,), jnp.int32)
  score = fns.score.lower(state.params, key, task_ids,
                          images_shape(config, False)).compile(
                              compiler_options=options)
  return init, steps, score


def evaluate(score, params: Params, key: jax.Array, images: jax.Array,
             num_tasks: int, batch: int) -> np.ndarray:
  """Per-task accuracies (float64 ``[num_tasks]``) of tasks 0..num_tasks-1."""
  return np.concatenate([
      np.asarray(score(params, key, np.arange(s, s + batch, dtype=np.int32),
                       images)) for s in range(0, num_tasks, batch)
  ]).astype(np.float64)


def mean_ci95(acc: np.ndarray) -> tuple[float, float]:
  """Mean and 95% half-width ``1.96 std / sqrt(n)`` (as Finn et al.'s code)."""
  return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(len(acc)))
