"""predicted_forgetting(..., protect_basis=V) against projected training.

The reference is real gradient descent on task B whose gradients go through
``metacf.protect.orthogonal_projection(V)`` (chained with ``optax.sgd``), in
float64: for a model linear in its parameters the prediction is exact.
"""

import functools

from absl.testing import parameterized
import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from metacf import jacobian as jac
from metacf import protect

_FEATURES = np.random.default_rng(7).normal(size=(3, 8))
_NUM_CLASSES = 3
_NUM_PARAMS = 8 * _NUM_CLASSES + _NUM_CLASSES


def _add_bias(z, b):
  return z + jnp.reshape(b, (1,) * (jnp.ndim(z) - 1) + jnp.shape(b))


def _features_apply(params, x):
  """Fixed tanh features, trainable affine head: linear in its params."""
  phi = jnp.tanh(x @ jnp.asarray(_FEATURES, x.dtype))
  return _add_bias(phi @ params['w'], params['b'])


def _mlp_apply(params, x):
  h = jnp.tanh(_add_bias(x @ params['w0'], params['b0']))
  return _add_bias(h @ params['w1'], params['b1'])


def _features_params():
  rng = np.random.default_rng(0)
  return {'w': jnp.asarray(0.3 * rng.normal(size=(8, _NUM_CLASSES))),
          'b': jnp.zeros(_NUM_CLASSES, jnp.float64)}


def _mlp_params():
  rng = np.random.default_rng(1)
  return {'w0': jnp.asarray(rng.normal(size=(3, 6)) / np.sqrt(3)),
          'b0': jnp.asarray(0.1 * rng.normal(size=6)),
          'w1': jnp.asarray(rng.normal(size=(6, _NUM_CLASSES)) / np.sqrt(6)),
          'b1': jnp.asarray(0.1 * rng.normal(size=_NUM_CLASSES))}


def _tasks(loss, seed=1, n_a=6, n_b=5):
  rng = np.random.default_rng(seed)
  x_a = jnp.asarray(rng.normal(size=(n_a, 3)))
  x_b = jnp.asarray(rng.normal(size=(n_b, 3)))
  if loss == 'mse':
    y_a = jnp.asarray(rng.normal(size=(n_a, _NUM_CLASSES)))
    y_b = jnp.asarray(rng.normal(size=(n_b, _NUM_CLASSES)))
  else:
    y_a = jnp.asarray(rng.integers(0, _NUM_CLASSES, n_a), jnp.int32)
    y_b = jnp.asarray(rng.integers(0, _NUM_CLASSES, n_b), jnp.int32)
  return (x_a, y_a), (x_b, y_b)


def _loss(loss, f, y):
  if loss == 'mse':
    return 0.5 * jnp.mean(jnp.sum((f - y)**2, axis=1))
  return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(f, y))


def _random_basis(seed, k, p=_NUM_PARAMS):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, k)))
  return jnp.asarray(q.T)


def _span_basis(apply_fn, params, x):
  """Orthonormal rows spanning the rows of the Jacobian of f(x) (float64)."""
  flat, unravel = ravel_pytree(params)
  j = np.asarray(jax.jacrev(
      lambda t: apply_fn(unravel(t), x).reshape(-1))(flat))
  u, s, vt = np.linalg.svd(j, full_matrices=False)
  return jnp.asarray(vt[s > 1e-10 * s[0]])


@functools.lru_cache(maxsize=None)
def _projected_gd(apply_fn, loss, num_steps):
  """L_A change after GD on B through orthogonal_projection(V) + sgd(lr)."""

  @jax.jit
  def run(params, task_a, task_b, lr, basis):
    tx = optax.chain(protect.orthogonal_projection(basis), optax.sgd(lr))
    loss_a = lambda p: _loss(loss, apply_fn(p, task_a[0]), task_a[1])
    loss_b = lambda p: _loss(loss, apply_fn(p, task_b[0]), task_b[1])

    def step(carry, _):
      p, state = carry
      updates, state = tx.update(jax.grad(loss_b)(p), state, p)
      return (optax.apply_updates(p, updates), state), None

    (final, _), _ = jax.lax.scan(step, (params, tx.init(params)), None,
                                 length=num_steps)
    return loss_a(final) - loss_a(params)

  return run


@functools.lru_cache(maxsize=None)
def _predicted(apply_fn, loss, num_steps):
  return jax.jit(functools.partial(jac.predicted_forgetting, apply_fn,
                                   loss=loss, num_steps=num_steps))


class ProtectedForgettingTest(chex.TestCase):

  @parameterized.product(loss=('mse', 'cross_entropy'), k=(1, 5, 12))
  def test_exact_for_model_linear_in_params(self, loss, k):
    with jax.enable_x64(True):
      params = _features_params()
      task_a, task_b = _tasks(loss)
      basis = _random_basis(k, k)
      want = _projected_gd(_features_apply, loss, 6)(params, task_a, task_b,
                                                     0.4, basis)
      self.assertGreater(abs(float(want)), 1e-3)  # Not a trivial case.
      got = _predicted(_features_apply, loss, 6)(params, task_a, task_b,
                                                 lr=0.4, protect_basis=basis)
      chex.assert_tree_all_finite(got)
      np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)
      plain = _predicted(_features_apply, loss, 6)(params, task_a, task_b,
                                                   lr=0.4)
      self.assertGreater(abs(float(plain - got)), 1e-6)  # The basis acts.

  @parameterized.named_parameters(('mse', 'mse'),
                                  ('cross_entropy', 'cross_entropy'))
  def test_basis_spanning_task_a_predicts_no_forgetting(self, loss):
    with jax.enable_x64(True):
      params = _features_params()
      task_a, task_b = _tasks(loss)
      basis = _span_basis(_features_apply, params, task_a[0])
      self.assertLess(basis.shape[0], _NUM_PARAMS)  # B can still train.
      got = _predicted(_features_apply, loss, 6)(params, task_a, task_b,
                                                 lr=0.4, protect_basis=basis)
      measured = _projected_gd(_features_apply, loss, 6)(params, task_a,
                                                         task_b, 0.4, basis)
      np.testing.assert_allclose(got, 0.0, atol=1e-12)
      np.testing.assert_allclose(measured, 0.0, atol=1e-12)
      plain = _predicted(_features_apply, loss, 6)(params, task_a, task_b,
                                                   lr=0.4)
      self.assertGreater(abs(float(plain)), 1e-2)

  def test_close_to_projected_training_on_mlp(self):
    with jax.enable_x64(True):
      params = _mlp_params()
      task_a, task_b = _tasks('mse')
      num_params = ravel_pytree(params)[0].size
      basis = _random_basis(3, 10, num_params)
      want = _projected_gd(_mlp_apply, 'mse', 3)(params, task_a, task_b, 0.02,
                                                 basis)
      got = _predicted(_mlp_apply, 'mse', 3)(params, task_a, task_b, lr=0.02,
                                             protect_basis=basis)
      self.assertGreater(abs(float(want)), 1e-4)
      np.testing.assert_allclose(got, want, rtol=2e-2)

  def test_empty_and_zero_bases_equal_no_basis(self):
    with jax.enable_x64(True):
      params = _features_params()
      task_a, task_b = _tasks('mse')
      fn = functools.partial(jac.predicted_forgetting, _features_apply,
                             params, task_a, task_b, lr=0.4, num_steps=3)
      plain = fn()
      for basis in (jnp.zeros((0, _NUM_PARAMS)), jnp.zeros((4, _NUM_PARAMS))):
        np.testing.assert_allclose(fn(protect_basis=basis), plain,
                                   rtol=1e-12)

  def test_traced_basis_compiles_once(self):
    with jax.enable_x64(True):
      params = _features_params()
      task_a, task_b = _tasks('cross_entropy')

      @jax.jit
      @chex.assert_max_traces(n=1)
      def predict(basis):
        return jac.predicted_forgetting(_features_apply, params, task_a,
                                        task_b, lr=0.4, num_steps=4,
                                        loss='cross_entropy',
                                        protect_basis=basis)

      for seed in range(3):
        basis = _random_basis(seed, 5)
        want = _projected_gd(_features_apply, 'cross_entropy', 4)(
            params, task_a, task_b, 0.4, basis)
        np.testing.assert_allclose(predict(basis), want, rtol=1e-7)
      self.assertEqual(predict._cache_size(), 1)

  def test_chunked_equals_unchunked(self):
    with jax.enable_x64(True):
      params = _features_params()
      task_a, task_b = _tasks('mse')
      basis = _random_basis(4, 6)
      fn = functools.partial(jac.predicted_forgetting, _features_apply,
                             params, task_a, task_b, lr=0.4, num_steps=3,
                             protect_basis=basis)
      np.testing.assert_allclose(fn(chunk_size=2), fn(), rtol=1e-12)

  def test_bad_basis(self):
    with jax.enable_x64(True):
      params, (task_a, task_b) = _features_params(), _tasks('mse')
    params, task_a, task_b = jax.tree.map(
        lambda x: np.asarray(x, np.float32 if x.dtype == np.float64
                             else np.int32), (params, task_a, task_b))
    call = functools.partial(jac.predicted_forgetting, _features_apply, params,
                             task_a, task_b, lr=0.1, num_steps=2)
    basis = np.asarray(_random_basis(0, 3), np.float32)
    with self.assertRaisesRegex(
        ValueError, r'predicted_forgetting: protect_basis must have one '
        r'column per parameter, P = 27, got shape \(3, 26\)'):
      call(protect_basis=basis[:, :-1])
    with self.assertRaisesRegex(
        ValueError, r'predicted_forgetting: protect_basis must have shape '
        r'\[k, P\]'):
      call(protect_basis=basis[0])
    with self.assertRaisesRegex(
        ValueError, r'predicted_forgetting: protect_basis must have '
        r'orthonormal rows'):
      call(protect_basis=2.0 * basis)
    with self.assertRaisesRegex(
        TypeError, r'predicted_forgetting: protect_basis must be floating'):
      call(protect_basis=np.ones((2, _NUM_PARAMS), np.int32))
    nan_basis = basis.copy()
    nan_basis[0, 0] = np.nan
    with self.assertRaisesRegex(
        ValueError, r'predicted_forgetting: protect_basis must have '
        r'orthonormal rows'):
      call(protect_basis=nan_basis)
