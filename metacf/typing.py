"""Type aliases and callable protocols shared by metacf kernels.

``Params`` is any pytree of arrays; ``ApplyFn`` is ``apply_fn(params, x)``;
``ArrayTree`` a pytree of arrays and ``BoolTree`` one of Python bools;
``LossFn`` is ``loss_fn(params, x, y)`` (optionally ``-> (loss, aux)`` and with
a trailing ``key``, see :func:`metacf.maml.maml_loss`); ``MaskSpec`` is the one
form every mask / target argument takes (see :mod:`metacf.masks`).
"""

from metacf._src.masks import BoolTree
from metacf._src.masks import MaskSpec
from metacf._src.types import ApplyFn
from metacf._src.types import ArrayTree
from metacf._src.types import LossFn
from metacf._src.types import Params
from metacf._src.types import PRNGKey

__all__ = ['ApplyFn', 'ArrayTree', 'BoolTree', 'LossFn', 'MaskSpec', 'Params',
           'PRNGKey']
