"""Sphinx configuration for the metacf documentation.

Build: ``make docs`` (HTML, warnings as errors, offline) and ``make doctest``
(runs every ``>>>`` example in the guide pages and in the docstrings that
autodoc renders). Nothing here reaches the network: no intersphinx, and
MathJax comes from the sphinx-mathjax-offline package.
"""

import os
import sys

_DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_DOCS))  # the repository root: metacf, experiments
sys.path.insert(0, os.path.join(_DOCS, 'ext'))  # coverage_check

# metacf.data reads the offline raw datasets from here if set (as the Makefile does);
# importing it for autodoc does not read any data.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import metacf  # noqa: E402  (after sys.path)

project = 'metacf'
author = 'metacf authors'
copyright = 'metacf authors'  # noqa: A001  (Sphinx's name)
release = metacf.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.doctest',
    'sphinx.ext.viewcode',
    'myst_parser',
    'mathjax_offline',  # docs/ext: sphinx-mathjax-offline, declared parallel-safe
    'coverage_check',  # docs/ext: fails the build if a public name has no entry
    'type_aliases',  # docs/ext: signatures say Params, not the Union it stands for
    'namedtuple_fields',  # docs/ext: NamedTuple fields from their source comments
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
templates_path = ['_templates']
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', '**/.ipynb_checkpoints']

# -- autodoc / autosummary ---------------------------------------------------
# Each docs/api/<subpackage>.rst holds an autosummary table with
# ``:toctree: _autosummary``: one generated page per public name goes into
# docs/api/_autosummary (git-ignored, rebuilt on every build).
autosummary_generate = True
autosummary_generate_overwrite = True
autosummary_imported_members = True
autodoc_typehints = 'signature'
autodoc_member_order = 'bysource'
autodoc_preserve_defaults = True
add_module_names = False
python_use_unqualified_type_names = True
python_display_short_literal_types = True

# -- napoleon: the code uses Google-style docstrings -------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False  # Attributes: as .. attribute:: entries, so :attr: links resolve
napoleon_attr_annotations = False  # field types are in the class signature

# -- doctest -----------------------------------------------------------------
doctest_global_setup = '''
import jax
import jax.numpy as jnp
import numpy as np
import optax
import metacf
'''
# Docstring examples (``>>>`` in autodoc output) run too, not only
# ``.. doctest::`` blocks.
doctest_test_doctest_blocks = 'default'

# -- math --------------------------------------------------------------------
# sphinx_mathjax_offline copies MathJax 3 into _static and points mathjax_path
# at it, so formulas render with no network.

# -- myst (Markdown pages, e.g. experiment write-ups) -------------------------
myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------
html_theme = 'furo'
html_title = f'metacf {release}'
html_static_path = []
html_show_sourcelink = False


def _viewcode_follow_imported(app, modname, fullname):
  """Source links only into metacf: none into jax or typing for the aliases."""
  del app
  import importlib  # pylint: disable=g-import-not-at-top
  obj = importlib.import_module(modname)
  try:
    for part in fullname.split('.'):
      obj = getattr(obj, part)
  except AttributeError:
    return None
  defined_in = getattr(obj, '__module__', None) or ''
  # The documenting module: viewcode finds no definition of an alias there
  # and adds no link.
  return defined_in if defined_in.startswith('metacf') else modname


def setup(app):
  app.connect('viewcode-follow-imported', _viewcode_follow_imported)
