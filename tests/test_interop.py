"""Every metacf kernel family on models built from flax's and equinox's layers.

The models are small vision transformers made only of the frameworks' own
layers, one per framework, float32, image ``x [N, 4, 4, 1]`` to logits
``[N, 3]``:

* flax linen: ``Conv`` (2x2 patches, HWIO kernel) -> ``BatchNorm(
  use_running_average=False)`` -> ``Embed`` (learned positions) ->
  ``MultiHeadDotProductAttention(num_heads=2, qkv_features=8)`` ->
  ``LayerNorm`` -> ``DenseGeneral(axis=(-2, -1))`` (kernel ``[tokens, d,
  hidden]``) -> ``Dense``;
* flax nnx: the same with ``nnx.Conv``, ``nnx.BatchNorm``, ``nnx.Embed``,
  ``nnx.MultiHeadAttention(decode=False)``, ``nnx.LayerNorm``,
  ``nnx.LinearGeneral`` and ``nnx.Linear``;
* equinox: ``eqx.nn.Conv2d`` -> ``eqx.nn.MultiheadAttention`` ->
  ``eqx.nn.LayerNorm`` -> ``eqx.nn.Linear`` x 2, one example at a time,
  ``vmap``-ped over the batch.

Each enters the kernels as a parameter pytree plus a pure ``apply_fn(params,
x)``:

* nnx: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``,
  ``apply_fn = lambda p, x: nnx.merge(graphdef, p, copy_of(rest))(x)``
  (flax:examples/nnx_toy_examples/01_functional_api.py; ``rest`` holds the
  batch statistics, copied per call, see ``_nnx_case``);
* linen: ``model.apply({'params': p, 'batch_stats': bs}, x,
  mutable=['batch_stats'])[0]``: transductive batch norm, the updated
  statistics are discarded (nnx's ``BatchNorm`` does the same on its merged
  copy);
* equinox: ``params, static = eqx.partition(model, eqx.is_inexact_array)``,
  ``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``.

Every test compares with a reference written here without metacf: LoRA
shapes from the layout table below, ranks by ``np.linalg.matrix_rank`` in
float64, attention by hand-written ``einsum``s, gradients by finite
differences (``check_grads``); the Jacobian SVD by a dense ``jnp.linalg.svd``
of ``jax.jacrev``; the Fisher diagonal by a Python loop over examples (and
classes); protections by the float64 projection / penalty formula applied to
``jax.grad``; MAML by a hand-unrolled loop over tasks and inner SGD steps;
MAS by a float64 loop over examples; SI's path integral by a hand loop of
``-g u``; GEM by SciPy's NNLS on the dual (float64); ER-ACE's loss and
iCaRL's herding by NumPy.
"""

from collections.abc import Callable
import functools
import math
import re
from typing import Any, NamedTuple

from absl.testing import parameterized
import chex
import equinox as eqx
from flax import linen
from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize as scipy_optimize

import metacf

_SIDE, _PATCH = 4, 2                      # 4x4x1 images, 2x2 patches.
_TOKENS = (_SIDE // _PATCH)**2            # 4 tokens.
_D, _HEADS = 8, 2                         # model width, attention heads.
_HEAD_DIM = _D // _HEADS
_HIDDEN, _OUT = 4, 3
_INNER_LR = 0.1
_LR = 0.1
_RANK = 2
_ALPHA = 4.0
_HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture(autouse=True, scope='module')
def _fewer_xla_passes():
  """Compiles this module's programs with most XLA optimisations off.

  The models are tiny, so every test's time is XLA:CPU compile time (a
  second-order MAML step through attention is ~10 s); fewer passes cut it by
  about 40%. The numbers compared are the same computations either way.
  """
  previous = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


class _Case(NamedTuple):
  params: Any                          # the framework's parameter pytree.
  apply_fn: Callable[[Any, jax.Array], jax.Array]   # [N, 4, 4, 1] -> [N, 3].
  rebuild: Callable[[Any], Callable[[jax.Array], jax.Array]]  # params -> model.


def _path(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def _name(path: str) -> str:
  """``'attn/query/kernel'`` for linen, nnx and equinox paths alike."""
  parts = path.split('/')
  if parts[0] == 'params':
    parts = parts[1:]                       # linen's variable collection.
  if parts[-1] == 'value' and len(parts) >= 2 and parts[-2] in (
      'kernel', 'bias', 'scale', 'embedding'):
    parts = parts[:-1]                      # nnx's Variable.value.
  return '/'.join(parts)


# ---------------------------------------------------------------------------
# The three models.


class _LinenViT(linen.Module):

  @linen.compact
  def __call__(self, x):                                   # [N, 4, 4, 1]
    h = linen.Conv(_D, (_PATCH, _PATCH), strides=(_PATCH, _PATCH),
                   padding='VALID', name='conv')(x)        # [N, 2, 2, D]
    h = linen.BatchNorm(use_running_average=False, name='norm')(h)
    h = jax.nn.relu(h).reshape(h.shape[0], _TOKENS, _D)
    pos = linen.Embed(_TOKENS, _D, name='pos')(jnp.arange(_TOKENS))
    h = h + pos[None]
    h = h + linen.MultiHeadDotProductAttention(
        num_heads=_HEADS, qkv_features=_D, name='attn')(h)
    h = linen.LayerNorm(name='ln')(h)
    h = linen.DenseGeneral(_HIDDEN, axis=(-2, -1), name='head')(h)
    return linen.Dense(_OUT, name='logits')(jax.nn.relu(h))


class _NnxViT(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, _D, (_PATCH, _PATCH), strides=(_PATCH, _PATCH),
                         padding='VALID', rngs=rngs)
    self.norm = nnx.BatchNorm(_D, use_running_average=False, rngs=rngs)
    self.pos = nnx.Embed(_TOKENS, _D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(_HEADS, _D, qkv_features=_D,
                                       decode=False, rngs=rngs)
    self.ln = nnx.LayerNorm(_D, rngs=rngs)
    self.head = nnx.LinearGeneral((_TOKENS, _D), _HIDDEN, axis=(-2, -1),
                                  rngs=rngs)
    self.logits = nnx.Linear(_HIDDEN, _OUT, rngs=rngs)

  def __call__(self, x):
    h = self.norm(self.conv(x))
    h = jax.nn.relu(h).reshape(h.shape[0], _TOKENS, _D)
    h = h + self.pos(jnp.arange(_TOKENS))[None]
    h = h + self.attn(h)
    h = self.head(self.ln(h))
    return self.logits(jax.nn.relu(h))


class _EqxViT(eqx.Module):
  conv: eqx.nn.Conv2d
  attn: eqx.nn.MultiheadAttention
  ln: eqx.nn.LayerNorm
  head: eqx.nn.Linear
  logits: eqx.nn.Linear

  def __init__(self, key: jax.Array):
    k_conv, k_attn, k_head, k_logits = jax.random.split(key, 4)
    self.conv = eqx.nn.Conv2d(1, _D, _PATCH, stride=_PATCH, key=k_conv)
    self.attn = eqx.nn.MultiheadAttention(
        _HEADS, _D, use_query_bias=True, use_key_bias=True,
        use_value_bias=True, use_output_bias=True, key=k_attn)
    self.ln = eqx.nn.LayerNorm(_D)
    self.head = eqx.nn.Linear(_TOKENS * _D, _HIDDEN, key=k_head)
    self.logits = eqx.nn.Linear(_HIDDEN, _OUT, key=k_logits)

  def __call__(self, x):                                   # one [4, 4, 1]
    h = self.conv(jnp.transpose(x, (2, 0, 1)))             # [D, 2, 2]
    h = jax.nn.relu(h.reshape(_D, _TOKENS).T)              # [tokens, D]
    h = h + self.attn(h, h, h)
    h = jax.vmap(self.ln)(h)
    return self.logits(jax.nn.relu(self.head(h.reshape(-1))))


def _like_params(stats, params):
  """Batch statistics (new arrays) in the params' dtype (float64 tests)."""
  dtype = jax.tree.leaves(params)[0].dtype
  return jax.tree.map(lambda s: jnp.asarray(s, dtype), stats)


def _x(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, _SIDE, _SIDE, 1),
                           jnp.float32)


@functools.cache
def _linen_case() -> _Case:
  model = _LinenViT()
  variables = model.init(jax.random.key(0), _x(0, 2))
  params, batch_stats = variables['params'], variables['batch_stats']

  def apply_fn(p, x):
    stats = _like_params(batch_stats, p)
    out, _ = model.apply({'params': p, 'batch_stats': stats}, x,
                         mutable=['batch_stats'])  # New statistics discarded.
    return out

  return _Case(params, apply_fn, lambda p: functools.partial(apply_fn, p))


@functools.cache
def _nnx_case() -> _Case:
  graphdef, params, rest = nnx.split(_NnxViT(nnx.Rngs(0)), nnx.Param, ...)
  # New BatchStat variables for every call: BatchNorm writes its batch
  # statistics into them, which nnx refuses for variables of another trace.
  model = lambda p: nnx.merge(graphdef, p, _like_params(rest, p))
  return _Case(params, lambda p, x: model(p)(x), model)


@functools.cache
def _eqx_case() -> _Case:
  params, static = eqx.partition(_EqxViT(jax.random.key(0)),
                                 eqx.is_inexact_array)
  apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  return _Case(params, apply_fn,
               lambda p: jax.vmap(eqx.combine(p, static)))


_CASES = (('linen', _linen_case), ('nnx', _nnx_case),
          ('equinox', _eqx_case))
_FLAX_CASES = _CASES[:2]


# ---------------------------------------------------------------------------
# Data and references.


def _labels(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, _OUT, jnp.int32)


def _batch(seed, n=4):
  return _x(seed, n), _labels(seed + 1000, (n,))


def _tasks(num_tasks=2, shots=4) -> metacf.maml.Task:
  x = lambda seed: _x(seed, num_tasks * shots).reshape(
      num_tasks, shots, _SIDE, _SIDE, 1)
  y = lambda seed: _labels(seed, (num_tasks, shots))
  return metacf.maml.Task(x(11), y(12), x(13), y(14))


def _ce_loss_fn(apply_fn):
  return lambda p, x, y: jnp.mean(
      optax.losses.softmax_cross_entropy_with_integer_labels(
          apply_fn(p, x), y))


def _reference_task_loss(loss_fn, params, task, inner_lr, num_inner_steps):
  """One task's query loss after hand-unrolled inner SGD steps."""
  support_x, support_y, query_x, query_y = task
  p = params
  for _ in range(num_inner_steps):
    g = jax.grad(loss_fn)(p, support_x, support_y)
    p = jax.tree.map(lambda w, gw: w - inner_lr * gw, p, g)
  return loss_fn(p, query_x, query_y)


def _num_inner_steps(make_case) -> int:
  # Two inner steps on linen; one elsewhere: a second-order MAML program
  # through attention compiles in ~5 s per inner step on CPU.
  return 2 if make_case is _linen_case else 1


@functools.cache
def _reference_meta_grad(make_case) -> tuple[float, np.ndarray]:
  """Meta-loss and flat meta-gradient: a Python loop over ``_tasks()``."""
  case = make_case()
  loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(
      _reference_task_loss, _ce_loss_fn(case.apply_fn), inner_lr=_INNER_LR,
      num_inner_steps=_num_inner_steps(make_case))))
  tasks = _tasks()
  losses, grads = [], []
  for b in range(tasks.support_x.shape[0]):
    loss, grad = loss_and_grad(case.params, jax.tree.map(lambda f: f[b], tasks))
    losses.append(float(loss))
    grads.append(_f64(grad))
  return float(np.mean(losses)), np.mean(grads, axis=0)


def _flat(tree):
  return ravel_pytree(tree)[0]


def _f64(tree) -> np.ndarray:
  return np.asarray(_flat(tree), np.float64)


# NaN must not pass: assert_allclose's default equal_nan=True would let a NaN
# result match a NaN reference.
_assert_close = functools.partial(np.testing.assert_allclose, equal_nan=False)


def _assert_finite(test, tree):
  for leaf in jax.tree.leaves(tree):
    test.assertTrue(bool(np.all(np.isfinite(np.asarray(leaf)))))


def _assert_same_structure(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


def _orthonormal(rng, rows, cols):
  """``[rows, cols]`` with orthonormal rows (``rows <= cols``), float32."""
  q, _ = np.linalg.qr(rng.normal(size=(cols, rows)))
  return jnp.asarray(q.T, jnp.float32)


def _to_f64(tree):
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)


# ---------------------------------------------------------------------------
# 1. LoRA.
#
# The layout of every flax kernel in the models above, written out by hand
# from flax/linen/attention.py and flax/linen/linear.py: (input axes f,
# shape). query/key/value contract d_model into (heads, head_dim); out
# contracts (heads, head_dim) into d_model; head (DenseGeneral over the last
# two axes) contracts (tokens, d); conv is HWIO.
_FLAX_LAYOUT = {
    'conv/kernel': (3, (_PATCH, _PATCH, 1, _D)),
    'attn/query/kernel': (1, (_D, _HEADS, _HEAD_DIM)),
    'attn/key/kernel': (1, (_D, _HEADS, _HEAD_DIM)),
    'attn/value/kernel': (1, (_D, _HEADS, _HEAD_DIM)),
    'attn/out/kernel': (2, (_HEADS, _HEAD_DIM, _D)),
    'head/kernel': (2, (_TOKENS, _D, _HIDDEN)),
    'logits/kernel': (1, (_HIDDEN, _OUT)),
}


def _model_fan_in_axes(path, leaf):
  """flax_fan_in_axes plus the model's own 3-D DenseGeneral 'head'."""
  if _name(path) == 'head/kernel':
    return 2
  return metacf.adapters.flax_fan_in_axes(path, leaf)


def _random_b(lora_params, seed):
  """The adapters with a random nonzero ``b`` (``lora_init`` gives 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda ab: None if ab is None else {
          'a': ab['a'],
          'b': jnp.asarray(rng.normal(size=ab['b'].shape), ab['b'].dtype)},
      lora_params, is_leaf=lambda v: v is None or (
          isinstance(v, dict) and set(v) == {'a', 'b'}))


def _adapters_by_name(lora_params) -> dict[str, Any]:
  is_ab = lambda v: v is None or (isinstance(v, dict) and set(v) == {'a', 'b'})
  flat, _ = jax.tree.flatten_with_path(lora_params, is_leaf=is_ab)
  return {_name(_path(kp)): ab for kp, ab in flat if ab is not None}


def _params_by_name(params) -> dict[str, np.ndarray]:
  flat, _ = jax.tree.flatten_with_path(params)
  return {_name(_path(kp)): np.asarray(v) for kp, v in flat}


def _attention_reference(w: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
  """flax's multi-head self-attention, float64 einsums: ``[N, L, D]``."""
  proj = lambda n: (np.einsum('nld,dhk->nlhk', h, w[f'{n}/kernel'])
                    + w[f'{n}/bias'])
  q, k, v = proj('query'), proj('key'), proj('value')
  logits = np.einsum('nqhk,nshk->nhqs', q / math.sqrt(_HEAD_DIM), k)
  logits = logits - logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
  o = np.einsum('nhqs,nshk->nqhk', weights, v)
  return np.einsum('nqhk,hkd->nqd', o, w['out/kernel']) + w['out/bias']


@functools.cache
def _linen_attention():
  model = linen.MultiHeadDotProductAttention(num_heads=_HEADS,
                                             qkv_features=_D)
  h = jax.random.normal(jax.random.key(5), (2, _TOKENS, _D), jnp.float32)
  return model.init(jax.random.key(6), h), model.apply, h


@functools.cache
def _nnx_attention():
  graphdef, params = nnx.split(nnx.MultiHeadAttention(
      _HEADS, _D, qkv_features=_D, decode=False, rngs=nnx.Rngs(6)))
  h = jax.random.normal(jax.random.key(5), (2, _TOKENS, _D), jnp.float32)
  return params, lambda p, x: nnx.merge(graphdef, p)(x), h


def _eqx_flip(tree):
  """equinox's ``[out, in]`` weights reversed to ``[in, out]`` (the recipe)."""
  return jax.tree.map(jnp.transpose, tree)


class LoraInteropTest(chex.TestCase):
  """lora_init, lora_merge, with_lora on flax attention, conv, DenseGeneral."""

  @parameterized.named_parameters(*_FLAX_CASES)
  def test_flax_layouts_shapes_and_merged_ranks(self, make_case):
    params = make_case().params
    lora = metacf.adapters.lora_init(jax.random.key(1), params, _RANK,
                                     fan_in_axes=_model_fan_in_axes)
    adapters = _adapters_by_name(lora)
    # Kernels only: no bias (2-D in attention), scale or embedding table.
    self.assertEqual(set(adapters), set(_FLAX_LAYOUT))
    weights = _params_by_name(params)
    lora = _random_b(lora, 2)
    trained = _adapters_by_name(lora)
    merged = _params_by_name(metacf.adapters.lora_merge(params, lora,
                                                        alpha=_ALPHA))
    for name, (f, shape) in _FLAX_LAYOUT.items():
      with self.subTest(name):
        self.assertEqual(weights[name].shape, shape)
        d_in, d_out = math.prod(shape[:f]), math.prod(shape[f:])
        chex.assert_shape(adapters[name]['a'], (d_in, _RANK))
        chex.assert_shape(adapters[name]['b'], (_RANK, d_out))
        self.assertEqual(adapters[name]['a'].dtype, jnp.float32)
        delta = (merged[name].astype(np.float64)
                 - weights[name].astype(np.float64))
        self.assertTrue(bool(np.all(np.isfinite(delta))))
        a, b = (np.asarray(trained[name][k], np.float64) for k in ('a', 'b'))
        _assert_close(delta, (_ALPHA / _RANK) * (a @ b).reshape(shape),
                      rtol=1e-5, atol=1e-6)
        # The update is a rank-r map from the kernel's input axes to its
        # output axes (a kernel read with the wrong layout has rank > r).
        matrix = delta.reshape(d_in, d_out)
        self.assertEqual(np.linalg.matrix_rank(matrix, tol=1e-5), _RANK)
    for name in set(weights) - set(_FLAX_LAYOUT):
      np.testing.assert_array_equal(merged[name], weights[name])

  @parameterized.named_parameters(*_FLAX_CASES)
  def test_attention_kernel_without_fan_in_axes_raises(self, make_case):
    params = make_case().params
    with self.assertRaisesRegex(ValueError, 'fan_in_axes'):
      metacf.adapters.lora_init(jax.random.key(1), params, _RANK)
    with self.assertRaisesRegex(ValueError, 'fan_in_axes'):
      metacf.adapters.lora_init(jax.random.key(1), params, _RANK,
                                targets='attn/query/kernel')
    # f outside 1..ndim-1 for a 3-D kernel.
    with self.assertRaisesRegex(ValueError, 'fan_in_axes'):
      metacf.adapters.lora_init(jax.random.key(1), params, _RANK,
                                targets='attn/query/kernel', fan_in_axes=3)

  @parameterized.named_parameters(('linen', 'linen'), ('nnx', 'nnx'))
  def test_merged_attention_matches_einsum_reference(self, framework):
    params, apply_fn, h = (_linen_attention() if framework == 'linen'
                           else _nnx_attention())
    lora = _random_b(metacf.adapters.lora_init(
        jax.random.key(3), params, _RANK,
        fan_in_axes=metacf.adapters.flax_fan_in_axes), 4)
    adapters = _adapters_by_name(lora)
    self.assertEqual(set(adapters), {'query/kernel', 'key/kernel',
                                     'value/kernel', 'out/kernel'})
    # The reference merges by the contract's formula, in float64.
    w = {k: v.astype(np.float64) for k, v in _params_by_name(params).items()}
    for name, ab in adapters.items():
      a, b = (np.asarray(ab[k], np.float64) for k in ('a', 'b'))
      w[name] = w[name] + (_ALPHA / _RANK) * (a @ b).reshape(w[name].shape)
    want = _attention_reference(w, np.asarray(h, np.float64))
    got = jax.jit(metacf.adapters.with_lora(apply_fn, alpha=_ALPHA))(
        params, lora, h)
    chex.assert_shape(got, (2, _TOKENS, _D))
    _assert_finite(self, got)
    # The model without adapters matches the reference without updates.
    plain = _attention_reference(
        {k: v.astype(np.float64) for k, v in _params_by_name(params).items()},
        np.asarray(h, np.float64))
    _assert_close(apply_fn(params, h), plain, rtol=1e-5, atol=1e-5)
    self.assertGreater(float(np.max(np.abs(want - plain))), 1e-2)
    _assert_close(got, want, rtol=1e-5, atol=1e-5)

  def test_equinox_recipe_shapes_ranks_and_linear_reference(self):
    case = _eqx_case()
    flipped = _eqx_flip(case.params)
    # The default targets: 'weight$' would also select eqx.nn.LayerNorm's
    # 1-D weight, which lora_init rejects.
    lora = metacf.adapters.lora_init(jax.random.key(1), flipped, _RANK)
    adapters = _adapters_by_name(lora)
    # equinox weights, transposed: [in, out] and conv [kw, kh, c_in, c_out].
    layout = {
        'conv/weight': (3, (_PATCH, _PATCH, 1, _D)),
        'attn/query_proj/weight': (1, (_D, _D)),
        'attn/key_proj/weight': (1, (_D, _D)),
        'attn/value_proj/weight': (1, (_D, _D)),
        'attn/output_proj/weight': (1, (_D, _D)),
        'head/weight': (1, (_TOKENS * _D, _HIDDEN)),
        'logits/weight': (1, (_HIDDEN, _OUT)),
    }
    self.assertEqual(set(adapters), set(layout))
    lora = _random_b(lora, 2)
    adapters = _adapters_by_name(lora)
    merged = _eqx_flip(metacf.adapters.lora_merge(flipped, lora,
                                                  alpha=_ALPHA))
    _assert_same_structure(merged, case.params)
    weights, merged_w = _params_by_name(case.params), _params_by_name(merged)
    for name, (f, shape) in layout.items():
      with self.subTest(name):
        d_in, d_out = math.prod(shape[:f]), math.prod(shape[f:])
        chex.assert_shape(adapters[name]['a'], (d_in, _RANK))
        chex.assert_shape(adapters[name]['b'], (_RANK, d_out))
        delta = (merged_w[name].astype(np.float64)
                 - weights[name].astype(np.float64))
        # Back in equinox's layout: [out, in...], rank r.
        self.assertEqual(delta.shape, shape[::-1])
        self.assertEqual(np.linalg.matrix_rank(
            delta.T.reshape(d_in, d_out), tol=1e-5), _RANK)
    # x -> W x + (alpha / r) b.T (a.T x) + bias on the logits layer, float64.
    h = np.random.default_rng(3).normal(size=(_HIDDEN,))
    a, b = (np.asarray(adapters['logits/weight'][k], np.float64)
            for k in ('a', 'b'))
    want = (weights['logits/weight'].astype(np.float64) @ h
            + (_ALPHA / _RANK) * b.T @ (a.T @ h)
            + weights['logits/bias'].astype(np.float64))
    got = merged.logits(jnp.asarray(h, jnp.float32))
    _assert_close(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(*_CASES)
  def test_adapter_gradients_match_finite_differences(self, make_case):
    case = make_case()
    x, y = _batch(21)
    # flax's BatchNorm computes its statistics in jnp.promote_types(dtype,
    # float32), which strict promotion rejects for float64 (flax 0.12.8,
    # linen/normalization.py _compute_stats): standard promotion here.
    with jax.enable_x64(True), jax.numpy_dtype_promotion('standard'):
      params = _to_f64(case.params)
      x = jnp.asarray(x, jnp.float64)
      if make_case is _eqx_case:
        lora = metacf.adapters.lora_init(jax.random.key(1),
                                         _eqx_flip(params), _RANK)
        apply_fn = lambda p, lp, xs: case.apply_fn(_eqx_flip(
            metacf.adapters.lora_merge(_eqx_flip(p), lp, alpha=_ALPHA)), xs)
      else:
        lora = metacf.adapters.lora_init(jax.random.key(1), params, _RANK,
                                         fan_in_axes=_model_fan_in_axes)
        apply_fn = metacf.adapters.with_lora(case.apply_fn, alpha=_ALPHA)
      lora = _random_b(lora, 5)
      self.assertEqual(_flat(lora).dtype, jnp.float64)

      @jax.jit
      def loss(lp):
        return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
            apply_fn(params, lp, x), y))

      grads = jax.grad(loss)(lora)
      _assert_same_structure(grads, lora)
      _assert_finite(self, grads)
      self.assertGreater(float(jnp.linalg.norm(_flat(grads))), 1e-4)
      # nnx's attention calls jax.nn.dot_product_attention, whose softmax
      # runs in float32 even for float64 inputs (and nnx.Embed keeps its
      # init dtype, float32): finite differences of the nnx model are only
      # good to ~1e-4 relative. linen and equinox run float64 throughout.
      tol = 2e-3 if make_case is _nnx_case else None
      jax.test_util.check_grads(loss, (lora,), order=1, modes=('rev',),
                                atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
# 2. Second-order MAML.


class MamlInteropTest(chex.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_meta_gradient_matches_hand_unrolled_reference(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)

    def meta_grad(params, tasks):
      return jax.grad(metacf.maml.maml_loss, argnums=1)(
          loss_fn, params, tasks, inner_lr=_INNER_LR,
          num_inner_steps=_num_inner_steps(make_case))

    grads = jax.jit(meta_grad)(case.params, _tasks())
    _, want = _reference_meta_grad(make_case)
    _assert_same_structure(grads, case.params)
    _assert_finite(self, grads)
    self.assertGreater(float(np.linalg.norm(want)), 1e-3)
    _assert_close(_flat(grads), want, rtol=1e-5,
                  atol=1e-6 * float(np.max(np.abs(want))))

  # The step is framework-agnostic once maml_loss is right (above); nnx is
  # where its output has to go back into a graph. One model keeps the
  # module's compile time down.
  def test_meta_train_step_matches_hand_unrolled_reference_nnx(self):
    make_case = _nnx_case
    case = make_case()
    outer_lr = 1e-2
    step = metacf.maml.make_meta_train_step(
        _ce_loss_fn(case.apply_fn), optax.sgd(outer_lr), inner_lr=_INNER_LR,
        num_inner_steps=_num_inner_steps(make_case))
    start = jax.tree.map(jnp.copy, case.params)  # step donates it.
    new_params, _, metrics = step(start, optax.sgd(outer_lr).init(start),
                                  _tasks())
    want_loss, want_grad = _reference_meta_grad(make_case)

    _assert_same_structure(new_params, case.params)
    _assert_finite(self, new_params)
    _assert_close(metrics.loss, want_loss, rtol=1e-5)
    want = _f64(case.params) - outer_lr * want_grad
    _assert_close(_flat(new_params), want, rtol=1e-5,
                  atol=1e-7)
    self.assertGreater(float(np.max(np.abs(want - _f64(case.params)))),
                       1e-6)
    # Back into the framework's model, which runs and agrees with apply_fn.
    x = _tasks().query_x[0]
    _assert_close(case.rebuild(new_params)(x),
                  case.apply_fn(new_params, x), rtol=1e-6)


class MamlFamilyInteropTest(chex.TestCase):
  """Reptile, iMAML, prototypical networks and MAML++ on the three models."""

  @parameterized.named_parameters(*_CASES)
  def test_reptile_grad_matches_hand_loop(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    tasks = _tasks()
    got = jax.jit(lambda p, t: metacf.maml.reptile_grad(
        loss_fn, p, t, inner_lr=_INNER_LR, num_inner_steps=2))(
            case.params, tasks)
    adapted = []
    for b in range(tasks.support_x.shape[0]):
      p = case.params
      for _ in range(2):
        g = jax.grad(loss_fn)(p, tasks.support_x[b], tasks.support_y[b])
        p = jax.tree.map(lambda w, gw: w - _INNER_LR * gw, p, g)
      adapted.append(_f64(p))
    want = _f64(case.params) - np.mean(adapted, axis=0)
    _assert_same_structure(got, case.params)
    self.assertGreater(float(np.abs(want).max()), 1e-4)
    _assert_close(_flat(got), want, rtol=1e-4, atol=1e-6)

  @parameterized.named_parameters(*_CASES)
  def test_imaml_grad_matches_numpy_cg_on_dense_hessian(self, make_case):
    # float64: the proximal inner loop by hand, then a textbook CG on the
    # dense (I + H / reg) of the model's support loss at phi.
    reg, steps, cg_steps = 2.0, 2, 3
    case = make_case()       # built (and cached) outside float64 mode.
    # Standard promotion: flax's BatchNorm statistics (see the LoRA test).
    with jax.enable_x64(True), jax.numpy_dtype_promotion('standard'):
      params = _to_f64(case.params)
      loss_fn = _ce_loss_fn(case.apply_fn)
      tasks = _tasks(num_tasks=1)
      tasks = tasks._replace(support_x=_to_f64(tasks.support_x),
                             query_x=_to_f64(tasks.query_x))
      loss, grads = metacf.maml.imaml_grad(
          loss_fn, params, tasks, reg=reg, inner_lr=_INNER_LR,
          num_inner_steps=steps, cg_steps=cg_steps)
      flat, unravel = ravel_pytree(params)
      task = jax.tree.map(lambda a: a[0], tasks)
      f = lambda v, x, y: loss_fn(unravel(v), x, y)
      phi = np.asarray(flat)
      for _ in range(steps):
        phi = phi - _INNER_LR * (
            np.asarray(jax.grad(f)(phi, task.support_x, task.support_y))
            + reg * (phi - np.asarray(flat)))
      hess = np.asarray(jax.hessian(f)(phi, task.support_x, task.support_y))
      g_q = np.asarray(jax.grad(f)(phi, task.query_x, task.query_y))
      matrix = np.eye(len(phi)) + hess / reg
      x, r = np.zeros_like(g_q), g_q.copy()
      d = r.copy()
      for _ in range(cg_steps):
        rr = r @ r
        alpha = rr / (d @ matrix @ d)
        x, r = x + alpha * d, r - alpha * (matrix @ d)
        d = r + (r @ r) / rr * d
      _assert_same_structure(grads, params)
      _assert_close(loss, f(phi, task.query_x, task.query_y), rtol=1e-10)
      self.assertGreater(float(np.abs(x).max()), 1e-4)
      # atol: the conv bias before BatchNorm has an exactly-zero gradient,
      # which both sides compute as rounding noise (~1e-8).
      _assert_close(_f64(grads), x, rtol=1e-7,
                    atol=1e-6 * float(np.abs(x).max()))

  @parameterized.named_parameters(*_CASES)
  def test_prototype_logits_on_model_embeddings(self, make_case):
    # The model's [N, 3] outputs as embeddings; a 3-way episode.
    case = make_case()
    support_x, query_x = _x(21, 6), _x(22, 4)
    labels = jnp.array([0, 1, 2, 0, 1, 2])

    def loss(p):
      logits = metacf.maml.prototype_logits(
          case.apply_fn(p, support_x), labels, case.apply_fn(p, query_x), 3)
      return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
          logits, jnp.array([0, 1, 2, 1]))), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        case.params)
    emb_s = np.asarray(case.apply_fn(case.params, support_x), np.float64)
    emb_q = np.asarray(case.apply_fn(case.params, query_x), np.float64)
    protos = np.stack([emb_s[np.asarray(labels) == k].mean(0)
                       for k in range(3)])
    want = -((emb_q[:, None] - protos[None]) ** 2).sum(-1)
    _assert_close(logits, want, rtol=1e-4, atol=1e-5)
    self.assertTrue(bool(np.isfinite(value)))
    _assert_finite(self, grads)
    _assert_same_structure(grads, case.params)

  def test_maml_plus_plus_per_step_layer_rates_nnx(self):
    # LSLR: one learnable rate per leaf and step; multi-step loss.
    case = _nnx_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    tasks = _tasks()
    rates = jax.tree.map(lambda _: jnp.array([0.1, 0.05]), case.params)
    weights = jnp.array([0.3, 0.7])

    def meta_loss(p, lr):
      return metacf.maml.maml_loss(
          loss_fn, p, tasks, inner_lr=lr, num_inner_steps=2,
          per_step_inner_lr=True, step_weights=weights)

    got = jax.jit(meta_loss)(case.params, rates)
    total = 0.0
    for b in range(2):
      p = case.params
      for s in range(2):
        g = jax.grad(loss_fn)(p, tasks.support_x[b], tasks.support_y[b])
        p = jax.tree.map(lambda w, gw, a: w - a[s] * gw, p, g, rates)
        total += weights[s] * loss_fn(p, tasks.query_x[b], tasks.query_y[b])
    _assert_close(got, total / 2, rtol=1e-5)
    rate_grads = jax.jit(jax.grad(meta_loss, argnums=1))(case.params, rates)
    _assert_same_structure(rate_grads, rates)
    _assert_finite(self, rate_grads)


# ---------------------------------------------------------------------------
# 3. Top-k Jacobian SVD and NTK-predicted forgetting.


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
    _assert_finite(self, (svd.s, svd.vt, svd.u))
    _assert_close(svd.s, s_ref, rtol=1e-5)
    proj = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)
    _assert_close(proj(svd.vt.T, svd.vt), proj(vt_ref.T, vt_ref), atol=1e-5)
    _assert_close(proj(svd.u, svd.u.T), proj(u_ref, u_ref.T), atol=1e-5)


def _pure_mlp_apply(p, x):
  h = jax.nn.relu(jnp.matmul(x, p['hidden']['kernel'], precision=_HIGHEST)
                  + p['hidden']['bias'][None, :])
  return (jnp.matmul(h, p['out']['kernel'], precision=_HIGHEST)
          + p['out']['bias'][None, :])


class _NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, _OUT, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


class PredictedForgettingInteropTest(chex.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_is_finite(self, make_case):
    case = make_case()
    forgetting = jax.jit(functools.partial(
        metacf.jacobian.predicted_forgetting, case.apply_fn, num_steps=5,
        loss='cross_entropy'))(case.params, _batch(3), _batch(4), lr=0.1)
    chex.assert_shape(forgetting, ())
    self.assertEqual(forgetting.dtype, jnp.float32)
    self.assertTrue(bool(jnp.isfinite(forgetting)))
    self.assertNotEqual(float(forgetting), 0.0)

  def test_nnx_matches_pure_function_model(self):
    graphdef, params = nnx.split(_NnxMLP(nnx.Rngs(0)), nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
    pure_params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    task = lambda: (jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),
                    jnp.asarray(rng.normal(size=(4, _OUT)), jnp.float32))
    task_a, task_b = task(), task()
    _assert_close(_pure_mlp_apply(pure_params, task_a[0]),
                  apply_fn(params, task_a[0]),
                  rtol=1e-6, atol=1e-6)

    def forgetting(apply_fn, params):
      return jax.jit(functools.partial(
          metacf.jacobian.predicted_forgetting, apply_fn, num_steps=5))(
              params, task_a, task_b, lr=0.1)

    expected = forgetting(_pure_mlp_apply, pure_params)
    self.assertNotEqual(float(expected), 0.0)
    _assert_close(forgetting(apply_fn, params), expected,
                  rtol=1e-5)


# ---------------------------------------------------------------------------
# 4. Fisher diagonal.


@functools.cache
def _log_prob_grad(make_case):
  """``jax.grad`` of one example's ``log p(y | x)``, jitted, per model."""
  apply_fn = make_case().apply_fn

  def log_p(p, xn, yn):  # One example as a batch of one, as documented.
    return jax.nn.log_softmax(apply_fn(p, xn[None]), axis=-1)[0, yn]

  return jax.jit(jax.grad(log_p))


class FisherDiagonalInteropTest(chex.TestCase):

  @parameterized.named_parameters(
      *[(f'{name}_{kind}', make_case, kind) for name, make_case in _CASES
        for kind in ('true', 'empirical')])
  def test_matches_per_example_loop(self, make_case, kind):
    case = make_case()
    n = 6
    x, labels = _batch(5, n=n)
    got = jax.jit(functools.partial(
        metacf.protect.fisher_diagonal, case.apply_fn, chunk_size=4))(
            case.params, x, labels=labels if kind == 'empirical' else None)
    _assert_same_structure(got, case.params)
    _assert_finite(self, got)

    grad = _log_prob_grad(make_case)
    probs = jax.nn.softmax(jax.vmap(
        lambda xn: case.apply_fn(case.params, xn[None])[0])(x), axis=-1)
    want = np.zeros(_flat(case.params).size)
    for i in range(n):
      if kind == 'empirical':
        want += _f64(grad(case.params, x[i], labels[i]))**2
      else:   # sum over classes, weighed by the model's own probabilities.
        for c in range(_OUT):
          want += float(probs[i, c]) * _f64(
              grad(case.params, x[i], jnp.int32(c)))**2
    want /= n
    self.assertGreater(float(np.max(want)), 0.0)
    _assert_close(_flat(got), want, rtol=1e-5,
                  atol=1e-6 * float(np.max(want)))


# ---------------------------------------------------------------------------
# 5. Protections in a user-written jitted step, arrays swapped in the state.


def _user_step(tx, loss_fn):
  """An ordinary optax training step, written as a user would."""

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates, grads

  return step


def _assert_no_baked_arrays(test, step, *args):
  """The lowered step holds no array constant of >= 64 elements.

  Arrays captured by a transformation's closure become dense constants of
  the program (``dense<"0x...">``, 8 hex digits per float32); the ones held
  in the state are arguments. 64 is the size of the smallest protected
  array here (an attention kernel, the head kernel's GPM basis). Lowering
  reuses the step's trace (its ``assert_max_traces`` would fail otherwise).
  """
  text = step.lower(*args).as_text()
  sizes = [len(c) // 8 for c in re.findall(r'dense<"0x([0-9A-Fa-f]+)">', text)]
  test.assertLess(max(sizes, default=0), 64)


def _gpm_kernel(path: str, leaf) -> bool:
  """Kernels in GPM's layout ``[d_in..., d_out]``: dense, DenseGeneral, conv.

  Not the attention projections, whose 3-D kernels have 2 output axes
  (query/key/value) or 2 input axes plus 1 output axis read as 16 x 8
  (out), which is not their contraction.
  """
  return _name(path) in ('conv/kernel', 'head/kernel', 'logits/kernel') and (
      np.ndim(leaf) >= 2)


class ProtectInteropTest(chex.TestCase):
  """State-held protections inside a user's jax.jit step, three tasks."""

  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()  # Every test's step has the same source.

  @parameterized.named_parameters(*_CASES)
  def test_orthogonal_projection_basis_swapped_without_retrace(
      self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    num_params = _flat(case.params).size
    rng = np.random.default_rng(0)
    bases = []
    for t in range(3):   # A basis that grows by a row per task, zero-padded.
      v = np.array(_orthonormal(rng, 3, num_params))
      v[t + 1:] = 0.0
      bases.append(jnp.asarray(v))
    tx = optax.chain(metacf.protect.orthogonal_projection(bases[0]),
                     optax.sgd(_LR))
    step = _user_step(tx, loss_fn)
    params = case.params
    opt_state = tx.init(params)
    for t in range(3):
      opt_state = optax.tree.set(opt_state, basis=bases[t])
      x, y = _batch(30 + t)
      new_params, opt_state, updates, grads = step(params, opt_state, x, y)
      _assert_same_structure(updates, params)
      _assert_finite(self, updates)
      v, g = np.asarray(bases[t], np.float64), _f64(grads)
      want = -_LR * (g - v.T @ (v @ g))
      self.assertGreater(float(np.linalg.norm(want)), 1e-4)
      _assert_close(_flat(updates), want, rtol=1e-4,
                    atol=1e-6 * float(np.max(np.abs(want))))
      _assert_close(v @ _f64(updates), 0.0, atol=1e-6)
      np.testing.assert_array_equal(optax.tree.get(opt_state, 'basis'),
                                    bases[t])
      params = new_params
    _assert_no_baked_arrays(self, step, params, opt_state, x, y)
    self.assertEqual(step._cache_size(), 1)

  @parameterized.named_parameters(*_CASES)
  def test_ewc_anchor_and_fisher_swapped_without_retrace(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    rng = np.random.default_rng(1)
    like = lambda fn: jax.tree.map(
        lambda p: jnp.asarray(fn(p.shape), p.dtype), case.params)
    strength = 2.0
    tasks = [(like(lambda s: rng.normal(size=s)),             # anchor
              like(lambda s: rng.uniform(0.1, 1.0, size=s)))  # fisher
             for _ in range(3)]
    tx = optax.chain(metacf.protect.ewc(*tasks[0], strength), optax.sgd(_LR))
    step = _user_step(tx, loss_fn)
    params = case.params
    opt_state = tx.init(params)
    for t, (anchor, fisher) in enumerate(tasks):
      opt_state = optax.tree.set(opt_state, anchor=anchor, fisher=fisher)
      x, y = _batch(40 + t)
      new_params, opt_state, updates, grads = step(params, opt_state, x, y)
      _assert_same_structure(updates, params)
      _assert_finite(self, updates)
      want = -_LR * (_f64(grads) + strength * _f64(fisher) * (
          _f64(params) - _f64(anchor)))
      _assert_close(_flat(updates), want, rtol=1e-5,
                    atol=1e-6)
      np.testing.assert_array_equal(
          _flat(optax.tree.get(opt_state, 'anchor')), _flat(anchor))
      np.testing.assert_array_equal(
          _flat(optax.tree.get(opt_state, 'fisher')), _flat(fisher))
      params = new_params
    _assert_no_baked_arrays(self, step, params, opt_state, x, y)
    self.assertEqual(step._cache_size(), 1)

  # equinox's Linear stores [d_out, d_in], not GPM's [d_in, d_out] layout:
  # its bases would have to be built for the transpose.
  @parameterized.named_parameters(*_FLAX_CASES)
  def test_gpm_projection_bases_swapped_without_retrace(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    rng = np.random.default_rng(2)

    def bases_for_task():
      def basis(key_path, leaf):
        if not _gpm_kernel(_path(key_path), leaf):
          return None
        d_in = math.prod(leaf.shape[:-1])
        return _orthonormal(rng, 2, d_in).T            # [d_in, 2] columns.
      return jax.tree_util.tree_map_with_path(basis, case.params)

    all_bases = [bases_for_task() for _ in range(3)]
    is_none = lambda v: v is None
    self.assertEqual(sum(m is not None for m in jax.tree.leaves(
        all_bases[0], is_leaf=is_none)), 3)
    tx = optax.chain(metacf.protect.gpm_projection(all_bases[0]),
                     optax.sgd(_LR))
    step = _user_step(tx, loss_fn)
    params = case.params
    opt_state = tx.init(params)
    for t, bases in enumerate(all_bases):
      opt_state = optax.tree.set(opt_state, bases=bases)
      x, y = _batch(50 + t)
      new_params, opt_state, updates, grads = step(params, opt_state, x, y)
      _assert_same_structure(updates, params)
      _assert_finite(self, updates)
      scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
      checked = 0
      for m, g, u in zip(jax.tree.leaves(bases, is_leaf=is_none),
                         jax.tree.leaves(grads), jax.tree.leaves(updates)):
        g = np.asarray(g, np.float64)
        if m is None:
          _assert_close(u, -_LR * g, rtol=1e-6,
                        atol=1e-7 * _LR * scale)
          continue
        m = np.asarray(m, np.float64)
        g2 = g.reshape(m.shape[0], g.shape[-1])
        want = -_LR * (g2 - m @ (m.T @ g2))
        self.assertGreater(float(np.max(np.abs(want))), 0.0)
        u2 = np.asarray(u, np.float64).reshape(want.shape)
        _assert_close(u2, want, rtol=1e-4,
                      atol=1e-6 * float(np.max(np.abs(want))))
        _assert_close(m.T @ u2, 0.0, atol=1e-6)
        checked += 1
      self.assertEqual(checked, 3)
      params = new_params
    _assert_no_baked_arrays(self, step, params, opt_state, x, y)
    self.assertEqual(step._cache_size(), 1)


# ---------------------------------------------------------------------------
# 6. Continual-learning baselines: MAS, SI's path integral, GEM, ER-ACE and
#    iCaRL's herding. MAS, whose per-example batch of one meets every
#    framework's normalisation and vmap, runs on the three models; the others
#    on one model each (nnx, linen, equinox in turn): they see the model only
#    through grads and logits, and each model adds seconds of XLA compiles.


def _herding_reference(features, num_exemplars) -> list[int]:
  """iCaRL's Algorithm 4 as a float64 NumPy loop (ties: lowest index)."""
  f = np.asarray(features, np.float64)
  mean, total, chosen = f.mean(axis=0), np.zeros(f.shape[1]), []
  for k in range(num_exemplars):
    dist = np.sum((mean[None] - (total[None] + f) / (k + 1))**2, axis=-1)
    dist[chosen] = np.inf
    chosen.append(int(np.argmin(dist)))
    total = total + f[chosen[-1]]
  return chosen


def _ace_reference(logits, labels, active) -> tuple[np.ndarray, np.ndarray]:
  """ER-ACE's loss and its gradient w.r.t. the logits, float64 NumPy."""
  z = np.asarray(logits, np.float64)
  active = np.broadcast_to(np.asarray(active), z.shape)
  masked = np.where(active, z, -np.inf)
  top = masked.max(axis=-1, keepdims=True)
  e = np.exp(masked - top)
  rows, labels = np.arange(z.shape[0]), np.asarray(labels)
  loss = top[:, 0] + np.log(e.sum(-1)) - z[rows, labels]
  grad = e / e.sum(-1, keepdims=True)
  grad[rows, labels] -= 1.0
  return loss, grad


class ContinualBaselinesInteropTest(chex.TestCase):
  """MAS, SI (path integral), GEM, ER-ACE and herding (issue 27)."""

  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()  # _user_step's steps share their source.

  @parameterized.named_parameters(*_CASES)
  def test_mas_importance_matches_float64_per_example_loop(self, make_case):
    case = make_case()
    n = 5   # chunks of 2: a lax.map over 2 chunks and a rest of 1.
    mas = jax.jit(lambda p, x: metacf.protect.mas_importance(
        case.apply_fn, p, x, chunk_size=2))
    xs = [_x(60, n), _x(61, n)]
    got = [mas(case.params, x) for x in xs]
    self.assertEqual(mas._cache_size(), 1)
    # Standard promotion: flax's BatchNorm statistics (see the LoRA test).
    with jax.enable_x64(True), jax.numpy_dtype_promotion('standard'):
      params = _to_f64(case.params)
      grad = jax.jit(jax.grad(lambda p, xn: jnp.sum(jnp.square(
          case.apply_fn(p, xn[None])))))   # one example, a batch of one.
      for x, ours in zip(xs, got):
        x = np.asarray(x, np.float64)
        want = np.mean([np.abs(_f64(grad(params, x[i]))) for i in range(n)],
                       axis=0)
        _assert_same_structure(ours, case.params)
        self.assertGreater(float(want.max()), 1e-3)
        # atol: the conv bias before BatchNorm has an exactly-zero gradient,
        # rounding noise on both sides.
        _assert_close(_flat(ours), want, rtol=1e-4,
                      atol=1e-6 * float(want.max()))

  @parameterized.named_parameters(('nnx', _nnx_case))
  def test_si_and_mas_through_ewc_in_one_user_step(self, make_case):
    # Synaptic Intelligence as a user writes it: one transformation for all
    # tasks, path_integral outermost around EWC's quadratic and SGD with
    # momentum; after each task omega becomes si_importance, the anchor and
    # importance are swapped into the state and omega is reset, by name.
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    damping, strength, momentum = 0.1, 50.0, 0.9
    zeros = optax.tree.zeros_like(case.params)
    tx = metacf.protect.path_integral(optax.chain(
        metacf.protect.ewc(case.params, zeros, strength),
        optax.sgd(_LR, momentum=momentum)))
    step = _user_step(tx, loss_fn)
    si = jax.jit(lambda w, d: metacf.protect.si_importance(
        w, d, damping=damping))
    mas = jax.jit(lambda p, x: metacf.protect.mas_importance(
        case.apply_fn, p, x))
    penalty = jax.jit(lambda p, a, f: metacf.protect.ewc_penalty(
        p, a, f, strength))
    params, opt_state = case.params, tx.init(case.params)
    anchor, importance = _f64(case.params), np.zeros(_flat(zeros).size)
    trace = np.zeros_like(anchor)            # SGD's momentum, by hand.
    for task, num_steps in enumerate((3, 2, 2)):
      start, omega = params, np.zeros_like(anchor)
      for s in range(num_steps):
        new_params, opt_state, updates, grads = step(
            params, opt_state, *_batch(130 + 10 * task + s))
        g, p = _f64(grads), _f64(params)
        pull = strength * importance * (p - anchor)
        if task and s:   # the penalty acts (params left the anchor).
          self.assertGreater(float(np.abs(pull).max()),
                             1e-2 * float(np.abs(g).max()))
          _assert_close(penalty(params, optax.tree.get(opt_state, 'anchor'),
                                optax.tree.get(opt_state, 'fisher')),
                        0.5 * strength * np.sum(importance * (p - anchor)**2),
                        rtol=1e-5)
        trace = g + pull + momentum * trace
        want = -_LR * trace
        _assert_same_structure(updates, params)
        _assert_close(_flat(updates), want, rtol=1e-5,
                      atol=1e-6 * float(np.abs(want).max()))
        omega = omega - g * _f64(updates)    # -g u, g the loss's gradient.
        got = optax.tree.get(opt_state, 'omega')
        _assert_same_structure(got, params)
        _assert_close(_flat(got), omega, rtol=1e-5,
                      atol=1e-6 * float(np.abs(omega).max()))
        params = new_params
      self.assertGreater(float(omega.max()), 1e-4)
      # End of the task: its importance, then the next task's state.
      got_omega = optax.tree.get(opt_state, 'omega')
      delta = jax.tree.map(jnp.subtract, params, start)
      task_si = si(got_omega, delta)
      want_si = _f64(got_omega) / (_f64(delta)**2 + damping)
      _assert_same_structure(task_si, params)
      _assert_close(_flat(task_si), want_si, rtol=1e-5,
                    atol=1e-7 * float(want_si.max()))
      if task == 0:     # SI's importance (Zenke et al.: summed over tasks).
        new_importance = task_si
      else:             # then MAS's, at the new anchor.
        new_importance = mas(params, _x(150 + task, 4))
      anchor, importance = _f64(params), _f64(new_importance)
      # Two calls: optax 0.2.8's tree.set, given omega (a field of the
      # outer state) with anchor and fisher (fields two levels below, in
      # the chain's tuple), leaves those two unchanged, silently.
      opt_state = optax.tree.set(opt_state, anchor=params,
                                 fisher=new_importance)
      opt_state = optax.tree.set(opt_state,
                                 omega=optax.tree.zeros_like(got_omega))
    self.assertEqual(step._cache_size(), 1)
    self.assertEqual(penalty._cache_size(), 1)

  @parameterized.named_parameters(('linen', _linen_case))
  def test_gem_in_jitted_chain_matches_nnls_reference(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    tx = optax.chain(metacf.protect.gem(), optax.sgd(_LR))
    num_memories = 3

    # The gradients come in (the model's grad is compiled once, for them and
    # for the memories').
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, grads, memory_grads):
      updates, opt_state = tx.update(grads, opt_state, params,
                                     memory_grads=memory_grads)
      return optax.apply_updates(params, updates), opt_state, updates

    x, y = _batch(100)
    # Earlier tasks' memories: the current inputs under other labels, whose
    # gradients conflict with the current one, so that constraints bind.
    memories = [(x, (y + 1) % _OUT), (x, (y + 2) % _OUT),
                (_x(101, 4), _labels(102, (4,)))]
    grad = jax.jit(jax.grad(loss_fn))
    params, opt_state = case.params, tx.init(case.params)
    for t in range(num_memories):
      # One gradient per earlier task at the current params, zero rows for
      # the tasks to come (padding): the shapes never change.
      rows = [grad(params, *memories[k]) for k in range(t + 1)]
      rows += [jax.tree.map(np.zeros_like, params)] * (num_memories - t - 1)
      memory_grads = jax.tree.map(lambda *r: np.stack(r), *rows)
      grads = grad(params, x, y)
      new_params, opt_state, updates = step(params, opt_state, grads,
                                            memory_grads)
      g = _f64(grads)
      rows = np.stack([_f64(r) for r in rows[:t + 1]])
      self.assertLess(float((rows @ g).min()), 0.0)   # a violation.
      # The same QP through its dual, exactly: SciPy's Lawson-Hanson NNLS
      # (an active-set solver), float64.
      v, _ = scipy_optimize.nnls(rows.T, -g)
      want = g + rows.T @ v
      projected = -_f64(updates) / _LR
      _assert_same_structure(updates, params)
      _assert_close(projected, want, rtol=1e-4,
                    atol=1e-5 * float(np.abs(want).max()))
      # No memory's loss rises, to first order (up to float32 rounding).
      norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(g)
      self.assertTrue(bool(np.all(rows @ projected >= -1e-5 * norms)))
      params = new_params
    self.assertEqual(step._cache_size(), 1)

  @parameterized.named_parameters(('equinox', _eqx_case))
  def test_ace_cross_entropy_on_model_logits_matches_numpy(self, make_case):
    case = make_case()

    def loss(p, x, y, active):
      logits = case.apply_fn(p, x)
      return jnp.mean(metacf.replay.ace_cross_entropy(logits, y, active)), (
          logits)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    logits_grad = jax.jit(jax.grad(lambda z, y, a: jnp.sum(
        metacf.replay.ace_cross_entropy(z, y, a))))
    # ER-ACE's incoming batch: the active classes are those present in it.
    for seed, present in ((110, (0, 1)), (111, (1, 2))):
      x = _x(seed, 6)
      y = jnp.asarray(np.resize(present, 6), jnp.int32)
      active = jnp.asarray(np.isin(np.arange(_OUT), present))
      (value, logits), grads = value_and_grad(case.params, x, y, active)
      want, want_grad = _ace_reference(logits, y, active)
      _assert_close(value, want.mean(), rtol=1e-5)
      _assert_same_structure(grads, case.params)
      _assert_finite(self, grads)
      self.assertGreater(float(np.abs(_f64(grads)).max()), 1e-4)
      got_grad = logits_grad(logits, y, active)
      _assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(got_grad)[:, ~np.asarray(
          active)], 0.0)   # inactive classes get no gradient.
      # Per-example active sets [B, C], eager (the labels are checked).
      per_example = np.random.default_rng(seed).random((6, _OUT)) < 0.5
      per_example[np.arange(6), np.asarray(y)] = True
      got = metacf.replay.ace_cross_entropy(logits, y,
                                            jnp.asarray(per_example))
      _assert_close(got, _ace_reference(logits, y, per_example)[0],
                    rtol=1e-5)
    self.assertEqual(value_and_grad._cache_size(), 1)
    self.assertEqual(logits_grad._cache_size(), 1)

  @parameterized.named_parameters(('linen', _linen_case))
  def test_herding_selection_on_model_features_matches_numpy_loop(
      self, make_case):
    case = make_case()
    num_exemplars = 5

    @jax.jit
    def select(p, x):
      features = case.apply_fn(p, x)                       # [N, 3]
      # iCaRL normalises the features.
      features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
      return metacf.replay.herding_selection(features, num_exemplars), (
          features)

    for seed in (120, 121):
      got, features = select(case.params, _x(seed, 12))
      self.assertEqual(got.dtype, jnp.int32)
      chex.assert_shape(got, (num_exemplars,))
      np.testing.assert_array_equal(
          got, _herding_reference(features, num_exemplars))
    self.assertEqual(select._cache_size(), 1)


class MetaContinualInteropTest(chex.TestCase):
  """MER and La-MAML (sequential inner loops) on the three models."""

  def _stream(self, steps=2, per_step=2):
    x = _x(21, steps * per_step).reshape(steps, per_step, _SIDE, _SIDE, 1)
    y = _labels(22, (steps, per_step))
    return x, y, _x(23, 4), _labels(24, (4,))

  @parameterized.named_parameters(*_CASES)
  def test_mer_update_matches_hand_loop(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    x, y, _, _ = self._stream()
    got = jax.jit(lambda p: metacf.maml.mer_update(
        loss_fn, p, x[None], y[None], inner_lr=_INNER_LR,
        within_batch_rate=0.5, across_batch_rate=0.8))(case.params)
    w = case.params
    for j in range(x.shape[0]):
      g = jax.grad(loss_fn)(w, x[j], y[j])
      w = jax.tree.map(lambda p, gp: p - _INNER_LR * gp, w, g)
    theta = jax.tree.map(lambda a, b: a + 0.5 * (b - a), case.params, w)
    want = jax.tree.map(lambda a, b: a + 0.8 * (b - a), case.params, theta)
    _assert_same_structure(got, case.params)
    self.assertGreater(float(np.max(np.abs(_f64(want) - _f64(case.params)))),
                       1e-5)
    _assert_close(_flat(got), _f64(want), rtol=1e-5, atol=1e-7)

  @parameterized.named_parameters(*_CASES)
  def test_lamaml_update_matches_hand_unrolled(self, make_case):
    case = make_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    x, y, meta_x, meta_y = self._stream()
    rates = jax.tree.map(lambda p: jnp.full_like(p, _INNER_LR), case.params)
    got = jax.jit(lambda p, a: metacf.maml.lamaml_update(
        loss_fn, p, a, x, y, meta_x, meta_y, lr_learning_rate=0.3))(
            case.params, rates)

    def meta_loss(theta, alpha):
      for j in range(x.shape[0]):
        g = jax.grad(loss_fn)(theta, x[j], y[j])
        theta = jax.tree.map(lambda p, a, gp: p - a * gp, theta, alpha, g)
      return loss_fn(theta, meta_x, meta_y)

    loss, (g, g_alpha) = jax.jit(jax.value_and_grad(meta_loss, (0, 1)))(
        case.params, rates)
    new_rates = jax.tree.map(lambda a, ga: a - 0.3 * ga, rates, g_alpha)
    want = jax.tree.map(lambda p, a, gp: p - jnp.maximum(a, 0) * gp,
                        case.params, new_rates, g)
    _assert_same_structure(got.params, case.params)
    _assert_same_structure(got.inner_lr, case.params)
    _assert_close(got.loss, loss, rtol=1e-5)
    _assert_close(_flat(got.inner_lr), _f64(new_rates), rtol=1e-5,
                  atol=1e-7)
    _assert_close(_flat(got.params), _f64(want), rtol=1e-5, atol=1e-7)
    self.assertGreater(float(np.max(np.abs(_f64(new_rates) - _INNER_LR))),
                       1e-6)

  @parameterized.named_parameters(*_CASES)
  def test_predicted_forgetting_gradient_matches_written_out(self, make_case):
    # One function-space step on B, written out with jax.linearize and
    # jax.vjp on the framework's pytree, differentiated (the forgetting-aware
    # objective of experiments/meta_continual).
    case = make_case()
    (xa, ya), (xb, yb) = _batch(31), _batch(33)
    ce = lambda f, y: jnp.mean(
        optax.losses.softmax_cross_entropy_with_integer_labels(f, y))

    def written_out(params):
      f_a, jvp_a = jax.linearize(lambda p: case.apply_fn(p, xa), params)
      f_b, vjp_b = jax.vjp(lambda p: case.apply_fn(p, xb), params)
      (v,) = vjp_b(jax.grad(ce)(f_b, yb))
      return ce(f_a - _LR * jvp_a(v), ya) - ce(f_a, ya)

    def metacf_fn(params):
      return metacf.jacobian.predicted_forgetting(
          case.apply_fn, params, (xa, ya), (xb, yb), lr=_LR, num_steps=1,
          loss='cross_entropy')

    value, grads = jax.jit(jax.value_and_grad(metacf_fn))(case.params)
    want_value, want = jax.jit(jax.value_and_grad(written_out))(case.params)
    _assert_same_structure(grads, case.params)
    _assert_close(value, want_value, rtol=1e-5, atol=1e-7)
    self.assertGreater(float(np.max(np.abs(_f64(want)))), 1e-5)
    _assert_close(_flat(grads), _f64(want), rtol=1e-4,
                  atol=1e-6 * float(np.max(np.abs(_f64(want)))))

  def test_user_jitted_optax_step_with_sequential_support_nnx(self):
    # A user's own jitted step: OML-style head-only sequential inner loop
    # (one slice per step) through maml_loss, meta-gradient into optax adam.
    case = _nnx_case()
    loss_fn = _ce_loss_fn(case.apply_fn)
    x, y, meta_x, meta_y = self._stream()
    tasks = metacf.maml.Task(x[None], y[None], meta_x[None], meta_y[None])
    head = lambda path, _: _name(path).startswith(('head', 'logits'))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, tasks):
      loss, grads = jax.value_and_grad(
          lambda p: metacf.maml.maml_loss(
              loss_fn, p, tasks, inner_lr=_INNER_LR,
              num_inner_steps=x.shape[0], adapt_mask=head,
              sequential_support=True))(params)
      with jax.numpy_dtype_promotion('standard'):
        updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss, grads

    with jax.numpy_dtype_promotion('standard'):
      state = opt.init(case.params)
    new, state2, loss, grads = step(case.params, state, tasks)

    def reference(params):
      theta = params
      for j in range(x.shape[0]):
        g = jax.grad(loss_fn)(theta, x[j], y[j])
        theta = jax.tree_util.tree_map_with_path(
            lambda path, p, gp: p - _INNER_LR * gp
            if head(_path(path), p) else p, theta, g)
      return loss_fn(theta, meta_x, meta_y)

    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(
        case.params)
    _assert_close(loss, want_loss, rtol=1e-5)
    _assert_same_structure(new, case.params)
    # Gradients, not Adam's normalised updates (which magnify float32
    # rounding in near-zero gradients).
    want = _f64(want_grads)
    _assert_close(_flat(grads), want, rtol=1e-4,
                  atol=1e-6 * float(np.max(np.abs(want))))
    _assert_finite(self, new)
    # The body learns through the head's inner steps; a second batch of the
    # same shapes compiles nothing new.
    body = [float(np.max(np.abs(np.asarray(g))))
            for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if not head(_path(path), g)]
    self.assertGreater(max(body), 1e-4)
    step(new, state2, jax.tree.map(lambda a: a[..., ::-1, :, :]
                                   if a.ndim >= 4 else a, tasks))
    self.assertEqual(step._cache_size(), 1)
