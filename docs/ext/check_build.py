"""Checks a built HTML reference, independently of the Sphinx extension.

``coverage_check`` fails the build from inside Sphinx; this script reads what
the build wrote instead: the object inventory ``objects.inv`` (with its own
reader, not Sphinx's) and the generated page of each public name. ``make
docs`` runs it after ``sphinx-build``::

  python docs/ext/check_build.py docs/_build/html
"""

import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import coverage_check  # pylint: disable=g-import-not-at-top,wrong-import-position


def inventory_names(path: str) -> set[str]:
  """Object names in a Sphinx ``objects.inv`` (version 2: 4 header lines, zlib)."""
  with open(path, 'rb') as f:
    header = [f.readline() for _ in range(4)]
    if not header[0].startswith(b'# Sphinx inventory version 2'):
      raise ValueError(f'{path}: not a version-2 Sphinx inventory.')
    body = zlib.decompress(f.read()).decode()
  return {line.split(' ', 1)[0] for line in body.splitlines() if line}


def problems(html_dir: str) -> list[str]:
  """What the build at ``html_dir`` lacks: missing inventory entries or pages."""
  inventory = os.path.join(html_dir, 'objects.inv')
  if not os.path.exists(inventory):
    return [f'{inventory} does not exist: build the docs first.']
  out = [f'no inventory entry for {name}'
         for name in coverage_check.missing_names(inventory_names(inventory))]
  pages = os.path.join(html_dir, 'api', '_autosummary')
  for names in coverage_check.public_names().values():
    for name in names:
      if not os.path.exists(os.path.join(pages, f'{name}.html')):
        out.append(f'no page api/_autosummary/{name}.html')
  return out


def main(argv: list[str]) -> int:
  html_dir = argv[1] if len(argv) > 1 else os.path.join('docs', '_build', 'html')
  found = problems(html_dir)
  for line in found:
    print(f'check_build: {line}', file=sys.stderr)
  if not found:
    count = sum(len(v) for v in coverage_check.public_names().values())
    print(f'check_build: {count} public names, each with an inventory entry '
          'and a page.')
  return 1 if found else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
