"""MAML's meta-loss: :class:`Task` and :func:`maml_loss`.

The mean over a batch of tasks (``vmap`` over the task axis) of the query
loss after :func:`~metacf.maml.inner_adapt` on the support set, and the
per-task key derivation. Conventions in :mod:`metacf.maml`.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf._src.types import LossFn, Params
from metacf.maml import _inner


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
              key: jax.Array | None = None,
              per_step_inner_lr: bool = False,
              step_weights: Any = None,
              pass_step: bool = False,
              sequential_support: bool = False) -> Any:
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
    per_step_inner_lr: MAML++'s per-step (and, with per-layer leaves,
      per-layer: LSLR) inner learning rates: every ``inner_lr`` leaf has a
      leading axis of length ``num_inner_steps`` and step ``s`` uses index
      ``s`` (see :func:`inner_adapt`). Learnable through ``jax.grad``.
    step_weights: MAML++'s multi-step loss: a ``[num_inner_steps]`` array
      ``w``; the meta-loss becomes :math:`\sum_s w_s \frac{1}{B}\sum_b
      L(\phi_{b,s}; Q_b)`, where :math:`\phi_{b,s}` are task ``b``'s
      parameters after ``s + 1`` inner steps (``w[-1]`` weighs the final
      ones). May be a traced array (an annealing schedule computed in the
      step). ``None`` (default): the final step only, weight 1. With a key,
      the query evaluation after ``k < num_inner_steps`` steps uses
      ``fold_in(task_key, num_inner_steps + k)`` (the final one keeps
      ``fold_in(task_key, num_inner_steps)``); ``aux`` is the final one's.
    pass_step: If True, ``loss_fn`` gets ``step=`` as a keyword: the inner
      step index ``s`` in the inner loop (see :func:`inner_adapt`), and the
      number of steps taken ``k`` in the query evaluation after ``k`` steps
      (``num_inner_steps`` for the final one). So per-step BatchNorm
      parameters (MAML++'s BNWB) are ``num_inner_steps + 1`` rows indexed by
      ``step``.
    sequential_support: If True, ``support_x`` and ``support_y`` leaves are
      ``[num_tasks, num_inner_steps, ...]`` and inner step ``s`` of task
      ``t`` adapts on ``support_x[t, s]`` alone (one example or mini-batch
      per step: OML, MER, La-MAML; see :func:`inner_adapt`). The query set
      is unchanged, ``[num_tasks, num_query, ...]``.

  Returns:
    The scalar meta-loss, or ``(meta_loss, aux)`` with ``has_aux=True``.

  Raises:
    ValueError: if the fields of ``tasks`` have different leading sizes,
      ``num_inner_steps < 0``, ``inner_lr``/``adapt_mask`` do not match
      ``params`` (with ``per_step_inner_lr``, every ``inner_lr`` leaf's
      leading axis must be ``num_inner_steps``), ``step_weights`` is not
      ``[num_inner_steps]``, or (``sequential_support``) a support leaf's
      second axis is not ``num_inner_steps``.
    TypeError: if ``key`` is not a PRNG key, or ``loss_fn``'s output does not
      match ``has_aux``.

  References:
    Finn et al., `Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks <https://arxiv.org/abs/1703.03400>`_, 2017;
    Antoniou, Edwards & Storkey, `How to train your MAML (MAML++)
    <https://arxiv.org/abs/1810.09502>`_, 2019
  """
  fn = 'maml_loss'
  num_tasks = check_tasks(tasks, fn)
  meta_loss = meta_loss_fn(
      loss_fn, params, fn, inner_lr=inner_lr, num_inner_steps=num_inner_steps,
      first_order=first_order, adapt_mask=adapt_mask, remat=remat,
      inner_optimizer=inner_optimizer, has_aux=has_aux,
      per_step_inner_lr=per_step_inner_lr, pass_step=pass_step,
      sequential_support=sequential_support)
  _inner.check_key(key, fn)
  keys = None if key is None else task_keys(key, num_tasks)
  loss, aux = meta_loss(params, tasks, keys, step_weights)
  return (loss, aux) if has_aux else loss


def check_step_weights(step_weights: Any, num_inner_steps: int,
                       fn: str) -> None:
  if step_weights is None:
    return
  if num_inner_steps < 1 or np.shape(step_weights) != (num_inner_steps,):
    raise ValueError(
        f'{fn}: step_weights must have shape [num_inner_steps] = '
        f'({num_inner_steps},), got shape {np.shape(step_weights)}.')
  dtype = jnp.result_type(step_weights)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'{fn}: step_weights must be floating point, got dtype {dtype}.')


def meta_loss_fn(loss_fn: LossFn, params: Params, fn: str, *,
                 inner_lr: Any = None, num_inner_steps: int = 1,
                 first_order: bool = False, adapt_mask: Any = None,
                 remat: bool = False,
                 inner_optimizer: optax.GradientTransformation | None = None,
                 has_aux: bool = False,
                 per_step_inner_lr: bool = False,
                 pass_step: bool = False,
                 sequential_support: bool = False,
                 batched: bool = True,
                 ) -> Callable[..., tuple[jax.Array, Any]]:
  """Checks the MAML options once; returns ``f(params, tasks, task_keys,
  step_weights=None, inner_lr=None)``.

  ``f`` returns ``(meta_loss, aux stacked over tasks)`` (aux None without
  ``has_aux``); ``task_keys`` is None or ``[num_tasks]`` keys. With
  ``batched=False``, ``tasks`` is one task (no task axis, no ``vmap``) and
  ``task_keys`` one key or None. ``inner_lr`` given to ``f`` replaces the
  checked one (same structure: learned rates, differentiated).
  """
  num_inner_steps = checks.check_int(num_inner_steps, 'num_inner_steps', fn,
                                     min_value=0)
  _inner.check_optimizer_choice(inner_lr, inner_optimizer, fn)
  _inner.check_per_step(per_step_inner_lr, inner_optimizer, fn)
  _inner.check_inner_lr(inner_lr, params, fn, per_step=per_step_inner_lr,
                        num_steps=num_inner_steps)
  mask = _inner.mask_leaves(adapt_mask, params, fn)
  value = _inner.loss_value(loss_fn, has_aux, fn, pass_step=pass_step)

  def meta_loss(params, tasks, keys, step_weights=None, inner_lr=inner_lr):
    check_step_weights(step_weights, num_inner_steps, fn)
    if sequential_support:
      _inner.check_sequential_support(
          tasks.support_x, tasks.support_y, num_inner_steps, fn,
          axis=1 if batched else 0,
          names=('tasks.support_x', 'tasks.support_y'))

    def per_task(task: Task, task_key: jax.Array | None):
      adapt = functools.partial(
          _inner.adapt, value, params, task.support_x, task.support_y, mask,
          inner_lr=inner_lr, num_steps=num_inner_steps,
          first_order=first_order, remat=remat,
          inner_optimizer=inner_optimizer, key=task_key,
          per_step_lr=per_step_inner_lr, sequential=sequential_support)
      if step_weights is None:
        return value(adapt(), task.query_x, task.query_y,
                     _inner.step_key(task_key, num_inner_steps),
                     step=num_inner_steps)

      def query(adapted, k):  # after k = 1..num_inner_steps steps
        query_key = _inner.step_key(
            task_key, jnp.where(k == num_inner_steps, k, num_inner_steps + k))
        return value(adapted, task.query_x, task.query_y, query_key, step=k)

      _, (losses, aux) = adapt(after_step=query)
      weights = jnp.asarray(step_weights, losses.dtype)
      return jnp.sum(weights * losses), jax.tree.map(lambda a: a[-1], aux)

    if not batched:
      return per_task(tasks, keys)
    losses, aux = jax.vmap(per_task)(tasks, keys)
    return jnp.mean(losses), aux

  return meta_loss
