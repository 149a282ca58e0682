"""Eager, trace-time argument checks with uniform error messages.

Every check looks only at static information (shapes, dtypes, Python numbers)
and is skipped for traced values, so it never forces a host sync and never
branches on data inside ``jit``. Messages follow
``<function>: <arg> must <expectation>, got <actual>.``
"""

from collections.abc import Sequence
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


def check_int(value: Any, name: str, fn: str, *,
              min_value: int | None = None,
              optional: bool = False) -> int | None:
  """Returns ``value`` as an ``int`` after checking it is a static integer.

  Accepts Python and NumPy integers, not ``bool`` and not arrays (so a traced
  value is rejected too: static arguments must be Python values).

  Args:
    value: The argument to check.
    name: Its name, for the message.
    fn: The calling function's name, for the message.
    min_value: If given, ``value`` must be ``>= min_value``.
    optional: If True, ``None`` is accepted and returned as is.

  Returns:
    ``int(value)``, or None when ``optional`` and ``value`` is None.

  Raises:
    TypeError: ``'<fn>: <name> must be a Python int[ or None], got <value>.'``
    ValueError: ``'<fn>: <name> must be >= <min_value>, got <value>.'``
  """
  if optional and value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    expected = 'a Python int or None' if optional else 'a Python int'
    raise TypeError(f'{fn}: {name} must be {expected}, got {value!r}.')
  if min_value is not None and value < min_value:
    raise ValueError(f'{fn}: {name} must be >= {min_value}, got {value}.')
  return int(value)


def check_choice(value: Any, choices: Sequence[str], name: str,
                 fn: str) -> str:
  """Returns ``value`` after checking it is one of the strings ``choices``.

  Raises:
    ValueError: ``"<fn>: <name> must be one of 'a', 'b', got <value>."``, also
      for a value that is not a string.
  """
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f'{fn}: {name} must be one of '
        f'{", ".join(repr(c) for c in choices)}, got {value!r}.')
  return value


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
  got = jax.tree.structure(tree)
  want = jax.tree.structure(reference)
  if got != want:
    raise ValueError(
        f'{fn}: {name} must have the same pytree structure as {ref_name}, '
        f'got {got} and expected {want}.')
