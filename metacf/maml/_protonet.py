"""Prototypical networks (Snell et al. 2017): :func:`prototype_logits`.

Conventions in :mod:`metacf.maml`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks


def prototype_logits(support_embeddings: jax.Array, support_labels: jax.Array,
                     query_embeddings: jax.Array,
                     num_classes: int) -> jax.Array:
  r"""Prototypical-network logits: minus squared distances to class means.

  .. math::
    c_k = \frac{1}{|S_k|} \sum_{i \in S_k} f(x_i), \qquad
    \mathrm{logits}_{qk} = -\lVert f(q) - c_k \rVert^2

  ``optax.softmax_cross_entropy_with_integer_labels(logits, query_labels)``
  is the paper's loss; ``logits.argmax(-1)`` the nearest-prototype
  prediction. One episode; ``jax.vmap`` it over a batch of episodes.

  A class with no support example has no prototype: its logits are the most
  negative finite value of the dtype (``jnp.finfo(dtype).min``), so it gets
  probability 0 (exactly, after ``softmax``) and is never predicted, and no
  NaN appears in the logits, the loss or the gradients. A query labelled
  with such a class therefore has an infinite cross-entropy (probability 0;
  the gradients stay finite); in padded episodes (fewer ways than
  ``num_classes``), label queries with present classes only. If no class has
  a support example, all logits are that value (a uniform softmax).

  Examples:
    >>> emb = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    >>> labels = jnp.array([0, 0, 1])               # c_0 = (1, 0), c_1 = (0, 4)
    >>> metacf.maml.prototype_logits(emb, labels, jnp.array([[1.0, 1.0]]), 2)
    Array([[ -1., -10.]], dtype=float32)

  Args:
    support_embeddings: ``[S, D]`` embedded support examples (e.g. the
      Conv-4's features).
    support_labels: ``[S]`` integer labels in ``[0, num_classes)``.
    query_embeddings: ``[Q, D]`` embedded query examples.
    num_classes: Number of classes ``K`` of the episode (static).

  Returns:
    ``[Q, K]`` logits, in the embeddings' (promoted) dtype.

  Raises:
    ValueError: if the embeddings are not 2-D with the same ``D``, the labels'
      shape is not ``[S]``, ``num_classes < 1``, or (eagerly, and under
      :func:`metacf.runtime_checks`) a label is outside ``[0, num_classes)``.
    TypeError: if the labels are not integers.

  References:
    Snell, Swersky & Zemel, `Prototypical Networks for Few-shot Learning
    <https://arxiv.org/abs/1703.05175>`_, 2017
  """
  fn = 'prototype_logits'
  num_classes = checks.check_int(num_classes, 'num_classes', fn, min_value=1)
  s_shape = np.shape(support_embeddings)
  q_shape = np.shape(query_embeddings)
  if len(s_shape) != 2:
    raise ValueError(
        f'{fn}: support_embeddings must be [num_support, dim], got shape '
        f'{s_shape}.')
  if len(q_shape) != 2 or q_shape[1] != s_shape[1]:
    raise ValueError(
        f'{fn}: query_embeddings must be [num_query, {s_shape[1]}] (the dim '
        f'of support_embeddings), got shape {q_shape}.')
  if np.shape(support_labels) != s_shape[:1]:
    raise ValueError(
        f'{fn}: support_labels must have shape {s_shape[:1]} (one label per '
        f'row of support_embeddings), got {np.shape(support_labels)}.')
  checks.check_integer(support_labels, 'support_labels', fn)
  checks.check_labels(support_labels, num_classes, 'support_labels', fn)

  dtype = jnp.result_type(support_embeddings, query_embeddings)
  support = jnp.asarray(support_embeddings, dtype)
  query = jnp.asarray(query_embeddings, dtype)
  one_hot = jax.nn.one_hot(support_labels, num_classes, dtype=dtype)  # [S, K]
  counts = one_hot.sum(0)                                             # [K]
  has_support = counts > 0
  prototypes = (one_hot.T @ support) / jnp.maximum(counts, 1)[:, None]
  # The direct difference, not |q|^2 - 2 q.c + |c|^2: exact to rounding
  # (no cancellation); [Q, K, D] is small for few-shot episodes.
  sq_dist = jnp.sum((query[:, None, :] - prototypes[None, :, :]) ** 2, -1)
  return jnp.where(has_support, -sq_dist, _most_negative(dtype))


def _most_negative(dtype: Any) -> jax.Array:
  return jnp.asarray(jnp.finfo(dtype).min, dtype)
