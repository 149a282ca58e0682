"""Test-wide JAX settings: silent broadcasting and dtype promotion are errors."""

import os

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_numpy_dtype_promotion', 'strict')

# Real raw datasets, staged beside the project (see ../shared/data/README.md).
_DEFAULT_RAW = os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                            'data')
RAW_DIR = os.environ.get('METACF_RAW_DIR') or (
    os.path.abspath(_DEFAULT_RAW) if os.path.isdir(_DEFAULT_RAW) else None)

# Splits the experiments' smoke runs read from the default tfds data dir.
_SHARED_SPLITS = (('mnist', 'train'), ('mnist', 'test'),
                  ('fashion_mnist', 'train'), ('fashion_mnist', 'test'),
                  ('omniglot', 'background'), ('omniglot', 'evaluation'))


def pytest_configure(config):
  """Under pytest-xdist, prepares the shared datasets before the workers.

  Two workers preparing the same tfds dataset at once would race on its
  final directory, so the controller prepares them; a single process
  prepares each one when a test first needs it.
  """
  if (hasattr(config, 'workerinput') or not RAW_DIR
      or not config.getoption('numprocesses', default=None)):
    return
  import metacf.data  # pylint: disable=g-import-not-at-top  # needs tfds
  for name, split in _SHARED_SPLITS:
    metacf.data.load_arrays(name, split, raw_dir=RAW_DIR)
