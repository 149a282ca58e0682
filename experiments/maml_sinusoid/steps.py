"""The MLP, its jitted training chunks (MAML, Reptile, iMAML, pretrained)
and evaluation.

``make_train_chunk`` runs ``chunk_size`` iterations in a ``lax.scan``, the
tasks of iteration ``i`` drawn inside it from ``fold_in(run_key, i)``, so no
data crosses from the host; ``compile_train_chunk`` compiles it once per
process. ``adaptation_curve`` scores a network on test tasks after 0 to N
test-time SGD steps, ``tune_baseline_lr`` picks the pretrained network's
step size on validation tasks.
"""

from collections.abc import Sequence
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import utils
from experiments.maml_sinusoid import data
from experiments.maml_sinusoid.configs import Config
from metacf import maml

# The meta-learning methods (``config.methods``), then the baseline.
METHODS = ('maml', 'reptile', 'imaml')
KINDS = (*METHODS, 'pretrained')

Params = Any


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState


# ------------------------------------------------------------------ model


def init_mlp(key: jax.Array, widths: Sequence[int], stddev: float) -> Params:
  """An MLP ``1 -> widths -> 1`` as a list of ``{'w', 'b'}`` layers.

  Weights are truncated normal (cut at 2 standard deviations) with standard
  deviation ``stddev``, biases zero: ``construct_fc_weights`` of the
  authors' code (``tf.truncated_normal(..., stddev=0.01)``).
  """
  sizes = (1, *widths, 1)
  keys = jax.random.split(key, len(sizes) - 1)
  return [{'w': stddev * jax.random.truncated_normal(k, -2.0, 2.0, (m, n)),
           'b': jnp.zeros([n], jnp.float32)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def apply_mlp(params: Params, x: jax.typing.ArrayLike) -> jax.Array:
  """``[num_points, 1] -> [num_points, 1]``, ReLU between the layers."""
  h = jnp.asarray(x)
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer['w'] + layer['b'][None, :])
  return h @ params[-1]['w'] + params[-1]['b'][None, :]


def mse_loss(params: Params, x: jax.typing.ArrayLike,
             y: jax.typing.ArrayLike) -> jax.Array:
  """Mean squared error of the MLP on one task's points."""
  return jnp.mean((apply_mlp(params, x) - y) ** 2)


# --------------------------------------------------------------- training


def make_optimizer(config: Config) -> optax.GradientTransformation:
  return optax.adam(config.outer_lr)


def make_train_chunk(kind: str, config: Config, shots: int):
  """Returns ``chunk(state, key, first_iteration) -> (state, losses)``.

  Runs ``config.chunk_size`` iterations in a ``lax.scan``; iteration ``i``
  trains on ``meta_batch_size`` tasks drawn from ``fold_in(key, i)``.
  ``losses`` (float32 ``[chunk_size]``), before each update: MAML's and
  iMAML's meta-loss (the query MSE after their inner steps; iMAML's over
  the tasks where it is finite), Reptile's query MSE before adaptation
  (Reptile reads no query set; this costs one forward pass), the
  pretrained network's MSE. Every method updates with Adam
  ``outer_lr``. Not jitted: see ``compile_train_chunk``.

  Args:
    kind: One of ``KINDS``.
    config: Experiment config.
    shots: K, the support (and query) points per training task.
  """
  optimizer = make_optimizer(config)
  if kind == 'maml':
    meta_step = maml.make_meta_train_step(
        mse_loss, optimizer, inner_lr=config.inner_lr,
        num_inner_steps=config.num_inner_steps, donate=False)

    def step(state, tasks):
      params, opt_state, metrics = meta_step(state.params, state.opt_state,
                                             tasks)
      return TrainState(params, opt_state), metrics.loss
  elif kind in ('reptile', 'imaml'):

    def per_task(params, task):
      """``(loss, grads)`` of one task (a batch of one)."""
      task = jax.tree.map(lambda a: a[None], task)
      if kind == 'reptile':
        # theta minus the adapted parameters; the loss is the query MSE
        # before adaptation (Reptile reads no query set).
        return (mse_loss(params, task.query_x[0], task.query_y[0]),
                maml.reptile_grad(
                    mse_loss, params, task, inner_lr=config.inner_lr,
                    num_inner_steps=config.reptile_num_inner_steps))
      return maml.imaml_grad(
          mse_loss, params, task, reg=config.imaml_reg,
          inner_lr=config.inner_lr,
          num_inner_steps=config.imaml_num_inner_steps,
          cg_steps=config.imaml_cg_steps)

    def step(state, tasks):
      # One task at a time (vmap), so that a task on which the inner SGD
      # diverged (a non-finite loss or gradient) is left out of the mean;
      # for iMAML the mean is then clipped (see the README). Adam, as MAML,
      # not Reptile's SGD with an annealed epsilon.
      task_losses, task_grads = jax.vmap(per_task, (None, 0))(state.params,
                                                              tasks)
      finite = jnp.isfinite(task_losses) & functools.reduce(
          jnp.logical_and, [jnp.isfinite(g).reshape(len(g), -1).all(1)
                            for g in jax.tree.leaves(task_grads)])
      count = jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32)
      loss = jnp.sum(jnp.where(finite, task_losses, 0.0)) / count
      grads = jax.tree.map(
          lambda g: jnp.sum(jnp.where(
              finite.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), 0)
          / count, task_grads)
      if kind == 'imaml':
        norm = optax.tree.norm(grads)
        grads = jax.tree.map(
            lambda g: g * jnp.minimum(
                1.0, config.imaml_clip_norm / jnp.maximum(norm, 1e-30)
            ).astype(jnp.float32), grads)
      updates, opt_state = utils.optimizer_update(
          optimizer, grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates),
                        opt_state), loss
  elif kind == 'pretrained':

    def step(state, tasks):
      # All points of all tasks, support and query: the data MAML sees.
      x = jnp.concatenate([tasks.support_x, tasks.query_x], 1).reshape(-1, 1)
      y = jnp.concatenate([tasks.support_y, tasks.query_y], 1).reshape(-1, 1)
      loss, grads = jax.value_and_grad(mse_loss)(state.params, x, y)
      updates, opt_state = utils.optimizer_update(
          optimizer, grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates),
                        opt_state), loss
  else:
    raise ValueError(f'make_train_chunk: kind must be one of {KINDS}, got '
                     f'{kind!r}.')

  def chunk(state, key, first_iteration):
    def body(state, iteration):
      tasks = data.sample_tasks(jax.random.fold_in(key, iteration),
                                config.meta_batch_size, shots, shots,
                                config).tasks
      return step(state, tasks)

    iterations = first_iteration + jnp.arange(config.chunk_size,
                                              dtype=jnp.int32)
    return jax.lax.scan(body, state, iterations)

  return chunk


def init_state(key: jax.Array, config: Config) -> TrainState:
  params = init_mlp(key, config.hidden_widths, config.init_stddev)
  return TrainState(params, make_optimizer(config).init(params))


@functools.cache
def compile_train_chunk(kind: str, config: Config, shots: int):
  """AOT-compiles ``make_train_chunk`` (state donated).

  Cached per process, so a resumed or repeated run does not compile again.
  """
  state = jax.eval_shape(functools.partial(init_state, config=config),
                         jax.random.key(0))
  key = jax.eval_shape(jax.random.key, 0)
  start = jax.ShapeDtypeStruct((), jnp.int32)
  jitted = jax.jit(make_train_chunk(kind, config, shots), donate_argnums=0)
  return jitted.lower(state, key, start).compile()


# ------------------------------------------------------------- evaluation


@functools.cache
def _adaptation_curve_fn(num_steps: int):
  """Jitted ``curve(params, tasks, lr) -> mse [num_tasks, num_steps + 1]``.

  Column ``s`` is the query MSE after ``s`` SGD steps of size ``lr`` on the
  task's support points (column 0: before adaptation).
  """

  def curve(params, tasks, lr):
    def per_task(task):
      def body(p, _):
        p = maml.inner_adapt(mse_loss, p, task.support_x, task.support_y,
                             inner_lr=lr, num_inner_steps=1)
        return p, mse_loss(p, task.query_x, task.query_y)

      _, after = jax.lax.scan(body, params, None, length=num_steps)
      before = mse_loss(params, task.query_x, task.query_y)
      return jnp.concatenate([before[None], after])

    return jax.vmap(per_task)(tasks)

  return jax.jit(curve)


def adaptation_curve(params: Params, tasks: maml.Task, lr: float,
                     num_steps: int) -> dict[str, list[Any]]:
  """Test MSE after 0..num_steps steps: mean, 95% half-width, median.

  The half-width is ``1.96 std / sqrt(num_tasks)``, as in the authors'
  ``main.py``. A task whose MSE overflows (SGD diverged on it) makes the
  mean and half-width of that step ``None``; ``num_diverged`` counts such
  tasks per step, and the median counts them as infinite.
  """
  mse = np.asarray(_adaptation_curve_fn(num_steps)(params, tasks,
                                                   np.float32(lr)),
                   np.float64)
  num_tasks = mse.shape[0]
  finite = np.isfinite(mse).all(0)
  with np.errstate(invalid='ignore', over='ignore'):
    mean = mse.mean(0)
    ci95 = 1.96 * mse.std(0) / np.sqrt(num_tasks)
  return {'mse_mean': [float(m) if f else None for m, f in zip(mean, finite)],
          'mse_ci95': [float(c) if f else None for c, f in zip(ci95, finite)],
          # Diverged tasks (inf, or nan once inf - inf) count as +inf.
          'mse_median': np.median(np.where(np.isfinite(mse), mse, np.inf),
                                  0).tolist(),
          'num_diverged': (~np.isfinite(mse)).sum(0).tolist()}


@functools.cache
def fit_fn(num_steps: int):
  """Jitted ``fit(params, support_x, support_y, x, lr) -> [steps + 1, n]``."""

  def fit(params, support_x, support_y, x, lr):
    def body(p, _):
      p = maml.inner_adapt(mse_loss, p, support_x, support_y, inner_lr=lr,
                           num_inner_steps=1)
      return p, apply_mlp(p, x)[:, 0]

    _, after = jax.lax.scan(body, params, None, length=num_steps)
    return jnp.concatenate([apply_mlp(params, x)[:, 0][None], after])

  return jax.jit(fit)


def tune_baseline_lr(params: Params, val_tasks: maml.Task,
                     config: Config) -> tuple[float, dict[str, float]]:
  """The grid step size with the lowest validation MSE after the last step."""
  scores = {}
  for lr in config.baseline_lrs:
    curve = adaptation_curve(params, val_tasks, lr, config.max_eval_steps)
    scores[f'{lr:g}'] = curve['mse_mean'][-1]  # None if diverged
  finite = {lr: s for lr, s in scores.items() if s is not None}
  best = min(finite, key=finite.get) if finite else f'{config.inner_lr:g}'
  return float(best), scores
