"""Loads sphinx-mathjax-offline and declares it safe for parallel builds.

The package (import name ``sphinx-mathjax-offline``, with hyphens) points
``mathjax_path`` at a bundled MathJax 3 and copies it into ``_static`` at the
end of the build, so math renders with no network. Its ``setup`` does not
declare parallel safety, so Sphinx would warn (an error under ``-W``) and
read serially under ``-j``; it keeps no state, so this wrapper declares it.
"""

import importlib

_mathjax_offline = importlib.import_module('sphinx-mathjax-offline')


def setup(app):
  _mathjax_offline.setup(app)
  return {'version': '1', 'parallel_read_safe': True,
          'parallel_write_safe': True}
