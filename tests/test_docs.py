"""The API reference covers every public name, checked without building.

``docs/ext/coverage_check.py`` fails the Sphinx build when a public name has
no entry; these tests read the autosummary tables of ``docs/api/*.rst``
directly, so a missing or stale entry fails in seconds. ``make docs`` also
runs ``docs/ext/check_build.py`` on the real build (its ``objects.inv``, read
with a reader of its own, and one page per name); it is tested here on a
synthetic build.
The other docs extensions (``type_aliases``, ``namedtuple_fields``) are tested
on their own, without Sphinx.
"""

import importlib.util
import inspect
import os
import sys
import tempfile
import textwrap
import types
import unittest
import zlib

import jax
from metacf.typing import MaskSpec, Params, PRNGKey

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = os.path.join(_ROOT, 'docs')


def _load_ext(name):
  path = os.path.join(_DOCS, 'ext', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_coverage_check():
  return _load_ext('coverage_check')


coverage_check = _load_coverage_check()
type_aliases = _load_ext('type_aliases')
sys.modules.setdefault('type_aliases', type_aliases)  # imported by the next one
namedtuple_fields = _load_ext('namedtuple_fields')
check_build = _load_ext('check_build')


class PublicNamesTest(unittest.TestCase):

  def test_every_subpackage_is_listed(self):
    names = coverage_check.public_names()
    self.assertIn('metacf', names)
    self.assertLessEqual(
        {'metacf.adapters', 'metacf.data', 'metacf.jacobian', 'metacf.maml',
         'metacf.protect', 'metacf.typing'}, set(names))
    self.assertIn('metacf.runtime_checks', names['metacf'])
    self.assertNotIn('metacf.maml', names['metacf'])  # modules are pages, not entries
    self.assertIn('metacf.protect.ewc', names['metacf.protect'])


class AutosummaryTablesTest(unittest.TestCase):

  def test_every_public_name_has_an_entry(self):
    missing = coverage_check.missing_names(coverage_check.autosummary_names())
    self.assertEqual([], missing, 'add these to a table in docs/api/*.rst')

  def test_every_entry_is_a_public_name(self):
    public = {n for names in coverage_check.public_names().values()
              for n in names}
    stale = coverage_check.autosummary_names() - public
    self.assertEqual(set(), stale, 'not in any __all__: remove from docs/api')

  def test_parser_follows_currentmodule_and_skips_options(self):
    rst = textwrap.dedent('''\
        Title
        =====

        .. currentmodule:: metacf.a

        .. autosummary::
           :toctree: _autosummary

           f
           ~g
           metacf.b.h

        Text.

        .. currentmodule:: metacf

        .. autosummary::

           runtime_checks
        ''')
    with tempfile.TemporaryDirectory() as tmp:
      with open(os.path.join(tmp, 'x.rst'), 'w') as f:
        f.write(rst)
      self.assertEqual(
          {'metacf.a.f', 'metacf.a.g', 'metacf.b.h', 'metacf.runtime_checks'},
          coverage_check.autosummary_names(tmp))


class BuildTimeCheckTest(unittest.TestCase):

  def _app_env(self, documented):
    domain = types.SimpleNamespace(objects=dict.fromkeys(documented))
    env = types.SimpleNamespace(get_domain=lambda name: domain)
    return types.SimpleNamespace(statuscode=0), env

  def test_message_lists_the_missing_names(self):
    self.assertRegex(
        coverage_check.message(['metacf.protect.ewc', 'metacf.runtime_checks']),
        r'^2 public.*docs/api/\*\.rst\): metacf\.protect\.ewc, '
        r'metacf\.runtime_checks$')

  def test_passes_when_everything_is_documented(self):
    public = coverage_check.public_names()
    documented = {n for names in public.values() for n in names}
    app, env = self._app_env(documented | {'metacf.extra'})
    coverage_check._check(app, env)
    self.assertEqual(0, app.statuscode)

  def test_fails_the_build_when_a_name_is_missing(self):
    public = coverage_check.public_names()
    documented = {n for names in public.values() for n in names}
    app, env = self._app_env(documented - {'metacf.protect.ewc'})
    with self.assertLogs('sphinx.coverage_check', 'ERROR') as logs:
      coverage_check._check(app, env)
    self.assertEqual(1, app.statuscode)
    self.assertIn('metacf.protect.ewc', logs.output[0])


def _kernel(params: Params, key: PRNGKey | None = None, *,
            mask: MaskSpec = None, n: int = 1,
            x: jax.typing.ArrayLike = 0) -> Params:
  del key, mask, n, x
  return params


class TypeAliasesTest(unittest.TestCase):

  def test_signature_names_the_aliases(self):
    kernel = types.FunctionType(_kernel.__code__, _kernel.__globals__,
                                '_kernel', _kernel.__defaults__)
    kernel.__kwdefaults__ = _kernel.__kwdefaults__
    kernel.__annotations__ = dict(_kernel.__annotations__)
    kernel.__module__ = 'metacf.fake'  # only metacf functions are rewritten
    type_aliases._before_signature(None, kernel, False)
    signature = inspect.signature(kernel)
    self.assertEqual('metacf.typing.Params',
                     signature.parameters['params'].annotation)
    self.assertEqual('metacf.typing.PRNGKey | None',
                     signature.parameters['key'].annotation)
    self.assertEqual('metacf.typing.MaskSpec',
                     signature.parameters['mask'].annotation)
    self.assertIs(int, signature.parameters['n'].annotation)
    self.assertEqual('jax.typing.ArrayLike',
                     signature.parameters['x'].annotation)
    self.assertEqual('metacf.typing.Params', signature.return_annotation)
    self.assertIsNot(Params, signature.parameters['params'].annotation)

  def test_qualify(self):
    self.assertEqual(
        'Callable[[metacf.typing.Params, metacf.typing.MaskSpec], '
        'jax.typing.ArrayLike | None]',
        type_aliases.qualify('Callable[[Params, masks.MaskSpec], '
                             'ArrayLike | None]'))
    self.assertEqual('jax.typing.ArrayLike',
                     type_aliases.qualify('jax.typing.ArrayLike'))
    self.assertEqual('jax.Array', type_aliases.qualify('jax.Array'))

  def test_leaves_other_modules_alone(self):
    def f(x: int) -> int:
      return x
    type_aliases._before_signature(None, f, False)
    self.assertEqual({'x': int, 'return': int}, f.__annotations__)


class NamedTupleFieldsTest(unittest.TestCase):

  def test_fields_from_comments_above_and_after(self):
    import metacf  # pylint: disable=g-import-not-at-top
    lines = []
    namedtuple_fields._process_docstring(
        None, 'class', 'metacf.replay.ClassBalancedBuffer',
        metacf.replay.ClassBalancedBuffer, None, lines)
    text = '\n'.join(lines)
    self.assertIn('.. attribute:: init\n'
                  '   :type: Callable[[metacf.typing.Params], '
                  'ClassBalancedState]\n\n   init(example_item) -> state', text)
    self.assertIn('.. attribute:: sample', text)
    lines = []
    namedtuple_fields._process_docstring(
        None, 'class', 'metacf.maml.MetaTrainMetrics',
        metacf.maml.MetaTrainMetrics, None, lines)
    self.assertIn('   shape=(), global norm of the meta-gradient.', lines)

  def test_own_attributes_section_wins(self):
    import metacf  # pylint: disable=g-import-not-at-top
    lines = []
    namedtuple_fields._process_docstring(
        None, 'class', 'metacf.jacobian.JacobianSVD',
        metacf.jacobian.JacobianSVD, None, lines)
    self.assertEqual([], lines)

  def test_escape(self):
    self.assertEqual(r'a \*b\* \`c\` d\_ e_f \|g',
                     namedtuple_fields._escape('a *b* `c` d_ e_f |g'))


class CheckBuildTest(unittest.TestCase):
  """docs/ext/check_build.py, which ``make docs`` runs on the real build."""

  def _fake_build(self, root, names, pages):
    lines = ''.join(f'{n} py:function 1 api/_autosummary/{n}.html -\n'
                    for n in names)
    os.makedirs(os.path.join(root, 'api', '_autosummary'))
    with open(os.path.join(root, 'objects.inv'), 'wb') as f:
      f.write(b'# Sphinx inventory version 2\n# Project: metacf\n'
              b'# Version: 0\n# The remainder of this file is compressed '
              b'using zlib.\n' + zlib.compress(lines.encode()))
    for n in pages:
      with open(os.path.join(root, 'api', '_autosummary', f'{n}.html'),
                'w') as f:
        f.write('<html></html>')

  def test_complete_build_passes(self):
    public = [n for v in coverage_check.public_names().values() for n in v]
    with tempfile.TemporaryDirectory() as root:
      self._fake_build(root, public + ['metacf.extra'], public)
      self.assertEqual([], check_build.problems(root))
      self.assertEqual(set(public) | {'metacf.extra'},
                       check_build.inventory_names(
                           os.path.join(root, 'objects.inv')))
      self.assertEqual(0, check_build.main(['check_build', root]))

  def test_missing_entry_and_page_are_reported(self):
    public = [n for v in coverage_check.public_names().values() for n in v]
    with tempfile.TemporaryDirectory() as root:
      self._fake_build(
          root, [n for n in public if n != 'metacf.protect.ewc'],
          [n for n in public if n != 'metacf.maml.maml_loss'])
      self.assertEqual(
          ['no inventory entry for metacf.protect.ewc',
           'no page api/_autosummary/metacf.maml.maml_loss.html'],
          check_build.problems(root))
      self.assertEqual(1, check_build.main(['check_build', root]))

  def test_no_build_is_a_problem(self):
    with tempfile.TemporaryDirectory() as root:
      self.assertIn('does not exist', check_build.problems(root)[0])


if __name__ == '__main__':
  unittest.main()
