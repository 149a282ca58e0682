"""Tests for ER-ACE's loss and iCaRL's herding selection (metacf.replay).

References: float64 NumPy formulas and a NumPy loop of Rebuffi et al.'s
Algorithm 4.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf import replay


def _np_ace(logits, labels, active):
  logits = np.asarray(logits, np.float64)
  active = np.broadcast_to(np.asarray(active), logits.shape)
  out = []
  for z, y, a in zip(logits, np.asarray(labels), active):
    out.append(np.log(np.sum(np.exp(z[a]))) - z[y])
  return np.array(out)


def _np_herding(features, m):
  features = np.asarray(features, np.float64)
  mean = features.mean(0)
  chosen, total = [], np.zeros_like(mean)
  for k in range(1, m + 1):
    best, best_d = None, np.inf
    for i in range(len(features)):
      if i in chosen:
        continue
      d = np.sum((mean - (total + features[i]) / k) ** 2)
      if d < best_d:
        best, best_d = i, d
    chosen.append(best)
    total = total + features[best]
  return np.array(chosen)


class AceCrossEntropyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_for_shared_and_per_example_masks(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 1, 1, 3, 0, 3], np.int32)
    shared = np.array([True, True, False, True, False])
    per_example = rng.uniform(size=(6, 5)) < 0.5
    per_example[np.arange(6), labels] = True
    for active in (shared, per_example):
      got = self.variant(replay.ace_cross_entropy)(logits, labels, active)
      np.testing.assert_allclose(got, _np_ace(logits, labels, active),
                                 rtol=1e-5)

  def test_all_active_is_plain_cross_entropy_and_inactive_get_no_gradient(
      self):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    labels = jnp.array([0, 2, 1, 0])
    np.testing.assert_allclose(
        replay.ace_cross_entropy(logits, labels, jnp.ones(3, bool)),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        rtol=1e-6)
    active = jnp.array([True, True, False])
    g = jax.grad(lambda z: replay.ace_cross_entropy(
        z, jnp.array([0, 1, 1, 0]), active).sum())(logits)
    np.testing.assert_array_equal(g[:, 2], np.zeros(4))
    self.assertTrue(bool(jnp.all(jnp.isfinite(g))))

  def test_bad_inputs(self):
    logits = jnp.zeros((2, 3))
    with self.assertRaisesRegex(
        ValueError, re.escape('ace_cross_entropy: every label must be one of '
                              'active_classes')):
      replay.ace_cross_entropy(logits, jnp.array([0, 2]),
                               jnp.array([True, True, False]))
    with self.assertRaisesRegex(
        ValueError, re.escape('ace_cross_entropy: active_classes must have '
                              'shape (3,) or (2, 3), got (4,).')):
      replay.ace_cross_entropy(logits, jnp.array([0, 1]), jnp.ones(4, bool))
    with self.assertRaisesRegex(
        TypeError, 'ace_cross_entropy: active_classes must be booleans'):
      replay.ace_cross_entropy(logits, jnp.array([0, 1]), jnp.ones(3))
    with self.assertRaisesRegex(
        ValueError, re.escape('ace_cross_entropy: labels must be in [0, 3), '
                              'got values in [0, 3].')):
      replay.ace_cross_entropy(logits, jnp.array([0, 3]), jnp.ones(3, bool))
    with self.assertRaisesRegex(
        ValueError, re.escape('ace_cross_entropy: labels must have shape '
                              '(2,), got (3,).')):
      replay.ace_cross_entropy(logits, jnp.array([0, 1, 1]),
                               jnp.ones(3, bool))


class HerdingSelectionTest(chex.TestCase):

  def test_matches_numpy_algorithm_4(self):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(30, 8)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    got = jax.jit(replay.herding_selection, static_argnums=1)(features, 12)
    self.assertEqual(got.dtype, jnp.int32)
    np.testing.assert_array_equal(got, _np_herding(features, 12))
    self.assertEqual(len(set(np.asarray(got).tolist())), 12)
    # All N: a permutation; a prefix of a longer selection is the shorter one.
    full = replay.herding_selection(features, 30)
    self.assertEqual(sorted(np.asarray(full).tolist()), list(range(30)))
    np.testing.assert_array_equal(full[:12], got)
    self.assertEqual(replay.herding_selection(features, 0).shape, (0,))

  def test_running_mean_tracks_the_class_mean(self):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(200, 4)).astype(np.float32)
    idx = np.asarray(replay.herding_selection(features, 20))
    herd = np.linalg.norm(features[idx].mean(0) - features.mean(0))
    rand = np.linalg.norm(features[:20].mean(0) - features.mean(0))
    self.assertLess(herd, 0.2 * rand)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(
        ValueError, re.escape('herding_selection: num_exemplars must be <= '
                              'the number of examples (5), got 6.')):
      replay.herding_selection(jnp.zeros((5, 2)), 6)
    with self.assertRaisesRegex(
        ValueError, 'herding_selection: num_exemplars must be >= 0, got -1'):
      replay.herding_selection(jnp.zeros((5, 2)), -1)
    with self.assertRaisesRegex(
        ValueError, 'herding_selection: features must be '):
      replay.herding_selection(jnp.zeros(5), 2)
