"""Omniglot for MAML: the images, their rotations and N-way K-shot tasks.

``load_omniglot`` reads the 1623 characters (20 drawings each) once per
process; ``sample_task`` draws one task from them on the device (inside the
jitted training chunk and evaluation).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.maml_omniglot.configs import Config
from experiments.maml_omniglot.configs import Setting
from metacf import maml

NUM_DRAWERS = 20


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of ``[..., H, H]`` images to side ``size``.

  Output pixel ``i`` takes input pixel ``floor((i + 0.5) * H / size)``:
  exactly what Pillow's ``Image.resize`` gives for Omniglot's 1-bit (mode
  ``'1'``) PNGs, for which it always uses ``NEAREST``, whatever filter is
  asked for. So this is the data the authors' ``resize_images.py``
  (``im.resize((28, 28), resample=Image.LANCZOS)``) produced.
  """
  height = images.shape[-1]
  idx = np.floor((np.arange(size) + 0.5) * (height / size)).astype(np.intp)
  return images[..., idx[:, None], idx[None, :]]


def load_omniglot(image_size: int, raw_dir: str | None = None,
                  data_dir: str | None = None) -> np.ndarray:
  """All of Omniglot as uint8 ``[1623, 20, image_size ** 2]``, strokes 255.

  Characters in Omniglot's order (the 964 of the background split, then the
  659 of the evaluation split), drawers in order. Pixels are inverted (255
  is a stroke, 0 the background), as the authors' ``1.0 - image``. Cached
  per process.

  Raises:
    ValueError: if a split is not ordered by character, 20 drawings each.
  """
  return _load_omniglot(image_size, raw_dir, data_dir)


@functools.cache
def _load_omniglot(image_size: int, raw_dir: str | None,
                   data_dir: str | None) -> np.ndarray:
  import metacf.data  # pylint: disable=g-import-not-at-top  # needs tfds
  characters = []
  for split in ('background', 'evaluation'):
    arrays = metacf.data.load_arrays('omniglot', split, raw_dir=raw_dir,
                                     data_dir=data_dir)
    num_characters = len(arrays.labels) // NUM_DRAWERS
    if not np.array_equal(arrays.labels, np.repeat(
        np.arange(num_characters, dtype=arrays.labels.dtype), NUM_DRAWERS)):
      raise ValueError(
          f'load_omniglot: the {split} split must be ordered by character, '
          f'{NUM_DRAWERS} drawings each, got labels {arrays.labels[:25]}...')
    images = arrays.images[..., 0].reshape(
        num_characters, NUM_DRAWERS, *arrays.images.shape[1:3])
    characters.append(resize_nearest(255 - images, image_size))
  images = np.concatenate(characters)
  images = images.reshape(*images.shape[:2], image_size * image_size)
  images.flags.writeable = False  # Shared by the callers.
  return images


def rotation_tables(image_size: int) -> np.ndarray:
  """int32 ``[4, image_size ** 2]``: ``flat[tables[r]]`` is ``rot90(., r)``."""
  idx = np.arange(image_size * image_size).reshape(image_size, image_size)
  return np.stack([np.rot90(idx, r).ravel() for r in range(4)]).astype(
      np.int32)


def sample_task(key: jax.Array, images: jax.Array, *, ways: int, shots: int,
                num_query: int, rotations: bool) -> maml.Task:
  """One N-way K-shot task from ``images`` (uint8 ``[characters, 20, S*S]``).

  ``ways`` distinct characters in random order (class ``c`` is the ``c``-th),
  each at a random multiple of 90 degrees if ``rotations``; ``shots +
  num_query`` distinct drawers of each, the first ``shots`` for support.

  Returns:
    A :class:`metacf.maml.Task`: ``support_x`` float32 ``[ways * shots, S,
    S, 1]`` in [0, 1] (strokes 1), ``support_y`` int32 ``[ways * shots]``
    (class-major), ``query_x``/``query_y`` likewise with ``num_query``.
  """
  num_characters, num_drawers, num_pixels = images.shape
  size = math.isqrt(num_pixels)
  key_chars, key_drawers, key_rotations = jax.random.split(key, 3)
  chars = jax.random.choice(key_chars, num_characters, (ways,), replace=False)
  num_per_class = shots + num_query
  drawers = jax.vmap(
      lambda k: jax.random.permutation(k, num_drawers)[:num_per_class])(
          jax.random.split(key_drawers, ways))
  pixels = images[chars[:, None], drawers]  # [ways, num_per_class, S*S]
  if rotations:
    turns = jax.random.randint(key_rotations, (ways,), 0, 4)
    table = jnp.asarray(rotation_tables(size))[turns]  # [ways, S*S]
    pixels = pixels[jnp.arange(ways)[:, None, None],
                    jnp.arange(num_per_class)[None, :, None],
                    table[:, None, :]]
  x = (pixels.astype(jnp.float32) / 255.0).reshape(
      ways, num_per_class, size, size, 1)

  def split(part, n):
    return (part.reshape(ways * n, size, size, 1),
            jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n))

  support_x, support_y = split(x[:, :shots], shots)
  query_x, query_y = split(x[:, shots:], num_query)
  return maml.Task(support_x, support_y, query_x, query_y)


def sample_tasks(keys: jax.Array, images: jax.Array, setting: Setting,
                 config: Config) -> maml.Task:
  """``sample_task`` for each key of ``keys`` ``[num_tasks]``, stacked."""
  return jax.vmap(functools.partial(
      sample_task, images=images, ways=setting.ways, shots=setting.shots,
      num_query=num_query(setting, config), rotations=config.rotations))(keys)


def num_query(setting: Setting, config: Config) -> int:
  return setting.shots if config.num_query is None else config.num_query


def images_shape(config: Config, train: bool) -> jax.ShapeDtypeStruct:
  """uint8 ``[characters, 20, image_size ** 2]`` of the train or test split."""
  total = 1623  # Omniglot's characters.
  num = (config.num_train_characters if train
         else total - config.num_train_characters)
  return jax.ShapeDtypeStruct((num, NUM_DRAWERS, config.image_size ** 2),
                              jnp.uint8)
