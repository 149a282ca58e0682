"""Documents NamedTuple fields from their source comments.

metacf's state and result NamedTuples describe their fields in comments
(``items: Params  # pytree like example_item, every leaf [capacity, ...]``).
For a NamedTuple whose docstring has no ``Attributes:`` section, this
extension appends one ``.. attribute::`` entry per field, with its annotation
and comment, so the page lists the fields and ``:attr:`` references to them
resolve.
"""

import ast
import inspect
import io
import re
import textwrap
import tokenize

import type_aliases  # docs/ext

_SECTION = re.compile(r'^\s*(Attributes|Fields):\s*$', re.MULTILINE)


def _escape(text):
  """Comment text as literal rST prose (no emphasis, roles or references)."""
  text = text.replace('\\', '\\\\')
  for char in '*`|':
    text = text.replace(char, '\\' + char)
  return re.sub(r'_(?=\W|$)', r'\\_', text)


def _field_docs(cls):
  """``[(name, annotation source, comment)]`` for a NamedTuple class."""
  try:
    source = textwrap.dedent(inspect.getsource(cls))
  except (OSError, TypeError):
    return []
  comments = {}  # line number -> comment text
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = (token.start[1], token.string[1:].strip())
  lines = source.splitlines()
  node = ast.parse(source).body[0]
  fields = []
  for item in node.body:
    if not (isinstance(item, ast.AnnAssign) and
            isinstance(item.target, ast.Name)):
      continue
    text = []
    line = item.lineno - 1  # comment lines right above the field
    while line >= 1 and line in comments and lines[line - 1].lstrip().startswith('#'):
      text.insert(0, comments[line][1])
      line -= 1
    for line in range(item.lineno, item.end_lineno + 1):  # trailing comments
      if line in comments and not lines[line - 1].lstrip().startswith('#'):
        text.append(comments[line][1])
    fields.append((item.target.id, ast.unparse(item.annotation),
                   ' '.join(text)))
  return fields


def _process_docstring(app, what, name, obj, options, lines):
  del app, name, options
  if what != 'class' or not getattr(obj, '_fields', None):
    return
  if not obj.__module__.startswith('metacf'):
    return
  if _SECTION.search(inspect.getdoc(obj) or ''):
    return  # napoleon renders the docstring's own section
  fields = _field_docs(obj)
  if not fields:
    return
  lines.extend(['', '.. rubric:: Fields', ''])
  for field, annotation, comment in fields:
    annotation = type_aliases.qualify(annotation)
    lines.extend([f'.. attribute:: {field}', f'   :type: {annotation}', ''])
    if comment:
      lines.extend([f'   {_escape(comment)}', ''])


def setup(app):
  app.connect('autodoc-process-docstring', _process_docstring)
  return {'version': '1', 'parallel_read_safe': True,
          'parallel_write_safe': True}
