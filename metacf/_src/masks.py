"""Choosing leaves of a pytree: one form for every mask / target argument.

Every metacf argument that selects leaves of a parameter pytree (``adapt_mask``
in :mod:`metacf.maml`, ``targets=`` / ``trainable=`` elsewhere) takes one of:

* a pytree of Python bools with the structure of ``params`` (as
  ``optax.masked`` and equinox's filters take);
* a callable ``(path: str, leaf) -> bool``;
* a string: a regular expression searched (``re.search``) in the path.

A leaf's *path* is ``jax.tree_util.keystr(key_path, simple=True,
separator='/')``: dict keys, attribute names and sequence indices joined by
``/``, e.g. ``'encoder/layers/0/kernel'`` for
``{'encoder': {'layers': [{'kernel': ...}]}}``, ``'params/Dense_0/kernel'``
for a flax linen variable dict, or ``'layers/0/kernel/value'`` for the
``nnx.State`` of ``nnx.split``. :func:`leaf_paths` lists them.

The selection is resolved once, eagerly (at trace time), into a pytree of
Python bools, so it is static under ``jit`` and never depends on array values.
"""

from collections.abc import Callable, Iterable, Mapping
import re
from typing import Any, TypeAlias, Union

import jax
import numpy as np

# A pytree of Python bools shaped like the params.
BoolTree: TypeAlias = Union[bool, Iterable['BoolTree'],
                             Mapping[Any, 'BoolTree']]
# None (the argument's default), a regex string searched in the '/'-joined
# path, a callable (path, leaf) -> bool, or a pytree of bools.
MaskSpec: TypeAlias = Union[None, str, Callable[[str, Any], bool], BoolTree]


def path_str(key_path: tuple[Any, ...]) -> str:
  """The ``/``-joined path of a key path from ``tree_flatten_with_path``."""
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def leaf_paths(tree: Any) -> list[str]:
  """The ``/``-joined paths of ``tree``'s leaves, in ``tree_leaves`` order."""
  flat, _ = jax.tree.flatten_with_path(tree)
  return [path_str(kp) for kp, _ in flat]


def _describe_paths(paths: list[str], limit: int = 4) -> str:
  shown = ', '.join(repr(p) for p in paths[:limit])
  if len(paths) > limit:
    shown += ', ...'
  return shown


def resolve_mask(spec: MaskSpec, tree: Any, *, name: str, fn: str,
                 tree_name: str = 'params',
                 default: Callable[[str, Any], bool] | None = None,
                 require_match: bool = True) -> Any:
  """Resolves a leaf selection into a pytree of Python bools like ``tree``.

  Args:
    spec: ``None``, a pytree of Python bools like ``tree``, a callable
      ``(path, leaf) -> bool``, or a regex string searched in each path.
    tree: The pytree whose leaves are selected (e.g. ``params``).
    name: The argument's name, for error messages (e.g. ``'adapt_mask'``).
    fn: The public function's name, for error messages.
    tree_name: How ``tree`` is called in error messages.
    default: The predicate used when ``spec`` is None (default: every leaf).
    require_match: If True, a callable or regex that selects no leaf raises
      (almost always a typo in a path). An explicit pytree of bools may be all
      False.

  Returns:
    A pytree with ``tree``'s structure whose leaves are Python bools.

  Raises:
    TypeError: if ``spec`` is of none of the accepted kinds, or a callable
      returns something other than a bool.
    ValueError: if a pytree ``spec`` does not have ``tree``'s structure, a
      regex does not compile, or (``require_match``) nothing is selected.
  """
  flat, treedef = jax.tree.flatten_with_path(tree)
  paths = [path_str(kp) for kp, _ in flat]
  leaves = [leaf for _, leaf in flat]

  if spec is None:
    predicate = default
    if predicate is None:
      return jax.tree.unflatten(treedef, [True] * len(leaves))
  elif isinstance(spec, str):
    try:
      pattern = re.compile(spec)
    except re.error as e:
      raise ValueError(
          f'{fn}: {name} must be a valid regular expression, got {spec!r} '
          f'({e}).') from e
    predicate = lambda path, leaf: pattern.search(path) is not None
  elif callable(spec) and not isinstance(spec, (bool, np.bool_)):
    predicate = spec
  else:
    spec_leaves, spec_def = jax.tree.flatten(spec)
    if spec_def != treedef:
      raise ValueError(
          f'{fn}: {name} must have the same pytree structure as {tree_name} '
          f'(or be a callable (path, leaf) -> bool or a regex string), got '
          f'{spec_def} and expected {treedef}.')
    for leaf in spec_leaves:
      if not isinstance(leaf, (bool, np.bool_)):
        raise TypeError(
            f'{fn}: {name} leaves must be Python bools (static), got '
            f'{type(leaf).__name__}.')
    return jax.tree.unflatten(treedef,
                                        [bool(m) for m in spec_leaves])

  out = []
  for path, leaf in zip(paths, leaves):
    chosen = predicate(path, leaf)
    if not isinstance(chosen, (bool, np.bool_)):
      raise TypeError(
          f'{fn}: {name} must return a Python bool for each leaf, got '
          f'{type(chosen).__name__} for path {path!r}.')
    out.append(bool(chosen))
  if require_match and spec is not None and leaves and not any(out):
    raise ValueError(
        f'{fn}: {name} matched no leaf; paths are like '
        f'{_describe_paths(paths)}.')
  return jax.tree.unflatten(treedef, out)


def mask_leaves(spec: MaskSpec, tree: Any, *, name: str, fn: str,
                **kwargs: Any) -> list[bool]:
  """:func:`resolve_mask` as one Python bool per leaf of ``tree``."""
  return jax.tree.leaves(
      resolve_mask(spec, tree, name=name, fn=fn, **kwargs))
