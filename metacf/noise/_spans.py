r"""T5 span corruption: random noise spans, sentinels, and the lengths helpers.

The sampled object is T5's noise mask (Raffel et al. 2020, Sec. 3.1.4 and
``t5.data.preprocessors.random_spans_noise_mask``). For a sequence of
``length`` tokens, with Python (float64, round-half-even) arithmetic,

* ``n_noise = clip(round(length * noise_density), 1, length - 1)``,
* ``n_spans = clip(round(n_noise / mean_noise_span_length), 1,
  length - n_noise)``;

the ``n_noise`` noise tokens and the ``length - n_noise`` non-noise tokens
are each cut into ``n_spans`` non-empty segments by an independent, uniformly
random composition (each of the ``C(n - 1, n_spans - 1)`` compositions of
``n`` equally likely), and the segments are interleaved non-noise first:
``nonnoise_0, noise_0, nonnoise_1, noise_1, ...``, so the mask starts with
non-noise and ends with noise.

How it is computed (up to 64 spans: no sort, no scatter, one gather; longer
rows use scatters and ``jnp.sort``, cheaper there): the ``n_spans - 1`` cut
points of each composition are a uniform subset of the ``n - 1`` gaps,
drawn by a vectorised Floyd's algorithm from exactly uniform integers
(:mod:`metacf.noise._sampling`) and put in order by counting. Every output
position then finds its span by comparing itself with the ``n_spans`` span
boundaries (a ``[positions, n_spans]`` compare-and-sum that XLA fuses), which
gives the source index of each token; one gather reads the tokens.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf.noise import _checks
from metacf.noise import _sampling


class SpanCorruption(NamedTuple):
  """What :func:`span_corruption` returns; unpacks as ``inputs, targets``."""
  inputs: jax.Array   # [n_nonnoise + n_spans (+ 1)], tokens' dtype.
  targets: jax.Array  # [n_noise + n_spans (+ 1)], tokens' dtype.


def _span_counts(fn: str, length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """``(n_noise, n_spans)`` for a sequence of ``length`` tokens."""
  density = _checks.in_open_unit(noise_density, 'noise_density', fn)
  mean = _checks.at_least_one(mean_noise_span_length,
                              'mean_noise_span_length', fn)
  n_noise = min(max(round(length * density), 1), length - 1)
  # T5 caps only below (>= 1). More spans than non-noise tokens cannot all
  # be separated by a non-empty non-noise segment (T5 then emits empty
  # non-noise segments, merging its last noise spans): we cap instead.
  n_spans = min(max(round(n_noise / mean), 1), length - n_noise)
  return n_noise, n_spans


def _boundaries(key: jax.Array, n_noise: int, n_nonnoise: int,
                n_spans: int) -> tuple[jax.Array, jax.Array]:
  """Prefix sums of the noise and non-noise span lengths, ``[n_spans + 1]``.

  ``a[j] = sum(noise lengths of spans < j)``, ``a[0] = 0``,
  ``a[n_spans] = n_noise``; ``b`` likewise for the non-noise spans.
  """
  k = n_spans - 1
  base_a, base_b = n_noise - 1 - k, n_nonnoise - 1 - k
  draws = _sampling.uniform_below(key, np.concatenate(
      [_sampling.floyd_bounds(base_a, k), _sampling.floyd_bounds(base_b, k)]))
  cuts_a = _sampling.ascending(_sampling.floyd_subset(draws[:k], base_a))
  cuts_b = _sampling.ascending(_sampling.floyd_subset(draws[k:], base_b))
  zero = jnp.zeros((1,), jnp.int32)
  a = jnp.concatenate([zero, cuts_a + 1, jnp.full((1,), n_noise, jnp.int32)])
  b = jnp.concatenate([zero, cuts_b + 1,
                       jnp.full((1,), n_nonnoise, jnp.int32)])
  return a, b


def random_spans_noise_mask(key: jax.Array, length: int,
                            noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> jax.Array:
  r"""T5's random-spans noise mask: ``n_spans`` noise spans, uniformly laid.

  See the module docstring for the exact law: ``n_noise`` and ``n_spans``
  are fixed by the arguments, and the noise and non-noise span lengths are
  two independent uniform compositions, interleaved non-noise first. Apart
  from the cap ``n_spans <= length - n_noise`` (T5 has none, and then
  merges its last noise spans), this is the distribution of T5's
  ``random_spans_noise_mask`` (``random_roll=False``).

  Args:
    key: A PRNG key. One sequence per call: ``jax.vmap`` over keys for a
      batch.
    length: Static sequence length, ``>= 2``.
    noise_density: Fraction of noise tokens, in ``(0, 1)``.
    mean_noise_span_length: Mean noise span length, ``>= 1``.

  Returns:
    bool ``[length]``, True on noise tokens; ``mask[0]`` is False and
    ``mask[-1]`` True.

  Raises:
    TypeError: if an argument is not a Python number of the right kind.
    ValueError: if ``length < 2``, ``noise_density`` is not in ``(0, 1)``
      or ``mean_noise_span_length < 1``.

  References:
    Raffel et al, `Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer <https://arxiv.org/abs/1910.10683>`_, JMLR 2020
  """
  fn = 'random_spans_noise_mask'
  length = checks.check_int(length, 'length', fn, min_value=2)
  n_noise, n_spans = _span_counts(fn, length, noise_density,
                                  mean_noise_span_length)
  a, b = _boundaries(key, n_noise, length - n_noise, n_spans)
  starts = (a[:-1] + b[1:])[None, :]  # noise span j: [starts_j, ends_j)
  ends = (a[1:] + b[1:])[None, :]
  p = jnp.arange(length, dtype=jnp.int32)[:, None]
  return jnp.any((starts <= p) & (p < ends), axis=1)


def _shift_right(x: jax.Array) -> jax.Array:
  return jnp.concatenate([jnp.zeros((1,), x.dtype), x[:-1]])


def _corrupt(tokens: jax.Array, a: jax.Array, b: jax.Array,
             n_noise: int, n_nonnoise: int,
             sentinel_start: jax.typing.ArrayLike,
             eos_id: jax.typing.ArrayLike | None
             ) -> tuple[jax.Array, jax.Array]:
  """``(inputs, targets)`` from the span boundaries of :func:`_boundaries`.

  ``a``, ``b``: prefix sums ``[n_spans + 1]`` of the noise / non-noise span
  lengths, ending at ``n_noise`` / ``n_nonnoise`` (also passed as Python
  ints: the output shapes depend on them).
  """
  n_spans = a.shape[0] - 1
  span = jnp.arange(n_spans, dtype=jnp.int32)
  # inputs: span j is b_j tokens then its sentinel, at b[j + 1] + j. Before
  # it, the source index runs ahead of the position by the noise tokens of
  # the earlier spans less their sentinels: sum_{l < j} (a_l - 1).
  n_in = n_nonnoise + n_spans
  count, ahead = _sampling.count_and_sum(b[1:] + span, (a[1:] - a[:-1]) - 1,
                                         n_in, n_noise)
  in_span, in_ahead = _shift_right(count), _shift_right(ahead)
  in_sentinel = count > in_span
  in_source = jnp.arange(n_in, dtype=jnp.int32) + in_ahead
  # targets: span j is its sentinel, at a[j] + j, then a_j noise tokens; the
  # source runs ahead by the non-noise tokens up to span j less the
  # sentinels: sum_{l <= j} (b_l - 1).
  n_tg = n_noise + n_spans
  count, ahead = _sampling.count_and_sum(a[:-1] + span, (b[1:] - b[:-1]) - 1,
                                         n_tg, n_nonnoise)
  tg_span = count - 1
  tg_sentinel = count > _shift_right(count)
  tg_source = jnp.arange(n_tg, dtype=jnp.int32) + ahead
  values = tokens[jnp.concatenate([in_source, tg_source])]
  dtype = tokens.dtype
  first = jnp.asarray(sentinel_start).astype(dtype)
  inputs = jnp.where(in_sentinel, first - in_span.astype(dtype),
                     values[:n_in])
  targets = jnp.where(tg_sentinel, first - tg_span.astype(dtype),
                      values[n_in:])
  if eos_id is not None:
    eos = jnp.asarray(eos_id).astype(dtype)[None]
    inputs = jnp.concatenate([inputs, eos])
    targets = jnp.concatenate([targets, eos])
  return SpanCorruption(inputs, targets)


def span_corruption(key: jax.Array, tokens: jax.typing.ArrayLike, *,
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0,
                    sentinel_start: jax.typing.ArrayLike,
                    eos_id: jax.typing.ArrayLike | None = None
                    ) -> SpanCorruption:
  r"""T5 span corruption of one sequence: ``(inputs, targets)``.

  With the mask of :func:`random_spans_noise_mask` (``length =
  len(tokens)``) and ``s_i = sentinel_start - i`` for noise span ``i``
  (T5: ``sentinel_start = vocab_size - 1``, then downward):

  * ``inputs``: the non-noise tokens, each noise span ``i`` replaced by
    ``s_i``: ``nonnoise_0, s_0, nonnoise_1, s_1, ..., nonnoise_last,
    s_last``;
  * ``targets``: ``s_0, noise_0, s_1, noise_1, ..., s_last, noise_last``
    (T5's ``nonnoise_span_to_unique_sentinel``);
  * ``eos_id``, when given, appended to both.

  For example, tokens ``[The, cat, sat, on, the, mat]`` with noise ``cat``
  and ``mat`` give inputs ``[The, s_0, sat, on, the, s_1]`` and targets
  ``[s_0, cat, s_1, mat]``.

  The shapes are static and equal :func:`span_corruption_lengths`.

  Args:
    key: A PRNG key (``jax.vmap`` over keys and tokens for a batch).
    tokens: 1-D integer array, length ``>= 2``.
    noise_density: Fraction of noise tokens, in ``(0, 1)``.
    mean_noise_span_length: Mean noise span length, ``>= 1``.
    sentinel_start: Id of the first sentinel; span ``i`` gets
      ``sentinel_start - i``. Integer scalar (may be traced); must be
      ``>= n_spans - 1``.
    eos_id: Optional integer scalar appended to inputs and targets.

  Returns:
    A :class:`SpanCorruption` ``(inputs, targets)`` (it unpacks as a pair),
    both of ``tokens``' dtype, shapes ``[n_nonnoise +
    n_spans (+ 1)]`` and ``[n_noise + n_spans (+ 1)]``.

  Raises:
    TypeError: if ``tokens`` is not an integer array, or an id or
      hyperparameter has the wrong kind.
    ValueError: if ``tokens`` is not 1-D of length ``>= 2``, a
      hyperparameter is out of range, or a concrete ``sentinel_start``
      would give negative sentinels.

  References:
    Raffel et al, `Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer <https://arxiv.org/abs/1910.10683>`_, JMLR 2020
  """
  fn = 'span_corruption'
  tokens = _checks.tokens_1d(tokens, fn, min_length=2)
  length = tokens.shape[0]
  n_noise, n_spans = _span_counts(fn, length, noise_density,
                                  mean_noise_span_length)
  _checks.token_id(sentinel_start, 'sentinel_start', fn)
  _checks.token_id(eos_id, 'eos_id', fn, optional=True)
  start = _checks.concrete_int(sentinel_start)
  if start is not None and start < n_spans - 1:
    raise ValueError(
        f'{fn}: sentinel_start must be >= {n_spans - 1} (the {n_spans} noise '
        f'spans get ids sentinel_start - i >= 0), got {start}.')
  a, b = _boundaries(key, n_noise, length - n_noise, n_spans)
  return _corrupt(tokens, a, b, n_noise, length - n_noise, sentinel_start,
                  eos_id)


def span_corruption_lengths(length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0, *,
                            eos: bool = False) -> tuple[int, int]:
  """Static ``(inputs_length, targets_length)`` of :func:`span_corruption`.

  ``(n_nonnoise + n_spans, n_noise + n_spans)``, plus one each with
  ``eos=True`` (an ``eos_id`` given), with the counts of
  :func:`random_spans_noise_mask`.

  Args:
    length: Number of tokens, ``>= 2``.
    noise_density: Fraction of noise tokens, in ``(0, 1)``.
    mean_noise_span_length: Mean noise span length, ``>= 1``.
    eos: Whether an EOS token is appended to both.

  Returns:
    ``(inputs_length, targets_length)``, Python ints.

  Raises:
    TypeError, ValueError: as :func:`random_spans_noise_mask`.
  """
  fn = 'span_corruption_lengths'
  length = checks.check_int(length, 'length', fn, min_value=2)
  if not isinstance(eos, (bool, np.bool_)):
    raise TypeError(f'{fn}: eos must be a bool, got {eos!r}.')
  n_noise, n_spans = _span_counts(fn, length, noise_density,
                                  mean_noise_span_length)
  extra = int(bool(eos))
  return length - n_noise + n_spans + extra, n_noise + n_spans + extra


def span_corruption_tokens_length(inputs_length: int,
                                  noise_density: float = 0.15,
                                  mean_noise_span_length: float = 3.0
                                  ) -> tuple[int, int]:
  """``(tokens_length, targets_length)`` for inputs of ``inputs_length``.

  T5's ``random_spans_helper`` (one sentinel per span, EOS counted on both
  sides), computed as it does: with ``n = round(t * noise_density)`` and
  ``s = round(n / mean_noise_span_length)``, a raw length ``t`` gives inputs
  ``t - n + s + 1`` and targets ``n + s + 1``; ``tokens_length`` is the
  largest ``t >= inputs_length - 1`` reached by stepping up while the inputs
  fit, and for ``noise_density == 0.5`` one less when the targets would be
  longer than the inputs. T5's defaults: 512 -> (568, 114).

  T5's formula does not clip ``n`` and ``s`` as :func:`span_corruption`
  does; the two agree (``span_corruption_lengths(tokens_length, eos=True)
  == (inputs, targets_length)`` with ``inputs <= inputs_length``) whenever
  ``1 <= s <= tokens_length - n``, i.e. for all but tiny lengths, except
  that T5's ``noise_density == 0.5`` adjustment decrements
  ``targets_length`` with ``tokens_length`` whether or not the targets
  shrink, so it can be one more than :func:`span_corruption`'s.

  Args:
    inputs_length: Wanted length of the corrupted inputs (with EOS),
      ``>= 3``.
    noise_density: Fraction of noise tokens, in ``(0, 1)``.
    mean_noise_span_length: Mean noise span length, ``>= 1``.

  Returns:
    ``(tokens_length, targets_length)``, Python ints.

  Raises:
    TypeError, ValueError: for arguments of the wrong kind or range.

  References:
    Raffel et al, `Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer <https://arxiv.org/abs/1910.10683>`_, JMLR 2020
    (``t5.data.preprocessors.random_spans_helper``)
  """
  fn = 'span_corruption_tokens_length'
  inputs_length = checks.check_int(inputs_length, 'inputs_length', fn,
                                  min_value=3)
  density = _checks.in_open_unit(noise_density, 'noise_density', fn)
  mean = _checks.at_least_one(mean_noise_span_length,
                              'mean_noise_span_length', fn)

  def lengths(t):
    n = round(t * density)
    s = round(n / mean)
    return t - n + s + 1, n + s + 1

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = lengths(tokens_length)
  # T5: "minor hack to get the targets length to be equal to inputs length".
  if density == 0.5 and targets_length > lengths(tokens_length)[0]:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length
