"""Whole splits as NumPy arrays, prepared once with tfds and cached.

:func:`load_arrays` prepares the dataset with the builders of
:mod:`metacf.data._builders` (``array_record``, no TensorFlow), reads every
example back through ``builder.as_data_source()`` and keeps the decoded split
as a ``.npz`` file inside the prepared dataset's folder
(``<data_dir>/metacf_<name>/<version>/arrays_<split>.v1.npz``), so the cache
is keyed by builder version and goes away with the dataset it was read from.

A cache that is there is read with NumPy alone: tensorflow-datasets is only
imported to build a missing one, so a machine without it (a lent GPU, say)
loads the splits from a copied cache (``python -m benchmarks.gpu
--prepare`` builds one in the repository).

Reading the raw records and decoding them here is several times faster than
tfds's default decoding (Pillow), and the cache then loads faster still (see
the benchmarks page).

:func:`metacf.data.load_speeches` caches Tiny Shakespeare's speeches the same
way (:func:`load_cached`, same folder and file name)."""

import os
import tempfile
import types
import zipfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

DATA_DIR_ENV = 'METACF_DATA_DIR'
# tfds's own default data dir (tensorflow_datasets.core.constants.DATA_DIR).
_TFDS_DATA_DIR_ENV = 'TFDS_DATA_DIR'

# Builder class name of each dataset (in metacf.data._builders, which needs
# tfds and is imported only when a builder is asked for).
_BUILDER_NAMES: Mapping[str, str] = types.MappingProxyType({
    'mnist': 'MetacfMnist',
    'fashion_mnist': 'MetacfFashionMnist',
    'omniglot': 'MetacfOmniglot',
    'tiny_shakespeare': 'MetacfTinyShakespeare',
})
# The image datasets, which load_arrays loads (tiny_shakespeare: see
# metacf.data._shakespeare.load_speeches).
_IMAGE_NAMES = ('fashion_mnist', 'mnist', 'omniglot')
# The builders' VERSION (the cache's folder): tests check they agree.
_BUILDER_VERSION = '1.0.0'

SPLITS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    'mnist': ('train', 'test'),
    'fashion_mnist': ('train', 'test'),
    # = tuple(_builders.OMNIGLOT_SPLITS), checked by the tests.
    'omniglot': ('background', 'evaluation', 'small1', 'small2'),
    # = _shakespeare.SPLITS, checked by the tests.
    'tiny_shakespeare': ('train', 'validation', 'test'),
})
"""Dataset names with their splits (image datasets: :func:`load_arrays`;
tiny_shakespeare: :func:`load_speeches`)."""

_DATA_EXTRA = ("metacf.data needs tensorflow-datasets, pillow, "
               "importlib_resources and array_record to prepare a dataset: "
               "pip install 'metacf[data]'.")

_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
_CACHE_FORMAT = 1  # Bump when the cached arrays change meaning.


class DatasetArrays(NamedTuple):
  """One split of a dataset as NumPy arrays.

  Attributes:
    images: ``[N, H, W, 1]``, uint8 in ``[0, 255]`` or float32 in ``[0, 1]``.
      MNIST and Fashion-MNIST are 28x28 with a black (0) background; Omniglot
      is 105x105 with a white (255, or 1.0) background and black strokes.
    labels: ``[N]`` int32 class indices. MNIST: the digit. Fashion-MNIST: the
      index in ``T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
      Sneaker, Bag, Ankle boot``. Omniglot: the character's index inside the
      split, ``0..num_characters - 1``, numbered in the order of Omniglot's
      character numbers (the ``XXXX`` of ``XXXX_YY.png``), so
      ``images.reshape(num_characters, 20, 105, 105)`` indexes
      ``[character, drawer]``.
    alphabets: Omniglot only (else None): ``[N]`` int32 index of the
      alphabet among the 50 Omniglot alphabet names sorted alphabetically
      (``metacf.data.MetacfOmniglot`` feature ``alphabet``).
  """
  images: np.ndarray  # shape=[N, H, W, 1], dtype=uint8 or float32.
  labels: np.ndarray  # shape=[N], dtype=int32.
  alphabets: np.ndarray | None = None  # shape=[N], dtype=int32.


def _check_name(name: str, fn: str,
                names: tuple[str, ...] = tuple(_BUILDER_NAMES)) -> None:
  if not isinstance(name, str) or name not in names:
    raise ValueError(
        f'{fn}: name must be one of {sorted(names)}, got {name!r}.')


def import_builders() -> types.ModuleType:
  """``metacf.data._builders`` (imports tfds); ImportError naming the extra."""
  try:
    from metacf.data import _builders  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{_DATA_EXTRA} ({type(e).__name__}: {e})') from e
  return _builders


def _resolve_data_dir(data_dir: os.PathLike[str] | str | None) -> str | None:
  """``data_dir``, else ``$METACF_DATA_DIR``, else None (tfds's default)."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or None
  return None if data_dir is None else os.fspath(data_dir)


def cache_path(name: str, split: str,
               data_dir: os.PathLike[str] | str | None = None) -> str:
  """Where :func:`load_arrays` keeps a split's arrays, found without tfds.

  ``<data_dir>/metacf_<name>/<version>/arrays_<split>.v1.npz``, the
  prepared builder's ``data_dir`` (tfds's default data dir when neither
  ``data_dir`` nor ``$METACF_DATA_DIR`` is set: ``$TFDS_DATA_DIR``, else
  ``~/tensorflow_datasets``).
  """
  data_dir = _resolve_data_dir(data_dir)
  if data_dir is None:
    data_dir = os.environ.get(
        _TFDS_DATA_DIR_ENV,
        os.path.join(os.path.expanduser('~'), 'tensorflow_datasets'))
  return os.path.join(data_dir, f'metacf_{name}', _BUILDER_VERSION,
                      f'arrays_{split}.v{_CACHE_FORMAT}.npz')


def get_builder(
    name: str, *, raw_dir: os.PathLike[str] | str | None = None,
    data_dir: os.PathLike[str] | str | None = None
) -> 'tfds.core.GeneratorBasedBuilder':
  """Returns the (not yet prepared) ``array_record`` tfds builder of ``name``.

  Use it for random access without loading a whole split: after
  ``builder.download_and_prepare()``, ``builder.as_data_source('background')
  [0]`` is Omniglot's first example, ``{'image': uint8 [105, 105, 1],
  'label': ..., ...}`` (an example that runs without data is in
  :mod:`metacf.data`).

  Args:
    name: One of ``'mnist'``, ``'fashion_mnist'``, ``'omniglot'``,
      ``'tiny_shakespeare'``.
    raw_dir: Folder with the raw files (``<raw_dir>/mnist/*.gz``,
      ``<raw_dir>/fashion_mnist/*.gz``, ``<raw_dir>/omniglot/*.zip``,
      ``<raw_dir>/tiny_shakespeare/input.txt``).
      Defaults to ``$METACF_RAW_DIR``; without either, the raw files are
      downloaded from their original hosts and checked against their
      registered sha256.
    data_dir: Where tfds keeps prepared datasets. Defaults to
      ``$METACF_DATA_DIR``, else tfds's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    A ``metacf_mnist``, ``metacf_fashion_mnist``, ``metacf_omniglot`` or
    ``metacf_tiny_shakespeare`` builder.

  Raises:
    ValueError: if ``name`` is unknown.
    ImportError: if tensorflow-datasets (the ``[data]`` extra) is missing.
  """
  _check_name(name, 'get_builder')
  builders = import_builders()
  return getattr(builders, _BUILDER_NAMES[name])(
      raw_dir=raw_dir, data_dir=_resolve_data_dir(data_dir),
      file_format='array_record')


def raw_features(builder: 'tfds.core.GeneratorBasedBuilder',
                 split: str) -> list[Any]:
  """Every example of a prepared split as its raw ``tf.train.Example``
  feature map (tfds's on-disk records, parsed without tfds's decoders)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  source = builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return [tf_example_pb2.Example.FromString(record).features.feature
          for record in source.__getitems__(list(range(len(source))))]


def _read_split(builder: 'tfds.core.GeneratorBasedBuilder', name: str,
                split: str) -> dict[str, np.ndarray]:
  """Reads a prepared split through its data source, as uint8 images."""
  from metacf.data import _png  # pylint: disable=g-import-not-at-top  # Pillow
  # tfds's own per-example parsing and Pillow decoding cost ~0.2 ms per
  # example; parsing the raw records (raw_features) and decoding the
  # builders' PNGs with _png (one zlib call each) costs ~0.03 ms.
  features = raw_features(builder, split)
  arrays = {
      'images': np.stack([
          _png.decode_gray(f['image'].bytes_list.value[0]) for f in features
      ])[..., None],
      'labels': np.array([f['label'].int64_list.value[0] for f in features],
                         np.int32),
  }
  if name == 'omniglot':
    # Global character numbers -> 0..num_characters-1 inside the split.
    _, labels = np.unique(arrays['labels'], return_inverse=True)
    arrays['labels'] = labels.astype(np.int32)
    arrays['alphabets'] = np.array(
        [f['alphabet'].int64_list.value[0] for f in features], np.int32)
  return arrays


def _write_atomically(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes a ``.npz`` so that readers see either no file or a complete one."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz.tmp')
  try:
    # np.savez_compressed with zlib level 1 instead of 6: 2-4x faster to
    # write, as fast to read; 10 MB for MNIST train, 6 MB for Omniglot
    # background.
    with os.fdopen(fd, 'wb') as f, zipfile.ZipFile(
        f, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
      for key, value in arrays.items():
        with zf.open(f'{key}.npy', 'w', force_zip64=True) as member:
          np.lib.format.write_array(member, value, allow_pickle=False)
    os.chmod(tmp, 0o644)  # mkstemp creates it 0o600.
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


# The arrays in each dataset's cache (default: 'images', 'labels').
_CACHE_KEYS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    'omniglot': ('images', 'labels', 'alphabets'),
    # Speakers as fixed-width unicode; the texts' UTF-8 bytes concatenated,
    # with each text's end offset (no pickled object arrays).
    'tiny_shakespeare': ('speakers', 'text_utf8', 'text_ends', 'index'),
})


def _read_cache(path: str, name: str) -> dict[str, np.ndarray] | None:
  keys = _CACHE_KEYS.get(name, ('images', 'labels'))
  try:
    # Opened here: np.load(path) leaks the file if it is a truncated zip.
    with open(path, 'rb') as f, np.load(f, allow_pickle=False) as npz:
      return {k: npz[k] for k in keys}
  except FileNotFoundError:
    return None
  except (OSError, EOFError, ValueError, KeyError, TypeError,
          zipfile.BadZipFile):
    return None  # Unreadable (truncated, or not ours): rebuilt by the caller.


def load_cached(
    name: str, split: str, *, fn: str,
    read_split: Callable[['tfds.core.GeneratorBasedBuilder'],
                         dict[str, np.ndarray]],
    raw_dir: os.PathLike[str] | str | None,
    data_dir: os.PathLike[str] | str | None,
    build_hint: str) -> dict[str, np.ndarray]:
  """A split's cached arrays; prepares the dataset and writes them if missing.

  Reads :func:`cache_path` with NumPy alone. On a miss (or an unreadable
  cache), makes the builder (importing tfds), reads the cache of the data dir
  tfds actually uses, and else prepares the dataset, calls
  ``read_split(builder)`` and writes its arrays atomically.

  Args:
    name: A key of ``_BUILDER_NAMES``.
    split: One of the builder's splits.
    fn: The public function's name, for error messages.
    read_split: Reads the prepared split as the arrays of
      ``_CACHE_KEYS[name]``.
    raw_dir: As in :func:`get_builder`.
    data_dir: As in :func:`get_builder`.
    build_hint: How to build the cache elsewhere, ending the message of the
      FileNotFoundError raised when tfds is missing.

  Raises:
    FileNotFoundError: if the cache is missing and tensorflow-datasets is not
      installed to build it (the message names the cache file).
  """
  cache = cache_path(name, split, data_dir)
  arrays = _read_cache(cache, name)
  if arrays is None:
    try:
      builder = get_builder(name, raw_dir=raw_dir, data_dir=data_dir)
    except ImportError as e:
      raise FileNotFoundError(
          f'{fn}: {cache} must hold the cached {name} {split!r} arrays, got '
          f'no readable file, and it cannot be built here [{e}]. Build it on '
          f'a machine with the [data] extra ({build_hint}), then point '
          f'data_dir or ${DATA_DIR_ENV} at the folder holding '
          f'metacf_{name}/.') from e
    built_cache = os.path.join(builder.data_dir,
                               f'arrays_{split}.v{_CACHE_FORMAT}.npz')
    if built_cache != cache:  # tfds found the dataset in another data dir.
      cache = built_cache
      arrays = _read_cache(cache, name)
  if arrays is None:
    builder.download_and_prepare()
    arrays = read_split(builder)
    _write_atomically(cache, arrays)
  return arrays


def load_arrays(name: str, split: str, *,
                raw_dir: os.PathLike[str] | str | None = None,
                data_dir: os.PathLike[str] | str | None = None,
                dtype: type[np.generic] | np.dtype = np.uint8
                ) -> DatasetArrays:
  """Loads a whole split of MNIST, Fashion-MNIST or Omniglot as arrays.

  The first call prepares the dataset with tfds (``array_record`` files in
  ``data_dir``, from the raw files, no TensorFlow) and caches the decoded
  split as ``arrays_<split>.v1.npz`` next to the prepared files; later calls
  read the cache, with NumPy alone (tensorflow-datasets need not be
  installed then). Examples keep the order of the raw files (Omniglot: by
  character number, then drawer).

  For example, ``load_arrays('mnist', 'train', raw_dir='/data/raw',
  dtype=np.float32).images`` has shape ``(60000, 28, 28, 1)``, float32 in
  ``[0, 1]`` (an example that runs without data is in :mod:`metacf.data`).

  Args:
    name: ``'mnist'``, ``'fashion_mnist'`` or ``'omniglot'``.
    split: ``'train'`` or ``'test'`` for MNIST and Fashion-MNIST;
      ``'background'``, ``'evaluation'``, ``'small1'`` or ``'small2'`` for
      Omniglot (see :data:`SPLITS`).
    raw_dir: Folder with the raw files, only read if the dataset is not yet
      prepared in ``data_dir``. Defaults to ``$METACF_RAW_DIR``; without
      either, the files are downloaded (see :func:`get_builder`).
    data_dir: tfds data folder. Defaults to ``$METACF_DATA_DIR``, else
      tfds's default.
    dtype: ``np.uint8`` (values 0..255) or ``np.float32`` (the uint8 values
      divided by 255).

  Returns:
    A :class:`DatasetArrays`.

  Raises:
    ValueError: if ``name``, ``split`` or ``dtype`` is not one of the above,
      or a raw file is corrupt (the message names the file).
    FileNotFoundError: if a raw file is missing from ``raw_dir``, or the
      split's cache is missing and tensorflow-datasets is not installed to
      build it (the message names the cache file).

  References:
    LeCun et al., `Gradient-based learning applied to document recognition
    <http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf>`_, 1998 (MNIST).
    Xiao et al., `Fashion-MNIST: a Novel Image Dataset for Benchmarking
    Machine Learning Algorithms <https://arxiv.org/abs/1708.07747>`_, 2017.
    Lake et al., `Human-level concept learning through probabilistic program
    induction <https://doi.org/10.1126/science.aab3050>`_, 2015 (Omniglot).
  """
  fn = 'load_arrays'
  _check_name(name, fn, _IMAGE_NAMES)
  if split not in SPLITS[name]:
    raise ValueError(
        f'{fn}: split must be one of {list(SPLITS[name])} for {name!r}, got '
        f'{split!r}.')
  try:
    np_dtype = np.dtype(dtype)
  except TypeError:
    np_dtype = None
  if np_dtype not in _DTYPES:
    got = repr(dtype) if np_dtype is None else np_dtype.name
    raise ValueError(
        f'{fn}: dtype must be np.uint8 or np.float32, got {got}.')

  arrays = load_cached(
      name, split, fn=fn,
      read_split=lambda builder: _read_split(builder, name, split),
      raw_dir=raw_dir, data_dir=data_dir,
      build_hint='load_arrays(name, split, data_dir=...) there; `python -m '
      'benchmarks.gpu --prepare` builds the ones the GPU script needs into '
      '.gpu_data/')
  images = arrays['images']
  if np_dtype == np.float32:
    # One pass, same bits as `images.astype(np.float32) / 255`.
    images = np.divide(images, np.float32(255), dtype=np.float32)
  return DatasetArrays(images=images, labels=arrays['labels'],
                       alphabets=arrays.get('alphabets'))
