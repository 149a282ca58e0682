"""Tests for metacf.layers against lax, flax and float64 NumPy references."""

import functools
import re

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax

from experiments.common import models
from metacf import layers
from metacf import maml

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Many small programs compile on a small shared CPU, where XLA's backend
# optimisations cost more time than they save (as in tests/test_jacobian.py).
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _fast_jit(fn):
  return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _normal(seed, shape, dtype=np.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _assert_close(got, want, rtol=1e-12, atol=1e-12):
  """allclose that also fails on NaN/inf (NumPy's treats NaN == NaN)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.all(np.isfinite(got)), 'got has non-finite entries'
  assert np.all(np.isfinite(want)), 'want has non-finite entries'
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def _assert_trees_close(got, want, **kw):
  chex.assert_trees_all_equal_structs(got, want)
  jax.tree.map(lambda a, b: _assert_close(a, b, **kw), got, want)


def _check_grads_order_2(fn, args):
  """check_grads (fwd and rev, order 2) of ``fn`` w.r.t. all of ``args``.

  The arguments are raveled into one vector and ``fn`` is jitted, so
  check_grads' own eager arithmetic runs on one shape (compiled once).
  """
  flat, unravel = ravel_pytree(args)
  flat_fn = jax.jit(lambda v: jnp.ravel(fn(*unravel(v))))
  assert np.all(np.isfinite(flat_fn(flat))), 'non-finite output'
  check_grads(flat_fn, (flat,), order=2, modes=('fwd', 'rev'))


def _primitives(fn, *args):
  """Names of all primitives in ``fn``'s jaxpr, nested jaxprs included."""
  return set(re.findall(r'= ([a-z_]+)\b', str(jax.make_jaxpr(fn)(*args))))


def _conv_shapes(dn, spatial, kernel, batch=2, cin=2, cout=3):
  """Shapes of lhs and rhs laid out as the dimension numbers say."""
  nd = len(spatial)
  if dn is None:
    lhs_spec = 'NC' + 'HWD'[:nd]
    rhs_spec = 'OI' + 'HWD'[:nd]
  else:
    lhs_spec, rhs_spec, _ = dn
  sizes = {'N': batch, 'C': cin, 'I': cin, 'O': cout}
  lhs = [sizes.get(c) for c in lhs_spec]
  rhs = [sizes.get(c) for c in rhs_spec]
  spatial_chars = [c for c in lhs_spec if c not in 'NC']
  kernel_chars = [c for c in rhs_spec if c not in 'OI']
  for c, n in zip(spatial_chars, spatial):
    lhs[lhs_spec.index(c)] = n
  for c, k in zip(kernel_chars, kernel):
    rhs[rhs_spec.index(c)] = k
  return tuple(lhs), tuple(rhs)


# name, dimension_numbers, spatial, kernel, strides, padding, rhs_dilation
_CONV_CASES = (
    ('2d_nhwc_same_s1', _NHWC, (6, 5), (3, 3), (1, 1), 'SAME', None),
    ('2d_nhwc_valid_s2', _NHWC, (7, 6), (3, 3), (2, 2), 'VALID', None),
    ('2d_nhwc_same_lower_s2', _NHWC, (7, 6), (2, 3), (2, 1), 'SAME_LOWER',
     None),
    # Explicit pads, asymmetric and negative (a crop, as lax allows).
    ('2d_nhwc_explicit', _NHWC, (6, 7), (3, 3), (1, 2), ((2, 0), (-1, 3)),
     None),
    ('2d_nhwc_rhs_dilation', _NHWC, (7, 7), (3, 2), (1, 2), 'SAME', (2, 3)),
    ('2d_nchw_default_same', None, (6, 5), (3, 3), (1, 1), 'SAME', None),
    ('2d_nchw_default_valid_s2_dil', None, (8, 7), (2, 3), (2, 1), 'VALID',
     (2, 2)),
    ('2d_mixed_layouts', ('NHWC', 'OIHW', 'NCHW'), (6, 6), (3, 2), (2, 1),
     'SAME', None),
    ('1d_nwc_same_s2', ('NWC', 'WIO', 'NWC'), (9,), (3,), (2,), 'SAME', None),
    ('1d_default_valid_dil', None, (10,), (3,), (1,), 'VALID', (2,)),
    ('3d_ndhwc_same_s2', ('NDHWC', 'DHWIO', 'NDHWC'), (5, 4, 4), (3, 2, 3),
     (2, 1, 2), 'SAME', None),
)


class ConvGeneralDilatedTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_CONV_CASES)
  def test_matches_lax_float64(self, dn, spatial, kernel, strides, padding,
                               rhs_dilation):
    with jax.enable_x64(True):
      lhs_shape, rhs_shape = _conv_shapes(dn, spatial, kernel)
      lhs, rhs = _normal(0, lhs_shape), _normal(1, rhs_shape)
      conv = lambda fn: (lambda l, r: fn(
          l, r, strides, padding, rhs_dilation=rhs_dilation,
          dimension_numbers=dn))
      want = conv(lax.conv_general_dilated)(lhs, rhs)
      got = self.variant(conv(layers.conv_general_dilated))(lhs, rhs)
      self.assertEqual(got.dtype, jnp.float64)
      self.assertGreater(want.size, 0)
      _assert_close(got, want)

  def test_im2col_path_has_no_convolution(self):
    lhs, rhs = _normal(0, (2, 6, 6, 2), np.float32), _normal(1, (3, 3, 2, 4),
                                                             np.float32)
    fn = lambda l, r: layers.conv_general_dilated(l, r, (1, 1), 'SAME',
                                                  dimension_numbers=_NHWC)
    prims = _primitives(jax.vmap(jax.grad(lambda l, r: jnp.sum(fn(l, r) ** 2),
                                          argnums=(0, 1))),
                        lhs[None], rhs[None])
    self.assertIn('dot_general', prims)
    self.assertNotIn('conv_general_dilated', prims)

  @parameterized.named_parameters(
      ('feature_groups', dict(feature_group_count=2), (2, 6, 6, 4),
       (3, 3, 2, 6), 'SAME'),
      ('batch_groups', dict(batch_group_count=2), (4, 6, 6, 3), (3, 3, 3, 4),
       'SAME'),
      # lax takes only explicit padding with lhs_dilation.
      ('lhs_dilation', dict(lhs_dilation=(2, 1)), (2, 5, 5, 3), (3, 2, 3, 2),
       ((1, 2), (0, 1))),
  )
  def test_delegated_cases_equal_lax(self, kwargs, lhs_shape, rhs_shape,
                                     padding):
    with jax.enable_x64(True):
      lhs, rhs = _normal(0, lhs_shape), _normal(1, rhs_shape)
      fn = lambda f: (lambda l, r: f(l, r, (1, 2), padding,
                                     dimension_numbers=_NHWC, **kwargs))
      got = jax.jit(fn(layers.conv_general_dilated))(lhs, rhs)
      want = jax.jit(fn(lax.conv_general_dilated))(lhs, rhs)
      self.assertGreater(want.size, 0)
      self.assertTrue(np.all(np.isfinite(got)))
      np.testing.assert_array_equal(got, want)
      self.assertIn('conv_general_dilated',
                    _primitives(fn(layers.conv_general_dilated), lhs, rhs))

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_per_task_kernels_equals_loop(self):
    with jax.enable_x64(True):
      num_tasks = 3
      lhs = _normal(0, (num_tasks, 2, 6, 5, 2))
      rhs = _normal(1, (num_tasks, 3, 3, 2, 4))
      conv = lambda f: (lambda l, r: f(l, r, (2, 1), 'SAME',
                                       rhs_dilation=(1, 2),
                                       dimension_numbers=_NHWC))
      got = self.variant(jax.vmap(conv(layers.conv_general_dilated)))(lhs, rhs)
      want = np.stack([conv(lax.conv_general_dilated)(lhs[t], rhs[t])
                       for t in range(num_tasks)])
      _assert_close(got, want)
      # A shared (unbatched) kernel under vmap as well.
      shared = self.variant(jax.vmap(conv(layers.conv_general_dilated),
                                     in_axes=(0, None)))(lhs, rhs[0])
      want = np.stack([conv(lax.conv_general_dilated)(lhs[t], rhs[0])
                       for t in range(num_tasks)])
      _assert_close(shared, want)

  @parameterized.named_parameters(
      ('nhwc_same_s2_dilated', _NHWC, (5, 5), (3, 2), (2, 1), 'SAME', (1, 2)),
      ('nchw_default_valid', None, (5, 4), (2, 2), (1, 1), 'VALID', None),
      ('nhwc_explicit', _NHWC, (4, 4), (2, 3), (1, 2), ((1, 0), (2, 1)), None),
  )
  def test_hessians_match_lax(self, dn, spatial, kernel, strides, padding,
                              rhs_dilation):
    with jax.enable_x64(True):
      lhs_shape, rhs_shape = _conv_shapes(dn, spatial, kernel, batch=1)
      lhs, rhs = _normal(0, lhs_shape), _normal(1, rhs_shape)
      conv = lambda f: (lambda l, r: f(
          l, r, strides, padding, rhs_dilation=rhs_dilation,
          dimension_numbers=dn))
      cotangent = _normal(2, conv(lax.conv_general_dilated)(lhs, rhs).shape)
      # tanh: a loss with a non-zero Hessian in both arguments.
      hessian = lambda f: _fast_jit(jax.hessian(lambda l, r: jnp.sum(
          jnp.tanh(conv(f)(l, r)) * cotangent), argnums=(0, 1)))(lhs, rhs)
      want = hessian(lax.conv_general_dilated)
      for block in jax.tree.leaves(want):
        self.assertGreater(np.abs(np.asarray(block)).max(), 1e-3)
      _assert_trees_close(hessian(layers.conv_general_dilated), want,
                          rtol=1e-10, atol=1e-12)

  def test_kernel_larger_than_padded_input(self):
    lhs = jnp.zeros((1, 2, 3, 1))
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'conv_general_dilated: the (dilated) kernel is larger than the '
            'padded input, got spatial input (2, 3) and window (3, 3).')):
      layers.conv_general_dilated(lhs, jnp.zeros((3, 3, 1, 1)), (1, 1),
                                  'VALID', dimension_numbers=_NHWC)
    # Dilation makes a 2x2 kernel span 3x3; explicit padding is counted.
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'conv_general_dilated: the (dilated) kernel is larger than the '
            'padded input, got spatial input (2, 4) and window (2, 2).')):
      layers.conv_general_dilated(lhs, jnp.zeros((2, 2, 1, 1)), (1, 1),
                                  ((0, 0), (0, 1)), rhs_dilation=(2, 2),
                                  dimension_numbers=_NHWC)

  def test_rank_mismatch(self):
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'conv_general_dilated: rhs must have the rank of lhs (4), got '
            'shape (3, 3, 1).')):
      layers.conv_general_dilated(jnp.zeros((1, 5, 5, 1)),
                                  jnp.zeros((3, 3, 1)), (1, 1), 'SAME',
                                  dimension_numbers=_NHWC)

  @parameterized.named_parameters(
      ('same_s2_leading_batch_dims',
       dict(kernel_size=(3, 3), strides=2, padding='SAME'), (3, 2, 7, 6, 2)),
      ('valid_dilated', dict(kernel_size=(3, 2), padding='VALID',
                             kernel_dilation=(1, 2)), (2, 7, 7, 2)),
      ('circular_1d', dict(kernel_size=(3,), padding='CIRCULAR',
                           use_bias=False), (2, 8, 3)),
  )
  def test_flax_conv_drop_in(self, kwargs, x_shape):
    with jax.enable_x64(True):
      x = _normal(0, x_shape)
      fast = nn.Conv(4, param_dtype=jnp.float64,
                     conv_general_dilated=layers.conv_general_dilated,
                     **kwargs)
      default = nn.Conv(4, param_dtype=jnp.float64, **kwargs)
      params = _fast_jit(default.init)(jax.random.key(0), x)
      loss = lambda m: (lambda p: jnp.sum(jnp.sin(m.apply(p, x))))
      got = _fast_jit(jax.value_and_grad(loss(fast)))(params)
      want = _fast_jit(jax.value_and_grad(loss(default)))(params)
      _assert_trees_close(got, want, rtol=1e-10, atol=1e-12)
      # The module output itself, not only a reduction of it.
      _assert_close(_fast_jit(fast.apply)(params, x),
                    _fast_jit(default.apply)(params, x))


# name, x_shape, window_shape (strides = window_shape, 'VALID': fast path)
_POOL_CASES = (
    ('2x2_odd_leading_batch_dims', (2, 2, 7, 9, 2), (2, 2)),
    ('1d', (2, 7, 3), (2,)),
    ('3d', (1, 4, 5, 6, 1), (2, 1, 3)),
    ('no_batch_dim_3x2_odd', (7, 5, 2), (3, 2)),
)


def _flax_max_pool(x, window, strides=None, padding='VALID'):
  return nn.max_pool(x, window, window if strides is None else strides,
                     padding)


class MaxPoolTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_POOL_CASES)
  def test_fast_path_matches_flax(self, x_shape, window):
    x = _normal(0, x_shape, np.float32)
    self.assertEqual(np.unique(np.asarray(x)).size, x.size)  # no ties
    pool = self.variant(lambda a: layers.max_pool(a, window, window))
    got, want = pool(x), _flax_max_pool(x, window)
    self.assertEqual(got.dtype, jnp.float32)
    self.assertGreater(want.size, 0)
    self.assertTrue(np.all(np.isfinite(got)))
    np.testing.assert_array_equal(got, want)
    # Gradient of a random projection: the same argmax positions.
    cotangent = _normal(1, want.shape, np.float32)
    grad = lambda f: jax.grad(lambda a: jnp.sum(f(a) * cotangent))
    got_grad = self.variant(grad(lambda a: layers.max_pool(a, window)))(x)
    want_grad = _fast_jit(grad(lambda a: _flax_max_pool(a, window)))(x)
    self.assertEqual(np.count_nonzero(got_grad), want.size)
    np.testing.assert_array_equal(got_grad, want_grad)

  def test_fast_path_avoids_reduce_window_and_equality_derivatives(self):
    x = _normal(0, (3, 2, 6, 6, 2), np.float32)
    loss = lambda a: jnp.sum(jnp.sin(layers.max_pool(a, (2, 2))))
    prims = _primitives(jax.grad(lambda a: jnp.sum(
        jax.grad(loss)(a) ** 2)), x)
    self.assertIn('select_n', prims)
    self.assertFalse(any('window' in p or 'select_and' in p for p in prims),
                     prims)
    # max/reduce_max differentiate through `operand == max`, which XLA's
    # recomputation can break (see test_jit_grad_through_batch_norm).
    self.assertFalse({'max', 'reduce_max', 'eq'} & prims, prims)

  def test_jit_grad_through_batch_norm_matches_reduce_window(self):
    # Regression: pooling by a reshape + jnp.max, or by a chain of lax.max,
    # gave this program a wrong gradient under jit on XLA:CPU (jaxlib 0.10.2;
    # right in eager mode): errors of order 1 in the kernel gradients.
    x = _normal(0, (3, 6, 8, 8, 4), np.float32)
    kernels = [0.3 * _normal(1 + i, (3, 3, 4, 4), np.float32)
               for i in range(2)]
    cotangent = _normal(9, (6, 2, 2, 4), np.float32)

    def loss(pool):
      def fn(kernels, a):
        for kernel in kernels:
          a = layers.conv_general_dilated(a, kernel, (1, 1), 'SAME',
                                          dimension_numbers=_NHWC)
          a = pool(jax.nn.relu(layers.batch_norm(a)), (2, 2), (2, 2))
        return jnp.sum(a * cotangent)
      return jax.vmap(jax.grad(fn, argnums=(0, 1)), in_axes=(None, 0))

    got = jax.jit(loss(layers.max_pool))(kernels, x)
    want = jax.jit(loss(nn.max_pool))(kernels, x)
    _assert_trees_close(got, want, rtol=1e-4, atol=1e-5)

  def test_ties_and_nans_match_flax(self):
    # Ties (ReLU zeros, repeated values): the first maximum of a window gets
    # the gradient, as with reduce_window. NaNs propagate.
    x = np.array(_normal(0, (2, 6, 6, 2), np.float32))
    x[0, :2, :2, 0] = -1.0                 # one window of equal values
    x[0, 2:4, 2:4, 1] = [[0.5, 2.0], [2.0, 0.5]]
    x = jax.nn.relu(jnp.asarray(x))        # and all-zero windows
    cotangent = _normal(1, (2, 3, 3, 2), np.float32)
    grad = lambda f: jax.jit(jax.grad(lambda a: jnp.sum(f(a) * cotangent)))
    got = grad(lambda a: layers.max_pool(a, (2, 2)))(x)
    want = grad(lambda a: _flax_max_pool(a, (2, 2)))(x)
    self.assertTrue(np.all(np.isfinite(got)))
    np.testing.assert_array_equal(got, want)
    with_nan = x.at[1, 1, 0, 1].set(jnp.nan).at[1, 5, 5, 0].set(jnp.nan)
    pooled = layers.max_pool(with_nan, (2, 2))
    np.testing.assert_array_equal(np.isnan(pooled),
                                  np.isnan(_flax_max_pool(with_nan, (2, 2))))
    self.assertEqual(int(np.sum(np.isnan(pooled))), 2)

  def test_default_strides_are_the_window(self):
    x = _normal(0, (2, 7, 6, 2), np.float32)
    got = layers.max_pool(x, (2, 3))
    self.assertEqual(got.shape, (2, 3, 2, 2))
    np.testing.assert_array_equal(got, _flax_max_pool(x, (2, 3), (2, 3)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('overlapping', (2, 7, 6, 2), (3, 3), (2, 1), 'VALID'),
      ('explicit_padding_leading_batch_dims', (3, 2, 5, 6, 2), (2, 3), (2, 2),
       ((1, 0), (0, 2))),
      ('same_leading_batch_dims', (2, 2, 6, 6, 2), (3, 2), (1, 2), 'SAME'),
      ('no_batch_dim_1d', (7, 2), (2,), (1,), ((0, 1),)),
  )
  def test_fallback_matches_flax(self, x_shape, window, strides, padding):
    x = _normal(0, x_shape, np.float32)
    pool = lambda a: layers.max_pool(a, window, strides, padding)
    ref = lambda a: _flax_max_pool(a, window, strides, padding)
    # flax pads only one batch dimension when padding is explicit: vmap it.
    for _ in range(len(x_shape) - len(window) - 2):
      ref = jax.vmap(ref)
    got, want = self.variant(pool)(x), ref(x)
    self.assertGreater(want.size, 0)
    self.assertTrue(np.all(np.isfinite(got)))
    np.testing.assert_array_equal(got, want)
    cotangent = _normal(1, want.shape, np.float32)
    grad = lambda f: jax.grad(lambda a: jnp.sum(f(a) * cotangent))
    got_grad = self.variant(grad(pool))(x)
    self.assertTrue(np.all(np.isfinite(got_grad)))
    np.testing.assert_array_equal(got_grad, _fast_jit(grad(ref))(x))
    self.assertIn('reduce_window_max', _primitives(pool, x))

  def test_errors(self):
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'max_pool: x must have rank >= 3, got shape (4, 4).')):
      layers.max_pool(jnp.zeros((4, 4)), (2, 2))
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'max_pool: window_shape (4, 2) is larger than the spatial shape '
            '(3, 5) of x.')):
      layers.max_pool(jnp.zeros((1, 3, 5, 1)), (4, 2))


def _np_batch_norm(x, scale, offset, epsilon, axis):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axis, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
  y = (x - mean) / np.sqrt(var + epsilon)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if offset is not None:
    y = y + np.asarray(offset, np.float64)
  return y


class BatchNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('plain', (6, 4, 4, 3), False, False, 1e-5, None),
      ('scale', (6, 4, 4, 3), True, False, 1e-5, None),
      ('scale_offset', (6, 4, 4, 3), True, True, 1e-3, None),
      ('large_epsilon', (5, 3), True, True, 0.5, None),
      ('explicit_default_axes', (4, 3, 2, 3), True, True, 1e-5, (0, 1, 2)),
      ('int_axis', (5, 4, 3), True, True, 1e-5, 0),
      ('batch_axis_only', (6, 4, 4, 3), True, True, 1e-5, (0,)),
      ('spatial_axes_only', (2, 4, 5, 3), True, True, 1e-5, (1, 2)),
  )
  def test_matches_numpy_float64(self, shape, use_scale, use_offset, epsilon,
                                 axis):
    with jax.enable_x64(True):
      x = 3.0 + 2.0 * _normal(0, shape)
      scale = 1.0 + _normal(1, shape[-1:]) if use_scale else None
      offset = _normal(2, shape[-1:]) if use_offset else None
      got = self.variant(lambda a, s, o: layers.batch_norm(
          a, s, o, epsilon=epsilon, axis=axis))(x, scale, offset)
      self.assertEqual(got.dtype, jnp.float64)
      np_axis = tuple(range(len(shape) - 1)) if axis is None else axis
      _assert_close(got, _np_batch_norm(x, scale, offset, epsilon, np_axis),
                    rtol=1e-12, atol=1e-12)

  def test_normalises_each_feature(self):
    x = 5.0 + 3.0 * _normal(0, (8, 3, 3, 4), np.float32)
    y = layers.batch_norm(x, epsilon=1e-6)
    self.assertEqual(y.dtype, jnp.float32)
    _assert_close(np.mean(y, axis=(0, 1, 2)), np.zeros(4), atol=1e-5)
    _assert_close(np.var(np.asarray(y, np.float64), axis=(0, 1, 2)),
                  np.ones(4), rtol=1e-4)

  @parameterized.named_parameters(
      ('default_axes', (5, 3, 2, 3), None),
      ('batch_axis_only', (6, 2, 3), (0,)),
      ('negative_int_axis', (4, 5, 3), -2),
  )
  def test_derivatives_match_autodiff_of_the_formula_float64(self, shape,
                                                              axis):
    # The custom_jvp rule against autodiff of the textbook formula, to third
    # order (MAML differentiates the inner gradient once more).
    with jax.enable_x64(True):
      x = 0.5 + _normal(0, shape)
      scale = 1.0 + 0.3 * _normal(1, shape[-1:])
      offset = _normal(2, shape[-1:])
      w = _normal(3, shape)
      np_axis = (tuple(range(len(shape) - 1)) if axis is None else
                 (axis % len(shape),) if isinstance(axis, int) else axis)

      def formula(a, s, o):
        mean = jnp.mean(a, axis=np_axis, keepdims=True)
        var = jnp.mean(jnp.square(a - mean), axis=np_axis, keepdims=True)
        bcast = (1,) * (len(shape) - 1) + (-1,)
        return ((a - mean) / jnp.sqrt(var + 1e-3) * s.reshape(bcast)
                + o.reshape(bcast))

      def loss(norm, a, s, o):
        return jnp.sum(w * jnp.tanh(norm(a, s, o)))

      ours = functools.partial(loss, lambda a, s, o: layers.batch_norm(
          a, s, o, epsilon=1e-3, axis=axis))
      ref = functools.partial(loss, formula)
      args = (x, scale, offset)
      v = _normal(4, shape)

      @functools.partial(jax.jit, static_argnums=0)
      def derivatives(f):
        third = jax.jvp(jax.hessian(lambda a: f(a, scale, offset)), (x,),
                        (v,))[1]
        return (jax.grad(f, argnums=(0, 1, 2))(*args),
                jax.hessian(f, argnums=(0, 1, 2))(*args), third)

      for got, want, tol in zip(derivatives(ours), derivatives(ref),
                                (1e-10, 1e-9, 1e-8)):
        _assert_trees_close(got, want, rtol=tol, atol=tol * 1e-2)
      _check_grads_order_2(lambda a, s, o: layers.batch_norm(
          a, s, o, epsilon=1e-3, axis=axis), args)

  @parameterized.named_parameters(('offset_3', (75, 28, 28, 8), 3.0),
                                  ('offset_100', (4096, 4), 100.0))
  def test_float32_output_has_zero_mean_to_rounding(self, shape, offset):
    # The shifted two-moment statistics centre xhat to float32 rounding
    # (one pass of plain mean-then-subtract leaves 3e-7 and 3e-6 here, which
    # MAML's second-order meta-gradient amplifies).
    x = offset + np.random.default_rng(0).normal(size=shape)
    y = jax.jit(layers.batch_norm)(jnp.asarray(x, jnp.float32))
    means = np.asarray(y, np.float64).mean(axis=tuple(range(len(shape) - 1)))
    self.assertLess(np.max(np.abs(means)), 5e-8)
    _assert_close(y, _np_batch_norm(x, None, None, 1e-5,
                                    tuple(range(len(shape) - 1))),
                  rtol=0, atol=5e-6)

  def test_float32_gradient_matches_float64(self):
    rng = np.random.default_rng(0)
    x64 = 50.0 + rng.normal(size=(64, 8, 8, 4))
    w64 = rng.normal(size=(64, 8, 8, 4))
    loss = lambda a, w: jnp.sum(w * layers.batch_norm(a))
    with jax.enable_x64(True):
      ref = np.asarray(jax.grad(loss)(jnp.asarray(x64), jnp.asarray(w64)))
    got = np.asarray(jax.grad(loss)(jnp.asarray(x64, jnp.float32),
                                    jnp.asarray(w64, jnp.float32)))
    self.assertTrue(np.all(np.isfinite(got)))
    scale = np.max(np.abs(ref))
    self.assertLess(np.max(np.abs(got - ref)) / scale, 1e-5)

  @parameterized.named_parameters(('zero', 0.0), ('negative', -1e-5),
                                  ('nan', float('nan')))
  def test_bad_epsilon(self, epsilon):
    with self.assertRaisesRegex(
        ValueError, re.escape(
            f'batch_norm: epsilon must be > 0, got {epsilon!r}.')):
      layers.batch_norm(jnp.ones((4, 2)), epsilon=epsilon)


class GradientTest(chex.TestCase):

  def test_check_grads_order_2_through_conv_batch_norm_max_pool(self):
    # One check_grads (each costs many compilations) through all three
    # layers, w.r.t. every input: conv (stride, dilation, 'SAME'), batch_norm
    # with scale and offset, the fast max_pool path dropping a trailing row,
    # and tanh, so that second derivatives are not zero.
    def block(lhs, rhs, scale, offset):
      y = layers.conv_general_dilated(lhs, rhs, (2, 1), 'SAME',
                                      rhs_dilation=(1, 2),
                                      dimension_numbers=_NHWC)
      y = layers.batch_norm(y, scale, offset, epsilon=1e-3)
      return jnp.tanh(layers.max_pool(y, (2, 2)))

    with jax.enable_x64(True):
      args = (_normal(0, (2, 5, 6, 2)), _normal(1, (2, 2, 2, 3)),
              1.0 + 0.3 * _normal(2, (3,)), _normal(3, (3,)))
      self.assertEqual(block(*args).shape, (2, 1, 3, 3))
      _check_grads_order_2(block, args)


class NoRetraceTest(chex.TestCase):

  def test_compiles_once_for_same_shapes(self):

    @jax.jit
    @chex.assert_max_traces(n=1)
    def block(x, kernel, scale, offset):
      y = layers.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                      dimension_numbers=_NHWC)
      y = layers.batch_norm(y, scale, offset)
      return layers.max_pool(jax.nn.relu(y), (2, 2))

    outs = []
    for seed in range(3):
      out = block(_normal(seed, (2, 6, 6, 1), np.float32),
                  _normal(seed + 10, (3, 3, 1, 4), np.float32),
                  _normal(seed + 20, (4,), np.float32),
                  _normal(seed + 30, (4,), np.float32))
      self.assertEqual(out.shape, (2, 3, 3, 4))
      self.assertTrue(np.all(np.isfinite(out)))
      outs.append(out)
    self.assertFalse(np.array_equal(outs[0], outs[1]))
    self.assertEqual(block._cache_size(), 1)


def _episode_tasks(num_tasks=3, ways=3, shots=2, size=16):
  xs = _normal(0, (num_tasks, ways * shots, size, size, 1))
  xq = _normal(1, (num_tasks, ways * shots, size, size, 1))
  y = jnp.tile(jnp.arange(ways, dtype=jnp.int32), (num_tasks, shots))
  return maml.Task(xs, y, xq, y)


class Conv4FastTest(chex.TestCase):

  def test_fast_and_default_agree_on_function_and_meta_gradient(self):
    # A hand-written fast layer once gave a wrong meta-gradient: the fast
    # Conv-4 must match flax's conv and pool in value, logits and the
    # second-order MAML meta-gradient, in float64. (This configuration failed
    # with the earlier reshape + jnp.max pool.) The bookkeeping below is
    # NumPy: every eager jnp op on a new shape would be one more compilation.
    fast = models.Conv4(num_classes=3, features=4, fast=True)
    default = models.Conv4(num_classes=3, features=4, fast=False)
    # Initialised in float32 (outside x64, where flax's initializers would mix
    # float32 and float64 params), then cast: everything below is float64.
    # Both variants have the same parameters (flax's apply would reject a
    # missing one); they are initialised once.
    x32 = jnp.zeros((1, 16, 16, 1), jnp.float32)
    params32 = _fast_jit(default.init)(jax.random.key(0), x32)['params']
    params = jax.tree.map(lambda p: np.asarray(p, np.float64),
                                    params32)
    with jax.enable_x64(True):
      tasks = _episode_tasks(num_tasks=2, ways=3, shots=2)

      def meta_loss(model):
        def loss_fn(p, x, y):
          return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
              model.apply({'params': p}, x), y))

        def loss_and_logits(p):
          # The logits ride along (aux): one compilation per model.
          return (maml.maml_loss(loss_fn, p, tasks, inner_lr=0.4),
                  model.apply({'params': p}, tasks.query_x[0]))
        return _fast_jit(jax.value_and_grad(loss_and_logits, has_aux=True))

      fast_meta, default_meta = meta_loss(fast), meta_loss(default)
      (loss_fast, logits_fast), grad_fast = fast_meta(params)
      (loss_default, logits_default), grad_default = default_meta(params)
      self.assertEqual(logits_fast.shape, (6, 3))
      self.assertEqual(loss_fast.dtype, jnp.float64)
      _assert_close(logits_fast, logits_default, rtol=1e-10, atol=1e-12)
      _assert_close(loss_fast, loss_default, rtol=1e-10)
      _assert_trees_close(grad_fast, grad_default, rtol=1e-7, atol=1e-10)
      # Not a vacuous agreement: every layer gets a gradient, except the conv
      # biases, which the BatchNorm after each conv cancels exactly.
      grad_fast = jax.tree.map(np.asarray, grad_fast)
      for path, g in jax.tree.leaves_with_path(grad_fast):
        name = jax.tree_util.keystr(path)
        if 'conv' in name and 'bias' in name:
          self.assertLess(np.abs(g).max(), 1e-12, name)
        else:
          self.assertGreater(np.abs(g).max(), 1e-4, name)
      # And it is the true meta-gradient: a central difference along a
      # random direction (check_grads would compile the meta-gradient again;
      # this reuses the compiled value_and_grad).
      rng = np.random.default_rng(1)
      direction = jax.tree.map(lambda p: rng.normal(size=p.shape),
                                         params)
      step = lambda eps: jax.tree.map(
          lambda p, d: p + eps * d, params, direction)
      eps = 1e-5
      numerical = (float(fast_meta(step(eps))[0][0]) -
                   float(fast_meta(step(-eps))[0][0])) / (2 * eps)
      analytic = sum(float(np.vdot(g, d)) for g, d in zip(
          jax.tree.leaves(grad_fast),
          jax.tree.leaves(direction)))
      self.assertGreater(abs(analytic), 1e-2)
      _assert_close(analytic, numerical, rtol=1e-6)
