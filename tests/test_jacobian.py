"""Tests for metacf.jacobian against jax.jacrev, NumPy float64 and real GD."""

import functools
import os
import subprocess
import sys
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from metacf import jacobian as jac

# ---------------------------------------------------------------------------
# Test models: pure functions of a dict of arrays.


def _mlp_init(seed, sizes=(3, 6, 2), dtype=np.float64):
  # NumPy draws: no per-shape compilation of jax.random in eager tests.
  rng = np.random.default_rng(seed)
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f'w{i}'] = jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), dtype)
    params[f'b{i}'] = jnp.asarray(0.1 * rng.normal(size=(n,)), dtype)
  return params


# The tests compile many small programs on a small shared CPU, where XLA's
# backend optimisations cost more time than they save (measured 2.3x faster
# to compile at level 0). A few tests use plain jax.jit to keep that covered.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


@functools.lru_cache(maxsize=None)
def _jitted(fn, apply_fn, **static):
  """One jitted kernel per (function, model, static options), for all tests."""
  return jax.jit(functools.partial(fn, apply_fn, **static),
                 compiler_options=_FAST_COMPILE)


def _mlp_apply(params, x):
  h = jnp.tanh(x @ params['w0'] + params['b0'][None, :])
  return h @ params['w1'] + params['b1'][None, :]


def _linear_apply(params, x):
  return x @ params['w']


def _feature_apply(params, x):
  """Linear in its parameters: J = x.reshape(N * C, P) with P = 6 + len(b)."""
  x_a, x_b = x[..., :6], x[..., 6:]
  return (jnp.einsum('ncp,p->nc', x_a, params['a'].reshape(6))
          + jnp.einsum('ncp,p->nc', x_b, params['b']))


def _feature_params(num_params, dtype=jnp.float64):
  return {'a': jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3),
          'b': jnp.linspace(0.5, -0.5, num_params - 6, dtype=dtype)}


_RANDOM_FEATURES = np.random.default_rng(7).normal(size=(3, 8))


def _random_features_apply(params, x):
  """Fixed random tanh features, trainable affine head: linear in params."""
  phi = jnp.tanh(x @ jnp.asarray(_RANDOM_FEATURES, x.dtype))
  return phi @ params['w'] + params['b'][None, :]


@functools.lru_cache(maxsize=None)
def _jacrev_of_raveled(apply_fn):

  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def jacobian(params, x):
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(lambda t: apply_fn(unravel(t), x).reshape(-1))(flat)

  return jacobian


def _flat_jacobian(apply_fn, params, x):
  """Independent reference: jacrev of the raveled, flattened function."""
  return np.asarray(_jacrev_of_raveled(apply_fn)(params, x))


def _projector(vt):
  vt = np.asarray(vt)
  return vt.T @ vt


def _assert_finite(*arrays):
  for a in jax.tree.leaves(arrays):
    assert np.all(np.isfinite(np.asarray(a))), a


def _assert_orthonormal_rows(vt, atol):
  vt = np.asarray(vt)
  np.testing.assert_allclose(vt @ vt.T, np.eye(vt.shape[0]), atol=atol)


def _mse(f, y):
  return 0.5 * jnp.mean(jnp.sum((f - y)**2, axis=1))


def _cross_entropy(f, y):
  return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(f, y))


_LOSS_FNS = {'mse': _mse, 'cross_entropy': _cross_entropy}


def _data(seed, n, din=3, dtype=np.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, din)), dtype)


# ---------------------------------------------------------------------------


class JacobianTest(chex.TestCase):

  def test_row_and_column_order_on_tiny_case_without_jit(self):
    # f[n, c] = x[n] * (c + 1) * w[c], params {'v': w[1], 'w': w[0]}: rows are
    # (n, c) row-major, columns follow ravel_pytree (sorted dict keys).
    def apply_fn(params, x):
      w = jnp.stack([params['w'], params['v']])
      return x[:, None] * (w * jnp.array([1.0, 2.0]))[None, :]

    params = {'v': jnp.float32(3.0), 'w': jnp.float32(5.0)}
    x = jnp.array([1.0, 10.0])
    expected = np.array([[0.0, 1.0],    # n=0, c=0: d/dw
                         [2.0, 0.0],    # n=0, c=1: d/dv
                         [0.0, 10.0],   # n=1, c=0
                         [20.0, 0.0]])  # n=1, c=1
    np.testing.assert_array_equal(jac.jacobian(apply_fn, params, x), expected)
    np.testing.assert_array_equal(
        jac.jacobian(apply_fn, params, x, chunk_size=1, mode='fwd'), expected)
    # Orthogonal columns: s = (|col 0|, |col 1|), vt = I (canonical signs).
    svd = jac.jacobian_svd(apply_fn, params, x, 2, method='dense')
    np.testing.assert_allclose(svd.s, np.sqrt([404.0, 101.0]), rtol=1e-6)
    np.testing.assert_allclose(svd.vt, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(svd.u[:, 0], expected[:, 0] / np.sqrt(404),
                               atol=1e-6)

  @parameterized.named_parameters(
      ('one_chunk_rev', None, 'rev'),
      ('chunks_with_remainder_rev', 2, 'rev'),
      ('chunks_of_3_fwd', 3, 'fwd'),
  )
  def test_matches_jacrev_of_raveled_function(self, chunk_size, mode):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x = _data(1, 7)
      fn = _jitted(jac.jacobian, _mlp_apply, chunk_size=chunk_size,
                   mode=mode)
      got = fn(params, x)
      self.assertTrue(np.isnan(fn(params, x.at[3, 0].set(jnp.nan))).any())
      self.assertEqual(got.shape, (7 * 2, 38))
      _assert_finite(got)
      np.testing.assert_allclose(got, _flat_jacobian(_mlp_apply, params, x),
                                 rtol=1e-12, atol=1e-14)

  def test_bad_inputs(self):
    params = _mlp_init(0, dtype=jnp.float32)
    x = jnp.zeros((4, 3))
    with self.assertRaisesRegex(ValueError,
                                'jacobian: chunk_size must be >= 1, got 0'):
      jac.jacobian(_mlp_apply, params, x, chunk_size=0)
    with self.assertRaisesRegex(TypeError, 'jacobian: chunk_size must be a '
                                r'Python int, got True\.'):
      jac.jacobian(_mlp_apply, params, x, chunk_size=True)
    with self.assertRaisesRegex(ValueError, "jacobian: mode must be one of "
                                "'rev', 'fwd', got 1"):
      jac.jacobian(_mlp_apply, params, x, mode=1)
    with self.assertRaisesRegex(ValueError, "jacobian: mode must be one of "
                                "'rev', 'fwd', got 'reverse'"):
      jac.jacobian(_mlp_apply, params, x, mode='reverse')
    with self.assertRaisesRegex(
        ValueError, r'jacobian: apply_fn\(params, x\) must return outputs of '
        r'shape \[N, C\] with N = 4, got shape \(8,\)'):
      jac.jacobian(lambda p, x: _mlp_apply(p, x).reshape(-1), params, x)
    with self.assertRaisesRegex(TypeError, 'params must have a floating'):
      jac.jacobian(lambda p, x: x, {'w': jnp.zeros(2, jnp.int32)}, x)


class NtkTest(chex.TestCase):

  @parameterized.named_parameters(
      ('vector_products', 'ntk_vector_products', None),
      ('vector_products_blocks_with_remainder', 'ntk_vector_products', 2),
      ('jacobian_contraction', 'jacobian_contraction', None),
  )
  def test_matches_jacobian_product_float64(self, implementation, chunk):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x1, x2 = _data(1, 5), _data(2, 3)
      fn = (_jitted(jac.ntk, _mlp_apply) if implementation ==
            'ntk_vector_products' and chunk is None else
            _jitted(jac.ntk, _mlp_apply, implementation=implementation,
                    chunk_size=chunk))
      got = fn(params, x1, x2)
      want = (_flat_jacobian(_mlp_apply, params, x1)
              @ _flat_jacobian(_mlp_apply, params, x2).T)
      self.assertEqual(got.shape, (10, 6))
      _assert_finite(got)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12,
                                 err_msg=f'{implementation} fails.')

  def test_same_inputs_give_symmetric_psd_kernel(self):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x = _data(1, 5)
      kernel = np.asarray(_jitted(jac.ntk, _mlp_apply)(params, x, x))
      j = _flat_jacobian(_mlp_apply, params, x)
      np.testing.assert_allclose(kernel, j @ j.T, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(kernel, kernel.T, rtol=1e-12, atol=1e-13)
      eigvals = np.linalg.eigvalsh(kernel)
      self.assertGreater(eigvals.min(), -1e-10 * eigvals.max())

  def test_bad_inputs(self):
    params = _mlp_init(0, dtype=jnp.float32)
    x = jnp.zeros((4, 3))
    with self.assertRaisesRegex(
        ValueError, "ntk: implementation must be one of 'ntk_vector_products', "
        "'jacobian_contraction', got 'fast'"):
      jac.ntk(_mlp_apply, params, x, x, implementation='fast')
    with self.assertRaisesRegex(ValueError, 'ntk: x2 must have a leading '
                                'example axis'):
      jac.ntk(_mlp_apply, params, x, {'a': jnp.zeros((4, 3)),
                                      'b': jnp.zeros((2, 3))})


# ---------------------------------------------------------------------------


def _decaying_feature_task(num_rows=30, num_params=40, seed=0):
  """Features x [N, 1, P] whose Jacobian has singular values 0.6**i."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(num_rows, num_rows)))
  v, _ = np.linalg.qr(rng.normal(size=(num_params, num_rows)))
  s = 0.6**np.arange(num_rows)
  j = (u * s[None, :]) @ v.T
  return j.reshape(num_rows, 1, num_params)


class JacobianSvdTest(chex.TestCase):

  @parameterized.named_parameters(('dense', 'dense'), ('gram', 'gram'))
  def test_matches_numpy_svd_float64(self, method):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x = _data(1, 5)
      got = _jitted(jac.jacobian_svd, _mlp_apply, k=4, method=method)(
          params, x)
      j = _flat_jacobian(_mlp_apply, params, x)
      _, s, vt = np.linalg.svd(j, full_matrices=False)
      self.assertEqual((got.s.shape, got.vt.shape, got.u.shape),
                       ((4,), (4, 38), (10, 4)))
      _assert_finite(got)
      np.testing.assert_allclose(got.s, s[:4], rtol=1e-8)
      _assert_orthonormal_rows(got.vt, atol=1e-10)
      _assert_orthonormal_rows(got.u.T, atol=1e-10)
      np.testing.assert_allclose(_projector(got.vt), _projector(vt[:4]),
                                 atol=1e-8)
      # J v_i = s_i u_i, with matching signs; the residual field says so.
      np.testing.assert_allclose(j @ np.asarray(got.vt).T,
                                 got.u * got.s[None, :], atol=1e-10)
      true_residual = np.linalg.norm(
          j @ np.asarray(got.vt).T - got.u * got.s[None, :], axis=0)
      self.assertEqual(got.residual.shape, (4,))
      np.testing.assert_allclose(got.residual, true_residual, atol=1e-10)
      # Canonical signs: the largest-|.| entry of each row is positive.
      vt_got = np.asarray(got.vt)
      pivots = vt_got[np.arange(4), np.argmax(np.abs(vt_got), axis=1)]
      self.assertTrue(np.all(pivots > 0))

  def test_methods_agree_including_signs(self):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x = _data(1, 5)
      svds = {m: _jitted(jac.jacobian_svd, _mlp_apply, k=3, method=m)(
          params, x, key=jax.random.key(3))
              for m in ('dense', 'gram', 'randomized')}
      for m in ('gram', 'randomized'):
        np.testing.assert_allclose(svds[m].vt, svds['dense'].vt, atol=1e-8,
                                   err_msg=f'{m} fails.')
        np.testing.assert_allclose(svds[m].u, svds['dense'].u, atol=1e-8,
                                   err_msg=f'{m} fails.')

  @parameterized.named_parameters(
      ('block_krylov_with_subspace_options', 'randomized'),
      ('subspace_iteration', 'subspace_iteration'))
  def test_randomized_on_decaying_spectrum(self, method):
    with jax.enable_x64(True):
      features = _decaying_feature_task()
      params = _feature_params(40)
      j = _flat_jacobian(_feature_apply, params, features)
      np.testing.assert_allclose(j, features.reshape(30, 40), atol=1e-15)
      _, s, vt = np.linalg.svd(j, full_matrices=False)
      fn = jax.jit(functools.partial(jac.jacobian_svd, _feature_apply, k=5,
                                     method=method, oversampling=5,
                                     num_power_iters=2))
      got = fn(params, features, key=jax.random.key(0))
      _assert_finite(got)
      np.testing.assert_allclose(got.s, s[:5], rtol=1e-3)
      _assert_orthonormal_rows(got.vt, atol=1e-10)
      self.assertLess(
          np.linalg.norm(_projector(got.vt) - _projector(vt[:5]), 2), 1e-3)
      # Same key: bit-identical. Another key: different probes, still good.
      again = fn(params, features, key=jax.random.key(0))
      np.testing.assert_array_equal(again.vt, got.vt)
      other = fn(params, features, key=jax.random.key(1))
      self.assertFalse(np.array_equal(other.s, got.s))
      np.testing.assert_allclose(other.s, s[:5], rtol=1e-3)
      self.assertEqual(fn._cache_size(), 1)

  def test_auto_rule(self):
    self.assertEqual(jac.auto_svd_method(10, 38), 'dense')
    self.assertEqual(jac.auto_svd_method(64, 2**16), 'dense')
    self.assertEqual(jac.auto_svd_method(64, 2**16 + 1), 'gram')
    self.assertEqual(jac.auto_svd_method(4096, 10**6), 'gram')
    self.assertEqual(jac.auto_svd_method(4097, 1024), 'randomized')
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x = _data(1, 5)
      auto = _jitted(jac.jacobian_svd, _mlp_apply, k=3)(params, x)
      dense = _jitted(jac.jacobian_svd, _mlp_apply, k=3, method='dense')(
          params, x, key=jax.random.key(3))
      _assert_finite(auto)
      chex.assert_trees_all_equal(auto, dense)

  def test_compiles_once_for_same_shapes(self):

    @jax.jit
    @chex.assert_max_traces(n=1)
    def top_directions(params, x):
      return jac.jacobian_svd(_mlp_apply, params, x, 2, method='gram')

    x = _data(1, 5, dtype=np.float32)
    for seed in range(3):
      out = top_directions(_mlp_init(seed, dtype=jnp.float32), x)
      _assert_finite(out)
      self.assertEqual(out.vt.dtype, jnp.float32)
    self.assertEqual(top_directions._cache_size(), 1)

  def test_bad_inputs(self):
    params = _mlp_init(0, dtype=jnp.float32)
    x = jnp.zeros((5, 3))
    for k in (0, 11):
      with self.assertRaisesRegex(
          ValueError, r'jacobian_svd: k must satisfy 1 <= k <= min\(N \* C, '
          rf'P\) = min\(10, 38\) = 10, got {k}\.'):
        jac.jacobian_svd(_mlp_apply, params, x, k)
    with self.assertRaisesRegex(TypeError, 'jacobian_svd: k must be a Python '
                                'int'):
      jac.jacobian_svd(_mlp_apply, params, x, 2.0)
    with self.assertRaisesRegex(ValueError, 'jacobian_svd: method must be one '
                                "of 'auto', 'dense', 'gram', 'randomized', "
                                "'subspace_iteration', got 'lanczos'"):
      jac.jacobian_svd(_mlp_apply, params, x, 2, method='lanczos')
    with self.assertRaisesRegex(ValueError, 'jacobian_svd: key must be a '
                                'jax.random key'):
      jac.jacobian_svd(_mlp_apply, params, x, 2, method='randomized')
    with self.assertRaisesRegex(ValueError, 'jacobian_svd: num_power_iters '
                                'must be >= 0, got -1'):
      jac.jacobian_svd(_mlp_apply, params, x, 2, method='randomized',
                       key=jax.random.key(0), num_power_iters=-1)
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, 'jacobian_svd: krylov_dim must be '
                                '>= k = 3, got 2'):
      jac.jacobian_svd(_mlp_apply, params, x, 3, method='randomized', key=key,
                       krylov_dim=2)
    for tol in (-0.1, 1.0, '1e-3', True):
      with self.assertRaisesRegex(ValueError, r'jacobian_svd: tol must be a '
                                  r'Python float in \[0, 1\), got'):
        jac.jacobian_svd(_mlp_apply, params, x, 3, method='randomized',
                         key=key, tol=tol)
    with self.assertRaisesRegex(ValueError, r'jacobian_svd: unroll=True '
                                r'needs tol=0'):
      jac.jacobian_svd(_mlp_apply, params, x, 3, method='randomized', key=key,
                       tol=1e-3, unroll=True)
    with self.assertRaisesRegex(TypeError, 'jacobian_svd: unroll must be '
                                'None or a bool, got 1'):
      jac.jacobian_svd(_mlp_apply, params, x, 3, method='randomized', key=key,
                       unroll=1)
    with self.assertRaisesRegex(ValueError, 'jacobian_svd: block_size must be '
                                '>= 1, got 0'):
      jac.jacobian_svd(_mlp_apply, params, x, 3, method='randomized', key=key,
                       block_size=0)
    with self.assertRaisesRegex(ValueError, "method='randomized' takes either "
                                r'\(krylov_dim, block_size\) or'):
      jac.jacobian_svd(_mlp_apply, params, x, 3, method='randomized', key=key,
                       krylov_dim=8, oversampling=2)
    with self.assertRaisesRegex(ValueError, 'krylov_dim and block_size must '
                                "be None for method='subspace_iteration'"):
      jac.jacobian_svd(_mlp_apply, params, x, 3, method='subspace_iteration',
                       key=key, block_size=2)
    with self.assertRaisesRegex(ValueError, 'jacobian_svd: key must be a '
                                "jax.random key when method is "
                                "'subspace_iteration', got None"):
      jac.jacobian_svd(_mlp_apply, params, x, 2, method='subspace_iteration')
    with self.assertRaisesRegex(TypeError, 'jacobian_svd: mesh must be a '
                                'jax.sharding.Mesh or None, got str'):
      jac.jacobian_svd(_mlp_apply, params, x, 2, mesh='data')
    mesh_2d = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                                ('a', 'b'))
    for fn in (lambda: jac.jacobian_svd(_mlp_apply, params, x, 2,
                                        mesh=mesh_2d),
               lambda: jac.ntk(_mlp_apply, params, x, x, mesh=mesh_2d)):
      with self.assertRaisesRegex(ValueError, r'mesh must be 1-D \(one axis, '
                                  r"over which the examples are sharded\), "
                                  r"got axes \('a', 'b'\)"):
        fn()
    # 'auto' never needs a key: on a Jacobian that 'randomized' would serve
    # with a key it falls back to the deterministic 'gram' without one (the
    # choice runs at trace time, before any Jacobian product).
    big = jax.ShapeDtypeStruct((4097, 1100), jnp.float32)
    w = jax.ShapeDtypeStruct((1100, 1), jnp.float32)
    out = jax.eval_shape(lambda w, x: jac.jacobian_svd(
        lambda p, x: x @ p, w, x, 2), w, big)
    self.assertEqual(out.s.shape, (2,))
    self.assertEqual(jac.auto_svd_method(4097, 1100), 'randomized')
    self.assertEqual(jac.auto_svd_method(4097, 1100, has_key=False), 'gram')
    self.assertEqual(jac.auto_svd_method(64, 2**16, has_key=False), 'dense')

  def test_nan_inputs_propagate(self):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x = _data(1, 5).at[2, 1].set(jnp.nan)
      self.assertTrue(np.isnan(_jitted(jac.ntk, _mlp_apply)(
          params, x, _data(2, 3))).any())
      for method in ('dense', 'gram', 'randomized'):
        out = _jitted(jac.jacobian_svd, _mlp_apply, k=3, method=method)(
            params, x, key=jax.random.key(0))
        self.assertTrue(np.isnan(out.s).any(), method)
        self.assertTrue(np.isnan(out.vt).any(), method)


def _spectrum_features(s, num_rows, num_params, seed=0):
  """Features x [N, C=10, P] whose Jacobian J [N*C, P] has singular values s.

  J = U diag(s) V^T with Haar-random U, V: with _linear_features_apply the
  model is linear in its parameters, so J = x.reshape(N * C, P) exactly.
  """
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(num_rows, len(s))))
  v, _ = np.linalg.qr(rng.normal(size=(num_params, len(s))))
  j = (u * s[None, :]) @ v.T
  return j.reshape(num_rows // 10, 10, num_params), j


def _linear_features_apply(params, x):
  return jnp.einsum('ncp,p->nc', x, params['w'])


def _flat_spectra(k, num_rows):
  """Spectra with s_k / s_(k+1) >= 1.01 and slow decay, by name."""
  i = np.arange(num_rows, dtype=np.float64)
  alpha = np.log(1.01) / np.log((k + 2) / (k + 1))  # s_k/s_(k+1) = 1.01.
  return {
      'power_law': (i + 1)**-alpha,
      'geometric_1.01': 1.01**-i,
      # Top k 1% apart, then all the rest packed in [0.5, 0.99] s_k.
      'clustered_tail': np.r_[1.01**-i[:k], 1.01**-k * np.linspace(
          1 / 1.01, 0.5, num_rows - k)],
      # Rank 12 < krylov_dim: the Krylov space is exhausted early.
      'rank_12': np.r_[np.linspace(2.0, 1.0, 12), np.zeros(num_rows - 12)],
  }


class RandomizedSvdAccuracyTest(chex.TestCase):
  """The randomized default against known singular values (issue 14)."""

  num_rows, num_params, k = 300, 900, 6

  def test_default_meets_1e3_on_flat_spectra_for_many_keys(self):
    # float32, as users run it; one compilation for every spectrum and key.
    fn = jax.jit(functools.partial(
        jac.jacobian_svd, _linear_features_apply, k=self.k,
        method='randomized'))
    old = jax.jit(functools.partial(
        jac.jacobian_svd, _linear_features_apply, k=self.k,
        method='subspace_iteration'))
    params = {'w': jnp.zeros(self.num_params, jnp.float32)}
    old_errors = []
    for name, s in _flat_spectra(self.k, self.num_rows).items():
      x, j = _spectrum_features(s, self.num_rows, self.num_params)
      x = jnp.asarray(x, jnp.float32)
      for seed in range(6):
        got = fn(params, x, key=jax.random.key(seed))
        _assert_finite(got)
        s_got = np.asarray(got.s, np.float64)
        rel = np.abs(s_got - s[:self.k]) / s[:self.k]
        self.assertLessEqual(rel.max(), 1e-3, f'{name}, key {seed}: {rel}')
        _assert_orthonormal_rows(got.vt, atol=1e-5)
        _assert_orthonormal_rows(got.u.T, atol=1e-5)
        # The residual field is ||J v_i - s_i u_i||, here computed in float64.
        vt, u = np.asarray(got.vt, np.float64), np.asarray(got.u, np.float64)
        true_residual = np.linalg.norm(j @ vt.T - u * s_got[None, :], axis=0)
        np.testing.assert_allclose(got.residual, true_residual, rtol=0.05,
                                   atol=2e-6 * s[0], err_msg=name)
        self.assertLess(np.max(true_residual / s_got), 1e-2, name)
      old_errors.append(np.max(np.abs(np.asarray(
          old(params, x, key=jax.random.key(0)).s) - s[:self.k]) /
                               s[:self.k]))
    # The spectra are hard: the previous default (subspace iteration with
    # oversampling 10 and 2 power iterations) misses 1e-3 on the flat ones.
    self.assertGreater(max(old_errors), 1e-2, old_errors)
    self.assertEqual(fn._cache_size(), 1)

  def test_stopping_rule_saves_products_and_meets_its_tolerance(self):
    s = _flat_spectra(self.k, self.num_rows)['power_law']
    x, j = _spectrum_features(s, self.num_rows, self.num_params)
    x = jnp.asarray(x, jnp.float32)
    params = {'w': jnp.zeros(self.num_params, jnp.float32)}
    outs = {}
    for tol in (0.0, 1e-3, 1e-2):
      outs[tol] = jax.jit(functools.partial(
          jac.jacobian_svd, _linear_features_apply, k=self.k,
          method='randomized', tol=tol))(params, x, key=jax.random.key(0))
    # tol = 0 builds all 4 k + 20 = 44 columns: 1 + 2 * 44 products (J^T Q
    # is kept, so U_k^T J costs none).
    self.assertEqual(int(outs[0.0].num_products), 1 + 2 * 44)
    for tol in (1e-3, 1e-2):
      out = outs[tol]
      self.assertLess(int(out.num_products), int(outs[0.0].num_products))
      vt, u = np.asarray(out.vt, np.float64), np.asarray(out.u, np.float64)
      s_got = np.asarray(out.s, np.float64)
      true_residual = np.linalg.norm(j @ vt.T - u * s_got[None, :], axis=0)
      # Tested on the Ritz pairs before the final SVD: allow 2x.
      self.assertLess(np.max(true_residual / s_got), 2 * tol)
    # Kato-Temple: error ~ residual^2 / relative gap (0.02 here), so the
    # default tol = 1e-3 meets 1e-3 with a wide margin; 1e-2 need not.
    rel = np.abs(np.asarray(outs[1e-3].s, np.float64) - s[:self.k]) / s[:self.k]
    self.assertLess(rel.max(), 1e-4)
    self.assertLessEqual(int(outs[1e-2].num_products),
                         int(outs[1e-3].num_products))

  def test_same_key_same_result_other_key_other_probes(self):
    fn = jax.jit(functools.partial(
        jac.jacobian_svd, _linear_features_apply, k=self.k,
        method='randomized'))
    s = _flat_spectra(self.k, self.num_rows)['power_law']
    x = jnp.asarray(_spectrum_features(s, self.num_rows, self.num_params)[0],
                    jnp.float32)
    params = {'w': jnp.zeros(self.num_params, jnp.float32)}
    got = fn(params, x, key=jax.random.key(3))
    chex.assert_trees_all_equal(fn(params, x, key=jax.random.key(3)), got)
    self.assertFalse(np.array_equal(
        fn(params, x, key=jax.random.key(4)).u, got.u))

  def test_unrolled_steps_equal_the_while_loop(self):
    s = _flat_spectra(self.k, self.num_rows)['power_law']
    x = jnp.asarray(_spectrum_features(s, self.num_rows, self.num_params)[0],
                    jnp.float32)
    params = {'w': jnp.zeros(self.num_params, jnp.float32)}
    outs = [jax.jit(functools.partial(
        jac.jacobian_svd, _linear_features_apply, k=self.k,
        method='randomized', unroll=unroll))(params, x,
                                             key=jax.random.key(2))
            for unroll in (True, False)]
    for a, b in zip(outs[0][:3], outs[1][:3]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * s[0])
    self.assertEqual(int(outs[0].num_products), int(outs[1].num_products))

  def test_auto_unroll_only_for_convolutions_without_tol(self):
    from metacf.jacobian import _krylov  # pylint: disable=g-import-not-at-top
    flat = jnp.ones(9, jnp.float32)
    conv = lambda w: jax.lax.conv_general_dilated(
        jnp.ones((2, 1, 5, 5)), w.reshape(1, 1, 3, 3), (1, 1), 'SAME')
    dense = lambda w: jnp.ones((2, 9)) @ w
    on_cpu = jax.default_backend() == 'cpu'
    self.assertEqual(_krylov.auto_unroll(conv, flat, 0.0), on_cpu)
    self.assertFalse(_krylov.auto_unroll(conv, flat, 1e-3))
    self.assertFalse(_krylov.auto_unroll(dense, flat, 0.0))

  @parameterized.named_parameters(('single_vectors', 1, None),
                                  ('blocks_of_4', 4, 72))
  def test_float64_block_sizes_converge(self, block_size, krylov_dim):
    with jax.enable_x64(True):
      s = _flat_spectra(self.k, self.num_rows)['clustered_tail']
      x, j = _spectrum_features(s, self.num_rows, self.num_params)
      params = {'w': jnp.zeros(self.num_params)}
      got = jac.jacobian_svd(_linear_features_apply, params, jnp.asarray(x),
                             self.k, method='randomized',
                             key=jax.random.key(0), block_size=block_size,
                             krylov_dim=krylov_dim)
      np.testing.assert_allclose(got.s, s[:self.k], rtol=1e-4)
      np.testing.assert_allclose(
          got.residual, np.linalg.norm(
              j @ np.asarray(got.vt).T - got.u * got.s[None, :], axis=0),
          rtol=1e-3, atol=1e-12)

  def test_krylov_space_capped_at_the_rank_bound_is_exact(self):
    # krylov_dim >= min(N * C, P) = 40: one block spans the row space.
    with jax.enable_x64(True):
      s = 0.99**np.arange(40)
      x, _ = _spectrum_features(s, 40, 60)
      params = {'w': jnp.zeros(60)}
      for krylov_dim in (40, 100):
        got = jac.jacobian_svd(_linear_features_apply, params, jnp.asarray(x),
                               8, method='randomized', key=jax.random.key(0),
                               krylov_dim=krylov_dim, block_size=3)
        np.testing.assert_allclose(got.s, s[:8], rtol=1e-12)


_SHARDED_SCRIPT = textwrap.dedent('''
    import functools, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from metacf import jacobian as jac
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(0)
    params = {"w0": jnp.asarray(rng.normal(size=(5, 16)) / 2, jnp.float32),
              "w1": jnp.asarray(rng.normal(size=(16, 3)) / 4, jnp.float32)}

    def apply_fn(p, x):  # Mixes examples: batch centring of the hidden layer.
      h = jnp.tanh(x @ p["w0"])
      return (h - h.mean(axis=0, keepdims=True)) @ p["w1"]

    x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    key = jax.random.key(0)
    for method in ("dense", "gram", "randomized"):
      outs = []
      for m in (None, mesh):
        fn = jax.jit(functools.partial(jac.jacobian_svd, apply_fn, k=4,
                                       method=method, mesh=m))
        outs.append(fn(params, x, key=key))
        again = fn(params, x + 0, key=key)
        assert fn._cache_size() == 1, (method, fn._cache_size())
        np.testing.assert_array_equal(again.s, outs[-1].s)
      one, sharded = outs
      np.testing.assert_allclose(sharded.s, one.s, rtol=1e-5, err_msg=method)
      np.testing.assert_allclose(sharded.vt, one.vt, atol=1e-4,
                                 err_msg=method)
      np.testing.assert_allclose(sharded.u, one.u, atol=1e-4, err_msg=method)
      if method == "randomized":
        hlo = fn.lower(params, x, key=key).compile().as_text()
        assert "all-reduce" in hlo, "no all-reduce in the sharded program"
        assert len(sharded.u.sharding.device_set) == 4, sharded.u.sharding
    for impl in ("ntk_vector_products", "jacobian_contraction"):
      one = jac.ntk(apply_fn, params, x, x[:8], implementation=impl)
      sharded = jax.jit(functools.partial(jac.ntk, apply_fn,
                                          implementation=impl, mesh=mesh))(
                                              params, x, x[:8])
      np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-6)
    try:
      jac.jacobian_svd(apply_fn, params, x[:6], 2, mesh=mesh)
    except ValueError as e:
      assert "must be divisible by the mesh size 4, got 6" in str(e), e
    else:
      raise AssertionError("no error for 6 examples on 4 devices")
    print("SHARDED_OK")
    ''')


class ShardedTest(absltest.TestCase):

  def test_sharded_equals_one_device_on_4_cpu_devices(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], cwd=root,
                            capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('SHARDED_OK', result.stdout)


# ---------------------------------------------------------------------------


def _svd(vt, s=None):
  vt = jnp.asarray(vt)
  s = jnp.ones(vt.shape[0], vt.dtype) if s is None else jnp.asarray(s)
  return jac.JacobianSVD(s=s, vt=vt, u=jnp.zeros((1, vt.shape[0]), vt.dtype))


class SubspaceOverlapTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))  # Orthogonal.
    va, _ = np.linalg.qr(rng.normal(size=(12, 3)))
    vb, _ = np.linalg.qr(rng.normal(size=(12, 4)))
    self.va, self.vb = va.T, vb.T
    self.sa = np.array([3.0, 2.0, 0.5])
    self.sb = np.array([4.0, 1.0, 0.7, 0.1])

  def test_same_subspace_is_one(self):
    with jax.enable_x64(True):
      a = _svd(self.va, self.sa)
      # Same span, rotated basis: still one (unweighted measures).
      rotated = _svd(np.linalg.qr(np.random.default_rng(1).normal(
          size=(3, 3)))[0] @ self.va)
      for b in (a, rotated):
        np.testing.assert_allclose(jac.subspace_overlap(a, b), 1.0,
                                   rtol=1e-12)
        np.testing.assert_allclose(jac.principal_angle_cosines(a, b),
                                   np.ones(3), rtol=1e-12)
      np.testing.assert_allclose(jac.weighted_subspace_overlap(a, a), 1.0,
                                 rtol=1e-12)

  def test_orthogonal_subspaces_are_zero(self):
    with jax.enable_x64(True):
      a = _svd(self.basis[:3], self.sa)
      b = _svd(self.basis[3:7], self.sb)
      np.testing.assert_allclose(jac.subspace_overlap(a, b), 0.0, atol=1e-14)
      np.testing.assert_allclose(jac.weighted_subspace_overlap(a, b), 0.0,
                                 atol=1e-14)
      np.testing.assert_allclose(jac.principal_angle_cosines(a, b),
                                 np.zeros(3), atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_subspaces_match_numpy_and_are_symmetric(self):
    with jax.enable_x64(True):
      a, b = _svd(self.va, self.sa), _svd(self.vb, self.sb)
      overlap = self.variant(jac.subspace_overlap, static_argnums=2)
      weighted = self.variant(jac.weighted_subspace_overlap, static_argnums=2)
      cosines = self.variant(jac.principal_angle_cosines, static_argnums=2)
      for k in (None, 2):
        kk = 3 if k is None else k
        m = self.va[:kk] @ self.vb[:kk].T
        want_overlap = np.sum(m**2) / kk
        wa, wb = self.sa[:kk]**2, self.sb[:kk]**2
        want_weighted = (wa @ (m**2) @ wb) / (np.linalg.norm(wa)
                                              * np.linalg.norm(wb))
        want_cosines = np.linalg.svd(m, compute_uv=False)
        for first, second in ((a, b), (b, a)):
          np.testing.assert_allclose(overlap(first, second, k), want_overlap,
                                     rtol=1e-12)
          np.testing.assert_allclose(weighted(first, second, k),
                                     want_weighted, rtol=1e-12)
          np.testing.assert_allclose(cosines(first, second, k), want_cosines,
                                     rtol=1e-12)
        self.assertTrue(0.0 < want_overlap < 1.0)

  def test_on_jacobian_svds(self):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      x_a = _data(1, 5)
      svd_fn = _jitted(jac.jacobian_svd, _mlp_apply, k=3, method='dense')
      svd_a = svd_fn(params, x_a, key=jax.random.key(3))
      svd_b = svd_fn(params, x_a + 0.5, key=jax.random.key(3))
      overlap = jac.subspace_overlap(svd_a, svd_b)
      _assert_finite(overlap)
      self.assertTrue(0.0 < float(overlap) < 1.0)
      np.testing.assert_allclose(jac.subspace_overlap(svd_a, svd_a), 1.0,
                                 rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_inputs_propagate(self):
    with jax.enable_x64(True):
      overlap = self.variant(jac.subspace_overlap)
      weighted = self.variant(jac.weighted_subspace_overlap)
      cosines = self.variant(jac.principal_angle_cosines)
      b = _svd(self.vb, self.sb)
      va_nan = self.va.copy()
      va_nan[1, 4] = np.nan
      nan_vt = _svd(va_nan, self.sa)
      for a in (nan_vt, _svd(self.va, np.full(3, np.nan)),
                _svd(self.va, self.sa * np.array([1.0, np.nan, 1.0]))):
        for first, second in ((a, b), (b, a)):
          self.assertTrue(np.isnan(weighted(first, second)))
      for first, second in ((nan_vt, b), (b, nan_vt)):
        self.assertTrue(np.isnan(overlap(first, second)))
        self.assertTrue(np.isnan(cosines(first, second)).any())
      # A genuinely all-zero spectrum gives exactly 0, unless the other has
      # a NaN.
      zero = _svd(self.va, np.zeros(3))
      self.assertEqual(float(weighted(zero, b)), 0.0)
      self.assertEqual(float(weighted(b, zero)), 0.0)
      self.assertEqual(float(weighted(zero, zero)), 0.0)
      nan_b = _svd(self.vb, self.sb * np.array([np.nan, 1.0, 1.0, 1.0]))
      self.assertTrue(np.isnan(weighted(zero, nan_b)))

  def test_bad_inputs(self):
    a, b = _svd(self.va, self.sa), _svd(self.vb, self.sb)
    for k in (1.0, True):
      with self.assertRaisesRegex(
          TypeError, 'subspace_overlap: k must be a Python int or None, got '
          rf'{k!r}\.'):
        jac.subspace_overlap(a, b, k)
    for k in (0, 4):
      with self.assertRaisesRegex(
          ValueError, r'subspace_overlap: k must satisfy 1 <= k <= min\(rank '
          rf'of svd_a, rank of svd_b\) = min\(3, 4\) = 3, got {k}\.'):
        jac.subspace_overlap(a, b, k)
    with self.assertRaisesRegex(
        ValueError, r'weighted_subspace_overlap: svd_a.vt and svd_b.vt must '
        r'have the same number of columns \(parameters P\), got 12 and 5'):
      jac.weighted_subspace_overlap(a, _svd(np.eye(5)[:2]))
    with self.assertRaisesRegex(TypeError, 'principal_angle_cosines: svd_b '
                                'must be a JacobianSVD'):
      jac.principal_angle_cosines(a, self.vb)


# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gd_reference(apply_fn, loss, num_steps):
  """Real full-batch GD on task B, optionally projected: theta -= lr P grad.

  Returns ``run(params, task_a, task_b, lr, projector)`` giving
  ``L_A(theta_t) - L_A(theta_0)`` for ``t = 0 .. num_steps``.
  """
  loss_fn = _LOSS_FNS[loss]

  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def run(params, task_a, task_b, lr, projector):
    flat, unravel = ravel_pytree(params)
    loss_a = lambda t: loss_fn(apply_fn(unravel(t), task_a[0]), task_a[1])
    grad_b = jax.grad(
        lambda t: loss_fn(apply_fn(unravel(t), task_b[0]), task_b[1]))
    before = loss_a(flat)

    def step(t, _):
      t = t - lr * (projector @ grad_b(t))
      return t, loss_a(t) - before

    _, changes = jax.lax.scan(step, flat, None, length=num_steps)
    return jnp.concatenate([jnp.zeros([1], flat.dtype), changes])

  return run


def _tasks(loss, seed, n_a=6, n_b=5, num_classes=3):
  rng = np.random.default_rng(seed)
  x_a, x_b = _data(seed + 100, n_a), _data(seed + 200, n_b)
  if loss == 'mse':
    y_a = jnp.asarray(rng.normal(size=(n_a, num_classes)))
    y_b = jnp.asarray(rng.normal(size=(n_b, num_classes)))
  else:
    y_a = jnp.asarray(rng.integers(0, num_classes, n_a), jnp.int32)
    y_b = jnp.asarray(rng.integers(0, num_classes, n_b), jnp.int32)
  return (x_a, y_a), (x_b, y_b)


class PredictedForgettingTest(chex.TestCase):

  @parameterized.named_parameters(('mse', 'mse'),
                                  ('cross_entropy', 'cross_entropy'))
  def test_exact_for_model_linear_in_params(self, loss):
    with jax.enable_x64(True):
      params = {'w': jnp.asarray(
          0.3 * np.random.default_rng(0).normal(size=(8, 3))),
                'b': jnp.zeros(3, jnp.float64)}
      task_a, task_b = _tasks(loss, 1)
      want = _gd_reference(_random_features_apply, loss, 6)(
          params, task_a, task_b, 0.4, jnp.eye(27))
      self.assertGreater(np.max(np.abs(want)), 1e-2)  # Not a trivial case.
      for num_steps in (0, 1, 6):
        got = _jitted(jac.predicted_forgetting, _random_features_apply,
                      num_steps=num_steps, loss=loss)(params, task_a, task_b,
                                                      lr=0.4)
        _assert_finite(got)
        np.testing.assert_allclose(got, want[num_steps], rtol=1e-6,
                                   atol=1e-10, err_msg=f'{num_steps} steps')
        if num_steps == 0:
          self.assertEqual(float(got), 0.0)

  def test_close_to_training_for_small_lr_on_mlp(self):
    loss = 'mse'
    with jax.enable_x64(True):
      params = _mlp_init(0, sizes=(3, 6, 3))
      task_a, task_b = _tasks(loss, 1)
      want = _gd_reference(_mlp_apply, loss, 3)(params, task_a, task_b, 0.02,
                                                jnp.eye(45))[-1]
      got = _jitted(jac.predicted_forgetting, _mlp_apply, num_steps=3,
                    loss=loss)(params, task_a, task_b, lr=0.02)
      _assert_finite(got)
      self.assertGreater(abs(float(want)), 1e-4)
      np.testing.assert_allclose(got, want, rtol=2e-2)

  def test_jit_and_eager_agree(self):
    # A one-matmul model: eager dispatch compiles every op, keep it small.
    with jax.enable_x64(True):
      params = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)))}
      task_a, task_b = _tasks('mse', 1)
      eager = jac.predicted_forgetting(_linear_apply, params, task_a, task_b,
                                       lr=0.1, num_steps=3)
      jitted = _jitted(jac.predicted_forgetting, _linear_apply, num_steps=3,
                       loss='mse')(params, task_a, task_b, lr=0.1)
      _assert_finite(eager)
      np.testing.assert_allclose(eager, jitted, rtol=1e-12)

  def test_traced_lr_compiles_once(self):
    with jax.enable_x64(True):
      params = _mlp_init(0, sizes=(3, 6, 3))
      task_a, task_b = _tasks('cross_entropy', 1)
      forgetting = _jitted(jac.predicted_forgetting, _mlp_apply, num_steps=3,
                           loss='cross_entropy')
      outs = [forgetting(params, task_a, task_b, lr=lr) for lr in (0.02, 0.2)]
      _assert_finite(outs)
      self.assertNotEqual(float(outs[0]), float(outs[1]))
      self.assertEqual(forgetting._cache_size(), 1)

  def test_low_rank_full_rank_equals_full(self):
    # MSE at full rank is checked in test_low_rank_error_shrinks_with_k_*.
    loss = 'cross_entropy'
    with jax.enable_x64(True):
      params = _mlp_init(0, sizes=(3, 6, 3))
      task_a, task_b = _tasks(loss, 1)
      full = _jitted(jac.predicted_forgetting, _mlp_apply, num_steps=3,
                     loss=loss)(params, task_a, task_b, lr=0.3)
      low = _jitted(jac.predicted_forgetting_low_rank, _mlp_apply, k=15,
                    num_steps=3, loss=loss, method='gram')(
                        params, task_a, task_b, lr=0.3)
      _assert_finite(full, low)
      self.assertGreater(abs(float(full)), 1e-3)
      np.testing.assert_allclose(low, full, rtol=1e-8)

  def test_low_rank_is_exact_projected_gd_for_linear_model(self):
    loss = 'cross_entropy'
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      n_a, n_b, c, p = 5, 4, 3, 16
      x_a = jnp.asarray(rng.normal(size=(n_a, c, p)))
      x_b = jnp.asarray(rng.normal(size=(n_b, c, p)))
      if loss == 'mse':
        y_a = jnp.asarray(rng.normal(size=(n_a, c)))
        y_b = jnp.asarray(rng.normal(size=(n_b, c)))
      else:
        y_a = jnp.asarray(rng.integers(0, c, n_a), jnp.int32)
        y_b = jnp.asarray(rng.integers(0, c, n_b), jnp.int32)
      params = _feature_params(p)
      vt = np.linalg.svd(np.asarray(x_b).reshape(n_b * c, p))[2][:3]
      want = _gd_reference(_feature_apply, loss, 4)(
          params, (x_a, y_a), (x_b, y_b), 0.2, jnp.asarray(vt.T @ vt))[-1]
      got = _jitted(jac.predicted_forgetting_low_rank, _feature_apply, k=3,
                    num_steps=4, loss=loss, method='dense')(
                        params, (x_a, y_a), (x_b, y_b), lr=0.2)
      _assert_finite(got)
      self.assertGreater(abs(float(want)), 1e-3)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-10)

  def test_low_rank_error_shrinks_with_k_on_own_task(self):
    # With A = B and MSE the rank-k error is
    # sum_{i>k} (1 - (1 - lr s_i^2 / N)^(2t)) (u_i . r_0)^2 / (2N) >= 0, which
    # is non-increasing in k while lr s_1^2 / N <= 2. (For A != B the error
    # need not be monotone.)
    with jax.enable_x64(True):
      params = _mlp_init(0)
      task, _ = _tasks('mse', 1, n_a=3, num_classes=2)
      full = float(_jitted(jac.predicted_forgetting, _mlp_apply, num_steps=3,
                           loss='mse')(params, task, task, lr=0.3))
      errors = [abs(float(_jitted(
          jac.predicted_forgetting_low_rank, _mlp_apply, k=k, num_steps=3,
          loss='mse', method='dense')(params, task, task, lr=0.3)) - full)
                for k in (1, 3, 6)]
      self.assertTrue(np.all(np.diff(errors) <= 1e-12), errors)
      self.assertGreater(errors[0], 1e-4)
      self.assertLess(errors[-1], 1e-12)

  def test_randomized_low_rank_is_deterministic(self):
    with jax.enable_x64(True):
      params = _mlp_init(0)
      task, _ = _tasks('mse', 1, n_a=3, num_classes=2)
      fn = _jitted(jac.predicted_forgetting_low_rank, _mlp_apply, k=3,
                   num_steps=3, loss='mse', method='randomized')
      got = fn(params, task, task, lr=0.3, key=jax.random.key(0))
      _assert_finite(got)
      np.testing.assert_array_equal(
          fn(params, task, task, lr=0.3, key=jax.random.key(0)), got)
      dense = _jitted(jac.predicted_forgetting_low_rank, _mlp_apply, k=3,
                      num_steps=3, loss='mse', method='dense')(
                          params, task, task, lr=0.3)
      np.testing.assert_allclose(got, dense, rtol=1e-8)

  def test_nan_inputs_propagate(self):
    with jax.enable_x64(True):
      params = _mlp_init(0, sizes=(3, 6, 3))
      task_a, task_b = _tasks('mse', 1)
      bad_b = (task_b[0].at[0, 0].set(jnp.nan), task_b[1])
      bad_a = (task_a[0], task_a[1].at[1, 2].set(jnp.nan))
      full = _jitted(jac.predicted_forgetting, _mlp_apply, num_steps=3,
                     loss='mse')
      for a, b in ((task_a, bad_b), (bad_a, task_b)):
        self.assertTrue(np.isnan(full(params, a, b, lr=0.02)))
      # With no step on B only task A enters the result.
      self.assertTrue(np.isnan(jac.predicted_forgetting(
          _mlp_apply, params, bad_a, task_b, lr=0.1, num_steps=0)))
      ce_a, ce_b = _tasks('cross_entropy', 1)
      ce_bad_b = (ce_b[0].at[0, 0].set(jnp.nan), ce_b[1])
      self.assertTrue(np.isnan(_jitted(
          jac.predicted_forgetting_low_rank, _mlp_apply, k=15, num_steps=3,
          loss='cross_entropy', method='gram')(params, ce_a, ce_bad_b,
                                               lr=0.3)))

  def test_bad_inputs(self):
    params = _mlp_init(0, sizes=(3, 6, 3), dtype=jnp.float32)
    x, y = jnp.zeros((4, 3)), jnp.zeros((4, 3))
    labels = jnp.zeros(4, jnp.int32)
    call = functools.partial(jac.predicted_forgetting, _mlp_apply, params)
    with self.assertRaisesRegex(ValueError, "predicted_forgetting: loss must "
                                "be one of 'mse', 'cross_entropy', got "
                                "'hinge'"):
      call((x, y), (x, y), lr=0.1, num_steps=1, loss='hinge')
    for lr in (0.0, -1.0):
      with self.assertRaisesRegex(ValueError,
                                  'predicted_forgetting: lr must be > 0'):
        call((x, y), (x, y), lr=lr, num_steps=1)
    with self.assertRaisesRegex(ValueError, r'predicted_forgetting: lr must '
                                r'be a scalar, got shape \(2,\)'):
      call((x, y), (x, y), lr=jnp.ones(2), num_steps=1)
    with self.assertRaisesRegex(ValueError, 'predicted_forgetting: num_steps '
                                'must be >= 0, got -1'):
      call((x, y), (x, y), lr=0.1, num_steps=-1)
    with self.assertRaisesRegex(TypeError, 'predicted_forgetting: num_steps '
                                'must be a Python int'):
      call((x, y), (x, y), lr=0.1, num_steps=2.0)
    with self.assertRaisesRegex(ValueError, 'predicted_forgetting: num_steps '
                                'must be >= 0, got -2'):  # NumPy ints pass.
      call((x, y), (x, y), lr=0.1, num_steps=np.int64(-2))
    with self.assertRaisesRegex(
        ValueError, r"predicted_forgetting: task_b targets y must have the "
        r"outputs' shape \[N, C\] = \(4, 3\) for loss='mse', got \(4,\)"):
      call((x, y), (x, labels.astype(jnp.float32)), lr=0.1, num_steps=1)
    with self.assertRaisesRegex(
        ValueError, r"predicted_forgetting: task_a labels y must have shape "
        r"\[N\] = \(4,\) for loss='cross_entropy', got \(4, 3\)"):
      call((x, y), (x, labels), lr=0.1, num_steps=1, loss='cross_entropy')
    with self.assertRaisesRegex(TypeError, 'task_a labels y must have an '
                                'integer dtype'):
      call((x, labels.astype(jnp.float32)), (x, labels), lr=0.1, num_steps=1,
           loss='cross_entropy')
    with self.assertRaisesRegex(ValueError, r'task_b labels y must be in '
                                r'\[0, 3\), got values in \[0, 3\]'):
      call((x, labels), (x, labels.at[0].set(3)), lr=0.1, num_steps=1,
           loss='cross_entropy')
    with self.assertRaisesRegex(TypeError, 'predicted_forgetting: task_a must '
                                r'be a pair \(x, y\)'):
      call(x, (x, y), lr=0.1, num_steps=1)
    for k in (0, 13):
      with self.assertRaisesRegex(
          ValueError, r'predicted_forgetting_low_rank: k must satisfy 1 <= k '
          rf'<= min\(N \* C, P\) = min\(12, 45\) = 12, got {k}\.'):
        jac.predicted_forgetting_low_rank(_mlp_apply, params, (x, y), (x, y),
                                          k=k, lr=0.1, num_steps=1)
    # Checked (and named) even when num_steps=0 skips the SVD.
    for steps in (0, 1):
      with self.assertRaisesRegex(
          ValueError, 'predicted_forgetting_low_rank: method must be one of'):
        jac.predicted_forgetting_low_rank(_mlp_apply, params, (x, y), (x, y),
                                          k=2, lr=0.1, num_steps=steps,
                                          method='svd')
      with self.assertRaisesRegex(
          ValueError, 'predicted_forgetting_low_rank: key must be a '
          'jax.random key'):
        jac.predicted_forgetting_low_rank(_mlp_apply, params, (x, y), (x, y),
                                          k=2, lr=0.1, num_steps=steps,
                                          method='randomized')
