"""Tests for GEM's projection (metacf.protect.gem_project, gem).

Reference: the dual as a non-negative least-squares problem,
``v = argmin_{v >= 0} |G^T v + g|``, ``g~ = g + G^T v``, solved exactly in
float64 by SciPy's Lawson-Hanson NNLS (an active-set QP solver).
"""

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from metacf import protect


def _tree(flat, shapes=((3, 4), (5,))):
  out, i = {}, 0
  for name, shape in zip('ab', shapes):
    n = int(np.prod(shape))
    out[name] = flat[..., i:i + n].reshape(flat.shape[:-1] + shape)
    i += n
  return out


def _nnls_reference(g, memory):
  v, _ = optimize.nnls(memory.T, -g)
  return g + memory.T @ v


class GemProjectTest(chex.TestCase):

  @parameterized.parameters((1, 0), (3, 1), (5, 2), (8, 3))
  def test_matches_nnls_reference(self, t, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=17)
    memory = rng.normal(size=(t, 17))
    memory[0] = -g + 0.1 * rng.normal(size=17)   # at least one violation.
    want = _nnls_reference(g, memory)
    got = jax.jit(protect.gem_project)(
        _tree(g.astype(np.float32)), _tree(memory.astype(np.float32)))
    got = np.concatenate([np.asarray(got[k]).reshape(-1) for k in 'ab'])
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
    # Feasible to rounding: no memory's loss rises to first order.
    self.assertGreater((memory @ got).min(), -1e-4 * np.abs(g).max() ** 2)

  def test_float64_is_exact(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(7)
      g = rng.normal(size=17)
      memory = rng.normal(size=(4, 17))
      memory[1] = -g
      got = protect.gem_project(_tree(g), _tree(memory))
      got = np.concatenate([np.asarray(got[k]).reshape(-1) for k in 'ab'])
      np.testing.assert_allclose(got, _nnls_reference(g, memory), rtol=1e-10,
                                 atol=1e-12)

  def test_unchanged_when_no_constraint_is_violated(self):
    rng = np.random.default_rng(1)
    g = rng.normal(size=17).astype(np.float32)
    memory = np.stack([g + 0.1 * rng.normal(size=17), g]).astype(np.float32)
    got = protect.gem_project(_tree(g), _tree(memory))
    for k in 'ab':
      np.testing.assert_array_equal(got[k], _tree(g)[k])

  def test_zero_rows_are_padding_and_jit_compiles_once(self):
    rng = np.random.default_rng(2)
    g = rng.normal(size=17).astype(np.float32)
    real = np.stack([-g + 0.3 * rng.normal(size=17)]).astype(np.float32)
    padded = np.concatenate([real, np.zeros((3, 17), np.float32)])
    project = jax.jit(lambda g, m: protect.gem_project(g, m))
    a = project(_tree(g), _tree(padded))
    want = _nnls_reference(g.astype(np.float64), real.astype(np.float64))
    got = np.concatenate([np.asarray(a[k]).reshape(-1) for k in 'ab'])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    more = padded.copy()
    more[1] = rng.normal(size=17)
    project(_tree(g), _tree(more))
    self.assertEqual(project._cache_size(), 1)

  def test_gem_transformation_in_a_chain(self):
    rng = np.random.default_rng(3)
    g = rng.normal(size=17).astype(np.float32)
    memory = np.stack([-g, rng.normal(size=17)]).astype(np.float32)
    params = _tree(np.zeros(17, np.float32))
    tx = optax.chain(protect.gem(), optax.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(lambda g, s, m: tx.update(g, s, params, memory_grads=m))
    updates, state = step(_tree(g), state, _tree(memory))
    want = protect.gem_project(_tree(g), _tree(memory))
    for k in 'ab':
      np.testing.assert_allclose(updates[k], -0.1 * want[k], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'gem: update needs'):
      tx.update(_tree(g), state, params)

  def test_margin_pushes_along_memory_gradients(self):
    # Dual optimum v* = 0.2 < margin: v = 0.5 pushes 0.3 past the boundary.
    g = {'a': jnp.array([1.0, -0.2])}
    memory = {'a': jnp.array([[0.0, 1.0]])}
    plain = protect.gem_project(g, memory)
    pushed = protect.gem_project(g, memory, margin=0.5)
    np.testing.assert_allclose(plain['a'], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(pushed['a'], [1.0, 0.3], atol=1e-6)

  def test_bad_inputs(self):
    g = {'a': jnp.ones(3)}
    with self.assertRaisesRegex(
        ValueError, re.escape('gem_project: every memory_grads leaf must be '
                              '[t, *grads leaf shape], got (3,) for a grads '
                              'leaf of shape (3,).')):
      protect.gem_project(g, {'a': jnp.ones(3)})
    with self.assertRaisesRegex(ValueError, 'gem_project: memory_grads must '
                                'have the same pytree structure as grads'):
      protect.gem_project(g, {'b': jnp.ones((2, 3))})
    with self.assertRaisesRegex(
        ValueError, 'gem_project: memory_grads leaves must share the leading'):
      protect.gem_project({'a': jnp.ones(3), 'b': jnp.ones(2)},
                          {'a': jnp.ones((2, 3)), 'b': jnp.ones((3, 2))})
    with self.assertRaisesRegex(
        ValueError, 'gem_project: num_sweeps must be >= 1, got 0'):
      protect.gem_project(g, {'a': jnp.ones((1, 3))}, num_sweeps=0)
    with self.assertRaisesRegex(
        ValueError, re.escape('gem_project: margin must be >= 0, got -0.5')):
      protect.gem_project(g, {'a': jnp.ones((1, 3))}, margin=-0.5)
