"""Packaging: `import metacf` needs only jax, optax and numpy."""

import os
import subprocess
import sys
import textwrap
import tomllib

import chex

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImportTest(chex.TestCase):

  def test_import_metacf_imports_neither_flax_nor_tfds(self):
    script = textwrap.dedent('''
        import sys
        import metacf
        import metacf.maml, metacf.jacobian, metacf.replay, metacf.distill
        heavy = sorted(m for m in ('flax', 'tensorflow_datasets', 'tensorflow',
                                   'torch', 'orbax', 'matplotlib', 'tqdm')
                       if m in sys.modules)
        print('HEAVY', heavy)
        ''')
    result = subprocess.run([sys.executable, '-c', script], cwd=_ROOT,
                            capture_output=True, text=True, timeout=120)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertIn('HEAVY []', result.stdout)

  def test_core_dependencies_are_what_import_needs(self):
    with open(os.path.join(_ROOT, 'pyproject.toml'), 'rb') as f:
      project = tomllib.load(f)['project']
    names = lambda deps: {d.split('>')[0].split('=')[0].split('[')[0].strip()
                          for d in deps}
    self.assertEqual(names(project['dependencies']), {'jax', 'optax', 'numpy'})
    extras = project['optional-dependencies']
    self.assertLessEqual({'tensorflow-datasets', 'pillow',
                          'importlib_resources', 'array_record'},
                         names(extras['data']))
    self.assertLessEqual({'flax', 'tqdm', 'matplotlib', 'orbax-checkpoint',
                          'scipy'}, names(extras['experiments']))
    self.assertLessEqual({'pytest', 'chex'}, names(extras['dev']))


class MetadataTest(chex.TestCase):

  def _project(self):
    with open(os.path.join(_ROOT, 'pyproject.toml'), 'rb') as f:
      return tomllib.load(f)

  def test_requires_python_admits_the_tests_and_jax(self):
    # The tests import tomllib (3.11+) and jax >= 0.7 needs 3.11.
    self.assertEqual(self._project()['project']['requires-python'], '>=3.11')
    self.assertGreaterEqual(sys.version_info[:2], (3, 11))

  def test_license_is_an_spdx_string(self):
    self.assertEqual(self._project()['project']['license'], 'Apache-2.0')

  def test_py_typed_is_shipped(self):
    self.assertTrue(os.path.isfile(os.path.join(_ROOT, 'metacf', 'py.typed')))
    package_data = self._project()['tool']['setuptools']['package-data']
    self.assertIn('py.typed', package_data['metacf'])

  def test_typing_aliases_are_types_not_any(self):
    import typing  # pylint: disable=g-import-not-at-top
    import metacf  # pylint: disable=g-import-not-at-top
    for name in metacf.typing.__all__:
      alias = getattr(metacf.typing, name)
      self.assertIsNot(alias, typing.Any, name)
    args = typing.get_args(metacf.typing.MaskSpec)
    self.assertIn(str, args)
    self.assertIn(type(None), args)
