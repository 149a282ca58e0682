"""The MLP, each strategy's optimizer and jitted task loop, and evaluation.

The model is a bias-free ReLU MLP (``init_params``, ``apply_fn``). Each
strategy's optimizer, ``optax.chain(<protection>, optax.sgd(lr))``, is built
once (``trainer``), its protection's arrays zeros of fixed shapes in the
optax state, and its jitted loop runs all epochs of a task as one
``lax.scan``. ``forgetting_under_protection`` predicts and measures the
forgetting of A when B is learnt with A's top Jacobian directions projected
out.
"""

from collections.abc import Mapping, Sequence
import functools
from typing import Any, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from experiments.prevent_forgetting.configs import Config
from experiments.prevent_forgetting.data import Benchmark
from experiments.prevent_forgetting.data import NUM_CLASSES
from experiments.prevent_forgetting.data import NUM_PIXELS
import metacf.jacobian
import metacf.protect
import metacf.replay

Params = Any


# -------------------------------------------------------------------- model


def layer_names(hidden: Sequence[int]) -> list[str]:
  return [f'dense{i}' for i in range(len(hidden))] + ['head']


def init_params(key: jax.Array, hidden: Sequence[int]) -> Params:
  """Bias-free MLP kernels, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  PyTorch's default for ``nn.Linear``, the layers of Saha et al.'s MLP.
  """
  sizes = [NUM_PIXELS, *hidden, NUM_CLASSES]
  params = {}
  for i, name in enumerate(layer_names(hidden)):
    bound = 1.0 / np.sqrt(sizes[i])
    params[name] = {'kernel': jax.random.uniform(
        jax.random.fold_in(key, i), (sizes[i], sizes[i + 1]), jnp.float32,
        -bound, bound)}
  return params


def layer_inputs(params: Params, x: jax.Array) -> list[jax.Array]:
  """The input of each layer ``[N, d_in]``, in ``layer_names`` order."""
  names = sorted(params, key=lambda n: (n == 'head', n))
  inputs, h = [], x
  for name in names:
    inputs.append(h)
    h = h @ params[name]['kernel']
    if name != 'head':
      h = jax.nn.relu(h)
  return inputs


def apply_fn(params: Params, x: jax.Array) -> jax.Array:
  """Logits ``[N, 10]`` of the MLP."""
  return layer_inputs(params, x)[-1] @ params['head']['kernel']


def cross_entropy(apply: Any, params: Params, x: jax.Array, y: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean (or ``weights``-weighted mean) of ``-log softmax(f)_y``."""
  logp = jax.nn.log_softmax(apply(params, x))
  nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  if weights is None:
    return jnp.mean(nll)
  w = weights.astype(nll.dtype)
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), jnp.ones_like(nll[0]))


def _apply_update(tx: optax.GradientTransformation, grads: Params,
                  opt_state: Any, params: Params, **extra: Any
                  ) -> tuple[Params, Any]:
  """One ``tx`` step: ``(params, opt_state)`` after ``grads``."""
  with jax.numpy_dtype_promotion('standard'):  # See utils.optimizer_update.
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
  return optax.apply_updates(params, updates), opt_state


# ---------------------------------------------------------------- training


class Trainer(NamedTuple):
  """A strategy's optimizer, built once, and its jitted task loop.

  ``tx`` is ``optax.chain(<protection>, optax.sgd(lr))``; the arrays the
  protection reads (EWC anchors and Fishers, OGD's basis, GPM's bases) live
  in its state, initially zeros of their fixed shapes (zero bases project
  nothing, zero Fishers penalise nothing), and :class:`Memory` swaps them
  with ``optax.tree.set`` after each task. ``train(params, opt_state,
  buffer, x, y, order, key) -> (params, opt_state)`` runs
  ``order.shape[0]`` SGD steps, step ``i`` on the minibatch ``x[order[i]]``,
  as one ``lax.scan``; ``buffer`` is the replay state of ``agem`` and
  ``er`` (``{}`` otherwise).
  """
  tx: optax.GradientTransformation
  train: Any


def trainer(config: Config, strategy: str, basis_rows: int | None = None
            ) -> Trainer:
  """The :class:`Trainer` of ``strategy``, cached on what it reads.

  Configs that differ elsewhere share it, so its loop compiles once per
  strategy and serves every task, benchmark and seed. OGD's and PCA-OGD's
  is built per ``basis_rows`` (the rows of the basis they project out,
  10 more per task), as their projection reads the whole ``[rows, P]``
  basis from memory every step, zero padding rows included: one compile
  per basis size (shared by the seeds) instead of one in all, for half
  the projection's traffic on average.
  """
  return _trainer_for(strategy, _Settings(
      config.lr, config.num_tasks, config.ewc_strength,
      config.online_ewc_strength, config.si_strength, config.mas_strength,
      config.agem_sample_size, config.gem_sample_size, config.er_fraction,
      buffer_capacity(config), tuple(config.hidden),
      (basis_rows or 0) if strategy in ('ogd', 'pca_ogd') else 0))


class _Settings(NamedTuple):
  lr: float
  num_tasks: int
  ewc_strength: float
  online_ewc_strength: float
  si_strength: float
  mas_strength: float
  agem_sample_size: int
  gem_sample_size: int
  er_fraction: float
  buffer_capacity: int
  hidden: tuple[int, ...]
  basis_rows: int  # OGD / PCA-OGD: rows of the basis (0: plain SGD).


def _zero_params(hidden: Sequence[int]) -> Params:
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: init_params(jax.random.key(0), hidden)))


def _protection(strategy: str, config: _Settings
                ) -> list[optax.GradientTransformation]:
  """The transformations before SGD, their arrays zeros of fixed shape."""
  zeros = _zero_params(config.hidden)
  if strategy == 'ewc':  # One penalty per earlier task (offline EWC).
    return [metacf.protect.ewc(zeros, zeros, config.ewc_strength)
            for _ in range(config.num_tasks - 1)]
  strengths = {'online_ewc': config.online_ewc_strength,
               'si': config.si_strength, 'mas': config.mas_strength}
  if strategy in strengths:  # One penalty, its importance accumulated.
    return [metacf.protect.ewc(zeros, zeros, strengths[strategy])]
  if strategy == 'agem':
    return [metacf.protect.agem()]
  if strategy == 'gem':
    return [metacf.protect.gem()]
  if strategy in ('ogd', 'pca_ogd'):
    if not config.basis_rows:
      return []
    num_params = sum(leaf.size for leaf in jax.tree.leaves(zeros))
    return [metacf.protect.orthogonal_projection(
        np.zeros((config.basis_rows, num_params), np.float32))]
  if strategy == 'gpm':  # Saha et al.'s form: the projectors M M^T.
    return [metacf.protect.gpm_projection(jax.tree.map(
        lambda k: np.zeros((k.shape[0], k.shape[0]), np.float32), zeros),
                                          projectors=True)]
  if strategy in ('naive', 'joint', 'er'):
    return []
  raise ValueError(f'trainer: unknown strategy {strategy!r}.')


@functools.lru_cache(maxsize=None)
def _trainer_for(strategy: str, config: _Settings) -> Trainer:
  """The :class:`Trainer` of :func:`trainer`."""
  tx = optax.chain(*_protection(strategy, config), optax.sgd(config.lr))
  if strategy == 'si':  # omega accumulates -g * update over the task.
    tx = metacf.protect.path_integral(tx)
  buffer = metacf.replay.replay_buffer(config.buffer_capacity)
  loss = functools.partial(cross_entropy, apply_fn)

  def step_fn(params, opt_state, memory, xb, yb, key):
    if strategy == 'er':
      key_sample, key_mix = jax.random.split(key)
      sample = buffer.sample(key_sample, memory, xb.shape[0])
      mixed, _ = metacf.replay.mix_replay(key_mix, {'x': xb, 'y': yb},
                                          sample, config.er_fraction)
      xb, yb = mixed['x'], mixed['y']
    grads = jax.grad(loss)(params, xb, yb)
    extra = {}
    if strategy == 'agem':
      sample = buffer.sample(key, memory, config.agem_sample_size)
      extra['reference_grads'] = jax.grad(loss)(
          params, sample.items['x'], sample.items['y'], sample.valid)
    if strategy == 'gem':
      extra['memory_grads'] = gem_memory_grads(
          params, memory, key, config.gem_sample_size)
    return _apply_update(tx, grads, opt_state, params, **extra)

  def train(params, opt_state, memory, x, y, order, key):
    def body(carry, inputs):
      idx, i = inputs
      return step_fn(*carry, memory, x[idx], y[idx],
                     jax.random.fold_in(key, i)), None
    steps = jnp.arange(order.shape[0], dtype=jnp.uint32)
    (params, opt_state), _ = jax.lax.scan(body, (params, opt_state),
                                          (order, steps))
    return params, opt_state

  return Trainer(tx, jax.jit(train))


def gem_memory_grads(params: Params, memory: Mapping[str, jax.Array],
                     key: jax.Array, sample_size: int) -> Params:
  """One gradient per earlier task, on ``sample_size`` of its examples.

  ``memory`` holds ``x [T-1, m, 784]``, ``y [T-1, m]`` and ``filled
  [T-1]`` (1.0 for the tasks seen so far); the gradients of tasks not yet
  seen are zero, which ``gem_project`` reads as padding.
  """
  t, m = memory['y'].shape
  idx = jax.random.randint(key, (t, sample_size), 0, m)
  xs = jnp.take_along_axis(memory['x'], idx[..., None], axis=1)
  ys = jnp.take_along_axis(memory['y'], idx, axis=1)
  grads = jax.vmap(jax.grad(functools.partial(cross_entropy, apply_fn)),
                   in_axes=(None, 0, 0))(params, xs, ys)
  return jax.tree.map(
      lambda g: g * memory['filled'].reshape((t,) + (1,) * (g.ndim - 1)),
      grads)


def all_finite(params: Params) -> bool:
  """Whether every parameter is finite (SGD on a stiff penalty diverges)."""
  return bool(all(np.all(np.isfinite(np.asarray(leaf)))
                  for leaf in jax.tree.leaves(params)))


@functools.partial(jax.jit, static_argnames='chunk')
def chunked_accuracies(params: Params, x: jax.Array, y: jax.Array,
                       chunk: int) -> jax.Array:
  """Accuracy on each task: ``x [T, m, 784]``, ``y [T, m]`` -> ``[T]``."""
  t, m = y.shape
  xs = x.reshape(t * (m // chunk), chunk, x.shape[-1])
  ys = y.reshape(t * (m // chunk), chunk)
  correct = jax.lax.map(
      lambda xy: jnp.sum(jnp.argmax(apply_fn(params, xy[0]), -1) == xy[1]),
      (xs, ys))
  return jnp.sum(correct.reshape(t, m // chunk), axis=1) / m


def accuracies(params: Params, data: Benchmark, config: Config
               ) -> np.ndarray:
  chunk = min(config.eval_batch_size, config.num_test)
  return np.asarray(chunked_accuracies(params, data.x_test, data.y_test, chunk),
                    np.float64)


def buffer_capacity(config: Config) -> int:
  """Examples the replay buffer of A-GEM and ER holds."""
  return config.memory_per_task * max(config.num_tasks - 1, 1)


# ------------------------------------------- predicted vs measured forgetting


@functools.lru_cache(maxsize=None)
def _projected_sgd(rows: int, num_params: int, lr: float
                   ) -> optax.GradientTransformation:
  """``chain(orthogonal_projection(V), sgd(lr))``, built once per shape.

  Its initial basis is zeros ``[rows, P]``; :func:`forgetting_under_protection`
  swaps each ``k``'s padded basis into the state (``optax.tree.set``), so
  one compile of :func:`descend` serves every ``k``.
  """
  return optax.chain(metacf.protect.orthogonal_projection(
      np.zeros((rows, num_params), np.float32)), optax.sgd(lr))


@functools.partial(jax.jit, static_argnames=('apply', 'tx', 'num_steps'))
def descend(apply: Any, tx: optax.GradientTransformation, params: Params,
            x: jax.Array, y: jax.Array, opt_state: Any, num_steps: int
            ) -> Params:
  """Full-batch GD on ``(x, y)`` through ``tx`` from ``opt_state``.

  ``tx`` is :func:`_projected_sgd`'s; the basis it projects out is in
  ``opt_state`` (zero rows project nothing).
  """

  def step(carry, _):
    p, s = carry
    grads = jax.grad(functools.partial(cross_entropy, apply))(p, x, y)
    return _apply_update(tx, grads, s, p), None

  (params, _), _ = jax.lax.scan(step, (params, opt_state), None,
                                length=num_steps)
  return params


@functools.partial(jax.jit, static_argnames=('apply', 'num_steps'))
def _predict(apply: Any, params: Params, task_a: Any, task_b: Any,
             basis: jax.Array | None, lr: Any, num_steps: int) -> jax.Array:
  return metacf.jacobian.predicted_forgetting(
      apply, params, task_a, task_b, lr=lr, num_steps=num_steps,
      loss='cross_entropy', protect_basis=basis)


@functools.partial(jax.jit, static_argnames='k')
def jacobian_svd(params: Params, x: jax.Array, k: int
                 ) -> metacf.jacobian.JacobianSVD:
  return metacf.jacobian.jacobian_svd(apply_fn, params, x, k, method='gram')


@functools.partial(jax.jit, static_argnames='apply')
def _loss(apply: Any, params: Params, x: jax.Array, y: jax.Array
          ) -> jax.Array:
  return cross_entropy(apply, params, x, y)


def forgetting_under_protection(
    apply: Any, params: Params, evals: Mapping[str, tuple[Any, Any]],
    task_b: tuple[Any, Any], basis: jax.Array | None, *, k: int, lr: float,
    num_steps: int) -> dict[str, Any]:
  """Predicted and measured change of A's loss when B is learnt protected.

  Args:
    apply: ``apply(params, x) -> logits``.
    params: The parameters after A (the linearisation point).
    evals: ``{name: (x_a, y_a)}``, example sets of A on which A's mean
      cross-entropy change is predicted and measured.
    task_b: ``(x_b, y_b)``, learnt by ``num_steps`` full-batch steps.
    basis: ``[k_max, P]`` orthonormal rows (A's Jacobian SVD ``vt``), or
      None; its first ``k`` rows are protected, the rest zeroed.
    k: Rows protected (0: plain gradient descent, ``protect_basis=None``).
    lr: Learning rate on B.
    num_steps: Steps on B.

  Returns:
    ``{name: {'predicted', 'measured'}}`` plus B's loss before and after.
  """
  num_params = int(flatten_util.ravel_pytree(params)[0].shape[0])
  dtype = flatten_util.ravel_pytree(params)[0].dtype
  rows = 1 if basis is None else basis.shape[0]
  padded = np.zeros((rows, num_params), dtype)
  if k:
    padded[:k] = np.asarray(basis[:k])
  padded = jnp.asarray(padded)
  tx = _projected_sgd(rows, num_params, lr)
  opt_state = optax.tree.set(tx.init(params), basis=padded)
  after = descend(apply, tx, params, *task_b, opt_state, num_steps)
  out: dict[str, Any] = {}
  for name, (x_a, y_a) in evals.items():
    predicted = _predict(apply, params, (x_a, y_a), task_b,
                         padded if k else None, lr, num_steps)
    before = _loss(apply, params, x_a, y_a)
    out[name] = {'predicted': float(predicted),
                 'measured': float(_loss(apply, after, x_a, y_a)
                                   - before),
                 'loss_before': float(before)}
  out['loss_b_before'] = float(_loss(apply, params, *task_b))
  out['loss_b_after'] = float(_loss(apply, after, *task_b))
  return out
