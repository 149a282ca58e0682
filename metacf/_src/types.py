"""Type aliases and callable protocols shared by metacf kernels."""

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeAlias, Union

import jax
import numpy as np

# A pytree of arrays (as chex.ArrayTree): an array, or a container of them.
ArrayTree: TypeAlias = Union[jax.Array, np.ndarray, Iterable['ArrayTree'],
                             Mapping[Any, 'ArrayTree']]
Params: TypeAlias = ArrayTree
PRNGKey: TypeAlias = jax.Array


class ApplyFn(Protocol):
  """``apply_fn(params, x) -> outputs``."""

  def __call__(self, params: Params, x: jax.typing.ArrayLike) -> jax.Array:
    ...


class LossFn(Protocol):
  """``loss_fn(params, x, y) -> scalar``.

  MAML kernels also take ``-> (scalar, aux)`` (``has_aux=True``) and a trailing
  ``key`` argument (``key=...``).
  """

  def __call__(self, params: Params, x: jax.typing.ArrayLike,
               y: jax.typing.ArrayLike) -> jax.Array:
    ...
