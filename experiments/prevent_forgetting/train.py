r"""Preventing forgetting on Permuted and Rotated MNIST with metacf.protect.

Ten tasks per benchmark, learnt one after the other by one MLP with a shared
ten-way head (domain-incremental):

* ``permuted``: task ``t`` permutes the 784 pixels by its own random
  permutation (task 0 too, as in Saha et al.'s and GEM's loaders);
* ``rotated``: task ``t`` rotates the digits by ``t * rotation_step``
  degrees (bilinear, zero fill; ``predict_forgetting._tasks.rotate``).

Strategies, all with the same model, SGD and batch order (per seed):
``naive`` SGD; ``ewc`` (one penalty per task, true Fisher) and
``online_ewc`` (one running Fisher, decayed by gamma);
``agem`` (episodic memory, reference gradient on a memory sample each
step); ``er`` (the same memory, replayed into each minibatch with
``metacf.replay.mix_replay``); ``ogd`` (ground-truth-logit gradients of
earlier tasks, ``extend_basis``, ``orthogonal_projection``); ``pca_ogd``
(their top principal directions per task); ``gpm`` (layer-wise input
spaces, ``gpm_basis``, ``gpm_projection``); ``joint`` (one model on the
union of all tasks, the multitask upper bound).

Each strategy's optimizer, ``optax.chain(<protection>, optax.sgd(lr))``, is
built once, and one jitted function per strategy runs all epochs of a task
as one ``lax.scan`` over minibatches. The protection keeps its arrays in
its optax state (EWC's ``anchor`` and ``fisher``, OGD's ``basis``, GPM's
``bases``: zeros of a fixed shape at first, bases padded with zero rows or
columns, which project nothing); after each task they are swapped in with
``optax.tree.set`` and the state goes back into the same compiled function,
with the replay state of A-GEM and ER, so it compiles once per strategy and
is reused for every task, benchmark and seed. Swapped bases are not
probed for orthonormality (``extend_basis`` and ``gpm_basis`` return
orthonormal rows and columns).

Then, for a few task pairs A -> B, forgetting under protection is predicted
(``metacf.jacobian.predicted_forgetting(..., protect_basis=V_k)``, V_k the
top-k rows of A's Jacobian SVD) and measured (B trained by full-batch
gradient descent through ``optax.chain(protect.orthogonal_projection(V_k),
optax.sgd(lr))``).

Every (benchmark, strategy, seed) run and every pair is one JSON record
(``experiments.common.loop.resumable_records``): a run started again reads
back what is done; every draw comes from keys folded from the seed and
names, so recomputed records are bitwise the same.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import loop
from experiments.common import utils
from experiments.predict_forgetting import _tasks
from experiments.prevent_forgetting import _plots
from experiments.prevent_forgetting.configs import Config
from experiments.prevent_forgetting.configs import Pair
import metacf.jacobian
import metacf.metrics
import metacf.protect
import metacf.replay

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
NUM_CLASSES = 10
NUM_PIXELS = 784
LABELS = _plots.LABELS
Params = Any


# --------------------------------------------------------------------- data


class Benchmark(NamedTuple):
  """The tasks of one benchmark for one seed, as float32 vectors."""
  x_train: np.ndarray  # [T, num_train, 784]
  y_train: np.ndarray  # [T, num_train], int32
  x_test: np.ndarray   # [T, num_test, 784]
  y_test: np.ndarray   # [T, num_test], int32


def _standardise(x: np.ndarray) -> np.ndarray:
  return ((x - _tasks.PIXEL_MEAN) / _tasks.PIXEL_STD).astype(np.float32)


def _transform(benchmark: str, task: int, images: np.ndarray,
               config: Config, key: jax.Array) -> np.ndarray:
  """uint8 ``[N, 28, 28, 1]`` -> standardised float32 ``[N, 784]``."""
  x = images[..., 0].astype(np.float32) / 255.0
  if benchmark == 'rotated' and task * config.rotation_step:
    x = np.asarray(_tasks.rotate(x, task * config.rotation_step))
  x = x.reshape(x.shape[0], NUM_PIXELS)
  if benchmark == 'permuted':
    perm = utils.numpy_rng(utils.name_key(key, 'permutation', task)
                           ).permutation(NUM_PIXELS)
    x = x[:, perm]
  return _standardise(x)


def make_benchmark(benchmark: str, seed: int, config: Config,
                   splits: tuple[Mapping[str, np.ndarray],
                                 Mapping[str, np.ndarray]]) -> Benchmark:
  """The ``config.num_tasks`` tasks of ``benchmark`` for ``seed``.

  Training examples: ``num_train`` drawn per task without replacement from
  the 60k training images; test: the first ``num_test`` test images, each
  task's transformation applied.
  """
  train, test = splits
  key = utils.name_key(jax.random.key(seed), 'data', benchmark)
  xs, ys, xts, yts = [], [], [], []
  for t in range(config.num_tasks):
    rng = utils.numpy_rng(utils.name_key(key, 'train', t))
    idx = rng.choice(len(train['label']), config.num_train, replace=False)
    xs.append(_transform(benchmark, t, train['image'][idx], config, key))
    ys.append(train['label'][idx].astype(np.int32))
    xts.append(_transform(benchmark, t, test['image'][:config.num_test],
                          config, key))
    yts.append(test['label'][:config.num_test].astype(np.int32))
  return Benchmark(np.stack(xs), np.stack(ys), np.stack(xts), np.stack(yts))


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


def _trainer(config: Config, strategy: str) -> Trainer:
  """The :class:`Trainer` of ``strategy``, cached on what it reads.

  Configs that differ elsewhere share it, so its loop compiles once per
  strategy and serves every task, benchmark and seed.
  """
  per_task = {'ogd': config.ogd_examples, 'pca_ogd': config.pca_k}
  rows = per_task.get(strategy, 0) * max(config.num_tasks - 1, 1)
  return _trainer_for(strategy, _Settings(
      config.lr, config.num_tasks, config.ewc_strength,
      config.online_ewc_strength, config.agem_sample_size,
      config.er_fraction, _buffer_capacity(config), tuple(config.hidden),
      rows))


class _Settings(NamedTuple):
  lr: float
  num_tasks: int
  ewc_strength: float
  online_ewc_strength: float
  agem_sample_size: int
  er_fraction: float
  buffer_capacity: int
  hidden: tuple[int, ...]
  basis_rows: int  # OGD / PCA-OGD: rows of the zero-padded basis.


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
  if strategy == 'online_ewc':
    return [metacf.protect.ewc(zeros, zeros, config.online_ewc_strength)]
  if strategy == 'agem':
    return [metacf.protect.agem()]
  if strategy in ('ogd', 'pca_ogd'):
    num_params = sum(leaf.size for leaf in jax.tree.leaves(zeros))
    return [metacf.protect.orthogonal_projection(
        np.zeros((config.basis_rows, num_params), np.float32))]
  if strategy == 'gpm':
    return [metacf.protect.gpm_projection(jax.tree.map(
        lambda k: np.zeros((k.shape[0], k.shape[0]), np.float32), zeros))]
  if strategy in ('naive', 'joint', 'er'):
    return []
  raise ValueError(f'_trainer: unknown strategy {strategy!r}.')


@functools.lru_cache(maxsize=None)
def _trainer_for(strategy: str, config: _Settings) -> Trainer:
  """The :class:`Trainer` of :func:`_trainer`."""
  tx = optax.chain(*_protection(strategy, config), optax.sgd(config.lr))
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


def _all_finite(params: Params) -> bool:
  """Whether every parameter is finite (SGD on a stiff penalty diverges)."""
  return bool(all(np.all(np.isfinite(np.asarray(leaf)))
                  for leaf in jax.tree.leaves(params)))


def batch_order(key: jax.Array, num_examples: int, config: Config
                ) -> np.ndarray:
  """``[num_epochs * num_examples / batch, batch]``: a reshuffle per epoch."""
  epochs = [utils.numpy_rng(jax.random.fold_in(key, e)).permutation(
      num_examples) for e in range(config.num_epochs)]
  return np.concatenate(epochs).reshape(-1, config.batch_size).astype(
      np.int32)


@functools.partial(jax.jit, static_argnames='chunk')
def _accuracies(params: Params, x: jax.Array, y: jax.Array, chunk: int
                ) -> jax.Array:
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
  return np.asarray(_accuracies(params, data.x_test, data.y_test, chunk),
                    np.float64)


# ------------------------------------------------------------------ memories


def _buffer_capacity(config: Config) -> int:
  return config.memory_per_task * max(config.num_tasks - 1, 1)


def gpm_threshold(config: Config, layer: int, task: int) -> float:
  """GPM's threshold of ``layer`` for the basis update after ``task``.

  ``'constant'``: ``gpm_thresholds[layer]`` (Saha et al.'s
  ``main_pmnist.py``: ``[0.95, 0.99, 0.99]`` for every task);
  ``'linear'``: ``th + task * (1 - th) / num_tasks`` (their CIFAR-100 code,
  ``0.97 + task_id * 0.003``).
  """
  th = config.gpm_thresholds[layer]
  if config.gpm_schedule == 'linear':
    th += task * (1.0 - th) / config.num_tasks
  return th


@functools.lru_cache(maxsize=None)
def _gtl_gradients_fn():
  """Gradients of each example's ground-truth logit, ``[N, P]``."""
  def one(params, x, y):
    grad = jax.grad(lambda p: apply_fn(p, x[None])[0, y])(params)
    return flatten_util.ravel_pytree(grad)[0]
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


@functools.lru_cache(maxsize=None)
def _fisher_fn():
  return jax.jit(lambda p, x: metacf.protect.fisher_diagonal(
      apply_fn, p, x, chunk_size=20))


def top_right_singular_vectors(g: np.ndarray, k: int) -> np.ndarray:
  """Top-``k`` right singular vectors of ``g [n, P]`` as rows ``[k, P]``.

  PCA-OGD's principal directions of a task's gradient set (uncentred, as
  the span they protect is that of the gradients themselves), from the
  eigendecomposition of the small Gram matrix ``g g^T`` in float64:
  ``v_i = g^T u_i / s_i``. Directions with ``s_i`` below ``1e-12 s_1`` are
  dropped.
  """
  g = np.asarray(g, np.float64)
  eigvals, u = np.linalg.eigh(g @ g.T)
  order = np.argsort(eigvals)[::-1][:k]
  s = np.sqrt(np.maximum(eigvals[order], 0.0))
  keep = s > 1e-12 * max(s[0], 1e-300)
  return (u[:, order[keep]].T @ g) / s[keep, None]


@functools.lru_cache(maxsize=None)
def _buffer_add_fn(capacity: int):
  return jax.jit(metacf.replay.replay_buffer(capacity).add)


def _pad_columns(basis: jax.Array) -> np.ndarray:
  """``[d, r]`` -> ``[d, d]`` with zero columns (they project nothing)."""
  out = np.zeros((basis.shape[0], basis.shape[0]), np.float32)
  out[:, :basis.shape[1]] = np.asarray(basis)
  return out


class Memory:
  """What a strategy keeps between tasks, in fixed shapes.

  ``opt_state`` is the state of the strategy's :attr:`Trainer.tx`, made
  once by ``tx.init``: the protection's arrays live there (EWC's
  ``anchor``/``fisher``, OGD's ``basis``, GPM's ``bases``) and
  ``remember(params, x, y, task, key)`` swaps them after a task with
  ``optax.tree.set``; ``buffer`` is the replay state of ``agem`` and ``er``
  (``{}`` otherwise). Both are arguments of the jitted trainer.
  ``floats()`` counts the stored floats.
  """

  def __init__(self, strategy: str, config: Config, params: Params):
    self.strategy, self.config = strategy, config
    flat = flatten_util.ravel_pytree(params)[0]
    self.num_params = int(flat.shape[0])
    self.opt_state = _trainer(config, strategy).tx.init(params)
    self.buffer: Any = {}
    self.basis = None        # OGD / PCA-OGD: [rows, P], unpadded.
    self.gpm = None          # GPM: {layer: [d_in, r]}, unpadded.
    self.stored = 0          # Examples in the buffer.
    self.tasks_remembered = 0
    if strategy in ('agem', 'er'):
      self.buffer = metacf.replay.replay_buffer(
          _buffer_capacity(config)).init(
              {'x': jnp.zeros((NUM_PIXELS,), jnp.float32),
               'y': jnp.zeros((), jnp.int32)})
    elif strategy in ('ogd', 'pca_ogd'):
      self.padded = np.array(optax.tree.get(self.opt_state, 'basis'))

  def train(self, params: Params, x: jax.Array, y: jax.Array,
            order: jax.Array, key: jax.Array) -> Params:
    """Trains on one task (:attr:`Trainer.train`); keeps the new state."""
    params, self.opt_state = _trainer(self.config, self.strategy).train(
        params, self.opt_state, self.buffer, x, y, order, key)
    return params

  def remember(self, params: Params, x: np.ndarray, y: np.ndarray,
               task: int, key: jax.Array) -> None:
    config, s = self.config, self.strategy
    self.tasks_remembered += 1
    if s in ('ewc', 'online_ewc'):
      fisher = _fisher_fn()(params, jnp.asarray(x[:config.fisher_examples]))
      if s == 'ewc':  # The penalty of this task: element `task` of the chain.
        self.opt_state = optax.tree.set(
            self.opt_state, lambda path, _: path[0].idx == task,
            anchor=params, fisher=fisher)
      else:
        self.opt_state = optax.tree.set(
            self.opt_state, anchor=params,
            fisher=metacf.protect.online_ewc_update(
                optax.tree.get(self.opt_state, 'fisher'), fisher,
                config.online_ewc_gamma))
    elif s in ('agem', 'er'):
      idx = utils.numpy_rng(key).permutation(len(y))[:config.memory_per_task]
      self.buffer = _buffer_add_fn(_buffer_capacity(config))(
          key, self.buffer, {'x': jnp.asarray(x[idx]),
                             'y': jnp.asarray(y[idx])})
      self.stored += len(idx)
    elif s in ('ogd', 'pca_ogd'):
      n = config.ogd_examples if s == 'ogd' else config.pca_examples
      grads = np.asarray(_gtl_gradients_fn()(params, jnp.asarray(x[:n]),
                                             jnp.asarray(y[:n])), np.float64)
      if s == 'pca_ogd':
        grads = top_right_singular_vectors(grads, config.pca_k)
      self.basis = metacf.protect.extend_basis(
          self.basis, jnp.asarray(grads, jnp.float32))
      rows = min(self.basis.shape[0], self.padded.shape[0])
      self.padded[:] = 0.0
      self.padded[:rows] = np.asarray(self.basis[:rows])
      self.opt_state = optax.tree.set(self.opt_state,
                                      basis=jnp.asarray(self.padded))
    elif s == 'gpm':
      names = layer_names(config.hidden)
      reps = layer_inputs(params, jnp.asarray(x[:config.gpm_examples]))
      old = self.gpm or {}
      self.gpm = {name: metacf.protect.gpm_basis(
          rep.T, gpm_threshold(config, i, task), old.get(name))
                  for i, (name, rep) in enumerate(zip(names, reps))}
      self.opt_state = optax.tree.set(self.opt_state, bases={
          name: {'kernel': jnp.asarray(_pad_columns(m))}
          for name, m in self.gpm.items()})

  def floats(self) -> dict[str, Any]:
    """Stored floats after the last update, and how they are made up."""
    p, t, s = self.num_params, self.tasks_remembered, self.strategy
    if s == 'ewc':
      return {'floats': 2 * p * t, 'what': f'2P x {t} tasks'}
    if s == 'online_ewc':
      return {'floats': 2 * p, 'what': '2P'}
    if s in ('agem', 'er'):
      return {'floats': self.stored * (NUM_PIXELS + 1),
              'what': f'{self.stored} examples x 785'}
    if s in ('ogd', 'pca_ogd'):
      rows = 0 if self.basis is None else int(self.basis.shape[0])
      return {'floats': rows * p, 'what': f'{rows} rows x P',
              'rows': rows}
    if s == 'gpm':
      dims = {n: [int(d) for d in m.shape] for n, m in (self.gpm or {}).items()}
      return {'floats': sum(d * r for d, r in dims.values()),
              'what': ' + '.join(f'{d}x{r}' for d, r in dims.values()),
              'bases': dims}
    return {'floats': 0, 'what': '-'}


# --------------------------------------------------------------------- runs


def run_strategy(config: Config, benchmark: str, data: Benchmark,
                 strategy: str, seed: int) -> dict[str, Any]:
  """One continual-learning run: the accuracy matrix and its metrics."""
  start = time.perf_counter()
  root = jax.random.key(seed)
  params = init_params(utils.name_key(root, 'init'), config.hidden)
  num_params = int(flatten_util.ravel_pytree(params)[0].shape[0])
  memory = Memory(strategy, config, params)
  t_all = config.num_tasks
  if strategy == 'joint':
    x = jnp.asarray(data.x_train.reshape(-1, NUM_PIXELS))
    y = jnp.asarray(data.y_train.reshape(-1))
    order = batch_order(utils.name_key(root, 'order', benchmark, 'joint'),
                        int(y.shape[0]), config)
    params = memory.train(params, x, y, jnp.asarray(order),
                          utils.name_key(root, strategy, benchmark))
    final = accuracies(params, data, config)
    return {'params_finite': _all_finite(params),
            'final_accuracies': final.tolist(), 'acc': float(np.mean(final)),
            'bwt': None, 'forgetting': None, 'accuracy_matrix': None,
            'num_params': num_params,
            'memory': {'floats': int(y.shape[0]) * (NUM_PIXELS + 1),
                       'what': f'all {int(y.shape[0])} examples x 785'},
            'time_s': time.perf_counter() - start}
  matrix = np.zeros((t_all, t_all))
  finite = True
  for t in range(t_all):
    order = batch_order(utils.name_key(root, 'order', benchmark, t),
                        config.num_train, config)
    params = memory.train(params, jnp.asarray(data.x_train[t]),
                          jnp.asarray(data.y_train[t]), jnp.asarray(order),
                          utils.name_key(root, strategy, benchmark, t))
    matrix[t] = accuracies(params, data, config)
    finite = finite and _all_finite(params)
    if t < t_all - 1:
      memory.remember(params, data.x_train[t], data.y_train[t], t,
                      utils.name_key(root, 'memory', strategy, benchmark, t))
  if not np.all(np.isfinite(matrix)):
    raise FloatingPointError(f'{benchmark}/{strategy}/seed{seed}: accuracy '
                             'matrix is not finite.')
  return {'accuracy_matrix': matrix.tolist(),
          'final_accuracies': matrix[-1].tolist(),
          'acc': float(metacf.metrics.average_accuracy(matrix)),
          'bwt': float(metacf.metrics.backward_transfer(matrix)),
          'forgetting': float(metacf.metrics.forgetting(matrix)),
          'num_params': num_params,
          'params_finite': finite,
          'memory': memory.floats(),
          'time_s': time.perf_counter() - start}


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
def _jacobian_svd(params: Params, x: jax.Array, k: int
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


def run_pair(config: Config, pair: Pair, data: Benchmark) -> dict[str, Any]:
  """Train A (the naive protocol), then predict and measure for each k."""
  start = time.perf_counter()
  root = jax.random.key(config.pair_seed)
  params = init_params(utils.name_key(root, 'init'), config.hidden)
  order = batch_order(utils.name_key(root, 'order', pair.name),
                      config.num_train, config)
  a, b = pair.task_a, pair.task_b
  params = Memory('naive', config, params).train(
      params, jnp.asarray(data.x_train[a]), jnp.asarray(data.y_train[a]),
      jnp.asarray(order), utils.name_key(root, 'naive', pair.name))
  x_a = jnp.asarray(data.x_train[a][:config.jac_examples])
  y_a = jnp.asarray(data.y_train[a][:config.jac_examples])
  evals = {'jac': (x_a, y_a),
           'heldout': (jnp.asarray(data.x_test[a][:config.heldout_examples]),
                       jnp.asarray(data.y_test[a][:config.heldout_examples]))}
  task_b = (jnp.asarray(data.x_train[b][:config.b_examples]),
            jnp.asarray(data.y_train[b][:config.b_examples]))
  k_max = max(config.protect_ks)
  svd = _jacobian_svd(params, x_a, k_max) if k_max else None
  vt = None if svd is None else svd.vt
  per_k = {}
  for k in config.protect_ks:
    per_k[str(k)] = forgetting_under_protection(
        apply_fn, params, evals, task_b, vt, k=k, lr=config.b_lr,
        num_steps=config.b_steps)
  acc_a = float(_accuracies(params, data.x_test[a:a + 1],
                            data.y_test[a:a + 1],
                            min(config.eval_batch_size, config.num_test))[0])
  return {'name': pair.name, 'benchmark': pair.benchmark, 'task_a': a,
          'task_b': b, 'accuracy_a_test': acc_a, 'per_k': per_k,
          'singular_values': None if svd is None else np.asarray(
              svd.s).tolist(),
          'time_s': time.perf_counter() - start}


# ------------------------------------------------------------------ driver


def _pair_summary(record: Mapping[str, Any]) -> str:
  k0 = next(iter(record['per_k'].values()))['jac']
  return (f'{record["name"]}: k=0 predicted {k0["predicted"]:.4f}, '
          f'measured {k0["measured"]:.4f}')


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
  return {'mean': float(np.mean(values)), 'std': float(np.std(values)),
          'per_seed': [float(v) for v in values]}


def summarize(config: Config, runs: Mapping[tuple[str, str, int], Any]
              ) -> dict[str, Any]:
  """Per benchmark and strategy: metrics' mean and std over seeds."""
  out: dict[str, Any] = {}
  for bench in config.benchmarks:
    out[bench] = {}
    for strategy in config.strategies:
      records = [runs[bench, strategy, s] for s in config.seeds]
      row: dict[str, Any] = {}
      for key in ('acc', 'bwt', 'forgetting'):
        values = [r[key] for r in records]
        row[key] = None if values[0] is None else _mean_std(values)
      row['memory'] = records[0]['memory']
      row['time_s'] = float(np.mean([r['time_s'] for r in records]))
      if records[0]['accuracy_matrix'] is not None:
        row['mean_accuracy_matrix'] = np.mean(
            [r['accuracy_matrix'] for r in records], axis=0).tolist()
      out[bench][strategy] = row
  return out


def load_mnist(raw_dir: str | None, data_dir: str | None, num_test: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  return utils.load_image_splits('mnist', num_test=num_test, raw_dir=raw_dir,
                                 data_dir=data_dir)


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Every (benchmark, strategy, seed) run and every pair; resumable.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the
      figures (``_plots.FIGURES``), ``runs/<benchmark>/<strategy>/seed<s>
      .json`` and ``pairs/<name>.json``.
    raw_dir: Raw dataset files (default ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir.

  Returns:
    The results written to ``results.json``.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  splits = load_mnist(raw_dir, data_dir, config.num_test)
  fields = [f.name for f in dataclasses.fields(config)
            if f.name not in ('seeds', 'benchmarks', 'strategies', 'pairs',
                              'pair_seed', 'protect_ks', 'jac_examples',
                              'heldout_examples', 'b_examples', 'b_lr',
                              'b_steps', 'progress_bar')]
  base = {f: getattr(config, f) for f in fields}
  cache: dict[tuple[str, int], Benchmark] = {}

  def data_for(bench: str, seed: int) -> Benchmark:
    if (bench, seed) not in cache:
      cache.clear()  # One benchmark in memory at a time.
      cache[bench, seed] = make_benchmark(bench, seed, config, splits)
    return cache[bench, seed]

  items = [(b, s, st) for b in config.benchmarks for s in config.seeds
           for st in config.strategies]
  records = loop.resumable_records(
      items,
      path=lambda it: os.path.join(workdir, 'runs', it[0], it[2],
                                   f'seed{it[1]}.json'),
      recipe=lambda it: {**base, 'benchmark': it[0], 'seed': it[1],
                         'strategy': it[2]},
      compute=lambda it: run_strategy(config, it[0], data_for(it[0], it[1]),
                                      it[2], it[1]),
      summary=lambda r: f'ACC {r["acc"]:.3f}',
      desc='runs', progress_bar=config.progress_bar)
  runs = {(b, st, s): r for (b, s, st), r in zip(items, records)}

  pairs = loop.resumable_records(
      config.pairs,
      path=lambda p: os.path.join(workdir, 'pairs', f'{p.name}.json'),
      recipe=lambda p: {**base, 'pair': dataclasses.asdict(p),
                        **{k: getattr(config, k) for k in (
                            'pair_seed', 'protect_ks', 'jac_examples',
                            'heldout_examples', 'b_examples', 'b_lr',
                            'b_steps')}},
      compute=lambda p: run_pair(config, p, data_for(p.benchmark,
                                                     config.pair_seed)),
      summary=_pair_summary,
      desc='pairs', progress_bar=config.progress_bar)

  results = {
      'experiment': 'prevent_forgetting',
      **utils.run_info(),
      'config': utils.jsonable(dataclasses.asdict(config)),
      'summary': summarize(config, runs),
      'runs': {f'{b}/{st}/seed{s}': r for (b, st, s), r in runs.items()},
      'pairs': pairs,
  }
  results['wall_time_s'] = time.perf_counter() - wall_start
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_all(results, workdir)
  return results


# ------------------------------------------------------------------- table


def _pct(cell: Mapping[str, Any] | None) -> str:
  if cell is None:
    return '-'
  return f'{100 * cell["mean"]:.1f} ± {100 * cell["std"]:.1f}'


def _floats(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e5 else f'{n:,}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: one table per benchmark, then predicted vs measured."""
  cfg = results['config']
  lines = []
  for bench, rows in results['summary'].items():
    lines += [f'**{bench} MNIST** ({cfg["num_tasks"]} tasks, mean ± std '
              f'over {len(cfg["seeds"])} seeds, %)', '',
              '| strategy | ACC | BWT | forgetting | memory (floats) | '
              'memory layout | time/run (s) |',
              '|---|---:|---:|---:|---:|---|---:|']
    for strategy, row in rows.items():
      lines.append('| ' + ' | '.join([
          LABELS[strategy], _pct(row['acc']), _pct(row['bwt']),
          _pct(row['forgetting']), _floats(row['memory']['floats']),
          row['memory']['what'], f'{row["time_s"]:.1f}']) + ' |')
    lines.append('')
  if results['pairs']:
    ks = [str(k) for k in cfg['protect_ks']]
    lines += ['**Forgetting of A under protection of its top-k Jacobian '
              'directions** (change of A\'s mean cross-entropy after '
              f'{cfg["b_steps"]} full-batch GD steps on B, lr '
              f'{cfg["b_lr"]}; predicted (NTK) / measured)', '',
              '| pair | examples of A | ' + ' | '.join(
                  f'k={k}' for k in ks) + ' |',
              '|---|---|' + '---:|' * len(ks)]
    for pair in results['pairs']:
      for which, label in (('jac', f'{cfg["jac_examples"]} (SVD set)'),
                           ('heldout', f'{cfg["heldout_examples"]} '
                            'held-out')):
        cells = [f'{pair["per_k"][k][which]["predicted"]:.4f} / '
                 f'{pair["per_k"][k][which]["measured"]:.4f}' for k in ks]
        lines.append(f'| {pair["name"]} | {label} | ' + ' | '.join(cells)
                     + ' |')
  return '\n'.join(lines).rstrip()
