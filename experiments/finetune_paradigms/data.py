"""The data: MNIST (A) and Fashion-MNIST (B), K-shot subsets, test chunks.

Images stay uint8 ``[N, 28, 28, 1]`` (the model scales them); K-shot sets
are nested in K and drawn from keys folded from the seed and names.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import utils
from experiments.finetune_paradigms.configs import Config

NUM_CLASSES = 10


def shots_key(k: int | None) -> str:
  """Results key of K: ``'10'``, ..., ``'all'``."""
  return 'all' if k is None else str(k)


# --------------------------------------------------------------------- data


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Real MNIST (A) and Fashion-MNIST (B): train and test splits."""
  a_train, a_test = utils.load_image_splits(
      'mnist', num_train=config.num_train_a, num_test=config.num_test_a,
      raw_dir=raw_dir, data_dir=data_dir)
  b_train, b_test = utils.load_image_splits(
      'fashion_mnist', num_train=config.num_train_b,
      num_test=config.num_test_b, raw_dir=raw_dir, data_dir=data_dir)
  return {'a_train': a_train, 'a_test': a_test, 'b_train': b_train,
          'b_test': b_test}


def shot_indices(labels: np.ndarray, k: int | None,
                 key: jax.Array) -> np.ndarray:
  """Indices of K examples per class, nested in K, in round-robin order.

  Each class's members are permuted once (by ``key``, not by K), and K-shot
  takes the first K of each, so the K = 10 set lies inside the K = 100 set,
  and so on; the result is ordered shot-major (shot 0 of every class, then
  shot 1, ...), so its first ``10 n`` entries are the first ``n`` shots.
  ``None``: every example.
  """
  rng = utils.numpy_rng(key)
  per_class = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    per_class.append(members[rng.permutation(len(members))])
  count = max(len(m) for m in per_class) if k is None else k
  if k is not None and min(len(m) for m in per_class) < k:
    raise ValueError(f'shot_indices: fewer than K={k} examples in a class.')
  order = [m[i] for i in range(count) for m in per_class if i < len(m)]
  return np.asarray(order, np.int32)


def eval_chunks(split: Mapping[str, np.ndarray], chunk: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Test images, labels and mask as ``[num_chunks, chunk, ...]``."""
  batches = list(utils.padded_batches(split, chunk))
  images = np.stack([b['image'] for b, _ in batches])
  labels = np.stack([b['label'] for b, _ in batches])
  mask = np.stack([m for _, m in batches])
  return tuple(jax.device_put(jnp.asarray(a), jax.devices()[0])
               for a in (images, labels, mask))


def ntk_subset_a(config: Config, data: Mapping[str, Any]) -> dict[str, Any]:
  n = min(config.ntk_num_a, len(data['a_test']['label']))
  return {'image': jnp.asarray(data['a_test']['image'][:n]),
          'label': jnp.asarray(data['a_test']['label'][:n])}
