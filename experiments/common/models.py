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
