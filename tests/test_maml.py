"""Tests for metacf.maml: closed forms, hand-unrolled references, finite differences."""

import os
import re
import subprocess
import sys
import textwrap

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from metacf import maml

# optax's adam adds its int32 step count to floats, which strict dtype
# promotion (tests/conftest.py) rejects; that code is optax's, not ours.
_optax_promotion = lambda: jax.numpy_dtype_promotion('standard')

# ---------------------------------------------------------------------------
# A small tanh MLP and sinusoid-like tasks, float64 in the exactness tests.


def _mlp_init(key, sizes=(1, 8, 8, 1), dtype=jnp.float32):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    kw, kb = jax.random.split(k)
    params.append({'w': jax.random.normal(kw, (m, n), dtype) / np.sqrt(m),
                   'b': 0.1 * jax.random.normal(kb, (n,), dtype)})
  return params


def _mlp_apply(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer['w'] + layer['b'][None, :])
  return x @ params[-1]['w'] + params[-1]['b'][None, :]


def _mse(params, x, y):
  return jnp.mean((_mlp_apply(params, x) - y) ** 2)


def _tasks(key, num_tasks=3, shots=5, dtype=jnp.float32):
  k_amp, k_phase, k_s, k_q = jax.random.split(key, 4)
  amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), dtype, 0.1, 5.0)
  phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), dtype, 0.0, np.pi)
  xs = jax.random.uniform(k_s, (num_tasks, shots, 1), dtype, -5.0, 5.0)
  xq = jax.random.uniform(k_q, (num_tasks, shots, 1), dtype, -5.0, 5.0)
  return maml.Task(xs, amp * jnp.sin(xs - phase), xq,
                   amp * jnp.sin(xq - phase))


def _tree_allclose(a, b, **kw):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _reference_meta_loss(loss_fn, params, tasks, lr, steps, first_order=False,
                         mask=None):
  """Python loop over tasks and inner steps, no scan, no vmap."""
  total = 0.0
  leaves_mask = (jax.tree.leaves(mask) if mask is not None else None)
  for b in range(tasks.support_x.shape[0]):
    p = params
    for _ in range(steps):
      g = jax.grad(loss_fn)(p, tasks.support_x[b], tasks.support_y[b])
      if first_order:
        g = jax.lax.stop_gradient(g)
      lr_tree = (lr if not jax.tree_util.treedef_is_leaf(
          jax.tree.structure(lr)) else
                 jax.tree.map(lambda _: lr, p))
      new = jax.tree.map(lambda w, gw, a: w - a * gw, p, g, lr_tree)
      if leaves_mask is not None:
        flat_new = jax.tree.leaves(new)
        flat_old = jax.tree.leaves(p)
        new = jax.tree.unflatten(
            jax.tree.structure(p),
            [n if m else o for n, o, m in zip(flat_new, flat_old, leaves_mask)])
      p = new
    total = total + loss_fn(p, tasks.query_x[b], tasks.query_y[b])
  return total / tasks.support_x.shape[0]


class InnerAdaptTest(chex.TestCase):

  def test_closed_form_second_order_linear_regression(self):
    # L(w; X, y) = 0.5 |X w - y|^2 / n: one step gives w' = w - a (A_s w - b_s)
    # and the meta-gradient (I - a A_s)^T grad L_q(w').
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      xs, xq = rng.normal(size=(6, 4)), rng.normal(size=(7, 4))
      ys, yq = rng.normal(size=6), rng.normal(size=7)
      w = rng.normal(size=4)
      a = 0.3
      loss = lambda w, x, y: 0.5 * jnp.mean((x @ w - y) ** 2)
      tasks = maml.Task(xs[None], ys[None], xq[None], yq[None])
      got = jax.grad(lambda p: maml.maml_loss(loss, p, tasks, inner_lr=a))(w)
      a_s, b_s = xs.T @ xs / 6, xs.T @ ys / 6
      w1 = w - a * (a_s @ w - b_s)
      grad_q = xq.T @ (xq @ w1 - yq) / 7
      want = (np.eye(4) - a * a_s).T @ grad_q
      np.testing.assert_allclose(got, want, rtol=1e-12)
      first = jax.grad(lambda p: maml.maml_loss(
          loss, p, tasks, inner_lr=a, first_order=True))(w)
      np.testing.assert_allclose(first, grad_q, rtol=1e-12)
      self.assertGreater(np.abs(first - want).max(), 1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sgd_steps_match_python_loop(self):
    params = _mlp_init(jax.random.key(0))
    task = jax.tree.map(lambda a: a[0], _tasks(jax.random.key(1)))
    got = self.variant(lambda p, x, y: maml.inner_adapt(
        _mse, p, x, y, inner_lr=0.01, num_inner_steps=3))(params, task.support_x,
                                                    task.support_y)
    want = params
    for _ in range(3):
      g = jax.grad(_mse)(want, task.support_x, task.support_y)
      want = jax.tree.map(lambda w, gw: w - 0.01 * gw, want, g)
    _tree_allclose(got, want, rtol=1e-6, atol=1e-7)

  def test_adapt_mask_leaves_untouched_leaves_bit_identical(self):
    params = _mlp_init(jax.random.key(0))
    task = jax.tree.map(lambda a: a[0], _tasks(jax.random.key(1)))
    mask = [{'w': False, 'b': False}, {'w': False, 'b': True},
            {'w': True, 'b': True}]
    out = jax.jit(lambda p: maml.inner_adapt(
        _mse, p, task.support_x, task.support_y, inner_lr=0.1, num_inner_steps=2,
        adapt_mask=mask))(params)
    for m_layer, p_layer, o_layer in zip(mask, params, out):
      for name in ('w', 'b'):
        if m_layer[name]:
          self.assertFalse(np.array_equal(p_layer[name], o_layer[name]))
        else:
          np.testing.assert_array_equal(p_layer[name], o_layer[name])

  def test_zero_steps_and_zero_lr_are_identity(self):
    params = _mlp_init(jax.random.key(0))
    task = jax.tree.map(lambda a: a[0], _tasks(jax.random.key(1)))
    out = maml.inner_adapt(_mse, params, task.support_x, task.support_y,
                           inner_lr=0.1, num_inner_steps=0)
    _tree_allclose(out, params, rtol=0, atol=0)
    out = maml.inner_adapt(_mse, params, task.support_x, task.support_y,
                           inner_lr=0.0, num_inner_steps=3)
    _tree_allclose(out, params, rtol=0, atol=0)

  def test_optax_sgd_inner_optimizer_equals_inner_lr(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    # Jitted: one compilation each, not one per eager op.
    a = jax.jit(jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.02, num_inner_steps=2)))(params)
    b = jax.jit(jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_optimizer=optax.sgd(0.02),
        num_inner_steps=2)))(params)
    _tree_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_bad_inputs(self):
    params = _mlp_init(jax.random.key(0))
    x, y = jnp.zeros((5, 1)), jnp.zeros((5, 1))
    with self.assertRaisesRegex(ValueError,
                                'inner_adapt: num_inner_steps must be >= 0, got -1'):
      maml.inner_adapt(_mse, params, x, y, inner_lr=0.1, num_inner_steps=-1)
    with self.assertRaisesRegex(
        ValueError, 'inner_adapt: inner_lr must have the same pytree '
        'structure as params'):
      maml.inner_adapt(_mse, params, x, y, inner_lr=[0.1, 0.1])
    with self.assertRaisesRegex(
        ValueError, 'inner_adapt: adapt_mask must have the same pytree '
        'structure as params'):
      maml.inner_adapt(_mse, params, x, y, inner_lr=0.1, adapt_mask=[True])
    with self.assertRaisesRegex(
        ValueError, 'inner_adapt: exactly one of inner_lr and inner_optimizer'):
      maml.inner_adapt(_mse, params, x, y)
    with self.assertRaisesRegex(ValueError, 'inner_lr leaves must be scalars '
                                'or match the shape'):
      maml.inner_adapt(_mse, params, x, y, inner_lr=jax.tree.map(
          lambda p: jnp.ones(3), params))

  def test_num_steps_is_a_deprecated_alias(self):
    params = _mlp_init(jax.random.key(0))
    task = jax.tree.map(lambda a: a[0], _tasks(jax.random.key(1)))
    args = (_mse, params, task.support_x, task.support_y)
    want = maml.inner_adapt(*args, inner_lr=0.1, num_inner_steps=2)
    deprecation = re.escape(
        'inner_adapt: num_steps is deprecated and will be removed in the '
        'next release; use num_inner_steps (as in maml_loss).')
    with pytest.warns(DeprecationWarning, match=deprecation):
      got = maml.inner_adapt(*args, inner_lr=0.1, num_steps=2)
    _tree_allclose(got, want, rtol=0, atol=0)
    # Under jit too (the warning is emitted at trace time).
    with pytest.warns(DeprecationWarning, match=deprecation):
      got = jax.jit(lambda p: maml.inner_adapt(
          _mse, p, task.support_x, task.support_y, inner_lr=0.1,
          num_steps=2))(params)
    _tree_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.warns(DeprecationWarning, match=deprecation):
      with self.assertRaisesRegex(ValueError, re.escape(
          'inner_adapt: num_steps must be >= 0, got -1.')):
        maml.inner_adapt(*args, inner_lr=0.1, num_steps=-1)
    with pytest.warns(DeprecationWarning, match=deprecation):
      with self.assertRaisesRegex(TypeError, re.escape(
          'inner_adapt: num_steps is a deprecated alias of num_inner_steps '
          'and must not be given with it, got num_steps=2 and '
          'num_inner_steps=3.')):
        maml.inner_adapt(*args, inner_lr=0.1, num_steps=2, num_inner_steps=3)

  def test_num_inner_steps_matches_maml_loss(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    task = jax.tree.map(lambda a: a[0], tasks)
    adapted = maml.inner_adapt(_mse, params, task.support_x, task.support_y,
                               inner_lr=0.05, num_inner_steps=3)
    want = _mse(adapted, task.query_x, task.query_y)
    got = maml.maml_loss(_mse, params, jax.tree.map(lambda a: a[:1], tasks),
                         inner_lr=0.05, num_inner_steps=3)
    np.testing.assert_allclose(got, want, rtol=1e-5)


class MamlLossTest(chex.TestCase):

  @parameterized.named_parameters(('one_step', 1), ('three_steps', 3))
  def test_second_order_matches_hand_unrolled_reference_float64(self, steps):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), dtype=jnp.float64)
      got_loss, got = jax.value_and_grad(lambda p: maml.maml_loss(
          _mse, p, tasks, inner_lr=0.01, num_inner_steps=steps))(params)
      want_loss, want = jax.value_and_grad(lambda p: _reference_meta_loss(
          _mse, p, tasks, 0.01, steps))(params)
      np.testing.assert_allclose(got_loss, want_loss, rtol=1e-12)
      _tree_allclose(got, want, rtol=1e-10, atol=1e-12)

  def test_meta_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), dtype=jnp.float64)
      check_grads(jax.jit(lambda p: maml.maml_loss(
          _mse, p, tasks, inner_lr=0.01, num_inner_steps=2)),
                  (params,), order=1, modes=('rev',))

  def test_first_order_equals_stop_gradient_reference_and_differs(self):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), dtype=jnp.float64)
      fo = jax.jit(jax.grad(lambda p: maml.maml_loss(
          _mse, p, tasks, inner_lr=0.05, num_inner_steps=2,
          first_order=True)))(params)
      ref = jax.jit(jax.grad(lambda p: _reference_meta_loss(
          _mse, p, tasks, 0.05, 2, first_order=True)))(params)
      so = jax.jit(jax.grad(lambda p: maml.maml_loss(
          _mse, p, tasks, inner_lr=0.05, num_inner_steps=2)))(params)
      _tree_allclose(fo, ref, rtol=1e-10, atol=1e-12)
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree.leaves(fo), jax.tree.leaves(so)))
      self.assertGreater(diff, 1e-4)

  def test_meta_sgd_learning_rate_gradients(self):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), dtype=jnp.float64)
      lrs = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
      loss = lambda p, a: maml.maml_loss(_mse, p, tasks, inner_lr=a,
                                         num_inner_steps=2)
      g_p, g_lr = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, lrs)
      r_p, r_lr = jax.jit(jax.grad(lambda p, a: _reference_meta_loss(
          _mse, p, tasks, a, 2), argnums=(0, 1)))(params, lrs)
      _tree_allclose(g_p, r_p, rtol=1e-10, atol=1e-12)
      _tree_allclose(g_lr, r_lr, rtol=1e-10, atol=1e-12)
      check_grads(jax.jit(lambda a: loss(params, a)), (lrs,), order=1,
                  modes=('rev',))

  def test_anil_matches_reference(self):
    with jax.enable_x64(True):
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), dtype=jnp.float64)
      mask = [{'w': False, 'b': False}, {'w': False, 'b': False},
              {'w': True, 'b': True}]
      got = jax.jit(jax.grad(lambda p: maml.maml_loss(
          _mse, p, tasks, inner_lr=0.05, num_inner_steps=2,
          adapt_mask=mask)))(params)
      want = jax.jit(jax.grad(lambda p: _reference_meta_loss(
          _mse, p, tasks, 0.05, 2, mask=mask)))(params)
      _tree_allclose(got, want, rtol=1e-10, atol=1e-12)

  def test_remat_gives_same_gradients(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    grads = [jax.jit(jax.grad(lambda p, r=r: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.01, num_inner_steps=4, remat=r)))(params)
             for r in (False, True)]
    _tree_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)

  def test_zero_inner_steps_is_plain_query_loss(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    got = maml.maml_loss(_mse, params, tasks, inner_lr=0.5, num_inner_steps=0)
    want = np.mean([_mse(params, tasks.query_x[b], tasks.query_y[b])
                    for b in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_optax_adam_inner_loop_is_differentiable(self):
    with jax.enable_x64(True), _optax_promotion():
      params = _mlp_init(jax.random.key(0), dtype=jnp.float64)
      tasks = _tasks(jax.random.key(1), dtype=jnp.float64)
      check_grads(jax.jit(lambda p: maml.maml_loss(
          _mse, p, tasks, inner_optimizer=optax.adam(0.01),
          num_inner_steps=2)), (params,), order=1, modes=('rev',))

  def test_batchnorm_conv_model_under_vmap(self):
    # A Conv + transductive BatchNorm model: vmap over tasks equals a loop.
    def apply(params, x):
      y = jax.lax.conv_general_dilated(x, params['conv'], (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO',
                                                          'NHWC'))
      mean = jnp.mean(y, axis=(0, 1, 2), keepdims=True)
      var = jnp.var(y, axis=(0, 1, 2), keepdims=True)
      y = ((y - mean) / jnp.sqrt(var + 1e-5) * params['scale'][None, None, None]
           + params['bias'][None, None, None])
      y = jax.nn.relu(y).mean(axis=(1, 2))
      return y @ params['head']

    def loss(params, x, y):
      return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
          apply(params, x), y))

    with jax.enable_x64(True):
      key = jax.random.key(0)
      k1, k2, k3, k4 = jax.random.split(key, 4)
      params = {'conv': 0.3 * jax.random.normal(k1, (3, 3, 1, 4), jnp.float64),
                'scale': jnp.ones(4, jnp.float64),
                'bias': jnp.zeros(4, jnp.float64),
                'head': jax.random.normal(k2, (4, 3), jnp.float64)}
      xs = jax.random.normal(k3, (2, 6, 5, 5, 1), jnp.float64)
      xq = jax.random.normal(k4, (2, 6, 5, 5, 1), jnp.float64)
      ys = jnp.tile(jnp.arange(3, dtype=jnp.int32), (2, 2))
      tasks = maml.Task(xs, ys, xq, ys)
      got = jax.jit(jax.grad(lambda p: maml.maml_loss(
          loss, p, tasks, inner_lr=0.4)))(params)
      want = jax.jit(jax.grad(lambda p: _reference_meta_loss(
          loss, p, tasks, 0.4, 1)))(params)
      _tree_allclose(got, want, rtol=1e-9, atol=1e-12)

  def test_bad_inputs(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    bad = tasks._replace(query_x=tasks.query_x[:2], query_y=tasks.query_y[:2])
    with self.assertRaisesRegex(
        ValueError, 'maml_loss: tasks fields must have the same leading '
        r'\(task\) size'):
      maml.maml_loss(_mse, params, bad, inner_lr=0.1)
    with self.assertRaisesRegex(
        ValueError, 'maml_loss: num_inner_steps must be >= 0, got -2'):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.1, num_inner_steps=-2)
    with self.assertRaisesRegex(ValueError, 'maml_loss: inner_lr must have the '
                                'same pytree structure as params'):
      maml.maml_loss(_mse, params, tasks, inner_lr={'a': 0.1})
    with self.assertRaisesRegex(ValueError, 'maml_loss: adapt_mask must have '
                                'the same pytree structure as params'):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.1, adapt_mask=[True])
    with self.assertRaisesRegex(TypeError, 'maml_loss: tasks must be a '
                                r'metacf.maml.Task'):
      maml.maml_loss(_mse, params, tuple(tasks), inner_lr=0.1)

  @parameterized.named_parameters(
      ('support_x_1d', 'support_x', (4,), ''),
      ('support_y_scalar', 'support_y', (), ''),
      ('query_x_dict_leaf', 'query_x', (4,), "['a']"),
      ('query_y_1d', 'query_y', (4,), ''))
  def test_task_leaf_with_fewer_than_two_axes_raises(self, field, shape,
                                                      path):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    leaf = jnp.zeros(shape)
    bad = tasks._replace(**{field: {'a': leaf} if path else leaf})
    message = (f'maml_loss: tasks.{field}{path} must have at least 2 axes, '
               f'[num_tasks, num_examples, ...], got shape {shape}.')
    with self.assertRaisesRegex(ValueError, re.escape(message)):
      maml.maml_loss(_mse, params, bad, inner_lr=0.1)
    step = maml.make_meta_train_step(_mse, optax.sgd(0.1), inner_lr=0.1)
    with self.assertRaisesRegex(ValueError, re.escape(
        message.replace('maml_loss', 'make_meta_train_step'))):
      step(params, optax.sgd(0.1).init(params), bad)

  def test_task_field_leaves_must_share_the_task_axis(self):
    params = _mlp_init(jax.random.key(0))
    tasks = _tasks(jax.random.key(1))
    bad = tasks._replace(support_x={'a': tasks.support_x,
                                    'b': tasks.support_x[:2]})
    with self.assertRaisesRegex(ValueError, re.escape(
        'maml_loss: tasks.support_x must have a leading task axis shared by '
        'all its leaves, got shapes')):
      maml.maml_loss(_mse, params, bad, inner_lr=0.1)


class MetaTrainStepTest(chex.TestCase):

  def _step_and_state(self, **kw):
    params = _mlp_init(jax.random.key(0))
    opt = optax.adam(1e-3)
    step = maml.make_meta_train_step(_mse, opt, inner_lr=0.01,
                                     num_inner_steps=2, **kw)
    return step, params, opt.init(params)

  def test_step_matches_manual_update_and_compiles_once(self):
    with _optax_promotion():
      self._check_step_matches_manual_update_and_compiles_once()

  def _check_step_matches_manual_update_and_compiles_once(self):
    step, params, opt_state = self._step_and_state()
    tasks = _tasks(jax.random.key(1), num_tasks=4)
    grads = jax.jit(jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.01, num_inner_steps=2)))(params)
    updates, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params),
                                         params)
    want = optax.apply_updates(params, updates)
    copy = jax.tree.map(jnp.array, params)
    new_params, opt_state, metrics = step(copy, opt_state, tasks)
    _tree_allclose(new_params, want, rtol=1e-5, atol=1e-7)
    self.assertTrue(np.isfinite(metrics.loss))
    for seed in range(2, 5):
      new_params, opt_state, metrics = step(
          new_params, opt_state, _tasks(jax.random.key(seed), num_tasks=4))
    self.assertEqual(step._cache_size(), 1)

  def test_chunked_accumulation_equals_full_batch(self):
    with _optax_promotion():
      self._check_chunked_accumulation_equals_full_batch()

  def _check_chunked_accumulation_equals_full_batch(self):
    tasks = _tasks(jax.random.key(1), num_tasks=6)
    outs = []
    for chunk in (None, 2, 3):
      step, params, opt_state = self._step_and_state(task_chunk_size=chunk,
                                                     donate=False)
      outs.append(step(params, opt_state, tasks))
    for other in outs[1:]:
      _tree_allclose(other[0], outs[0][0], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(other[2].loss, outs[0][2].loss, rtol=1e-5)
    step, params, opt_state = self._step_and_state(task_chunk_size=4)
    with self.assertRaisesRegex(ValueError, 'task_chunk_size must divide the '
                                'number of tasks, got 4 for 6 tasks'):
      step(params, opt_state, tasks)

  def test_sharded_step_equals_one_device(self):
    script = textwrap.dedent('''
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np, optax
        import tests.test_maml as t
        from metacf import maml
        assert jax.device_count() == 4, jax.devices()
        tasks = t._tasks(jax.random.key(1), num_tasks=8)
        mesh = jax.make_mesh((4,), ("tasks",))
        outs = []
        for m in (None, mesh):
          params = t._mlp_init(jax.random.key(0))
          opt = optax.adam(1e-3)
          step = maml.make_meta_train_step(t._mse, opt, mesh=m, inner_lr=0.01,
                                           num_inner_steps=2)
          p, s, metrics = step(params, opt.init(params), tasks)
          outs.append((p, metrics.loss))
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                    atol=1e-7),
            outs[0][0], outs[1][0])
        np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6)
        print("SHARDED_OK", len(outs[1][0][0]["w"].sharding.device_set))
        ''')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', script], cwd=root,
                            capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('SHARDED_OK 4', result.stdout)
