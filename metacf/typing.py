"""Type aliases and callable protocols shared by metacf kernels.

``Params`` is any pytree of arrays; ``ApplyFn`` is ``apply_fn(params, x)``;
``ArrayTree`` a pytree of arrays and ``BoolTree`` one of Python bools;
``LossFn`` is ``loss_fn(params, x, y)`` (optionally ``-> (loss, aux)`` and with
a trailing ``key``, see :func:`metacf.maml.maml_loss`); ``MaskSpec`` is the one
form every mask / target argument takes (see :mod:`metacf.masks`).
"""

from metacf._src import masks as _masks
from metacf._src import types as _types
from metacf._src.types import ApplyFn
from metacf._src.types import LossFn

# Assignments, not imports, so that the ``#:`` comments document the aliases.
#: A pytree of arrays, as ``chex.ArrayTree`` (an array, or a container of
#: them).
ArrayTree = _types.ArrayTree
#: A pytree of Python bools, shaped like the params it selects from.
BoolTree = _masks.BoolTree
#: A leaf selection, one of ``None``, a regex searched in the ``/``-joined
#: leaf path, a callable ``(path, leaf) -> bool``, or a :data:`BoolTree`
#: (see :mod:`metacf.masks`).
MaskSpec = _masks.MaskSpec
#: Model parameters, any pytree of arrays (an :data:`ArrayTree`).
Params = _types.Params
#: A ``jax.random`` key (typed, from ``jax.random.key``, or a raw
#: ``uint32[2]``).
PRNGKey = _types.PRNGKey

__all__ = ['ApplyFn', 'ArrayTree', 'BoolTree', 'LossFn', 'MaskSpec', 'Params',
           'PRNGKey']
