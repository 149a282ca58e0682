"""The benchmarks' data: ``config.num_tasks`` MNIST tasks per benchmark, seed.

``permuted``: task ``t`` permutes the 784 pixels by its own random
permutation (task 0 too); ``rotated``: task ``t`` rotates the digits by ``t *
rotation_step`` degrees (``predict_forgetting._tasks.rotate``). Images
become standardised float32 vectors ``[N, 784]``; every draw comes from keys
folded from the seed and names.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from experiments.common import utils
from experiments.predict_forgetting import _tasks
from experiments.prevent_forgetting.configs import Config

NUM_CLASSES = 10
NUM_PIXELS = 784


class Benchmark(NamedTuple):
  """The tasks of one benchmark for one seed, as float32 vectors."""
  x_train: np.ndarray  # [T, num_train, 784]
  y_train: np.ndarray  # [T, num_train], int32
  x_test: np.ndarray   # [T, num_test, 784]
  y_test: np.ndarray   # [T, num_test], int32


def _transform(benchmark: str, task: int, images: np.ndarray,
               config: Config, key: jax.Array) -> np.ndarray:
  """uint8 ``[N, 28, 28, 1]`` -> standardised float32 ``[N, 784]``."""
  rotation = task * config.rotation_step if benchmark == 'rotated' else 0.0
  permutation = (utils.numpy_rng(utils.name_key(key, 'permutation', task)
                                 ).permutation(NUM_PIXELS)
                 if benchmark == 'permuted' else None)
  return _tasks.to_vectors(images, rotation, permutation)


def make_benchmark(benchmark: str, seed: int, config: Config,
                   splits: tuple[Mapping[str, np.ndarray],
                                 Mapping[str, np.ndarray]]) -> Benchmark:
  """The ``config.num_tasks`` tasks of ``benchmark`` for ``seed``.

  Training examples: ``config.train_size(benchmark)`` drawn per task without replacement from
  the 60k training images; test: the first ``num_test`` test images, each
  task's transformation applied.
  """
  train, test = splits
  key = utils.name_key(jax.random.key(seed), 'data', benchmark)
  xs, ys, xts, yts = [], [], [], []
  for t in range(config.num_tasks):
    rng = utils.numpy_rng(utils.name_key(key, 'train', t))
    idx = rng.choice(len(train['label']), config.train_size(benchmark),
                     replace=False)
    xs.append(_transform(benchmark, t, train['image'][idx], config, key))
    ys.append(train['label'][idx].astype(np.int32))
    xts.append(_transform(benchmark, t, test['image'][:config.num_test],
                          config, key))
    yts.append(test['label'][:config.num_test].astype(np.int32))
  return Benchmark(np.stack(xs), np.stack(ys), np.stack(xts), np.stack(yts))


def load_mnist(raw_dir: str | None, data_dir: str | None, num_test: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """MNIST's training split and the first ``num_test`` test images."""
  return utils.load_image_splits('mnist', num_test=num_test, raw_dir=raw_dir,
                                 data_dir=data_dir)
