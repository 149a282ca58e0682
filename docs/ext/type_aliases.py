"""Shows type aliases by name in signatures.

``metacf.typing.Params`` is a runtime ``Union`` (Python 3.11 has no lazy
``type`` statement), so autodoc would print every ``params: Params`` as
``Array | ndarray | Iterable[ArrayTree] | Mapping[Any, ArrayTree]``,
``PRNGKey`` as ``Array`` and ``jax.typing.ArrayLike`` as a Union of eight
types. Before autodoc reads a signature, this extension replaces each
annotation that names an alias in the source with a string,
``'metacf.typing.<Alias>'`` (linked to the alias's entry) or
``'jax.typing.ArrayLike'``, shown unqualified
(``python_use_unqualified_type_names``). Only the ``__annotations__`` of the
documented metacf functions change, in the docs build's own process.
"""

import ast
import inspect
import re
import textwrap

# Aliases (not classes) exported by metacf.typing.
ALIASES = ('ArrayTree', 'BoolTree', 'MaskSpec', 'Params', 'PRNGKey')
_ALIAS = re.compile(r'\b(?:[A-Za-z_]\w*\.)*(' + '|'.join(ALIASES) + r')\b')
# jax's own alias, a Union of eight types at run time.
_ARRAY_LIKE = re.compile(r'\b(?:jax\.typing\.)?ArrayLike\b')


def qualify(text):
  """Annotation source with the aliases spelled out for the Python domain."""
  text = _ALIAS.sub(r'metacf.typing.\1', text)
  return _ARRAY_LIKE.sub('jax.typing.ArrayLike', text)

_UNEVALUABLE = '_metacf_docs_alias_names'
_namedtuple_new = {}  # id(cls.__new__) -> cls, for typing.NamedTuple classes


def _source_annotations(obj):
  """``{argument or field: annotation source}`` of a function or class."""
  try:
    source = textwrap.dedent(inspect.getsource(obj))
  except (OSError, TypeError):
    return {}
  try:
    node = ast.parse(source).body[0]
  except (SyntaxError, IndexError):
    return {}
  if getattr(node, 'name', None) != getattr(obj, '__name__', None):
    return {}  # the file changed since it was imported: trust nothing
  found = {}
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    args = node.args
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                args.vararg, args.kwarg]:
      if arg is not None and arg.annotation is not None:
        found[arg.arg] = ast.unparse(arg.annotation)
    if node.returns is not None:
      found['return'] = ast.unparse(node.returns)
  elif isinstance(node, ast.ClassDef):
    for item in node.body:
      if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
        found[item.target.id] = ast.unparse(item.annotation)
  return found


def _before_signature(app, obj, bound_method):
  del app, bound_method
  annotations = getattr(obj, '__annotations__', None)
  if (not isinstance(annotations, dict) or not annotations
      or _UNEVALUABLE in annotations):
    return
  cls = _namedtuple_new.get(id(obj))
  if cls is None and not getattr(obj, '__module__', '').startswith('metacf'):
    return
  source = _source_annotations(cls if cls is not None else obj)
  replaced = {}
  for name, text in source.items():
    if name in annotations and (_ALIAS.search(text) or
                                _ARRAY_LIKE.search(text)):
      replaced[name] = qualify(text)
  if replaced:
    # A new dict: a NamedTuple's __new__ shares its dict with the class. The
    # extra entry cannot be evaluated, so autodoc's typing.get_type_hints()
    # fails and it keeps these strings (in a module that binds ``metacf`` it
    # would evaluate 'metacf.typing.Params' back to the Union).
    obj.__annotations__ = {**annotations, **replaced,
                           _UNEVALUABLE: '<metacf docs: keep strings>'}
    # autodoc_preserve_defaults may have frozen the signature already.
    signature = vars(obj).get('__signature__')
    if signature is not None:
      obj.__signature__ = signature.replace(
          parameters=[p.replace(annotation=replaced.get(p.name, p.annotation))
                      for p in signature.parameters.values()],
          return_annotation=replaced.get('return',
                                         signature.return_annotation))


def _collect_namedtuples(app):
  del app
  import coverage_check  # docs/ext, on sys.path (conf.py)
  import importlib
  for module_name, names in coverage_check.public_names().items():
    module = importlib.import_module(module_name)
    for full_name in names:
      obj = getattr(module, full_name.rsplit('.', 1)[1])
      if inspect.isclass(obj) and hasattr(obj, '_fields'):
        _namedtuple_new[id(obj.__new__)] = obj


def setup(app):
  app.connect('builder-inited', _collect_namedtuples)
  app.connect('autodoc-before-process-signature', _before_signature)
  return {'version': '1', 'parallel_read_safe': True,
          'parallel_write_safe': True}
