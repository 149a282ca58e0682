"""Tests for sequential support, MER, La-MAML and OML (metacf.maml).

References are hand-unrolled Python loops over tasks, batches and inner
steps (``jax.grad`` of one slice's loss at a time, no scan, no vmap), the
La-MAML and MER update formulas written out, and finite differences in
float64.
"""

import re

from absl.testing import parameterized
import chex
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import optax

from metacf import maml
from test_maml import _mlp_init  # pylint: disable=g-bad-import-order
from test_maml import _mse

_optax_promotion = lambda: jax.numpy_dtype_promotion('standard')


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), equal_nan=False, **kw), a, b)


def _max_abs(tree):
  return max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(tree))


def _sequential_tasks(key, num_tasks=2, steps=3, batch=2, query=5,
                      dtype=jnp.float32):
  """Sinusoid tasks whose support is ``[T, steps, batch, 1]``."""
  k_amp, k_phase, k_s, k_q = jax.random.split(key, 4)
  amp = jax.random.uniform(k_amp, (num_tasks, 1, 1, 1), dtype, 0.1, 5.0)
  phase = jax.random.uniform(k_phase, (num_tasks, 1, 1, 1), dtype, 0.0, 3.0)
  xs = jax.random.uniform(k_s, (num_tasks, steps, batch, 1), dtype, -5.0, 5.0)
  xq = jax.random.uniform(k_q, (num_tasks, query, 1), dtype, -5.0, 5.0)
  return maml.Task(xs, amp * jnp.sin(xs - phase), xq,
                   amp[:, 0] * jnp.sin(xq - phase[:, 0]))


def _sgd(params, grads, lr):
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def _sequential_sgd(loss_fn, params, xs, ys, lr, key=None):
  """Step s: one SGD step on slice s. Python loop."""
  p = params
  for s in range(xs.shape[0]):
    args = (xs[s], ys[s]) if key is None else (
        xs[s], ys[s], jax.random.fold_in(key, s))
    p = _sgd(p, jax.grad(loss_fn)(p, *args), lr)
  return p


def _reference_meta_loss(loss_fn, params, tasks, lr):
  losses = []
  for t in range(tasks.support_x.shape[0]):
    adapted = _sequential_sgd(loss_fn, params, tasks.support_x[t],
                              tasks.support_y[t], lr)
    losses.append(loss_fn(adapted, tasks.query_x[t], tasks.query_y[t]))
  return jnp.mean(jnp.stack(losses))


# ---------------------------------------------------------------------------
# sequential_support.


class SequentialSupportTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('unrolled', 3, False), ('scan', 18, False),
                                  ('remat', 3, True))
  def test_inner_adapt_matches_loop(self, steps, remat):
    params = _mlp_init(jax.random.key(0))
    tasks = _sequential_tasks(jax.random.key(1), num_tasks=1, steps=steps)
    x, y = tasks.support_x[0], tasks.support_y[0]
    got = self.variant(lambda p, x, y: maml.inner_adapt(
        _mse, p, x, y, inner_lr=0.01, num_inner_steps=steps, remat=remat,
        sequential_support=True))(params, x, y)
    want = _sequential_sgd(_mse, params, x, y, 0.01)
    _close(got, want, rtol=2e-5, atol=2e-6)
    # Not the same as adapting on the whole support every step.
    pooled = maml.inner_adapt(_mse, params, x.reshape(-1, 1),
                              y.reshape(-1, 1), inner_lr=0.01,
                              num_inner_steps=steps)
    self.assertGreater(_max_abs(jax.tree.map(jnp.subtract, got, pooled)),
                       1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_maml_loss_and_meta_gradient_match_loop(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _sequential_tasks(jax.random.key(2), num_tasks=3)
    f = lambda p: maml.maml_loss(_mse, p, tasks, inner_lr=0.01,
                                 num_inner_steps=3, sequential_support=True)
    loss, grads = self.variant(jax.value_and_grad(f))(params)
    want_loss, want_grads = jax.value_and_grad(
        lambda p: _reference_meta_loss(_mse, p, tasks, 0.01))(params)
    _close(loss, want_loss, rtol=1e-5)
    _close(grads, want_grads, rtol=1e-4, atol=1e-6)
    self.assertGreater(_max_abs(grads), 1e-3)

  def test_meta_gradient_finite_differences_float64(self):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), sizes=(1, 4, 1),
                         dtype=jnp.float64)
      tasks = _sequential_tasks(jax.random.key(3), num_tasks=2,
                                dtype=jnp.float64)
      for remat in (False, True):
        jtu.check_grads(
            lambda p, remat=remat: maml.maml_loss(
                _mse, p, tasks, inner_lr=0.02, num_inner_steps=3,
                remat=remat, sequential_support=True),
            (params,), order=2, modes=('rev',), atol=1e-6, rtol=1e-6)

  def test_keys_masks_per_step_rates_and_step_weights_are_unchanged(self):
    # Step s of task t uses fold_in(fold_in(key, t), s), rate lr[s], only
    # the unmasked leaf; the query after k steps weighs w[k-1].
    params = _mlp_init(jax.random.key(0))
    tasks = _sequential_tasks(jax.random.key(4), num_tasks=2)
    key = jax.random.key(5)
    lrs = jnp.asarray([0.01, 0.02, 0.005])
    w = jnp.asarray([0.2, 0.3, 0.5])

    def noisy(p, x, y, k):
      return _mse(p, x + 0.1 * jax.random.normal(k, x.shape), y)

    got = jax.jit(lambda p: maml.maml_loss(
        noisy, p, tasks, inner_lr=lrs, num_inner_steps=3, key=key,
        adapt_mask='^2/',
        per_step_inner_lr=True, step_weights=w,
        sequential_support=True))(params)
    want = 0.0
    for t in range(2):
      task_key = jax.random.fold_in(key, t)
      p = params
      for s in range(3):
        g = jax.grad(noisy)(p, tasks.support_x[t, s], tasks.support_y[t, s],
                            jax.random.fold_in(task_key, s))
        p = list(p[:2]) + [_sgd(p[2], g[2], lrs[s])]
        query_key = jax.random.fold_in(task_key, 3 if s == 2 else 3 + s + 1)
        want += w[s] * noisy(p, tasks.query_x[t], tasks.query_y[t],
                             query_key) / 2
    _close(got, want, rtol=1e-5)

  def test_make_meta_train_step_compiles_once_and_chunks(self):
    params = _mlp_init(jax.random.key(0))
    outer = optax.adam(1e-3)
    tasks = _sequential_tasks(jax.random.key(6), num_tasks=4)
    options = dict(inner_lr=0.01, num_inner_steps=3, sequential_support=True)
    step = maml.make_meta_train_step(_mse, outer, donate=False, **options)
    chunked = maml.make_meta_train_step(_mse, outer, donate=False,
                                        task_chunk_size=2, **options)
    with _optax_promotion():
      state = outer.init(params)
      new, _, metrics = step(params, state, tasks)
      new_chunked, _, _ = chunked(params, state, tasks)
      grads = jax.grad(lambda p: _reference_meta_loss(_mse, p, tasks, 0.01))(
          params)
      updates, _ = outer.update(grads, state, params)
      want = optax.apply_updates(params, updates)
      _close(new, want, rtol=1e-4, atol=1e-6)
      _close(new_chunked, new, rtol=1e-4, atol=1e-6)
      _close(metrics.loss, _reference_meta_loss(_mse, params, tasks, 0.01),
             rtol=1e-5)
      other = _sequential_tasks(jax.random.key(7), num_tasks=4)
      step(new, state, other)
    self.assertEqual(step._cache_size(), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_reptile_grad_matches_loop(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _sequential_tasks(jax.random.key(8), num_tasks=3)
    got = self.variant(lambda p, t: maml.reptile_grad(
        _mse, p, t, inner_lr=0.01, num_inner_steps=3,
        sequential_support=True))(params, tasks)
    adapted = [_sequential_sgd(_mse, params, tasks.support_x[t],
                               tasks.support_y[t], 0.01) for t in range(3)]
    want = jax.tree.map(lambda p, *a: p - np.mean(a, axis=0), params,
                        *adapted)
    _close(got, want, rtol=1e-4, atol=1e-6)
    self.assertGreater(_max_abs(got), 1e-3)

  def test_wrong_length_raises_naming_sequential_support(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _sequential_tasks(jax.random.key(9), num_tasks=2, steps=3)
    match = re.escape('with sequential_support=True, tasks.support_x must be '
                      '[num_tasks, num_inner_steps, ...]')
    with self.assertRaisesRegex(ValueError, match):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.01, num_inner_steps=2,
                     sequential_support=True)
    with self.assertRaisesRegex(ValueError, match):
      maml.reptile_grad(_mse, params, tasks, inner_lr=0.01,
                        num_inner_steps=4, sequential_support=True)
    step = maml.make_meta_train_step(_mse, optax.sgd(0.1), inner_lr=0.01,
                                     num_inner_steps=2,
                                     sequential_support=True)
    with self.assertRaisesRegex(ValueError, match):
      with _optax_promotion():
        step(params, optax.sgd(0.1).init(params), tasks)
    with self.assertRaisesRegex(ValueError, 'sequential_support=True, x'):
      maml.inner_adapt(_mse, params, tasks.support_x[0],
                       tasks.support_y[0], inner_lr=0.01, num_inner_steps=2,
                       sequential_support=True)
    with self.assertRaisesRegex(ValueError, 'sequential_support=True, y'):
      maml.inner_adapt(_mse, params, tasks.support_x[0],
                       tasks.support_y[0, :2], inner_lr=0.01,
                       num_inner_steps=3, sequential_support=True)


# ---------------------------------------------------------------------------
# OML: maml_loss with sequential support and a head-only adapt mask.


class OmlCompositionTest(chex.TestCase):

  def test_oml_meta_gradient_matches_hand_unrolled(self):
    # Javed & White 2019: the prediction head (last layer) takes one SGD
    # step per example of the trajectory; the meta-loss on the query
    # (trajectory + remember set) trains representation and head.
    params = _mlp_init(jax.random.key(0))
    tasks = _sequential_tasks(jax.random.key(10), num_tasks=1, steps=4,
                              batch=1)
    oml = lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.03, num_inner_steps=4,
        adapt_mask='^2/', sequential_support=True)

    def reference(p):
      rln, pln = p[:2], p[2]
      for s in range(4):
        g = jax.grad(lambda h: _mse(list(rln) + [h], tasks.support_x[0, s],
                                    tasks.support_y[0, s]))(pln)
        pln = _sgd(pln, g, 0.03)
      return _mse(list(rln) + [pln], tasks.query_x[0], tasks.query_y[0])

    loss, grads = jax.jit(jax.value_and_grad(oml))(params)
    want_loss, want_grads = jax.value_and_grad(reference)(params)
    _close(loss, want_loss, rtol=1e-5)
    _close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # The representation is trained through the head's inner loop.
    self.assertGreater(_max_abs(grads[0]), 1e-4)


# ---------------------------------------------------------------------------
# MER.


def _mer_reference(loss_fn, params, x, y, alpha, beta, gamma):
  """Riemer et al. 2019, Algorithm 1, written out."""
  theta_a0 = params
  theta = params
  for i in range(x.shape[0]):
    theta_w0 = theta
    w = theta
    for j in range(x.shape[1]):
      w = _sgd(w, jax.grad(loss_fn)(w, x[i, j], y[i, j]), alpha)
    theta = jax.tree.map(lambda a, b: a + beta * (b - a), theta_w0, w)
  return jax.tree.map(lambda a, b: a + gamma * (b - a), theta_a0, theta)


class MerUpdateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_algorithm_float64(self):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      stream = _sequential_tasks(jax.random.key(11), num_tasks=3, steps=4,
                                 batch=1, dtype=jnp.float64)
      x, y = stream.support_x, stream.support_y         # [s=3, k=4, 1, 1]
      got = self.variant(lambda p, x, y: maml.mer_update(
          _mse, p, x, y, inner_lr=0.01, within_batch_rate=0.7,
          across_batch_rate=0.4))(params, x, y)
      want = _mer_reference(_mse, params, x, y, 0.01, 0.7, 0.4)
      _close(got, want, rtol=1e-12, atol=1e-14)
      self.assertGreater(
          _max_abs(jax.tree.map(jnp.subtract, got, params)), 1e-4)

  def test_rates_one_is_plain_sequential_sgd(self):
    # beta = gamma = 1: every batch's SGD is kept, so MER is SGD over the
    # batches one after another.
    params = _mlp_init(jax.random.key(0))
    stream = _sequential_tasks(jax.random.key(12), num_tasks=2, steps=3)
    x, y = stream.support_x, stream.support_y
    got = maml.mer_update(_mse, params, x, y, inner_lr=0.01,
                          within_batch_rate=1.0, across_batch_rate=1.0)
    want = _sequential_sgd(_mse, params, x.reshape((6,) + x.shape[2:]),
                           y.reshape((6,) + y.shape[2:]), 0.01)
    _close(got, want, rtol=1e-5, atol=1e-6)

  def test_keys_mask_and_determinism(self):
    params = _mlp_init(jax.random.key(0))
    stream = _sequential_tasks(jax.random.key(13), num_tasks=2, steps=3)
    x, y = stream.support_x, stream.support_y
    key = jax.random.key(14)

    def noisy(p, x, y, k):
      return _mse(p, x + 0.1 * jax.random.normal(k, x.shape), y)

    mask = lambda path, _: path.startswith('2/')
    update = jax.jit(lambda p, k: maml.mer_update(
        noisy, p, x, y, inner_lr=0.01, within_batch_rate=0.5,
        across_batch_rate=0.5, key=k, adapt_mask=mask))
    got = update(params, key)
    _close(got, update(params, key), rtol=0, atol=0)
    _close(got[:2], params[:2], rtol=0, atol=0)
    theta = params
    for i in range(2):
      w = theta
      for j in range(3):
        k = jax.random.fold_in(jax.random.fold_in(key, i), j)
        g = jax.grad(noisy)(w, x[i, j], y[i, j], k)
        w = list(w[:2]) + [_sgd(w[2], g[2], 0.01)]
      theta = jax.tree.map(lambda a, b: a + 0.5 * (b - a), theta, w)
    want = jax.tree.map(lambda a, b: a + 0.5 * (b - a), params, theta)
    _close(got, want, rtol=1e-5, atol=1e-7)

  def test_bad_arguments_raise(self):
    params = _mlp_init(jax.random.key(0))
    x = jnp.zeros((2, 3, 1, 1))
    with self.assertRaisesRegex(ValueError, 'within_batch_rate'):
      maml.mer_update(_mse, params, x, x, inner_lr=0.1,
                      within_batch_rate=0.0, across_batch_rate=1.0)
    with self.assertRaisesRegex(ValueError, 'across_batch_rate'):
      maml.mer_update(_mse, params, x, x, inner_lr=0.1,
                      within_batch_rate=1.0, across_batch_rate=-1.0)
    with self.assertRaisesRegex(ValueError, 'share their leading 2 axes'):
      maml.mer_update(_mse, params, x, x[:, :2], inner_lr=0.1,
                      within_batch_rate=1.0, across_batch_rate=1.0)
    with self.assertRaisesRegex(ValueError, 'at least 2 axes'):
      maml.mer_update(_mse, params, x[0, 0, 0], x[0, 0, 0], inner_lr=0.1,
                      within_batch_rate=1.0, across_batch_rate=1.0)


# ---------------------------------------------------------------------------
# La-MAML.


def _lamaml_reference(loss_fn, params, alpha, x, y, meta_x, meta_y, eta,
                      weights=None, first_order=False):
  """Gupta et al. 2020, Algorithm 1, written out."""

  def meta_loss(theta, rates):
    losses = []
    for j in range(x.shape[0]):
      g = jax.grad(loss_fn)(theta, x[j], y[j])
      if first_order:
        g = jax.lax.stop_gradient(g)
      theta = jax.tree.map(lambda p, a, gp: p - a * gp, theta, rates, g)
      losses.append(loss_fn(theta, meta_x, meta_y))
    if weights is None:
      return losses[-1]
    return sum(w * l for w, l in zip(weights, losses))

  loss, (g_theta, g_alpha) = jax.value_and_grad(meta_loss, (0, 1))(
      params, alpha)
  new_alpha = jax.tree.map(lambda a, g: a - eta * g, alpha, g_alpha)
  new_params = jax.tree.map(lambda p, a, g: p - np.maximum(a, 0) * g,
                            params, new_alpha, g_theta)
  return new_params, new_alpha, loss


class LaMamlUpdateTest(chex.TestCase):

  def _setup(self, dtype=jnp.float32):
    params = _mlp_init(jax.random.key(0), dtype=dtype)
    stream = _sequential_tasks(jax.random.key(15), num_tasks=1, steps=4,
                               batch=1, dtype=dtype)
    x, y = stream.support_x[0], stream.support_y[0]      # [4, 1, 1]
    meta_x = jnp.concatenate([x.reshape(4, 1), stream.query_x[0]])
    meta_y = jnp.concatenate([y.reshape(4, 1), stream.query_y[0]])
    alpha = jax.tree.map(
        lambda p: jax.random.uniform(jax.random.key(p.size), p.shape, dtype,
                                     0.0, 0.02), params)
    return params, alpha, x, y, meta_x, meta_y

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_algorithm_float64(self):
    with jax.enable_x64(True):
      params, alpha, x, y, meta_x, meta_y = self._setup(jnp.float64)
      got = self.variant(lambda p, a: maml.lamaml_update(
          _mse, p, a, x, y, meta_x, meta_y, lr_learning_rate=0.3))(
              params, alpha)
      want = _lamaml_reference(_mse, params, alpha, x, y, meta_x, meta_y,
                               0.3)
      _close(got.params, want[0], rtol=1e-10, atol=1e-12)
      _close(got.inner_lr, want[1], rtol=1e-10, atol=1e-12)
      _close(got.loss, want[2], rtol=1e-12)
      self.assertGreater(
          _max_abs(jax.tree.map(jnp.subtract, got.inner_lr, alpha)), 1e-6)

  def test_negative_rates_are_clipped_at_zero_in_the_outer_update(self):
    with jax.enable_x64(True):
      params, alpha, x, y, meta_x, meta_y = self._setup(jnp.float64)
      # A large rate step drives some rates below zero: their weights must
      # not move, the others move by max(0, alpha') * g.
      got = maml.lamaml_update(_mse, params, alpha, x, y, meta_x, meta_y,
                               lr_learning_rate=50.0)
      neg = jax.tree.map(lambda a: np.asarray(a) < 0, got.inner_lr)
      self.assertGreater(sum(int(n.sum()) for n in jax.tree.leaves(neg)), 0)
      self.assertGreater(
          sum(int((~n).sum()) for n in jax.tree.leaves(neg)), 0)
      for p, q, n in zip(jax.tree.leaves(params), jax.tree.leaves(got.params),
                         jax.tree.leaves(neg)):
        np.testing.assert_array_equal(np.asarray(q)[n], np.asarray(p)[n])
      want = _lamaml_reference(_mse, params, alpha, x, y, meta_x, meta_y,
                               50.0)
      _close(got.params, want[0], rtol=1e-10, atol=1e-12)

  def test_step_weights_first_order_clipping_and_scalar_rate(self):
    params, alpha, x, y, meta_x, meta_y = self._setup()
    w = jnp.full(4, 0.25)
    got = maml.lamaml_update(_mse, params, alpha, x, y, meta_x, meta_y,
                             lr_learning_rate=0.3, step_weights=w)
    want = _lamaml_reference(_mse, params, alpha, x, y, meta_x, meta_y, 0.3,
                             weights=[0.25] * 4)
    _close(got.params, want[0], rtol=1e-4, atol=1e-6)
    _close(got.inner_lr, want[1], rtol=1e-4, atol=1e-6)
    # max_grad_norm: both gradients clipped to norm 1 before the updates.
    clipped = maml.lamaml_update(_mse, params, alpha, x, y, meta_x, meta_y,
                                 lr_learning_rate=0.3, max_grad_norm=1e-3)
    step = jax.tree.map(lambda a, b: (a - b) / 0.3, alpha, clipped.inner_lr)
    self.assertAlmostEqual(float(optax.tree.norm(step)), 1e-3, delta=1e-7)
    # first_order: the inner gradients are constants.
    fo = maml.lamaml_update(_mse, params, alpha, x, y, meta_x, meta_y,
                            lr_learning_rate=0.3, first_order=True)
    want_fo = _lamaml_reference(_mse, params, alpha, x, y, meta_x, meta_y,
                                0.3, first_order=True)
    _close(fo.params, want_fo[0], rtol=1e-4, atol=1e-6)
    _close(fo.inner_lr, want_fo[1], rtol=1e-4, atol=1e-6)
    self.assertGreater(
        _max_abs(jax.tree.map(jnp.subtract, fo.inner_lr, want[1])), 1e-7)
    # One scalar rate for every parameter: its gradient is the sum of the
    # per-leaf scalar rates' gradients.
    scalar = maml.lamaml_update(_mse, params, jnp.asarray(0.01), x, y,
                                meta_x, meta_y, lr_learning_rate=0.1)
    per_leaf = _lamaml_reference(
        _mse, params, jax.tree.map(lambda p: jnp.asarray(0.01), params), x, y,
        meta_x, meta_y, 0.1)
    grad_sum = sum((0.01 - float(a)) / 0.1
                   for a in jax.tree.leaves(per_leaf[1]))
    self.assertEqual(np.shape(scalar.inner_lr), ())
    _close(scalar.inner_lr, 0.01 - 0.1 * grad_sum, rtol=1e-4)

  def test_compiles_once_across_stream_batches(self):
    params, alpha, x, y, meta_x, meta_y = self._setup()
    update = jax.jit(lambda p, a, x, y, mx, my: maml.lamaml_update(
        _mse, p, a, x, y, mx, my, lr_learning_rate=0.3))
    out = update(params, alpha, x, y, meta_x, meta_y)
    for _ in range(2):
      out = update(out.params, out.inner_lr, x + 1.0, y, meta_x, meta_y)
    self.assertEqual(update._cache_size(), 1)
    self.assertTrue(all(np.all(np.isfinite(l)) for l in jax.tree.leaves(out)))

  def test_bad_arguments_raise(self):
    params, alpha, x, y, meta_x, meta_y = self._setup()
    with self.assertRaisesRegex(ValueError, 'lr_learning_rate'):
      maml.lamaml_update(_mse, params, alpha, x, y, meta_x, meta_y,
                         lr_learning_rate=0.0)
    with self.assertRaisesRegex(ValueError, 'meta_x and meta_y'):
      maml.lamaml_update(_mse, params, alpha, x, y, meta_x, meta_y[:2],
                         lr_learning_rate=0.1)
    with self.assertRaisesRegex(ValueError, 'inner_lr'):
      maml.lamaml_update(_mse, params, alpha[:2], x, y, meta_x, meta_y,
                         lr_learning_rate=0.1)


class UnderJitTest(chex.TestCase):
  """Bad input raises the same errors under jit; same shapes compile once."""

  def test_errors_under_jit_and_no_retrace(self):
    params = _mlp_init(jax.random.key(0))
    stream = _sequential_tasks(jax.random.key(20), num_tasks=2, steps=3)
    x, y = stream.support_x, stream.support_y
    with self.assertRaisesRegex(ValueError, 'within_batch_rate'):
      jax.jit(lambda p: maml.mer_update(
          _mse, p, x, y, inner_lr=0.1, within_batch_rate=0.0,
          across_batch_rate=1.0))(params)
    with self.assertRaisesRegex(ValueError, 'meta_x and meta_y'):
      jax.jit(lambda p: maml.lamaml_update(
          _mse, p, 0.01, x[0], y[0], stream.query_x[0],
          stream.query_y[0, :2], lr_learning_rate=0.1))(params)
    with self.assertRaisesRegex(
        ValueError, re.escape('with sequential_support=True, x must be '
                              '[num_inner_steps, ...]')):
      jax.jit(lambda p: maml.inner_adapt(
          _mse, p, x[0], y[0], inner_lr=0.01, num_inner_steps=2,
          sequential_support=True))(params)
    mer = jax.jit(lambda p, x, y: maml.mer_update(
        _mse, p, x, y, inner_lr=0.01, within_batch_rate=0.5,
        across_batch_rate=1.0))
    out = mer(params, x, y)
    mer(out, x + 1.0, y)
    self.assertEqual(mer._cache_size(), 1)
