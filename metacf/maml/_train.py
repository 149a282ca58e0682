"""MAML's jitted meta-training step: :func:`make_meta_train_step`.

The meta-gradient of :func:`~metacf.maml.maml_loss`, optionally accumulated
over chunks of tasks or sharded over a mesh, and the outer optimizer's
update, in one ``jax.jit``. Conventions in :mod:`metacf.maml`.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metacf._src import checks
from metacf._src import optim
from metacf._src.types import LossFn, Params
from metacf.maml import _inner
from metacf.maml import _loss


class MetaTrainMetrics(NamedTuple):
  """What a meta-training step reports (before its outer update)."""
  loss: jax.Array       # shape=(), the meta-loss before the outer update.
  grad_norm: jax.Array  # shape=(), global norm of the meta-gradient.
  aux: Any = None       # has_aux: means of the floating aux leaves, shape=().


_MAML_OPTIONS = frozenset({'inner_lr', 'num_inner_steps', 'first_order',
                           'adapt_mask', 'remat', 'inner_optimizer',
                           'per_step_inner_lr', 'step_weights', 'pass_step',
                           'sequential_support'})


def _aux_metrics(aux: Any) -> Any:
  """Mean of each floating leaf of ``aux``; other leaves become None."""

  def mean(leaf):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return jnp.mean(leaf)
    return None

  return jax.tree.map(mean, aux)


def make_meta_train_step(
    loss_fn: LossFn,
    outer_optimizer: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
    task_axis: str | None = None,
    task_chunk_size: int | None = None,
    donate: bool = True,
    has_aux: bool = False,
    key: jax.Array | None = None,
    **maml_options: Any,
) -> Callable[..., tuple[Params, optax.OptState, MetaTrainMetrics]]:
  """Builds a jitted meta-training step ``(params, opt_state, tasks[, key])``.

  The step computes the meta-gradient of :func:`maml_loss` and applies
  ``outer_optimizer``. ``params`` and ``opt_state`` are donated (their buffers
  are reused for the outputs; do not use the inputs after the call).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; ``-> (scalar, aux)`` with
      ``has_aux=True``; ``loss_fn(params, x, y, key)`` when a key is used.
    outer_optimizer: The meta-optimizer, e.g. ``optax.adam(1e-3)``.
    mesh: Optional ``jax.sharding.Mesh``: the tasks are split over the devices
      along ``task_axis`` (``NamedSharding``), parameters and optimizer state
      are replicated; XLA inserts the cross-device mean. Same result as one
      device up to float reassociation. The number of tasks must divide
      evenly over the axis.
    task_axis: Mesh axis name for the task dimension (default: the mesh's
      first axis).
    task_chunk_size: If set, the meta-gradient is accumulated over chunks of
      this many tasks (``lax.scan``), so peak memory is that of one chunk;
      exact to float rounding. The number of tasks must be a multiple of it.
    donate: Donate ``params`` and ``opt_state`` (default True).
    has_aux: ``loss_fn`` returns ``(loss, aux)``: the metrics' ``aux`` field
      holds the mean (over tasks and every other axis) of each floating leaf
      of the query evaluation's aux, e.g. ``{'accuracy': ...}``; non-floating
      leaves become None.
    key: Default PRNG key for calls that pass none. Usually pass a fresh key
      per call instead, ``step(params, opt_state, tasks, key)``: a key fixed
      here gives every step the same randomness. Keys are derived per task,
      inner step and query evaluation as in :func:`maml_loss`, the same with
      or without ``task_chunk_size`` and ``mesh``.
    **maml_options: Forwarded to :func:`maml_loss` (``inner_lr``,
      ``num_inner_steps``, ``first_order``, ``adapt_mask``, ``remat``,
      ``inner_optimizer``, MAML++'s ``per_step_inner_lr``,
      ``step_weights``, ``pass_step``, and ``sequential_support``: support
      leaves ``[num_tasks, num_inner_steps, ...]``, one slice per inner
      step). Here ``inner_lr`` is fixed: for
      Meta-SGD or MAML++'s learned per-step rates, write the step around
      :func:`maml_loss` with the rates among the differentiated arguments
      (as ``experiments/meta_baselines`` does). ``step_weights`` given here is the default of every call; a
      schedule passes them per call instead, ``step(..., step_weights=w)``,
      an array of the same shape (no retrace). MAML++'s derivative-order
      annealing: build a ``first_order=True`` and a ``first_order=False``
      step and switch at the epoch of your schedule (two compilations).

  Returns:
    ``step(params, opt_state, tasks, key=None, step_weights=None) ->
    (params, opt_state, MetaTrainMetrics)``.

  Raises:
    ValueError: on a ``task_chunk_size`` that does not divide the number of
      tasks (at trace time), or an unknown ``task_axis``.
  """
  fn = 'make_meta_train_step'
  if task_chunk_size is not None:
    checks.check_int(task_chunk_size, 'task_chunk_size', fn, min_value=1)
  if mesh is not None:
    task_axis = task_axis or mesh.axis_names[0]
    if task_axis not in mesh.axis_names:
      raise ValueError(
          f'{fn}: task_axis must be one of the mesh axes {mesh.axis_names}, '
          f'got {task_axis!r}.')
  unknown = set(maml_options) - _MAML_OPTIONS
  if unknown:
    raise TypeError(
        f'{fn}: unknown MAML options {sorted(unknown)}; expected some of '
        f'{sorted(_MAML_OPTIONS)}.')
  _inner.check_key(key, fn)
  default_key = key
  maml_options = dict(maml_options)
  default_weights = maml_options.pop('step_weights', None)

  def loss_and_grad(params, tasks, keys, step_weights):
    num_tasks = _loss.check_tasks(tasks, fn)
    meta_loss = _loss.meta_loss_fn(loss_fn, params, fn, has_aux=has_aux,
                                   **maml_options)
    value_and_grad = jax.value_and_grad(
        functools.partial(meta_loss, step_weights=step_weights), has_aux=True)
    if keys is not None:
      keys = _loss.task_keys(keys, num_tasks)
    if task_chunk_size is None or task_chunk_size >= num_tasks:
      return value_and_grad(params, tasks, keys)
    if num_tasks % task_chunk_size:
      raise ValueError(
          f'{fn}: task_chunk_size must divide the number of tasks, got '
          f'{task_chunk_size} for {num_tasks} tasks.')
    num_chunks = num_tasks // task_chunk_size
    chunks = jax.tree.map(
        lambda a: a.reshape((num_chunks, task_chunk_size) + a.shape[1:]),
        (tasks, keys))

    def body(acc, chunk):
      (loss, aux), grads = value_and_grad(params, *chunk)
      return optax.tree.add(acc, (loss, grads)), aux

    (loss_shape, _), _ = jax.eval_shape(
        value_and_grad, params, *jax.tree.map(lambda a: a[0], chunks))
    zero = (jnp.zeros((), loss_shape.dtype), optax.tree.zeros_like(params))
    (loss, grads), aux = jax.lax.scan(body, zero, chunks)
    aux = jax.tree.map(lambda a: a.reshape((num_tasks,) + a.shape[2:]), aux)
    scale = 1.0 / num_chunks
    return (loss * scale, aux), optax.tree.scale(scale, grads)

  def step(params, opt_state, tasks, key=None, step_weights=None):
    if key is None:
      key = default_key
    else:
      _inner.check_key(key, fn)
    if step_weights is None:
      step_weights = default_weights
    (loss, aux), grads = loss_and_grad(params, tasks, key, step_weights)
    updates, opt_state = optim.update(outer_optimizer, grads, opt_state,
                                      params)
    params = optax.apply_updates(params, updates)
    metrics = MetaTrainMetrics(loss, optax.tree.norm(grads),
                               _aux_metrics(aux) if has_aux else None)
    return params, opt_state, metrics

  donate_argnums = (0, 1) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_task = jax.sharding.NamedSharding(mesh,
                                       jax.sharding.PartitionSpec(task_axis))
  jitted = jax.jit(step, donate_argnums=donate_argnums,
                   in_shardings=(replicated, replicated, by_task, replicated,
                                 replicated),
                   out_shardings=(replicated, replicated, replicated))

  # in_shardings covers positional arguments only, so all are passed.
  @functools.wraps(step)
  def sharded_step(params, opt_state, tasks, key=None, step_weights=None):
    return jitted(params, opt_state, tasks, key, step_weights)

  sharded_step.lower = (
      lambda params, opt_state, tasks, key=None, step_weights=None:
      jitted.lower(params, opt_state, tasks, key, step_weights))
  sharded_step._cache_size = jitted._cache_size  # pylint: disable=protected-access
  return sharded_step
