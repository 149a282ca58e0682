"""metacf.data reads its cached arrays without tensorflow-datasets.

A lent GPU machine has no tfds: ``load_arrays`` must find and read a copied
cache with NumPy alone, and say clearly what is missing otherwise. The
no-tfds cases run in a subprocess whose ``PYTHONPATH`` starts with a folder
holding a ``tensorflow_datasets`` package that raises ImportError, as a
machine without it would.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import metacf.data
from metacf.data import _arrays
from metacf.data import _builders

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocker(tmp_path, *names):
  """A folder whose packages ``names`` raise ImportError when imported."""
  folder = tmp_path / 'blocked'
  for name in names:
    (folder / name).mkdir(parents=True)
    (folder / name / '__init__.py').write_text(
        f'raise ImportError("{name} is blocked by the test")\n')
  return str(folder)


def _run_without_tfds(tmp_path, code, **env):
  full_env = {**os.environ, **env,
              'PYTHONPATH': os.pathsep.join(
                  [_blocker(tmp_path, 'tensorflow_datasets'), _ROOT])}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                        cwd=_ROOT, env=full_env, capture_output=True,
                        text=True, timeout=120)


def _write_cache(data_dir, name, split, num=6):
  rng = np.random.default_rng(0)
  arrays = {'images': rng.integers(0, 256, (num, 5, 5, 1), dtype=np.uint8),
            'labels': np.arange(num, dtype=np.int32)}
  if name == 'omniglot':
    arrays['alphabets'] = np.zeros(num, np.int32)
  path = _arrays.cache_path(name, split, data_dir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _arrays._write_atomically(path, arrays)  # pylint: disable=protected-access
  return path, arrays


@pytest.mark.parametrize('name', sorted(_arrays.SPLITS))
def test_cache_path_is_where_the_builder_writes(name, tmp_path, monkeypatch):
  cls = getattr(_builders, _arrays._BUILDER_NAMES[name])  # pylint: disable=protected-access
  assert str(cls.VERSION) == _arrays._BUILDER_VERSION  # pylint: disable=protected-access
  monkeypatch.delenv('METACF_DATA_DIR', raising=False)
  builder = metacf.data.get_builder(name, data_dir=str(tmp_path))
  assert _arrays.cache_path(name, 'x', tmp_path) == os.path.join(
      str(builder.data_dir), 'arrays_x.v1.npz')
  monkeypatch.setenv('METACF_DATA_DIR', str(tmp_path / 'env'))
  builder = metacf.data.get_builder(name)
  assert _arrays.cache_path(name, 'x') == os.path.join(
      str(builder.data_dir), 'arrays_x.v1.npz')


def test_tfds_default_data_dir_is_mirrored(monkeypatch, tmp_path):
  monkeypatch.delenv('METACF_DATA_DIR', raising=False)
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert _arrays.cache_path('mnist', 'test') == str(
      tmp_path / 'metacf_mnist' / '1.0.0' / 'arrays_test.v1.npz')
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert _arrays.cache_path('mnist', 'test') == os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets', 'metacf_mnist',
      '1.0.0', 'arrays_test.v1.npz')


def test_splits_match_the_builders():
  assert _arrays.SPLITS['omniglot'] == tuple(_builders.OMNIGLOT_SPLITS)
  assert sorted(_arrays.SPLITS) == sorted(_arrays._BUILDER_NAMES)  # pylint: disable=protected-access


def test_cache_hit_needs_no_tfds(tmp_path):
  data_dir = tmp_path / 'data'
  _, mnist = _write_cache(data_dir, 'mnist', 'train')
  _, omniglot = _write_cache(data_dir, 'omniglot', 'evaluation')
  np.savez(tmp_path / 'expected.npz', mnist=mnist['images'],
           omniglot=omniglot['images'])
  result = _run_without_tfds(tmp_path, f'''
      import sys
      import numpy as np
      import metacf.data
      a = metacf.data.load_arrays('mnist', 'train', dtype=np.float32)
      o = metacf.data.load_arrays('omniglot', 'evaluation',
                                  data_dir={str(data_dir)!r})
      e = np.load({str(tmp_path / 'expected.npz')!r})
      np.testing.assert_array_equal(a.images, e['mnist'] / np.float32(255))
      np.testing.assert_array_equal(o.images, e['omniglot'])
      assert a.alphabets is None and o.alphabets.shape == (6,)
      assert 'tensorflow_datasets' not in sys.modules
      print('OK')
      ''', METACF_DATA_DIR=str(data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'OK' in result.stdout


def test_cache_miss_without_tfds_names_the_cache(tmp_path):
  data_dir = tmp_path / 'data'
  _write_cache(data_dir, 'mnist', 'train')
  missing = _arrays.cache_path('mnist', 'test', data_dir)
  result = _run_without_tfds(tmp_path, f'''
      import metacf.data
      try:
        metacf.data.load_arrays('mnist', 'test', data_dir={str(data_dir)!r})
      except FileNotFoundError as e:
        print('MESSAGE', e)
      try:
        metacf.data.MetacfMnist
      except ImportError as e:
        print('BUILDER', e)
      try:
        metacf.data.get_builder('omniglot')
      except ImportError as e:
        print('GET_BUILDER', e)
      ''')
  assert result.returncode == 0, result.stderr[-3000:]
  message = result.stdout.split('MESSAGE', 1)[1].split('BUILDER', 1)[0]
  assert missing in message
  assert "pip install 'metacf[data]'" in message
  assert 'benchmarks.gpu --prepare' in message
  assert 'METACF_DATA_DIR' in message
  for key in ('\nBUILDER', 'GET_BUILDER'):
    line = result.stdout.split(key, 1)[1].splitlines()[0]
    assert "pip install 'metacf[data]'" in line
    assert 'tensorflow_datasets is blocked' in line


def test_builders_still_load_lazily_with_tfds():
  assert metacf.data.MetacfMnist is _builders.MetacfMnist
  assert {'MetacfMnist', 'MetacfOmniglot', 'MetacfFashionMnist'} <= set(
      metacf.data.__all__)
  with pytest.raises(AttributeError, match='no attribute'):
    metacf.data.NoSuchThing  # pylint: disable=pointless-statement
