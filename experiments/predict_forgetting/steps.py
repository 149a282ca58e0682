r"""The network and the jitted protocol of one pair: train, predict, measure.

``make_model`` is the one-hidden-layer ReLU MLP in NTK parameterisation;
``forgetting`` predicts (``metacf.jacobian.predicted_forgetting``) and
measures (full-batch gradient descent on B) the forgetting of A at a
network trained on A. The protocol takes any ``apply_fn(params, x) -> [N,
C]``; the ``*_fn`` factories return its jitted forms, cached so that each
compiles once per model and setting.
"""

from collections.abc import Callable
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from experiments.common import models
from experiments.predict_forgetting import _tasks
from metacf import jacobian as jac

NUM_CLASSES = 10

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


# ------------------------------------------------------------------ model


class Model(NamedTuple):
  """``init(key) -> params`` and ``apply(params, x [N, 784]) -> [N, 10]``."""
  init: Callable[[jax.Array], Params]
  apply: ApplyFn


def _is_kernel(path) -> bool:
  return getattr(path[-1], 'key', None) == 'kernel'


@functools.cache
def make_model(width: int, bias_scale: float) -> Model:
  """The MLP ``784 -> width -> 10`` (ReLU) in NTK parameterisation.

  Cached, so that every call with the same arguments returns the same
  ``apply`` (and jitted functions built on it compile once).

  Args:
    width: Hidden units.
    bias_scale: Biases are ``bias_scale * beta``; ``beta`` starts at 0.
  """
  module = models.MLP(widths=(width,), num_classes=NUM_CLASSES)

  def init(key: jax.Array) -> Params:
    params = module.init(key, jnp.zeros([1, _tasks.NUM_PIXELS]))['params']
    # LeCun-normal kernels (variance 1 / fan_in) -> omega of variance 1.
    return jax.tree.map_with_path(
        lambda path, v: v * math.sqrt(v.shape[0]) if _is_kernel(path) else v,
        params)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    standard = jax.tree.map_with_path(
        lambda path, v: (v * (1 / math.sqrt(v.shape[0])) if _is_kernel(path)
                         else v * bias_scale), params)
    return module.apply({'params': standard}, x)

  return Model(init, apply)


# --------------------------------------------------------------- protocol
# Model-agnostic: any apply_fn(params, x) -> [N, C] (the tests run a model
# linear in its parameters through it, for which prediction is exact).


def targets(labels: jax.Array, loss: str, num_classes: int,
            dtype: Any) -> jax.Array:
  """What the loss compares outputs with: labels, or one-hot for ``'mse'``."""
  if loss == 'mse':
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return labels


def task_loss(outputs: jax.Array, target: jax.Array, loss: str) -> jax.Array:
  r"""Mean over examples of the per-example loss.

  ``'mse'``: :math:`\tfrac12 \sum_c (f_c - y_c)^2`; ``'cross_entropy'``:
  :math:`-\log \mathrm{softmax}(f)_y`. The definitions of
  ``metacf.jacobian.predicted_forgetting``, written out again here so that
  the measurement does not go through the code it checks.
  """
  if loss == 'mse':
    return jnp.mean(0.5 * jnp.sum((outputs - target)**2, axis=1))
  log_p = jax.nn.log_softmax(outputs, axis=1)
  return -jnp.mean(jnp.take_along_axis(log_p, target[:, None], axis=1))


def accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  hits = jnp.argmax(outputs, axis=1).astype(labels.dtype) == labels
  return jnp.mean(hits.astype(outputs.dtype))


def gradient_descent(apply_fn: ApplyFn, params: Params, x: jax.Array,
                     target: jax.Array, lr: jax.typing.ArrayLike, *,
                     num_steps: int, loss: str) -> Params:
  """``num_steps`` steps of full-batch GD, ``theta -= lr * grad L(theta)``.

  ``params`` are of one float dtype, to which ``lr`` is cast.
  """
  lr = jnp.asarray(lr, optax.tree.dtype(params))

  def step(p, _):
    grads = jax.grad(lambda q: task_loss(apply_fn(q, x), target, loss))(p)
    return optax.tree.sub(p, optax.tree.scale(lr, grads)), None

  params, _ = jax.lax.scan(step, params, None, length=num_steps)
  return params


def forgetting(apply_fn: ApplyFn, params_a: Params, x_a: jax.Array,
               labels_a: jax.Array, x_b: jax.Array, labels_b: jax.Array,
               lr: jax.typing.ArrayLike, *, num_steps: int, loss: str,
               num_classes: int,
               chunk_size: int | None = None) -> dict[str, jax.Array]:
  """Predicted and measured forgetting of A from training on B at ``params_a``.

  The prediction (``jac.predicted_forgetting`` at ``params_a``) and the
  measurement (``num_steps`` steps of ``gradient_descent`` on B, then A's
  loss again) run the same dynamics: for a model linear in its parameters
  they agree to rounding.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, num_classes]``.
    params_a: The network after task A (the linearisation point).
    x_a: A's examples on which forgetting is measured, ``[N_A, ...]``.
    labels_a: Their int labels ``[N_A]``.
    x_b: B's training examples ``[N_B, ...]``.
    labels_b: Their int labels ``[N_B]``.
    lr: Learning rate on B (may be traced; vmap over it for a sweep).
    num_steps: Gradient steps on B (static).
    loss: ``'cross_entropy'`` or ``'mse'`` (static).
    num_classes: Outputs ``C`` (static).
    chunk_size: Forwarded to ``predicted_forgetting`` (static).

  Returns:
    Scalars: ``predicted``; ``measured`` (``loss_a_after - loss_a_before``);
    ``loss_a_before``, ``loss_a_after``, ``accuracy_a_before``,
    ``accuracy_a_after``, ``accuracy_drop``; ``loss_b_before``,
    ``loss_b_after``, ``accuracy_b_after`` (B's training examples).
  """
  dtype = jnp.result_type(x_a)
  t_a = targets(labels_a, loss, num_classes, dtype)
  t_b = targets(labels_b, loss, num_classes, dtype)
  predicted = jac.predicted_forgetting(
      apply_fn, params_a, (x_a, t_a), (x_b, t_b), lr=lr,
      num_steps=num_steps, loss=loss, chunk_size=chunk_size)
  params_b = gradient_descent(apply_fn, params_a, x_b, t_b, lr,
                              num_steps=num_steps, loss=loss)
  f_a0, f_a1 = apply_fn(params_a, x_a), apply_fn(params_b, x_a)
  f_b0, f_b1 = apply_fn(params_a, x_b), apply_fn(params_b, x_b)
  loss_a0, loss_a1 = task_loss(f_a0, t_a, loss), task_loss(f_a1, t_a, loss)
  acc_a0, acc_a1 = accuracy(f_a0, labels_a), accuracy(f_a1, labels_a)
  return {
      'predicted': predicted,
      'measured': loss_a1 - loss_a0,
      'loss_a_before': loss_a0,
      'loss_a_after': loss_a1,
      'accuracy_a_before': acc_a0,
      'accuracy_a_after': acc_a1,
      'accuracy_drop': acc_a0 - acc_a1,
      'loss_b_before': task_loss(f_b0, t_b, loss),
      'loss_b_after': task_loss(f_b1, t_b, loss),
      'accuracy_b_after': accuracy(f_b1, labels_b),
  }


@functools.cache
def forgetting_fn(apply_fn: ApplyFn, *, num_steps: int, loss: str,
                  num_classes: int = NUM_CLASSES,
                  chunk_size: int | None = None, over_lrs: bool = False):
  """Jitted ``forgetting(params_a, x_a, labels_a, x_b, labels_b, lr)``.

  With ``over_lrs`` it is vmapped over ``lr [L]`` (every output ``[L]``);
  the NTK does not depend on ``lr``, so it is computed once.
  """
  fn = functools.partial(forgetting, apply_fn, num_steps=num_steps,
                         loss=loss, num_classes=num_classes,
                         chunk_size=chunk_size)
  if over_lrs:
    fn = jax.vmap(fn, in_axes=(None, None, None, None, None, 0))
  return jax.jit(fn)


@functools.cache
def train_fn(apply_fn: ApplyFn, *, num_steps: int, loss: str,
             num_classes: int = NUM_CLASSES):
  """Jitted ``train(params, x, labels, lr) -> params`` (full-batch GD)."""

  def train(params, x, labels, lr):
    target = targets(labels, loss, num_classes, jnp.result_type(x))
    return gradient_descent(apply_fn, params, x, target, lr,
                            num_steps=num_steps, loss=loss)

  return jax.jit(train)


@functools.cache
def evaluate_fn(apply_fn: ApplyFn, *, loss: str,
                num_classes: int = NUM_CLASSES):
  """Jitted ``evaluate(params, x, labels) -> (loss, accuracy)``."""

  def evaluate(params, x, labels):
    outputs = apply_fn(params, x)
    target = targets(labels, loss, num_classes, outputs.dtype)
    return task_loss(outputs, target, loss), accuracy(outputs, labels)

  return jax.jit(evaluate)


@functools.cache
def svd_fn(apply_fn: ApplyFn, *, k: int, method: str):
  """Jitted ``svd(params, x, key) -> jac.JacobianSVD`` (top ``k``)."""
  return jax.jit(lambda params, x, key: jac.jacobian_svd(
      apply_fn, params, x, k, method=method, key=key))


@functools.cache
def low_rank_fn(apply_fn: ApplyFn, *, k: int, method: str, num_steps: int,
                loss: str, num_classes: int = NUM_CLASSES):
  """Jitted rank-``k`` prediction ``(params, x_a, labels_a, x_b, labels_b,
  lr, key) -> scalar`` (``jac.predicted_forgetting_low_rank``)."""

  def predict(params, x_a, labels_a, x_b, labels_b, lr, key):
    dtype = jnp.result_type(x_a)
    return jac.predicted_forgetting_low_rank(
        apply_fn, params, (x_a, targets(labels_a, loss, num_classes, dtype)),
        (x_b, targets(labels_b, loss, num_classes, dtype)), k=k, lr=lr,
        num_steps=num_steps, loss=loss, method=method, key=key)

  return jax.jit(predict)
