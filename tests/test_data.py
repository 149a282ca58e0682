"""Tests for metacf.data: real MNIST, Fashion-MNIST and Omniglot, no TensorFlow.

The real-data tests read the raw files staged in ``conftest.RAW_DIR``
(``$METACF_RAW_DIR`` or ../shared/data) and prepare each dataset once per
session into a ``tmp_path_factory`` folder. Fashion-MNIST goes through the
online path: tfds's download manager, with its HTTP layer replaced by one that
serves the staged files, so the registered URLs and sha256 are checked too.
The edge cases use tiny raw files written by the tests themselves.
"""

import gzip
import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.core.download import download_manager

import _fake_http
from _smoke_run import RAW_DIR
import metacf.data
from metacf.data import _omniglot
from metacf.data import _png

requires_raw = pytest.mark.skipif(
    RAW_DIR is None or not os.path.isdir(RAW_DIR),
    reason='real raw datasets not found: set METACF_RAW_DIR or stage them in '
    '../shared/data (see its README.md)')

# Known label counts of the MNIST files (LeCun et al. 1998).
_MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                       5949]
_MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
_IDX_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
_OMNIGLOT_ZIPS = ('images_background.zip', 'images_evaluation.zip',
                  'images_background_small1.zip',
                  'images_background_small2.zip')


# ---------------------------------------------------------------------------
# Helpers.


def _read_idx_oracle(path):
  """Independent IDX reader: the header is 4 bytes per dimension + 4."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  ndim = data[3]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _serve_raw_files(raw_dir, requested):
  """Serves each known URL from ``raw_dir`` (see ``_fake_http``)."""
  hosts = {cls.URL: cls.RAW_SUBDIR for cls in (metacf.data.MetacfMnist,
                                               metacf.data.MetacfFashionMnist,
                                               metacf.data.MetacfOmniglot)}

  def path_of(url):
    host, fname = url.rsplit('/', 1)
    return os.path.join(raw_dir, hosts[host + '/'], fname)

  return _fake_http.serve_files(path_of, requested)


def _idx_bytes(magic, dims, payload):
  raw = struct.pack('>I', magic) + b''.join(struct.pack('>I', d)
                                            for d in dims) + bytes(payload)
  return gzip.compress(raw, mtime=0)


def _write_mnist_raw(raw_dir, *, num_train=5, num_test=3, seed=0,
                     subdir='mnist'):
  """Writes four valid tiny IDX files; returns the arrays written."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(raw_dir, subdir)
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    with open(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'),
              'wb') as f:
      f.write(_idx_bytes(0x803, (n, 28, 28), images.tobytes()))
    with open(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'),
              'wb') as f:
      f.write(_idx_bytes(0x801, (n,), labels.tobytes()))
    arrays[prefix] = (images, labels)
  return arrays


def _png_1bit(size=(105, 105)):
  buf = io.BytesIO()
  Image.new('1', size, 1).save(buf, format='PNG')
  return buf.getvalue()


def _write_zip(path, members):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in members.items():
      zf.writestr(name, data)


# ---------------------------------------------------------------------------
# Session fixtures: each real dataset is prepared once.


@pytest.fixture(scope='session')
def mnist_dir(tmp_path_factory):
  if RAW_DIR is None or not os.path.isdir(RAW_DIR):
    pytest.skip('real raw datasets not found')
  data_dir = str(tmp_path_factory.mktemp('tfds_mnist'))
  for split in ('train', 'test'):
    metacf.data.load_arrays('mnist', split, raw_dir=RAW_DIR,
                            data_dir=data_dir)
  return data_dir


@pytest.fixture(scope='session')
def mnist(mnist_dir):
  return {split: metacf.data.load_arrays('mnist', split, data_dir=mnist_dir)
          for split in ('train', 'test')}


@pytest.fixture(scope='session')
def fashion_mnist(tmp_path_factory):
  """Prepared through the online path (download manager + checksums)."""
  if RAW_DIR is None or not os.path.isdir(RAW_DIR):
    pytest.skip('real raw datasets not found')
  data_dir = str(tmp_path_factory.mktemp('tfds_fashion_mnist'))
  requested = []
  with _serve_raw_files(RAW_DIR, requested):
    arrays = {split: metacf.data.load_arrays('fashion_mnist', split,
                                             data_dir=data_dir)
              for split in ('train', 'test')}
  return arrays, sorted(requested)


@pytest.fixture(scope='session')
def omniglot_dir(tmp_path_factory):
  if RAW_DIR is None or not os.path.isdir(RAW_DIR):
    pytest.skip('real raw datasets not found')
  data_dir = str(tmp_path_factory.mktemp('tfds_omniglot'))
  metacf.data.get_builder('omniglot', raw_dir=RAW_DIR,
                          data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope='session')
def omniglot(omniglot_dir):
  return {split: metacf.data.load_arrays('omniglot', split,
                                         data_dir=omniglot_dir)
          for split in ('background', 'evaluation')}


# ---------------------------------------------------------------------------
# Real MNIST.


@requires_raw
def test_mnist_sizes_shapes_and_dtypes(mnist):
  for split, n in (('train', 60000), ('test', 10000)):
    arrays = mnist[split]
    assert arrays.images.shape == (n, 28, 28, 1)
    assert arrays.images.dtype == np.uint8
    assert arrays.labels.shape == (n,)
    assert arrays.labels.dtype == np.int32
    assert arrays.alphabets is None
    assert arrays.images.min() == 0 and arrays.images.max() == 255


@requires_raw
def test_mnist_label_counts(mnist):
  assert np.bincount(mnist['train'].labels).tolist() == _MNIST_TRAIN_COUNTS
  assert np.bincount(mnist['test'].labels).tolist() == _MNIST_TEST_COUNTS


@requires_raw
def test_mnist_matches_raw_idx_files(mnist):
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    folder = os.path.join(RAW_DIR, 'mnist')
    images = _read_idx_oracle(
        os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'))
    labels = _read_idx_oracle(
        os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'))
    np.testing.assert_array_equal(mnist[split].images.ravel(), images)
    np.testing.assert_array_equal(mnist[split].labels, labels)


@requires_raw
def test_float32_equals_uint8_over_255(mnist, mnist_dir):
  arrays = metacf.data.load_arrays('mnist', 'test', data_dir=mnist_dir,
                                   dtype=np.float32)
  assert arrays.images.dtype == np.float32
  np.testing.assert_array_equal(
      arrays.images, mnist['test'].images.astype(np.float32) / 255)
  assert arrays.images.min() == 0.0 and arrays.images.max() == 1.0
  np.testing.assert_array_equal(arrays.labels, mnist['test'].labels)


@requires_raw
def test_data_source_agrees_with_arrays(mnist, mnist_dir):
  """tfds's own decoding (Pillow) matches load_arrays' decoding."""
  builder = metacf.data.get_builder('mnist', data_dir=mnist_dir)
  source = builder.as_data_source('test')
  assert len(source) == 10000
  for i in (0, 1, 4321, 9999):
    example = source[i]
    np.testing.assert_array_equal(example['image'], mnist['test'].images[i])
    assert example['label'] == mnist['test'].labels[i]


@requires_raw
def test_prepared_dataset_needs_no_raw_files(mnist, mnist_dir, tmp_path):
  arrays = metacf.data.load_arrays('mnist', 'test',
                                   raw_dir=str(tmp_path / 'nothing'),
                                   data_dir=mnist_dir)
  np.testing.assert_array_equal(arrays.labels, mnist['test'].labels)


# ---------------------------------------------------------------------------
# Real Fashion-MNIST, through the online path.


@requires_raw
def test_fashion_mnist_sizes_and_balanced_labels(fashion_mnist):
  arrays, _ = fashion_mnist
  for split, n in (('train', 60000), ('test', 10000)):
    assert arrays[split].images.shape == (n, 28, 28, 1)
    assert arrays[split].images.dtype == np.uint8
    assert np.bincount(arrays[split].labels).tolist() == [n // 10] * 10


@requires_raw
def test_fashion_mnist_downloads_registered_urls(fashion_mnist):
  arrays, requested = fashion_mnist
  url = metacf.data.MetacfFashionMnist.URL
  assert requested == sorted(url + f for f in _IDX_FILES)
  images = _read_idx_oracle(
      os.path.join(RAW_DIR, 'fashion_mnist', 't10k-images-idx3-ubyte.gz'))
  np.testing.assert_array_equal(arrays['test'].images.ravel(), images)


@requires_raw
@pytest.mark.parametrize('cls', [metacf.data.MetacfMnist,
                                 metacf.data.MetacfFashionMnist],
                         ids=['mnist', 'fashion_mnist'])
def test_registered_checksums_match_staged_idx_files(cls):
  url_infos = cls.url_infos
  for fname in _IDX_FILES:
    path = os.path.join(RAW_DIR, cls.RAW_SUBDIR, fname)
    info = url_infos[cls.URL + fname]
    assert info.size == os.path.getsize(path)
    assert info.checksum == _sha256(path)


@requires_raw
def test_online_omniglot_rejects_rebuilt_zips(tmp_path):
  """The staged Omniglot zips are re-packed: the online path refuses them."""
  requested = []
  with _serve_raw_files(RAW_DIR, requested):
    builder = metacf.data.get_builder('omniglot', data_dir=str(tmp_path))
    assert builder.raw_dir is None
    with pytest.raises(download_manager.NonMatchingChecksumError,
                       match='images_background.zip'):
      builder.download_and_prepare()
  assert metacf.data.MetacfOmniglot.URL + 'images_background.zip' in requested


# ---------------------------------------------------------------------------
# Real Omniglot.


@requires_raw
def test_omniglot_sizes_and_labels(omniglot):
  for split, num_characters, num_alphabets in (('background', 964, 30),
                                               ('evaluation', 659, 20)):
    arrays = omniglot[split]
    n = num_characters * 20
    assert arrays.images.shape == (n, 105, 105, 1)
    assert arrays.images.dtype == np.uint8
    num_black = np.count_nonzero(arrays.images == 0)
    num_white = np.count_nonzero(arrays.images == 255)
    assert num_black > 0 and num_white > 0
    assert num_black + num_white == arrays.images.size  # Binary images.
    np.testing.assert_array_equal(
        arrays.labels, np.repeat(np.arange(num_characters, dtype=np.int32),
                                 20))
    assert arrays.alphabets.dtype == np.int32
    assert np.unique(arrays.alphabets).size == num_alphabets
  # Character 0001 is Arcadian's first character; 0965 is Angelic's.
  assert _omniglot.ALPHABETS[omniglot['background'].alphabets[0]] == 'Arcadian'
  assert _omniglot.ALPHABETS[omniglot['evaluation'].alphabets[0]] == 'Angelic'


@requires_raw
@pytest.mark.parametrize('split', ['background', 'evaluation'])
def test_omniglot_pixels_match_source_arrays(omniglot, split):
  """``source/images_<split>.npz``: bool [characters, 20, 105, 105], True =
  white; ``[c, d]`` is ``XXXX_YY.png`` with XXXX the split's c-th character
  number and YY = d + 1; its ``labels`` [characters, 20] is c."""
  path = os.path.join(RAW_DIR, 'omniglot', 'source', f'images_{split}.npz')
  if not os.path.isfile(path):
    pytest.skip(f'{path} not found')
  with np.load(path) as npz:
    source_images, source_labels = npz['images'], npz['labels']
  arrays = omniglot[split]
  num_characters = source_images.shape[0]
  images = arrays.images.reshape(num_characters, 20, 105, 105)
  # np.array_equal: assert_array_equal takes seconds on 2e8 elements.
  assert np.array_equal(images == 255, source_images)
  np.testing.assert_array_equal(arrays.labels.reshape(num_characters, 20),
                                source_labels)


@requires_raw
def test_omniglot_small1_is_a_subset_of_background(omniglot, omniglot_dir):
  small = metacf.data.load_arrays('omniglot', 'small1', data_dir=omniglot_dir)
  assert small.images.shape == (2720, 105, 105, 1)
  with zipfile.ZipFile(os.path.join(RAW_DIR, 'omniglot',
                                    'images_background_small1.zip')) as zf:
    numbers = sorted({int(n.rsplit('/', 1)[1][:4]) for n in zf.namelist()
                      if n.endswith('.png')})
  assert len(numbers) == 136
  background = omniglot['background'].images.reshape(964, 20, 105, 105)
  np.testing.assert_array_equal(
      small.images.reshape(136, 20, 105, 105),
      background[np.array(numbers) - 1])
  np.testing.assert_array_equal(small.labels,
                                np.repeat(np.arange(136, dtype=np.int32), 20))


# ---------------------------------------------------------------------------
# Synthetic raw files: round trip, env vars, cache, and every error.


def test_synthetic_mnist_round_trip_through_env_vars(tmp_path, monkeypatch):
  raw_dir, data_dir = tmp_path / 'raw', tmp_path / 'tfds'
  written = _write_mnist_raw(str(raw_dir))
  monkeypatch.setenv('METACF_RAW_DIR', str(raw_dir))
  monkeypatch.setenv('METACF_DATA_DIR', str(data_dir))
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    arrays = metacf.data.load_arrays('mnist', split)
    np.testing.assert_array_equal(arrays.images[..., 0], written[prefix][0])
    np.testing.assert_array_equal(arrays.labels, written[prefix][1])
    assert arrays.labels.dtype == np.int32
  assert (data_dir / 'metacf_mnist' / '1.0.0' / 'dataset_info.json').is_file()


def test_cache_is_used_and_rebuilt_when_unreadable(tmp_path):
  raw_dir, data_dir = str(tmp_path / 'raw'), str(tmp_path / 'tfds')
  written = _write_mnist_raw(raw_dir)
  metacf.data.load_arrays('mnist', 'train', raw_dir=raw_dir,
                          data_dir=data_dir)
  version_dir = tmp_path / 'tfds' / 'metacf_mnist' / '1.0.0'
  (cache,) = version_dir.glob('arrays_train*.npz')
  assert not list(version_dir.glob('*.tmp'))
  # A hit reads only the cache: the array_record files are not needed.
  records = version_dir / 'metacf_mnist-train.array_record-00000-of-00001'
  saved = records.read_bytes()
  records.unlink()
  arrays = metacf.data.load_arrays('mnist', 'train', data_dir=data_dir)
  np.testing.assert_array_equal(arrays.images[..., 0], written['train'][0])
  # An unreadable cache (garbage, or truncated) is rebuilt from the prepared
  # dataset.
  records.write_bytes(saved)
  for content in (b'not an npz', cache.read_bytes()[:200]):
    cache.write_bytes(content)
    arrays = metacf.data.load_arrays('mnist', 'train', data_dir=data_dir)
    np.testing.assert_array_equal(arrays.images[..., 0], written['train'][0])
    with np.load(cache) as npz:
      np.testing.assert_array_equal(npz['labels'], written['train'][1])


def test_png_codec_round_trip():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (7, 5), dtype=np.uint8)
  png = _png.encode_gray(image)
  np.testing.assert_array_equal(_png.decode_gray(png), image)
  with Image.open(io.BytesIO(png)) as img:  # A standard PNG.
    assert img.mode == 'L'
    np.testing.assert_array_equal(np.asarray(img), image)
  # Other PNGs (here 1-bit, adaptive filters) go through Pillow.
  np.testing.assert_array_equal(_png.decode_gray(_png_1bit((4, 3))),
                                np.full((3, 4), 255, np.uint8))


@pytest.mark.parametrize(
    'name, split, dtype, message',
    [
        ('cifar10', 'train', np.uint8,
         "load_arrays: name must be one of ['fashion_mnist', 'mnist', "
         "'omniglot'], got 'cifar10'."),
        ('mnist', 'background', np.uint8,
         "load_arrays: split must be one of ['train', 'test'] for 'mnist', "
         "got 'background'."),
        ('omniglot', 'train', np.uint8,
         "load_arrays: split must be one of ['background', 'evaluation', "
         "'small1', 'small2'] for 'omniglot', got 'train'."),
        ('mnist', 'train', np.float64,
         'load_arrays: dtype must be np.uint8 or np.float32, got float64.'),
        ('mnist', 'train', 'not a dtype',
         "load_arrays: dtype must be np.uint8 or np.float32, got "
         "'not a dtype'."),
    ],
    ids=['name', 'split', 'omniglot_split', 'dtype', 'bad_dtype'])
def test_bad_arguments_raise(tmp_path, name, split, dtype, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    metacf.data.load_arrays(name, split, dtype=dtype,
                            data_dir=str(tmp_path))
  assert not os.listdir(tmp_path)  # Checked before anything is prepared.


def test_get_builder_rejects_unknown_name():
  with pytest.raises(ValueError, match=re.escape(
      "get_builder: name must be one of ['fashion_mnist', 'mnist', "
      "'omniglot', 'tiny_shakespeare'], got 'emnist'.")):
    metacf.data.get_builder('emnist')


@pytest.mark.parametrize('name, subdir, what', [
    ('mnist', 'mnist', 'MNIST IDX file'),
    ('fashion_mnist', 'fashion_mnist', 'Fashion-MNIST IDX file'),
])
def test_missing_idx_file_raises(tmp_path, name, subdir, what):
  raw_dir = str(tmp_path / 'raw')
  _write_mnist_raw(raw_dir, subdir=subdir)
  path = os.path.join(raw_dir, subdir, 't10k-labels-idx1-ubyte.gz')
  os.remove(path)
  message = (
      f'metacf_{name}: {path} must exist (expected the {what} '
      f't10k-labels-idx1-ubyte.gz from raw_dir={raw_dir}, laid out as '
      f'<raw_dir>/{subdir}/t10k-labels-idx1-ubyte.gz), got no such file.')
  with pytest.raises(FileNotFoundError, match=re.escape(message)):
    metacf.data.load_arrays(name, 'train', raw_dir=raw_dir,
                            data_dir=str(tmp_path / 'tfds'))


@pytest.mark.parametrize(
    'fname, content, message',
    [
        ('train-images-idx3-ubyte.gz', b'plain bytes, not gzip',
         "must be a gzip-compressed IDX file, got a file gzip cannot read "
         "(Not a gzipped file (b'pl'))."),
        ('train-images-idx3-ubyte.gz', gzip.compress(b'\x00\x00', mtime=0),
         'must start with the 4-byte IDX magic number 0x00000803, got only 2 '
         'bytes.'),
        ('train-images-idx3-ubyte.gz',
         _idx_bytes(0x801, (5,), bytes(5)),
         'must start with the IDX magic number 0x00000803 (unsigned bytes, 3 '
         'dimensions), got 0x00000801.'),
        ('train-images-idx3-ubyte.gz',
         _idx_bytes(0x803, (5, 28), b''),
         'must have a 16-byte IDX header, got 12 bytes.'),
        ('train-images-idx3-ubyte.gz',
         _idx_bytes(0x803, (5, 27, 28), bytes(5 * 27 * 28)),
         'must hold images of shape 28x28, got 27x28.'),
        ('train-images-idx3-ubyte.gz',
         _idx_bytes(0x803, (5, 28, 28), bytes(4 * 28 * 28)),
         'must hold 3920 values after its 16-byte header (shape (5, 28, 28)),'
         ' got 3136.'),
        ('train-labels-idx1-ubyte.gz',
         _idx_bytes(0x801, (4,), bytes(4)),
         'must hold one label per image of {images} (5), got 4.'),
        ('train-labels-idx1-ubyte.gz',
         _idx_bytes(0x801, (5,), bytes([0, 1, 2, 12, 3])),
         'must hold labels in [0, 9], got 12.'),
    ],
    ids=['not_gzip', 'short', 'magic', 'header', 'dims', 'truncated',
         'label_count', 'label_range'])
def test_corrupt_idx_file_raises(tmp_path, fname, content, message):
  raw_dir = str(tmp_path / 'raw')
  _write_mnist_raw(raw_dir)
  folder = os.path.join(raw_dir, 'mnist')
  path = os.path.join(folder, fname)
  with open(path, 'wb') as f:
    f.write(content)
  images = os.path.join(folder, 'train-images-idx3-ubyte.gz')
  message = f'metacf_mnist: {path} ' + message.format(images=images)
  with pytest.raises(ValueError, match=re.escape(message)):
    metacf.data.load_arrays('mnist', 'train', raw_dir=raw_dir,
                            data_dir=str(tmp_path / 'tfds'))
  # Nothing half-prepared is left behind.
  assert not (tmp_path / 'tfds' / 'metacf_mnist' / '1.0.0').exists()


def test_missing_omniglot_zip_raises(tmp_path):
  raw_dir = str(tmp_path / 'raw')
  _write_zip(os.path.join(raw_dir, 'omniglot', 'images_background.zip'), {})
  path = os.path.join(raw_dir, 'omniglot', 'images_evaluation.zip')
  message = (
      f'metacf_omniglot: {path} must exist (expected the Omniglot zip '
      f'images_evaluation.zip from raw_dir={raw_dir}, laid out as '
      '<raw_dir>/omniglot/images_evaluation.zip), got no such file.')
  with pytest.raises(FileNotFoundError, match=re.escape(message)):
    metacf.data.load_arrays('omniglot', 'evaluation', raw_dir=raw_dir,
                            data_dir=str(tmp_path / 'tfds'))


_LAYOUT = 'images_background/<Alphabet>/characterNN/XXXX_YY.png'
_GOOD = 'images_background/Latin/character01/0001_{:02d}.png'


@pytest.mark.parametrize(
    'members, message',
    [
        (None, 'must be a zip archive, got a file zipfile cannot read '
         '(File is not a zip file).'),
        ({}, f'must hold PNGs laid out as {_LAYOUT}, got none among its 0 '
         'members.'),
        ({'images_background/Latin/0001_01.png': b''},
         f"must hold only PNGs laid out as {_LAYOUT}, got "
         "'images_background/Latin/0001_01.png'."),
        ({'images_evaluation/Latin/character01/0001_01.png': b''},
         f"must hold only PNGs laid out as {_LAYOUT}, got "
         "'images_evaluation/Latin/character01/0001_01.png'."),
        ({'images_background/Klingon/character01/0001_01.png': b''},
         "must hold only Omniglot alphabets, got 'Klingon' in "
         "'images_background/Klingon/character01/0001_01.png'."),
        ({'images_background/Latin/character01/1700_01.png': b''},
         'must name drawings XXXX_YY.png with XXXX in [0001, 1623] and YY in '
         "[01, 20], got 'images_background/Latin/character01/1700_01.png'."),
        ({'images_background/Latin/character01/0001_01.png': b'',
          'images_background/Latin/character01/0002_02.png': b''},
         'must use one character number XXXX per character folder, got '
         "'images_background/Latin/character01/0002_02.png' where "
         'Latin/character01 is 0001 and 0002 is Latin/character01.'),
        ({_GOOD.format(d): b'' for d in range(1, 21)},
         'must hold 964 characters x 20 drawers = 19280 PNGs, got 1 '
         'characters and 20 PNGs.'),
        ({_GOOD.format(d): b'' for d in range(1, 20)},
         'must hold 964 characters x 20 drawers = 19280 PNGs, got 1 '
         'characters and 19 PNGs (character 0001 has 19 drawers).'),
    ],
    ids=['not_zip', 'empty', 'no_character_dir', 'wrong_top', 'alphabet',
         'number', 'two_numbers', 'too_few', 'missing_drawer'])
def test_bad_omniglot_zip_raises(tmp_path, members, message):
  raw_dir = str(tmp_path / 'raw')
  for fname in _OMNIGLOT_ZIPS:
    _write_zip(os.path.join(raw_dir, 'omniglot', fname), {})
  path = os.path.join(raw_dir, 'omniglot', 'images_background.zip')
  if members is None:
    with open(path, 'wb') as f:
      f.write(b'not a zip')
  else:
    _write_zip(path, members)
  with pytest.raises(ValueError,
                     match=re.escape(f'metacf_omniglot: {path} {message}')):
    metacf.data.load_arrays('omniglot', 'background', raw_dir=raw_dir,
                            data_dir=str(tmp_path / 'tfds'))


def test_omniglot_zip_ignores_directories_and_archiver_files(tmp_path):
  path = str(tmp_path / 'images_background.zip')
  members = {'images_background/': b'', '__MACOSX/._x': b'',
             'images_background/Latin/.DS_Store': b''}
  members.update({_GOOD.format(d): _png_1bit() for d in range(20, 0, -1)})
  _write_zip(path, members)
  entries = _omniglot.list_zip(path, top='images_background',
                               num_characters=1, context='ctx')
  assert [e.member for e in entries] == [_GOOD.format(d)
                                         for d in range(1, 21)]
  assert {(e.alphabet, e.alphabet_char_id) for e in entries} == {('Latin', 0)}


@pytest.mark.parametrize(
    'png, message',
    [
        (b'\x89PNG\r\n\x1a\n garbage',
         "must hold valid PNGs, got 'images_background/Latin/character01/"
         "0001_01.png' that cannot be decoded"),
        (_png_1bit((105, 104)),
         "must hold 105x105 images, got 105x104 in "
         "'images_background/Latin/character01/0001_01.png'."),
    ],
    ids=['garbage', 'size'])
def test_bad_omniglot_png_raises(tmp_path, png, message):
  path = str(tmp_path / 'images_background.zip')
  members = {_GOOD.format(d): _png_1bit() for d in range(1, 21)}
  members[_GOOD.format(1)] = png
  _write_zip(path, members)
  entries = _omniglot.list_zip(path, top='images_background',
                               num_characters=1, context='ctx')
  assert [(e.character, e.drawer) for e in entries] == [(0, d)
                                                       for d in range(20)]
  with pytest.raises(ValueError, match=re.escape(f'ctx: {path} {message}')):
    list(_omniglot.read_images(path, entries, context='ctx'))


def test_import_metacf_does_not_import_tfds():
  code = ('import sys, metacf; '
          "assert 'tensorflow_datasets' not in sys.modules; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)))


def test_metacf_data_does_not_import_tensorflow():
  assert 'tensorflow' not in sys.modules
