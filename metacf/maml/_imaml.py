"""Implicit MAML (Rajeswaran et al. 2019): :func:`imaml_grad`.

Conventions in :mod:`metacf.maml`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf._src.types import LossFn, Params
from metacf.maml import _inner
from metacf.maml import _loss


def _vdot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                             jax.tree.leaves(b)))


def conjugate_gradients(matvec: Any, b: Any, steps: int) -> Any:
  """``steps`` iterations of textbook CG for ``matvec(x) = b`` from ``x = 0``.

  Pytrees in and out. A fixed number of iterations (a ``fori_loop``, no
  convergence test, so no ``while_loop`` under ``vmap``); an iteration whose
  residual or curvature is exactly zero leaves ``x`` unchanged instead of
  dividing by zero.

  ``jax.scipy.sparse.linalg.cg`` would do, but in jax 0.10.2 it fails under
  ``vmap`` with an ``AssertionError`` in its ``device_put`` of ``(b, x0)``
  on the gradient pytree of the flax linen model of
  ``tests/test_interop.py`` (measured 2026-12-07).
  """
  zero = jax.tree.map(jnp.zeros_like, b)

  def body(_, carry):
    x, r, p, rr = carry
    ap = matvec(p)
    curvature = _vdot(p, ap)
    ok = (rr > 0) & (curvature != 0)
    alpha = jnp.where(ok, rr / jnp.where(ok, curvature, 1), 0)
    x = jax.tree.map(lambda xi, pi: xi + alpha.astype(xi.dtype) * pi, x, p)
    r = jax.tree.map(lambda ri, ai: ri - alpha.astype(ri.dtype) * ai, r, ap)
    rr_new = _vdot(r, r)
    beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1), 0)
    p = jax.tree.map(lambda ri, pi: ri + beta.astype(ri.dtype) * pi, r, p)
    return x, r, p, rr_new

  x, *_ = jax.lax.fori_loop(0, steps, body, (zero, b, b, _vdot(b, b)))
  return x


def imaml_grad(loss_fn: LossFn, params: Params, tasks: _loss.Task, *,
               reg: float, inner_lr: Any = None, num_inner_steps: int,
               inner_optimizer: optax.GradientTransformation | None = None,
               cg_steps: int = 5, has_aux: bool = False,
               key: jax.Array | None = None) -> Any:
  r"""iMAML's meta-loss and implicit meta-gradient.

  For each task ``t``, the inner loop runs ``num_inner_steps`` of SGD (or
  ``inner_optimizer``) from :math:`\phi = \theta` on the proximally
  regularised support loss

  .. math::
    \hat L_t(\phi) = L(\phi; S_t) + \frac{\lambda}{2}
      \lVert \phi - \theta \rVert^2,

  giving :math:`\phi_t`. Then

  .. math::
    \mathrm{meta\_loss} = \frac{1}{B} \sum_t L(\phi_t; Q_t), \qquad
    \mathrm{grads} = \frac{1}{B} \sum_t \Big(I + \frac{H_t}{\lambda}\Big)^{-1}
      \nabla L(\phi_t; Q_t),

  with :math:`H_t = \nabla^2 L(\phi_t; S_t)` and the linear system solved by
  ``cg_steps`` iterations of textbook conjugate gradients (started from 0, no
  early stop; not ``jax.scipy.sparse.linalg.cg``, which fails under ``vmap``
  on a flax linen model's gradient pytree in jax 0.10.2, see
  ``_imaml.conjugate_gradients``) with Hessian-vector products (forward-over-reverse,
  ``jax.linearize`` of the support gradient, linearised once per task). When
  :math:`\phi_t` is the exact minimiser of :math:`\hat L_t`, ``grads`` is
  the exact meta-gradient :math:`\frac{d}{d\theta} L(\phi_t(\theta); Q_t)`
  (the implicit function theorem); the paper's approximation is an inexact
  inner solution and a truncated CG. The inner loop is not differentiated
  through: memory does not grow with ``num_inner_steps``. ``vmap`` over
  tasks, one trace; apply ``grads`` with any optax optimizer.

  Examples:
    >>> def loss_fn(params, x, y):
    ...   return 0.5 * jnp.mean((x @ params['w'] - y) ** 2)
    >>> params = {'w': jnp.zeros((2, 1))}
    >>> x = jax.random.normal(jax.random.key(0), (3, 8, 2))   # 3 tasks
    >>> tasks = metacf.maml.Task(x, x.sum(-1, keepdims=True),
    ...                          x, x.sum(-1, keepdims=True))
    >>> loss, grads = metacf.maml.imaml_grad(
    ...     loss_fn, params, tasks, reg=1.0, inner_lr=0.3, num_inner_steps=20)
    >>> jax.tree.map(jnp.shape, grads)
    {'w': (2, 1)}

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; ``-> (scalar, aux)`` with
      ``has_aux``; ``loss_fn(params, x, y, key)`` when ``key`` is given.
      Twice differentiable.
    params: Meta-parameters :math:`\theta`.
    tasks: A :class:`Task` batch with a leading task axis.
    reg: The proximal strength :math:`\lambda > 0` (the paper uses 0.5 to 2
      on Omniglot).
    inner_lr: SGD step size of the inner loop (scalar or pytree like
      ``params``). Exactly one of ``inner_lr`` and ``inner_optimizer``.
    num_inner_steps: Inner steps (static, >= 0).
    inner_optimizer: Optax inner optimizer instead of SGD (fresh state per
      task); it minimises :math:`\hat L_t`, proximal term included.
    cg_steps: Conjugate-gradient iterations (static, >= 1; the paper uses 5).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the result is then
      ``((meta_loss, aux), grads)`` with the query evaluation's aux stacked
      over tasks.
    key: Optional PRNG key. Task ``t`` gets ``task_key = fold_in(key, t)``;
      inner step ``s`` uses ``fold_in(task_key, s)``, the query evaluation
      ``fold_in(task_key, num_inner_steps)`` (as :func:`maml_loss`), and the
      Hessian-vector products one fixed key, ``fold_in(task_key,
      num_inner_steps + 1)``, so that CG sees one linear operator.

  Returns:
    ``(meta_loss, grads)``, or ``((meta_loss, aux), grads)`` with
    ``has_aux``; ``grads`` is a pytree like ``params``.

  Raises:
    ValueError: if ``reg <= 0``, ``cg_steps < 1``, ``num_inner_steps < 0``,
      ``inner_lr`` does not match ``params``, not exactly one of ``inner_lr``
      and ``inner_optimizer`` is given, or ``tasks`` have mismatched task
      axes.
    TypeError: if ``key`` is not a PRNG key, or ``loss_fn``'s output does
      not match ``has_aux``.

  References:
    Rajeswaran, Finn, Kakade & Levine, `Meta-Learning with Implicit
    Gradients <https://arxiv.org/abs/1909.04630>`_, 2019
  """
  fn = 'imaml_grad'
  num_tasks = _loss.check_tasks(tasks, fn)
  if reg is None or not np.isscalar(reg) and np.ndim(reg) != 0:
    raise ValueError(f'{fn}: reg must be a scalar > 0, got {reg!r}.')
  checks.check_positive(reg, 'reg', fn)
  cg_steps = checks.check_int(cg_steps, 'cg_steps', fn, min_value=1)
  num_inner_steps = checks.check_int(num_inner_steps, 'num_inner_steps', fn,
                                     min_value=0)
  _inner.check_optimizer_choice(inner_lr, inner_optimizer, fn)
  _inner.check_inner_lr(inner_lr, params, fn)
  _inner.check_key(key, fn)
  value = _inner.loss_value(loss_fn, has_aux, fn)
  keys = None if key is None else _loss.task_keys(key, num_tasks)
  theta = jax.lax.stop_gradient(params)
  mask = [True] * len(jax.tree.leaves(theta))

  def proximal(phi, x, y, step_key, step=None):
    del step
    loss, aux = value(phi, x, y, step_key)
    sq = sum(jnp.sum(jnp.square(p - t))
             for p, t in zip(jax.tree.leaves(phi), jax.tree.leaves(theta)))
    return loss + 0.5 * jnp.asarray(reg, loss.dtype) * sq, aux

  def per_task(task: _loss.Task, task_key: jax.Array | None):
    phi = _inner.adapt(
        proximal, theta, task.support_x, task.support_y, mask,
        inner_lr=inner_lr, num_steps=num_inner_steps, first_order=True,
        remat=False, inner_optimizer=inner_optimizer, key=task_key)
    phi = jax.lax.stop_gradient(phi)
    query_key = _inner.step_key(task_key, num_inner_steps)
    (loss, aux), query_grad = jax.value_and_grad(
        lambda p: value(p, task.query_x, task.query_y, query_key),
        has_aux=True)(phi)
    hvp_key = _inner.step_key(task_key, num_inner_steps + 1)
    support_grad = jax.grad(
        lambda p: value(p, task.support_x, task.support_y, hvp_key)[0])
    _, hvp = jax.linearize(support_grad, phi)

    def matvec(v):
      return jax.tree.map(
          lambda a, b: a + b / jnp.asarray(reg, a.dtype), v, hvp(v))

    return loss, aux, conjugate_gradients(matvec, query_grad, cg_steps)

  losses, aux, grads = jax.vmap(per_task)(tasks, keys)
  meta_loss = jnp.mean(losses)
  grads = jax.tree.map(lambda p, g: g.mean(0).astype(p.dtype), theta, grads)
  return ((meta_loss, aux), grads) if has_aux else (meta_loss, grads)
