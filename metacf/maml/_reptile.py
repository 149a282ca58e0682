"""Reptile (Nichol et al. 2018): :func:`reptile_grad`.

Conventions in :mod:`metacf.maml`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metacf._src import checks
from metacf._src.types import LossFn, Params
from metacf.maml import _inner
from metacf.maml import _loss


def reptile_grad(loss_fn: LossFn, params: Params, tasks: _loss.Task, *,
                 inner_lr: Any = None, num_inner_steps: int = 1,
                 inner_optimizer: optax.GradientTransformation | None = None,
                 adapt_mask: Any = None, key: jax.Array | None = None,
                 has_aux: bool = False,
                 sequential_support: bool = False) -> Params:
  r"""Reptile's meta-gradient: ``params`` minus the mean adapted parameters.

  .. math::
    g = \theta - \frac{1}{B} \sum_b \mathrm{adapt}(\theta; S_b)

  where :math:`\mathrm{adapt}` is ``num_inner_steps`` of SGD (or
  ``inner_optimizer``) on task ``b``'s *support* set only (its query set is
  not read). ``optax.sgd(epsilon)`` on ``g`` is Reptile's update
  :math:`\theta \leftarrow \theta + \epsilon (\bar\phi - \theta)`; any optax
  optimizer applies it (Nichol et al. use Adam in their few-shot
  experiments). The adaptation is not differentiated through (first-order,
  ``stop_gradient``), so memory does not grow with ``num_inner_steps``
  beyond one step's. ``vmap`` over tasks, one trace.

  Examples:
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((x @ params['w'] - y) ** 2)
    >>> params = {'w': jnp.zeros((1, 1))}
    >>> x = jnp.ones((2, 4, 1))                      # two tasks, 4 examples
    >>> tasks = metacf.maml.Task(x, 2.0 * x, x, 2.0 * x)
    >>> grads = metacf.maml.reptile_grad(loss_fn, params, tasks, inner_lr=0.25)
    >>> grads['w']        # theta - (theta - 0.25 * dL/dw) = 0.25 * (-4.0)
    Array([[-1.]], dtype=float32)
    >>> outer = optax.sgd(1.0)
    >>> updates, _ = outer.update(grads, outer.init(params))
    >>> optax.apply_updates(params, updates)['w']
    Array([[1.]], dtype=float32)

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; ``loss_fn(params, x, y,
      key)`` when ``key`` is given; ``-> (scalar, aux)`` with ``has_aux``
      (the aux is ignored).
    params: Meta-parameters.
    tasks: A :class:`Task` batch with a leading task axis; only
      ``support_x`` and ``support_y`` are used.
    inner_lr: SGD step size (scalar or pytree like ``params``, as in
      :func:`inner_adapt`). Exactly one of ``inner_lr`` and
      ``inner_optimizer``.
    num_inner_steps: Inner steps per task (static, >= 0; 0 gives zeros;
      Nichol et al. use 5 to 10 on Omniglot).
    inner_optimizer: Optax inner optimizer instead of SGD (Nichol et al. use
      Adam with beta1 = 0), fresh state per task.
    adapt_mask: Which leaves are adapted (:mod:`metacf.masks`); the others
      get a zero gradient.
    key: Optional PRNG key; task ``t``'s step ``s`` uses
      ``fold_in(fold_in(key, t), s)``, as :func:`maml_loss`.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    sequential_support: If True, ``support_x`` and ``support_y`` leaves are
      ``[num_tasks, num_inner_steps, ...]`` and inner step ``s`` adapts on
      slice ``s`` alone (see :func:`inner_adapt`). With one task of
      single-example slices this is the within-batch Reptile step of MER
      (Riemer et al. 2019; :func:`metacf.maml.mer_update`).

  Returns:
    A pytree like ``params``: the Reptile meta-gradient.

  Raises:
    ValueError: on a bad ``num_inner_steps`` (< 0), ``inner_lr`` or
      ``adapt_mask`` not matching ``params``, not exactly one of ``inner_lr``
      and ``inner_optimizer``, ``tasks`` with mismatched task axes, or
      (``sequential_support``) a support leaf whose second axis is not
      ``num_inner_steps``.
    TypeError: if ``key`` is not a PRNG key.

  References:
    Nichol, Achiam & Schulman, `On First-Order Meta-Learning Algorithms
    <https://arxiv.org/abs/1803.02999>`_, 2018
  """
  fn = 'reptile_grad'
  num_tasks = _loss.check_tasks(tasks, fn)
  num_inner_steps = checks.check_int(num_inner_steps, 'num_inner_steps', fn,
                                     min_value=0)
  _inner.check_optimizer_choice(inner_lr, inner_optimizer, fn)
  _inner.check_inner_lr(inner_lr, params, fn)
  _inner.check_key(key, fn)
  if sequential_support:
    _inner.check_sequential_support(
        tasks.support_x, tasks.support_y, num_inner_steps, fn, axis=1,
        names=('tasks.support_x', 'tasks.support_y'))
  mask = _inner.mask_leaves(adapt_mask, params, fn)
  value = _inner.loss_value(loss_fn, has_aux, fn)
  keys = None if key is None else _loss.task_keys(key, num_tasks)
  theta = jax.lax.stop_gradient(params)

  def per_task(task: _loss.Task, task_key: jax.Array | None) -> Params:
    return _inner.adapt(
        value, theta, task.support_x, task.support_y, mask, inner_lr=inner_lr,
        num_steps=num_inner_steps, first_order=True, remat=False,
        inner_optimizer=inner_optimizer, key=task_key,
        sequential=sequential_support)

  adapted = jax.vmap(per_task)(tasks, keys)
  # The mean of the differences, not theta minus the mean: exact zeros for
  # leaves that adapt_mask freezes (and no cancellation).
  return jax.tree.map(lambda p, a: jnp.mean(p[None] - a, 0).astype(p.dtype),
                      theta, adapted)
