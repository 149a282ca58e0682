r"""BART text infilling as a fixed-shape kernel.

Lewis et al. 2020 (Sec. 2.2): "A number of text spans are sampled, with span
lengths drawn from a Poisson distribution (λ = 3). Each span is replaced
with a single [MASK] token." The distribution implemented, for ``L`` tokens,
``R = ceil(mask_ratio * L)`` (Python float64) and ``G = L - R``:

1. Span lengths ``x_1, x_2, ...`` are i.i.d. zero-truncated
   Poisson(``poisson_lambda``): a Poisson draw with the zero-length draws
   dropped (fairseq turns those into insertions, see below). The first
   ``n`` with ``x_1 + ... + x_n >= R`` make the spans, the last trimmed so
   that the lengths sum to exactly ``R``.
2. The ``n`` lengths are rotated cyclically by a uniform offset in
   ``[0, n)``. This makes their order exchangeable (the trimmed span is
   equally likely to be anywhere) without changing the multiset.
3. The noised sequence, before padding, has ``G + n`` positions; the ``n``
   mask positions are a uniformly random ``n``-subset of them (so each of
   the ``C(G + n, n)`` interleavings of the kept tokens, in order, with the
   ``n`` spans is equally likely), and the ``i``-th mask from the left
   stands for the ``i``-th span of step 2. Spans never overlap, but two
   spans may be adjacent, giving adjacent masks (as in fairseq); every mask
   stands for at least one removed token.
4. ``length = G + n``; positions ``>= length`` hold ``pad_id``.

Sampling is exact given uniform random bits, up to the zero-truncated
Poisson CDF, tabulated in steps of ``2^-32`` (lengths ``>= R`` are all
trimmed to ``R``, so the table stops there). Step 3 is a vectorised Floyd's
algorithm (:mod:`metacf.noise._sampling`); the output is one gather from
source indices found by comparing each position with the mask positions.

Where this differs from fairseq's ``DenoisingDataset`` (BART's code):

* fairseq places span starts uniformly among (word-start) tokens, so spans
  can overlap and merge, removing fewer than ``R`` tokens, and a span
  never starts at or runs past the final (EOS) token; here exactly ``R``
  tokens are removed, spans are placed uniformly over arrangements, and
  every token, including the last, can be removed (keep an EOS out of
  ``tokens`` and append it after).
* no insertion noise for zero-length draws (fairseq's ``insert_ratio``),
  no whole-word masking (spans count tokens, not words), no replacement of
  masks by random tokens (``random_ratio``), no ``replace_length`` other
  than 1, no permutation/rotation of sentences.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metacf.noise import _checks
from metacf.noise import _sampling


class TextInfilling(NamedTuple):
  """What :func:`text_infilling` returns; unpacks as ``noised, length``."""
  noised: jax.Array  # [L], tokens' dtype; pad_id after `length`.
  length: jax.Array  # shape=(), dtype=int32: tokens before the padding.


def _truncated_poisson_pmf(lam: float, max_length: int) -> np.ndarray:
  """P(X = x), x = 1..X, X zero-truncated Poisson(lam); tail in the last.

  ``X <= max_length`` is the first length whose tail beyond is below
  ``2^-33`` (the last entry then holds that tail too, as does an entry at
  ``max_length``).
  """
  limit = int(lam + 40.0 * math.sqrt(lam) + 40.0)
  x = np.arange(1, limit + 1, dtype=np.float64)
  log_p = (x * math.log(lam) - lam - np.array([math.lgamma(v + 1) for v in x])
           - math.log(-math.expm1(-lam)))
  pmf = np.exp(log_p)
  tail = np.cumsum(pmf[::-1])[::-1]  # tail[i] = P(X >= i + 1)
  stop = int(np.argmax(np.append(tail[1:], 0.0) < 2.0**-33)) + 1
  stop = min(stop, max_length)
  out = pmf[:stop].copy()
  out[-1] = tail[stop - 1]
  return out


def text_infilling(key: jax.Array, tokens: jax.typing.ArrayLike, *,
                   mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                   mask_id: jax.typing.ArrayLike,
                   pad_id: jax.typing.ArrayLike
                   ) -> TextInfilling:
  r"""BART text infilling of one sequence: ``(noised, length)``.

  ``R = ceil(mask_ratio * len(tokens))`` tokens are removed in spans of
  zero-truncated Poisson(``poisson_lambda``) length (the last span trimmed
  to the budget), the spans placed uniformly at random without overlap and
  each replaced by one ``mask_id``; the kept tokens keep their order. The
  exact distribution, and where it differs from fairseq, is in the module
  docstring of :mod:`metacf.noise._infilling`.

  Args:
    key: A PRNG key (``jax.vmap`` over keys and tokens for a batch).
    tokens: 1-D integer array, length ``L >= 1``.
    mask_ratio: Fraction of tokens removed, in ``(0, 1]``.
    poisson_lambda: Poisson rate of the span lengths, ``> 0``.
    mask_id: Integer scalar (may be traced) put in place of each span.
    pad_id: Integer scalar (may be traced) filling positions ``>= length``.

  Returns:
    A :class:`TextInfilling` ``(noised, length)`` (it unpacks as a pair):
    ``noised`` of ``tokens``' shape and dtype, int32
    scalar ``length = L - R + (number of spans)``.

  Raises:
    TypeError: if ``tokens`` is not an integer array, or an id or
      hyperparameter has the wrong kind.
    ValueError: if ``tokens`` is not 1-D and non-empty, ``mask_ratio`` is
      not in ``(0, 1]`` or ``poisson_lambda`` is not positive and finite.

  References:
    Lewis et al, `BART: Denoising Sequence-to-Sequence Pre-training for
    Natural Language Generation, Translation, and Comprehension
    <https://arxiv.org/abs/1910.13461>`_, ACL 2020
  """
  fn = 'text_infilling'
  tokens = _checks.tokens_1d(tokens, fn, min_length=1)
  ratio = _checks.real(mask_ratio, 'mask_ratio', fn)
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f'{fn}: mask_ratio must be in (0, 1], got '
                     f'{mask_ratio!r}.')
  lam = _checks.finite_positive(poisson_lambda, 'poisson_lambda', fn)
  _checks.token_id(mask_id, 'mask_id', fn)
  _checks.token_id(pad_id, 'pad_id', fn)
  length = tokens.shape[0]
  budget = min(math.ceil(ratio * length), length)
  kept = length - budget
  max_spans = budget
  # One draw for everything: 31-bit words for the lengths and the rotation
  # (bound 2^31, never redrawn), then Floyd's steps.
  words = _sampling.uniform_below(key, np.concatenate(
      [np.full((max_spans + 1,), 2**31), _sampling.floyd_bounds(kept,
                                                             max_spans)]))

  # 1. Lengths by inverse CDF on 31 random bits; the first n reach R.
  thresholds = _sampling.cdf_thresholds(_truncated_poisson_pmf(lam, budget))
  draws = 1 + jnp.sum(
      words[:max_spans, None] >= jnp.asarray(thresholds, jnp.int32)[None, :],
      axis=1, dtype=jnp.int32)
  before = jnp.cumsum(draws) - draws
  active = before < budget
  num_spans = jnp.sum(active, dtype=jnp.int32)
  lengths = jnp.where(active, jnp.minimum(draws, budget - before), 0)

  # 2. A uniform cyclic rotation of the n lengths.
  span = jnp.arange(max_spans, dtype=jnp.int32)
  offset = _sampling.scale_below(words[max_spans], num_spans)
  rotated = lengths[(span + offset) % num_spans]

  # 3. Mask positions: the first n of Floyd's steps are a uniform n-subset
  # of [0, G + n). Pairing the i-th length with Floyd's i-th position (not
  # the i-th from the left) is the same law: the rotated lengths are
  # exchangeable and independent of the positions, given n.
  positions = _sampling.floyd_subset(words[max_spans + 1:], kept)
  positions = jnp.where(span < num_spans, positions, length)
  masks_upto, removed_upto = _sampling.count_and_sum(positions, rotated,
                                                     length, budget)
  q = jnp.arange(length, dtype=jnp.int32)
  is_mask = masks_upto > jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), masks_upto[:-1]])
  source = jnp.clip(q - masks_upto + removed_upto, 0, length - 1)
  out_length = kept + num_spans
  dtype = tokens.dtype
  noised = jnp.where(
      q >= out_length, jnp.asarray(pad_id).astype(dtype),
      jnp.where(is_mask, jnp.asarray(mask_id).astype(dtype), tokens[source]))
  return TextInfilling(noised, out_length)
