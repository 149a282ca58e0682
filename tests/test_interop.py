"""metacf kernels on flax nnx, flax linen (with BatchNorm) and equinox models.

Each framework model enters the kernels as a parameter pytree plus a pure
``apply_fn(params, x)``:

* nnx: ``graphdef, params = nnx.split(model, nnx.Param)``,
  ``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)``
  (flax:examples/nnx_toy_examples/01_functional_api.py);
* linen: ``model.apply({'params': p, 'batch_stats': bs}, x,
  mutable=['batch_stats'])[0]`` with ``BatchNorm(use_running_average=False)``:
  transductive batch norm, the updated statistics are discarded;
* equinox: ``params, static = eqx.partition(model, eqx.is_array)``,
  ``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``.

The references are written here, without metacf: MAML as a hand-unrolled loop
over tasks and inner SGD steps, the Jacobian SVD as a dense
``jnp.linalg.svd`` of ``jax.jacrev`` with respect to ``ravel_pytree(params)``.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

from absl.testing import parameterized
import chex
from flax import linen
from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metacf

_IN, _HIDDEN, _OUT = 4, 8, 3
_INNER_LR = 0.1
_HIGHEST = jax.lax.Precision.HIGHEST


class _Case(NamedTuple):
  params: Any                          # the framework's parameter pytree.
  apply_fn: Callable[[Any, jax.Array], jax.Array]   # [N, IN] -> [N, OUT].
  rebuild: Callable[[Any], Callable[[jax.Array], jax.Array]]  # params -> model.


# ---------------------------------------------------------------------------
# The three models, MLP 4-8-3, float32.


class _NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(_IN, _HIDDEN, rngs=rngs)
    self.out = nnx.Linear(_HIDDEN, _OUT, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


@functools.cache
def _nnx_case() -> _Case:
  model = _NnxMLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
  return _Case(params, apply_fn, lambda p: nnx.merge(graphdef, p))


class _LinenBatchNormMLP(linen.Module):

  @linen.compact
  def __call__(self, x):
    x = linen.Dense(_HIDDEN)(x)
    x = linen.BatchNorm(use_running_average=False)(x)
    return linen.Dense(_OUT)(linen.relu(x))


@functools.cache
def _linen_case() -> _Case:
  model = _LinenBatchNormMLP()
  variables = model.init(jax.random.key(0), jnp.ones((5, _IN), jnp.float32))
  params, batch_stats = variables['params'], variables['batch_stats']

  def apply_fn(p, x):
    out, _ = model.apply({'params': p, 'batch_stats': batch_stats}, x,
                         mutable=['batch_stats'])  # New statistics discarded.
    return out

  return _Case(params, apply_fn, lambda p: functools.partial(apply_fn, p))


@functools.cache
def _eqx_case() -> _Case:
  eqx = pytest.importorskip('equinox')
  model = eqx.nn.MLP(_IN, _OUT, _HIDDEN, depth=1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  return _Case(params, apply_fn,
               lambda p: jax.vmap(eqx.combine(p, static)))


_CASES = (('nnx', _nnx_case), ('linen_batchnorm', _linen_case),
          ('equinox', _eqx_case))


# ---------------------------------------------------------------------------
# Data and references.


def _tasks(num_tasks=2, shots=5) -> metacf.maml.Task:
  k_sx, k_sy, k_qx, k_qy = jax.random.split(jax.random.key(1), 4)
  normal = lambda k, d: jax.random.normal(k, (num_tasks, shots, d),
                                          jnp.float32)
  return metacf.maml.Task(normal(k_sx, _IN), normal(k_sy, _OUT),
                          normal(k_qx, _IN), normal(k_qy, _OUT))


def _batch(seed, n=4):
  k_x, k_y = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k_x, (n, _IN), jnp.float32),
          jax.random.normal(k_y, (n, _OUT), jnp.float32))


def _mse_loss_fn(apply_fn):
  return lambda p, x, y: jnp.mean((apply_fn(p, x) - y)**2)


def _reference_meta_loss(loss_fn, params, tasks, inner_lr, num_inner_steps):
  """Mean query loss after hand-unrolled inner SGD; a Python loop over tasks."""
  losses = []
  for b in range(tasks.support_x.shape[0]):
    p = params
    for _ in range(num_inner_steps):
      g = jax.grad(loss_fn)(p, tasks.support_x[b], tasks.support_y[b])
      p = jax.tree.map(lambda w, gw: w - inner_lr * gw, p, g)
    losses.append(loss_fn(p, tasks.query_x[b], tasks.query_y[b]))
  return jnp.mean(jnp.stack(losses))


def _flat(tree):
  return ravel_pytree(tree)[0]


def _assert_same_structure(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


# ---------------------------------------------------------------------------
# 1. Second-order MAML.


class MamlInteropTest(chex.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_meta_gradient_matches_hand_unrolled_reference(self, make_case):
    case = make_case()
    loss_fn = _mse_loss_fn(case.apply_fn)
    tasks = _tasks()

    def meta_grad(params, tasks):
      return jax.grad(metacf.maml.maml_loss, argnums=1)(
          loss_fn, params, tasks, inner_lr=_INNER_LR, num_inner_steps=2)

    grads = jax.jit(meta_grad)(case.params, tasks)
    ref = jax.jit(jax.grad(functools.partial(
        _reference_meta_loss, loss_fn, inner_lr=_INNER_LR,
        num_inner_steps=2)))(case.params, tasks)
    _assert_same_structure(grads, case.params)
    g, g_ref = _flat(grads), _flat(ref)
    self.assertGreater(float(jnp.linalg.norm(g_ref)), 1e-3)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(*_CASES)
  def test_meta_train_step_keeps_structure(self, make_case):
    case = make_case()
    tasks = _tasks()
    step = metacf.maml.make_meta_train_step(
        _mse_loss_fn(case.apply_fn), optax.sgd(1e-2), inner_lr=_INNER_LR,
        num_inner_steps=1)
    optimizer = optax.sgd(1e-2)
    start = jax.tree.map(jnp.copy, case.params)  # step donates it.
    new_params, _, metrics = step(start, optimizer.init(start), tasks)

    _assert_same_structure(new_params, case.params)
    self.assertTrue(bool(jnp.all(jnp.isfinite(_flat(new_params)))))
    self.assertTrue(bool(jnp.isfinite(metrics.loss)))
    self.assertGreater(float(jnp.max(jnp.abs(
        _flat(new_params) - _flat(case.params)))), 0.0)
    # Back into the framework's model, which runs and agrees with apply_fn.
    x = tasks.query_x[0]
    np.testing.assert_allclose(case.rebuild(new_params)(x),
                               case.apply_fn(new_params, x), rtol=1e-6)


# ---------------------------------------------------------------------------
# 2. Top-k Jacobian SVD.


class JacobianSvdInteropTest(chex.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_gram_matches_dense_svd_of_jacrev(self, make_case):
    case = make_case()
    x, _ = _batch(2)
    flat, unravel = ravel_pytree(case.params)
    jac = jax.jit(jax.jacrev(
        lambda theta: case.apply_fn(unravel(theta), x).reshape(-1)))(flat)
    chex.assert_shape(jac, (x.shape[0] * _OUT, flat.size))   # [N * C, P].
    u_ref, s_ref, vt_ref = jnp.linalg.svd(jac, full_matrices=False)
    # A k in [2, 6] after which the spectrum has a clear gap, so that the
    # top-k subspace is well defined.
    gaps = np.asarray(s_ref[1:7] - s_ref[2:8])
    k = 2 + int(np.argmax(gaps))
    self.assertGreater(gaps[k - 2], 0.05 * float(s_ref[0]))
    u_ref, s_ref, vt_ref = u_ref[:, :k], s_ref[:k], vt_ref[:k]

    svd = jax.jit(functools.partial(metacf.jacobian.jacobian_svd,
                                    case.apply_fn, k=k, method='gram'))(
                                        case.params, x)
    num_rows, num_params = jac.shape
    chex.assert_shape(svd.s, (k,))
    chex.assert_shape(svd.vt, (k, num_params))
    chex.assert_shape(svd.u, (num_rows, k))
    np.testing.assert_allclose(svd.s, s_ref, rtol=1e-5)
    proj = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)
    np.testing.assert_allclose(proj(svd.vt.T, svd.vt), proj(vt_ref.T, vt_ref),
                               atol=1e-5)
    np.testing.assert_allclose(proj(svd.u, svd.u.T), proj(u_ref, u_ref.T),
                               atol=1e-5)


# ---------------------------------------------------------------------------
# 3. NTK-predicted forgetting.


def _pure_mlp_apply(p, x):
  h = jax.nn.relu(jnp.matmul(x, p['hidden']['kernel'], precision=_HIGHEST)
                  + p['hidden']['bias'][None, :])
  return (jnp.matmul(h, p['out']['kernel'], precision=_HIGHEST)
          + p['out']['bias'][None, :])


class PredictedForgettingInteropTest(chex.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_is_finite(self, make_case):
    case = make_case()
    forgetting = jax.jit(functools.partial(
        metacf.jacobian.predicted_forgetting, case.apply_fn, num_steps=5))(
            case.params, _batch(3), _batch(4), lr=0.1)
    chex.assert_shape(forgetting, ())
    self.assertEqual(forgetting.dtype, jnp.float32)
    self.assertTrue(bool(jnp.isfinite(forgetting)))
    self.assertNotEqual(float(forgetting), 0.0)

  def test_nnx_matches_pure_function_model(self):
    case = _nnx_case()
    pure_params = nnx.to_pure_dict(case.params)
    task_a, task_b = _batch(3), _batch(4)
    np.testing.assert_allclose(_pure_mlp_apply(pure_params, task_a[0]),
                               case.apply_fn(case.params, task_a[0]),
                               rtol=1e-6, atol=1e-6)

    def forgetting(apply_fn, params):
      return jax.jit(functools.partial(
          metacf.jacobian.predicted_forgetting, apply_fn, num_steps=5))(
              params, task_a, task_b, lr=0.1)

    expected = forgetting(_pure_mlp_apply, pure_params)
    self.assertNotEqual(float(expected), 0.0)
    np.testing.assert_allclose(forgetting(case.apply_fn, case.params),
                               expected, rtol=1e-5)


class ProtectInteropTest(chex.TestCase):
  """metacf.protect on the framework parameter pytrees."""

  @parameterized.named_parameters(*_CASES)
  def test_fisher_diagonal_matches_per_example_loop(self, make_case):
    case = make_case()
    x, _ = _batch(5, n=6)
    labels = jnp.arange(6, dtype=jnp.int32) % _OUT
    got = jax.jit(functools.partial(metacf.protect.fisher_diagonal,
                                    case.apply_fn, chunk_size=4))(
                                        case.params, x, labels=labels)
    _assert_same_structure(got, case.params)

    def log_p(p, xn, yn):  # One example as a batch of one, as documented.
      return jax.nn.log_softmax(case.apply_fn(p, xn[None]), axis=-1)[0, yn]

    grad = jax.jit(jax.grad(log_p))
    want = sum(_flat(grad(case.params, x[n], labels[n]))**2
               for n in range(6)) / 6
    self.assertGreater(float(jnp.max(want)), 0.0)
    np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-8)

  @parameterized.named_parameters(*_CASES)
  def test_projected_and_ewc_updates_keep_structure(self, make_case):
    case = make_case()
    x, y = _batch(6)
    grads = jax.grad(_mse_loss_fn(case.apply_fn))(case.params, x, y)
    num_params = _flat(case.params).size
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(num_params, 3)))
    basis = jnp.asarray(q.T, jnp.float32)
    tx = optax.chain(metacf.protect.orthogonal_projection(basis),
                     optax.sgd(0.1))
    updates, _ = jax.jit(tx.update)(grads, tx.init(case.params), case.params)
    _assert_same_structure(updates, case.params)
    np.testing.assert_allclose(basis @ _flat(updates), 0.0, atol=1e-6)
    self.assertGreater(float(jnp.linalg.norm(_flat(updates))), 1e-3)

    fisher = jax.tree.map(jnp.ones_like, case.params)
    anchor = jax.tree.map(jnp.zeros_like, case.params)
    tx = metacf.protect.ewc(anchor, fisher, 2.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(case.params), case.params)
    _assert_same_structure(updates, case.params)
    np.testing.assert_allclose(
        _flat(updates), _flat(grads) + 2.0 * _flat(case.params), rtol=1e-6,
        atol=1e-7)

  @parameterized.named_parameters(*_CASES[:2])
  def test_gpm_projection_on_kernels(self, make_case):
    # flax kernels are [d_in, d_out], GPM's layout (equinox's Linear stores
    # [d_out, d_in]: its bases would have to be built for the transpose).
    case = make_case()
    rng = np.random.default_rng(1)

    def basis_for(path, leaf):
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      if 'kernel' not in name:
        return None
      q, _ = np.linalg.qr(rng.normal(size=(leaf.shape[0], 2)))
      return jnp.asarray(q, jnp.float32)

    bases = jax.tree_util.tree_map_with_path(basis_for, case.params)
    x, y = _batch(7)
    grads = jax.grad(_mse_loss_fn(case.apply_fn))(case.params, x, y)
    tx = metacf.protect.gpm_projection(bases)
    updates, _ = jax.jit(tx.update)(grads, tx.init(case.params))
    _assert_same_structure(updates, case.params)
    is_none = lambda v: v is None
    checked = 0
    for m, g, u in zip(jax.tree.leaves(bases, is_leaf=is_none),
                       jax.tree.leaves(grads), jax.tree.leaves(updates)):
      if m is None:
        np.testing.assert_array_equal(u, g)
      else:
        np.testing.assert_allclose(m.T @ u, 0.0, atol=1e-6)
        np.testing.assert_allclose(u, g - m @ (m.T @ g), rtol=1e-5,
                                   atol=1e-6)
        checked += 1
    self.assertEqual(checked, 2)
