"""Type aliases and callable protocols shared by metacf kernels."""

from typing import Any, Protocol

import jax

Params = Any  # A pytree of arrays.
PRNGKey = jax.Array


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
