"""MNIST for the distillation study: the arrays and their preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import utils
from experiments.distill_mnist.configs import Config

NUM_CLASSES = 10


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Train and test ``{'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}``."""
  return utils.load_image_splits(config.dataset, num_train=config.num_train,
                                 num_test=config.num_test, raw_dir=raw_dir,
                                 data_dir=data_dir)


def preprocess(images: jax.typing.ArrayLike) -> jax.Array:
  """uint8 pixels ``[batch, 28, 28, 1]`` -> float32 in ``[0, 1]``."""
  return jnp.asarray(images).astype(jnp.float32) / 255.0
