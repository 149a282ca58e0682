"""Argument checks with uniform error messages, eager and (opt-in) under jit.

Static checks (shapes, dtypes, Python numbers) run at trace time and never
branch on data. Value checks (signs, label ranges, finiteness) raise
``ValueError`` eagerly on concrete values; on traced values they emit a
``checkify.debug_check`` when runtime checks are on (:mod:`metacf.checks`,
which documents the eager/jit difference), and nothing when they are off.
Messages follow ``<function>: <arg> must <expectation>, got <actual>.``
"""

from collections.abc import Callable, Sequence
import os
from types import ModuleType
from typing import Any

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

ENV_VAR = 'METACF_RUNTIME_CHECKS'
_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('', '0', 'false', 'no', 'off')


def _env_default() -> bool:
  value = os.environ.get(ENV_VAR, '').strip().lower()
  if value in _TRUE:
    return True
  if value in _FALSE:
    return False
  raise ValueError(
      f'metacf: the environment variable {ENV_VAR} must be one of '
      f'{", ".join(repr(v) for v in _TRUE + _FALSE[1:])} or unset, got '
      f'{os.environ[ENV_VAR]!r}.')


# Part of jax's trace context and jit cache key (jax.make_user_context): a
# jitted function traced with checks off is traced again when they are on.
RUNTIME_CHECKS = jax.make_user_context(default_value=_env_default())


def runtime_checks_enabled() -> bool:
  """Whether value checks on traced values emit ``checkify`` checks now."""
  return bool(RUNTIME_CHECKS.value)


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def any_traced(*xs: Any) -> bool:
  return any(is_traced(leaf) for leaf in jax.tree.leaves(xs))


def value_check(inputs: Sequence[Any],
                summary: Callable[..., dict[str, Any]],
                ok: Callable[..., Any],
                message: str) -> None:
  """Checks a value condition: eagerly, or under ``checkify`` when traced.

  The condition is computed from a few scalar statistics of the inputs (a
  minimum, a maximum), which also fill the message, so a check reads each
  input once: under ``jit`` the statistics are one fused reduction, the
  predicate and the message's values come from it.

  Args:
    inputs: The arrays the condition reads.
    summary: ``summary(xp, *inputs) -> {field: scalar}``, written with
      ``xp`` (``numpy`` for concrete inputs, ``jax.numpy`` for traced ones).
      ``xp.min``/``xp.max`` propagate NaN, so a NaN input shows there.
    ok: ``ok(xp, **fields) -> bool`` scalar; NaN must make it False where
      NaN is invalid (``min >= 0`` is False for a NaN minimum).
    message: The error message, a ``str.format`` template over the fields;
      write them ``{name!s}`` (``str`` of a NumPy scalar: ``-0.1``, not
      ``-0.10000000149011612``).

  Raises:
    ValueError: if every input is concrete and ``ok`` is False.
  """
  if any_traced(*inputs):
    if runtime_checks_enabled():
      fields = summary(jnp, *[jnp.asarray(x) for x in inputs])
      checkify.debug_check(ok(jnp, **fields), message, **fields)
    return
  fields = summary(np, *[np.asarray(x) for x in inputs])
  if not bool(ok(np, **fields)):
    raise ValueError(message.format(**fields))


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


def _check_real(value: Any, name: str, fn: str) -> None:
  if is_traced(value):
    dtype = value.dtype
  else:
    dtype = np.asarray(value).dtype
  if dtype == object or not np.issubdtype(dtype, np.number):
    raise TypeError(f'{fn}: {name} must be a real number, got {value!r}.')


def _got(value: Any) -> str:
  """The ``got ...`` template for a scalar or (its minimum) an array."""
  return '{value!s}' if np.ndim(value) == 0 else 'a minimum of {value!s}'


def _min(xp: ModuleType, x: Any) -> dict[str, Any]:
  # NaN propagates through xp.min: the message then says 'nan'.
  return {'value': xp.min(x)}


def _positive(xp: ModuleType, value: Any) -> Any:
  return value > 0   # False for NaN.


def _nonnegative(xp: ModuleType, value: Any) -> Any:
  return value >= 0  # False for NaN.


def check_positive(value: Any, name: str, fn: str) -> None:
  """``value > 0`` everywhere (NaN fails); ``TypeError`` if not a number."""
  _check_real(value, name, fn)
  if np.size(value) == 0:
    return
  value_check([value], _min, _positive,
              f'{fn}: {name} must be > 0, got {_got(value)}.')


def check_nonnegative(value: Any, name: str, fn: str, *,
                      where: Any = None) -> None:
  """``value >= 0`` everywhere (NaN fails: NaN is not non-negative).

  Args:
    value: A number or an array.
    name: Its name, for the message.
    fn: The calling function's name, for the message.
    where: Optional boolean mask of ``value``'s leading shape: entries of
      rows where it is False are not checked.

  Raises:
    TypeError: if ``value`` is not a real number or array.
    ValueError: ``'<fn>: <name> must be >= 0, got <value>.'`` for a scalar,
      ``'... got a minimum of <min>.'`` for an array (``nan`` when a NaN is
      there).
  """
  _check_real(value, name, fn)
  if np.size(value) == 0:
    return
  if where is None:
    value_check([value], _min, _nonnegative,
                f'{fn}: {name} must be >= 0, got {_got(value)}.')
    return
  extra = np.ndim(value) - np.ndim(where)

  def masked_min(xp, v, w):
    rows = xp.reshape(xp.asarray(w, bool), np.shape(w) + (1,) * extra)
    return {'value': xp.min(xp.where(rows, v, xp.inf))}

  value_check([value, where], masked_min, _nonnegative,
              f'{fn}: {name} must be >= 0, got a minimum of {{value!s}}.')


def check_finite(value: Any, name: str, fn: str) -> None:
  """No infinity or NaN in ``value``."""
  if np.size(value) == 0:
    return
  if np.ndim(value) == 0:
    value_check([value], lambda xp, v: {'value': v},
                lambda xp, value: xp.isfinite(value),
                f'{fn}: {name} must be finite, got {_got(value)}.')
  else:
    value_check([value], lambda xp, v: {'count': xp.sum(~xp.isfinite(v))},
                lambda xp, count: count == 0,
                f'{fn}: {name} must be finite, got {{count!s}} non-finite of '
                f'{np.size(value)} entries.')


def check_labels(labels: Any, num_classes: int, name: str, fn: str) -> None:
  """Integer labels in ``[0, num_classes)`` (the dtype is checked apart).

  Raises:
    ValueError: ``'<fn>: <name> must be in [0, <num_classes>), got values
      in [<min>, <max>].'``
  """
  if np.size(labels) == 0:
    return
  value_check(
      [labels], lambda xp, y: {'low': xp.min(y), 'high': xp.max(y)},
      lambda xp, low, high: (low >= 0) & (high < num_classes),
      f'{fn}: {name} must be in [0, {num_classes}), got values in '
      '[{low!s}, {high!s}].')


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, 'shape') else np.shape(leaf)


def leading_size(tree: Any, name: str, fn: str, *, axis: str = 'example',
                 min_size: int = 0) -> int:
  """The leading size shared by every leaf of ``tree`` (static shapes only).

  Args:
    tree: An array or a pytree of arrays.
    name: Its name, for the message.
    fn: The calling function's name, for the message.
    axis: What the leading axis holds, for the message (``'example'``,
      ``'batch'``, ``'task'``).
    min_size: The smallest accepted leading size.

  Returns:
    The shared leading size.

  Raises:
    ValueError: ``"<fn>: <name> must have a leading <axis> axis shared by
      all its leaves, got shapes (3,) for ['a'], () for ['b']."`` (also for
      a tree with no leaf, ``got no array``), or ``'<fn>: <name> must have
      >= <min_size> <axis>s on its leading axis, got <n>.'``
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  shapes = [(jax.tree_util.keystr(path), _shape(leaf)) for path, leaf in leaves]
  sizes = {s[0] if s else None for _, s in shapes}
  if not leaves or None in sizes or len(sizes) != 1:
    if not leaves:
      got = 'no array'
    elif len(shapes) == 1 and not shapes[0][0]:
      got = f'shape {shapes[0][1]}'
    else:
      got = 'shapes ' + ', '.join(f'{s} for {p}' for p, s in shapes)
    raise ValueError(
        f'{fn}: {name} must have a leading {axis} axis shared by all its '
        f'leaves, got {got}.')
  n = sizes.pop()
  if n < min_size:
    raise ValueError(
        f'{fn}: {name} must have >= {min_size} {axis}s on its leading axis, '
        f'got {n}.')
  return n


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
