"""Model-Agnostic Meta-Learning: differentiable inner loops, vmapped over tasks.

Example::

  def loss_fn(params, x, y):
    return jnp.mean((apply_fn(params, x) - y) ** 2)

  tasks = metacf.maml.Task(support_x, support_y, query_x, query_y)  # [tasks, ...]
  meta_loss = metacf.maml.maml_loss(loss_fn, params, tasks, inner_lr=0.01,
                                    num_inner_steps=5)
  meta_grad = jax.grad(metacf.maml.maml_loss, argnums=1)(
      loss_fn, params, tasks, inner_lr=0.01, num_inner_steps=5)

  step = metacf.maml.make_meta_train_step(loss_fn, optax.adam(1e-3),
                                          inner_lr=0.01, num_inner_steps=5)
  params, opt_state, metrics = step(params, opt_state, tasks)

flax nnx, linen and equinox models (tested in ``tests/test_interop.py``)::

  graphdef, params = nnx.split(model, nnx.Param)       # params: an nnx.State
  apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
  loss_fn = lambda p, x, y: jnp.mean((apply_fn(p, x) - y) ** 2)
  step = metacf.maml.make_meta_train_step(loss_fn, optax.adam(1e-3),
                                          inner_lr=0.01)
  params, opt_state, metrics = step(params, opt_state, tasks)
  model = nnx.merge(graphdef, params)                  # back to a Module
  # nnx with BatchNorm: graphdef, params, rest = nnx.split(model, nnx.Param,
  #   ...); apply_fn = lambda p, x: nnx.merge(graphdef, p, nnx.clone(rest))(x)
  # linen: apply_fn = lambda p, x: model.apply({'params': p}, x)
  # equinox: params, static = eqx.partition(model, eqx.is_array)
  #          apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)

Leaf paths for ``adapt_mask`` are ``'/'``-joined (:mod:`metacf.masks`): for
the nnx state above, e.g. ``'head/kernel/value'``; ``adapt_mask='^head/'``
adapts the head only (ANIL).

Model state. ``loss_fn`` is a pure function of ``(params, x, y)``: layers that
keep state must be used in a stateless mode inside it. BatchNorm, in
particular, is used as in the MAML paper ("transductive"): normalise with the
statistics of the batch at hand (the support set in the inner loop, the query
set in the outer loss) and keep no running averages — e.g. flax linen
``nn.BatchNorm(use_running_average=False)`` applied with
``mutable=['batch_stats']`` and the updated statistics discarded, or a
functional batch norm on ``x.mean(0)``/``x.var(0)``. Its scale and offset are
ordinary parameters and are adapted like any other.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf._src import masks
from metacf._src import optim
from metacf._src.types import LossFn, Params


# Inner loops up to this many steps are unrolled at trace time; longer ones
# use lax.scan so that compile time stays bounded.
_MAX_UNROLLED_STEPS = 16


class Task(NamedTuple):
  """One few-shot task, or a batch of them with a leading task axis.

  :func:`maml_loss` and :func:`make_meta_train_step` take a batch: every
  leaf is ``[num_tasks, num_examples, ...]`` (at least 2 axes; a leaf with
  fewer raises ``ValueError`` naming its field).

  Attributes:
    support_x: Inputs the inner loop adapts on, ``[num_support, ...]``.
    support_y: Their targets, ``[num_support, ...]``.
    query_x: Inputs the adapted parameters are evaluated on, ``[num_query, ...]``.
    query_y: Their targets, ``[num_query, ...]``.
  """
  support_x: Any
  support_y: Any
  query_x: Any
  query_y: Any


class MetaTrainMetrics(NamedTuple):
  """What a meta-training step reports (before its outer update)."""
  loss: jax.Array       # shape=(), the meta-loss before the outer update.
  grad_norm: jax.Array  # shape=(), global norm of the meta-gradient.
  aux: Any = None       # has_aux: means of the floating aux leaves, shape=().


_MAML_OPTIONS = frozenset({'inner_lr', 'num_inner_steps', 'first_order',
                           'adapt_mask', 'remat', 'inner_optimizer'})


def _mask_leaves(adapt_mask: Any, params: Params, fn: str) -> list[bool]:
  """The adapt mask as one Python bool per leaf of ``params``."""
  return masks.mask_leaves(adapt_mask, params, name='adapt_mask', fn=fn)


def _check_inner_lr(inner_lr: Any, params: Params, fn: str) -> None:
  if inner_lr is None:
    return
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(inner_lr)):
    if np.ndim(inner_lr) != 0:
      raise ValueError(
          f'{fn}: inner_lr must be a scalar or a pytree like params, got an '
          f'array of shape {np.shape(inner_lr)}.')
    return
  checks.check_tree_structure(inner_lr, params, 'inner_lr', 'params', fn)
  for lr, p in zip(jax.tree.leaves(inner_lr),
                   jax.tree.leaves(params)):
    if np.ndim(lr) != 0 and np.shape(lr) != np.shape(p):
      raise ValueError(
          f'{fn}: inner_lr leaves must be scalars or match the shape of the '
          f'params leaf, got {np.shape(lr)} for a leaf of shape {np.shape(p)}.')


def _check_key(key: Any, fn: str) -> None:
  """Raises unless ``key`` is None or one PRNG key (typed or raw uint32)."""
  if key is None:
    return
  dtype = getattr(key, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if np.ndim(key) != 0:
      raise ValueError(
          f'{fn}: key must be a single PRNG key (shape ()), got shape '
          f'{np.shape(key)}.')
    return
  if dtype is not None and dtype == np.uint32 and np.shape(key) == (2,):
    return
  raise TypeError(
      f'{fn}: key must be a PRNG key from jax.random.key (or None), got '
      f'{type(key).__name__}'
      + (f' of dtype {dtype} and shape {np.shape(key)}' if dtype is not None
         else '') + '.')


def _loss_value(loss_fn: LossFn, has_aux: bool, fn: str) -> Callable[..., Any]:
  """``loss_fn`` as ``f(params, x, y, key) -> (loss, aux)``.

  ``key=None`` calls ``loss_fn(params, x, y)``; otherwise
  ``loss_fn(params, x, y, key)``. Without ``has_aux`` the aux is None.
  """

  def value(params, x, y, key):
    out = loss_fn(params, x, y) if key is None else loss_fn(params, x, y, key)
    if has_aux:
      if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = (f'an array of shape {np.shape(out)}' if hasattr(out, 'shape')
               else type(out).__name__)
        raise TypeError(
            f'{fn}: with has_aux=True, loss_fn must return a pair (loss, aux), '
            f'got {got}.')
      loss, aux = out
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(
            f'{fn}: loss_fn returned a {type(out).__name__} of length '
            f'{len(out)}; pass has_aux=True if it returns (loss, aux).')
      loss, aux = out, None
    if np.ndim(loss) != 0:
      raise ValueError(
          f'{fn}: loss_fn must return a scalar loss, got shape '
          f'{np.shape(loss)}.')
    return loss, aux

  return value


def _step_key(key: jax.Array | None, step: Any) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, step)


def inner_adapt(loss_fn: LossFn, params: Params, x: Any, y: Any, *,
                inner_lr: Any = None, num_inner_steps: int = 1,
                first_order: bool = False, adapt_mask: Any = None,
                remat: bool = False,
                inner_optimizer: optax.GradientTransformation | None = None,
                has_aux: bool = False,
                key: jax.Array | None = None,
                num_steps: int | None = None) -> Params:
  r"""Adapts ``params`` to one task by ``num_inner_steps`` of gradient descent.

  Each step is :math:`\theta \leftarrow \theta - \alpha \nabla_\theta
  L(\theta; x, y)`, differentiable through every step (so ``jax.grad`` of a
  loss of the result is the exact second-order MAML meta-gradient), unless
  ``first_order=True``, where the inner gradients are constants (FOMAML).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; ``-> (scalar, aux)`` with
      ``has_aux=True``; called as ``loss_fn(params, x, y, key)`` when ``key``
      is given.
    params: Parameter pytree to adapt (the meta-parameters).
    x: Support inputs of one task.
    y: Support targets of one task.
    inner_lr: The step size :math:`\alpha`: a scalar, or a pytree like
      ``params`` of scalars or per-parameter arrays (Meta-SGD, Li et al. 2017;
      differentiable, so it can be meta-learned). Required unless
      ``inner_optimizer`` is given.
    num_inner_steps: Number of inner steps (static, >= 0), as in
      :func:`maml_loss`.
    first_order: If True, ``stop_gradient`` the inner gradients (FOMAML).
    adapt_mask: Which leaves are adapted (:mod:`metacf.masks`): a pytree
      of Python bools like ``params``, a callable ``(path, leaf) -> bool``, or
      a regex searched in the ``/``-joined path (``'head'``). Other leaves are
      returned bit-identical (ANIL, Raghu et al. 2020: adapt the head only) and
      no gradient is computed for them. A callable or regex that matches no
      leaf raises.
    remat: If True, each inner step is rematerialised (``jax.checkpoint``) in
      the backward pass, so memory does not grow with ``num_inner_steps``.
      Without
      it, loops of up to 16 steps are unrolled (fastest) and longer ones run
      as a ``lax.scan``.
    inner_optimizer: Optional optax transformation unrolled differentiably in
      the loop instead of plain SGD (e.g. ``optax.adam(1e-2)``), as higher and
      TorchOpt offer. Its state starts fresh for every task. It receives
      gradients (and params) shaped like the ``params`` pytree, so
      ``optax.masked(opt, mask_tree)`` and ``optax.multi_transform(...,
      label_tree)`` work; under ``adapt_mask`` the frozen leaves' gradients
      are zeros and their updates are discarded.
    has_aux: If True, ``loss_fn`` returns ``(loss, aux)``; the inner loop
      ignores ``aux``.
    key: Optional PRNG key for a stochastic ``loss_fn`` (dropout,
      augmentation). Step ``s`` (0-based) calls ``loss_fn(params, x, y,
      jax.random.fold_in(key, s))``. Same key, same result.
    num_steps: Deprecated alias of ``num_inner_steps`` (emits a
      ``DeprecationWarning``; removed in the next release).

  Returns:
    The adapted parameters, same structure as ``params``.

  Raises:
    ValueError: if ``num_inner_steps < 0``, ``inner_lr``/``adapt_mask`` do
      not match the structure of ``params``, ``adapt_mask`` matches no leaf,
      or not exactly one of ``inner_lr`` and ``inner_optimizer`` is given.
    TypeError: if ``key`` is not a PRNG key, ``loss_fn``'s output does not
      match ``has_aux``, or both ``num_steps`` and a ``num_inner_steps``
      other than 1 are given.

  References:
    Finn et al., `Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks <https://arxiv.org/abs/1703.03400>`_, 2017;
    Li et al., `Meta-SGD <https://arxiv.org/abs/1707.09835>`_, 2017;
    Raghu et al., `Rapid Learning or Feature Reuse? (ANIL)
    <https://arxiv.org/abs/1909.09157>`_, 2020
  """
  fn = 'inner_adapt'
  name = 'num_inner_steps'
  if num_steps is not None:
    warnings.warn(
        f'{fn}: num_steps is deprecated and will be removed in the next '
        'release; use num_inner_steps (as in maml_loss).', DeprecationWarning,
        stacklevel=2)
    if not (isinstance(num_inner_steps, int) and num_inner_steps == 1):
      raise TypeError(
          f'{fn}: num_steps is a deprecated alias of num_inner_steps and '
          f'must not be given with it, got num_steps={num_steps!r} and '
          f'num_inner_steps={num_inner_steps!r}.')
    num_inner_steps, name = num_steps, 'num_steps'
  num_inner_steps = checks.check_int(num_inner_steps, name, fn, min_value=0)
  _check_optimizer_choice(inner_lr, inner_optimizer, fn)
  _check_inner_lr(inner_lr, params, fn)
  _check_key(key, fn)
  mask = _mask_leaves(adapt_mask, params, fn)
  return _inner_adapt(
      _loss_value(loss_fn, has_aux, fn), params, x, y, mask, inner_lr=inner_lr,
      num_steps=num_inner_steps, first_order=first_order, remat=remat,
      inner_optimizer=inner_optimizer, key=key)


def _check_optimizer_choice(inner_lr: Any, inner_optimizer: Any,
                            fn: str) -> None:
  if (inner_lr is None) == (inner_optimizer is None):
    raise ValueError(
        f'{fn}: exactly one of inner_lr and inner_optimizer must be given, got '
        f'inner_lr={inner_lr!r} and inner_optimizer={inner_optimizer!r}.')


def _inner_adapt(value: Callable[..., Any], params: Params, x: Any, y: Any,
                 mask: list[bool], *, inner_lr: Any, num_steps: int,
                 first_order: bool, remat: bool,
                 inner_optimizer: optax.GradientTransformation | None,
                 key: jax.Array | None) -> Params:
  """:func:`inner_adapt` on checked arguments; ``value`` from _loss_value."""
  if num_steps == 0 or not any(mask):
    return params

  leaves, treedef = jax.tree.flatten(params)
  adapted_idx = [i for i, m in enumerate(mask) if m]

  def merge(adapted_leaves, others=leaves):
    full = list(others)
    for i, leaf in zip(adapted_idx, adapted_leaves):
      full[i] = leaf
    return jax.tree.unflatten(treedef, full)

  def inner_grads(adapted_leaves, step_index):
    # Gradients with respect to the adapted leaves only: none are computed
    # for frozen ones (ANIL's saving).
    grads = jax.grad(lambda a: value(merge(a), x, y,
                                     _step_key(key, step_index))[0])(
                                         adapted_leaves)
    return jax.lax.stop_gradient(grads) if first_order else grads

  start = [leaves[i] for i in adapted_idx]

  if inner_optimizer is None:
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(inner_lr)):
      lrs = [inner_lr] * len(adapted_idx)
    else:
      lr_leaves = jax.tree.leaves(inner_lr)
      lrs = [lr_leaves[i] for i in adapted_idx]

    def sgd_step(carry, step_index):
      grads = inner_grads(carry, step_index)
      new = [p - jnp.asarray(lr, p.dtype) * g
             for p, g, lr in zip(carry, grads, lrs)]
      return new, None

    step, init = sgd_step, start
  else:
    zeros = [jnp.zeros_like(leaf) for leaf in leaves]

    def opt_step(carry, step_index):
      current, opt_state = carry
      grads = merge(inner_grads(current, step_index), zeros)
      updates, opt_state = optim.update(inner_optimizer, grads, opt_state,
                                        merge(current))
      update_leaves = jax.tree.leaves(updates)
      # Frozen leaves' updates (e.g. weight decay) are discarded.
      new = optax.apply_updates(current,
                                [update_leaves[i] for i in adapted_idx])
      return (new, opt_state), None

    step, init = opt_step, (start, inner_optimizer.init(params))

  if remat:
    # Rematerialised steps inside a scan: memory flat in num_steps.
    final, _ = jax.lax.scan(jax.checkpoint(step), init,
                            jnp.arange(num_steps))
  elif num_steps <= _MAX_UNROLLED_STEPS:
    # A Python loop, not lax.scan: scan stacks each step's residuals and
    # measured 1.06-1.14x slower than the unrolled loop a user would write.
    final = init
    for s in range(num_steps):
      final, _ = step(final, s)
  else:
    final, _ = jax.lax.scan(step, init, jnp.arange(num_steps))
  if inner_optimizer is not None:
    final = final[0]
  return merge(final)


def check_tasks(tasks: Task, fn: str, *, batched: bool = True) -> int:
  """Checks a batch of tasks: leaves ``[num_tasks, num_examples, ...]``.

  Every leaf has at least 2 axes and every field shares the leading (task)
  size. Returns it.
  """
  if not isinstance(tasks, Task):
    raise TypeError(
        f'{fn}: tasks must be a metacf.maml.Task(support_x, support_y, '
        f'query_x, query_y), got {type(tasks).__name__}.')
  if not batched:
    return 1
  sizes = {}
  for field in Task._fields:
    value = getattr(tasks, field)
    for path, leaf in jax.tree_util.tree_leaves_with_path(value):
      if np.ndim(leaf) < 2:
        raise ValueError(
            f'{fn}: tasks.{field}{jax.tree_util.keystr(path)} must have at '
            'least 2 axes, [num_tasks, num_examples, ...], got shape '
            f'{np.shape(leaf)}.')
    if jax.tree.leaves(value):
      sizes[field] = checks.leading_size(value, f'tasks.{field}', fn,
                                         axis='task')
  if len(set(sizes.values())) > 1:
    raise ValueError(
        f'{fn}: tasks fields must have the same leading (task) size, got '
        + ', '.join(f'{k}={v}' for k, v in sizes.items()) + '.')
  return next(iter(sizes.values()))


def task_keys(key: jax.Array, num_tasks: int) -> jax.Array:
  """The per-task keys ``maml_loss`` derives: ``fold_in(key, t)``, ``[num_tasks]``."""
  return jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(num_tasks))


def maml_loss(loss_fn: LossFn, params: Params, tasks: Task, *,
              inner_lr: Any = None, num_inner_steps: int = 1,
              first_order: bool = False, adapt_mask: Any = None,
              remat: bool = False,
              inner_optimizer: optax.GradientTransformation | None = None,
              has_aux: bool = False,
              key: jax.Array | None = None) -> Any:
  r"""The MAML meta-loss: mean over tasks of the query loss after adaptation.

  .. math::
    \mathcal{L}(\theta) = \frac{1}{B} \sum_{b} L\big(
      \mathrm{adapt}(\theta; S_b); Q_b\big)

  ``vmap`` over the task axis; ``jax.grad`` of it with respect to ``params``
  (and ``inner_lr`` for Meta-SGD) is the exact meta-gradient.
  ``num_inner_steps=0`` is the plain query loss.

  Keys: with ``key`` given, task ``t`` (its index along the task axis) gets
  ``task_key = jax.random.fold_in(key, t)``; its inner step ``s`` calls
  ``loss_fn(params, x, y, jax.random.fold_in(task_key, s))`` and its query
  evaluation ``loss_fn(adapted, query_x, query_y,
  jax.random.fold_in(task_key, num_inner_steps))``, so every task, step and
  query evaluation sees a distinct key, and the same ``key`` gives the same
  result (also under ``make_meta_train_step``'s task chunking and sharding).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; ``-> (scalar, aux)`` with
      ``has_aux=True``; ``loss_fn(params, x, y, key)`` when ``key`` is given.
    params: Meta-parameters.
    tasks: A :class:`Task` whose fields carry a leading task axis.
    inner_lr: See :func:`inner_adapt`.
    num_inner_steps: Inner steps per task (static, >= 0).
    first_order: FOMAML (see :func:`inner_adapt`).
    adapt_mask: ANIL mask (see :func:`inner_adapt`).
    remat: Rematerialise inner steps (see :func:`inner_adapt`).
    inner_optimizer: Optax inner optimizer (see :func:`inner_adapt`).
    has_aux: If True, ``loss_fn`` returns ``(loss, aux)`` and so does this
      function: ``(meta_loss, aux)`` where ``aux`` is the query evaluation's
      aux stacked over tasks (leading axis ``num_tasks``). The inner loop
      ignores aux; gradients are those of the aux-free loss
      (``jax.grad(..., has_aux=True)``).
    key: Optional PRNG key for a stochastic ``loss_fn`` (see above).

  Returns:
    The scalar meta-loss, or ``(meta_loss, aux)`` with ``has_aux=True``.

  Raises:
    ValueError: if the fields of ``tasks`` have different leading sizes,
      ``num_inner_steps < 0``, or ``inner_lr``/``adapt_mask`` do not match
      ``params``.
    TypeError: if ``key`` is not a PRNG key, or ``loss_fn``'s output does not
      match ``has_aux``.

  References:
    Finn et al., `Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks <https://arxiv.org/abs/1703.03400>`_, 2017
  """
  fn = 'maml_loss'
  num_tasks = check_tasks(tasks, fn)
  meta_loss = _meta_loss_fn(
      loss_fn, params, fn, inner_lr=inner_lr, num_inner_steps=num_inner_steps,
      first_order=first_order, adapt_mask=adapt_mask, remat=remat,
      inner_optimizer=inner_optimizer, has_aux=has_aux)
  _check_key(key, fn)
  keys = None if key is None else task_keys(key, num_tasks)
  loss, aux = meta_loss(params, tasks, keys)
  return (loss, aux) if has_aux else loss


def _meta_loss_fn(loss_fn: LossFn, params: Params, fn: str, *,
                  inner_lr: Any = None, num_inner_steps: int = 1,
                  first_order: bool = False, adapt_mask: Any = None,
                  remat: bool = False,
                  inner_optimizer: optax.GradientTransformation | None = None,
                  has_aux: bool = False
                  ) -> Callable[[Params, Task, jax.Array | None],
                                tuple[jax.Array, Any]]:
  """Checks the MAML options once; returns ``f(params, tasks, task_keys)``.

  ``f`` returns ``(meta_loss, aux stacked over tasks)`` (aux None without
  ``has_aux``); ``task_keys`` is None or ``[num_tasks]`` keys.
  """
  num_inner_steps = checks.check_int(num_inner_steps, 'num_inner_steps', fn,
                                     min_value=0)
  _check_optimizer_choice(inner_lr, inner_optimizer, fn)
  _check_inner_lr(inner_lr, params, fn)
  mask = _mask_leaves(adapt_mask, params, fn)
  value = _loss_value(loss_fn, has_aux, fn)

  def meta_loss(params, tasks, keys):

    def per_task(task: Task, task_key: jax.Array | None):
      adapted = _inner_adapt(
          value, params, task.support_x, task.support_y, mask,
          inner_lr=inner_lr, num_steps=num_inner_steps,
          first_order=first_order, remat=remat,
          inner_optimizer=inner_optimizer, key=task_key)
      return value(adapted, task.query_x, task.query_y,
                   _step_key(task_key, num_inner_steps))

    losses, aux = jax.vmap(per_task)(tasks, keys)
    return jnp.mean(losses), aux

  return meta_loss


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
      ``inner_optimizer``). For Meta-SGD, make the learning rates part of the
      meta-parameters in your ``loss_fn`` wrapper instead.

  Returns:
    ``step(params, opt_state, tasks, key=None) -> (params, opt_state,
    MetaTrainMetrics)``.

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
  _check_key(key, fn)
  default_key = key

  def loss_and_grad(params, tasks, keys):
    num_tasks = check_tasks(tasks, fn)
    meta_loss = _meta_loss_fn(loss_fn, params, fn, has_aux=has_aux,
                              **maml_options)
    value_and_grad = jax.value_and_grad(meta_loss, has_aux=True)
    if keys is not None:
      keys = task_keys(keys, num_tasks)
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

  def step(params, opt_state, tasks, key=None):
    if key is None:
      key = default_key
    else:
      _check_key(key, fn)
    (loss, aux), grads = loss_and_grad(params, tasks, key)
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
                   in_shardings=(replicated, replicated, by_task, replicated),
                   out_shardings=(replicated, replicated, replicated))

  # in_shardings covers positional arguments only, so the key is always passed.
  @functools.wraps(step)
  def sharded_step(params, opt_state, tasks, key=None):
    return jitted(params, opt_state, tasks, key)

  sharded_step.lower = lambda params, opt_state, tasks, key=None: (
      jitted.lower(params, opt_state, tasks, key))
  sharded_step._cache_size = jitted._cache_size  # pylint: disable=protected-access
  return sharded_step
