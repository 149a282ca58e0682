"""The tasks' data: MNIST for A; each task B from real data (noise: synthetic).

Images become standardised float32 vectors ``[N, 784]`` (MNIST's pixel mean
and std for every task) and go to the device once. A draws its training
images from the first half of MNIST's training split, the MNIST-based Bs
from the second; every draw depends only on ``config.seed`` and the task's
name.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import utils
from experiments.lwf_observability.configs import Config
from experiments.predict_forgetting import _tasks

NUM_CLASSES = 10
IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
# MNIST's training split: A draws from the first half, MNIST-based Bs from
# the second, so A and B never share an image.
MNIST_HALF = 30000
OMNIGLOT_DRAWERS = 20
OMNIGLOT_TRAIN_DRAWERS = 16
# Omniglot's 105x105 images are zero-padded to 112 = 4 * 28 and averaged
# over 4x4 blocks (area downsampling keeps the thin strokes).
OMNIGLOT_PAD = (3, 4)


class TaskData(NamedTuple):
  """One task's images (standardised, flattened) and labels, on device."""
  x_train: jax.Array  # [num_train, 784], float32.
  y_train: jax.Array  # [num_train], int32.
  x_test: jax.Array   # [num_test, 784], float32.
  y_test: jax.Array   # [num_test], int32.


def standardise(images: np.ndarray) -> np.ndarray:
  """Pixels in [0, 1], ``[N, 28, 28]`` -> float32 ``[N, 784]``, MNIST's
  mean and std.

  The same constants for every task, so that no task is told apart by its
  input statistics (as ``experiments.predict_forgetting``). NumPy on the
  host: no compilation per shape.
  """
  x = np.asarray(images, np.float32).reshape(-1, NUM_PIXELS)
  return ((x - np.float32(_tasks.PIXEL_MEAN))
          / np.float32(_tasks.PIXEL_STD)).astype(np.float32)


def _draw(rng_key: jax.Array, pool: np.ndarray, count: int,
          what: str) -> np.ndarray:
  """``count`` indices from ``pool`` in a random order (prefix-stable)."""
  if count > len(pool):
    raise ValueError(f'_draw: asked for {count} {what}, there are '
                     f'{len(pool)}.')
  return pool[utils.numpy_rng(rng_key).permutation(len(pool))[:count]]


def _to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 ``[N, 28, 28, 1]`` -> float32 ``[N, 28, 28]`` in [0, 1]."""
  return images[..., 0].astype(np.float32) / 255.0


def omniglot_alphabets(num_alphabets: int, *, raw_dir: str | None,
                       data_dir: str | None) -> dict[str, np.ndarray]:
  """Omniglot's background split as a ten-class alphabet task, 28x28.

  The first ``num_alphabets`` alphabets (by index) of the split; strokes
  white (1) on black (0) like MNIST; 105x105 zero-padded to 112x112 and
  averaged over 4x4 blocks. Drawers ``0..15`` of every character are the
  training images, ``16..19`` the test images (unseen drawers). Cached per
  process (read-only arrays).

  Returns:
    ``{'train_image', 'train_label', 'test_image', 'test_label'}``: float32
    ``[N, 28, 28]`` in [0, 1] and int32 alphabet ranks.

  Raises:
    ValueError: if the split is not ordered by character, 20 drawers each.
  """
  return _omniglot_alphabets(num_alphabets, raw_dir, data_dir)


@functools.cache
def _omniglot_alphabets(num_alphabets: int, raw_dir: str | None,
                        data_dir: str | None) -> dict[str, np.ndarray]:
  import metacf.data  # pylint: disable=g-import-not-at-top  # needs tfds
  arrays = metacf.data.load_arrays('omniglot', 'background', raw_dir=raw_dir,
                                   data_dir=data_dir)
  labels = np.asarray(arrays.labels)
  num_chars = len(labels) // OMNIGLOT_DRAWERS
  if not np.array_equal(labels, np.repeat(np.arange(num_chars),
                                          OMNIGLOT_DRAWERS)):
    raise ValueError('omniglot_alphabets: the background split must be '
                     'ordered by character, 20 drawers each.')
  alphabets = np.asarray(arrays.alphabets)
  kept = np.unique(alphabets)[:num_alphabets]
  rank = np.full(alphabets.max() + 1, -1, np.int32)
  rank[kept] = np.arange(len(kept), dtype=np.int32)
  member = rank[alphabets] >= 0
  drawer = np.arange(len(labels)) % OMNIGLOT_DRAWERS
  lo, hi = OMNIGLOT_PAD
  out = {}
  for split, where in (('train', drawer < OMNIGLOT_TRAIN_DRAWERS),
                       ('test', drawer >= OMNIGLOT_TRAIN_DRAWERS)):
    idx = np.flatnonzero(member & where)
    strokes = 1.0 - arrays.images[idx, ..., 0].astype(np.float32) / 255.0
    padded = np.pad(strokes, ((0, 0), (lo, hi), (lo, hi)))
    block = padded.shape[1] // IMAGE_SIDE
    small = padded.reshape(-1, IMAGE_SIDE, block, IMAGE_SIDE, block).mean(
        axis=(2, 4))
    out[f'{split}_image'] = small
    out[f'{split}_label'] = rank[alphabets[idx]]
  for value in out.values():
    value.flags.writeable = False  # Shared by the callers.
  return out


@functools.cache
def _image_splits(dataset: str, raw_dir: str | None, data_dir: str | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``utils.load_image_splits``, cached per process (read-only arrays)."""
  splits = utils.load_image_splits(dataset, raw_dir=raw_dir,
                                   data_dir=data_dir)
  for split in splits:
    for value in split.values():
      value.flags.writeable = False
  return splits


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None
              ) -> tuple[TaskData, dict[str, TaskData]]:
  """Task A (MNIST) and every task B, from real data (noise: synthetic).

  Every draw depends only on ``config.seed`` and the task's name.

  Returns:
    ``(a, {task name: b})``.
  """
  root = jax.random.key(config.seed)
  mnist = _image_splits('mnist', raw_dir, data_dir)
  kinds = {t.kind for t in config.tasks}
  fashion = (_image_splits('fashion_mnist', raw_dir, data_dir)
             if 'fashion_mnist' in kinds else None)
  omniglot = (omniglot_alphabets(NUM_CLASSES, raw_dir=raw_dir,
                                 data_dir=data_dir)
              if 'omniglot' in kinds else None)
  device = jax.devices()[0]

  def task_data(x_train, y_train, x_test, y_test):
    return TaskData(*(jax.device_put(jnp.asarray(a), device) for a in (
        standardise(x_train), np.asarray(y_train, np.int32),
        standardise(x_test), np.asarray(y_test, np.int32))))

  train, test = mnist
  idx = _draw(utils.name_key(root, 'data', 'a', 'train'),
              np.arange(MNIST_HALF), config.num_train_a, 'MNIST images')
  num_test_a = len(test['label']) if config.num_test_a is None else (
      config.num_test_a)
  a = task_data(_to_unit(train['image'][idx]), train['label'][idx],
                _to_unit(test['image'][:num_test_a]),
                test['label'][:num_test_a])

  tasks = {}
  for task in config.tasks:
    key_train = utils.name_key(root, 'data', task.name, 'train')
    key_test = utils.name_key(root, 'data', task.name, 'test')
    n_train, n_test = config.num_train_b, config.num_test_b
    if task.kind in ('rotation', 'permutation'):
      i_tr = _draw(key_train, np.arange(MNIST_HALF, len(train['label'])),
                   n_train, 'MNIST images')
      i_te = _draw(key_test, np.arange(len(test['label'])), n_test,
                   'MNIST test images')
      images = [_to_unit(train['image'][i_tr]), _to_unit(test['image'][i_te])]
      labels = [train['label'][i_tr], test['label'][i_te]]
      if task.kind == 'rotation':
        # One call for both splits: one compilation per angle.
        both = np.asarray(_tasks.rotate(np.concatenate(images),
                                        task.rotation))
        images = [both[:n_train], both[n_train:]]
      else:
        perm = utils.numpy_rng(utils.name_key(
            root, 'permutation', task.name)).permutation(NUM_PIXELS)
        images = [x.reshape(-1, NUM_PIXELS)[:, perm] for x in images]
    elif task.kind == 'fashion_mnist':
      f_train, f_test = fashion
      i_tr = _draw(key_train, np.arange(len(f_train['label'])), n_train,
                   'Fashion-MNIST images')
      i_te = _draw(key_test, np.arange(len(f_test['label'])), n_test,
                   'Fashion-MNIST test images')
      images = [_to_unit(f_train['image'][i_tr]),
                _to_unit(f_test['image'][i_te])]
      labels = [f_train['label'][i_tr], f_test['label'][i_te]]
    elif task.kind == 'omniglot':
      i_tr = _draw(key_train, np.arange(len(omniglot['train_label'])),
                   n_train, 'Omniglot training images')
      i_te = _draw(key_test, np.arange(len(omniglot['test_label'])), n_test,
                   'Omniglot test images')
      images = [omniglot['train_image'][i_tr], omniglot['test_image'][i_te]]
      labels = [omniglot['train_label'][i_tr], omniglot['test_label'][i_te]]
    else:  # 'noise': declared synthetic, random labels.
      images, labels = [], []
      for key, n in ((key_train, n_train), (key_test, n_test)):
        key_x, key_y = jax.random.split(key)
        images.append(np.asarray(jax.random.uniform(
            key_x, (n, IMAGE_SIDE, IMAGE_SIDE), jnp.float32)))
        labels.append(np.asarray(jax.random.randint(
            key_y, (n,), 0, NUM_CLASSES, jnp.int32)))
    tasks[task.name] = task_data(images[0], labels[0], images[1], labels[1])
  return a, tasks
