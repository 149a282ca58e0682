"""metacf.maml: aux outputs, per-task keys, pytree-shaped inner optimizers, path masks.

References are hand-written Python loops over tasks and steps (no vmap, no
scan) that derive keys exactly as the docstrings document.
"""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf import maml

# ------------------------------------------------------------------ fixtures


def _init(key):
  k1, k2 = jax.random.split(key)
  return {'body': {'w': jax.random.normal(k1, (2, 8)) / 2,
                   'b': jnp.zeros([8])},
          'head': {'w': jax.random.normal(k2, (8, 1)) / 3,
                   'b': jnp.zeros([1])}}


def _apply(params, x):
  h = jnp.tanh(x @ params['body']['w'] + params['body']['b'][None])
  return h @ params['head']['w'] + params['head']['b'][None]


def _mse(params, x, y):
  return jnp.mean((_apply(params, x) - y) ** 2)


def _mse_aux(params, x, y):
  err = _apply(params, x) - y
  loss = jnp.mean(err ** 2)
  return loss, {'mae': jnp.mean(jnp.abs(err)),
                'hits': jnp.sum(jnp.abs(err) < 0.5).astype(jnp.int32),
                'per_example': jnp.abs(err[:, 0])}


def _noisy_mse(params, x, y, key):
  """A stochastic loss: input noise drawn from the key (like augmentation)."""
  x = x + 0.3 * jax.random.normal(key, x.shape)
  return _mse(params, x, y)


def _noisy_mse_aux(params, x, y, key):
  loss = _noisy_mse(params, x, y, key)
  return loss, {'loss_copy': loss}


def _tasks(key, num_tasks=4, shots=6):
  ks = jax.random.split(key, 4)
  xs = jax.random.normal(ks[0], (num_tasks, shots, 2))
  xq = jax.random.normal(ks[1], (num_tasks, shots, 2))
  a = jax.random.normal(ks[2], (num_tasks, 1, 2))
  ys = jnp.sin(jnp.sum(a * xs, -1, keepdims=True))
  yq = jnp.sin(jnp.sum(a * xq, -1, keepdims=True))
  return maml.Task(xs, ys, xq, yq)


def _task(tasks, t):
  return maml.Task(*(f[t] for f in tasks))


def _tree_allclose(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _reference_keyed_meta_loss(params, tasks, key, lr, steps):
  """Python loops; keys as documented: fold_in(key, t), then fold_in(., s)."""
  losses = []
  for t in range(tasks.support_x.shape[0]):
    task_key = jax.random.fold_in(key, t)
    p = params
    for s in range(steps):
      g = jax.grad(_noisy_mse)(p, tasks.support_x[t], tasks.support_y[t],
                               jax.random.fold_in(task_key, s))
      p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
    losses.append(_noisy_mse(p, tasks.query_x[t], tasks.query_y[t],
                             jax.random.fold_in(task_key, steps)))
  return jnp.mean(jnp.stack(losses))


# ---------------------------------------------------------------------- aux


class HasAuxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_aux_is_stacked_query_aux_and_loss_unchanged(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    # The references are jitted (the same programs under both variants:
    # the second one's compilations come from the compilation cache).
    loss_plain = jax.jit(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.1, num_inner_steps=2))(params)
    loss, aux = self.variant(lambda p: maml.maml_loss(
        _mse_aux, p, tasks, inner_lr=0.1, num_inner_steps=2,
        has_aux=True))(params)
    np.testing.assert_allclose(loss, loss_plain, rtol=1e-6)
    self.assertEqual(aux['mae'].shape, (4,))
    self.assertEqual(aux['per_example'].shape, (4, 6))
    self.assertEqual(aux['hits'].dtype, jnp.int32)

    @jax.jit
    def adapted_aux(task):
      adapted = maml.inner_adapt(_mse, params, task.support_x, task.support_y,
                                 inner_lr=0.1, num_inner_steps=2)
      return _mse_aux(adapted, task.query_x, task.query_y)[1]

    for t in range(4):
      want = adapted_aux(_task(tasks, t))
      _tree_allclose(jax.tree.map(lambda a, t=t: a[t], aux), want, rtol=1e-5,
                     atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_equal_aux_free_gradients(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    want = jax.jit(jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.1, num_inner_steps=3)))(params)
    got, aux = self.variant(jax.grad(lambda p: maml.maml_loss(
        _mse_aux, p, tasks, inner_lr=0.1, num_inner_steps=3, has_aux=True),
                                     has_aux=True))(params)
    _tree_allclose(got, want, rtol=1e-6, atol=1e-7)
    self.assertTrue(np.all(np.isfinite(aux['mae'])))

  def test_inner_adapt_ignores_aux(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    task = _task(tasks, 0)
    got = maml.inner_adapt(_mse_aux, params, task.support_x, task.support_y,
                           inner_lr=0.1, num_inner_steps=3, has_aux=True)
    want = maml.inner_adapt(_mse, params, task.support_x, task.support_y,
                            inner_lr=0.1, num_inner_steps=3)
    chex.assert_trees_all_equal(got, want)

  @parameterized.named_parameters(('whole', None), ('chunked', 2))
  def test_train_step_metrics_hold_means_of_floating_aux(self, chunk):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    _, aux = maml.maml_loss(_mse_aux, params, tasks, inner_lr=0.1,
                            num_inner_steps=1, has_aux=True)
    opt = optax.adam(1e-3)  # strict promotion: metacf protects optax's update
    step = maml.make_meta_train_step(_mse_aux, opt, inner_lr=0.1,
                                     num_inner_steps=1, has_aux=True,
                                     task_chunk_size=chunk, donate=False)
    _, _, metrics = step(params, opt.init(params), tasks)
    np.testing.assert_allclose(metrics.aux['mae'], np.mean(aux['mae']),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics.aux['per_example'],
                               np.mean(aux['per_example']), rtol=1e-5)
    self.assertIsNone(metrics.aux['hits'])  # integer leaf: not averaged
    self.assertEqual(metrics.aux['mae'].shape, ())

  def test_aux_step_compiles_once(self):
    params = _init(jax.random.key(0))
    opt = optax.sgd(1e-2)
    step = maml.make_meta_train_step(_mse_aux, opt, inner_lr=0.1,
                                     has_aux=True)
    opt_state = opt.init(params)
    for seed in range(3):
      params, opt_state, metrics = step(params, opt_state,
                                        _tasks(jax.random.key(seed)))
      self.assertTrue(np.isfinite(metrics.aux['mae']))
    self.assertEqual(step._cache_size(), 1)

  def test_aux_mismatch_errors(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    with self.assertRaisesRegex(
        TypeError, r'maml_loss: with has_aux=True, loss_fn must return a pair '
        r'\(loss, aux\), got an array of shape \(\)'):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.1, has_aux=True)
    with self.assertRaisesRegex(
        TypeError, 'inner_adapt: loss_fn returned a tuple of length 2; pass '
        r'has_aux=True if it returns \(loss, aux\)'):
      maml.inner_adapt(_mse_aux, params, tasks.support_x[0],
                       tasks.support_y[0], inner_lr=0.1)
    with self.assertRaisesRegex(
        ValueError, r'maml_loss: loss_fn must return a scalar loss, got shape '
        r'\(6, 1\)'):
      maml.maml_loss(lambda p, x, y: (_apply(p, x) - y) ** 2, params, tasks,
                     inner_lr=0.1)


# --------------------------------------------------------------------- keys


class KeyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_documented_key_derivation(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    key = jax.random.key(7)
    got = self.variant(lambda p, k: maml.maml_loss(
        _noisy_mse, p, tasks, inner_lr=0.1, num_inner_steps=2, key=k))(
            params, key)
    want = _reference_keyed_meta_loss(params, tasks, key, 0.1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_gradient_matches_documented_key_derivation(self):
    # Once, not per variant above: the gradients do not depend on it.
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    key = jax.random.key(7)
    g_got = jax.jit(jax.grad(lambda p: maml.maml_loss(
        _noisy_mse, p, tasks, inner_lr=0.1, num_inner_steps=2, key=key)))(
            params)
    g_want = jax.jit(jax.grad(
        lambda p: _reference_keyed_meta_loss(p, tasks, key, 0.1, 2)))(params)
    _tree_allclose(g_got, g_want, rtol=1e-4, atol=1e-6)

  def test_same_key_same_result_other_key_differs(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    f = jax.jit(lambda k: maml.maml_loss(_noisy_mse, params, tasks,
                                         inner_lr=0.1, key=k))
    a, b = f(jax.random.key(3)), f(jax.random.key(3))
    c = f(jax.random.key(4))
    self.assertEqual(float(a), float(b))
    self.assertNotEqual(float(a), float(c))

  def test_inner_adapt_step_keys(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    task, key = _task(tasks, 0), jax.random.key(5)
    got = maml.inner_adapt(_noisy_mse, params, task.support_x, task.support_y,
                           inner_lr=0.1, num_inner_steps=3, key=key)
    p = params
    for s in range(3):
      g = jax.grad(_noisy_mse)(p, task.support_x, task.support_y,
                               jax.random.fold_in(key, s))
      p = jax.tree.map(lambda w, gw: w - 0.1 * gw, p, g)
    _tree_allclose(got, p, rtol=1e-6, atol=1e-7)

  def test_scan_and_remat_paths_use_the_same_keys(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    task, key = _task(tasks, 1), jax.random.key(5)
    run = lambda n, remat: maml.inner_adapt(
        _noisy_mse, params, task.support_x, task.support_y, inner_lr=0.05,
        num_inner_steps=n, key=key, remat=remat)
    # 20 steps run as lax.scan (> 16), remat always scans, 3 steps unroll.
    _tree_allclose(run(20, False), run(20, True), rtol=1e-5, atol=1e-6)
    _tree_allclose(run(3, False), run(3, True), rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(('call_key', False), ('build_key', True))
  def test_train_step_key_chunked_equals_whole(self, at_build):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    key = jax.random.key(9)
    opt = optax.sgd(0.1)
    outs = []
    for chunk in (None, 2, 1):
      kw = {'key': key} if at_build else {}
      step = maml.make_meta_train_step(_noisy_mse_aux, opt, inner_lr=0.1,
                                       num_inner_steps=2, has_aux=True,
                                       task_chunk_size=chunk, donate=False,
                                       **kw)
      args = () if at_build else (key,)
      outs.append(step(params, opt.init(params), tasks, *args))
    want = _reference_keyed_meta_loss(params, tasks, key, 0.1, 2)
    for new_params, _, metrics in outs:
      np.testing.assert_allclose(metrics.loss, want, rtol=1e-5)
      np.testing.assert_allclose(metrics.aux['loss_copy'], want, rtol=1e-5)
      _tree_allclose(new_params, outs[0][0], rtol=1e-5, atol=1e-7)

  def test_keyed_step_compiles_once(self):
    params = _init(jax.random.key(0))
    opt = optax.sgd(1e-2)
    step = maml.make_meta_train_step(_noisy_mse, opt, inner_lr=0.1,
                                     num_inner_steps=2)
    opt_state = opt.init(params)
    losses = []
    for seed in range(3):
      params, opt_state, metrics = step(params, opt_state,
                                        _tasks(jax.random.key(0)),
                                        jax.random.key(100 + seed))
      losses.append(float(metrics.loss))
    self.assertEqual(step._cache_size(), 1)
    self.assertLen(set(losses), 3)

  def test_bad_key(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    with self.assertRaisesRegex(
        TypeError, 'maml_loss: key must be a PRNG key from jax.random.key '
        r'\(or None\), got int'):
      maml.maml_loss(_noisy_mse, params, tasks, inner_lr=0.1, key=0)
    with self.assertRaisesRegex(
        ValueError, r'inner_adapt: key must be a single PRNG key \(shape '
        r'\(\)\), got shape \(2,\)'):
      maml.inner_adapt(_noisy_mse, params, tasks.support_x[0],
                       tasks.support_y[0], inner_lr=0.1,
                       key=jax.random.split(jax.random.key(0)))

  def test_raw_uint32_key_is_accepted(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    raw = jax.random.PRNGKey(3)
    got = maml.maml_loss(_noisy_mse, params, tasks, inner_lr=0.1, key=raw)
    self.assertTrue(np.isfinite(got))


# -------------------------------------------- pytree-shaped inner optimizers


class InnerOptimizerPytreeTest(chex.TestCase):

  def test_optax_masked_equals_adapt_mask(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    mask_tree = {'body': {'w': False, 'b': False},
                 'head': {'w': True, 'b': True}}
    # optax.masked passes masked-out updates through: freeze them with
    # set_to_zero on the complement, as a user would.
    opt = optax.chain(optax.masked(optax.sgd(0.1), mask_tree),
                      optax.masked(optax.set_to_zero(),
                                   jax.tree.map(lambda m: not m, mask_tree)))
    got = jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_optimizer=opt, num_inner_steps=2))(params)
    want = jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.1, num_inner_steps=2,
        adapt_mask=mask_tree))(params)
    _tree_allclose(got, want, rtol=1e-5, atol=1e-7)

  def test_multi_transform_equals_meta_sgd_learning_rates(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    labels = {'body': {'w': 'slow', 'b': 'slow'},
              'head': {'w': 'fast', 'b': 'fast'}}
    opt = optax.multi_transform({'slow': optax.sgd(0.01),
                                 'fast': optax.sgd(0.3)}, labels)
    lrs = jax.tree.map(lambda l: 0.01 if l == 'slow' else 0.3, labels)
    got = maml.maml_loss(_mse, params, tasks, inner_optimizer=opt,
                         num_inner_steps=2)
    want = maml.maml_loss(_mse, params, tasks, inner_lr=lrs,
                          num_inner_steps=2)
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_optimizer_sees_params_structure(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    seen = []

    def update(updates, state, params_arg=None):
      seen.append((jax.tree.structure(updates),
                   jax.tree.structure(params_arg)))
      return jax.tree.map(lambda g: -0.1 * g, updates), state

    opt = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    maml.inner_adapt(_mse, params, tasks.support_x[0], tasks.support_y[0],
                     inner_optimizer=opt, num_inner_steps=1, adapt_mask='head')
    want = jax.tree.structure(params)
    self.assertEqual(seen, [(want, want)])

  def test_frozen_leaves_bit_identical_under_weight_decay(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    params['body']['b'] = params['body']['b'] + 0.5
    adapted = maml.inner_adapt(
        _mse, params, tasks.support_x[0], tasks.support_y[0],
        inner_optimizer=optax.adamw(0.01, weight_decay=0.5), num_inner_steps=3,
        adapt_mask='head')
    chex.assert_trees_all_equal(adapted['body'], params['body'])
    self.assertFalse(np.allclose(adapted['head']['w'], params['head']['w']))


# ------------------------------------------------------------ path masks


class PathMaskTest(chex.TestCase):

  @parameterized.named_parameters(
      ('regex', 'head'),
      ('regex_anchored', r'^head/'),
      ('callable', lambda path, leaf: path.startswith('head')),
      ('tree', {'body': {'w': False, 'b': False},
                'head': {'w': True, 'b': True}}))
  def test_forms_agree(self, spec):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    want = jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.1, num_inner_steps=2,
        adapt_mask={'body': {'w': False, 'b': False},
                    'head': {'w': True, 'b': True}}))(params)
    got = jax.jit(jax.grad(lambda p: maml.maml_loss(
        _mse, p, tasks, inner_lr=0.1, num_inner_steps=2,
        adapt_mask=spec)))(params)
    _tree_allclose(got, want, rtol=1e-6, atol=1e-8)

  def test_callable_gets_path_and_leaf(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    calls = []

    def spec(path, leaf):
      calls.append((path, leaf.shape))
      return leaf.ndim == 2

    adapted = maml.inner_adapt(_mse, params, tasks.support_x[0],
                               tasks.support_y[0], inner_lr=0.1,
                               adapt_mask=spec)
    self.assertEqual(calls, [('body/b', (8,)), ('body/w', (2, 8)),
                             ('head/b', (1,)), ('head/w', (8, 1))])
    chex.assert_trees_all_equal(adapted['body']['b'], params['body']['b'])
    self.assertFalse(np.allclose(adapted['body']['w'], params['body']['w']))

  def test_bad_masks(self):
    params, tasks = _init(jax.random.key(0)), _tasks(jax.random.key(1))
    x, y = tasks.support_x[0], tasks.support_y[0]
    with self.assertRaisesRegex(
        ValueError, "inner_adapt: adapt_mask matched no leaf; paths are like "
        "'body/b', 'body/w', 'head/b', 'head/w'"):
      maml.inner_adapt(_mse, params, x, y, inner_lr=0.1, adapt_mask='encoder')
    with self.assertRaisesRegex(
        ValueError, r"maml_loss: adapt_mask must be a valid regular "
        r"expression, got '\('"):
      maml.maml_loss(_mse, params, tasks, inner_lr=0.1, adapt_mask='(')
    with self.assertRaisesRegex(
        TypeError, "inner_adapt: adapt_mask must return a Python bool for "
        "each leaf, got str for path 'body/b'"):
      maml.inner_adapt(_mse, params, x, y, inner_lr=0.1,
                       adapt_mask=lambda path, leaf: path)
