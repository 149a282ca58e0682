"""Numerically stable KL divergences of tempered softmaxes.

The numerics under :mod:`metacf.distill`'s losses: the Hinton loss
``T**2 KL(softmax(t/T) || softmax(s/T))`` with its custom JVP, the KL from a
tempered probability vector that may have exact zeros, and the dtype and
temperature helpers they share.

Numerics. The naive ``T**2 * sum(p_t * (log p_t - log p_s))`` cancels
catastrophically at high temperature (in float32 at T = 1000 its relative
error exceeds 100%), because each log-probability is ``-log C + O(1/T)``. We
use the identity, with ``d = (s - t) / T`` and ``dc = d - E_t[d]``,

  KL(p_t || p_s) = log E_t[exp(dc)] = log1p(E_t[exp(dc) - 1 - dc]),

where ``exp(x) - 1 - x`` is evaluated by its Taylor series near 0 and every
summand is non-negative, so the result is accurate to a few ulps at every
temperature and is never negative. Rows whose terms could overflow (logit
range / T above 80) use the plain log-sum-exp difference instead, which is
accurate there because the divergence is then not small next to the logits.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

ArrayLike = jax.typing.ArrayLike

# |x| below which exp(x) - 1 - x is summed as a Taylor series to x^10
# (truncation error < 2e-10 relative); above it exp(x) - 1 - x loses at most
# a factor 11 to cancellation.
_SERIES_THRESHOLD = 0.5
# exp() arguments are shifted so that the largest is at most this.
_MAX_EXPONENT = 60.0


def compute_dtype(*xs: ArrayLike) -> jnp.dtype:
  """float64 if any input is float64, else float32 (half precision upcasts)."""
  for x in xs:
    if jnp.result_type(x) == jnp.float64:
      return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def broadcast_temperature(temperature: ArrayLike, dtype: jnp.dtype,
                          axis: int = -1) -> jax.Array:
  """``T`` as an array that broadcasts against the logits: ``()`` or with a
  size-1 class ``axis`` inserted (per-example temperatures)."""
  temp = jnp.asarray(temperature, dtype)
  return temp if temp.ndim == 0 else jnp.expand_dims(temp, axis)


def per_example(temp: jax.Array) -> jax.Array:
  """``T`` of shape ``()`` or ``[..., 1]`` as ``()`` or ``[...]``."""
  return temp if temp.ndim == 0 else jnp.squeeze(temp, axis=-1)


def log_probs(p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(log p, p == 0)``: ``-inf`` at exact zeros, with a finite gradient there.

  Only exact zeros are masked: a NaN (or, when traced, a negative entry) gives
  a NaN log, which propagates rather than being read as a zero probability.
  """
  zero = p == 0
  return jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, 1.0, p))), zero



def phi_series(x: jax.Array) -> jax.Array:
  """exp(x) - 1 - x for |x| <= 0.5, by Horner's rule on its Taylor series."""
  acc = jnp.full_like(x, 1.0 / math.factorial(10))
  for n in range(9, 1, -1):
    acc = 1.0 / math.factorial(n) + x * acc
  return x * x * acc


def log_expect_exp(x: jax.Array, p: jax.Array, log_p: jax.Array,
                   support: jax.Array | None = None,
                   off_support_log: jax.Array | None = None) -> jax.Array:
  """``log(sum_j p_j exp(x_j) + sum_{j off support} exp(off_support_log_j))``.

  Accurate near 0. Requires ``sum p = 1`` and ``sum p x = 0`` along the last
  axis; ``p`` is zero off ``support`` (``support=None``: all classes), where
  ``x`` and ``log_p`` are ignored.
  """
  u = log_p + x
  if support is not None:
    u = jnp.where(support, u, -jnp.inf if off_support_log is None else
                  off_support_log)
  shift = jnp.maximum(jnp.max(u, axis=-1, keepdims=True) - _MAX_EXPONENT, 0.0)
  w = jnp.exp(u - shift)
  small = jnp.abs(x) < _SERIES_THRESHOLD
  if support is not None:
    small = small & support
  x_small = jnp.where(small, x, 0.0)
  terms = jnp.where(small, p * phi_series(x_small), w - p * (1.0 + x))
  if support is not None:
    terms = jnp.where(support, terms, w)
  shift = jnp.squeeze(shift, axis=-1)
  via_series = jnp.log1p(jnp.sum(terms, axis=-1))
  via_lse = shift + jnp.log(jnp.sum(w, axis=-1))
  return jnp.where(shift > 0.0, via_lse, via_series)


def softmax_parts(b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(p, log p, logsumexp) of ``b`` along the last axis, one exp per entry.

  Entries of ``b`` may be ``-inf`` (zero probability), not all of a row.
  """
  top = jax.lax.stop_gradient(jnp.max(b, axis=-1, keepdims=True))
  e = jnp.exp(b - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  log_total = jnp.log(total)
  return e / total, b - top - log_total, top + log_total


# Above this, exp(dc) may overflow float32 and a row falls back to the plain
# log-sum-exp difference (then KL >= 80 - log C or the row is degenerate).
_MAX_DC = 80.0


class HintonParts(NamedTuple):
  kl: jax.Array         # KL(p_t || p_s), shape [...]
  p_t: jax.Array        # softmax(t / T), shape [..., C]
  dc: jax.Array         # (s - t) / T centred under p_t, shape [..., C]
  expm1_dc: jax.Array   # expm1(min(dc, _MAX_DC)), shape [..., C]
  p_s: jax.Array        # softmax(s / T), shape [..., C]
  overflow: jax.Array   # rows using the log-sum-exp fallback, shape [..., 1]


def hinton_parts(s: jax.Array, t: jax.Array, temp: jax.Array) -> HintonParts:
  """KL(softmax(t/T) || softmax(s/T)) in three passes over the logits.

  Pass 1 takes the row maxima, pass 2 the partition functions and E_t[d],
  pass 3 sums p_t (exp(dc) - 1 - dc): few dependent reductions keep XLA from
  recomputing the exponentials many times over.
  """
  a_t, a_s, d = t / temp, s / temp, (s - t) / temp
  # Maxima of the raw logits (T > 0): no scaled copy is materialised for them.
  m_t = jax.lax.stop_gradient(jnp.max(t, axis=-1, keepdims=True)) / temp
  m_s = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)) / temp
  min_t = jax.lax.stop_gradient(jnp.min(t, axis=-1, keepdims=True)) / temp
  e_t, e_s = jnp.exp(a_t - m_t), jnp.exp(a_s - m_s)
  z_t = jnp.sum(e_t, axis=-1, keepdims=True)
  z_s = jnp.sum(e_s, axis=-1, keepdims=True)
  c = jnp.sum(e_t * d, axis=-1, keepdims=True) / z_t
  p_t = e_t / z_t
  dc = d - c
  # max(dc) <= max(a_s) - min(a_t) - c: a bound instead of one more reduction.
  overflow = jax.lax.stop_gradient(m_s - min_t - c) > _MAX_DC
  dc_safe = jnp.minimum(dc, _MAX_DC)
  expm1_dc = jnp.expm1(dc_safe)
  small = jnp.abs(dc) < _SERIES_THRESHOLD
  phi = jnp.where(small, phi_series(jnp.where(small, dc, 0.0)),
                  expm1_dc - dc_safe)
  # sum(e_t phi) / z_t rather than sum(p_t phi): one full-size array fewer.
  kl_series = jnp.log1p(jnp.sum(e_t * phi, axis=-1, keepdims=True) / z_t)
  kl_lse = m_s - m_t + jnp.log(z_s / z_t) - c
  kl = jnp.squeeze(jnp.where(overflow, kl_lse, kl_series), axis=-1)
  return HintonParts(kl, p_t, dc, expm1_dc, e_s / z_s, overflow)


@jax.custom_jvp
def hinton_loss(s: jax.Array, t: jax.Array, temp: jax.Array) -> jax.Array:
  # temp: () or [..., 1] (per example).
  return per_example(temp)**2 * hinton_parts(s, t, temp).kl


@functools.partial(hinton_loss.defjvp, symbolic_zeros=True)
def hinton_loss_jvp(primals, tangents):
  # d/ds = T (p_s - p_t);  d/dt = -T p_t dc;
  # d/dT = 2 T KL - sum((p_s - p_t) s) + sum(p_t dc t).
  s, t, temp_in = primals
  s_dot, t_dot, temp_dot = tangents
  parts = hinton_parts(s, t, temp_in)
  temp = per_example(temp_in)
  out = temp**2 * parts.kl
  tangent = jnp.zeros_like(out)
  # p_s - p_t = p_t expm1(dc - KL) = p_t (expm1(dc) exp(-KL) + expm1(-KL)):
  # no cancellation when p_s ~ p_t (high T).
  neg_kl = -parts.kl[..., None]
  diff = jnp.where(
      parts.overflow, parts.p_s - parts.p_t,
      parts.p_t * (parts.expm1_dc * jnp.exp(neg_kl) + jnp.expm1(neg_kl)))
  if not isinstance(s_dot, SymbolicZero):
    tangent = tangent + temp * jnp.sum(diff * s_dot, axis=-1)
  if not isinstance(t_dot, SymbolicZero):
    tangent = tangent - temp * jnp.sum(parts.p_t * parts.dc * t_dot, axis=-1)
  if not isinstance(temp_dot, SymbolicZero):
    d_temp = (2.0 * temp * parts.kl - jnp.sum(diff * s, axis=-1) +
              jnp.sum(parts.p_t * parts.dc * t, axis=-1))
    tangent = tangent + d_temp * per_example(temp_dot)
  return out, tangent


class ProbsKL:
  """KL(temper(p, T) || softmax(s / T)) where p may have exact zeros."""

  def __init__(self, s: jax.Array, log_p: jax.Array, temp: jax.Array):
    # Off the support means p == 0 (log p = -inf) only: a NaN log p stays on
    # it and makes the whole row NaN.
    self.support = log_p != -jnp.inf
    log_p_safe = jnp.where(self.support, log_p, 0.0)
    b = jnp.where(self.support, log_p_safe / temp, -jnp.inf)
    self.p_t, log_p_t, self.lse_b = softmax_parts(b)
    self.log_p_t = jnp.where(self.support, log_p_t, 0.0)
    self.a_s = s / temp
    self.d = jnp.where(self.support, (s - log_p_safe) / temp, 0.0)
    self.mean_d = jnp.sum(self.p_t * self.d, axis=-1, keepdims=True)
    self.dc = self.d - self.mean_d

  def kl(self) -> jax.Array:
    # Off the teacher's support p_t = 0, but the student's mass there still
    # counts: exp(u_j) = p_s_j exp(KL) = exp(a_s_j - lse(b) - E_t[d]).
    off = self.a_s - self.lse_b - self.mean_d
    return log_expect_exp(self.dc, self.p_t, self.log_p_t, self.support,
                          off)
