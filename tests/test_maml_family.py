"""Tests for Reptile, iMAML, prototypical networks and MAML++ (metacf.maml).

References are independent of the code under test: Python loops over tasks
and inner steps, float64 NumPy formulas (the closed-form inner solution of
linear regression and its exact derivative, a NumPy conjugate-gradient loop
on a dense Hessian), and finite differences.
"""

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf import maml
# The tanh MLP and sinusoid tasks of the MAML tests.
from test_maml import _mlp_init  # pylint: disable=g-bad-import-order
from test_maml import _mse
from test_maml import _tasks

_optax_promotion = lambda: jax.numpy_dtype_promotion('standard')


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), equal_nan=False, **kw), a, b)


def _sgd_loop(loss_fn, params, x, y, lr, steps):
  """Hand-written inner SGD: a Python loop, no scan, no vmap."""
  p = params
  for _ in range(steps):
    g = jax.grad(loss_fn)(p, x, y)
    p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
  return p


def _assert_finite(test, tree):
  for leaf in jax.tree.leaves(tree):
    test.assertTrue(bool(np.all(np.isfinite(np.asarray(leaf)))))


# ---------------------------------------------------------------------------
# Reptile.


class ReptileGradTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_python_loop_over_tasks(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1), num_tasks=4)
    got = self.variant(lambda p, t: maml.reptile_grad(
        _mse, p, t, inner_lr=0.02, num_inner_steps=3))(params, tasks)
    adapted = [_sgd_loop(_mse, params, tasks.support_x[b], tasks.support_y[b],
                         0.02, 3) for b in range(4)]
    want = jax.tree.map(lambda p, *a: p - np.mean(a, axis=0), params,
                        *adapted)
    _close(got, want, rtol=1e-5, atol=1e-6)
    self.assertGreater(
        max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got)), 1e-3)

  def test_float64_closed_form_linear_regression(self):
    # L = 0.5 |X w - y|^2 / n: k steps give w_k = w* + (I - a A)^k (w - w*)
    # with A = X^T X / n, w* = A^{-1} X^T y / n.
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      xs, ys = rng.normal(size=(2, 8, 3)), rng.normal(size=(2, 8))
      w, a, k = rng.normal(size=3), 0.2, 4
      loss = lambda w, x, y: 0.5 * jnp.mean((x @ w - y) ** 2)
      tasks = maml.Task(xs, ys, xs, ys)
      got = maml.reptile_grad(loss, jnp.asarray(w), tasks, inner_lr=a,
                              num_inner_steps=k)
      adapted = []
      for b in range(2):
        big_a = xs[b].T @ xs[b] / 8
        w_star = np.linalg.solve(big_a, xs[b].T @ ys[b] / 8)
        m = np.linalg.matrix_power(np.eye(3) - a * big_a, k)
        adapted.append(w_star + m @ (w - w_star))
      np.testing.assert_allclose(got, w - np.mean(adapted, 0), rtol=1e-12)

  def test_sgd_outer_optimizer_is_reptile_update(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    eps = 0.5
    grads = maml.reptile_grad(_mse, params, tasks, inner_lr=0.02,
                              num_inner_steps=2)
    outer = optax.sgd(eps)
    updates, _ = outer.update(grads, outer.init(params))
    new = optax.apply_updates(params, updates)
    mean_adapted = jax.tree.map(
        lambda *a: np.mean(a, axis=0),
        *[_sgd_loop(_mse, params, tasks.support_x[b], tasks.support_y[b],
                    0.02, 2) for b in range(3)])
    want = jax.tree.map(lambda p, m: p + eps * (m - p), params, mean_adapted)
    _close(new, want, rtol=1e-5, atol=1e-6)

  def test_uses_support_set_only(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    other = tasks._replace(query_x=tasks.query_x + 3.0,
                           query_y=-tasks.query_y)
    a = maml.reptile_grad(_mse, params, tasks, inner_lr=0.02)
    b = maml.reptile_grad(_mse, params, other, inner_lr=0.02)
    _close(a, b, rtol=0, atol=0)

  def test_inner_optimizer_adapt_mask_and_zero_steps(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    with _optax_promotion():
      got = maml.reptile_grad(_mse, params, tasks,
                              inner_optimizer=optax.adam(1e-2, b1=0.0),
                              num_inner_steps=3)
      want = []
      for b in range(3):
        opt = optax.adam(1e-2, b1=0.0)
        p, state = params, opt.init(params)
        for _ in range(3):
          g = jax.grad(_mse)(p, tasks.support_x[b], tasks.support_y[b])
          u, state = opt.update(g, state, p)
          p = optax.apply_updates(p, u)
        want.append(p)
    _close(got, jax.tree.map(lambda q, *a: q - np.mean(a, 0), params, *want),
           rtol=1e-5, atol=1e-6)
    masked = maml.reptile_grad(_mse, params, tasks, inner_lr=0.02,
                               adapt_mask='^2/')
    for i, layer in enumerate(masked):
      for leaf in layer.values():
        self.assertEqual(bool(jnp.any(leaf != 0)), i == 2)
    zero = maml.reptile_grad(_mse, params, tasks, inner_lr=0.02,
                             num_inner_steps=0)
    for leaf in jax.tree.leaves(zero):
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))

  def test_key_determinism_and_per_task_keys(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))

    def noisy(p, x, y, key):
      return _mse(p, x + 0.1 * jax.random.normal(key, x.shape), y)

    f = jax.jit(lambda k: maml.reptile_grad(noisy, params, tasks,
                                            inner_lr=0.02,
                                            num_inner_steps=2, key=k))
    a, b = f(jax.random.key(3)), f(jax.random.key(3))
    c = f(jax.random.key(4))
    _close(a, b, rtol=0, atol=0)
    self.assertFalse(np.allclose(jax.tree.leaves(a)[0],
                                 jax.tree.leaves(c)[0]))
    # Task t, step s: fold_in(fold_in(key, t), s), as maml_loss.
    key = jax.random.key(3)
    want = []
    for t in range(3):
      p = params
      for s in range(2):
        k = jax.random.fold_in(jax.random.fold_in(key, t), s)
        g = jax.grad(noisy)(p, tasks.support_x[t], tasks.support_y[t], k)
        p = jax.tree.map(lambda w, gw: w - 0.02 * gw, p, g)
      want.append(p)
    _close(a, jax.tree.map(lambda q, *w: q - np.mean(w, 0), params, *want),
           rtol=1e-5, atol=1e-6)

  def test_jitted_step_compiles_once(self):
    params = _mlp_init(jax.random.key(0))
    outer = optax.sgd(0.1)

    @jax.jit
    def step(params, state, tasks):
      grads = maml.reptile_grad(_mse, params, tasks, inner_lr=0.02,
                                num_inner_steps=2)
      updates, state = outer.update(grads, state)
      return optax.apply_updates(params, updates), state

    state = outer.init(params)
    for i in range(3):
      params, state = step(params, state, _tasks(jax.random.key(i)))
    self.assertEqual(step._cache_size(), 1)
    _assert_finite(self, params)

  def test_bad_inputs(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    with self.assertRaisesRegex(
        ValueError, 'reptile_grad: num_inner_steps must be >= 0, got -1'):
      maml.reptile_grad(_mse, params, tasks, inner_lr=0.1, num_inner_steps=-1)
    with self.assertRaisesRegex(
        ValueError, 'reptile_grad: exactly one of inner_lr and '
        'inner_optimizer'):
      maml.reptile_grad(_mse, params, tasks)
    with self.assertRaisesRegex(TypeError, 'reptile_grad: key must be a PRNG'):
      maml.reptile_grad(_mse, params, tasks, inner_lr=0.1, key=3)
    with self.assertRaisesRegex(TypeError, 'reptile_grad: tasks must be'):
      maml.reptile_grad(_mse, params, tuple(tasks), inner_lr=0.1)


# ---------------------------------------------------------------------------
# iMAML.


def _linear_tasks(rng, num_tasks=3, n_support=8, n_query=6, dim=3):
  xs = rng.normal(size=(num_tasks, n_support, dim))
  xq = rng.normal(size=(num_tasks, n_query, dim))
  w_true = rng.normal(size=(num_tasks, dim))
  ys = np.einsum('tnd,td->tn', xs, w_true) + 0.1 * rng.normal(
      size=(num_tasks, n_support))
  yq = np.einsum('tnd,td->tn', xq, w_true)
  return maml.Task(xs, ys, xq, yq)


def _half_mse(w, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def _np_cg(matrix, b, steps):
  """Textbook conjugate gradients from 0, ``steps`` iterations, float64."""
  x = np.zeros_like(b)
  r = b.copy()
  p = r.copy()
  for _ in range(steps):
    rr = r @ r
    if rr == 0:
      break
    ap = matrix @ p
    alpha = rr / (p @ ap)
    x = x + alpha * p
    r = r - alpha * ap
    p = r + (r @ r) / rr * p
  return x


class ImamlGradTest(chex.TestCase):

  def test_exact_inner_solution_gives_exact_meta_gradient(self):
    # With L_s quadratic, phi*(theta) = (A + reg I)^{-1} (c + reg theta) is
    # the exact minimiser of the proximal loss, and d/dtheta L_q(phi*) =
    # reg (A + reg I)^{-1} grad L_q = (I + A / reg)^{-1} grad L_q. Many inner
    # steps reach phi*, dim CG steps solve the system exactly.
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      tasks = _linear_tasks(rng)
      theta, reg = rng.normal(size=3), 0.7
      loss, grads = maml.imaml_grad(
          _half_mse, jnp.asarray(theta), tasks, reg=reg, inner_lr=0.3,
          num_inner_steps=400, cg_steps=3)

      def query_loss_at_phi_star(th):
        total = 0.0
        for t in range(3):
          x, y = tasks.support_x[t], tasks.support_y[t]
          big_a, c = x.T @ x / 8, x.T @ y / 8
          phi = np.linalg.solve(big_a + reg * np.eye(3), c + reg * th)
          total += 0.5 * np.mean((tasks.query_x[t] @ phi
                                  - tasks.query_y[t]) ** 2)
        return total / 3

      np.testing.assert_allclose(loss, query_loss_at_phi_star(theta),
                                 rtol=1e-10)
      # Central finite differences of the closed form (a quadratic: exact).
      h = 1e-4
      fd = np.array([(query_loss_at_phi_star(theta + h * e)
                      - query_loss_at_phi_star(theta - h * e)) / (2 * h)
                     for e in np.eye(3)])
      np.testing.assert_allclose(grads, fd, rtol=1e-7, atol=1e-10)
      self.assertGreater(np.abs(fd).max(), 1e-2)

  @parameterized.parameters(1, 2, 5)
  def test_truncated_cg_matches_numpy_reference(self, cg_steps):
    # Few inner steps (phi_t not converged) and truncated CG: the contract's
    # formula, evaluated by a float64 NumPy GD loop and a textbook CG on the
    # dense Hessian of an MLP's support loss.
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), sizes=(1, 4, 1),
                         dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), num_tasks=2, dtype=jnp.float64)
      reg, lr, steps = 1.5, 0.05, 4
      loss, grads = maml.imaml_grad(_mse, params, tasks, reg=reg,
                                    inner_lr=lr, num_inner_steps=steps,
                                    cg_steps=cg_steps)
      flat, unravel = jax.flatten_util.ravel_pytree(params)
      f = lambda v, x, y: _mse(unravel(v), x, y)
      want_loss, want_grads = [], []
      for t in range(2):
        x, y = tasks.support_x[t], tasks.support_y[t]
        phi = np.asarray(flat)
        for _ in range(steps):
          phi = phi - lr * (np.asarray(jax.grad(f)(phi, x, y))
                            + reg * (phi - np.asarray(flat)))
        hess = np.asarray(jax.hessian(f)(phi, x, y))
        g_q = np.asarray(jax.grad(f)(phi, tasks.query_x[t], tasks.query_y[t]))
        want_loss.append(float(f(phi, tasks.query_x[t], tasks.query_y[t])))
        want_grads.append(_np_cg(np.eye(len(phi)) + hess / reg, g_q,
                                 cg_steps))
      np.testing.assert_allclose(loss, np.mean(want_loss), rtol=1e-10)
      got = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
      np.testing.assert_allclose(got, np.mean(want_grads, 0), rtol=1e-8,
                                 atol=1e-12)

  def test_conjugate_gradients_zero_residual_and_exact_solve(self):
    from metacf.maml import _imaml  # pylint: disable=g-import-not-at-top
    with jax.enable_x64(True):
      rng = np.random.default_rng(4)
      m = rng.normal(size=(4, 4))
      spd = m @ m.T + np.eye(4)
      b = {'u': jnp.asarray(rng.normal(size=3)), 'v': jnp.asarray(
          rng.normal(size=1))}
      matvec = lambda t: dict(zip('uv', jnp.split(
          spd @ jnp.concatenate([t['u'], t['v']]), [3])))
      got = _imaml.conjugate_gradients(matvec, b, 4)   # n steps: exact.
      want = np.linalg.solve(spd, np.concatenate([b['u'], b['v']]))
      np.testing.assert_allclose(np.concatenate([got['u'], got['v']]), want,
                                 rtol=1e-10)
      zero = _imaml.conjugate_gradients(
          matvec, jax.tree.map(jnp.zeros_like, b), 3)   # b = 0: x = 0.
      for leaf in jax.tree.leaves(zero):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_tasks_equals_loop_and_has_aux(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1), num_tasks=3)

    def with_aux(p, x, y):
      loss = _mse(p, x, y)
      return loss, {'loss_copy': loss}

    (loss, aux), grads = self.variant(lambda p, t: maml.imaml_grad(
        with_aux, p, t, reg=1.0, inner_lr=0.02, num_inner_steps=3,
        has_aux=True))(params, tasks)
    singles = [maml.imaml_grad(_mse, params,
                               jax.tree.map(lambda a: a[b:b + 1], tasks),
                               reg=1.0, inner_lr=0.02, num_inner_steps=3)
               for b in range(3)]
    np.testing.assert_allclose(loss, np.mean([s[0] for s in singles]),
                               rtol=1e-5)
    np.testing.assert_allclose(aux['loss_copy'], [s[0] for s in singles],
                               rtol=1e-5)
    # float32 CG: vmapped and single-task solves round differently.
    _close(grads, jax.tree.map(lambda *g: np.mean(g, 0),
                               *[s[1] for s in singles]),
           rtol=1e-3, atol=1e-5)
    _assert_finite(self, grads)

  def test_inner_optimizer_minimises_proximal_loss(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(1)
      tasks = _linear_tasks(rng, num_tasks=2)
      theta = jnp.asarray(rng.normal(size=3))
      a = maml.imaml_grad(_half_mse, theta, tasks, reg=2.0,
                          inner_optimizer=optax.sgd(0.3),
                          num_inner_steps=7, cg_steps=3)
      b = maml.imaml_grad(_half_mse, theta, tasks, reg=2.0, inner_lr=0.3,
                          num_inner_steps=7, cg_steps=3)
      _close(a, b, rtol=1e-12)

  def test_key_reaches_loss_and_is_deterministic(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))

    def noisy(p, x, y, key):
      return _mse(p, x + 0.1 * jax.random.normal(key, x.shape), y)

    f = jax.jit(lambda k: maml.imaml_grad(noisy, params, tasks, reg=1.0,
                                          inner_lr=0.02, num_inner_steps=2,
                                          key=k))
    a, b, c = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
    _close(a, b, rtol=0, atol=0)
    self.assertNotEqual(float(a[0]), float(c[0]))

  def test_memory_does_not_grow_with_inner_steps(self):
    params = _mlp_init(jax.random.key(0), sizes=(1, 64, 64, 1))
    tasks = _tasks(jax.random.key(1), num_tasks=4, shots=10)

    def temp_bytes(steps):
      f = jax.jit(lambda p, t: maml.imaml_grad(
          _mse, p, t, reg=1.0, inner_lr=0.01, num_inner_steps=steps))
      return f.lower(params, tasks).compile().memory_analysis(
      ).temp_size_in_bytes

    def maml_temp_bytes(steps):
      f = jax.jit(jax.grad(lambda p, t: maml.maml_loss(
          _mse, p, t, inner_lr=0.01, num_inner_steps=steps)))
      return f.lower(params, tasks).compile().memory_analysis(
      ).temp_size_in_bytes

    few, many = temp_bytes(2), temp_bytes(64)
    self.assertLessEqual(many, 1.1 * few + 4096)
    # Second-order MAML through 64 steps (a scan that stores every step's
    # residuals) does grow: the comparison above can tell.
    self.assertGreater(maml_temp_bytes(64), 3 * maml_temp_bytes(2))

  def test_jitted_step_compiles_once(self):
    params = _mlp_init(jax.random.key(0))
    outer = optax.sgd(0.1)

    @jax.jit
    def step(params, state, tasks):
      loss, grads = maml.imaml_grad(_mse, params, tasks, reg=1.0,
                                    inner_lr=0.02, num_inner_steps=2)
      updates, state = outer.update(grads, state)
      return optax.apply_updates(params, updates), state, loss

    state = outer.init(params)
    losses = []
    for i in range(3):
      params, state, loss = step(params, state, _tasks(jax.random.key(i)))
      losses.append(float(loss))
    self.assertEqual(step._cache_size(), 1)
    self.assertTrue(np.all(np.isfinite(losses)))

  def test_bad_inputs(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    call = lambda **kw: maml.imaml_grad(
        _mse, params, tasks, **{'inner_lr': 0.1, 'num_inner_steps': 1,
                                'reg': 1.0, **kw})
    for reg in (0.0, -1.0, float('nan')):
      with self.assertRaisesRegex(
          ValueError, re.escape(f'imaml_grad: reg must be > 0, got {reg}')):
        call(reg=reg)
    for steps in (0, -2):
      with self.assertRaisesRegex(
          ValueError, f'imaml_grad: cg_steps must be >= 1, got {steps}'):
        call(cg_steps=steps)
    with self.assertRaisesRegex(
        ValueError, 'imaml_grad: num_inner_steps must be >= 0, got -1'):
      call(num_inner_steps=-1)
    with self.assertRaisesRegex(
        ValueError, 'imaml_grad: exactly one of inner_lr and inner_optimizer'):
      call(inner_lr=None)
    with self.assertRaisesRegex(TypeError, 'imaml_grad: with has_aux=True'):
      call(has_aux=True)
    with self.assertRaisesRegex(ValueError, 'imaml_grad: reg must be'):
      call(reg=jnp.ones(3))


# ---------------------------------------------------------------------------
# Prototypical networks.


def _np_prototype_logits(support, labels, query, num_classes):
  support, query = np.asarray(support, np.float64), np.asarray(query,
                                                               np.float64)
  out = np.empty((len(query), num_classes))
  for k in range(num_classes):
    members = support[np.asarray(labels) == k]
    if len(members) == 0:
      out[:, k] = np.nan   # the caller checks these columns separately.
      continue
    c = members.mean(0)
    out[:, k] = -((query - c) ** 2).sum(-1)
  return out


class PrototypeLogitsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(0)
    support = rng.normal(size=(10, 6)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4] * 2, np.int32)
    query = rng.normal(size=(7, 6)).astype(np.float32)
    got = self.variant(maml.prototype_logits, static_argnums=3)(
        support, labels, query, 5)
    self.assertEqual(got.shape, (7, 5))
    np.testing.assert_allclose(got, _np_prototype_logits(support, labels,
                                                         query, 5),
                               rtol=1e-5, atol=1e-5)

  def test_vmap_over_episodes_equals_loop(self):
    rng = np.random.default_rng(1)
    support = rng.normal(size=(4, 15, 3)).astype(np.float32)
    labels = np.stack([rng.permutation(np.repeat(np.arange(3), 5))
                       for _ in range(4)]).astype(np.int32)
    query = rng.normal(size=(4, 9, 3)).astype(np.float32)
    got = jax.vmap(maml.prototype_logits, in_axes=(0, 0, 0, None))(
        support, labels, query, 3)
    for e in range(4):
      np.testing.assert_allclose(
          got[e], maml.prototype_logits(support[e], labels[e], query[e], 3),
          rtol=1e-6)

  def test_class_without_support_is_never_predicted_and_not_nan(self):
    rng = np.random.default_rng(2)
    support = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    labels = jnp.array([0, 0, 2, 2])      # class 1: no support example
    query = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    logits = maml.prototype_logits(support, labels, query, 3)
    np.testing.assert_array_equal(logits[:, 1],
                                  np.full(5, np.finfo(np.float32).min))
    ref = _np_prototype_logits(support, labels, query, 3)
    np.testing.assert_allclose(logits[:, [0, 2]], ref[:, [0, 2]], rtol=1e-5)
    probs = jax.nn.softmax(logits)
    np.testing.assert_array_equal(probs[:, 1], np.zeros(5))
    self.assertTrue(bool(jnp.all(logits.argmax(-1) != 1)))

    def loss(s, q, query_labels):
      logits = maml.prototype_logits(s, labels, q, 3)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits, query_labels))

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(
        support, query, jnp.array([0, 2, 2, 0, 0]))
    self.assertTrue(bool(jnp.isfinite(value)))
    _assert_finite(self, grads)
    # A query labelled with the empty class: probability 0, so an infinite
    # cross-entropy (documented), but no NaN and finite gradients.
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(
        support, query, jnp.array([0, 1, 2, 0, 1]))
    self.assertEqual(float(value), np.inf)
    _assert_finite(self, grads)
    none = maml.prototype_logits(support, labels, query, 5)[:, 3:]
    self.assertTrue(bool(jnp.all(none == np.finfo(np.float32).min)))

  def test_gradients_match_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(3)
      support = jnp.asarray(rng.normal(size=(6, 3)))
      query = jnp.asarray(rng.normal(size=(4, 3)))
      labels = jnp.array([0, 1, 2, 0, 1, 2])
      f = lambda s, q: maml.prototype_logits(s, labels, q, 3)
      jax.test_util.check_grads(f, (support, query), order=2,
                                modes=('fwd', 'rev'))

  def test_bad_inputs(self):
    s, q = jnp.zeros((4, 3)), jnp.zeros((2, 3))
    labels = jnp.array([0, 1, 2, 3])
    with self.assertRaisesRegex(
        ValueError, re.escape('prototype_logits: support_labels must be in '
                              '[0, 3), got values in [0, 3].')):
      maml.prototype_logits(s, labels, q, 3)
    with self.assertRaisesRegex(
        ValueError, re.escape('prototype_logits: support_labels must be in '
                              '[0, 4), got values in [-1, 2].')):
      maml.prototype_logits(s, jnp.array([0, 1, 2, -1]), q, 4)
    with self.assertRaisesRegex(
        ValueError, re.escape('prototype_logits: query_embeddings must be '
                              '[num_query, 3]')):
      maml.prototype_logits(s, labels, jnp.zeros((2, 4)), 4)
    with self.assertRaisesRegex(
        ValueError, re.escape('prototype_logits: support_labels must have '
                              'shape (4,)')):
      maml.prototype_logits(s, labels[:3], q, 4)
    with self.assertRaisesRegex(
        ValueError, 'prototype_logits: support_embeddings must be '):
      maml.prototype_logits(jnp.zeros(4), labels, q, 4)
    with self.assertRaisesRegex(
        TypeError, 'prototype_logits: support_labels must have an integer'):
      maml.prototype_logits(s, jnp.zeros(4), q, 4)
    with self.assertRaisesRegex(
        ValueError, 'prototype_logits: num_classes must be >= 1, got 0'):
      maml.prototype_logits(s, labels, q, 0)


# ---------------------------------------------------------------------------
# MAML++: per-step learning rates, multi-step loss, step index.


def _reference_mamlpp(loss_fn, params, tasks, lr_at, steps, weights=None):
  """Python loops; ``lr_at(s)`` is the lr pytree (or scalar) of step s."""
  total = 0.0
  for b in range(tasks.support_x.shape[0]):
    p = params
    task_total = 0.0
    for s in range(steps):
      g = jax.grad(loss_fn)(p, tasks.support_x[b], tasks.support_y[b])
      lr = lr_at(s)
      lr_tree = (jax.tree.map(lambda _: lr, p)
                 if jax.tree_util.treedef_is_leaf(jax.tree.structure(lr))
                 else lr)
      p = jax.tree.map(lambda w, gw, a: w - a * gw, p, g, lr_tree)
      if weights is not None:
        task_total = task_total + weights[s] * loss_fn(
            p, tasks.query_x[b], tasks.query_y[b])
    if weights is None:
      task_total = loss_fn(p, tasks.query_x[b], tasks.query_y[b])
    total = total + task_total
  return total / tasks.support_x.shape[0]


class MamlPlusPlusTest(chex.TestCase):

  def test_scalar_per_step_lr_matches_reference(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    lrs = jnp.array([0.03, 0.01, 0.02])
    got = jax.jit(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=lrs, num_inner_steps=3,
        per_step_inner_lr=True))(params)
    want = _reference_mamlpp(_mse, params, tasks, lambda s: lrs[s], 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  @parameterized.named_parameters(('unrolled', 3, False), ('scan', 18, False),
                                  ('remat', 3, True))
  def test_per_layer_per_step_lrs_and_their_gradients(self, steps, remat):
    # LSLR: one rate per layer and step, learnable; float64 finite
    # differences check the gradient with respect to the rates.
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), sizes=(1, 4, 1),
                         dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), num_tasks=2, dtype=jnp.float64)
      rng = np.random.default_rng(0)
      lrs = jax.tree.map(lambda _: jnp.asarray(
          rng.uniform(0.005, 0.02, size=steps)), params)
      f = lambda p, lr: maml.maml_loss(
          _mse, p, tasks, inner_lr=lr, num_inner_steps=steps,
          per_step_inner_lr=True, remat=remat)
      want = _reference_mamlpp(
          _mse, params, tasks, lambda s: jax.tree.map(lambda a: a[s], lrs),
          steps)
      np.testing.assert_allclose(f(params, lrs), want, rtol=1e-10)
      jax.test_util.check_grads(lambda lr: f(params, lr), (lrs,), order=1,
                                modes=('rev',))
      g = jax.grad(f, argnums=1)(params, lrs)
      self.assertGreater(max(float(jnp.abs(a).max())
                             for a in jax.tree.leaves(g)), 1e-6)

  def test_per_parameter_per_step_lrs(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    lrs = jax.tree.map(
        lambda p: 0.01 * jnp.stack([jnp.ones_like(p), 2 * jnp.ones_like(p)]),
        params)
    got = maml.maml_loss(_mse, params, tasks, inner_lr=lrs,
                         num_inner_steps=2, per_step_inner_lr=True)
    want = _reference_mamlpp(_mse, params, tasks,
                             lambda s: jax.tree.map(lambda a: a[s], lrs), 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_step_weights_multi_step_loss(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    weights = jnp.array([0.2, 0.3, 0.5])
    f = jax.jit(lambda p, w: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.01, num_inner_steps=3, step_weights=w))
    want = _reference_mamlpp(_mse, params, tasks, lambda s: 0.01, 3, weights)
    np.testing.assert_allclose(f(params, weights), want, rtol=1e-5)
    # One-hot on the last step is the plain MAML loss; same gradients.
    last = jnp.array([0.0, 0.0, 1.0])
    plain = lambda p: maml.maml_loss(_mse, p, tasks, inner_lr=0.01,
                                     num_inner_steps=3)
    np.testing.assert_allclose(f(params, last), plain(params), rtol=1e-6)
    _close(jax.grad(f)(params, last), jax.grad(plain)(params), rtol=1e-5,
           atol=1e-7)
    # Other weights, same shape: no retrace.
    f(params, jnp.array([1.0, 0.0, 0.0]))
    self.assertEqual(f._cache_size(), 1)

  def test_step_weights_scan_path_and_has_aux(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1), num_tasks=2)
    weights = jnp.linspace(0.0, 1.0, 18)

    def with_aux(p, x, y):
      loss = _mse(p, x, y)
      return loss, {'l': loss}

    (loss, aux) = maml.maml_loss(with_aux, params, tasks, inner_lr=0.005,
                                 num_inner_steps=18, step_weights=weights,
                                 has_aux=True)
    want = _reference_mamlpp(_mse, params, tasks, lambda s: 0.005, 18,
                             weights)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    final = maml.maml_loss(with_aux, params, tasks, inner_lr=0.005,
                           num_inner_steps=18, has_aux=True)[1]
    np.testing.assert_allclose(aux['l'], final['l'], rtol=1e-6)

  def test_pass_step_reaches_loss_fn(self):
    # Per-step biases (as per-step BatchNorm offsets): row `step` is used.
    # Inner step s uses row s; the query evaluation after k steps row k.
    steps = 3
    params = {'w': jnp.array([[0.5]]), 'b': jnp.array([0.0, 1.0, 2.0, 3.0])}
    tasks = _tasks(jax.random.key(1), num_tasks=2)

    def loss_fn(p, x, y, step):
      return jnp.mean((x @ p['w'] + p['b'][step] - y) ** 2)

    def fixed(row):
      return lambda p, x, y: loss_fn(p, x, y, row)

    for remat in (False, True):
      got = maml.maml_loss(loss_fn, params, tasks, inner_lr=0.01,
                           num_inner_steps=steps, pass_step=True, remat=remat)
      total = 0.0
      for b in range(2):
        p = params
        for s in range(steps):
          g = jax.grad(fixed(s))(p, tasks.support_x[b], tasks.support_y[b])
          p = jax.tree.map(lambda w, gw: w - 0.01 * gw, p, g)
        total += fixed(steps)(p, tasks.query_x[b], tasks.query_y[b])
      np.testing.assert_allclose(got, total / 2, rtol=1e-5)

  def test_meta_train_step_with_per_call_step_weights_compiles_once(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    outer = optax.sgd(0.1)
    step = maml.make_meta_train_step(
        _mse, outer, inner_lr=0.01, num_inner_steps=3,
        step_weights=jnp.array([0.0, 0.0, 1.0]))
    copy = lambda t: jax.tree.map(jnp.copy, t)
    _, _, metrics = step(copy(params), outer.init(params), tasks)
    plain = maml.maml_loss(_mse, params, tasks, inner_lr=0.01,
                           num_inner_steps=3)
    np.testing.assert_allclose(metrics.loss, plain, rtol=1e-6)
    step(copy(params), outer.init(params), tasks,
         step_weights=jnp.array([1.0, 0.0, 0.0]))
    compiled = step._cache_size()
    weights = jnp.array([0.2, 0.3, 0.5])
    new, _, metrics = step(copy(params), outer.init(params), tasks,
                           step_weights=weights)
    want = _reference_mamlpp(_mse, params, tasks, lambda s: 0.01, 3, weights)
    np.testing.assert_allclose(metrics.loss, want, rtol=1e-5)
    grads = jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.01, num_inner_steps=3,
        step_weights=weights))(params)
    _close(new, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads),
           rtol=1e-5, atol=1e-6)
    # New weights, same shape: no retrace.
    self.assertEqual(step._cache_size(), compiled)

  def test_bad_inputs(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'maml_loss: with per_step_inner_lr=True, inner_lr (every leaf) '
            'must have a leading axis of length num_inner_steps=3, got shape '
            '(2,).')):
      maml.maml_loss(_mse, params, tasks, inner_lr=jnp.ones(2) * 0.1,
                     num_inner_steps=3, per_step_inner_lr=True)
    with self.assertRaisesRegex(ValueError, 'maml_loss: with per_step_inner_lr'
                                '=True, inner_lr .* got shape \\(\\)'):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.1, num_inner_steps=3,
                     per_step_inner_lr=True)
    with self.assertRaisesRegex(ValueError, 'maml_loss: inner_lr leaves must '
                                'be scalars or match the shape'):
      maml.maml_loss(_mse, params, tasks, num_inner_steps=2,
                     per_step_inner_lr=True,
                     inner_lr=jax.tree.map(lambda p: jnp.ones((2, 5)),
                                           params))
    with self.assertRaisesRegex(
        ValueError, re.escape('maml_loss: step_weights must have shape '
                              '[num_inner_steps] = (3,), got shape (2,).')):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.1, num_inner_steps=3,
                     step_weights=jnp.ones(2))
    with self.assertRaisesRegex(
        ValueError, 'per_step_inner_lr=True needs inner_lr'):
      maml.maml_loss(_mse, params, tasks, inner_optimizer=optax.sgd(0.1),
                     per_step_inner_lr=True)
    with self.assertRaisesRegex(
        ValueError, re.escape('make_meta_train_step: step_weights must have '
                              'shape [num_inner_steps] = (3,), got shape '
                              '(4,).')):
      step = maml.make_meta_train_step(_mse, optax.sgd(0.1), inner_lr=0.1,
                                       num_inner_steps=3)
      step(params, optax.sgd(0.1).init(params), tasks,
           step_weights=jnp.ones(4))
    with self.assertRaisesRegex(
        ValueError, 'inner_adapt: with per_step_inner_lr=True, inner_lr'):
      maml.inner_adapt(_mse, params, tasks.support_x[0], tasks.support_y[0],
                       inner_lr=jnp.ones(3), num_inner_steps=2,
                       per_step_inner_lr=True)
