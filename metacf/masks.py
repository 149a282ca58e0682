"""Choosing leaves of a parameter pytree by path.

Every metacf argument that selects leaves (``adapt_mask`` in
:mod:`metacf.maml`; ``targets=`` / ``trainable=`` elsewhere) takes a pytree of
Python bools like the params, a callable ``(path, leaf) -> bool``, or a regex
string searched in the leaf's path, ``jax.tree_util.keystr(key_path,
simple=True, separator='/')`` (e.g. ``'encoder/layers/0/kernel'``).
:func:`leaf_paths` shows a tree's paths; :func:`resolve_mask` turns any of the
three forms into the pytree of bools that the kernels use.

Examples:
  >>> import jax.numpy as jnp
  >>> import metacf
  >>> params = {'body': {'w': jnp.ones((2, 2))}, 'head': {'w': jnp.ones((2, 1))}}
  >>> metacf.masks.leaf_paths(params)
  ['body/w', 'head/w']
  >>> metacf.masks.resolve_mask('^head/', params)   # ANIL's adapt_mask='^head/'
  {'body': {'w': False}, 'head': {'w': True}}
"""

from metacf._src.masks import leaf_paths
from metacf._src.masks import resolve_mask as _resolve_mask


def resolve_mask(spec, tree, *, name='mask', require_match=True):
  """Resolves ``spec`` into a pytree of Python bools with ``tree``'s structure.

  Args:
    spec: ``None`` (every leaf), a pytree of Python bools like ``tree``, a
      callable ``(path, leaf) -> bool``, or a regex string searched in each
      ``/``-joined path.
    tree: The pytree whose leaves are chosen.
    name: The argument's name in error messages.
    require_match: If True, a callable or regex that chooses no leaf raises.

  Returns:
    A pytree like ``tree`` of Python bools.

  Raises:
    ValueError: on a pytree of the wrong structure, an invalid regex, or (with
      ``require_match``) a callable/regex that matches no leaf.
    TypeError: if a callable returns something other than a bool.
  """
  return _resolve_mask(spec, tree, name=name, fn='resolve_mask',
                       tree_name='tree', require_match=require_match)


__all__ = ['leaf_paths', 'resolve_mask']
