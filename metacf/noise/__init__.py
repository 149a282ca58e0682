"""Denoising noise for sequence-to-sequence pre-training: T5 and BART.

Pure functions of an explicit PRNG key over one unbatched token sequence,
with static output shapes, so they run inside a jitted input-pipeline step
(``jax.vmap`` over keys and sequences for a batch):

* :func:`span_corruption` (Raffel et al. 2020): whole noise spans replaced
  by one sentinel each in the inputs; the targets are the spans after their
  sentinels. :func:`random_spans_noise_mask` is its mask,
  :func:`span_corruption_lengths` its static output lengths and
  :func:`span_corruption_tokens_length` T5's ``random_spans_helper`` (the
  raw length that corrupts to a wanted inputs length, 512 -> 568).
* :func:`text_infilling` (Lewis et al. 2020): spans of Poisson length
  removed, each replaced by one mask token; the model rebuilds the whole
  sequence.
* :func:`token_masking` (Devlin et al. 2019, BERT): a fixed number of
  uniformly chosen tokens each replaced by one mask token (optionally
  BERT's 80/10/10 split); the model predicts them in place.

Examples:
  A word-level toy vocabulary (ids below the sentinels):

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import metacf
  >>> words = 'Thank you for inviting me to your party last week .'.split()
  >>> vocab = {w: i for i, w in enumerate(sorted(set(words)))}
  >>> tokens = jnp.array([vocab[w] for w in words])
  >>> inputs, targets = metacf.noise.span_corruption(
  ...     jax.random.key(0), tokens, noise_density=0.2,
  ...     mean_noise_span_length=1.0, sentinel_start=100)
  >>> inputs.shape, targets.shape
  ((11,), (4,))
  >>> inputs.tolist()    # ids 100, 99, ... stand for the sentinels <X>, <Y>, ...
  [1, 9, 2, 3, 5, 7, 10, 6, 100, 8, 99]
  >>> targets.tolist()
  [100, 4, 99, 0]

The sampling is exact and sort-free (:mod:`metacf.noise._sampling`), which
is what makes it fast on XLA:CPU; ``benchmarks/bench_noise.py`` measures it
against the NumPy recipe of HF's ``run_t5_mlm_flax.py``.
"""

from metacf.noise._infilling import text_infilling
from metacf.noise._masking import token_masking
from metacf.noise._masking import token_masking_count
from metacf.noise._masking import TokenMasking
from metacf.noise._infilling import TextInfilling
from metacf.noise._spans import random_spans_noise_mask
from metacf.noise._spans import span_corruption
from metacf.noise._spans import span_corruption_lengths
from metacf.noise._spans import span_corruption_tokens_length
from metacf.noise._spans import SpanCorruption

__all__ = [
    'SpanCorruption',
    'TextInfilling',
    'TokenMasking',
    'random_spans_noise_mask',
    'span_corruption',
    'span_corruption_lengths',
    'span_corruption_tokens_length',
    'text_infilling',
    'token_masking',
    'token_masking_count',
]
