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

Layouts. LoRA is low rank in the *matrix* a kernel multiplies its input with,
and which axes of a kernel are its input axes is not written in its shape. A
target ``W`` with ``f`` leading input axes (``fan_in_axes``) is the matrix
``[d_in, d_out] = [prod(W.shape[:f]), prod(W.shape[f:])]``; its adapter is
``a: [d_in, r]``, ``b: [r, d_out]`` and its update ``(alpha / r) * (a @
b).reshape(W.shape)``. By default ``f = 1`` for 2-D kernels ``[d_in, d_out]``
(flax ``Dense``) and ``f = 3`` for 4-D convolution kernels ``[kh, kw, c_in,
c_out]`` (HWIO: the update is low rank in the patch-to-channel map); any other
rank raises rather than guess. flax's attention keeps 3-D ``DenseGeneral``
kernels, ``query``/``key``/``value`` ``[d_model, heads, head_dim]`` (``f =
1``) and ``out`` ``[heads, head_dim, d_model]`` (``f = 2``):
:func:`flax_fan_in_axes` tells them apart by name::

  variables = linen.MultiHeadDotProductAttention(num_heads=4,
                                                 qkv_features=16).init(key, x)
  lora_params = metacf.adapters.lora_init(
      key, variables, rank=2, fan_in_axes=metacf.adapters.flax_fan_in_axes)
  # query/kernel (d_model, 4, 4): a [d_model, 2], b [2, 16]
  # out/kernel (4, 4, d_model):   a [16, 2],      b [2, d_model]
  # query/bias (4, 4) etc.: None (biases, norm scales and embeddings are
  # never default targets)

equinox stores ``Linear.weight`` as ``[out, in]`` (and ``Conv2d.weight`` as
``[c_out, c_in, kh, kw]``): the input axes come *last*, which no
``fan_in_axes`` describes. Adapt the transposed weights, which are ``[in,
out]`` (and ``[kw, kh, c_in, c_out]``)::

  params, static = eqx.partition(model, eqx.is_inexact_array)
  flip = lambda tree: jax.tree.map(jnp.transpose, tree)  # reverses the axes
  lora_params = metacf.adapters.lora_init(key, flip(params), rank=4)

  def apply_lora(params, lora_params, x):
    merged = flip(metacf.adapters.lora_merge(flip(params), lora_params,
                                             alpha=8.0))
    return eqx.combine(merged, static)(x)  # W + (alpha / r) (a @ b).T

so that ``x -> W x`` becomes ``x -> W x + (alpha / r) b.T (a.T x)``, the
paper's ``W + B A`` with ``A = a.T`` (random) and ``B = b.T`` (zero at init).
The default targets fit equinox too: biases are excluded by name and
``LayerNorm`` weights by rank (a ``targets='weight$'`` regex would select
those 1-D weights and fail), but an ``eqx.nn.Embedding``'s 2-D ``weight`` is
selected as well: leave it out with a callable ``targets``.
(``fan_in_axes=1`` on ``[out, in]`` would also give a rank-``r`` update, but
with ``a`` on the output side: the random factor and the zero one swap roles,
``a``'s scale uses ``d_out``, and :func:`lora_dense` would contract ``x``
with the wrong axis.)

:func:`lora_dense` is the unmerged form of a dense (or ``DenseGeneral``)
layer, ``x @ W + s * (x @ a) @ b``, which never materialises ``a @ b``.
"""

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf._src import masks
from metacf.adapters import _layouts
from metacf._src.types import ApplyFn, Params

def lora_init(key: jax.Array, params: Params, rank: int, *,
              targets: masks.MaskSpec = None,
              fan_in_axes: _layouts.FanInAxes = None) -> Params:
  r"""Initialises low-rank adapters ``(a, b)`` for the target leaves of ``params``.

  Every target leaf ``W`` with ``f`` leading input axes (``fan_in_axes``)
  gets ``a`` of shape ``[d_in, rank]`` and ``b`` of shape ``[rank, d_out]``,
  with ``d_in = prod(W.shape[:f])`` and ``d_out = prod(W.shape[f:])``, both
  of ``W``'s dtype, so that the adapted weight is ``W + (alpha / rank) * (a @
  b).reshape(W.shape)`` (:func:`lora_merge`): a rank-``r`` update of the
  matrix ``W.reshape(d_in, d_out)`` that maps the input axes to the output
  axes.

  Initialisation. ``b = 0``, so the adapted model starts equal to the
  pretrained one (as in the paper). ``a`` is drawn from
  :math:`U(-1/\sqrt{d_{in}}, 1/\sqrt{d_{in}})`, HF peft's default
  (``kaiming_uniform_(a=sqrt(5))`` on ``lora_A``, which is this bound), so
  ``x @ a`` has the scale of the layer's input whatever ``d_in``.

  Keys: ``key`` is split into one key per target leaf, in ``tree_leaves``
  order, so the same key gives the same adapters and target leaves of equal
  shape get different ``a``.

  flax linen attention (nnx is the same on ``nnx.split``'s state):

  >>> import jax
  >>> import jax.numpy as jnp
  >>> from flax import linen
  >>> from metacf.adapters import flax_fan_in_axes, lora_init, with_lora
  >>> key = jax.random.key(0)
  >>> x = jnp.ones((2, 5, 8))                              # [batch, len, 8]
  >>> model = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
  >>> variables = model.init(key, x)
  >>> lora_params = lora_init(key, variables, 2, fan_in_axes=flax_fan_in_axes)
  >>> lora_params['params']['query']['kernel']['a'].shape
  (8, 2)
  >>> lora_params['params']['query']['kernel']['b'].shape
  (2, 16)
  >>> lora_params['params']['out']['kernel']['a'].shape
  (16, 2)
  >>> print(lora_params['params']['query']['bias'])
  None
  >>> apply_lora = with_lora(model.apply, alpha=4.0)       # (vars, lora, x)
  >>> out = apply_lora(variables, lora_params, x)
  >>> bool(jnp.allclose(out, model.apply(variables, x)))   # b = 0 at init
  True

  equinox. ``eqx.nn.Linear.weight`` is ``[out, in]`` (``x -> W x``) and
  ``Conv2d.weight`` ``[c_out, c_in, kh, kw]``: the input axes come last,
  which no ``fan_in_axes`` describes. Reverse the axes (``[in, out]``, ``[kw,
  kh, c_in, c_out]``), adapt, merge, and reverse back:

  >>> import equinox as eqx
  >>> import jax
  >>> import jax.numpy as jnp
  >>> from metacf.adapters import lora_init, lora_merge
  >>> model = eqx.nn.Linear(4, 3, key=jax.random.key(0))
  >>> params, static = eqx.partition(model, eqx.is_inexact_array)
  >>> flip = lambda tree: jax.tree.map(jnp.transpose, tree)
  >>> lora_params = lora_init(jax.random.key(1), flip(params), 2)
  >>> lora_params.weight['a'].shape, lora_params.weight['b'].shape
  ((4, 2), (2, 3))
  >>> def apply_lora(params, lora_params, x):
  ...   merged = flip(lora_merge(flip(params), lora_params, alpha=8.0))
  ...   return eqx.combine(merged, static)(x)
  >>> x = jnp.ones(4)
  >>> bool(jnp.allclose(apply_lora(params, lora_params, x), model(x)))  # b = 0
  True

  so that ``W x`` becomes ``W x + (alpha / r) b.T (a.T x)``: the paper's
  ``W + B A`` with ``A = a.T`` random and ``B = b.T`` zero at init.
  (``fan_in_axes=1`` on ``[out, in]`` would give a rank-``r`` update too, but
  with ``a`` on the output side: the random and the zero factor swap roles
  and ``a``'s scale uses ``d_out``.)

  Args:
    key: A PRNG key.
    params: A pytree of arrays (e.g. the ``nnx.State`` of ``nnx.split`` or a
      linen variable dict). Only shapes and dtypes are read.
    rank: The adapter rank ``r``, a Python int with ``1 <= r <= min(d_in,
      d_out)`` for every target.
    targets: The leaves to adapt (:mod:`metacf.masks`): ``None`` (default:
      floating leaves with ``ndim >= 2`` whose name, the last path component,
      is not ``bias``, ``scale`` or ``embedding``; a trailing nnx ``/value``
      is skipped: dense, conv and attention kernels, not flax's 2-D
      ``DenseGeneral`` biases nor embedding tables), a pytree of bools like
      ``params``, a callable ``(path, leaf) -> bool``, or a regex searched in
      the ``/``-joined path (e.g. ``'(query|value)/kernel'``, the paper's
      choice of :math:`W_q, W_v`). Targets must be floating with ``ndim >=
      2``.
    fan_in_axes: How many leading axes of a target are its input axes: a
      Python int for every target, or a callable ``(path, leaf) -> int``
      called once per target (e.g. :func:`flax_fan_in_axes`); ``1 <= f <=
      ndim - 1``. ``None`` (default): 1 for 2-D targets (``[d_in, d_out]``),
      3 for 4-D ones (conv HWIO, ``[kh, kw, c_in, c_out]``); a target of any
      other rank then raises, as its layout cannot be told from its shape
      (flax's attention kernels are 3-D with ``f = 1`` for ``query`` and
      ``f = 2`` for ``out``). equinox's ``[out, in]`` weights have their
      input axes last: adapt them transposed (below).

  Returns:
    A pytree with ``params``' structure where each target leaf is replaced by
    ``{'a': a, 'b': b}`` and every other leaf by ``None``.

  Raises:
    TypeError: if ``rank`` is not a Python int, a target is not floating,
      ``fan_in_axes`` is not None, an int or a callable, or the callable
      returns something other than an int.
    ValueError: if ``rank < 1`` or ``rank > min(d_in, d_out)`` for a target,
      ``targets`` selects no leaf, a target has ``ndim < 2``,
      ``fan_in_axes`` is None for a target that is neither 2-D nor 4-D, or
      ``fan_in_axes`` is outside ``1..ndim-1`` for a target.

  References:
    Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021
  """
  fn = 'lora_init'
  rank = checks.check_int(rank, 'rank', fn, min_value=1)
  _layouts.check_fan_in_spec(fan_in_axes, fn)
  flat, treedef = jax.tree.flatten_with_path(params)
  if targets is None:
    chosen = [_layouts.default_target(kp, leaf) for kp, leaf in flat]
  else:
    chosen = masks.mask_leaves(targets, params, name='targets', fn=fn)
  paths = [masks.path_str(kp) for kp, _ in flat]
  leaves = [leaf for _, leaf in flat]
  if not any(chosen):
    what = 'targets' if targets is not None else (
        f'targets (default: {_layouts.DEFAULT_TARGETS})')
    shown = ', '.join(repr(p) for p in paths[:4]) + (
        ', ...' if len(paths) > 4 else '')
    raise ValueError(
        f'{fn}: {what} matched no leaf; paths are like {shown or "(none)"}.')

  layouts = []
  for path, leaf, is_target in zip(paths, leaves, chosen):
    if not is_target:
      layouts.append(None)
      continue
    shape = tuple(np.shape(leaf))
    if len(shape) < 2:
      raise ValueError(
          f'{fn}: targets must select leaves with ndim >= 2, got shape '
          f'{shape} at {path!r}.')
    if not _layouts.is_floating(leaf):
      raise TypeError(
          f'{fn}: targets must select floating leaves, got dtype '
          f'{_layouts.dtype_of(leaf)} at {path!r}.')
    f = _layouts.fan_in(fan_in_axes, path, leaf, fn)
    d_in, d_out = _layouts.matrix_shape(shape, f)
    if rank > min(d_in, d_out):
      raise ValueError(
          f'{fn}: rank must be <= min(d_in, d_out) = {min(d_in, d_out)} for '
          f'the target {path!r} of shape {shape} (d_in = {d_in}, d_out = '
          f'{d_out}), got {rank}.')
    layouts.append((d_in, d_out))

  keys = iter(jax.random.split(key, sum(chosen)))
  out = []
  for leaf, layout in zip(leaves, layouts):
    if layout is None:
      out.append(None)
      continue
    d_in, d_out = layout
    dtype = _layouts.dtype_of(leaf)
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
  shape = tuple(np.shape(w))
  size = math.prod(shape)
  (d_in, rank), (rank_b, d_out) = np.shape(a), np.shape(b)
  # The layout (fan_in_axes) is a's and b's: (a @ b) only has to fill W.
  if rank != rank_b or d_in * d_out != size:
    raise ValueError(
        f'{fn}: lora_params must hold a [d_in, r] and b [r, d_out] with '
        f'd_in * d_out = {size}, the size of the leaf {path!r} of shape '
        f'{shape}, got a {np.shape(a)} and b {np.shape(b)}.')
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

  The layout (which axes of ``W`` are its input axes, ``fan_in_axes`` of
  :func:`lora_init`) is carried by the shapes of ``a`` ``[prod(W.shape[:f]),
  r]`` and ``b`` ``[r, prod(W.shape[f:])]``, so no layout argument is needed
  here: ``a @ b`` is reshaped, row-major, to ``W.shape``, and only ``a.shape[0]
  * b.shape[1] == W.size`` is checked.

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
      ``a``/``b`` are not 2-D, disagree on ``r``, or ``a.shape[0] *
      b.shape[1] != W.size``; or if ``alpha`` is not a scalar.

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
               alpha: float | jax.typing.ArrayLike | None = None,
               fan_in_axes: int | None = None) -> jax.Array:
  """A dense layer with an unmerged adapter: ``x @ w + (alpha/r) (x @ a) @ b``.

  Equals ``x @ lora_merge(w, {'a': a, 'b': b}, alpha=alpha)`` up to rounding,
  at ``O(r (d_in + d_out))`` extra cost per row instead of one ``[d_in, d_out]``
  merge per call: cheaper when the batch is small next to ``d_in * d_out / (d_in
  + d_out)``, or when one frozen ``w`` serves several adapters.

  The layout is :func:`lora_init`'s: ``w``'s first ``f = fan_in_axes`` axes
  are its input axes, ``x`` ends with them and is contracted over them, as
  flax's ``DenseGeneral`` does: ``x [..., *w.shape[:f]] -> [...,
  *w.shape[f:]]``, with ``a [prod(w.shape[:f]), r]`` and ``b [r,
  prod(w.shape[f:])]``. For a 2-D ``w`` this is ``x @ w``.

  Args:
    x: Inputs, shape ``[..., *w.shape[:f]]`` (``[..., d_in]`` for 2-D ``w``).
    w: The (frozen) kernel, shape ``[d_in, d_out]``, or ``ndim > 2`` with
      ``fan_in_axes`` (e.g. an attention ``query`` kernel ``[d_model, heads,
      head_dim]`` with ``f = 1``, ``out`` ``[heads, head_dim, d_model]`` with
      ``f = 2``).
    a: Shape ``[d_in, r]``, ``d_in = prod(w.shape[:f])``.
    b: Shape ``[r, d_out]``, ``d_out = prod(w.shape[f:])``.
    alpha: The LoRA scaling numerator; ``None`` means ``alpha = r``.
    fan_in_axes: ``f``, a Python int in ``1..w.ndim-1``. ``None`` (default)
      means 1 for a 2-D ``w`` and raises for any other rank (this is a dense
      contraction, not a convolution: no default for 4-D).

  Returns:
    Outputs of shape ``[..., *w.shape[f:]]`` (``[..., d_out]`` for 2-D ``w``).

  Raises:
    TypeError: if ``fan_in_axes`` is neither None nor a Python int.
    ValueError: on shapes that do not fit together, or a ``fan_in_axes``
      that is missing (``w`` not 2-D) or outside ``1..w.ndim-1``.

  References:
    Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021
  """
  fn = 'lora_dense'
  shape = tuple(np.shape(w))
  if len(shape) < 2:
    raise ValueError(
        f'{fn}: w must have shape [d_in, d_out] (or ndim > 2 with '
        f'fan_in_axes), got {shape}.')
  f = checks.check_int(fan_in_axes, 'fan_in_axes', fn, optional=True)
  if f is None:
    if len(shape) != 2:
      raise ValueError(
          f'{fn}: fan_in_axes must be given for w of shape {shape} (the '
          f'default covers 2-D [d_in, d_out] kernels only), got None.')
    f = 1
  if not 1 <= f <= len(shape) - 1:
    raise ValueError(
        f'{fn}: fan_in_axes must be in 1..ndim-1 = 1..{len(shape) - 1} for w '
        f'of shape {shape}, got {f}.')
  in_shape = shape[:f]
  d_in, d_out = _layouts.matrix_shape(shape, f)
  if np.ndim(x) < f or tuple(np.shape(x)[np.ndim(x) - f:]) != in_shape:
    expected = (f'[..., d_in] with d_in = {d_in}' if f == 1 else
                f'[..., {", ".join(map(str, in_shape))}] (the first '
                f'fan_in_axes = {f} axes of w)')
    raise ValueError(
        f'{fn}: x must have shape {expected}, got {np.shape(x)}.')
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
  batch = x.shape[:x.ndim - f]
  if len(shape) != 2:                # DenseGeneral: contract the matrix view
    x = x.reshape(*batch, d_in)
    w = w.reshape(d_in, d_out)
  low_rank = jnp.matmul(jnp.matmul(x, a), b)
  scale = _scale(alpha, rank, low_rank.dtype, fn)
  if scale is not None:
    low_rank = scale * low_rank
  y = jnp.matmul(x, w) + low_rank
  return y if len(shape) == 2 else y.reshape(*batch, *shape[f:])
