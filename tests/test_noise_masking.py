"""metacf.noise.token_masking: BERT-style masking, one mask per token."""

import itertools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from metacf import noise


def _mask(key, tokens, **kwargs):
  kwargs.setdefault('mask_ratio', 0.15)
  kwargs.setdefault('mask_id', -1)
  return noise.token_masking(key, tokens, **kwargs)


class TokenMaskingTest(parameterized.TestCase):

  @parameterized.parameters(
      (1, 0.15), (2, 0.5), (5, 0.5), (10, 0.25), (20, 0.15), (64, 0.15),
      (100, 0.15), (128, 0.9), (512, 0.15), (1000, 0.5))
  def test_exact_count_and_invariants(self, length, ratio):
    tokens = jnp.arange(length, dtype=jnp.int32) + 7
    expected = max(1, round(ratio * length))  # round half to even
    fn = jax.jit(lambda k: _mask(k, tokens, mask_ratio=ratio, mask_id=-1))
    for seed in range(5):
      inputs, targets_mask = fn(jax.random.key(seed))
      self.assertEqual(inputs.shape, (length,))
      self.assertEqual(inputs.dtype, tokens.dtype)
      self.assertEqual(targets_mask.dtype, jnp.bool_)
      self.assertEqual(int(targets_mask.sum()), expected)
      np.testing.assert_array_equal(inputs == -1, targets_mask)
      np.testing.assert_array_equal(
          np.where(targets_mask, tokens, inputs), tokens)

  def test_round_half_even(self):
    self.assertEqual(noise.token_masking_count(10, 0.25), 2)  # 2.5 -> 2
    self.assertEqual(noise.token_masking_count(10, 0.35), 4)  # 3.5 -> 4
    self.assertEqual(noise.token_masking_count(3, 0.1), 1)  # at least 1
    self.assertEqual(noise.token_masking_count(512, 0.15), 77)  # 76.8

  def test_positions_uniform_chi_square(self):
    # Every position equally likely: L = 10, n = 3, 20,000 draws.
    length, ratio, draws = 10, 0.3, 20_000
    tokens = jnp.zeros((length,), jnp.int32)
    fn = jax.jit(jax.vmap(lambda k: _mask(k, tokens, mask_ratio=ratio,
                                          mask_id=1).targets_mask))
    masks = np.asarray(fn(jax.random.split(jax.random.key(0), draws)))
    counts = masks.sum(axis=0)
    self.assertEqual(counts.sum(), 3 * draws)
    p = stats.chisquare(counts).pvalue
    self.assertGreater(p, 1e-3, (counts, p))

  def test_subsets_uniform_chi_square(self):
    # Uniform over all C(6, 2) = 15 subsets, not only per position.
    length, draws = 6, 15_000
    tokens = jnp.zeros((length,), jnp.int32)
    fn = jax.jit(jax.vmap(lambda k: _mask(k, tokens, mask_ratio=1 / 3,
                                          mask_id=1).targets_mask))
    masks = np.asarray(fn(jax.random.split(jax.random.key(1), draws)))
    subsets = list(itertools.combinations(range(length), 2))
    index = {s: i for i, s in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for row in masks:
      counts[index[tuple(np.flatnonzero(row))]] += 1
    self.assertEqual(len(subsets), math.comb(length, 2))
    p = stats.chisquare(counts).pvalue
    self.assertGreater(p, 1e-3, (counts, p))

  def test_large_count_uses_the_scatter_path(self):
    # n = 500 > the one-hot comparison's limit.
    tokens = jnp.arange(1000, dtype=jnp.int32)
    inputs, targets_mask = jax.jit(
        lambda k: _mask(k, tokens, mask_ratio=0.5, mask_id=-5))(
            jax.random.key(3))
    self.assertEqual(int(targets_mask.sum()), 500)
    np.testing.assert_array_equal(inputs == -5, targets_mask)

  def test_same_key_same_output_and_jit_equals_eager(self):
    tokens = jnp.arange(50, dtype=jnp.int32)
    key = jax.random.key(7)
    eager = _mask(key, tokens)
    jitted = jax.jit(lambda k, t: _mask(k, t))(key, tokens)
    again = jax.jit(lambda k, t: _mask(k, t))(key, tokens)
    for a, b, c in zip(eager, jitted, again):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(b, c)
    other = _mask(jax.random.key(8), tokens)
    self.assertFalse(np.array_equal(eager.targets_mask, other.targets_mask))

  def test_no_retrace_and_traced_mask_id(self):
    fn = jax.jit(lambda k, t, m: noise.token_masking(
        k, t, mask_ratio=0.2, mask_id=m))
    tokens = jnp.arange(30, dtype=jnp.int32)
    for seed in range(4):
      out = fn(jax.random.key(seed), tokens + seed, jnp.int32(99 + seed))
      self.assertEqual(int((out.inputs == 99 + seed).sum()), 6)
    self.assertEqual(fn._cache_size(), 1)

  def test_vmap_equals_loop(self):
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(3, 8)
    keys = jax.random.split(jax.random.key(2), 3)
    batched = jax.vmap(lambda k, t: _mask(k, t, mask_ratio=0.25))(keys,
                                                                  tokens)
    for i in range(3):
      single = _mask(keys[i], tokens[i], mask_ratio=0.25)
      np.testing.assert_array_equal(batched.inputs[i], single.inputs)
      np.testing.assert_array_equal(batched.targets_mask[i],
                                    single.targets_mask)

  @parameterized.parameters(jnp.int32, jnp.int16, jnp.uint8)
  def test_keeps_dtype(self, dtype):
    tokens = jnp.arange(10).astype(dtype)
    out = _mask(jax.random.key(0), tokens, mask_id=9, mask_ratio=0.3)
    self.assertEqual(out.inputs.dtype, dtype)

  def test_bert_80_10_10_split(self):
    # Among chosen positions: 10% random tokens, 10% kept, 80% mask_id.
    length, draws, vocab = 100, 400, 50
    tokens = jnp.full((length,), 1000, jnp.int32)  # outside the vocab
    fn = jax.jit(jax.vmap(lambda k: _mask(
        k, tokens, mask_ratio=0.5, mask_id=-1, random_token_ratio=0.1,
        keep_ratio=0.1, vocab_size=vocab)))
    out = fn(jax.random.split(jax.random.key(4), draws))
    inputs = np.asarray(out.inputs)
    chosen = np.asarray(out.targets_mask)
    self.assertTrue((chosen.sum(axis=1) == 50).all())
    np.testing.assert_array_equal(inputs[~chosen], 1000)  # unchosen kept
    sel = inputs[chosen]
    masked = (sel == -1).sum()
    kept = (sel == 1000).sum()
    random = ((sel >= 0) & (sel < vocab)).sum()
    self.assertEqual(masked + kept + random, sel.size)
    p = stats.chisquare([masked, random, kept],
                        sel.size * np.array([0.8, 0.1, 0.1])).pvalue
    self.assertGreater(p, 1e-3, (masked, random, kept))
    # Random tokens uniform over the vocabulary.
    values = sel[(sel >= 0) & (sel < vocab)]
    p = stats.chisquare(np.bincount(values, minlength=vocab)).pvalue
    self.assertGreater(p, 1e-3)

  @parameterized.named_parameters(
      ('ratio_zero', dict(mask_ratio=0.0), ValueError, 'mask_ratio'),
      ('ratio_one', dict(mask_ratio=1.0), ValueError, 'mask_ratio'),
      ('ratio_negative', dict(mask_ratio=-0.1), ValueError, 'mask_ratio'),
      ('ratio_nan', dict(mask_ratio=float('nan')), ValueError, 'mask_ratio'),
      ('ratio_string', dict(mask_ratio='0.15'), TypeError, 'mask_ratio'),
      ('mask_id_float', dict(mask_id=1.5), TypeError, 'mask_id'),
      ('mask_id_vector', dict(mask_id=jnp.array([1, 2])), ValueError,
       'mask_id'),
      ('random_without_vocab', dict(random_token_ratio=0.1), ValueError,
       'vocab_size'),
      ('ratios_sum', dict(random_token_ratio=0.6, keep_ratio=0.5,
                          vocab_size=10), ValueError,
       r'random_token_ratio \+ keep_ratio'),
      ('keep_negative', dict(keep_ratio=-0.1), ValueError, 'keep_ratio'),
  )
  def test_bad_arguments(self, kwargs, error, name):
    with self.assertRaisesRegex(error, f'token_masking: {name}'):
      _mask(jax.random.key(0), jnp.arange(10), **kwargs)

  def test_bad_tokens(self):
    with self.assertRaisesRegex(ValueError, 'token_masking: tokens must be '
                                '1-D'):
      _mask(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))
    with self.assertRaisesRegex(ValueError, 'tokens must have length'):
      _mask(jax.random.key(0), jnp.zeros((0,), jnp.int32))
    with self.assertRaisesRegex(TypeError, 'tokens'):
      _mask(jax.random.key(0), jnp.zeros((5,), jnp.float32))


if __name__ == '__main__':
  absltest.main()
