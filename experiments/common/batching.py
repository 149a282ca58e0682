"""Index batches drawn on the host, for jitted loops that gather on device.

A jitted training loop (``lax.scan`` over steps) takes the whole training
set once and, per step, a row of indices into it. These helpers draw those
rows on the host from a JAX key (through ``utils.numpy_rng``), so the order
follows the experiment's key tree and is the same on every device:

  >>> import jax
  >>> from experiments.common import batching
  >>> idx = batching.shuffled_indices(10, 4, 3, jax.random.key(0))
  >>> idx.shape, idx.dtype
  ((4, 3), dtype('int32'))
  >>> order = batching.epoch_indices(jax.random.key(0), 6, 2, 3)
  >>> order.shape, sorted(order[:2].ravel().tolist())
  ((4, 3), [0, 1, 2, 3, 4, 5])

For batches of the arrays themselves (a Python loop over a dataset), see
``utils.batches`` and ``utils.padded_batches``.
"""

import jax
import numpy as np

from experiments.common import utils


def shuffled_indices(population: int | np.ndarray, steps: int,
                     batch_size: int, key: jax.Array) -> np.ndarray:
  """``[steps, batch_size]`` int32 indices: back-to-back shuffles of a set.

  One ``numpy_rng(key)`` draws permutations of ``population`` one after the
  other (an epoch each, no reshuffle boundary at steps) until
  ``steps * batch_size`` indices are drawn; the last epoch is cut short.

  Args:
    population: ``num`` (indices ``range(num)``) or a 1-D array of indices
      (e.g. a K-shot subset of a training set).
    steps: Rows (training steps).
    batch_size: Indices per row.
    key: A typed JAX PRNG key.

  Returns:
    int32 ``[steps, batch_size]``.
  """
  subset = (np.arange(population) if np.ndim(population) == 0
            else np.asarray(population))
  rng = utils.numpy_rng(key)
  needed = steps * batch_size
  orders, drawn = [], 0
  while drawn < needed:
    orders.append(subset[rng.permutation(len(subset))])
    drawn += len(subset)
  return np.concatenate(orders)[:needed].reshape(steps, batch_size).astype(
      np.int32)


def epoch_indices(key: jax.Array, num_examples: int, num_epochs: int,
                  batch_size: int) -> np.ndarray:
  """``[num_epochs * num_examples // batch_size, batch_size]`` int32 indices.

  Epoch ``e`` is the permutation of ``range(num_examples)`` drawn by
  ``numpy_rng(jax.random.fold_in(key, e))``: each epoch has its own key, so
  an epoch's order does not depend on how many epochs came before.

  Args:
    key: A typed JAX PRNG key.
    num_examples: Examples per epoch; ``num_epochs * num_examples`` must be
      a multiple of ``batch_size``.
    num_epochs: Epochs.
    batch_size: Indices per row.

  Returns:
    int32 ``[num_epochs * num_examples // batch_size, batch_size]``.

  Raises:
    ValueError: if ``num_epochs * num_examples`` is not a multiple of
      ``batch_size``.
  """
  if (num_epochs * num_examples) % batch_size:
    raise ValueError(
        f'epoch_indices: num_epochs * num_examples must be a multiple of '
        f'batch_size ({batch_size}), got {num_epochs} * {num_examples}.')
  epochs = [utils.numpy_rng(jax.random.fold_in(key, e)).permutation(
      num_examples) for e in range(num_epochs)]
  return np.concatenate(epochs).reshape(-1, batch_size).astype(np.int32)
