"""Low-rank adapters (LoRA, Hu et al. 2021) for any pytree of parameters.

``lora_init`` builds, next to ``params``, a pytree of the same structure in
which every target leaf ``W`` is replaced by ``{'a': [d_in, rank], 'b': [rank,
d_out]}`` and every other leaf by ``None``; ``lora_merge`` adds the low-rank
update to the frozen weights and ``with_lora`` wraps an ``apply_fn`` so that
``jax.grad`` with respect to the adapter trains the adapter only. Example::

  lora_params = metacf.adapters.lora_init(key, params, rank=4)
  apply_lora = metacf.adapters.with_lora(apply_fn, alpha=8.0)

  def loss_fn(lora_params, params, x, y):
    return jnp.mean((apply_lora(params, lora_params, x) - y) ** 2)

  grads = jax.grad(loss_fn)(lora_params, params, x, y)  # None off-target
  updates, opt_state = optimizer.update(grads, opt_state, lora_params)
  lora_params = optax.apply_updates(lora_params, updates)
  served = metacf.adapters.lora_merge(params, lora_params, alpha=8.0)

A kernel ``W`` of any rank is treated as the matrix ``[prod(W.shape[:-1]),
W.shape[-1]]``: for a dense kernel ``[d_in, d_out]`` that is ``W`` itself, for
a convolution kernel ``[kh, kw, c_in, c_out]`` it is the ``[kh * kw * c_in,
c_out]`` matrix that the convolution multiplies image patches with, so the
update is low-rank in the patch-to-channel map. :func:`lora_dense` is the
unmerged form of a dense layer, ``x @ W + s * (x @ a) @ b``, which never
materialises ``a @ b``.
"""

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf._src import masks
from metacf._src.types import ApplyFn, Params

_DEFAULT_TARGETS = 'floating leaves with ndim >= 2'


def _dtype(leaf: Any) -> np.dtype:
  if hasattr(leaf, 'dtype'):
    return np.dtype(leaf.dtype)
  return np.asarray(leaf).dtype


def _is_floating(leaf: Any) -> bool:
  return bool(jnp.issubdtype(_dtype(leaf), jnp.floating))


def _default_target(path: str, leaf: Any) -> bool:
  del path
  return bool(np.ndim(leaf) >= 2 and _is_floating(leaf))


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(d_in, d_out)`` of a kernel: all axes but the last, and the last."""
  return math.prod(shape[:-1]), shape[-1]


def lora_init(key: jax.Array, params: Params, rank: int, *,
              targets: masks.MaskSpec = None) -> Params:
  r"""Initialises low-rank adapters ``(a, b)`` for the target leaves of ``params``.

  Every target leaf ``W`` gets ``a`` of shape ``[d_in, rank]`` and ``b`` of
  shape ``[rank, d_out]``, with ``d_out = W.shape[-1]`` and ``d_in =
  prod(W.shape[:-1])`` (dense and convolution kernels alike), both of ``W``'s
  dtype, so that the adapted weight is ``W + (alpha / rank) * (a @ b)``
  reshaped to ``W.shape`` (:func:`lora_merge`).

  Initialisation. ``b = 0``, so the adapted model starts equal to the
  pretrained one (as in the paper). ``a`` is drawn from
  :math:`U(-1/\sqrt{d_{in}}, 1/\sqrt{d_{in}})`, HF peft's default
  (``kaiming_uniform_(a=sqrt(5))`` on ``lora_A``, which is this bound), so
  ``x @ a`` has the scale of the layer's input whatever ``d_in``.

  Keys: ``key`` is split into one key per target leaf, in ``tree_leaves``
  order, so the same key gives the same adapters and target leaves of equal
  shape get different ``a``.

  Args:
    key: A PRNG key.
    params: A pytree of arrays (e.g. the ``nnx.State`` of ``nnx.split`` or a
      linen variable dict). Only shapes and dtypes are read.
    rank: The adapter rank ``r``, a Python int with ``1 <= r <= min(d_in,
      d_out)`` for every target.
    targets: The leaves to adapt (:mod:`metacf.masks`): ``None`` (default:
      floating leaves with ``ndim >= 2``, i.e. dense and conv kernels, not
      biases or norm scales), a pytree of bools like ``params``, a callable
      ``(path, leaf) -> bool``, or a regex searched in the ``/``-joined path
      (e.g. ``'attention/(query|value)/kernel'``, the paper's choice of
      :math:`W_q, W_v`). Targets must be floating with ``ndim >= 2``.

  Returns:
    A pytree with ``params``' structure where each target leaf is replaced by
    ``{'a': a, 'b': b}`` and every other leaf by ``None``.

  Raises:
    TypeError: if ``rank`` is not a Python int, or a target is not floating.
    ValueError: if ``rank < 1`` or ``rank > min(d_in, d_out)`` for a target,
      ``targets`` selects no leaf, or a target has ``ndim < 2``.

  References:
    Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021
  """
  fn = 'lora_init'
  rank = checks.check_int(rank, 'rank', fn, min_value=1)
  mask = masks.resolve_mask(targets, params, name='targets', fn=fn,
                            default=_default_target)
  flat, treedef = jax.tree.flatten_with_path(params)
  chosen = jax.tree.leaves(mask)
  paths = [masks.path_str(kp) for kp, _ in flat]
  leaves = [leaf for _, leaf in flat]
  if not any(chosen):
    what = 'targets' if targets is not None else (
        f'targets (default: {_DEFAULT_TARGETS})')
    shown = ', '.join(repr(p) for p in paths[:4]) + (
        ', ...' if len(paths) > 4 else '')
    raise ValueError(
        f'{fn}: {what} matched no leaf; paths are like {shown or "(none)"}.')

  for path, leaf, is_target in zip(paths, leaves, chosen):
    if not is_target:
      continue
    shape = np.shape(leaf)
    if len(shape) < 2:
      raise ValueError(
          f'{fn}: targets must select leaves with ndim >= 2, got shape '
          f'{shape} at {path!r}.')
    if not _is_floating(leaf):
      raise TypeError(
          f'{fn}: targets must select floating leaves, got dtype '
          f'{_dtype(leaf)} at {path!r}.')
    d_in, d_out = _matrix_shape(shape)
    if rank > min(d_in, d_out):
      raise ValueError(
          f'{fn}: rank must be <= min(d_in, d_out) = {min(d_in, d_out)} for '
          f'the target {path!r} of shape {shape} (d_in = {d_in}, d_out = '
          f'{d_out}), got {rank}.')

  keys = iter(jax.random.split(key, sum(chosen)))
  out = []
  for leaf, is_target in zip(leaves, chosen):
    if not is_target:
      out.append(None)
      continue
    d_in, d_out = _matrix_shape(np.shape(leaf))
    dtype = _dtype(leaf)
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(next(keys), (d_in, rank), dtype, -bound, bound)
    b = jnp.zeros((rank, d_out), dtype)
    out.append({'a': a, 'b': b})
  return jax.tree.unflatten(treedef, out)


def _scale(alpha: Any, rank: int, dtype: Any, fn: str) -> Any:
  """``alpha / rank`` (1 for ``alpha=None``), a Python float when static."""
  if alpha is None:
    return None
  if np.ndim(alpha) != 0:
    raise ValueError(
        f'{fn}: alpha must be a scalar or None, got shape {np.shape(alpha)}.')
  if isinstance(alpha, (int, float, np.integer, np.floating)) and not (
      isinstance(alpha, bool)):
    return float(alpha) / rank
  return jnp.asarray(alpha).astype(dtype) / rank


def _check_factor(x: Any, name: str, fn: str) -> None:
  if not hasattr(x, 'shape') or np.ndim(x) != 2:
    raise ValueError(
        f'{fn}: lora_params must hold 2-D arrays a [d_in, rank] and b '
        f'[rank, d_out], got {name} of shape {np.shape(x)}.')


def _merge_leaf(w: Any, adapter: Any, alpha: Any, path: str, fn: str) -> Any:
  if adapter is None:
    return w
  if not isinstance(adapter, Mapping) or set(adapter.keys()) != {'a', 'b'}:
    raise ValueError(
        f"{fn}: lora_params must hold {{'a': ..., 'b': ...}} or None in place "
        f'of each leaf of params (as lora_init returns), got '
        f'{type(adapter).__name__} at {path!r}.')
  a, b = adapter['a'], adapter['b']
  _check_factor(a, 'a', fn)
  _check_factor(b, 'b', fn)
  shape = np.shape(w)
  d_in, d_out = _matrix_shape(shape) if len(shape) >= 1 else (None, None)
  rank = np.shape(a)[1]
  if np.shape(a) != (d_in, rank) or np.shape(b) != (rank, d_out):
    raise ValueError(
        f'{fn}: lora_params must hold a of shape (d_in, rank) = ({d_in}, r) '
        f'and b of shape (r, d_out) = (r, {d_out}) for the leaf {path!r} of '
        f'shape {shape}, got a {np.shape(a)} and b {np.shape(b)}.')
  w = jnp.asarray(w)
  delta = jnp.matmul(a, b)
  scale = _scale(alpha, rank, delta.dtype, fn)
  if scale is not None:
    delta = scale * delta
  return w + delta.reshape(shape).astype(w.dtype)


def lora_merge(params: Params, lora_params: Params, *,
               alpha: float | jax.typing.ArrayLike | None = None) -> Params:
  r"""Adds the low-rank updates to the weights: ``W + (alpha / r) a b``.

  For each leaf with an adapter, returns ``W + (alpha / rank) * (a @
  b).reshape(W.shape)`` in ``W``'s dtype; leaves whose adapter is ``None``
  are returned as they are (the same objects). With ``b = 0`` (a fresh
  :func:`lora_init`) the result equals ``params``.

  The paper scales the update by :math:`\alpha / r` with :math:`\alpha` fixed
  to the first rank tried, so that changing ``r`` needs no retuning of the
  learning rate; ``alpha=None`` means ``alpha = rank`` (scale 1).

  Args:
    params: The (frozen) weights, a pytree of arrays.
    lora_params: Adapters as returned by :func:`lora_init`: ``params``'
      structure with ``{'a': [d_in, r], 'b': [r, d_out]}`` or ``None`` in
      place of each leaf.
    alpha: The scaling numerator, a scalar (may be traced), or ``None``.

  Returns:
    A pytree like ``params`` with the merged weights.

  Raises:
    ValueError: if ``lora_params`` does not have ``params``' structure, holds
      something other than ``{'a', 'b'}`` or ``None`` in place of a leaf, or
      ``a``/``b`` have the wrong shapes; or if ``alpha`` is not a scalar.

  References:
    Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021
  """
  fn = 'lora_merge'
  if alpha is not None and np.ndim(alpha) != 0:
    raise ValueError(
        f'{fn}: alpha must be a scalar or None, got shape {np.shape(alpha)}.')
  flat, treedef = jax.tree.flatten_with_path(params)
  try:
    adapters = treedef.flatten_up_to(lora_params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'{fn}: lora_params must have the pytree structure of params, with '
        f"{{'a': ..., 'b': ...}} or None in place of each leaf (as lora_init "
        f'returns), got {jax.tree.structure(lora_params)} for params '
        f'{treedef} ({e}).') from e
  merged = [
      _merge_leaf(w, adapter, alpha, masks.path_str(kp), fn)
      for (kp, w), adapter in zip(flat, adapters)
  ]
  return jax.tree.unflatten(treedef, merged)


def with_lora(apply_fn: ApplyFn, *,
              alpha: float | jax.typing.ArrayLike | None = None
              ) -> Callable[..., Any]:
  """Wraps ``apply_fn(params, x)`` to take low-rank adapters.

  Returns ``fn(params, lora_params, x, *args, **kwargs) =
  apply_fn(lora_merge(params, lora_params, alpha=alpha), x, *args,
  **kwargs)``. Differentiate ``fn`` with respect to ``lora_params``
  (``jax.grad(..., argnums=1)``) to train the adapters only: ``params`` stay
  as they are, and the gradient has ``None`` off the targets. The weights are
  merged on every call (one ``[d_in, r] @ [r, d_out]`` matmul per target);
  :func:`lora_dense` is the unmerged form for a dense layer.

  Args:
    apply_fn: ``apply_fn(params, x, ...) -> outputs``.
    alpha: The LoRA scaling numerator (see :func:`lora_merge`).

  Returns:
    ``fn(params, lora_params, x, *args, **kwargs)``.

  References:
    Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021
  """
  if not callable(apply_fn):
    raise TypeError(
        f'with_lora: apply_fn must be callable, got {type(apply_fn).__name__}.')
  if alpha is not None and np.ndim(alpha) != 0:
    raise ValueError(
        f'with_lora: alpha must be a scalar or None, got shape '
        f'{np.shape(alpha)}.')

  def fn(params: Params, lora_params: Params, x: Any, *args: Any,
         **kwargs: Any) -> Any:
    merged = lora_merge(params, lora_params, alpha=alpha)
    return apply_fn(merged, x, *args, **kwargs)

  return fn


def lora_dense(x: jax.typing.ArrayLike, w: jax.typing.ArrayLike,
               a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, *,
               alpha: float | jax.typing.ArrayLike | None = None) -> jax.Array:
  """A dense layer with an unmerged adapter: ``x @ w + (alpha/r) (x @ a) @ b``.

  Equals ``x @ lora_merge(w, {'a': a, 'b': b}, alpha=alpha)`` up to rounding,
  at ``O(r (d_in + d_out))`` extra cost per row instead of one ``[d_in, d_out]``
  merge per call: cheaper when the batch is small next to ``d_in * d_out / (d_in
  + d_out)``, or when one frozen ``w`` serves several adapters.

  Args:
    x: Inputs, shape ``[..., d_in]``.
    w: The (frozen) kernel, shape ``[d_in, d_out]``.
    a: Shape ``[d_in, r]``.
    b: Shape ``[r, d_out]``.
    alpha: The LoRA scaling numerator; ``None`` means ``alpha = r``.

  Returns:
    Outputs of shape ``[..., d_out]``.

  Raises:
    ValueError: on shapes that do not fit together.

  References:
    Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021
  """
  fn = 'lora_dense'
  if np.ndim(w) != 2:
    raise ValueError(
        f'{fn}: w must have shape [d_in, d_out], got {np.shape(w)}.')
  d_in, d_out = np.shape(w)
  if np.ndim(x) < 1 or np.shape(x)[-1] != d_in:
    raise ValueError(
        f'{fn}: x must have shape [..., d_in] with d_in = {d_in}, got '
        f'{np.shape(x)}.')
  if np.ndim(a) != 2 or np.shape(a)[0] != d_in:
    raise ValueError(
        f'{fn}: a must have shape [d_in, r] with d_in = {d_in}, got '
        f'{np.shape(a)}.')
  rank = np.shape(a)[1]
  if np.shape(b) != (rank, d_out):
    raise ValueError(
        f'{fn}: b must have shape [r, d_out] = {(rank, d_out)}, got '
        f'{np.shape(b)}.')
  x, w, a, b = (jnp.asarray(v) for v in (x, w, a, b))
  low_rank = jnp.matmul(jnp.matmul(x, a), b)
  scale = _scale(alpha, rank, low_rank.dtype, fn)
  if scale is not None:
    low_rank = scale * low_rank
  return jnp.matmul(x, w) + low_rank
