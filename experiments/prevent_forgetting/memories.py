"""What each strategy keeps between tasks: :class:`Memory`.

EWC's anchors and Fishers, OGD's and PCA-OGD's gradient bases, GPM's
layer-wise input bases (swapped into the strategy's optax state with
``optax.tree.set``), and the replay buffer of A-GEM and ER, in fixed shapes
so that the strategy's jitted loop compiles once.
"""

import functools
import time
from typing import Any

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import utils
from experiments.prevent_forgetting import steps
from experiments.prevent_forgetting.configs import Config
from experiments.prevent_forgetting.data import NUM_PIXELS
import metacf.protect
import metacf.replay

Params = Any


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
    grad = jax.grad(lambda p: steps.apply_fn(p, x[None])[0, y])(params)
    return flatten_util.ravel_pytree(grad)[0]
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


@functools.lru_cache(maxsize=None)
def _mas_fn():
  return jax.jit(lambda p, x: metacf.protect.mas_importance(
      steps.apply_fn, p, x, chunk_size=100))


@functools.lru_cache(maxsize=None)
def _si_fn(damping: float):
  return jax.jit(lambda omega, delta: metacf.protect.si_importance(
      omega, delta, damping=damping))


@functools.lru_cache(maxsize=None)
def _fisher_fn():
  return jax.jit(lambda p, x: metacf.protect.fisher_diagonal(
      steps.apply_fn, p, x, chunk_size=20))


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
    self.basis = None        # OGD / PCA-OGD: [rows, P].
    self.opt_state = self._trainer().tx.init(params)
    self.buffer: Any = {}
    self.gpm = None          # GPM: {layer: [d_in, r]}, unpadded.
    self.importance = None   # SI / MAS: the importance summed over tasks.
    self.start = None        # SI: the parameters when the task started.
    self.stored = 0          # Examples in the buffer.
    self.tasks_remembered = 0
    self.train_times: list[float] = []  # Seconds of each train() call.
    if strategy in ('agem', 'er'):
      self.buffer = metacf.replay.replay_buffer(
          steps.buffer_capacity(config)).init(
              {'x': jnp.zeros((NUM_PIXELS,), jnp.float32),
               'y': jnp.zeros((), jnp.int32)})
    elif strategy == 'gem':  # One slot of memory_per_task per earlier task.
      t, m = max(config.num_tasks - 1, 1), config.memory_per_task
      self.buffer = {'x': jnp.zeros((t, m, NUM_PIXELS), jnp.float32),
                     'y': jnp.zeros((t, m), jnp.int32),
                     'filled': jnp.zeros((t,), jnp.float32)}

  def _trainer(self) -> steps.Trainer:
    rows = 0 if self.basis is None else int(self.basis.shape[0])
    return steps.trainer(self.config, self.strategy, rows)

  def train(self, params: Params, x: jax.Array, y: jax.Array,
            order: jax.Array, key: jax.Array) -> Params:
    """Trains on one task (:attr:`Trainer.train`); keeps the new state."""
    self.start = params
    begin = time.perf_counter()
    params, self.opt_state = self._trainer().train(
        params, self.opt_state, self.buffer, x, y, order, key)
    jax.block_until_ready(params)
    self.train_times.append(time.perf_counter() - begin)
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
    elif s in ('si', 'mas'):
      if s == 'si':  # Zenke et al.: Omega += omega / (delta^2 + xi).
        delta = jax.tree.map(jnp.subtract, params, self.start)
        new = _si_fn(config.si_damping)(
            optax.tree.get(self.opt_state, 'omega'), delta)
      else:  # Aljundi et al.: the importances of the tasks add up.
        new = _mas_fn()(params, jnp.asarray(x[:config.mas_examples]))
      self.importance = new if self.importance is None else jax.tree.map(
          jnp.add, self.importance, new)
      self.opt_state = optax.tree.set(self.opt_state, anchor=params,
                                      fisher=self.importance)
      if s == 'si':  # The path integral restarts with each task.
        self.opt_state = optax.tree.set(
            self.opt_state, omega=jax.tree.map(jnp.zeros_like, params))
    elif s in ('agem', 'er', 'gem'):
      idx = utils.numpy_rng(key).permutation(len(y))[:config.memory_per_task]
      if s == 'gem':
        self.buffer = {'x': self.buffer['x'].at[task].set(x[idx]),
                       'y': self.buffer['y'].at[task].set(y[idx]),
                       'filled': self.buffer['filled'].at[task].set(1.0)}
      else:
        self.buffer = _buffer_add_fn(steps.buffer_capacity(config))(
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
      # The trainer of the new basis size; SGD itself keeps no state.
      self.opt_state = optax.tree.set(self._trainer().tx.init(params),
                                      basis=self.basis)
    elif s == 'gpm':
      names = steps.layer_names(config.hidden)
      reps = steps.layer_inputs(params, jnp.asarray(x[:config.gpm_examples]))
      old = self.gpm or {}
      self.gpm = {name: metacf.protect.gpm_basis(
          rep.T, gpm_threshold(config, i, task), old.get(name))
                  for i, (name, rep) in enumerate(zip(names, reps))}
      self.opt_state = optax.tree.set(self.opt_state, bases={
          name: {'kernel': metacf.protect.gpm_projector(m)}
          for name, m in self.gpm.items()})

  def floats(self) -> dict[str, Any]:
    """Stored floats after the last update, and how they are made up."""
    p, t, s = self.num_params, self.tasks_remembered, self.strategy
    if s == 'ewc':
      return {'floats': 2 * p * t, 'what': f'2P x {t} tasks'}
    if s in ('online_ewc', 'mas'):
      return {'floats': 2 * p, 'what': '2P'}
    if s == 'si':  # Anchor and Omega; omega and the start while training.
      return {'floats': 2 * p, 'what': '2P (+2P while training)'}
    if s in ('agem', 'er', 'gem'):
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
