"""Jitted steps of the distillation study: init, train (CE or KD), predict.

The jitted functions are built per architecture (``recipes.arch``: a hashable
tuple) and cached, so the models that can share one compile it once per
process.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import models
from experiments.common import utils
from experiments.distill_mnist import data
import metacf.distill

Params = Any


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState


def make_optimizer(learning_rate: float, total_steps: int
                   ) -> optax.GradientTransformation:
  """Adam with the learning rate cosine-decayed to 0 over ``total_steps``."""
  schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  return optax.adam(schedule)


def make_init_state(model: models.MLP,
                    optimizer: optax.GradientTransformation):
  """Returns the jitted ``init_state(key, images) -> TrainState``."""

  def init_state(key, images):
    params = model.init(key, data.preprocess(images))['params']
    return TrainState(params, optimizer.init(params))

  return jax.jit(init_state)


def make_train_step(model: models.MLP, optimizer: optax.GradientTransformation,
                    *, jitter: int, distill: bool,
                    teacher: models.MLP | None = None):
  """Returns the jitted ``train_step``.

  ``train_step(state, batch, key, temperature, alpha, teacher_params) ->
  (state, loss)`` donates ``state``. ``batch`` holds ``'image'`` (uint8
  ``[B, 28, 28, 1]``), ``'label'`` (int32 ``[B]``) and, if ``distill``
  without ``teacher``, the precomputed ``'teacher_logits'`` (float32
  ``[B, 10]``). ``key`` drives jitter and dropout. ``temperature`` and
  ``alpha`` (float32 scalars; ignored unless ``distill``) are arguments
  rather than constants so that students differing only in them share one
  compiled step. ``teacher_params`` is None unless ``teacher`` is given.

  Args:
    model: The network.
    optimizer: Its optimiser.
    jitter: Largest random shift of the training images, in pixels.
    distill: Train on ``alpha * T^2 KL + (1 - alpha) * CE`` instead of CE.
    teacher: If given, the teacher's logits are computed in the step, on the
      same jittered images the student sees (precomputed logits would be of
      the un-jittered images).
  """

  def loss_fn(params, batch, key, temperature, alpha, teacher_params):
    key_jitter, key_dropout = jax.random.split(key)
    images = batch['image']
    if jitter:
      images = utils.random_translate(key_jitter, images, jitter)
    images = data.preprocess(images)
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': key_dropout})
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label'])
    if distill:
      if teacher is None:
        teacher_logits = batch['teacher_logits']
      else:
        teacher_logits = teacher.apply({'params': teacher_params}, images)
      soft = metacf.distill.tempered_distillation_loss(
          logits, teacher_logits, temperature)
      loss = alpha * soft + (1.0 - alpha) * loss
    return jnp.mean(loss)

  def train_step(state, batch, key, temperature, alpha, teacher_params):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key,
                                              temperature, alpha,
                                              teacher_params)
    updates, opt_state = utils.optimizer_update(optimizer, grads,
                                                state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state), loss

  return jax.jit(train_step, donate_argnums=0)


def make_predict_fn(model: models.MLP):
  """Returns the jitted ``predict(params, images) -> logits`` (no dropout)."""

  def predict(params, images):
    return model.apply({'params': params}, data.preprocess(images), train=False)

  return jax.jit(predict)


# The jitted functions are cached by everything they close over, so models
# that can share one (the distilled students differ only in temperature; the
# teacher and the born-again student share init and predict) compile it once
# per process, not once per model or per call of train_and_evaluate.


@functools.cache
def init_state_fn(arch: tuple[Any, ...]):
  # Adam's state does not depend on the schedule: any total_steps will do.
  return make_init_state(mlp(arch), make_optimizer(1.0, 1))


@functools.cache
def train_step_fn(arch: tuple[Any, ...], jitter: int, distill: bool,
                  teacher_arch: tuple[Any, ...] | None, learning_rate: float,
                  total_steps: int):
  return make_train_step(
      mlp(arch), make_optimizer(learning_rate, total_steps), jitter=jitter,
      distill=distill,
      teacher=None if teacher_arch is None else mlp(teacher_arch))


@functools.cache
def predict_fn(arch: tuple[Any, ...]):
  return make_predict_fn(mlp(arch))


def mlp(arch: tuple[Any, ...]) -> models.MLP:
  widths, dropout, input_dropout = arch
  return models.MLP(widths=widths, num_classes=data.NUM_CLASSES,
                    dropout_rate=dropout, input_dropout_rate=input_dropout)


def predict_logits(predict_fn, params: Params, images: np.ndarray,
                   batch_size: int) -> np.ndarray:
  """Logits for all ``images``, float32 ``[N, 10]``, in fixed-size batches."""
  outputs = []
  for batch, mask in utils.padded_batches({'image': images}, batch_size):
    outputs.append(np.asarray(predict_fn(params, batch['image']))[mask])
  return np.concatenate(outputs)


def count_errors(predict_fn, params: Params, images: np.ndarray,
                 labels: np.ndarray, batch_size: int) -> int:
  """Number of misclassified ``images``."""
  logits = predict_logits(predict_fn, params, images, batch_size)
  return int(np.sum(np.argmax(logits, axis=-1) != labels))
