"""Continual-learning metrics over an accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training through task ``i``
(``T`` tasks, ``R`` of shape ``[T, T]``; entries above the diagonal are the
zero-shot accuracies on tasks not trained yet). Tasks are 0-indexed; the
"previous tasks" are ``j = 0 .. T-2``, as in GEM, Mammoth and Avalanche.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.typing.ArrayLike


def _check_matrix(r: ArrayLike, fn: str, min_tasks: int = 1) -> jax.Array:
  shape = np.shape(r)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(
        f'{fn}: accuracy_matrix must be square [num_tasks, num_tasks], got '
        f'shape {shape}.')
  if shape[0] < min_tasks:
    raise ValueError(
        f'{fn}: accuracy_matrix must cover at least {min_tasks} tasks, got '
        f'{shape[0]}.')
  r = jnp.asarray(r)
  if not jnp.issubdtype(r.dtype, jnp.floating):
    r = r.astype(jnp.float32)
  return r


def average_accuracy(accuracy_matrix: ArrayLike) -> jax.Array:
  """Mean accuracy over all tasks after training on the last one.

  ``ACC = mean_j R[T-1, j]`` (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

  Args:
    accuracy_matrix: ``R``, shape ``[T, T]``.

  Returns:
    A scalar.

  Raises:
    ValueError: if ``accuracy_matrix`` is not square.
  """
  r = _check_matrix(accuracy_matrix, 'average_accuracy')
  return jnp.mean(r[-1])


def backward_transfer(accuracy_matrix: ArrayLike) -> jax.Array:
  """Backward transfer, ``mean_{j < T-1} R[T-1, j] - R[j, j]``.

  Negative values measure forgetting: how much training on later tasks
  changed the accuracy on earlier ones.

  Args:
    accuracy_matrix: ``R``, shape ``[T, T]``, ``T >= 2``.

  Returns:
    A scalar.

  Raises:
    ValueError: if ``accuracy_matrix`` is not square or has fewer than 2 tasks.

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, 2017
  """
  r = _check_matrix(accuracy_matrix, 'backward_transfer', 2)
  t = r.shape[0]
  return jnp.mean(r[-1, :t - 1] - jnp.diagonal(r)[:t - 1])


def forward_transfer(accuracy_matrix: ArrayLike,
                     baseline: ArrayLike) -> jax.Array:
  """Forward transfer, ``mean_{j >= 1} R[j-1, j] - baseline[j]``.

  The accuracy on task ``j`` before training on it, relative to a baseline
  (usually a randomly initialised model's accuracy on each task).

  Args:
    accuracy_matrix: ``R``, shape ``[T, T]``, ``T >= 2``.
    baseline: Per-task baseline accuracies, shape ``[T]``.

  Returns:
    A scalar.

  Raises:
    ValueError: on a non-square matrix, fewer than 2 tasks, or a baseline of
      the wrong shape.

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, 2017
  """
  fn = 'forward_transfer'
  r = _check_matrix(accuracy_matrix, fn, 2)
  t = r.shape[0]
  if np.shape(baseline) != (t,):
    raise ValueError(
        f'{fn}: baseline must have shape ({t},), got {np.shape(baseline)}.')
  b = jnp.asarray(baseline, r.dtype)
  return jnp.mean(jnp.diagonal(r, offset=1) - b[1:])


def forgetting(accuracy_matrix: ArrayLike, *,
               reference: Literal['max', 'diagonal'] = 'max') -> jax.Array:
  """Average forgetting of the tasks before the last.

  * ``reference='max'`` (Chaudhry et al. 2018, as in Mammoth):
    ``mean_{j < T-1} max_{l < T-1} R[l, j] - R[T-1, j]``, the drop from the
    best accuracy ever reached on task ``j`` before the last task.
  * ``reference='diagonal'`` (as in Avalanche):
    ``mean_{j < T-1} R[j, j] - R[T-1, j]``, the drop from the accuracy right
    after training on task ``j``.

  Args:
    accuracy_matrix: ``R``, shape ``[T, T]``, ``T >= 2``.
    reference: ``'max'`` or ``'diagonal'``.

  Returns:
    A scalar (positive when accuracy was lost).

  Raises:
    ValueError: on a non-square matrix, fewer than 2 tasks, or an unknown
      ``reference``.

  References:
    Chaudhry et al., `Riemannian Walk for Incremental Learning: Understanding
    Forgetting and Intransigence <https://arxiv.org/abs/1801.10112>`_, 2018
  """
  fn = 'forgetting'
  if reference not in ('max', 'diagonal'):
    raise ValueError(
        f"{fn}: reference must be 'max' or 'diagonal', got {reference!r}.")
  r = _check_matrix(accuracy_matrix, fn, 2)
  t = r.shape[0]
  if reference == 'max':
    best = jnp.max(r[:t - 1, :t - 1], axis=0)
  else:
    best = jnp.diagonal(r)[:t - 1]
  return jnp.mean(best - r[-1, :t - 1])
