"""The three corruptions, and each model's input/target format.

A corruption hides *units* of a sequence: T5 span corruption and BART text
infilling hide spans (one placeholder each, so the model is not told how many
tokens a span had), BERT token masking hides single tokens (one placeholder
per token: the count is told). The masks come from ``metacf.noise``:

* ``'t5'``: :func:`metacf.noise.random_spans_noise_mask` (the mask that
  :func:`metacf.noise.span_corruption` draws from the same key), 15%, mean
  span 3;
* ``'bart'``: :func:`metacf.noise.text_infilling` run on the positions
  ``0..L-1``: the positions missing from its output are the removed ones
  (30%, Poisson 3). Units are the maximal runs of removed positions: two
  spans that touch (common: the kernel places spans among the kept tokens,
  and two may fall in the same gap) count as one unit for the exact match
  and get one sentinel in the T5 format; in the full format the inputs are
  the kernel's own output (one MASK per span);
* ``'bert'``: :func:`metacf.noise.token_masking`'s ``targets_mask`` (15%).

Two output formats (a model is trained in one):

* ``'t5'`` (sentinels): inputs are the kept tokens with unit ``i`` replaced by
  sentinel ``s_i``, then EOS; targets ``s_0, unit_0, s_1, unit_1, ..., EOS``.
* ``'full'`` (BART, and BERT in an encoder-decoder as BART's token-masking
  ablation): inputs are the kept tokens with each unit replaced by MASK;
  the decoder rebuilds the whole sequence.

Training uses the kernels' own outputs for the model's own corruption
(:func:`train_example`); the cross evaluation builds every (format,
corruption) pair from the masks (:func:`eval_example`); where format and
corruption match, its inputs and targets are the kernel's (tested).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from experiments.text_paradigms import data as data_lib
import metacf.noise

CORRUPTIONS = ('t5', 'bart', 'bert')
FORMAT = {'t5': 't5', 'bart': 'full', 'bert': 'full'}  # objective -> format
T5_DENSITY, T5_SPAN = 0.15, 3.0
BART_RATIO, BART_LAMBDA = 0.3, 3.0
BERT_RATIO = 0.15


class Example(NamedTuple):
  """One corrupted sequence in a model's format (fixed shapes).

  Attributes:
    inputs: Encoder tokens, PAD-padded.
    targets: Decoder targets, PAD-padded.
    unit: ``[T]`` int32: the unit a target position belongs to (its hidden
      tokens), ``-1`` elsewhere (sentinels, kept tokens, EOS, padding).
  """
  inputs: jax.Array
  targets: jax.Array
  unit: jax.Array


def noise_units(key: jax.Array, corruption: str, length: int,
                tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(noise, starts)`` bool ``[length]``: hidden tokens, unit starts."""
  if corruption == 't5':
    noise = metacf.noise.random_spans_noise_mask(
        key, length, noise_density=T5_DENSITY,
        mean_noise_span_length=T5_SPAN)
  elif corruption == 'bart':
    noised, _ = metacf.noise.text_infilling(
        key, jnp.arange(length, dtype=jnp.int32), mask_ratio=BART_RATIO,
        poisson_lambda=BART_LAMBDA, mask_id=length, pad_id=length + 1)
    kept = jnp.zeros([length], bool).at[noised].set(True, mode='drop')
    noise = ~kept
  elif corruption == 'bert':
    noise = metacf.noise.token_masking(key, tokens, mask_ratio=BERT_RATIO,
                                       mask_id=data_lib.MASK).targets_mask
    return noise, noise
  else:
    raise ValueError(f'noise_units: corruption must be one of {CORRUPTIONS}, '
                     f'got {corruption!r}.')
  previous = jnp.concatenate([jnp.zeros([1], bool), noise[:-1]])
  return noise, noise & ~previous


def _compact(values: jax.Array, keep: jax.Array, size: int) -> jax.Array:
  """The kept values, in order, left-aligned in ``[size]`` (PAD after)."""
  dest = jnp.where(keep, jnp.cumsum(keep) - 1, size)
  return jnp.full([size], data_lib.PAD, values.dtype).at[dest].set(
      values, mode='drop')


def build(tokens: jax.Array, noise: jax.Array, starts: jax.Array, fmt: str,
          sentinel_start: int, target_length: int) -> Example:
  """The corrupted example in format ``fmt`` (see the module docstring)."""
  length = tokens.shape[0]
  unit = jnp.cumsum(starts) - 1
  keep = ~noise | starts
  if fmt == 't5':
    shown = jnp.where(noise, sentinel_start - unit, tokens)
    inputs = _compact(shown, keep, length + 1)
    inputs = inputs.at[jnp.sum(keep)].set(data_lib.EOS)
    # Target slot of a hidden token: hidden tokens and sentinels before it.
    slot = jnp.cumsum(noise) + jnp.cumsum(starts) - 1
    targets = jnp.full([target_length], data_lib.PAD, tokens.dtype)
    targets = targets.at[jnp.where(noise, slot, target_length)].set(
        tokens, mode='drop')
    targets = targets.at[jnp.where(starts, slot - 1, target_length)].set(
        sentinel_start - unit, mode='drop')
    end = jnp.sum(noise) + jnp.sum(starts)
    targets = targets.at[end].set(data_lib.EOS, mode='drop')
    units = jnp.full([target_length], -1, jnp.int32).at[
        jnp.where(noise, slot, target_length)].set(unit, mode='drop')
    return Example(inputs, targets, units)
  if fmt == 'full':
    shown = jnp.where(noise, data_lib.MASK, tokens)
    inputs = _compact(shown, keep, length)
    return Example(inputs, tokens, jnp.where(noise, unit, -1))
  raise ValueError(f"build: fmt must be 't5' or 'full', got {fmt!r}.")


def eval_example(key: jax.Array, tokens: jax.Array, corruption: str,
                 fmt: str, sentinel_start: int) -> Example:
  """``tokens`` corrupted by ``corruption``, shown in format ``fmt``."""
  length = tokens.shape[0]
  noise, starts = noise_units(key, corruption, length, tokens)
  target_length = length + 1 if fmt == 't5' else length
  example = build(tokens, noise, starts, fmt, sentinel_start, target_length)
  if corruption == 'bart' and fmt == 'full':
    inputs, _ = train_example(key, tokens, 'bart', sentinel_start)
    example = example._replace(inputs=inputs)
  return example


def train_example(key: jax.Array, tokens: jax.Array, objective: str,
                  sentinel_start: int) -> tuple[jax.Array, jax.Array]:
  """``(inputs, targets)`` from the objective's own ``metacf.noise`` kernel."""
  if objective == 't5':
    inputs, targets = metacf.noise.span_corruption(
        key, tokens, noise_density=T5_DENSITY,
        mean_noise_span_length=T5_SPAN, sentinel_start=sentinel_start,
        eos_id=data_lib.EOS)
    return inputs, targets
  if objective == 'bart':
    noised, _ = metacf.noise.text_infilling(
        key, tokens, mask_ratio=BART_RATIO, poisson_lambda=BART_LAMBDA,
        mask_id=data_lib.MASK, pad_id=data_lib.PAD)
    return noised, tokens
  if objective == 'bert':
    inputs, _ = metacf.noise.token_masking(
        key, tokens, mask_ratio=BERT_RATIO, mask_id=data_lib.MASK)
    return inputs, tokens
  raise ValueError(f'train_example: objective must be one of {CORRUPTIONS}, '
                   f'got {objective!r}.')
