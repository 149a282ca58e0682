"""Eager checks of the noise kernels' static arguments and token arrays.

All checks read static information only (Python numbers, shapes, dtypes)
and skip traced values. Messages follow
``<function>: <arg> must <expectation>, got <actual>.``; the checks shared
with other modules (``check_int``, ``check_integer``) are in
:mod:`metacf._src.checks`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks


def real(value: Any, name: str, fn: str) -> float:
  """Returns a Python real number ``value`` as a float, else TypeError."""
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.integer, np.floating)):
    raise TypeError(f'{fn}: {name} must be a Python float, got {value!r}.')
  return float(value)


def in_open_unit(value: Any, name: str, fn: str) -> float:
  """Returns a real ``value`` in ``(0, 1)`` as a float; ValueError else."""
  x = real(value, name, fn)
  if not 0.0 < x < 1.0:  # also rejects NaN
    raise ValueError(f'{fn}: {name} must be in (0, 1), got {value!r}.')
  return x


def at_least_one(value: Any, name: str, fn: str) -> float:
  """Returns a real ``value >= 1`` as a float; ValueError else (NaN too)."""
  x = real(value, name, fn)
  if not x >= 1.0:
    raise ValueError(f'{fn}: {name} must be >= 1, got {value!r}.')
  return x


def finite_positive(value: Any, name: str, fn: str) -> float:
  """Returns a real, finite ``value > 0`` as a float; ValueError else."""
  x = real(value, name, fn)
  if not (x > 0.0 and math.isfinite(x)):
    raise ValueError(f'{fn}: {name} must be > 0 and finite, got {value!r}.')
  return x


def tokens_1d(tokens: Any, fn: str, *, min_length: int) -> jax.Array:
  """``tokens`` as a 1-D integer array of length ``>= min_length``."""
  tokens = jnp.asarray(tokens)
  checks.check_integer(tokens, 'tokens', fn)
  if tokens.ndim != 1:
    raise ValueError(
        f'{fn}: tokens must be 1-D (one sequence; vmap over a batch), got '
        f'shape {tokens.shape}.')
  if tokens.shape[0] < min_length:
    raise ValueError(
        f'{fn}: tokens must have length >= {min_length}, got shape '
        f'{tokens.shape}.')
  return tokens


def token_id(value: Any, name: str, fn: str, *,
             optional: bool = False) -> Any:
  """Checks an id is an integer scalar (Python, NumPy or jax, traced ok).

  A non-scalar is a ValueError (a shape), a non-integer a TypeError.
  """
  if optional and value is None:
    return None
  if np.ndim(value) != 0:
    raise ValueError(f'{fn}: {name} must be a scalar, got shape '
                     f'{np.shape(value)}.')
  if isinstance(value, bool) or not (
      isinstance(value, (int, np.integer))
      or jnp.issubdtype(jnp.result_type(value), jnp.integer)):
    expected = 'an integer or None' if optional else 'an integer'
    raise TypeError(f'{fn}: {name} must be {expected}, got {value!r}.')
  return value


def concrete_int(value: Any) -> int | None:
  """``int(value)`` when it is not traced, else None."""
  return None if checks.is_traced(value) else int(value)
