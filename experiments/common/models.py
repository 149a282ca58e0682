"""Models shared by the experiments (flax linen).

The library itself is model-agnostic: kernels take any ``apply_fn(params, x)``.
Models live here, one place for all experiments, as in flax's examples. A linen
module enters a kernel as ``apply_fn = lambda p, x: model.apply({'params': p},
x)``.

Example:

  model = MLP(widths=(800, 800))
  params = model.init(jax.random.key(0), jnp.zeros([1, 28, 28, 1]))['params']
  logits = model.apply({'params': params}, images)  # [batch, 10]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metacf import layers


class MLP(nn.Module):
  """Fully connected ReLU classifier on flattened inputs.

  ``flatten -> [Dense -> ReLU -> Dropout] * len(widths) -> Dense``. Dropout is
  active only with ``train=True`` and a positive rate, and then needs a
  ``'dropout'`` PRNG key: ``model.apply(variables, x, train=True,
  rngs={'dropout': key})``.

  Attributes:
    widths: Number of units of each hidden layer, e.g. ``(1200, 1200)``.
    num_classes: Number of output logits.
    dropout_rate: Probability of dropping a hidden unit during training.
    input_dropout_rate: Probability of dropping an input pixel during training.
  """
  widths: Sequence[int]
  num_classes: int = 10
  dropout_rate: float = 0.0
  input_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, train: bool = False
               ) -> jax.Array:
    """Returns logits of shape ``[batch, num_classes]``.

    Args:
      x: Inputs of shape ``[batch, ...]``, flattened to ``[batch, features]``.
      train: Whether dropout is active.
    """
    x = jnp.reshape(x, (jnp.shape(x)[0], -1))
    if self.input_dropout_rate > 0:
      x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class TransductiveBatchNorm(nn.Module):
  """BatchNorm with the statistics of the batch at hand, no running averages.

  MAML's BatchNorm (Finn et al. 2017): inside ``maml_loss`` the support set's
  statistics are used in the inner loop and the query set's in the outer
  loss; there is no model state to thread. ``scale``/``bias`` are parameters.
  ``fast=False`` computes the textbook formula with ``jnp`` (autodiff through
  the mean and variance) instead of :func:`metacf.layers.batch_norm`.
  """
  epsilon: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32  # As flax's layers (also under x64).
  fast: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,),
                       self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,),
                      self.param_dtype)
    if self.fast:
      return layers.batch_norm(x, scale, bias, epsilon=self.epsilon)
    # The textbook formula, differentiated by autodiff: the reference.
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon)
            * scale.reshape((1,) * (x.ndim - 1) + (-1,))
            + bias.reshape((1,) * (x.ndim - 1) + (-1,)))


class Conv4(nn.Module):
  """The few-shot Conv-4 (Vinyals et al. 2016; Finn et al. 2017).

  ``[conv 3x3 'SAME' -> BatchNorm (transductive) -> ReLU -> max-pool 2x2] x
  4 -> Dense``; 28x28 inputs end at 1x1xfeatures. With ``fast=True`` the
  convolutions, BatchNorms and pools are :mod:`metacf.layers` (im2col +
  matmul, closed-form BatchNorm derivative, max-pool by selects), which stay
  fast under ``vmap`` with per-task weights; with ``fast=False`` they are
  flax's defaults (``lax.conv_general_dilated``, ``reduce_window``) and the
  textbook BatchNorm formula. Both compute the same function.

  Attributes:
    num_classes: Number of output logits (the ways).
    features: Channels of every conv layer.
    fast: Use :mod:`metacf.layers` (default) or flax's conv and pool.
  """
  num_classes: int
  features: int = 64
  fast: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns logits ``[batch, num_classes]`` for images ``[batch, H, W, C]``."""
    conv = layers.conv_general_dilated if self.fast else None
    pool = layers.max_pool if self.fast else nn.max_pool
    for i in range(4):
      x = nn.Conv(self.features, (3, 3), padding='SAME',
                  conv_general_dilated=conv, name=f'conv{i}')(x)
      x = TransductiveBatchNorm(fast=self.fast, name=f'bn{i}')(x)
      x = pool(nn.relu(x), (2, 2), (2, 2))
    x = jnp.reshape(x, (x.shape[0], -1))
    return nn.Dense(self.num_classes, name='head')(x)
