"""Which axes of a kernel are its inputs: the matrix view LoRA adapts.

A target ``W`` with ``f`` leading input axes (``fan_in_axes``) is the matrix
``[prod(W.shape[:f]), prod(W.shape[f:])]``. Defaults cover 2-D dense (``f =
1``) and 4-D HWIO convolution kernels (``f = 3``) and nothing else;
:func:`flax_fan_in_axes` places flax's 3-D attention kernels by name.
"""

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import masks

DEFAULT_TARGETS = (
    "floating leaves with ndim >= 2 not named 'bias', 'scale' or 'embedding'")
NOT_TARGETS = ('bias', 'scale', 'embedding')
FAN_IN_HINT = (
    'the default covers 2-D [d_in, d_out] and 4-D conv [kh, kw, c_in, c_out] '
    'kernels only; pass the number of leading input axes, or a callable '
    '(path, leaf) -> int such as metacf.adapters.flax_fan_in_axes')

# A static int, or a callable (path, leaf) -> int; None: the default layouts.
FanInAxes = int | Callable[[str, Any], int] | None


def dtype_of(leaf: Any) -> np.dtype:
  if hasattr(leaf, 'dtype'):
    return np.dtype(leaf.dtype)
  return np.asarray(leaf).dtype


def is_floating(leaf: Any) -> bool:
  return bool(jnp.issubdtype(dtype_of(leaf), jnp.floating))


def leaf_name(key_path: tuple[Any, ...]) -> str:
  """The parameter's name: the last key, skipping nnx's trailing ``.value``.

  The leaves of an ``nnx.State`` sit at ``.../kernel`` + ``GetAttrKey('value')``
  (the ``nnx.Variable``'s raw value), so their path ends in ``/value``.
  """
  keys = list(key_path)
  last = keys[-1] if keys else None
  if (len(keys) >= 2 and isinstance(last, jax.tree_util.GetAttrKey)
      and last.name == 'value'):
    keys = keys[:-1]
  return masks.path_str(tuple(keys[-1:])) if keys else ''


def default_target(key_path: tuple[Any, ...], leaf: Any) -> bool:
  return bool(np.ndim(leaf) >= 2 and is_floating(leaf)
              and leaf_name(key_path) not in NOT_TARGETS)


def check_fan_in_spec(fan_in_axes: Any, fn: str) -> None:
  if fan_in_axes is None or callable(fan_in_axes):
    return
  if isinstance(fan_in_axes, bool) or not isinstance(
      fan_in_axes, (int, np.integer)):
    raise TypeError(
        f'{fn}: fan_in_axes must be None, a Python int or a callable (path, '
        f'leaf) -> int, got {type(fan_in_axes).__name__}.')


def fan_in(fan_in_axes: FanInAxes, path: str, leaf: Any, fn: str) -> int:
  """``f``, the number of leading input axes of the target ``leaf``."""
  shape = tuple(np.shape(leaf))
  ndim = len(shape)
  if fan_in_axes is None:
    if ndim == 2:
      return 1
    if ndim == 4:
      return 3
    raise ValueError(
        f'{fn}: fan_in_axes must be given for the target {path!r} of shape '
        f'{shape} ({FAN_IN_HINT}), got None.')
  source = ''
  f = fan_in_axes
  if callable(fan_in_axes):
    f = fan_in_axes(path, leaf)
    source = ' (returned by the fan_in_axes callable)'
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
      raise TypeError(
          f'{fn}: fan_in_axes must return a Python int for each target, got '
          f'{type(f).__name__} ({f!r}) for {path!r}.')
  if not 1 <= f <= ndim - 1:
    raise ValueError(
        f'{fn}: fan_in_axes must be in 1..ndim-1 = 1..{ndim - 1} for the '
        f'target {path!r} of shape {shape}, got {f}{source}.')
  return int(f)


def matrix_shape(shape: tuple[int, ...], f: int) -> tuple[int, int]:
  """``(d_in, d_out)``: the products of the first ``f`` axes and the rest."""
  return math.prod(shape[:f]), math.prod(shape[f:])


def flax_fan_in_axes(path: str, leaf: Any) -> int:
  """``fan_in_axes`` for flax (linen and nnx) models, attention included.

  Pass it as ``lora_init(..., fan_in_axes=flax_fan_in_axes)``. It returns:

  * 1 for 2-D kernels ``[d_in, d_out]`` (``Dense``, ``nnx.Linear``);
  * 3 for 4-D convolution kernels ``[kh, kw, c_in, c_out]`` (``Conv``);
  * for the 3-D ``DenseGeneral`` / ``nnx.LinearGeneral`` kernels of
    ``linen.MultiHeadDotProductAttention`` and ``nnx.MultiHeadAttention``,
    told apart by the module's name (the path component before ``kernel``):
    1 for ``query``, ``key`` and ``value``, whose kernels are ``[d_model,
    heads, head_dim]`` and contract ``d_model``, and 2 for ``out``, whose
    kernel is ``[heads, head_dim, d_model]`` and contracts ``heads,
    head_dim``. (Source: ``flax/linen/attention.py``, ``DenseGeneral(axis=-1,
    features=(num_heads, head_dim))`` for ``query``/``key``/``value`` and
    ``DenseGeneral(axis=(-2, -1))`` for ``out``; ``flax/nnx/nn/attention.py``,
    ``LinearGeneral`` with ``out_features=(num_heads, head_dim)`` and
    ``in_features=(num_heads, head_dim)`` respectively.)

  Paths are the ``/``-joined paths of :mod:`metacf.masks`: linen
  ``'params/attn/query/kernel'``, nnx ``'attn/query/kernel/value'`` (a
  trailing ``/value`` after ``kernel`` is skipped). Anything else (a 1-D
  convolution's 3-D kernel, a ``DenseGeneral`` of another name, 5-D kernels)
  raises: write a callable that knows the model, e.g. ``lambda path, leaf: 2
  if path.endswith('proj/kernel') else flax_fan_in_axes(path, leaf)``.

  Args:
    path: The leaf's ``/``-joined path.
    leaf: The leaf (only its ``ndim`` is read).

  Returns:
    The number of leading input axes of the kernel.

  Raises:
    ValueError: for a leaf this function cannot place (see above).
  """
  ndim = np.ndim(leaf)
  if ndim == 2:
    return 1
  if ndim == 4:
    return 3
  parts = path.split('/')
  if len(parts) >= 3 and parts[-1] == 'value' and parts[-2] == 'kernel':
    parts = parts[:-1]                                   # nnx: .../kernel/value
  module = parts[-2] if len(parts) >= 2 and parts[-1] == 'kernel' else None
  if ndim == 3 and module in ('query', 'key', 'value'):
    return 1
  if ndim == 3 and module == 'out':
    return 2
  raise ValueError(
      'flax_fan_in_axes: leaf must be a 2-D or 4-D kernel or the 3-D kernel '
      'of an attention query, key, value or out projection (write a '
      f'fan_in_axes callable for other layouts), got {path!r} of shape '
      f'{tuple(np.shape(leaf))}.')
