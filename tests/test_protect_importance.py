"""Tests for MAS and SI importances (metacf.protect).

References: per-example Python loops (MAS), a hand loop of optimizer steps
accumulating -g * u in float64 (SI's path integral), the formula (SI's
importance), and ewc_penalty's quadratic with the importances as weights.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf import protect


def _mlp(key, sizes=(4, 6, 3), dtype=jnp.float32):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{'w': jax.random.normal(k, (m, n), dtype) / np.sqrt(m),
           'b': 0.1 * jnp.ones((n,), dtype)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def _apply(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer['w'] + layer['b'][None, :])
  return x @ params[-1]['w'] + params[-1]['b'][None, :]


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), equal_nan=False, **kw), a, b)


class MasImportanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_per_example_loop_float64(self):
    with jax.enable_x64(True):
      params = _mlp(jax.random.key(0), dtype=jnp.float64)
      x = jax.random.normal(jax.random.key(1), (7, 4), jnp.float64)
      got = self.variant(lambda p, x: protect.mas_importance(_apply, p, x))(
          params, x)
      grads = []
      for n in range(7):
        g = jax.grad(lambda p: jnp.sum(_apply(p, x[n:n + 1]) ** 2))(params)
        grads.append(jax.tree.map(np.abs, g))
      want = jax.tree.map(lambda *g: np.mean(g, 0), *grads)
      _close(got, want, rtol=1e-12)
      # Not the absolute value of the mean gradient (Avalanche's batch
      # variant): cancellation makes that smaller somewhere.
      batch = jax.grad(lambda p: jnp.mean(jnp.sum(_apply(p, x) ** 2, -1)))(
          params)
      self.assertTrue(any(
          bool(np.any(np.abs(b) < w - 1e-6)) for b, w in zip(
              jax.tree.leaves(batch), jax.tree.leaves(want))))

  def test_chunks_equal_all_at_once(self):
    params = _mlp(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (10, 4))
    want = protect.mas_importance(_apply, params, x)
    for chunk in (1, 3, 4, 10, 20):
      _close(protect.mas_importance(_apply, params, x, chunk_size=chunk),
             want, rtol=1e-5, atol=1e-7)

  def test_bad_inputs(self):
    params = _mlp(jax.random.key(0))
    with self.assertRaisesRegex(
        ValueError, 'mas_importance: chunk_size must be >= 1, got 0'):
      protect.mas_importance(_apply, params, jnp.ones((3, 4)), chunk_size=0)
    with self.assertRaisesRegex(
        ValueError, 'mas_importance: x must have at least one example'):
      protect.mas_importance(_apply, params, jnp.ones((0, 4)))


class PathIntegralTest(chex.TestCase):

  def test_updates_unchanged_and_omega_matches_hand_loop(self):
    with jax.enable_x64(True), jax.numpy_dtype_promotion('standard'):
      params = _mlp(jax.random.key(0), dtype=jnp.float64)
      xs = jax.random.normal(jax.random.key(1), (5, 8, 4), jnp.float64)
      loss = lambda p, x: jnp.mean(_apply(p, x) ** 2)
      for inner in (optax.sgd(0.1), optax.adam(0.01)):
        tx = protect.path_integral(inner)
        state, ref_state = tx.init(params), inner.init(params)
        p, ref_p = params, params
        omega = jax.tree.map(np.zeros_like, params)
        step = jax.jit(tx.update)
        for x in xs:
          g = jax.grad(loss)(p, x)
          updates, state = step(g, state, p)
          ref_updates, ref_state = inner.update(g, ref_state, ref_p)
          _close(updates, ref_updates, rtol=1e-12)
          omega = jax.tree.map(lambda w, gi, u: w - np.asarray(gi) * u,
                               omega, g, ref_updates)
          p = optax.apply_updates(p, updates)
          ref_p = optax.apply_updates(ref_p, ref_updates)
        _close(optax.tree.get(state, 'omega'), omega, rtol=1e-12)
        self.assertEqual(step._cache_size(), 1)

  def test_sgd_omega_is_nonnegative_and_resettable(self):
    params = _mlp(jax.random.key(0))
    tx = protect.path_integral(optax.sgd(0.05))
    state = tx.init(params)
    g = jax.tree.map(lambda a: jnp.ones_like(a) * -0.5, params)
    _, state = tx.update(g, state, params)
    for leaf in jax.tree.leaves(optax.tree.get(state, 'omega')):
      np.testing.assert_allclose(leaf, 0.05 * 0.25, rtol=1e-6)
    state = optax.tree.set(state, omega=optax.tree.zeros_like(params))
    for leaf in jax.tree.leaves(state.omega):
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


class SiImportanceTest(chex.TestCase):

  def test_formula_and_use_in_ewc_penalty(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      omega = {'a': rng.uniform(size=(3, 2)), 'b': rng.uniform(size=4)}
      delta = {'a': rng.normal(size=(3, 2)), 'b': rng.normal(size=4)}
      got = protect.si_importance(omega, delta, damping=0.05)
      want = jax.tree.map(lambda w, d: w / (d ** 2 + 0.05), omega, delta)
      _close(got, want, rtol=1e-14)
      # SI's penalty is EWC's quadratic with these weights.
      params = {'a': rng.normal(size=(3, 2)), 'b': rng.normal(size=4)}
      anchor = {'a': rng.normal(size=(3, 2)), 'b': rng.normal(size=4)}
      penalty = protect.ewc_penalty(params, anchor, got, 2.0)
      want_penalty = sum(np.sum(want[k] * (params[k] - anchor[k]) ** 2)
                         for k in 'ab')
      np.testing.assert_allclose(penalty, want_penalty, rtol=1e-12)

  def test_bad_inputs(self):
    omega = {'w': jnp.ones(3)}
    with self.assertRaisesRegex(
        ValueError, re.escape('si_importance: damping must be > 0, got 0.0')):
      protect.si_importance(omega, omega, damping=0.0)
    with self.assertRaisesRegex(ValueError, 'si_importance: delta must have '
                                'the same pytree structure as omega'):
      protect.si_importance(omega, {'v': jnp.ones(3)})
    with self.assertRaisesRegex(
        ValueError, re.escape('si_importance: delta must have the shapes of '
                              'omega, got (2,) for a leaf of shape (3,).')):
      protect.si_importance(omega, {'w': jnp.ones(2)})
