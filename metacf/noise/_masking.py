r"""BERT-style token masking: one mask token per masked token.

Devlin et al. (2019) choose 15% of the positions and replace each chosen
token by ``[MASK]``; the model predicts the original token at those
positions only. Unlike T5's span corruption and BART's infilling, the
masked sequence keeps its length and every masked token keeps its own mask,
so the model sees how many tokens are missing (the lecture's Box 4).

:func:`token_masking` chooses exactly ``n = max(1, round_half_even(mask_ratio
* L))`` positions (a static count: the output shapes are fixed), uniformly
among the ``C(L, n)`` subsets, by Floyd's algorithm on exact uniform
integers (:mod:`metacf.noise._sampling`; no sort). BERT's own recipe draws
each position independently with probability 0.15 (HF's
``DataCollatorForLanguageModeling``), so its count varies; the fixed count
is what a static-shape, jit-friendly kernel needs, and it matches T5's
``noise_density`` convention (``round`` of the same product).

BERT's 80/10/10 split is optional: with ``random_token_ratio`` and
``keep_ratio`` (BERT: 0.1 and 0.1) each chosen position independently gets a
uniform random token of ``[0, vocab_size)`` with probability
``random_token_ratio``, keeps its own token with probability ``keep_ratio``,
and ``mask_id`` otherwise; ``targets_mask`` still marks every chosen
position (the loss is taken there, as in BERT).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metacf.noise import _checks
from metacf.noise import _sampling


class TokenMasking(NamedTuple):
  """What :func:`token_masking` returns; unpacks as ``inputs, targets_mask``."""
  inputs: jax.Array  # [L], tokens' dtype.
  targets_mask: jax.Array  # [L], bool: the chosen positions.


def token_masking_count(length: int, mask_ratio: float) -> int:
  """Positions :func:`token_masking` chooses: ``max(1, round(ratio * L))``.

  Python's ``round`` rounds half to even (``round(2.5) == 2``).
  """
  fn = 'token_masking_count'
  ratio = _checks.in_open_unit(mask_ratio, 'mask_ratio', fn)
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) \
      or length < 1:
    raise ValueError(f'{fn}: length must be an integer >= 1, got '
                     f'{length!r}.')
  return min(max(1, round(ratio * int(length))), int(length))


def token_masking(key: jax.Array, tokens: jax.typing.ArrayLike, *,
                  mask_ratio: float, mask_id: jax.typing.ArrayLike,
                  random_token_ratio: float = 0.0, keep_ratio: float = 0.0,
                  vocab_size: int | None = None) -> TokenMasking:
  r"""BERT-style masking of one sequence: ``(inputs, targets_mask)``.

  Exactly ``n = max(1, round_half_even(mask_ratio * L))`` positions, a
  uniformly random ``n``-subset of ``[0, L)``, are replaced by ``mask_id``
  (one mask per token); ``targets_mask`` is True there. Fixed shapes:
  ``jax.jit`` compiles once per ``(L, dtype, mask_ratio)``, and ``jax.vmap``
  over keys and sequences gives a batch.

  With ``random_token_ratio``/``keep_ratio`` > 0 (BERT's 80/10/10: 0.1 and
  0.1, which needs ``vocab_size``), each chosen position independently
  takes a uniform random token of ``[0, vocab_size)`` or keeps its token
  instead of ``mask_id``, with those probabilities; ``inputs`` then holds
  fewer than ``n`` masks, and ``targets_mask`` still marks all ``n``.

  Args:
    key: A PRNG key (``jax.vmap`` over keys and tokens for a batch).
    tokens: 1-D integer array, length ``L >= 1``.
    mask_ratio: Fraction of positions to mask, in ``(0, 1)`` (BERT: 0.15).
    mask_id: Integer scalar (may be traced) put at the masked positions.
    random_token_ratio: Probability that a chosen position gets a random
      token instead of ``mask_id``, in ``[0, 1)``.
    keep_ratio: Probability that a chosen position keeps its token, in
      ``[0, 1)``; ``random_token_ratio + keep_ratio < 1``.
    vocab_size: Random tokens are uniform on ``[0, vocab_size)``; required
      when ``random_token_ratio > 0``.

  Returns:
    A :class:`TokenMasking` ``(inputs, targets_mask)``: ``inputs`` of
    ``tokens``' shape and dtype, ``targets_mask`` bool ``[L]``.

  Raises:
    TypeError: if ``tokens`` is not an integer array, or an id or ratio has
      the wrong kind.
    ValueError: if ``tokens`` is not 1-D and non-empty, ``mask_ratio`` is not
      in ``(0, 1)``, the replacement ratios are out of range, or
      ``vocab_size`` is missing or not positive.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from metacf import noise
    >>> inputs, targets_mask = noise.token_masking(
    ...     jax.random.key(0), jnp.arange(20), mask_ratio=0.15, mask_id=-1)
    >>> int(targets_mask.sum()), int((inputs == -1).sum())
    (3, 3)

  References:
    Devlin et al, `BERT: Pre-training of Deep Bidirectional Transformers for
    Language Understanding <https://arxiv.org/abs/1810.04805>`_, NAACL 2019
  """
  fn = 'token_masking'
  tokens = _checks.tokens_1d(tokens, fn, min_length=1)
  ratio = _checks.in_open_unit(mask_ratio, 'mask_ratio', fn)
  _checks.token_id(mask_id, 'mask_id', fn)
  p_random = _checks.real(random_token_ratio, 'random_token_ratio', fn)
  p_keep = _checks.real(keep_ratio, 'keep_ratio', fn)
  for name, p in (('random_token_ratio', p_random), ('keep_ratio', p_keep)):
    if not 0.0 <= p < 1.0:
      raise ValueError(f'{fn}: {name} must be in [0, 1), got {p!r}.')
  if not p_random + p_keep < 1.0:
    raise ValueError(
        f'{fn}: random_token_ratio + keep_ratio must be < 1, got '
        f'{p_random!r} + {p_keep!r}.')
  if p_random > 0.0:
    if (vocab_size is None or isinstance(vocab_size, bool)
        or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1):
      raise ValueError(
          f'{fn}: vocab_size must be an integer >= 1 when '
          f'random_token_ratio > 0, got {vocab_size!r}.')
  length = tokens.shape[0]
  n = token_masking_count(length, ratio)
  replace = p_random > 0.0 or p_keep > 0.0
  if replace:
    key, replace_key = jax.random.split(key)
  draws = _sampling.uniform_below(key, _sampling.floyd_bounds(length - n, n))
  positions = _sampling.floyd_subset(draws, length - n)
  if n <= _sampling.COMPARE_MAX:
    index = jnp.arange(length, dtype=jnp.int32)
    chosen = jnp.any(index[:, None] == positions[None, :], axis=1)
  else:
    chosen = jnp.zeros((length,), bool).at[positions].set(True)
  fill = jnp.full_like(tokens, jnp.asarray(mask_id).astype(tokens.dtype))
  if replace:
    k_kind, k_token = jax.random.split(replace_key)
    u = jax.random.uniform(k_kind, (length,))
    if p_random > 0.0:
      random_tokens = _sampling.uniform_below(
          k_token, np.full((length,), int(vocab_size), np.int64)).astype(
              tokens.dtype)
      fill = jnp.where(u < p_random, random_tokens, fill)
    fill = jnp.where((u >= p_random) & (u < p_random + p_keep), tokens,
                     fill)
  return TokenMasking(jnp.where(chosen, fill, tokens), chosen)
