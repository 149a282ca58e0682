"""The MLP split into body and heads, and the jitted training and evaluation.

Task A trains ``models.MLP`` (body and A's head) with Adam, one jitted epoch
at a time (``a_fns``); each task B trains the leaves of its phase
(``TRAINABLE``) with SGD, all steps in one jitted ``lax.scan``
(``adapt_fn``). Accuracies and logits are computed in jitted chunks.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common.losses import cross_entropy
from experiments.common import models
from experiments.common import utils
from experiments.lwf_observability.configs import Config
from experiments.lwf_observability.data import NUM_CLASSES
from experiments.lwf_observability.data import NUM_PIXELS
import metacf.distill

METHODS = ('finetune', 'lwf')

Params = Any


# -------------------------------------------------------------------- model


def make_model(config: Config) -> models.MLP:
  """A's network: the shared body and A's head (``Dense_{len(widths)}``)."""
  return models.MLP(widths=tuple(config.widths), num_classes=NUM_CLASSES)


def split_mlp(params: Params, num_hidden: int) -> tuple[Params, Params]:
  """``models.MLP`` params -> ``(body {'Dense_0', ...}, head)``."""
  body = {f'Dense_{i}': params[f'Dense_{i}'] for i in range(num_hidden)}
  return body, params[f'Dense_{num_hidden}']


def features(body: Params, x: jax.Array) -> jax.Array:
  """The body: ``[Dense -> ReLU] * len(body)`` on ``[N, 784]``.

  The hidden layers of ``models.MLP`` (checked against it in the tests).
  """
  for i in range(len(body)):
    layer = body[f'Dense_{i}']
    x = jax.nn.relu(jnp.matmul(x, layer['kernel']) + layer['bias'][None])
  return x


def head_logits(head: Params, feats: jax.Array) -> jax.Array:
  """A linear head ``{'kernel', 'bias'}`` on features ``[N, width]``."""
  return jnp.matmul(feats, head['kernel']) + head['bias'][None]


def centred_logits(head: Params, feats: jax.Array) -> jax.Array:
  """Logits minus their mean over classes.

  Softmax, cross-entropy and the distillation loss do not see a shift of
  all logits; the Jacobians are taken of this softmax-invariant part.
  """
  logits = head_logits(head, feats)
  return logits - jnp.mean(logits, axis=-1, keepdims=True)


# ------------------------------------------------------------------- task A


@functools.cache
def a_fns(widths: tuple[int, ...], lr: float, total_steps: int):
  """Jitted ``init(key) -> state`` and ``epoch(state, x, y, idx)`` on A.

  Cached per process: a second run (a resumed or repeated one) compiles
  nothing again.
  """
  model = models.MLP(widths=widths, num_classes=NUM_CLASSES)
  tx = optax.adam(optax.cosine_decay_schedule(lr, total_steps))

  @jax.jit
  def init(key):
    params = model.init(key, jnp.zeros([1, NUM_PIXELS], jnp.float32))[
        'params']
    return {'params': params, 'opt_state': tx.init(params)}

  @jax.jit
  def epoch(state, x, y, idx):
    def step(state, batch_idx):
      def loss_fn(params):
        logits = model.apply({'params': params}, x[batch_idx])
        return jnp.mean(cross_entropy(logits, y[batch_idx]))
      loss, grads = jax.value_and_grad(loss_fn)(state['params'])
      updates, opt_state = utils.optimizer_update(tx, grads,
                                                  state['opt_state'],
                                                  state['params'])
      return {'params': optax.apply_updates(state['params'], updates),
              'opt_state': opt_state}, loss
    state, losses = jax.lax.scan(step, state, idx)
    return state, jnp.mean(losses)

  return init, epoch


# --------------------------------------------------------------- evaluation


@jax.jit
def _chunk_logits(body: Params, head: Params, x: jax.Array) -> jax.Array:
  return head_logits(head, features(body, x))


@jax.jit
def _chunk_correct(body: Params, head: Params, x: jax.Array, y: jax.Array,
                   mask: jax.Array) -> jax.Array:
  pred = jnp.argmax(head_logits(head, features(body, x)), axis=-1)
  return jnp.sum((pred == y) & mask, dtype=jnp.int32)


def predict_logits(body: Params, head: Params, x: jax.Array,
                   chunk: int) -> jax.Array:
  """Logits ``[N, 10]`` in jitted chunks of ``chunk`` (last one padded)."""
  out = []
  for batch, mask in utils.padded_batches({'x': np.asarray(x)}, chunk):
    out.append(np.asarray(_chunk_logits(body, head, batch['x']))[mask])
  return jax.device_put(np.concatenate(out), jax.devices()[0])


def accuracy(body: Params, head: Params, x: jax.Array, y: jax.Array,
             chunk: int) -> float:
  """Accuracy of ``head`` on ``(x, y)``, in jitted chunks (one compilation)."""
  arrays = {'x': np.asarray(x), 'y': np.asarray(y)}
  correct = sum(int(_chunk_correct(body, head, batch['x'], batch['y'], mask))
                for batch, mask in utils.padded_batches(arrays, chunk))
  return correct / len(arrays['y'])


# ------------------------------------------------------------------- task B


@functools.cache
def adapt_fn(kind: str, trainable_names: tuple[str, ...], lr: float,
             momentum: float, temperature: float, old_weight: float):
  """Jitted SGD on B: ``(params, recorded, x, y, idx) -> (params, losses)``.

  ``kind``: ``'ce'`` (B's cross-entropy) or ``'lwf'`` (``lwf_loss``);
  only the leaves ``trainable_names`` of ``params`` are trained, the others
  are passed through bitwise.
  """
  tx = optax.sgd(lr, momentum=momentum)

  def loss_fn(trainable, frozen, recorded, x, y):
    params = {**frozen, **trainable}
    feats = features(params['body'], x)
    new = head_logits(params['head_b'], feats)
    if kind == 'lwf':
      return jnp.mean(metacf.distill.lwf_loss(
          new, y, head_logits(params['head_a'], feats), recorded,
          temperature=temperature, old_weight=old_weight))
    return jnp.mean(cross_entropy(new, y))

  def adapt(params, recorded, x, y, idx):
    trainable = {n: params[n] for n in trainable_names}
    frozen = {n: v for n, v in params.items() if n not in trainable_names}

    def step(carry, batch_idx):
      trainable, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(
          trainable, frozen, recorded[batch_idx], x[batch_idx], y[batch_idx])
      updates, opt_state = utils.optimizer_update(tx, grads, opt_state,
                                                  trainable)
      return (optax.apply_updates(trainable, updates), opt_state), loss

    (trainable, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)),
                                          idx)
    return {**frozen, **trainable}, losses

  return jax.jit(adapt)


@functools.cache
def head_init_fn(widths: tuple[int, ...]):
  """Jitted ``key -> head``: a new head, as ``models.MLP`` initialises it."""
  model = models.MLP(widths=widths, num_classes=NUM_CLASSES)

  def init(key):
    params = model.init(key, jnp.zeros([1, NUM_PIXELS], jnp.float32))[
        'params']
    return split_mlp(params, len(widths))[1]

  return jax.jit(init)


# Leaves trained by each phase.
TRAINABLE = {
    'warmup': ('head_b',),
    'finetune': ('body', 'head_b'),
    'lwf': ('body', 'head_a', 'head_b'),
}


@jax.jit
def kl_a_on_b(recorded: jax.Array, current: jax.Array) -> jax.Array:
  """Mean KL(recorded || current) of A's head on B's inputs, T = 1."""
  return jnp.mean(metacf.distill.tempered_distillation_loss(
      current, recorded, 1.0))
