r"""Exact, sort-free sampling primitives for the noise kernels.

Everything here is elementwise or ``O(k^2)`` on short vectors, so that XLA:CPU
runs it as a handful of fused loops (for rows of up to 64 elements): no
sort, no scatter, no sequential scan over the sequence (see
``benchmarks/bench_noise.py`` for the measurements that led here).

* :func:`uniform_below`: integers exactly uniform on ``[0, n)`` from 32 random
  bits, by Lemire's multiply-and-reject method (the rejection, probability
  ``< n / 2^32``, is a ``while_loop`` that almost never runs its body).
* :func:`floyd_subset`: Floyd's algorithm for a uniform ``k``-subset, with its
  ``k`` sequential steps turned into ``O(k^2)`` parallel work plus
  ``ceil(log2 k)`` rounds of pointer jumping.
* :func:`ascending`: sorts a short vector of distinct integers by counting
  (``O(k^2)``), cheaper than ``jnp.sort`` for the ``k`` of span corruption.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Below this many elements, pointer jumping uses one-hot products (fused,
# O(k^2)) rather than gathers: measured faster for span corruption's k = 27.
_ONE_HOT_MAX = 64
COMPARE_MAX = 64


def _mul_hi_lo(x: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """High and low 32-bit words of the 64-bit product of two uint32 arrays."""
  m16, s16 = jnp.uint32(0xFFFF), jnp.uint32(16)
  x_lo, x_hi = x & m16, x >> s16
  n_lo, n_hi = n & m16, n >> s16
  ll, lh, hl, hh = x_lo * n_lo, x_lo * n_hi, x_hi * n_lo, x_hi * n_hi
  mid = (ll >> s16) + (lh & m16) + (hl & m16)
  lo = (ll & m16) | (mid << s16)
  hi = hh + (lh >> s16) + (hl >> s16) + (mid >> s16)
  return hi, lo


def uniform_below(key: jax.Array, bound: jax.typing.ArrayLike) -> jax.Array:
  """Integers exactly uniform on ``[0, bound)``, elementwise.

  Lemire's method: for 32 uniform bits ``x``, ``floor(x * n / 2^32)`` is
  exactly uniform once the ``2^32 mod n`` values of ``x * n mod 2^32`` that
  would favour some outputs are rejected and redrawn (``jax.random.randint``
  takes a modulus instead, biased by up to ``n^2 / 2^32``). All draws happen
  in one ``while_loop``: the first pass draws every entry, a further pass
  (probability ``< size * max(n) / 2^32``) redraws the rejected ones. One
  loop keeps the kernels at one PRNG hash in the compiled program, which is
  most of their compile time.

  Args:
    key: A PRNG key.
    bound: Upper bounds, integers in ``[1, 2^31]``; the output's shape.

  Returns:
    int32 array of ``bound``'s shape.

  References:
    Lemire, `Fast Random Integer Generation in an Interval
    <https://arxiv.org/abs/1805.10941>`_, ACM TOMACS 2019
  """
  n = jnp.asarray(bound).astype(jnp.uint32)
  threshold = (jnp.uint32(0) - n) % n  # 2^32 mod n
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a legacy uint32 key
  impl = jax.random.key_impl(key)
  key_shape = jax.random.key_data(key).shape
  key_words = math.prod(key_shape)
  size = math.prod(n.shape)

  def draw(carry):
    value, done, key = carry
    # One PRNG call per pass; its last words key the next pass, as a split
    # would (both are the PRNG's outputs at fresh counters).
    words = jax.random.bits(key, (size + key_words,), jnp.uint32)
    hi, lo = _mul_hi_lo(words[:size].reshape(n.shape), n)
    take = ~done & (lo >= threshold)
    key = jax.random.wrap_key_data(words[size:].reshape(key_shape), impl=impl)
    return jnp.where(take, hi, value), done | take, key

  start = (jnp.zeros(n.shape, jnp.uint32), jnp.zeros(n.shape, jnp.bool_),
           key)
  value, _, _ = lax.while_loop(lambda c: ~jnp.all(c[1]), draw, start)
  return value.astype(jnp.int32)


def _chain_and(flags: jax.Array, ptr: jax.Array) -> jax.Array:
  """``out_i`` = AND of ``flags`` along ``i, ptr_i, ptr_ptr_i, ...`` (1-D).

  ``ptr_i <= i``, with ``ptr_i = i`` at the chain's end. Pointer jumping:
  after ``r`` rounds ``flags_i`` is the AND over the first ``2^r`` nodes of
  ``i``'s chain. Short rows run the ``ceil(log2 k)`` rounds that cover any
  chain, with one-hot products (fused); long rows loop with gathers until
  the pointers stop moving (chains are short, a few rounds).
  """
  k = flags.shape[0]
  if k <= _ONE_HOT_MAX:
    rounds = math.ceil(math.log2(k)) if k > 1 else 0
    idx = jnp.arange(k, dtype=jnp.int32)
    for _ in range(rounds):
      hot = ptr[:, None] == idx[None, :]  # [i, j]: ptr_i == j
      flags = flags & jnp.any(hot & flags[None, :], axis=1)
      ptr = jnp.sum(jnp.where(hot, ptr[None, :], 0), axis=1, dtype=jnp.int32)
    return flags

  def jump(carry):
    flags, ptr, _ = carry
    new_ptr = ptr[ptr]
    return flags & flags[ptr], new_ptr, jnp.any(new_ptr != ptr)

  # A round that moves no pointer has all of them at their chain's end and
  # has folded that end's flag in: done.
  flags, _, _ = lax.while_loop(lambda c: c[2], jump,
                               (flags, ptr, jnp.bool_(True)))
  return flags


def floyd_bounds(base: int, k: int) -> np.ndarray:
  """The bounds ``base + 1 + i`` of :func:`floyd_subset`'s draws."""
  return base + 1 + np.arange(k, dtype=np.int64)


def floyd_subset(draws: jax.Array, base: int) -> jax.Array:
  r"""Floyd's algorithm, vectorised: a uniform subset, in parallel steps.

  Floyd's algorithm draws a uniform ``k``-subset of ``[0, base + k)``: for
  ``i = 0, ..., k - 1`` with ``j_i = base + i``, draw ``t_i`` uniform on
  ``[0, j_i]`` and add ``t_i`` to the set unless it is already there, in
  which case add ``j_i``. After step ``i`` the set is a uniform
  ``(i + 1)``-subset of ``[0, j_i]``, so the first ``k'`` outputs are
  Floyd's answer for ``k'`` (text infilling uses this with a random
  ``k'``).

  The steps are sequential only through the membership test, which has a
  closed form: the set before step ``i`` is ``{t_l : l < i} ∪ {j_l : l < i,
  t_l rejected}`` (a rejected ``t_l`` was already in), so ``t_i`` is rejected
  iff it repeats an earlier ``t_l``, or equals ``j_l`` for the one
  ``l = t_i - base < i`` and ``t_l`` was rejected. Hence
  ``accept_i = (not dup_i) and (l not valid or accept_l)`` with ``l < i``:
  an AND along a chain of pointers, solved by pointer jumping.

  Args:
    draws: int32 ``[k]``, ``draws[i]`` uniform on ``[0, base + i]``
      (:func:`uniform_below` of :func:`floyd_bounds`), independent.
    base: Static int ``>= 0``: the subset is drawn from ``[0, base + k)``.

  Returns:
    int32 ``[k]``, distinct, in Floyd's order (not sorted).

  References:
    Bentley and Floyd, `Programming Pearls: A Sample of Brilliance
    <https://doi.org/10.1145/30401.315746>`_, CACM 30(9), 1987
  """
  t = draws
  k = t.shape[0]
  i = jnp.arange(k, dtype=jnp.int32)
  j = base + i
  if k <= _ONE_HOT_MAX:  # dup_i: t_i repeats an earlier t_l
    earlier = i[:, None] > i[None, :]  # [i, l]: l < i
    dup = jnp.any((t[:, None] == t[None, :]) & earlier, axis=1)
  else:  # the first step drawing each value, by a scatter-min of k indices
    first = jnp.full((base + k,), k, jnp.int32).at[t].min(i, mode='drop')
    dup = first[t] < i
  back = t - base  # the l with j_l == t_i
  valid = (back >= 0) & (back < i)
  accept = _chain_and(~dup, jnp.where(valid, back, i))
  return jnp.where(accept, t, j)


def ascending(x: jax.Array) -> jax.Array:
  """Sorts distinct integers (1-D): by counting (``O(k^2)``) when short."""
  k = x.shape[0]
  if k > _ONE_HOT_MAX:
    return jnp.sort(x)
  rank = jnp.sum(x[None, :] < x[:, None], axis=1, dtype=jnp.int32)
  hot = rank[:, None] == jnp.arange(k, dtype=jnp.int32)[None, :]  # [i, r]
  return jnp.sum(jnp.where(hot, x[:, None], 0), axis=0, dtype=x.dtype)


def count_and_sum(bounds: jax.Array, weights: jax.Array, size: int,
                  max_total: int) -> tuple[jax.Array, jax.Array]:
  """``#{j: bounds_j <= q}`` and ``sum(weights_j: bounds_j <= q)``.

  For every position ``q < size``.

  Args:
    bounds: int32 ``[m]``, distinct, ``>= 0``; those ``>= size`` never count.
    weights: int32 ``[m]``, ``>= 0``.
    size: Static number of positions ``q``.
    max_total: Static bound on ``sum(weights)``.

  Returns:
    Two int32 ``[size]``: the counts and the weight sums.

  Short ``m``: a ``[size, m]`` compare-and-sum, which XLA:CPU vectorises.
  Long ``m`` (there the compare-and-sum runs as a slow scalar loop):
  one scatter-add of the ``m`` values into ``[size]`` and a prefix sum, the
  count and the sum packed into one int32 when they fit.
  """
  m = bounds.shape[0]
  if m <= COMPARE_MAX:
    q = jnp.arange(size, dtype=jnp.int32)[:, None]
    below = bounds[None, :] <= q
    count = jnp.sum(below, axis=1, dtype=jnp.int32)
    total = jnp.sum(jnp.where(below, weights[None, :], 0), axis=1,
                    dtype=jnp.int32)
    return count, total
  zeros = jnp.zeros((size,), jnp.int32)
  radix = m + 1
  if radix * (max_total + 1) < 2**31:
    packed = jnp.cumsum(zeros.at[bounds].add(1 + radix * weights,
                                             mode='drop'))
    return packed % radix, packed // radix
  count = jnp.cumsum(zeros.at[bounds].add(1, mode='drop'))
  total = jnp.cumsum(zeros.at[bounds].add(weights, mode='drop'))
  return count, total


def cdf_thresholds(pmf: np.ndarray, bits: int = 31) -> np.ndarray:
  """Thresholds ``round(2^bits CDF(x))`` for inverse-CDF sampling.

  Comparing ``bits`` uniform bits ``u`` against them, ``1 + sum(u >= thr)``
  takes the (1-based) value ``x`` with probability within ``2^-bits`` of
  ``pmf[x - 1]``; the last value also takes the tail beyond ``pmf``.
  """
  cdf = np.cumsum(np.asarray(pmf, np.float64))[:-1]
  thr = np.round(np.minimum(cdf, 1.0) * 2.0**bits)
  return np.minimum(thr, 2.0**bits - 1).astype(np.int64)


def scale_below(word: jax.Array, n: jax.Array) -> jax.Array:
  """``floor(word * n / 2^31)`` for 31-bit ``word``: in ``[0, n)``.

  Bias below ``n / 2^31`` (no rejection).
  """
  hi, _ = _mul_hi_lo(word.astype(jnp.uint32) << jnp.uint32(1),
                     n.astype(jnp.uint32))
  return hi.astype(jnp.int32)
