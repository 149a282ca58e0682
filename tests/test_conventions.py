"""Conventions shared across modules: named returns that still unpack as pairs.

Functions that return several named things return NamedTuples
(``mix_replay`` -> ``MixedBatch``, ``span_corruption`` -> ``SpanCorruption``,
``text_infilling`` -> ``TextInfilling``), and the tuple unpacking of earlier
releases gives the same arrays.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import metacf


class NamedReturnsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mix_replay_returns_mixed_batch(self):
    batch = {'x': jnp.arange(8.0).reshape(4, 2)}
    replay = {'x': -jnp.arange(8.0).reshape(4, 2) - 1.0}
    out = self.variant(metacf.replay.mix_replay)(
        jax.random.key(0), batch, replay, 0.5)
    self.assertIsInstance(out, metacf.replay.MixedBatch)
    mixed, is_replay = out
    np.testing.assert_array_equal(mixed['x'], out.batch['x'])
    np.testing.assert_array_equal(is_replay, out.is_replay)
    self.assertEqual(int(np.sum(is_replay)), 2)
    rows = np.asarray(mixed['x'])
    np.testing.assert_array_equal(rows[np.asarray(is_replay)] < 0, True)
    np.testing.assert_array_equal(
        rows[~np.asarray(is_replay)], np.asarray(batch['x'])[
            ~np.asarray(is_replay)])

  def test_mix_replay_empty_replay_is_mixed_batch(self):
    batch = {'x': jnp.ones((3, 2))}
    out = metacf.replay.mix_replay(jax.random.key(0), batch,
                                   {'x': jnp.zeros((0, 2))}, 0.0)
    self.assertIsInstance(out, metacf.replay.MixedBatch)
    np.testing.assert_array_equal(out.batch['x'], batch['x'])
    self.assertFalse(bool(jnp.any(out.is_replay)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_span_corruption_returns_named_pair(self):
    tokens = jnp.arange(20, dtype=jnp.int32)
    fn = lambda k, t: metacf.noise.span_corruption(
        k, t, noise_density=0.3, mean_noise_span_length=2.0,
        sentinel_start=100)
    out = self.variant(fn)(jax.random.key(1), tokens)
    self.assertIsInstance(out, metacf.noise.SpanCorruption)
    inputs, targets = out
    self.assertEqual(inputs.shape, out.inputs.shape)
    np.testing.assert_array_equal(targets, out.targets)
    # Every token is either kept in the inputs or spelled in the targets.
    kept = set(np.asarray(out.inputs).tolist()) - set(range(90, 101))
    spelled = set(np.asarray(out.targets).tolist()) - set(range(90, 101))
    self.assertEqual(kept | spelled, set(range(20)))
    self.assertEqual(kept & spelled, set())

  @chex.variants(with_jit=True, without_jit=True)
  def test_text_infilling_returns_named_pair(self):
    tokens = jnp.arange(1, 31, dtype=jnp.int32)
    fn = lambda k, t: metacf.noise.text_infilling(k, t, mask_id=99, pad_id=0)
    out = self.variant(fn)(jax.random.key(2), tokens)
    self.assertIsInstance(out, metacf.noise.TextInfilling)
    noised, length = out
    np.testing.assert_array_equal(noised, out.noised)
    self.assertEqual(int(length), int(out.length))
    n = int(out.length)
    self.assertTrue(np.all(np.asarray(out.noised)[n:] == 0))
    self.assertGreater(int(np.sum(np.asarray(out.noised)[:n] == 99)), 0)


class AutoMethodNeedsNoKeyTest(chex.TestCase):

  def test_auto_without_key_is_deterministic_gram_at_scale(self):
    # N * C = 4097 rows (> 4096) with P = 1100: 'randomized' with a key,
    # 'gram' without; no error at any size.
    self.assertEqual(metacf.jacobian.auto_svd_method(4097, 1100), 'randomized')
    self.assertEqual(
        metacf.jacobian.auto_svd_method(4097, 1100, has_key=False), 'gram')

  def test_auto_without_key_matches_dense(self):
    with jax.enable_x64(True):
      w = jax.random.normal(jax.random.key(0), (30, 2), jnp.float64)
      x = jax.random.normal(jax.random.key(1), (5, 30), jnp.float64)
      apply_fn = lambda p, x: jnp.tanh(x @ p)
      got = metacf.jacobian.jacobian_svd(apply_fn, w, x, 3)
      want = metacf.jacobian.jacobian_svd(apply_fn, w, x, 3, method='dense')
      np.testing.assert_allclose(got.s, want.s, rtol=1e-10)
