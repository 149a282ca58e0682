"""Losses the experiments' jitted steps share."""

import jax
import optax


def cross_entropy(logits: jax.typing.ArrayLike,
                  labels: jax.typing.ArrayLike) -> jax.Array:
  """Softmax cross-entropy against integer labels, per example (no mean).

  ``optax.losses.softmax_cross_entropy_with_integer_labels``; callers take
  the (masked) mean they need.

  Args:
    logits: ``[..., num_classes]``.
    labels: Integer class indices, ``[...]``.

  Returns:
    The loss of each example, shape ``[...]``.
  """
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits,
                                                                labels)
