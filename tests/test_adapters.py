"""Tests for metacf.adapters: LoRA, soft prompts, freezing, counting.

References are written here without metacf: float64 NumPy for the merged
weights and the unmerged dense layer, closed-form gradients of a linear model
``y = x (W + s a b) + c``, and a plain ``optax.adam`` on the trainable subset
for :func:`freeze`.
"""

import functools
import re

from absl.testing import parameterized
import chex
import equinox as eqx
from flax import linen
from flax import nnx
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import optax

from metacf import adapters
from metacf import masks
from metacf._src import optim

_RTOL32 = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST


def _normal(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _params():
  """Dense kernel, conv kernel, bias and an integer leaf, float32 NumPy."""
  return {
      'dense': {'kernel': _normal(0, (5, 4)), 'bias': _normal(1, (4,))},
      'conv': {'kernel': _normal(2, (3, 3, 2, 6))},
      'step': np.zeros([2, 2], np.int32),
  }


def _with_random_b(lora_params, seed=10):
  """Replaces every b by a random array (a fresh init has b = 0)."""
  def fill(adapter):
    if adapter is None:
      return None
    b = _normal(seed, adapter['b'].shape)
    return {'a': adapter['a'], 'b': jnp.asarray(b)}
  return jax.tree.map(fill, lora_params, is_leaf=_is_adapter)


def _is_adapter(x):
  return x is None or (isinstance(x, dict) and set(x) == {'a', 'b'})


def _merge_reference(w, a, b, alpha):
  """float64 NumPy: W + (alpha / r) (a @ b).reshape(W.shape)."""
  w, a, b = (np.asarray(v, np.float64) for v in (w, a, b))
  rank = a.shape[1]
  scale = 1.0 if alpha is None else alpha / rank
  return w + scale * (a @ b).reshape(w.shape)


def _conv(w, x):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)


# ---------------------------------------------------------------------------
# lora_init


class LoraInitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_dtypes_and_none_off_target(self):
    params = _params()
    params['dense']['kernel'] = params['dense']['kernel'].astype(jnp.bfloat16)
    init = self.variant(functools.partial(adapters.lora_init, rank=2))
    lora = init(jax.random.key(0), params)
    # Default targets: floating, ndim >= 2 (not the bias, not the int leaf).
    self.assertIsNone(lora['dense']['bias'])
    self.assertIsNone(lora['step'])
    self.assertEqual(set(lora['dense']['kernel']), {'a', 'b'})
    chex.assert_shape(lora['dense']['kernel']['a'], (5, 2))
    chex.assert_shape(lora['dense']['kernel']['b'], (2, 4))
    # conv [3, 3, 2, 6]: d_in = 3 * 3 * 2, d_out = 6.
    chex.assert_shape(lora['conv']['kernel']['a'], (18, 2))
    chex.assert_shape(lora['conv']['kernel']['b'], (2, 6))
    self.assertEqual(lora['dense']['kernel']['a'].dtype, jnp.bfloat16)
    self.assertEqual(lora['dense']['kernel']['b'].dtype, jnp.bfloat16)
    self.assertEqual(lora['conv']['kernel']['a'].dtype, jnp.float32)
    for adapter in (lora['dense']['kernel'], lora['conv']['kernel']):
      np.testing.assert_array_equal(np.asarray(adapter['b'], np.float32), 0.0)
      self.assertGreater(float(jnp.max(jnp.abs(adapter['a']))), 0.0)

  def test_a_is_uniform_with_bound_one_over_sqrt_d_in(self):
    params = {'w': np.zeros([64, 16], np.float32)}
    a = np.asarray(adapters.lora_init(jax.random.key(3), params, 16)['w']['a'],
                   np.float64)
    bound = 1.0 / np.sqrt(64)
    self.assertLessEqual(np.max(np.abs(a)), bound)
    self.assertGreater(np.max(np.abs(a)), 0.95 * bound)
    self.assertLess(abs(np.mean(a)), 0.1 * bound)
    # Variance of U(-c, c) is c^2 / 3; 1024 samples.
    np.testing.assert_allclose(np.var(a), bound**2 / 3, rtol=0.1)

  def test_targets_regex_callable_and_pytree(self):
    params = _params()
    key = jax.random.key(0)
    by_regex = adapters.lora_init(key, params, 1, targets=r'^conv/')
    self.assertIsNone(by_regex['dense']['kernel'])
    self.assertIsNotNone(by_regex['conv']['kernel'])
    by_callable = adapters.lora_init(
        key, params, 1, targets=lambda path, leaf: path == 'dense/kernel')
    self.assertIsNotNone(by_callable['dense']['kernel'])
    self.assertIsNone(by_callable['conv']['kernel'])
    mask = jax.tree.map(lambda _: False, params)
    mask['conv']['kernel'] = True
    by_pytree = adapters.lora_init(key, params, 1, targets=mask)
    self.assertEqual(jax.tree.structure(by_pytree),
                     jax.tree.structure(by_regex))
    # One target: its key is split the same way whatever selected it.
    chex.assert_trees_all_equal(by_pytree, by_regex)

  def test_same_key_same_result_different_key_different(self):
    params = {'w1': np.zeros([4, 3], np.float32),
              'w2': np.zeros([4, 3], np.float32)}
    first = adapters.lora_init(jax.random.key(7), params, 2)
    again = adapters.lora_init(jax.random.key(7), params, 2)
    other = adapters.lora_init(jax.random.key(8), params, 2)
    chex.assert_trees_all_equal(first, again)
    self.assertFalse(np.array_equal(first['w1']['a'], other['w1']['a']))
    # Leaves of equal shape get different keys.
    self.assertFalse(np.array_equal(first['w1']['a'], first['w2']['a']))

  def test_no_retrace(self):

    @jax.jit
    @chex.assert_max_traces(n=1)
    def init(key, params):
      return adapters.lora_init(key, params, 2, targets='kernel')

    params = _params()
    init(jax.random.key(0), params)
    params2 = jax.tree.map(lambda x: x + 1, params)
    init(jax.random.key(1), params2)

  def test_bad_inputs(self):
    params = {'b': np.zeros([4], np.float32),
              'w': np.zeros([3, 5], np.float32),
              'i': np.zeros([3, 3], np.int32)}
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_init: rank must be >= 1, got 0.')):
      adapters.lora_init(key, params, 0)
    with self.assertRaisesRegex(TypeError, re.escape(
        'lora_init: rank must be a Python int, got 2.0.')):
      adapters.lora_init(key, params, 2.0)
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: rank must be <= min(d_in, d_out) = 3 for the target 'w' "
        'of shape (3, 5) (d_in = 3, d_out = 5), got 4.')):
      adapters.lora_init(key, params, 4)
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: targets matched no leaf; paths are like 'b', 'i', 'w'.")):
      adapters.lora_init(key, params, 1, targets='kernel')
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: targets matched no leaf; paths are like 'b', 'i', 'w'.")):
      adapters.lora_init(key, params, 1,
                         targets=jax.tree.map(lambda _: False, params))
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_init: targets (default: floating leaves with ndim >= 2 not '
        "named 'bias', 'scale' or 'embedding') matched no leaf; paths are "
        "like 'b'.")):
      adapters.lora_init(key, {'b': params['b']}, 1)
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: targets must select leaves with ndim >= 2, got shape (4,) "
        "at 'b'.")):
      adapters.lora_init(key, params, 1, targets='^b$')
    with self.assertRaisesRegex(TypeError, re.escape(
        "lora_init: targets must select floating leaves, got dtype int32 at "
        "'i'.")):
      adapters.lora_init(key, params, 1, targets='^i$')


# ---------------------------------------------------------------------------
# lora_merge, with_lora


class LoraMergeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('alpha_none', None),
      ('alpha_8', 8.0),
  )
  def test_matches_float64_reference(self, alpha):
    params = _params()
    lora = _with_random_b(adapters.lora_init(jax.random.key(1), params, 2))
    merge = self.variant(functools.partial(adapters.lora_merge, alpha=alpha))
    merged = merge(params, lora)
    for name in ('dense', 'conv'):
      adapter = lora[name]['kernel']
      want = _merge_reference(params[name]['kernel'], adapter['a'],
                              adapter['b'], alpha)
      got = merged[name]['kernel']
      self.assertEqual(got.dtype, jnp.float32)
      chex.assert_shape(got, params[name]['kernel'].shape)
      np.testing.assert_allclose(np.asarray(got, np.float64), want,
                                 rtol=_RTOL32, atol=1e-6)
    # Off-target leaves come back as they are.
    np.testing.assert_array_equal(merged['dense']['bias'],
                                  params['dense']['bias'])
    np.testing.assert_array_equal(merged['step'], params['step'])

  def test_off_target_leaves_are_returned_as_is(self):
    params = _params()
    lora = adapters.lora_init(jax.random.key(1), params, 2)
    merged = adapters.lora_merge(params, lora)
    self.assertIs(merged['dense']['bias'], params['dense']['bias'])
    self.assertIs(merged['step'], params['step'])

  def test_traced_alpha_matches_static_alpha(self):
    params = _params()
    lora = _with_random_b(adapters.lora_init(jax.random.key(1), params, 2))
    static = adapters.lora_merge(params, lora, alpha=3.0)
    traced = jax.jit(lambda al: adapters.lora_merge(params, lora, alpha=al))(
        jnp.float32(3.0))
    chex.assert_trees_all_close(static, traced, rtol=_RTOL32)

  def test_conv_update_has_rank_at_most_r(self):
    params = {'conv': _normal(0, (3, 3, 4, 8))}
    lora = _with_random_b(adapters.lora_init(jax.random.key(2), params, 2))
    merged = adapters.lora_merge(params, lora)
    delta = (np.asarray(merged['conv'], np.float64)
             - params['conv'].astype(np.float64)).reshape(36, 8)
    self.assertEqual(np.linalg.matrix_rank(delta, tol=1e-4), 2)

  def test_zero_b_is_exactly_the_pretrained_model(self):
    params = _params()
    lora = adapters.lora_init(jax.random.key(0), params, 2)
    merged = adapters.lora_merge(params, lora, alpha=16.0)
    chex.assert_trees_all_equal(merged, params)

    def apply_fn(p, x):
      h = _conv(p['conv']['kernel'], x)               # [N, 4, 4, 6]
      h = h[..., :5].mean(axis=(1, 2))                 # [N, 5]
      return h @ p['dense']['kernel'] + p['dense']['bias'][None]

    x = _normal(3, (2, 4, 4, 2))
    want = apply_fn(params, x)
    got = adapters.with_lora(apply_fn, alpha=16.0)(params, lora, x)
    np.testing.assert_array_equal(got, want)

  def test_conv_with_lora_matches_conv_of_reference_kernel(self):
    params = {'kernel': _normal(0, (3, 3, 2, 6))}
    lora = _with_random_b(adapters.lora_init(jax.random.key(4), params, 3))
    x = _normal(1, (2, 5, 5, 2))
    got = jax.jit(adapters.with_lora(lambda p, x: _conv(p['kernel'], x),
                                     alpha=6.0))(params, lora, x)
    w_ref = _merge_reference(params['kernel'], lora['kernel']['a'],
                             lora['kernel']['b'], 6.0).astype(np.float32)
    want = _conv(jnp.asarray(w_ref), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  def test_bad_inputs(self):
    params = {'b': np.zeros([4], np.float32),
              'w': np.zeros([3, 4], np.float32)}
    lora = adapters.lora_init(jax.random.key(0), params, 2)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_merge: lora_params must have the pytree structure of params, '
        "with {'a': ..., 'b': ...} or None in place of each leaf")):
      adapters.lora_merge(params, {'w': lora['w']})
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_merge: lora_params must hold {'a': ..., 'b': ...} or None in "
        'place of each leaf of params (as lora_init returns), got ndarray at '
        "'w'.")):
      adapters.lora_merge(params, {'b': None, 'w': params['w']})
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_merge: lora_params must hold a [d_in, r] and b [r, d_out] with '
        "d_in * d_out = 12, the size of the leaf 'w' of shape (3, 4), got a "
        '(3, 2) and b (2, 5).')):
      adapters.lora_merge(params, {'b': None, 'w': {
          'a': lora['w']['a'], 'b': jnp.zeros([2, 5])}})
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_merge: lora_params must hold a [d_in, r] and b [r, d_out] with '
        "d_in * d_out = 12, the size of the leaf 'w' of shape (3, 4), got a "
        '(3, 2) and b (1, 4).')):
      adapters.lora_merge(params, {'b': None, 'w': {
          'a': lora['w']['a'], 'b': jnp.zeros([1, 4])}})
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_merge: lora_params must hold 2-D arrays a [d_in, rank] and b '
        '[rank, d_out], got a of shape (3, 2, 1).')):
      adapters.lora_merge(params, {'b': None, 'w': {
          'a': jnp.zeros([3, 2, 1]), 'b': lora['w']['b']}})
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_merge: alpha must be a scalar or None, got shape (2,).')):
      adapters.lora_merge(params, lora, alpha=np.ones([2]))
    with self.assertRaisesRegex(TypeError, re.escape(
        'with_lora: apply_fn must be callable, got dict.')):
      adapters.with_lora({})


class WithLoraGradientTest(chex.TestCase):
  """y = x (W + s a b) + c, L = 0.5 ||y - t||^2, gradients in closed form."""

  def _problem(self):
    params = {'w': _normal(0, (4, 3)), 'c': _normal(1, (3,))}
    lora = _with_random_b(
        adapters.lora_init(jax.random.key(0), params, 2, targets='^w$'))
    x, t = _normal(2, (5, 4)), _normal(3, (5, 3))
    return params, lora, x, t

  @staticmethod
  def _apply(p, x):
    return jnp.matmul(x, p['w'], precision=_HIGHEST) + p['c'][None]

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('alpha_none', None), ('alpha_5', 5.0))
  def test_gradient_matches_closed_form(self, alpha):
    params, lora, x, t = self._problem()
    fn = adapters.with_lora(self._apply, alpha=alpha)

    def loss(lora_params, params, x, t):
      return 0.5 * jnp.sum((fn(params, lora_params, x) - t) ** 2)

    grads = self.variant(jax.grad(loss))(lora, params, x, t)
    self.assertIsNone(grads['c'])                       # only the adapter
    w, c, x64, t64 = (np.asarray(v, np.float64)
                      for v in (params['w'], params['c'], x, t))
    a, b = (np.asarray(lora['w'][k], np.float64) for k in ('a', 'b'))
    s = 1.0 if alpha is None else alpha / 2
    residual = x64 @ (w + s * a @ b) + c - t             # dL/dy
    g_w = x64.T @ residual                               # dL/dW_eff
    np.testing.assert_allclose(grads['w']['a'], s * g_w @ b.T, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(grads['w']['b'], s * a.T @ g_w, rtol=1e-4,
                               atol=1e-5)

  def test_check_grads_float64(self):
    with jax.enable_x64(True):
      params, lora, x, t = self._problem()
      params, lora, x, t = jax.tree.map(
          lambda v: jnp.asarray(v, jnp.float64), (params, lora, x, t))
      fn = adapters.with_lora(self._apply, alpha=3.0)
      check_grads(jax.jit(lambda lp: jnp.sum((fn(params, lp, x) - t) ** 2)),
                  (lora,),
                  order=2, modes=('rev',))

  def test_jitted_grad_does_not_retrace(self):
    params, lora, x, t = self._problem()
    fn = adapters.with_lora(self._apply)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_fn(lora_params, x):
      return jax.grad(lambda lp: jnp.sum(fn(params, lp, x) ** 2))(lora_params)

    grad_fn(lora, x)
    grad_fn(jax.tree.map(lambda v: v + 1, lora), x + 1)


class LoraDenseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('alpha_none', None), ('alpha_2', 2.0))
  def test_equals_merged_form_and_float64(self, alpha):
    w, a, b = _normal(0, (6, 5)), _normal(1, (6, 3)), _normal(2, (3, 5))
    x = _normal(3, (2, 4, 6))                           # batch dims [2, 4]
    dense = self.variant(functools.partial(adapters.lora_dense, alpha=alpha))
    with jax.default_matmul_precision('highest'):
      got = dense(x, w, a, b)
      merged = adapters.lora_merge({'w': w}, {'w': {'a': a, 'b': b}},
                                   alpha=alpha)['w']
      via_merge = jnp.matmul(x, merged)
    chex.assert_shape(got, (2, 4, 5))
    s = 1.0 if alpha is None else alpha / 3
    x64, w64, a64, b64 = (v.astype(np.float64) for v in (x, w, a, b))
    want = x64 @ w64 + s * (x64 @ a64) @ b64
    np.testing.assert_allclose(got, want, rtol=_RTOL32, atol=1e-5)
    np.testing.assert_allclose(got, via_merge, rtol=_RTOL32, atol=1e-5)

  def test_bad_shapes(self):
    w, a, b = np.zeros([6, 5]), np.zeros([6, 3]), np.zeros([3, 5])
    x = np.zeros([2, 6])
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: w must have shape [d_in, d_out] (or ndim > 2 with '
        'fan_in_axes), got (6,).')):
      adapters.lora_dense(x, w[:, 0], a, b)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: fan_in_axes must be given for w of shape (6, 5, 1) (the '
        'default covers 2-D [d_in, d_out] kernels only), got None.')):
      adapters.lora_dense(x, w[..., None], a, b)
    for f in (0, 3, -1):
      with self.assertRaisesRegex(ValueError, re.escape(
          'lora_dense: fan_in_axes must be in 1..ndim-1 = 1..2 for w of shape '
          f'(6, 5, 1), got {f}.')):
        adapters.lora_dense(x, w[..., None], a, b, fan_in_axes=f)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: fan_in_axes must be in 1..ndim-1 = 1..1 for w of shape '
        '(6, 5), got 2.')):
      adapters.lora_dense(x, w, a, b, fan_in_axes=2)
    with self.assertRaisesRegex(TypeError, re.escape(
        'lora_dense: fan_in_axes must be a Python int or None, got 1.0.')):
      adapters.lora_dense(x, w, a, b, fan_in_axes=1.0)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: x must have shape [..., 6, 5] (the first fan_in_axes = 2 '
        'axes of w), got (2, 6).')):
      adapters.lora_dense(x, w[..., None], np.zeros([30, 3]), np.zeros([3, 1]),
                          fan_in_axes=2)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: x must have shape [..., d_in] with d_in = 6, got '
        '(2, 5).')):
      adapters.lora_dense(x[:, :5], w, a, b)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: a must have shape [d_in, r] with d_in = 6, got (5, 3).')):
      adapters.lora_dense(x, w, a[:5], b)
    with self.assertRaisesRegex(ValueError, re.escape(
        'lora_dense: b must have shape [r, d_out] = (3, 5), got (2, 5).')):
      adapters.lora_dense(x, w, a, b[:2])


# ---------------------------------------------------------------------------
# Layouts: fan_in_axes, default targets, flax attention, equinox


def _old_lora_init(key, params, rank):
  """The algorithm before fan_in_axes (kept here as the regression oracle).

  Targets were every floating leaf with ndim >= 2, and a kernel of any rank
  was the matrix [prod(shape[:-1]), shape[-1]].
  """
  flat, treedef = jax.tree.flatten(params)
  chosen = [np.ndim(w) >= 2 and jnp.issubdtype(np.asarray(w).dtype,
                                               jnp.floating) for w in flat]
  keys = iter(jax.random.split(key, sum(chosen)))
  out = []
  for w, is_target in zip(flat, chosen):
    if not is_target:
      out.append(None)
      continue
    d_in, d_out = int(np.prod(np.shape(w)[:-1])), np.shape(w)[-1]
    bound = 1.0 / np.sqrt(d_in)
    out.append({
        'a': jax.random.uniform(next(keys), (d_in, rank), np.asarray(w).dtype,
                                -bound, bound),
        'b': jnp.zeros((rank, d_out), np.asarray(w).dtype)})
  return jax.tree.unflatten(treedef, out)


def _old_lora_merge(params, lora_params, alpha):
  """The previous merge, written out: W + (alpha / r) (a @ b).reshape."""
  def merge(w, adapter):
    if adapter is None:
      return w
    a, b = adapter['a'], adapter['b']
    delta = (alpha / a.shape[1]) * jnp.matmul(a, b)
    return jnp.asarray(w) + delta.reshape(np.shape(w)).astype(w.dtype)
  flat, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      merge(w, adapter)
      for w, adapter in zip(flat, treedef.flatten_up_to(lora_params))])


def _matrix_rank(delta, f):
  """Rank of the update in the layout's matrix view [prod(:f), prod(f:)]."""
  delta = np.asarray(delta, np.float64)
  return np.linalg.matrix_rank(
      delta.reshape(int(np.prod(delta.shape[:f])), -1), tol=1e-4)


class LoraLayoutTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_2d_and_4d_unchanged_from_previous_algorithm(self):
    params = _params()                    # dense 2-D, conv 4-D, 1-D, int
    new = self.variant(functools.partial(adapters.lora_init, rank=2))(
        jax.random.key(5), params)
    old = _old_lora_init(jax.random.key(5), params, 2)
    chex.assert_trees_all_equal(new, old)        # bitwise, None off-target
    lora = _with_random_b(new)
    merged = self.variant(functools.partial(adapters.lora_merge, alpha=6.0))(
        params, lora)
    old_merge = self.variant(functools.partial(_old_lora_merge, alpha=6.0))
    chex.assert_trees_all_equal(merged, old_merge(params, lora))
    # Explicit fan_in_axes equal to the defaults gives the same adapters.
    explicit = adapters.lora_init(
        jax.random.key(5), params, 2,
        fan_in_axes=lambda path, leaf: np.ndim(leaf) - 1)
    chex.assert_trees_all_equal(explicit, old)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('f1', 1, (6, 2), (2, 10)),
      ('f2', 2, (12, 2), (2, 5)),
  )
  def test_int_fan_in_axes_shapes_and_merge(self, f, a_shape, b_shape):
    params = {'w': _normal(0, (6, 2, 5))}
    init = self.variant(functools.partial(adapters.lora_init, rank=2,
                                          fan_in_axes=f))
    lora = init(jax.random.key(0), params)
    chex.assert_shape(lora['w']['a'], a_shape)
    chex.assert_shape(lora['w']['b'], b_shape)
    a = np.asarray(lora['w']['a'], np.float64)
    bound = 1.0 / np.sqrt(a_shape[0])                 # 1/sqrt(d_in), new d_in
    self.assertLessEqual(np.max(np.abs(a)), bound)
    lora = _with_random_b(lora)
    merged = self.variant(functools.partial(adapters.lora_merge, alpha=3.0))(
        params, lora)
    want = _merge_reference(params['w'], lora['w']['a'], lora['w']['b'], 3.0)
    np.testing.assert_allclose(np.asarray(merged['w'], np.float64), want,
                               rtol=_RTOL32, atol=1e-6)
    delta = np.asarray(merged['w'], np.float64) - params['w']
    self.assertEqual(_matrix_rank(delta, f), 2)

  def test_callable_fan_in_axes_gets_path_and_leaf_of_targets_only(self):
    params = {'q': np.zeros([6, 2, 3], np.float32),
              'o': np.zeros([2, 3, 6], np.float32),
              'bias': np.zeros([2, 3], np.float32)}
    seen = []

    def fan_in(path, leaf):
      seen.append((path, np.shape(leaf)))
      return 2 if path == 'o' else 1

    lora = adapters.lora_init(jax.random.key(0), params, 2, fan_in_axes=fan_in)
    self.assertEqual(sorted(seen), [('o', (2, 3, 6)), ('q', (6, 2, 3))])
    chex.assert_shape(lora['q']['a'], (6, 2))
    chex.assert_shape(lora['q']['b'], (2, 6))
    chex.assert_shape(lora['o']['a'], (6, 2))
    chex.assert_shape(lora['o']['b'], (2, 6))
    self.assertIsNone(lora['bias'])

  def test_default_targets_skip_bias_scale_embedding(self):
    params = {'bias': np.zeros([4, 4], np.float32),       # DenseGeneral bias
              'scale': np.zeros([4, 4], np.float32),
              'embedding': np.zeros([10, 4], np.float32),  # linen Embed
              'kernel': np.zeros([4, 4], np.float32),
              'block': {'bias': np.zeros([3, 2], np.float32),
                        'w': np.zeros([3, 2], np.float32)}}
    lora = adapters.lora_init(jax.random.key(0), params, 1)
    for name in ('bias', 'scale', 'embedding'):
      self.assertIsNone(lora[name])
    self.assertIsNone(lora['block']['bias'])
    self.assertIsNotNone(lora['kernel'])
    self.assertIsNotNone(lora['block']['w'])
    # Explicit targets may still pick a 2-D bias.
    explicit = adapters.lora_init(jax.random.key(0), params, 1,
                                  targets='^bias$')
    chex.assert_shape(explicit['bias']['a'], (4, 1))

  def test_default_targets_on_flax_embed_and_norm(self):
    # nnx leaves sit at '.../embedding/value': the trailing value is skipped.
    class Net(nnx.Module):

      def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    lora = adapters.lora_init(jax.random.key(0), state, 2)
    got = dict(zip(masks.leaf_paths(state),
                   jax.tree.structure(state).flatten_up_to(lora)))
    self.assertEqual(sorted(p for p, v in got.items() if v is not None),
                     ['dense/kernel/value'])

  def test_bad_fan_in_axes(self):
    params = {'q': np.zeros([8, 4, 4], np.float32),
              'w': np.zeros([8, 4], np.float32)}
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: fan_in_axes must be given for the target 'q' of shape "
        '(8, 4, 4) (the default covers 2-D [d_in, d_out] and 4-D conv [kh, '
        'kw, c_in, c_out] kernels only; pass the number of leading input '
        'axes, or a callable (path, leaf) -> int such as '
        'metacf.adapters.flax_fan_in_axes), got None.')):
      adapters.lora_init(key, params, 2)
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: fan_in_axes must be given for the target 'v' of shape "
        '(2, 3, 4, 5, 6)')):
      adapters.lora_init(key, {'v': np.zeros([2, 3, 4, 5, 6], np.float32)}, 1)
    for f in (0, 3, -1):
      with self.assertRaisesRegex(ValueError, re.escape(
          "lora_init: fan_in_axes must be in 1..ndim-1 = 1..2 for the target "
          f"'q' of shape (8, 4, 4), got {f}.")):
        adapters.lora_init(key, params, 2, targets='q', fan_in_axes=f)
    # An int applies to every target: 2 is out of range for the 2-D 'w'.
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: fan_in_axes must be in 1..ndim-1 = 1..1 for the target "
        "'w' of shape (8, 4), got 2.")):
      adapters.lora_init(key, params, 2, fan_in_axes=2)
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: fan_in_axes must be in 1..ndim-1 = 1..2 for the target "
        "'q' of shape (8, 4, 4), got 3 (returned by the fan_in_axes "
        'callable).')):
      adapters.lora_init(key, params, 2, fan_in_axes=lambda p, l: l.ndim)
    with self.assertRaisesRegex(TypeError, re.escape(
        'lora_init: fan_in_axes must return a Python int for each target, got '
        "float (1.0) for 'q'.")):
      adapters.lora_init(key, params, 2, fan_in_axes=lambda p, l: 1.0)
    with self.assertRaisesRegex(TypeError, re.escape(
        'lora_init: fan_in_axes must be None, a Python int or a callable '
        '(path, leaf) -> int, got str.')):
      adapters.lora_init(key, params, 2, fan_in_axes='1')
    with self.assertRaisesRegex(TypeError, re.escape(
        'lora_init: fan_in_axes must be None, a Python int or a callable '
        '(path, leaf) -> int, got bool.')):
      adapters.lora_init(key, params, 2, fan_in_axes=True)
    # The rank bound uses the layout's matrix: q with f = 2 is [32, 4].
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: rank must be <= min(d_in, d_out) = 4 for the target 'q' "
        'of shape (8, 4, 4) (d_in = 32, d_out = 4), got 5.')):
      adapters.lora_init(key, params, 5, targets='q', fan_in_axes=2)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('f1', 1, (2, 5, 6)), ('f2', 2, (2, 5, 6, 4)))
  def test_lora_dense_general_matches_float64(self, f, x_shape):
    w = _normal(0, (6, 4, 3))
    d_in = int(np.prod(w.shape[:f]))
    a, b = _normal(1, (d_in, 2)), _normal(2, (2, w.size // d_in))
    x = _normal(3, x_shape)
    dense = self.variant(functools.partial(adapters.lora_dense, alpha=4.0,
                                           fan_in_axes=f))
    with jax.default_matmul_precision('highest'):
      got = dense(x, w, a, b)
      merged = adapters.lora_merge({'w': w}, {'w': {'a': a, 'b': b}},
                                   alpha=4.0)['w']
      via_merge = jnp.tensordot(x, merged, axes=f)
    chex.assert_shape(got, (2, 5) + w.shape[f:])
    x64, w64, a64, b64 = (v.astype(np.float64) for v in (x, w, a, b))
    w_eff = w64 + 2.0 * (a64 @ b64).reshape(w.shape)
    want = np.tensordot(x64, w_eff, axes=f)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, via_merge, rtol=1e-4, atol=1e-5)

  def test_lora_dense_2d_is_bitwise_the_previous_formula(self):
    w, a, b = _normal(0, (6, 5)), _normal(1, (6, 3)), _normal(2, (3, 5))
    x = _normal(3, (2, 4, 6))
    for fn in (adapters.lora_dense, jax.jit(adapters.lora_dense)):
      got = fn(x, w, a, b)
      want = jnp.matmul(x, w) + jnp.matmul(jnp.matmul(x, a), b)
      np.testing.assert_array_equal(got, want)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _attention_reference(x, p, lora, scale):
  """float64 multi-head self-attention with W + scale (a @ b).reshape(W).

  ``p[name] = (kernel, bias)`` and ``lora[name] = (a, b)`` for name in query,
  key, value, out; einsums written out, independent of flax and metacf.
  """
  x = np.asarray(x, np.float64)
  w = {}
  for name, (kernel, _) in p.items():
    a, b = (np.asarray(v, np.float64) for v in lora[name])
    kernel = np.asarray(kernel, np.float64)
    w[name] = kernel + scale * np.einsum('ir,rj->ij', a, b).reshape(
        kernel.shape)
  bias = {name: np.asarray(v[1], np.float64) for name, v in p.items()}
  q = np.einsum('btd,dhk->bthk', x, w['query']) + bias['query']
  k = np.einsum('btd,dhk->bthk', x, w['key']) + bias['key']
  v = np.einsum('btd,dhk->bthk', x, w['value']) + bias['value']
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  o = np.einsum('bhqs,bshk->bqhk', _softmax(logits), v)
  return np.einsum('bqhk,hkd->bqd', o, w['out']) + bias['out']


_PROJ = ('query', 'key', 'value', 'out')


class FlaxAttentionTest(chex.TestCase):
  """LoRA on flax's own attention with ``fan_in_axes=flax_fan_in_axes``."""

  def _linen(self):
    model = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
    x = _normal(0, (2, 3, 8))
    variables = model.init(jax.random.key(0), x)
    prefix = 'params/'
    return variables, model.apply, x, prefix, ''

  def _nnx(self, float64=False):
    kwargs = {}
    if float64:
      # nnx's default attention calls jax.nn.dot_product_attention, whose
      # softmax runs in float32 even for float64 inputs: check_grads needs
      # linen's float64-exact attention weights + einsum.
      def attention_fn(query, key, value, **unused_kwargs):
        weights = linen.dot_product_attention_weights(query, key)
        return jnp.einsum('...hqk,...khd->...qhd', weights, value)
      kwargs['attention_fn'] = attention_fn
    model = nnx.MultiHeadAttention(num_heads=4, in_features=8,
                                   qkv_features=16, out_features=6,
                                   decode=False, rngs=nnx.Rngs(0), **kwargs)
    graphdef, state = nnx.split(model, nnx.Param)
    x = _normal(0, (2, 3, 8))
    return state, lambda p, x: nnx.merge(graphdef, p)(x), x, '', '/value'

  def _flat(self, params, lora):
    return dict(zip(masks.leaf_paths(params),
                    jax.tree.structure(params).flatten_up_to(lora)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('linen', '_linen', 8), ('nnx', '_nnx', 6))
  def test_shapes_biases_and_ranks(self, build, d_out):
    params, _, _, prefix, suffix = getattr(self, build)()
    init = self.variant(functools.partial(
        adapters.lora_init, rank=2, fan_in_axes=adapters.flax_fan_in_axes))
    lora = init(jax.random.key(1), params)
    flat = self._flat(params, lora)
    for name in ('query', 'key', 'value'):
      adapter = flat[f'{prefix}{name}/kernel{suffix}']
      chex.assert_shape(adapter['a'], (8, 2))           # d_model
      chex.assert_shape(adapter['b'], (2, 16))          # heads * head_dim
    adapter = flat[f'{prefix}out/kernel{suffix}']
    chex.assert_shape(adapter['a'], (16, 2))
    chex.assert_shape(adapter['b'], (2, d_out))
    for name in _PROJ:                                  # biases untouched
      self.assertIsNone(flat[f'{prefix}{name}/bias{suffix}'])
    # Same key, same adapters.
    chex.assert_trees_all_equal(lora, init(jax.random.key(1), params))
    # The merged update has rank <= r in the layout's matrix view.
    merged = adapters.lora_merge(params, _with_random_b(lora), alpha=4.0)
    flat_p = dict(zip(masks.leaf_paths(params), jax.tree.leaves(params)))
    flat_m = dict(zip(masks.leaf_paths(params), jax.tree.leaves(merged)))
    for name, f in (('query', 1), ('key', 1), ('value', 1), ('out', 2)):
      path = f'{prefix}{name}/kernel{suffix}'
      delta = (np.asarray(flat_m[path], np.float64)
               - np.asarray(flat_p[path], np.float64))
      self.assertEqual(_matrix_rank(delta, f), 2, path)
    for name in _PROJ:
      path = f'{prefix}{name}/bias{suffix}'
      self.assertIs(flat_m[path], flat_p[path])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('linen', '_linen'), ('nnx', '_nnx'))
  def test_output_matches_float64_einsum_reference(self, build):
    params, apply_fn, x, prefix, suffix = getattr(self, build)()
    lora = _with_random_b(adapters.lora_init(
        jax.random.key(1), params, 2, fan_in_axes=adapters.flax_fan_in_axes))
    fn = self.variant(adapters.with_lora(apply_fn, alpha=3.0))
    with jax.default_matmul_precision('highest'):
      got = fn(params, lora, x)
    flat_p = dict(zip(masks.leaf_paths(params), jax.tree.leaves(params)))
    flat_l = self._flat(params, lora)
    p = {n: (flat_p[f'{prefix}{n}/kernel{suffix}'],
             flat_p[f'{prefix}{n}/bias{suffix}']) for n in _PROJ}
    ab = {n: (flat_l[f'{prefix}{n}/kernel{suffix}']['a'],
              flat_l[f'{prefix}{n}/kernel{suffix}']['b']) for n in _PROJ}
    want = _attention_reference(x, p, ab, 3.0 / 2)
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The update is not a no-op: without it the output differs.
    self.assertFalse(np.allclose(apply_fn(params, x), want, atol=1e-3))

  @parameterized.named_parameters(('linen', '_linen'), ('nnx', '_nnx'))
  def test_check_grads_float64(self, build):
    with jax.enable_x64(True):
      params, apply_fn, x, _, _ = (self._nnx(float64=True) if build == '_nnx'
                                   else self._linen())
      lora = _with_random_b(adapters.lora_init(
          jax.random.key(1), params, 2,
          fan_in_axes=adapters.flax_fan_in_axes))
      params, lora, x = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                                     (params, lora, x))
      fn = adapters.with_lora(apply_fn, alpha=3.0)
      t = jnp.asarray(_normal(5, (2, 3, 6 if build == '_nnx' else 8)),
                      jnp.float64)
      check_grads(jax.jit(lambda lp: jnp.sum((fn(params, lp, x) - t) ** 2)),
                  (lora,), order=1, modes=('rev',))

  def test_without_fan_in_axes_raises_naming_it(self):
    params, *_ = self._linen()
    with self.assertRaisesRegex(ValueError, re.escape(
        "lora_init: fan_in_axes must be given for the target "
        "'params/key/kernel' of shape (8, 4, 4)")):
      adapters.lora_init(jax.random.key(0), params, 2)

  def test_flax_fan_in_axes(self):
    cases = [('params/attn/query/kernel', (8, 4, 4), 1),
             ('attn/key/kernel/value', (8, 4, 4), 1),
             ('value/kernel/value', (8, 4, 4), 1),
             ('params/out/kernel', (4, 4, 8), 2),
             ('out/kernel/value', (4, 4, 8), 2),
             ('params/Dense_0/kernel', (8, 3), 1),
             ('params/Conv_0/kernel', (3, 3, 2, 6), 3)]
    for path, shape, want in cases:
      self.assertEqual(
          adapters.flax_fan_in_axes(path, np.zeros(shape)), want, path)
    for path, shape in (('params/Conv_0/kernel', (3, 2, 6)),
                        ('params/proj/kernel', (8, 4, 4)),
                        ('params/query/bias', (4, 4, 1)),
                        ('params/x/kernel', (2, 2, 2, 2, 2))):
      with self.assertRaisesRegex(ValueError, re.escape(
          'flax_fan_in_axes: leaf must be a 2-D or 4-D kernel or the 3-D '
          'kernel of an attention query, key, value or out projection (write '
          f'a fan_in_axes callable for other layouts), got {path!r} of shape '
          f'{shape}.')):
        adapters.flax_fan_in_axes(path, np.zeros(shape))


class EquinoxRecipeTest(chex.TestCase):
  """The documented recipe for equinox's [out, in] weights: adapt W.T."""

  @staticmethod
  def _flip(tree):
    return jax.tree.map(jnp.transpose, tree)

  def _lora_apply(self, static, alpha):
    def apply_lora(params, lora_params, x):
      merged = self._flip(adapters.lora_merge(self._flip(params), lora_params,
                                              alpha=alpha))
      return eqx.combine(merged, static)(x)
    return apply_lora

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_is_w_plus_b_t_a_t(self):
    model = eqx.nn.Linear(5, 3, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    lora = adapters.lora_init(jax.random.key(1), self._flip(params), 2,
                              targets='weight$')
    self.assertIsNone(lora.bias)
    chex.assert_shape(lora.weight['a'], (5, 2))          # [in, r], random
    chex.assert_shape(lora.weight['b'], (2, 3))          # [r, out], zero
    lora = _with_random_b(lora)
    apply_lora = self._lora_apply(static, 4.0)
    x = _normal(2, (4, 5))
    with jax.default_matmul_precision('highest'):
      got = self.variant(lambda p, lp, x: jax.vmap(
          lambda xi: apply_lora(p, lp, xi))(x))(params, lora, x)
    w, c, a, b = (np.asarray(v, np.float64) for v in (
        model.weight, model.bias, lora.weight['a'], lora.weight['b']))
    # x -> W x + s b.T (a.T x): rows x @ (W.T + s a b).
    want = x.astype(np.float64) @ (w.T + 2.0 * a @ b) + c
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    merged = self._flip(adapters.lora_merge(self._flip(params), lora,
                                            alpha=4.0))
    delta = np.asarray(merged.weight, np.float64) - w     # [out, in]
    chex.assert_shape(delta, (3, 5))
    self.assertEqual(np.linalg.matrix_rank(delta, tol=1e-4), 2)
    # Its row space (what it reads of x) is a's columns: input side.
    proj = a @ np.linalg.pinv(a)
    np.testing.assert_allclose(delta @ proj, delta, atol=1e-5)

  def test_linear_check_grads_float64(self):
    with jax.enable_x64(True):
      model = eqx.nn.Linear(5, 3, key=jax.random.key(0), dtype=jnp.float64)
      params, static = eqx.partition(model, eqx.is_inexact_array)
      lora = _with_random_b(adapters.lora_init(
          jax.random.key(1), self._flip(params), 2, targets='weight$'))
      lora = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), lora)
      x = jnp.asarray(_normal(2, (4, 5)), jnp.float64)
      apply_lora = self._lora_apply(static, 4.0)
      loss = lambda lp: jnp.sum(
          jax.vmap(lambda xi: apply_lora(params, lp, xi))(x) ** 2)
      check_grads(jax.jit(loss), (lora,), order=1, modes=('rev',))

  def test_conv2d(self):
    model = eqx.nn.Conv2d(2, 6, 3, padding=1, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    lora = _with_random_b(adapters.lora_init(
        jax.random.key(1), self._flip(params), 2, targets='weight$'))
    chex.assert_shape(lora.weight['a'], (18, 2))         # kw * kh * c_in
    chex.assert_shape(lora.weight['b'], (2, 6))
    x = _normal(2, (2, 5, 5))                            # [c_in, H, W]
    with jax.default_matmul_precision('highest'):
      got = self._lora_apply(static, 2.0)(params, lora, x)
      # Reference: the OIHW kernel W + (a @ b) reshaped [kw, kh, c_in, c_out]
      # and transposed back, in a plain convolution.
      a, b = (np.asarray(v, np.float64) for v in (lora.weight['a'],
                                                    lora.weight['b']))
      w_ref = (np.asarray(model.weight, np.float64)
               + (a @ b).reshape(3, 3, 2, 6).transpose(3, 2, 1, 0))
      want = jax.lax.conv_general_dilated(
          jnp.asarray(x[None]), jnp.asarray(w_ref, jnp.float32), (1, 1),
          'SAME', dimension_numbers=('NCHW', 'OIHW', 'NCHW'))[0]
      want = want + model.bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    delta = (np.asarray(w_ref) - np.asarray(model.weight, np.float64))
    # Rank 2 as the patch-to-channel map [c_out, c_in * kh * kw].
    self.assertEqual(np.linalg.matrix_rank(delta.reshape(6, -1), tol=1e-4), 2)


class FlaxModelTest(chex.TestCase):

  def test_nnx_mlp(self):

    class MLP(nnx.Module):

      def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

      def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))

    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
    self._check_model(params, apply_fn, 'hidden/kernel/value',
                      'hidden/bias/value')

  def test_linen_mlp(self):

    class MLP(linen.Module):

      @linen.compact
      def __call__(self, x):
        return linen.Dense(2)(linen.relu(linen.Dense(8)(x)))

    model = MLP()
    variables = model.init(jax.random.key(0), jnp.zeros([1, 3]))
    self._check_model(variables, model.apply, 'params/Dense_0/kernel',
                      'params/Dense_0/bias')

  def _check_model(self, params, apply_fn, kernel_path, bias_path):
    lora = adapters.lora_init(jax.random.key(1), params, 2)
    flat_lora = dict(zip(masks.leaf_paths(params),
                         jax.tree.structure(params).flatten_up_to(lora)))
    self.assertIsNotNone(flat_lora[kernel_path])        # kernels adapted
    self.assertIsNone(flat_lora[bias_path])             # biases not
    x = _normal(2, (4, 3))
    fn = adapters.with_lora(apply_fn, alpha=4.0)
    np.testing.assert_array_equal(fn(params, lora, x), apply_fn(params, x))

    def loss(lora_params):
      return jnp.mean((fn(params, lora_params, x) - 1.0) ** 2)

    tx = optax.sgd(0.1)
    opt_state = tx.init(lora)

    @jax.jit
    def step(lora_params, opt_state):
      grads = jax.grad(loss)(lora_params)
      updates, opt_state = tx.update(grads, opt_state, lora_params)
      return optax.apply_updates(lora_params, updates), opt_state

    before = loss(lora)
    for _ in range(3):
      lora, opt_state = step(lora, opt_state)
    self.assertLess(float(loss(lora)), float(before))
    self.assertEqual(adapters.count_params(lora), 2 * (3 + 8) + 2 * (8 + 2))


# ---------------------------------------------------------------------------
# Soft prompts


class SoftPromptInitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_uniform_init(self):
    init = self.variant(functools.partial(adapters.soft_prompt_init,
                                          num_tokens=64, dim=16))
    prompt = init(jax.random.key(0))
    chex.assert_shape(prompt, (64, 16))
    self.assertEqual(prompt.dtype, jnp.float32)
    p = np.asarray(prompt, np.float64)
    self.assertLessEqual(np.max(np.abs(p)), 0.5)
    self.assertLess(abs(np.mean(p)), 0.05)
    np.testing.assert_allclose(np.var(p), 1 / 12, rtol=0.1)   # U[-.5, .5]

  @chex.variants(with_jit=True, without_jit=True)
  def test_sampled_vocab_rows(self):
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    init = self.variant(functools.partial(adapters.soft_prompt_init,
                                          num_tokens=6, dim=4))
    prompt = np.asarray(init(jax.random.key(0), embeddings=table))
    rows = prompt[:, 0].astype(int) // 4
    np.testing.assert_array_equal(prompt, table[rows])
    self.assertLen(set(rows.tolist()), 6)               # without replacement
    many = adapters.soft_prompt_init(jax.random.key(0), 15, 4,
                                     embeddings=table.astype(jnp.bfloat16))
    self.assertEqual(many.dtype, jnp.bfloat16)
    rows = np.asarray(many[:, 0], np.float32).astype(int) // 4
    np.testing.assert_array_equal(np.asarray(many, np.float32), table[rows])

  def test_same_key_same_result_different_key_different(self):
    table = np.arange(400, dtype=np.float32).reshape(100, 4)
    for kwargs in ({}, {'embeddings': table}):
      first = adapters.soft_prompt_init(jax.random.key(1), 5, 4, **kwargs)
      again = adapters.soft_prompt_init(jax.random.key(1), 5, 4, **kwargs)
      other = adapters.soft_prompt_init(jax.random.key(2), 5, 4, **kwargs)
      np.testing.assert_array_equal(first, again)
      self.assertFalse(np.array_equal(first, other))

  def test_bad_inputs(self):
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, re.escape(
        'soft_prompt_init: num_tokens must be >= 1, got 0.')):
      adapters.soft_prompt_init(key, 0, 4)
    with self.assertRaisesRegex(TypeError, re.escape(
        'soft_prompt_init: dim must be a Python int, got 4.0.')):
      adapters.soft_prompt_init(key, 2, 4.0)
    with self.assertRaisesRegex(ValueError, re.escape(
        'soft_prompt_init: embeddings must have shape [vocab_size, dim] with '
        'dim = 4 and vocab_size >= 1, got (10, 3).')):
      adapters.soft_prompt_init(key, 2, 4, embeddings=np.zeros([10, 3]))
    with self.assertRaisesRegex(ValueError, re.escape(
        'soft_prompt_init: embeddings must have shape [vocab_size, dim] with '
        'dim = 4 and vocab_size >= 1, got (4,).')):
      adapters.soft_prompt_init(key, 2, 4, embeddings=np.zeros([4]))


class PrependPromptTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_and_gradient(self):
    prompt, emb = _normal(0, (3, 4)), _normal(1, (2, 5, 4))
    out = self.variant(adapters.prepend_prompt)(prompt, emb)
    chex.assert_shape(out, (2, 8, 4))
    want = np.concatenate([np.broadcast_to(prompt, (2, 3, 4)), emb], axis=1)
    np.testing.assert_array_equal(out, want)
    weights = _normal(2, (2, 8, 4))
    grad = self.variant(jax.grad(
        lambda p: jnp.sum(adapters.prepend_prompt(p, emb) * weights)))(prompt)
    np.testing.assert_allclose(grad, weights[:, :3].astype(np.float64).sum(0),
                               rtol=_RTOL32)

  def test_casts_prompt_to_embedding_dtype(self):
    out = adapters.prepend_prompt(np.ones([2, 4], np.float32),
                                  jnp.zeros([1, 3, 4], jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.bfloat16)

  def test_no_retrace(self):

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(prompt, emb):
      return adapters.prepend_prompt(prompt, emb)

    fn(jnp.zeros([3, 4]), jnp.zeros([2, 5, 4]))
    fn(jnp.ones([3, 4]), jnp.ones([2, 5, 4]))

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, re.escape(
        'prepend_prompt: prompt and embeddings must have the same last '
        'dimension (dim), got 4 and 5.')):
      adapters.prepend_prompt(np.zeros([3, 4]), np.zeros([2, 5, 5]))
    with self.assertRaisesRegex(ValueError, re.escape(
        'prepend_prompt: prompt must have shape [num_tokens, dim], got '
        '(1, 3, 4).')):
      adapters.prepend_prompt(np.zeros([1, 3, 4]), np.zeros([2, 5, 4]))
    with self.assertRaisesRegex(ValueError, re.escape(
        'prepend_prompt: embeddings must have shape [batch, length, dim], got '
        '(5, 4).')):
      adapters.prepend_prompt(np.zeros([3, 4]), np.zeros([5, 4]))


# ---------------------------------------------------------------------------
# trainable_labels, freeze, count_params


def _net():
  return {'body': {'w': jnp.asarray(_normal(0, (3, 4))),
                   'b': jnp.asarray(_normal(1, (4,)))},
          'head': {'w': jnp.asarray(_normal(2, (4, 2))),
                   'b': jnp.asarray(_normal(3, (2,)))}}


def _net_loss(params, x):
  h = jnp.tanh(x @ params['body']['w'] + params['body']['b'][None])
  return jnp.sum((h @ params['head']['w'] + params['head']['b'][None]) ** 2)


_TRAINABLE = r'^head/|/b$'          # the head and the body bias


def _trainable_subset(tree):
  return {'body': {'b': tree['body']['b']}, 'head': tree['head']}


class TrainableLabelsTest(chex.TestCase):

  def test_regex_callable_pytree_and_none(self):
    params = _net()
    want = {'body': {'w': 'frozen', 'b': 'trainable'},
            'head': {'w': 'trainable', 'b': 'trainable'}}
    self.assertEqual(adapters.trainable_labels(params, _TRAINABLE), want)
    self.assertEqual(adapters.trainable_labels(
        params, lambda path, leaf: path != 'body/w'), want)
    mask = {'body': {'w': False, 'b': True}, 'head': {'w': True, 'b': True}}
    self.assertEqual(adapters.trainable_labels(params, mask), want)
    self.assertEqual(set(jax.tree.leaves(
        adapters.trainable_labels(params, None))), {'trainable'})

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, re.escape(
        "trainable_labels: trainable matched no leaf; paths are like "
        "'body/b', 'body/w', 'head/b', 'head/w'.")):
      adapters.trainable_labels(_net(), 'tail')
    with self.assertRaisesRegex(ValueError, re.escape(
        'trainable_labels: trainable must have the same pytree structure as '
        'params')):
      adapters.trainable_labels(_net(), {'body': True, 'head': False})


class FreezeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_frozen_bit_identical_trainable_equal_plain_adam(self):
    params = _net()
    x = _normal(4, (5, 3))
    tx = adapters.freeze(optax.adam(0.1), params, _TRAINABLE)
    plain = optax.adam(0.1)
    state, plain_state = tx.init(params), plain.init(_trainable_subset(params))
    plain_params = _trainable_subset(params)

    @self.variant
    def step(params, state, plain_params, plain_state):
      grads = jax.grad(_net_loss)(params, x)
      updates, state = tx.update(grads, state, params)
      plain_updates, plain_state = optim.update(
          plain, _trainable_subset(grads), plain_state, plain_params)
      frozen_updates = updates['body']['w']
      return (optax.apply_updates(params, updates), state,
              optax.apply_updates(plain_params, plain_updates), plain_state,
              frozen_updates)

    w0 = np.asarray(params['body']['w']).copy()
    for _ in range(3):
      params, state, plain_params, plain_state, frozen_updates = step(
          params, state, plain_params, plain_state)
      np.testing.assert_array_equal(frozen_updates, 0.0)
      # Bit-identical: compare the raw float32 bits.
      np.testing.assert_array_equal(
          np.asarray(params['body']['w']).view(np.uint32), w0.view(np.uint32))
      # The trainable leaves follow adam on the trainable subset.
      chex.assert_trees_all_equal(_trainable_subset(params), plain_params)
    self.assertFalse(np.allclose(params['head']['w'], _net()['head']['w']))

  def test_optimizer_state_has_no_frozen_leaves(self):
    params = _net()
    state = adapters.freeze(optax.adam(0.1), params, _TRAINABLE).init(params)
    num_trainable = adapters.count_params(_trainable_subset(params))
    # Adam: mu and nu for the trainable leaves, plus the int32 step count.
    self.assertEqual(adapters.count_params(state), 2 * num_trainable + 1)
    plain_state = optax.adam(0.1).init(_trainable_subset(params))
    self.assertEqual(
        sorted(x.shape for x in jax.tree.leaves(state)),
        sorted(x.shape for x in jax.tree.leaves(plain_state)))
    # Everything frozen: only the step count is left.
    all_frozen = jax.tree.map(lambda _: False, params)
    state = adapters.freeze(optax.adam(0.1), params, all_frozen).init(params)
    self.assertEqual(adapters.count_params(state), 1)

  def test_lora_params_with_none_leaves(self):
    # Train only the b factors of the adapters; params with None leaves.
    lora = adapters.lora_init(jax.random.key(0), _net(), 1)
    self.assertIsNone(lora['body']['b'])
    tx = adapters.freeze(optax.sgd(0.5), lora, '/b$')
    state = tx.init(lora)
    grads = jax.tree.map(jnp.ones_like, lora)
    updates, state = jax.jit(tx.update)(grads, state, lora)
    new = optax.apply_updates(lora, updates)
    self.assertIsNone(new['body']['b'])
    np.testing.assert_array_equal(new['body']['w']['a'], lora['body']['w']['a'])
    np.testing.assert_allclose(new['head']['w']['b'],
                               lora['head']['w']['b'] - 0.5)

  def test_no_retrace(self):
    params = _net()
    tx = adapters.freeze(optax.adam(0.1), params, _TRAINABLE)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x):
      grads = jax.grad(_net_loss)(params, x)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = step(params, state, _normal(0, (5, 3)))
    step(params, state, _normal(1, (5, 3)))

  def test_bad_inputs(self):
    with self.assertRaisesRegex(TypeError, re.escape(
        'freeze: optimizer must be an optax.GradientTransformation, got '
        'function.')):
      adapters.freeze(optax.adam, _net(), _TRAINABLE)
    with self.assertRaisesRegex(ValueError, re.escape(
        "freeze: trainable matched no leaf; paths are like 'body/b', "
        "'body/w', 'head/b', 'head/w'.")):
      adapters.freeze(optax.adam(0.1), _net(), 'tail')


class CountParamsTest(chex.TestCase):

  def test_counts_elements_and_ignores_none(self):
    tree = {'a': np.zeros([3, 4]), 'b': None, 'c': [jnp.zeros([2]), None],
            'd': (jax.ShapeDtypeStruct((5, 5), jnp.float32), 1.5),
            'e': optax.MaskedNode()}
    self.assertEqual(adapters.count_params(tree), 12 + 2 + 25 + 1)
    self.assertEqual(adapters.count_params({}), 0)
    self.assertIsInstance(adapters.count_params(tree), int)

  def test_bad_leaf(self):
    with self.assertRaisesRegex(TypeError, re.escape(
        "count_params: tree leaves must be arrays or numbers, got str at "
        "'x/0'.")):
      adapters.count_params({'x': ['frozen']})


class PublicApiTest(chex.TestCase):

  def test_all(self):
    self.assertEqual(sorted(adapters.__all__), [
        'count_params', 'flax_fan_in_axes', 'freeze', 'lora_dense',
        'lora_init', 'lora_merge',
        'prepend_prompt', 'soft_prompt_init', 'trainable_labels',
        'with_lora'])
    for name in adapters.__all__:
      self.assertTrue(callable(getattr(adapters, name)))
