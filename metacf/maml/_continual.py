"""Online meta-continual learning: :func:`mer_update` and :func:`lamaml_update`.

Both adapt on a stream one slice (one example or mini-batch) per inner step,
the ``sequential_support`` form of :func:`~metacf.maml.inner_adapt`. OML
(Javed & White 2019) needs no function of its own: it is :func:`maml_loss`
with ``sequential_support=True`` and an ``adapt_mask`` on the prediction
head (see the guide). Conventions in :mod:`metacf.maml`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf._src.types import LossFn, Params
from metacf.maml import _inner
from metacf.maml import _loss


def _check_stream(x: Any, y: Any, names: tuple[str, str], fn: str,
                  min_ndim: int) -> tuple[int, ...]:
  """Leaves of ``x`` and ``y`` share their first ``min_ndim`` axes."""
  leading = None
  for name, tree in zip(names, (x, y)):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
      raise ValueError(f'{fn}: {name} has no array leaves.')
    for path, leaf in leaves:
      shape = np.shape(leaf)
      where = f'{name}{jax.tree_util.keystr(path)}'
      if len(shape) < min_ndim:
        raise ValueError(
            f'{fn}: {where} must have at least {min_ndim} axes, got shape '
            f'{shape}.')
      if leading is None:
        leading = shape[:min_ndim]
      elif shape[:min_ndim] != leading:
        raise ValueError(
            f'{fn}: {names[0]} and {names[1]} leaves must share their leading '
            f'{min_ndim} axes, got {leading} and {shape[:min_ndim]} ({where}).')
  return leading


def _check_rate(value: Any, name: str, fn: str) -> None:
  if np.ndim(value) != 0:
    raise ValueError(f'{fn}: {name} must be a scalar, got shape '
                     f'{np.shape(value)}.')
  checks.check_positive(value, name, fn)


def mer_update(loss_fn: LossFn, params: Params, x: Any, y: Any, *,
               inner_lr: Any, within_batch_rate: Any, across_batch_rate: Any,
               adapt_mask: Any = None, key: jax.Array | None = None,
               has_aux: bool = False) -> Params:
  r"""One MER update (Riemer et al. 2019, Algorithm 1) on ``s`` batches.

  For batch :math:`i = 1..s` of :math:`k` slices (MER: the incoming example
  and :math:`k-1` drawn from the replay buffer), SGD takes one step per slice
  and the within-batch Reptile step moves toward where it ended; the
  across-batch Reptile step then interpolates from the starting point:

  .. math::
    \theta^W_{i,j} = \theta^W_{i,j-1} - \alpha \nabla L(\theta^W_{i,j-1};
      x_{i,j}), \quad \theta \leftarrow \theta^W_{i,0} + \beta
      (\theta^W_{i,k} - \theta^W_{i,0}), \qquad
    \theta \leftarrow \theta^A_0 + \gamma (\theta - \theta^A_0),

  with :math:`\theta^W_{i,0}` the parameters before batch ``i`` and
  :math:`\theta^A_0` those before the update. Each batch's SGD is
  :func:`reptile_grad`'s adaptation with ``sequential_support=True``; the
  batches run in a ``lax.scan``. Nothing is differentiated (first order).
  Draw the batches with :mod:`metacf.replay` (e.g. ``sample`` the buffer and
  put the incoming example in each batch) and add the example to the buffer
  afterwards (reservoir), as the paper does.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar`` (``(scalar, aux)`` with
      ``has_aux``; ``loss_fn(params, x, y, key)`` with ``key``), called on
      one slice ``x[i, j]``.
    params: Parameters :math:`\theta`.
    x: Inputs, leaves ``[s, k, ...]``: ``s`` batches of ``k`` slices; step
      ``j`` of batch ``i`` uses ``x[i, j]``. For MER's one example per step
      give a mini-batch of one, ``[s, k, 1, ...]``.
    y: Targets, leaves ``[s, k, ...]`` like ``x``.
    inner_lr: SGD step size :math:`\alpha` (scalar or pytree like
      ``params``, as in :func:`inner_adapt`).
    within_batch_rate: :math:`\beta > 0`, the within-batch Reptile rate.
    across_batch_rate: :math:`\gamma > 0`, the across-batch Reptile rate.
    adapt_mask: Which leaves are trained (:mod:`metacf.masks`); the others
      are returned unchanged.
    key: Optional PRNG key for a stochastic ``loss_fn``: batch ``i``'s step
      ``j`` uses ``fold_in(fold_in(key, i), j)``.
    has_aux: ``loss_fn`` returns ``(loss, aux)`` (the aux is ignored).

  Returns:
    The updated parameters, a pytree like ``params``.

  Raises:
    ValueError: if ``x``/``y`` leaves do not share leading ``[s, k]`` axes,
      a rate is not a positive scalar, or ``inner_lr``/``adapt_mask`` do not
      match ``params``.
    TypeError: if ``key`` is not a PRNG key.

  References:
    Riemer et al., `Learning to Learn without Forgetting by Maximizing
    Transfer and Minimizing Interference (MER)
    <https://arxiv.org/abs/1810.11910>`_, ICLR 2019
  """
  fn = 'mer_update'
  num_batches, num_steps = _check_stream(x, y, ('x', 'y'), fn, min_ndim=2)
  _inner.check_inner_lr(inner_lr, params, fn)
  if inner_lr is None:
    raise ValueError(f'{fn}: inner_lr must be given.')
  _check_rate(within_batch_rate, 'within_batch_rate', fn)
  _check_rate(across_batch_rate, 'across_batch_rate', fn)
  _inner.check_key(key, fn)
  mask = _inner.mask_leaves(adapt_mask, params, fn)
  value = _inner.loss_value(loss_fn, has_aux, fn)
  start = jax.lax.stop_gradient(params)

  def interpolate(origin, target, rate):
    return jax.tree.map(
        lambda o, t: (o + jnp.asarray(rate, o.dtype) * (t - o)).astype(o.dtype),
        origin, target)

  def batch_step(theta, batch):
    batch_x, batch_y, index = batch
    batch_key = None if key is None else jax.random.fold_in(key, index)
    adapted = _inner.adapt(
        value, theta, batch_x, batch_y, mask, inner_lr=inner_lr,
        num_steps=num_steps, first_order=True, remat=False,
        inner_optimizer=None, key=batch_key, sequential=True)
    return interpolate(theta, adapted, within_batch_rate), None

  theta, _ = jax.lax.scan(batch_step, start,
                          (x, y, jnp.arange(num_batches)))
  return interpolate(start, theta, across_batch_rate)


class LaMamlUpdate(NamedTuple):
  """What :func:`lamaml_update` returns."""
  params: Params   # The updated weights.
  inner_lr: Any    # The updated per-parameter learning rates (not clipped).
  loss: jax.Array  # shape=(), the meta-loss before the update.


def lamaml_update(loss_fn: LossFn, params: Params, inner_lr: Any, x: Any,
                  y: Any, meta_x: Any, meta_y: Any, *, lr_learning_rate: Any,
                  first_order: bool = False, step_weights: Any = None,
                  max_grad_norm: Any = None, adapt_mask: Any = None,
                  key: jax.Array | None = None,
                  has_aux: bool = False) -> LaMamlUpdate:
  r"""One La-MAML update (Gupta et al. 2020, Algorithm 1).

  The inner loop takes one SGD step per stream slice with the learnable
  per-parameter rates :math:`\alpha`,
  :math:`\theta_{j+1} = \theta_j - \alpha \odot \nabla L(\theta_j; x_j)`
  (differentiated through, unless ``first_order``), and the meta-loss is the
  loss of :math:`\theta_k` on the meta batch (the incoming batch and samples
  from the replay buffer). The rates are updated first, by plain SGD at
  ``lr_learning_rate`` :math:`\eta`, and the weights then step with the
  updated rates **clipped at zero**:

  .. math::
    \alpha \leftarrow \alpha - \eta \nabla_\alpha L_{meta}(\theta_k), \qquad
    \theta_0 \leftarrow \theta_0 - \max(0, \alpha) \odot
      \nabla_{\theta_0} L_{meta}(\theta_k).

  The meta-gradient is that of :func:`maml_loss` with one task and
  ``sequential_support=True``.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar`` (``(scalar, aux)`` with
      ``has_aux``; ``loss_fn(params, x, y, key)`` with ``key``).
    params: Weights :math:`\theta_0`.
    inner_lr: Rates :math:`\alpha`: a pytree like ``params`` of
      per-parameter arrays (or scalars per leaf), or one scalar.
    x: Stream inputs, leaves ``[k, ...]``; inner step ``j`` uses ``x[j]``
      (one example: ``[k, 1, ...]``).
    y: Stream targets, leaves ``[k, ...]``.
    meta_x: Meta-batch inputs (the stream batch and replayed examples),
      leaves ``[m, ...]``.
    meta_y: Meta-batch targets.
    lr_learning_rate: :math:`\eta > 0`, the rates' SGD step size.
    first_order: Treat the inner gradients as constants.
    step_weights: Optional ``[k]`` weights of the meta-loss after each inner
      step (see :func:`maml_loss`). The authors' code averages the meta-loss
      over the ``k`` steps, ``jnp.full(k, 1 / k)``; the paper's Algorithm 1
      uses the final step only (``None``, the default).
    max_grad_norm: Optional: the weights' and the rates' meta-gradients are
      each clipped to this global norm (the authors' code uses 2.0).
    adapt_mask: Which leaves are adapted and trained (:mod:`metacf.masks`);
      the others are returned unchanged.
    key: Optional PRNG key (see :func:`maml_loss`, task 0).
    has_aux: ``loss_fn`` returns ``(loss, aux)`` (the aux is ignored).

  Returns:
    :class:`LaMamlUpdate` ``(params, inner_lr, loss)``.

  Raises:
    ValueError: if ``x``/``y`` or ``meta_x``/``meta_y`` leaves do not share
      their leading axis, ``inner_lr``/``adapt_mask`` do not match
      ``params``, ``lr_learning_rate`` or ``max_grad_norm`` is not a
      positive scalar, or ``step_weights`` is not ``[k]``.
    TypeError: if ``key`` is not a PRNG key.

  References:
    Gupta, Yadav & Paull, `La-MAML: Look-ahead Meta Learning for Continual
    Learning <https://arxiv.org/abs/2007.13904>`_, NeurIPS 2020
  """
  fn = 'lamaml_update'
  (num_steps,) = _check_stream(x, y, ('x', 'y'), fn, min_ndim=1)
  _check_stream(meta_x, meta_y, ('meta_x', 'meta_y'), fn, min_ndim=1)
  _inner.check_inner_lr(inner_lr, params, fn)
  if inner_lr is None:
    raise ValueError(f'{fn}: inner_lr must be given.')
  _check_rate(lr_learning_rate, 'lr_learning_rate', fn)
  if max_grad_norm is not None:
    _check_rate(max_grad_norm, 'max_grad_norm', fn)
  _inner.check_key(key, fn)
  mask = _inner.mask_leaves(adapt_mask, params, fn)
  # One task: the per-task loss of maml_loss without its vmap (a batch of
  # one made the matmuls batched: 1.08-1.15x a hand-written update).
  meta_loss = _loss.meta_loss_fn(
      loss_fn, params, fn, inner_lr=inner_lr, num_inner_steps=num_steps,
      first_order=first_order, adapt_mask=adapt_mask, has_aux=has_aux,
      sequential_support=True, batched=False)
  task = _loss.Task(x, y, meta_x, meta_y)
  # Task 0's key, as maml_loss derives it.
  task_key = None if key is None else jax.random.fold_in(key, 0)

  def objective(theta, rates):
    return meta_loss(theta, task, task_key, step_weights, inner_lr=rates)[0]

  loss, (grads, lr_grads) = jax.value_and_grad(objective, argnums=(0, 1))(
      params, inner_lr)
  if max_grad_norm is not None:
    clip = lambda g: optax.clip_by_global_norm(max_grad_norm).update(
        g, optax.EmptyState())[0]
    grads, lr_grads = clip(grads), clip(lr_grads)
  new_lr = jax.tree.map(
      lambda a, g: (a - jnp.asarray(lr_learning_rate, g.dtype) * g).astype(
          jnp.result_type(a)), inner_lr, lr_grads)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(new_lr)):
    step_lrs = jax.tree.map(lambda _: new_lr, params)
  else:
    step_lrs = new_lr
  leaf_mask = jax.tree.unflatten(jax.tree.structure(params), mask)
  new_params = jax.tree.map(
      lambda p, g, a, m: (p - jnp.maximum(a, 0).astype(p.dtype) * g
                          ).astype(p.dtype) if m else p,
      params, grads, step_lrs, leaf_mask)
  return LaMamlUpdate(new_params, new_lr, loss)
