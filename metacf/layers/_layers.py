"""Layers whose per-task (vmapped) weights run fast on every backend.

Under ``jax.vmap`` over tasks with per-task weights (MAML's adapted
parameters), ``lax.conv_general_dilated`` becomes a grouped convolution (one
group per task) whose weight gradient is a dilated convolution; XLA:CPU runs
both on a slow generic path, superlinear in the number of tasks (see the
benchmarks page). Written as patches (im2col) and
one matrix product, the same convolution becomes a batched matmul under
``vmap``. Likewise ``lax.reduce_window`` max-pooling differentiates through
``select_and_scatter``, slow on XLA:CPU and worse at second order, whereas a
running ``where(candidate > best, candidate, best)`` over one strided slice
per window offset has the same gradient for non-overlapping windows (the
first maximum of a window wins ties, as with ``reduce_window``).
``batch_norm`` differentiates the normalisation by its closed form (fewer
passes over the activations than autodiff through the mean and variance,
so a faster Conv-4 meta-step on CPU) and takes the moments of shifted data,
so that float32 second-order meta-gradients stay accurate (2e-5 instead of
2.5e-3 off float64 on a Conv-4).

All functions are pure and work with any number of leading batch (vmap)
dimensions. ``conv_general_dilated`` is a drop-in for flax's
``nn.Conv(..., conv_general_dilated=metacf.layers.conv_general_dilated)``.
"""

from collections.abc import Sequence
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks

_Padding = str | Sequence[tuple[int, int]]


def _pads(padding: _Padding, in_shape: Sequence[int], window: Sequence[int],
          strides: Sequence[int], dilation: Sequence[int]
          ) -> list[tuple[int, int]]:
  if not isinstance(padding, str):
    return [tuple(int(v) for v in p) for p in padding]
  effective = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
  return list(lax.padtype_to_pads(in_shape, effective, strides, padding))


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: _Padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """``lax.conv_general_dilated`` as patches (im2col) and one matmul.

  Same signature and result as :func:`jax.lax.conv_general_dilated`. The
  kernel's taps are gathered by strided slices of the padded input into a
  ``[..., spatial_out, taps * in_features]`` patch tensor, contracted with
  the reshaped kernel by one ``dot_general``. Under ``vmap`` with batched
  kernels (per-task weights) that is a batched matmul, where
  ``lax.conv_general_dilated`` would be a grouped convolution; with an
  unbatched kernel it is one large matmul over all tasks' examples.

  Input dilation (transposed convolutions), feature or batch groups are
  delegated to ``lax.conv_general_dilated`` unchanged.

  Args:
    lhs: Input, ``[N, C, spatial...]`` by default or as ``dimension_numbers``
      says.
    rhs: Kernel, ``[O, I, spatial...]`` by default.
    window_strides: Stride per spatial dimension.
    padding: ``'SAME'``, ``'VALID'`` (also ``'SAME_LOWER'``) or one
      ``(low, high)`` pair per spatial dimension.
    lhs_dilation: Input dilation (delegated to lax if not all ones).
    rhs_dilation: Kernel dilation per spatial dimension.
    dimension_numbers: As for ``lax.conv_general_dilated``, e.g.
      ``('NHWC', 'HWIO', 'NHWC')``.
    feature_group_count: Delegated to lax if not 1.
    batch_group_count: Delegated to lax if not 1.
    precision: Passed to the matmul.
    preferred_element_type: Passed to the matmul.

  Returns:
    The convolution, laid out as ``dimension_numbers`` says.
  """
  nd = lhs.ndim - 2
  if (nd < 1 or feature_group_count != 1 or batch_group_count != 1
      or (lhs_dilation is not None and any(d != 1 for d in lhs_dilation))):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)
  if rhs.ndim != lhs.ndim:
    raise ValueError(
        'conv_general_dilated: rhs must have the rank of lhs '
        f'({lhs.ndim}), got shape {rhs.shape}.')
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  # To channels-last: lhs [N, *spatial, C], rhs [*spatial, I, O].
  x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  w = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
  window = w.shape[:nd]
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nd
  pads = _pads(padding, x.shape[1:-1], window, strides, dilation)
  # lax.pad, not jnp.pad: explicit pads may be negative (crop), as in lax.
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
  out_sizes = [
      (size - (k - 1) * d - 1) // s + 1
      for size, k, d, s in zip(x.shape[1:-1], window, dilation, strides)]
  if any(n <= 0 for n in out_sizes):
    raise ValueError(
        'conv_general_dilated: the (dilated) kernel is larger than the padded '
        f'input, got spatial input {tuple(x.shape[1:-1])} and window '
        f'{tuple(window)}.')
  # Patches built one spatial axis at a time, last axis first: each stage
  # stacks the strided slices of one axis's taps along the features, so the
  # features end up tap-major (kernel rows outermost), as the reshaped kernel
  # below. For a 3x3 kernel that is 3 + 3 slices in two stacks instead of 9
  # slices in one: the same matmul operand from fewer XLA fusions (forward
  # and transposed; XLA compiles each fusion apart). On CPU a Conv-4 MAML
  # meta-step (bench_maml, workload B, 4 tasks) compiled in 7.8 instead of
  # 9.5 s and ran 324 instead of 363 ms (2026-12-07, interleaved, load 1.5).
  patches = x
  for axis in reversed(range(nd)):
    k, d, s, n = window[axis], dilation[axis], strides[axis], out_sizes[axis]
    dim = axis + 1
    taps = []
    for o in range(k):
      start = [0] * patches.ndim
      limit = list(patches.shape)
      step = [1] * patches.ndim
      start[dim], limit[dim], step[dim] = o * d, o * d + (n - 1) * s + 1, s
      taps.append(lax.slice(patches, start, limit, step))
    if k > 1:
      # stack + reshape, not concatenate along the features: the same array,
      # which XLA:CPU wrote about 3x faster (12 vs 34 ms for Conv-4's
      # [75, 14, 14, 576] operand).
      stacked = jnp.stack(taps, axis=-2)
      patches = jnp.reshape(stacked, (*stacked.shape[:-2], -1))
    else:
      patches = taps[0]
  kernel = jnp.reshape(w, (-1, w.shape[-1]))  # [taps * I, O], tap-major.
  out = lax.dot_general(
      patches, kernel, (((patches.ndim - 1,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)
  # From [N, *spatial, O] back to the requested output layout.
  out_perm = np.argsort((dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
  return jnp.transpose(out, tuple(int(i) for i in out_perm))


def max_pool(x: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None,
             padding: _Padding = 'VALID') -> jax.Array:
  """Max-pooling over ``x``'s spatial axes, flax's layout and arguments.

  ``x`` is ``[batch..., *spatial, features]`` with ``len(window_shape)``
  spatial axes (as ``flax.linen.max_pool``). Non-overlapping windows
  (``strides == window_shape``, ``'VALID'``) are computed as a running
  ``where`` over strided slices (one per window offset), which
  differentiates (also at second order) without ``select_and_scatter``;
  trailing rows that do not fill a window are dropped, as with ``'VALID'``.
  NaNs propagate. Any other configuration falls back to
  ``lax.reduce_window``.

  Args:
    x: Input array.
    window_shape: Window size per spatial axis.
    strides: Stride per spatial axis (default: ``window_shape``).
    padding: ``'VALID'``, ``'SAME'`` or ``(low, high)`` pairs.

  Returns:
    The pooled array.
  """
  nd = len(window_shape)
  checks.check_min_rank(x, nd + 1, 'x', 'max_pool')
  window = tuple(int(w) for w in window_shape)
  strides = window if strides is None else tuple(int(s) for s in strides)
  lead = x.ndim - nd - 1
  if strides != window or padding != 'VALID':
    dims = (1,) * lead + window + (1,)
    pads = (padding if isinstance(padding, str) else
            ((0, 0),) * lead + tuple(tuple(p) for p in padding) + ((0, 0),))
    return lax.reduce_window(x, -jnp.inf, lax.max, dims,
                             (1,) * lead + strides + (1,), pads)
  spatial = x.shape[lead:lead + nd]
  out = [s // w for s, w in zip(spatial, window)]
  if any(n == 0 for n in out):
    raise ValueError(
        f'max_pool: window_shape {window} is larger than the spatial shape '
        f'{tuple(spatial)} of x.')
  # Not jnp.max (of a reshape) nor lax.max: their derivatives pick the
  # maximum by exact equality `candidate == max(...)`. Under jit, XLA:CPU
  # (jaxlib 0.10.2) gave a Conv-4 with BatchNorm a wrong (meta-)gradient with
  # either (right in eager mode, and with XLA's algsimp or fusion pass off),
  # apparently as it recomputes the candidates in other fusions, not bit for
  # bit. A select on comparisons between the candidates themselves routes
  # each window's gradient to exactly one of them.
  best = None
  for offsets in np.ndindex(*window):
    start = (0,) * lead + offsets + (0,)
    limit = (*x.shape[:lead],
             *[o + (n - 1) * w + 1 for o, n, w in zip(offsets, out, window)],
             x.shape[-1])
    tap = lax.slice(x, start, limit, (1,) * lead + window + (1,))
    best = tap if best is None else jnp.where(
        (tap > best) | jnp.isnan(tap), tap, best)
  return best


def _expand_to_rank(a: jax.Array, ndim: int) -> jax.Array:
  """Prepends unit axes to ``a`` until it has ``ndim`` dimensions."""
  return jnp.reshape(a, (1,) * (ndim - jnp.ndim(a)) + jnp.shape(a))


def _normalize_impl(x: jax.Array, axis: tuple[int, ...], epsilon: float
                    ) -> tuple[jax.Array, jax.Array]:
  # Shifted data (Chan, Golub & LeVeque 1983): moments of d = x - rough,
  # with rough a first estimate of the mean that carries no gradient. Same
  # values and derivatives in exact arithmetic; in float32 the mean of d is
  # the rough mean's rounding error, so xhat's mean is zero to rounding. The
  # second-order (meta-)gradient is sensitive to it: through a Conv-4 on
  # [0, 1] images, MAML's first-layer meta-gradient went from 2.5e-3 to
  # 2e-5 off a float64 reference. Both moments of d are one fused pass.
  rough = lax.stop_gradient(jnp.mean(x, axis=axis, keepdims=True))
  d = x - rough
  shift = jnp.mean(d, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(d), axis=axis, keepdims=True) - jnp.square(shift)
  rstd = lax.rsqrt(var + jnp.asarray(epsilon, x.dtype))
  return (d - shift) * rstd, rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _normalize(x: jax.Array, axis: tuple[int, ...], epsilon: float
               ) -> jax.Array:
  """``(x - mean) / sqrt(var + epsilon)`` over ``axis``."""
  return _normalize_impl(x, axis, epsilon)[0]


@_normalize.defjvp
def _normalize_jvp(axis, epsilon, primals, tangents):
  # The closed-form derivative of the normalisation,
  #   d xhat = rstd * (t - mean(t) - xhat * mean(t * xhat)),
  # an orthogonal projection of t scaled by rstd (Ioffe & Szegedy 2015).
  # Autodiff through the mean and variance gives the same value through more
  # intermediate arrays; XLA:CPU fuses this rule into fewer passes over x,
  # which made a Conv-4 MAML meta-step about 1.2x faster (bench_maml,
  # workload B). The rule is itself differentiable, so second order (MAML's
  # meta-gradient) goes through it.
  (x,), (t,) = primals, tangents
  xhat, rstd = _normalize_impl(x, axis, epsilon)
  t = t - jnp.mean(t, axis=axis, keepdims=True)
  along = jnp.mean(t * xhat, axis=axis, keepdims=True)
  return xhat, rstd * (t - xhat * along)


def batch_norm(x: jax.Array, scale: jax.Array | None = None,
               offset: jax.Array | None = None, *, epsilon: float = 1e-5,
               axis: int | Sequence[int] | None = None) -> jax.Array:
  """Transductive BatchNorm: normalise with the statistics of this batch.

  As MAML uses it (Finn et al. 2017): the support set's statistics in the
  inner loop, the query set's in the outer loss, no running averages.
  ``scale``/``offset`` (shape ``[features]``) are ordinary parameters.

  The normalisation has a closed-form derivative (``jax.custom_jvp``; Ioffe
  & Szegedy 2015), differentiable to any order, that compiles to fewer
  passes over ``x`` than autodiff through the mean and variance. The moments
  are those of ``x`` shifted by a first estimate of the mean, so that in
  float32 the normalised output's mean is zero to rounding (MAML's
  second-order meta-gradient amplifies any residual).

  Args:
    x: ``[batch, ..., features]``.
    scale: Optional per-feature scale.
    offset: Optional per-feature offset.
    epsilon: Added to the variance.
    axis: Axes to reduce over (default: all but the last).

  Returns:
    ``(x - mean) / sqrt(var + epsilon) * scale + offset``.
  """
  checks.check_positive(epsilon, 'epsilon', 'batch_norm')
  if axis is None:
    axis = tuple(range(x.ndim - 1))
  elif isinstance(axis, int):
    axis = (axis,)
  axis = tuple(sorted(int(a) % x.ndim for a in axis))
  y = _normalize(x, axis, float(epsilon))
  # Right-aligned like NumPy broadcasting, but explicit: no implicit rank
  # promotion (which jax_numpy_rank_promotion='raise' rejects).
  if scale is not None:
    y = y * _expand_to_rank(scale, y.ndim)
  if offset is not None:
    y = y + _expand_to_rank(offset, y.ndim)
  return y
