"""Test-wide settings: strict JAX, a per-process compilation cache, temp dirs.

Silent broadcasting and dtype promotion are errors. Every temporary file or
folder made during the session goes into one folder that is removed at its
end (see ``_temp_dirs_removed``).
"""

import atexit
import contextlib
import os
import shutil
import tempfile

import jax
import pytest

from _smoke_run import RAW_DIR

jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_numpy_dtype_promotion', 'strict')

# A persistent compilation cache private to this test process, removed when
# it exits: a computation compiled again in the same process (a resumed or
# repeated experiment run, whose closures are new Python functions and so
# miss jax.jit's in-memory cache) is loaded instead of compiled. Entries are
# keyed on the computation (debug info stripped), the compile options and
# the backend, so a hit is the executable a compilation would give. Only
# compilations of >= 0.1 s are stored. Set here, at import, so that it is
# configured before anything compiles.
_COMPILATION_CACHE_DIR = tempfile.mkdtemp(prefix='metacf_test_jax_cache_')
atexit.register(shutil.rmtree, _COMPILATION_CACHE_DIR, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

# Splits the experiments' smoke runs read from the default tfds data dir.
_SHARED_SPLITS = (('mnist', 'train'), ('mnist', 'test'),
                  ('fashion_mnist', 'train'), ('fashion_mnist', 'test'),
                  ('omniglot', 'background'), ('omniglot', 'evaluation'))
_SHAKESPEARE_SPLITS = ('all', 'train', 'validation')


@contextlib.contextmanager
def _temp_dirs_removed():
  """``tempfile``'s default folder is a new one, removed on exit.

  tfds's ``DatasetInfo.initialize_from_bucket`` leaves an empty
  ``tempfile.mkdtemp('tfds')`` behind every time a builder is made for a
  dataset that is not prepared yet (``tests/test_data.py`` makes many); those
  and any other temporary folder a test or library forgets go in here.
  """
  previous = tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix='metacf_tests_') as path:
    tempfile.tempdir = path
    try:
      yield path
    finally:
      tempfile.tempdir = previous


@pytest.fixture(scope='session', autouse=True)
def _session_temp_dir(tmp_path_factory):
  tmp_path_factory.getbasetemp()  # pytest's own tmp_path stays where it was.
  with _temp_dirs_removed():
    yield


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
  with _temp_dirs_removed():
    for name, split in _SHARED_SPLITS:
      metacf.data.load_arrays(name, split, raw_dir=RAW_DIR)
    if os.path.exists(os.path.join(RAW_DIR, 'tiny_shakespeare', 'input.txt')):
      for split in _SHAKESPEARE_SPLITS:
        metacf.data.load_speeches(split, raw_dir=RAW_DIR)


@pytest.fixture(scope='module', autouse=True)
def _empty_jit_dispatch_cache():
  """Empties jax's in-memory caches before each test module.

  jax.jit's C++ dispatch cache is shared by all functions of a process and
  holds 8,192 entries (jax 0.10.2); once it is full, a newly jitted function
  gets no entry, so ``f._cache_size()`` reads 0 after it ran (measured: 8,300
  live jitted functions, then a new one called 3 times: 0). A test worker
  running half the suite passed that many, which failed the compile-once
  tests (``_cache_size() == 1``) of whichever module came late. Compilations
  of >= 0.1 s are still found in the persistent cache above.
  """
  jax.clear_caches()
  yield
