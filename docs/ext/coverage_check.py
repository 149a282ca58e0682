"""Fails the docs build when a public metacf name has no API entry.

The public API is every name in ``metacf.<subpackage>.__all__`` (the
subpackages are the module entries of ``metacf.__all__`` plus
``metacf.data``, which ``import metacf`` does not import) and the
top-level functions in ``metacf.__all__``. Once a Sphinx build has read all sources, this
extension compares those names with the objects that autodoc registered in
the Python domain and fails the build with an error listing what is missing.

:func:`autosummary_names` reads the same information from the sources
(the ``autosummary`` tables in ``docs/api/*.rst``), so
``tests/test_docs.py`` catches a missing entry without building; the
build-time check stays the authority.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import types
from collections.abc import Iterable, Mapping

# Subpackages that ``import metacf`` does not import (see metacf/__init__.py).
EXTRA_SUBPACKAGES = ('data',)

API_DIR = pathlib.Path(__file__).resolve().parent.parent / 'api'


def public_names() -> dict[str, list[str]]:
  """Maps each public module to the fully qualified names it exports.

  Returns:
    ``{'metacf': ['metacf.runtime_checks', ...], 'metacf.adapters':
    ['metacf.adapters.count_params', ...], ...}``: for ``metacf`` its
    non-module ``__all__`` entries, for each subpackage its whole ``__all__``.
  """
  metacf = importlib.import_module('metacf')
  subpackages = []
  top_level = []
  for name in metacf.__all__:
    if isinstance(getattr(metacf, name), types.ModuleType):
      subpackages.append(name)
    else:
      top_level.append(name)
  subpackages.extend(s for s in EXTRA_SUBPACKAGES if s not in subpackages)
  names = {'metacf': [f'metacf.{n}' for n in top_level]}
  for sub in sorted(subpackages):
    module = importlib.import_module(f'metacf.{sub}')
    names[module.__name__] = [f'{module.__name__}.{n}' for n in module.__all__]
  return names


_DIRECTIVE = re.compile(r'^(\s*)\.\.\s+([\w:-]+)::\s*(\S*)\s*$')


def autosummary_names(api_dir: pathlib.Path | str = API_DIR) -> set[str]:
  """Fully qualified names in the ``autosummary`` tables of ``api_dir/*.rst``.

  Entries are resolved against the ``.. currentmodule::`` (or
  ``.. module::`` / ``.. automodule::``) in force where the table sits;
  already-qualified entries (``metacf.x.y``) are kept as they are.
  """
  found = set()
  for path in sorted(pathlib.Path(api_dir).glob('*.rst')):
    current = ''
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
      match = _DIRECTIVE.match(lines[i])
      i += 1
      if not match:
        continue
      indent, directive, argument = match.groups()
      if directive in ('currentmodule', 'module', 'py:currentmodule',
                       'py:module', 'automodule'):
        current = argument
      elif directive == 'autosummary':
        # The body: options (':toctree: ...'), blank lines, then one name a line,
        # until a line indented no deeper than the directive.
        while i < len(lines):
          line = lines[i]
          if line.strip() and (len(line) - len(line.lstrip())) <= len(indent):
            break
          i += 1
          entry = line.strip()
          if not entry or entry.startswith(':') or entry.startswith('..'):
            continue
          entry = entry.lstrip('~')
          if entry.startswith('metacf.') or not current:
            found.add(entry)
          else:
            found.add(f'{current}.{entry}')
  return found


def missing_names(documented: Iterable[str],
                  public: Mapping[str, Iterable[str]] | None = None) -> list[str]:
  """The public names (see :func:`public_names`) not in ``documented``."""
  if public is None:
    public = public_names()
  documented = set(documented)
  return sorted(n for names in public.values() for n in names
                if n not in documented)


def message(missing: Iterable[str]) -> str:
  missing = list(missing)
  return (f'{len(missing)} public metacf name(s) have no entry in the API '
          'reference (add them to an autosummary table in docs/api/*.rst): '
          + ', '.join(missing))


def _check(app, env) -> None:
  """Logs an error and fails the build if a public name is not documented."""
  missing = missing_names(env.get_domain('py').objects)
  if missing:
    from sphinx.util import logging  # pylint: disable=g-import-not-at-top
    logging.getLogger(__name__).error(message(missing))
    app.statuscode = 1  # fails the build with or without -W


def setup(app):
  # After all sources are read (and parallel readers' domain data merged),
  # before anything is written: every builder (html, doctest) runs it.
  app.connect('env-check-consistency', _check)
  return {'version': '1', 'parallel_read_safe': True,
          'parallel_write_safe': True}
