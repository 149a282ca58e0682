"""README.md: its size limit, and every ```python block runs.

The blocks run in order in one shared namespace, under the strict JAX
settings of ``conftest.py`` (rank and dtype promotion raise) and pytest's
``filterwarnings = error``, so the quick start cannot rot.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.DOTALL | re.MULTILINE)


def _python_blocks(text):
  return _BLOCK.findall(text)


def test_readme_is_at_most_10000_characters():
  text = README.read_text(encoding='utf-8')
  assert len(text) <= 10_000, f'README.md has {len(text)} characters, limit 10,000.'


def test_quick_start_is_at_most_40_lines():
  text = README.read_text(encoding='utf-8')
  section = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
  blocks = _python_blocks(section)
  assert len(blocks) == 1, 'the quick start is one ```python block'
  num_lines = len(blocks[0].rstrip('\n').splitlines())
  assert num_lines <= 40, f'the quick start has {num_lines} lines, limit 40.'


def test_relative_links_exist():
  text = README.read_text(encoding='utf-8')
  links = re.findall(r'\]\(([^)#\s]+)\)', text)
  missing = [link for link in links if '://' not in link
             and not (README.parent / link).exists()]
  assert not missing, f'README.md links to missing files: {missing}'


def test_python_blocks_run():
  blocks = _python_blocks(README.read_text(encoding='utf-8'))
  assert blocks, 'README.md has no ```python block'
  namespace = {'__name__': '__readme__'}
  for i, block in enumerate(blocks):
    code = compile(block, f'README.md, python block {i}', 'exec')
    exec(code, namespace)  # pylint: disable=exec-used
