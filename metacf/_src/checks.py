"""Eager, trace-time argument checks with uniform error messages.

Every check looks only at static information (shapes, dtypes, Python numbers)
and is skipped for traced values, so it never forces a host sync and never
branches on data inside ``jit``. Messages follow
``<function>: <arg> must <expectation>, got <actual>.``
"""

from typing import Any

import jax
import numpy as np


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def static_value(x: Any) -> float | None:
  """Returns ``x`` as a Python float if it is a concrete scalar, else None."""
  if is_traced(x):
    return None
  try:
    arr = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim != 0:
    return None
  return float(arr)


def check_positive(value: Any, name: str, fn: str) -> None:
  """Raises ValueError if a concrete scalar ``value`` is not > 0 (or NaN)."""
  if is_traced(value):
    return
  arr = np.asarray(value)
  if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
    raise TypeError(f'{fn}: {name} must be a real number, got {value!r}.')
  if arr.size and not np.all(arr > 0):
    raise ValueError(f'{fn}: {name} must be > 0, got {value!r}.')


def check_same_shape(a: Any, b: Any, name_a: str, name_b: str,
                     fn: str) -> None:
  shape_a, shape_b = np.shape(a), np.shape(b)
  if shape_a != shape_b:
    raise ValueError(
        f'{fn}: {name_a} and {name_b} must have the same shape, got '
        f'{shape_a} and {shape_b}.')


def check_min_rank(x: Any, rank: int, name: str, fn: str) -> None:
  if np.ndim(x) < rank:
    raise ValueError(
        f'{fn}: {name} must have rank >= {rank}, got shape {np.shape(x)}.')


def check_integer(x: Any, name: str, fn: str) -> None:
  dtype = jax.numpy.result_type(x)
  if not jax.numpy.issubdtype(dtype, jax.numpy.integer):
    raise TypeError(
        f'{fn}: {name} must have an integer dtype, got {dtype}.')


def check_mask_shape(where: Any, batch_shape: tuple[int, ...], name: str,
                     fn: str) -> None:
  if where is not None and np.shape(where) != tuple(batch_shape):
    raise ValueError(
        f'{fn}: {name} must have shape {tuple(batch_shape)} (the logits shape '
        f'without the class axis), got {np.shape(where)}.')


def check_tree_structure(tree: Any, reference: Any, name: str, ref_name: str,
                         fn: str) -> None:
  """Raises ValueError if ``tree`` does not have ``reference``'s structure."""
  got = jax.tree_util.tree_structure(tree)
  want = jax.tree_util.tree_structure(reference)
  if got != want:
    raise ValueError(
        f'{fn}: {name} must have the same pytree structure as {ref_name}, '
        f'got {got} and expected {want}.')
