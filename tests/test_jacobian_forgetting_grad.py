"""Gradients of the forgetting predictions with respect to ``params``.

``predicted_forgetting`` and ``predicted_forgetting_low_rank`` promise a
``jax.grad`` with respect to ``params`` (issue 28: a forgetting-aware
meta-objective trains through them). The reference is central finite
differences of the same function in float64, on every parameter.
"""

import functools

from absl.testing import parameterized
import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from metacf import jacobian as jac


def _apply(p, x):
  return jnp.tanh(x @ p['w1'] + p['b1'][None, :]) @ p['w2']


def _problem(dtype=jnp.float64):
  k = jax.random.split(jax.random.key(0), 6)
  params = {'w1': jax.random.normal(k[0], (4, 6), dtype) / 2,
            'b1': jnp.full((6,), 0.1, dtype),
            'w2': jax.random.normal(k[1], (6, 3), dtype) / 2}
  x_a = jax.random.normal(k[2], (5, 4), dtype)
  x_b = jax.random.normal(k[3], (5, 4), dtype)
  y_a = jax.random.randint(k[4], (5,), 0, 3, jnp.int32)
  y_b = jax.random.randint(k[5], (5,), 0, 3, jnp.int32)
  return params, (x_a, y_a), (x_b, y_b)


def _finite_differences(f, params, eps=1e-6):
  flat, unravel = ravel_pytree(params)
  f_flat = jax.jit(lambda v: f(unravel(v)))
  eye = np.eye(flat.size)
  return np.array([(f_flat(flat + eps * e) - f_flat(flat - eps * e)) /
                   (2 * eps) for e in eye])


def _prediction(kind, params, task_a, task_b, protect=None):
  x_a, y_a = task_a
  x_b, y_b = task_b
  common = dict(lr=0.5, num_steps=10)
  if kind == 'mse':
    return jac.predicted_forgetting(
        _apply, params, (x_a, jax.nn.one_hot(y_a, 3, dtype=x_a.dtype)),
        (x_b, jax.nn.one_hot(y_b, 3, dtype=x_b.dtype)), **common)
  if kind == 'cross_entropy':
    return jac.predicted_forgetting(_apply, params, task_a, task_b,
                                    loss='cross_entropy', **common)
  if kind == 'protected':
    return jac.predicted_forgetting(_apply, params, task_a, task_b,
                                    loss='cross_entropy',
                                    protect_basis=protect, **common)
  return jac.predicted_forgetting_low_rank(
      _apply, params, task_a, task_b, k=6, loss='cross_entropy',
      method=kind, key=jax.random.key(1), **common)


class PredictedForgettingGradTest(chex.TestCase):

  @parameterized.named_parameters(
      ('mse', 'mse'), ('cross_entropy', 'cross_entropy'),
      ('protect_basis', 'protected'), ('low_rank_dense', 'dense'),
      ('low_rank_gram', 'gram'),
      ('low_rank_subspace_iteration', 'subspace_iteration'))
  def test_grad_matches_finite_differences_float64(self, kind):
    with jax.enable_x64(True):
      params, task_a, task_b = _problem()
      # protect_basis: A's top-4 Jacobian directions, held fixed.
      protect = jac.jacobian_svd(_apply, params, task_a[0], 4,
                                 method='gram').vt
      f = functools.partial(_prediction, kind, task_a=task_a, task_b=task_b,
                            protect=protect)
      grads = jax.jit(jax.grad(f))(params)
      got = np.asarray(ravel_pytree(grads)[0])
      want = _finite_differences(f, params)
      self.assertTrue(np.all(np.isfinite(got)))
      self.assertGreater(np.abs(want).max(), 1e-2)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7,
                                 equal_nan=False)
      # jit and non-jit agree.
      np.testing.assert_allclose(
          np.asarray(ravel_pytree(jax.grad(f)(params))[0]), got, rtol=1e-9,
          atol=1e-12)

  def test_protected_gradient_differs_from_plain(self):
    # The basis changes the prediction and so its gradient.
    with jax.enable_x64(True):
      params, task_a, task_b = _problem()
      protect = jac.jacobian_svd(_apply, params, task_a[0], 4,
                                 method='gram').vt
      plain = jax.grad(functools.partial(
          _prediction, 'cross_entropy', task_a=task_a, task_b=task_b))(params)
      protected = jax.grad(functools.partial(
          _prediction, 'protected', task_a=task_a, task_b=task_b,
          protect=protect))(params)
      diff = ravel_pytree(plain)[0] - ravel_pytree(protected)[0]
      self.assertGreater(float(jnp.abs(diff).max()), 1e-3)

  def test_gradient_step_lowers_the_prediction(self):
    # What a forgetting-aware objective relies on: a small step against the
    # gradient lowers the predicted forgetting.
    params, task_a, task_b = _problem(jnp.float32)
    f = jax.jit(functools.partial(_prediction, 'cross_entropy',
                                  task_a=task_a, task_b=task_b))
    grads = jax.grad(f)(params)
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    self.assertLess(float(f(stepped)), float(f(params)))

  def test_randomized_method_raises_under_grad_naming_method(self):
    params, task_a, task_b = _problem(jnp.float32)
    f = functools.partial(_prediction, 'randomized', task_a=task_a,
                          task_b=task_b)
    value = f(params)      # The value itself is fine.
    self.assertTrue(np.isfinite(float(value)))
    with self.assertRaisesRegex(ValueError, "method='randomized'"):
      jax.grad(f)(params)
