"""The tasks' data: subsets of MNIST / Fashion-MNIST, rotated or permuted.

A task's examples depend only on the experiment's root key, the task's name
and its role (``'a'``: learnt first, ``'b'``: learnt second), so a task
shared by several pairs (MNIST, the A of every rotation pair) has the same
examples in all of them, and a run resumed in another process rebuilds them
bitwise. A-roles draw training examples from the first half of the training
split, B-roles from the second half: the two tasks of a pair never share an
image, even when they are the same task (rotation by 0 degrees).

Images become float32 vectors ``[N, 784]``: pixels in ``[0, 1]``, rotated
(bilinear, about the image centre, zero fill) and/or permuted, then
standardised with MNIST's pixel mean and standard deviation, the same
constants for every task, so that no task is told apart by its input
statistics.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import utils
from experiments.predict_forgetting.configs import Config
from experiments.predict_forgetting.configs import Task

# MNIST training-set pixel statistics (of values in [0, 1]).
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081
IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
ROLES = ('a', 'b')

Splits = Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]


class TaskData(NamedTuple):
  """The examples of one task in one role."""
  x_train: jax.Array  # [num_train, 784], float32
  y_train: jax.Array  # [num_train], int32
  x_eval: jax.Array   # [num_eval, 784], float32 (test split)
  y_eval: jax.Array   # [num_eval], int32


def rotate(images: jax.typing.ArrayLike, degrees: float) -> jax.Array:
  """Rotates ``[N, H, W]`` images counterclockwise about their centre.

  Bilinear interpolation (``jax.scipy.ndimage.map_coordinates``, order 1);
  pixels from outside the image are 0. Deterministic; a rotation by 0 is the
  identity.

  Args:
    images: ``[N, H, W]`` float images.
    degrees: Angle, counterclockwise as displayed (row index downwards).

  Returns:
    Rotated images, same shape and dtype.
  """
  images = jnp.asarray(images)
  _, height, width = images.shape
  theta = np.deg2rad(degrees)
  cy, cx = (height - 1) / 2, (width - 1) / 2
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing='ij')
  # Output pixel (r, c) reads the input at the point rotated back by theta
  # (rounded, so that multiples of 90 degrees read whole pixels).
  src_rows = np.cos(theta) * (rows - cy) + np.sin(theta) * (cols - cx) + cy
  src_cols = -np.sin(theta) * (rows - cy) + np.cos(theta) * (cols - cx) + cx
  coords = [jnp.asarray(src_rows.round(9), images.dtype),
            jnp.asarray(src_cols.round(9), images.dtype)]
  return jax.vmap(lambda im: jax.scipy.ndimage.map_coordinates(
      im, coords, order=1, mode='constant', cval=0.0))(images)


def to_vectors(images: np.ndarray, rotation: float = 0.0,
               permutation: np.ndarray | None = None) -> np.ndarray:
  """uint8 ``[N, 28, 28, 1]`` -> standardised float32 ``[N, 784]``, in NumPy.

  Rotated by ``rotation`` degrees (:func:`rotate`; none for multiples of
  360), then the pixels reordered by ``permutation`` (indices into the 784,
  or None), then standardised with :data:`PIXEL_MEAN` and :data:`PIXEL_STD`.
  The transformation of ``prevent_forgetting`` and ``meta_continual``.
  """
  x = images[..., 0].astype(np.float32) / 255.0
  if rotation % 360:
    x = np.asarray(rotate(x, rotation))
  x = x.reshape(x.shape[0], NUM_PIXELS)
  if permutation is not None:
    x = x[:, permutation]
  return ((x - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


def partial_permutation(key: jax.Array, size: int,
                        fraction: float) -> np.ndarray:
  """A permutation of ``range(size)`` that moves ``round(fraction * size)``
  randomly chosen positions among themselves (the rest stay put)."""
  rng = utils.numpy_rng(key)
  count = int(round(fraction * size))
  positions = np.sort(rng.choice(size, count, replace=False))
  perm = np.arange(size)
  perm[positions] = positions[rng.permutation(count)]
  return perm


def transform(task: Task, images: np.ndarray, key: jax.Array) -> jax.Array:
  """uint8 ``[N, 28, 28, 1]`` -> standardised float32 ``[N, 784]``."""
  x = jnp.asarray(images[..., 0], jnp.float32) / 255.0
  if task.rotation:
    x = rotate(x, task.rotation)
  x = x.reshape(x.shape[0], NUM_PIXELS)
  if task.permuted_fraction:
    perm = partial_permutation(utils.name_key(key, 'permutation', task.name),
                               NUM_PIXELS, task.permuted_fraction)
    x = x[:, perm]
  return (x - PIXEL_MEAN) / PIXEL_STD


def _draw(split: Mapping[str, np.ndarray], digits: tuple[int, ...],
          pool: slice, count: int, key: jax.Array) -> np.ndarray:
  """Indices of ``count`` random examples of ``digits`` in ``split[pool]``.

  A random order of the whole pool cut to ``count``, so fewer examples are
  a prefix of more.
  """
  labels = split['label'][pool]
  members = np.flatnonzero(np.isin(labels, digits)) + (pool.start or 0)
  if count > len(members):
    raise ValueError(f'_draw: asked for {count} examples of digits {digits}, '
                     f'the pool has {len(members)}.')
  return members[utils.numpy_rng(key).permutation(len(members))[:count]]


def make_task_data(task: Task, role: str, splits: Splits, *, num_train: int,
                   num_eval: int, key: jax.Array) -> TaskData:
  """The training and held-out examples of ``task`` in ``role``.

  Args:
    task: The task.
    role: ``'a'`` (training examples from the first half of the training
      split) or ``'b'`` (from the second half).
    splits: ``{dataset: (train, test)}`` as ``utils.load_image_splits``
      returns them.
    num_train: Training examples.
    num_eval: Held-out examples, from the test split.
    key: The experiment's root key.

  Raises:
    ValueError: on an unknown role, or too few examples of the digits.
  """
  if role not in ROLES:
    raise ValueError(f'make_task_data: role must be one of {ROLES}, got '
                     f'{role!r}.')
  train, test = splits[task.dataset]
  half = len(train['label']) // 2
  pool = slice(0, half) if role == 'a' else slice(half, None)
  key_train = utils.name_key(key, 'train', task.name, role)
  key_eval = utils.name_key(key, 'eval', task.name, role)
  idx_train = _draw(train, task.digits, pool, num_train, key_train)
  idx_eval = _draw(test, task.digits, slice(0, None), num_eval, key_eval)
  return TaskData(
      x_train=transform(task, train['image'][idx_train], key),
      y_train=jnp.asarray(train['label'][idx_train], jnp.int32),
      x_eval=transform(task, test['image'][idx_eval], key),
      y_eval=jnp.asarray(test['label'][idx_eval], jnp.int32))


def take(data: TaskData, num_train: int, num_eval: int) -> TaskData:
  """The first ``num_train`` / ``num_eval`` examples (a smaller draw)."""
  return TaskData(data.x_train[:num_train], data.y_train[:num_train],
                  data.x_eval[:num_eval], data.y_eval[:num_eval])


def load_splits(config: Config, *, raw_dir: str | None = None,
                data_dir: str | None = None) -> Splits:
  """``{dataset: (train, test)}`` for every dataset the pairs use."""
  datasets = sorted({t.dataset for p in config.pairs
                     for t in (p.task_a, p.task_b)})
  return {d: utils.load_image_splits(d, raw_dir=raw_dir, data_dir=data_dir)
          for d in datasets}
