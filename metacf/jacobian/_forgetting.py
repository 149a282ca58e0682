r"""Forgetting of one task predicted by the linearised model trained on another.

:func:`predicted_forgetting` runs gradient descent on task B in function space
through the empirical NTK blocks (Lee et al. 2019, Doan et al. 2021);
:func:`predicted_forgetting_low_rank` does the same through task B's top-``k``
Jacobian directions from :func:`metacf.jacobian.jacobian_svd`. Conventions in
:mod:`metacf.jacobian`.
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from metacf._src import basis as basis_lib
from metacf._src import checks
from metacf._src.types import ApplyFn, Params
from metacf.jacobian import _jacobian
from metacf.jacobian import _ntk
from metacf.jacobian import _svd

# Function-space GD steps unrolled per scan iteration: the steps are small
# matrix-vector products, and unrolling them measured ~1.4x faster to compile
# (3 and 6 steps, CPU) than a rolled scan.
_SCAN_UNROLL = 8

_LOSSES = ('mse', 'cross_entropy')
_HIGHEST = jax.lax.Precision.HIGHEST


def _task_loss(f: jax.Array, y: jax.Array, loss: str) -> jax.Array:
  """Mean over examples of the per-example loss of outputs ``f [N, C]``."""
  if loss == 'mse':
    return jnp.mean(0.5 * jnp.sum((f - y)**2, axis=1))
  log_p = jax.nn.log_softmax(f, axis=1)
  return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


def _check_task(task: Any, name: str, loss: str, apply_fn: ApplyFn,
                unravel: Callable[[jax.Array], Any], flat: jax.Array,
                fn: str) -> tuple[Any, jax.Array, int, int]:
  """Validates ``task = (x, y)``; returns x, y (as arrays), N and C."""
  if not isinstance(task, (tuple, list)) or len(task) != 2:
    raise TypeError(f'{fn}: {name} must be a pair (x, y), got '
                    f'{type(task).__name__}.')
  x, y = task
  x, n = _jacobian.as_batch(x, f'{name} x', fn)
  c = _jacobian.num_outputs(apply_fn, unravel, flat, x, n, f'{name} x', fn)
  if loss == 'mse':
    if np.shape(y) != (n, c):
      raise ValueError(
          f"{fn}: {name} targets y must have the outputs' shape [N, C] = "
          f"{(n, c)} for loss='mse', got {np.shape(y)}.")
    if not jnp.issubdtype(jnp.result_type(y), jnp.floating):
      raise TypeError(f"{fn}: {name} targets y must be floating for "
                      f"loss='mse', got {jnp.result_type(y)}.")
    return x, jnp.asarray(y), n, c
  if np.shape(y) != (n,):
    raise ValueError(
        f"{fn}: {name} labels y must have shape [N] = ({n},) for "
        f"loss='cross_entropy', got {np.shape(y)}.")
  checks.check_integer(y, f'{name} labels y', fn)
  checks.check_labels(y, c, f'{name} labels y', fn)
  return x, jnp.asarray(y), n, c


def _check_forgetting_args(apply_fn, params, task_a, task_b, lr, num_steps,
                           loss, fn):
  loss = checks.check_choice(loss, _LOSSES, 'loss', fn)
  if np.ndim(lr) != 0:
    raise ValueError(f'{fn}: lr must be a scalar, got shape {np.shape(lr)}.')
  checks.check_positive(lr, 'lr', fn)
  num_steps = checks.check_int(num_steps, 'num_steps', fn, min_value=0)
  flat, unravel = _jacobian.flatten_params(params, fn)
  x_a, y_a, n_a, c_a = _check_task(task_a, 'task_a', loss, apply_fn, unravel,
                                   flat, fn)
  x_b, y_b, n_b, c_b = _check_task(task_b, 'task_b', loss, apply_fn, unravel,
                                   flat, fn)
  if c_a != c_b:
    raise ValueError(
        f'{fn}: task_a and task_b outputs must have the same number of '
        f'outputs C, got {c_a} and {c_b}.')
  return loss, num_steps, flat, unravel, (x_a, y_a, n_a), (x_b, y_b, n_b), c_a


# g [N_B * C] -> (Theta_AB g, Theta_BB g); None when num_steps = 0.
_KernelProducts = Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None


def _function_space_gd(f_a0: jax.Array, y_a: jax.Array, f_b0: jax.Array,
                       y_b: jax.Array, kernel_products: _KernelProducts,
                       lr: Any, num_steps: int,
                       loss: str) -> jax.Array:
  """Runs the linearised dynamics; returns L_A(f_A^T) - L_A(f_A^0)."""
  if loss == 'mse':
    y_a, y_b = y_a.astype(f_a0.dtype), y_b.astype(f_b0.dtype)
  lr = jnp.asarray(lr).astype(f_b0.dtype)
  grad_b = jax.grad(lambda f: _task_loss(f, y_b, loss))  # Includes the 1/N_B.

  def step(carry, _):
    f_a, f_b = carry
    g = grad_b(f_b).reshape(-1)
    step_a, step_b = kernel_products(g)
    return (f_a - lr * step_a.reshape(f_a.shape),
            f_b - lr * step_b.reshape(f_b.shape)), None

  f_a = f_a0
  if 0 < num_steps <= _SCAN_UNROLL:
    # A Python loop: differentiated, a short scan measured ~2x slower.
    carry = (f_a0, f_b0)
    for _ in range(num_steps):
      carry, _ = step(carry, None)
    f_a = carry[0]
  elif num_steps:
    (f_a, _), _ = jax.lax.scan(step, (f_a0, f_b0), None, length=num_steps,
                               unroll=_SCAN_UNROLL)
  return _task_loss(f_a, y_a, loss) - _task_loss(f_a0, y_a, loss)


def predicted_forgetting(apply_fn: ApplyFn, params: Params, task_a: Any,
                         task_b: Any, *, lr: Any, num_steps: int,
                         loss: str = 'mse',
                         chunk_size: int | None = None,
                         protect_basis: jax.Array | None = None
                         ) -> jax.Array:
  r"""Forgetting of task A predicted for gradient descent on task B.

  Training on B by full-batch gradient descent
  :math:`\theta \leftarrow \theta - \eta \nabla_\theta L_B(\theta)` is
  replaced by its linearisation at ``params`` (Lee et al. 2019), which moves
  the outputs in function space through the empirical NTK blocks
  :math:`\Theta_{BB} = J_B J_B^\top` and :math:`\Theta_{AB} = J_A J_B^\top`:

  .. math::
    f_B \leftarrow f_B - \eta\, \Theta_{BB} \nabla_f L_B(f_B), \qquad
    f_A \leftarrow f_A - \eta\, \Theta_{AB} \nabla_f L_B(f_B),

  for ``num_steps`` steps from :math:`f^0 = f(\theta_0)`, and the result is
  :math:`L_A(f_A) - L_A(f_A^0)` (positive: task A got worse). The task loss
  is the mean over examples of the per-example loss, so
  :math:`\nabla_f L_B` carries the :math:`1 / N_B`. Per-example losses:
  ``'mse'``, :math:`\tfrac12 \sum_c (f_c - y_c)^2` with ``y [N, C]``;
  ``'cross_entropy'``, :math:`-\log \mathrm{softmax}(f)_y` with integer
  labels ``y [N]``. For a model linear in its parameters the prediction is
  exact. ``num_steps = 0`` gives 0.

  With ``protect_basis`` :math:`V \in \mathbb{R}^{k \times P}` (orthonormal
  rows, e.g. task A's :attr:`JacobianSVD.vt`), B is trained with its
  gradients projected by :func:`metacf.protect.orthogonal_projection`,
  :math:`\Delta\theta = -\eta P J_B^\top \nabla_f L_B` with :math:`P = I -
  V^\top V`, so the blocks become :math:`\Theta_{BB} = J_B P J_B^\top` and
  :math:`\Theta_{AB} = J_A P J_B^\top`. They are computed matrix-free like
  the plain ones (each column's VJP is projected before its JVPs, ``4kP``
  extra flops per column), and the prediction is again exact for a model
  linear in its parameters. ``V`` spanning all of A's Jacobian rows
  predicts no forgetting at all.

  Differentiable with respect to ``params`` (``jax.grad``, also with
  ``protect_basis``, which is then held fixed): the gradient of the
  prediction, e.g. to train against the forgetting it predicts (tested
  against finite differences in float64). ``lr`` may be differentiated too.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, C]``.
    params: Parameter pytree :math:`\theta_0` (floating).
    task_a: ``(x_a, y_a)``, the task whose loss change is predicted.
    task_b: ``(x_b, y_b)``, the task trained on.
    lr: Learning rate :math:`\eta > 0` (may be traced).
    num_steps: Gradient steps on B (static Python int, >= 0).
    loss: ``'mse'`` or ``'cross_entropy'`` (static).
    chunk_size: Examples of task B per block of NTK columns, as in
      :func:`ntk` (``'ntk_vector_products'``, which this uses; both blocks
      share each column's VJP). With ``num_steps < N_B * C`` no block is
      built (each step applies them as :math:`J_A (P J_B^\top g)`, one VJP
      and two JVPs, fewer products than the blocks' one VJP and two JVPs
      per column) and ``chunk_size`` is unused.
    protect_basis: None, or ``[k, P]`` with orthonormal rows in
      ``ravel_pytree(params)`` order: B's gradients are projected off their
      span (may be traced; concrete bases are checked for orthonormality).

  Returns:
    The predicted change of :math:`L_A`, a scalar.

  Raises:
    ValueError: on an unknown ``loss``, ``lr <= 0``, ``num_steps < 0``,
      targets of the wrong shape (``[N, C]`` for mse, ``[N]`` for
      cross-entropy), labels outside ``[0, C)`` (values: see
      :mod:`metacf.checks`), tasks whose inputs have
      no leading example axis, or a ``protect_basis`` that is not ``[k, P]``
      with orthonormal rows.
    TypeError: if a task is not a pair, labels are not integers or
      ``protect_basis`` is not floating.

  References:
    Jacot et al., `Neural Tangent Kernel <https://arxiv.org/abs/1806.07572>`_,
    2018; Lee et al., `Wide Neural Networks of Any Depth Evolve as Linear
    Models Under Gradient Descent <https://arxiv.org/abs/1902.06720>`_, 2019;
    Doan et al., `A Theoretical Analysis of Catastrophic Forgetting through
    the NTK Overlap Matrix <https://arxiv.org/abs/2010.04003>`_, AISTATS 2021
  """
  fn = 'predicted_forgetting'
  loss, num_steps, flat, unravel, (x_a, y_a, _), (x_b, y_b, n_b), c = (
      _check_forgetting_args(apply_fn, params, task_a, task_b, lr, num_steps,
                             loss, fn))
  if chunk_size is not None:
    chunk_size = checks.check_int(chunk_size, 'chunk_size', fn, min_value=1)
  direction_fn = None
  if protect_basis is not None:
    basis_lib.check_basis(protect_basis, flat.size, 'protect_basis', fn)
    basis = jnp.asarray(protect_basis)
    direction_fn = lambda v: basis_lib.project_out(basis, v)
  if num_steps == 0:
    return _function_space_gd(apply_fn(params, x_a), y_a,
                              apply_fn(params, x_b), y_b, None, lr, 0, loss)
  if num_steps < n_b * c:
    # Fewer steps than NTK columns: each step's products by one VJP and two
    # JVPs, Theta g = J_A (P J_B^T g), instead of building the blocks (one
    # VJP and two JVPs per column). Same maths, float rounding apart.
    # On the params pytree, not the flat vector: differentiated (jax.grad
    # of the prediction), the flat vector's slices fused into the matmuls
    # and measured 50x slower on CPU.
    # The forward passes come from the linearisations (no extra ones); one
    # step needs no J_B v (f_B's update is never read).
    f_a0, f_a_jvp = jax.linearize(lambda p: apply_fn(p, x_a), params)
    f_b_fn = lambda p: apply_fn(p, x_b)
    f_b0, f_b_vjp = jax.vjp(f_b_fn, params)
    f_b_jvp = (jax.linearize(f_b_fn, params)[1] if num_steps > 1
               else lambda v: jnp.zeros_like(f_b0))

    def matrix_free(g):
      (v,) = f_b_vjp(g.reshape(f_b0.shape).astype(f_b0.dtype))
      if direction_fn is not None:
        v = unravel(direction_fn(ravel_pytree(v)[0]))
      return f_a_jvp(v).reshape(-1), f_b_jvp(v).reshape(-1)

    return _function_space_gd(f_a0, y_a, f_b0, y_b, matrix_free, lr,
                              num_steps, loss)
  f_a0 = apply_fn(params, x_a)
  f_b0 = apply_fn(params, x_b)
  # Both blocks from one pass over the columns (the VJPs of f_B are shared).
  theta_ab, theta_bb = _ntk.ntk_vector_products(
      [_jacobian.flat_fn(apply_fn, unravel, x_a),
       _jacobian.flat_fn(apply_fn, unravel, x_b)],
      _jacobian.flat_fn(apply_fn, unravel, x_b), flat, (n_b, c), chunk_size,
      direction_fn)
  blocks = lambda g: (jnp.matmul(theta_ab, g, precision=_HIGHEST),
                      jnp.matmul(theta_bb, g, precision=_HIGHEST))
  return _function_space_gd(f_a0, y_a, f_b0, y_b, blocks, lr, num_steps,
                            loss)


def _no_gradient_through(value: jax.Array, flat: jax.Array,
                         message: str) -> jax.Array:
  """``value``, unchanged; differentiating it with respect to ``flat`` raises
  ``message`` (``value`` is computed without a gradient path)."""

  @jax.custom_vjp
  def guard(value, flat):
    del flat
    return value

  def fwd(value, flat):
    del flat
    return value, None

  def bwd(_, cotangent):
    del cotangent
    raise ValueError(message)

  guard.defvjp(fwd, bwd)
  return guard(value, flat)


def predicted_forgetting_low_rank(
    apply_fn: ApplyFn, params: Params, task_a: Any, task_b: Any, *, k: int,
    lr: Any, num_steps: int, loss: str = 'mse', method: str = 'auto',
    key: jax.Array | None = None, krylov_dim: int | None = None,
    block_size: int | None = None, oversampling: int | None = None,
    num_power_iters: int | None = None,
    chunk_size: int | None = None) -> jax.Array:
  r""":func:`predicted_forgetting` through task B's top-``k`` directions.

  With the top-``k`` SVD :math:`J_B \approx U_B S_B V_B` (from
  :func:`jacobian_svd`), every parameter update of the linearised model is
  projected onto the span of :math:`V_B`,
  :math:`\Delta\theta = -\eta V_B^\top V_B J_B^\top \nabla_f L_B`, which
  replaces the NTK blocks of :func:`predicted_forgetting` by the rank-``k``
  overlap-matrix forms of Doan et al. 2021:

  .. math::
    \Theta_{BB} \approx (J_B V_B^\top)(J_B V_B^\top)^\top
      = U_B S_B^2 U_B^\top, \qquad
    \Theta_{AB} \approx (J_A V_B^\top)(J_B V_B^\top)^\top
      = J_A V_B^\top S_B U_B^\top.

  :math:`J_A V_B^\top` and :math:`J_B V_B^\top` are computed with ``k``
  batched JVPs each, so the middle equalities hold for any orthonormal
  :math:`V_B` and the prediction is exactly that of gradient descent
  projected onto :math:`\mathrm{span}(V_B)` for a model linear in its
  parameters. With ``k = min(N_B * C, P)`` and :math:`J_B` of full rank the
  projection keeps every gradient, and the result equals
  :func:`predicted_forgetting`. The error usually shrinks as ``k`` grows,
  but it need not be monotone.

  Differentiable with respect to ``params`` (``jax.grad``) with
  ``method='dense'`` or ``'gram'`` (an exact SVD/eigendecomposition: the
  derivative of the top-``k`` subspace needs a gap
  :math:`\sigma_k > \sigma_{k+1}`) and ``'subspace_iteration'`` (the
  derivative of its fixed number of power iterations); tested against
  finite differences in float64. ``method='randomized'`` stops when its
  Krylov space has converged (a ``lax.while_loop``), which reverse mode
  cannot differentiate: ``jax.grad`` then raises a ``ValueError`` naming
  ``method``. ``'auto'`` picks ``'randomized'`` only for ``N_B * C > 4096``
  with a ``key``.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, C]``.
    params: Parameter pytree :math:`\theta_0` (floating).
    task_a: ``(x_a, y_a)``, the task whose loss change is predicted.
    task_b: ``(x_b, y_b)``, the task trained on.
    k: Rank, ``1 <= k <= min(N_B * C, P)`` (static).
    lr: Learning rate :math:`\eta > 0` (may be traced).
    num_steps: Gradient steps on B (static Python int, >= 0).
    loss: ``'mse'`` or ``'cross_entropy'`` (static).
    method: SVD method for task B, see :func:`jacobian_svd`.
    key: Key for ``method='randomized'`` (see :func:`jacobian_svd`).
    krylov_dim: See :func:`jacobian_svd`.
    block_size: See :func:`jacobian_svd`.
    oversampling: See :func:`jacobian_svd`.
    num_power_iters: See :func:`jacobian_svd`.
    chunk_size: Forwarded to :func:`jacobian_svd`.

  Returns:
    The predicted change of :math:`L_A`, a scalar.

  Raises:
    ValueError: as :func:`predicted_forgetting`, and if ``k`` is outside
      ``[1, min(N_B * C, P)]``, ``method`` is unknown or ``key`` is missing
      for the randomized method.
    TypeError: as :func:`predicted_forgetting`.

  References:
    Doan et al., `A Theoretical Analysis of Catastrophic Forgetting through
    the NTK Overlap Matrix <https://arxiv.org/abs/2010.04003>`_, AISTATS 2021;
    Lee et al., `Wide Neural Networks of Any Depth Evolve as Linear Models
    Under Gradient Descent <https://arxiv.org/abs/1902.06720>`_, 2019;
    Halko, Martinsson & Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, 2011
  """
  fn = 'predicted_forgetting_low_rank'
  loss, num_steps, flat, unravel, (x_a, y_a, _), (x_b, y_b, n_b), c = (
      _check_forgetting_args(apply_fn, params, task_a, task_b, lr, num_steps,
                             loss, fn))
  k = _svd.check_rank(k, n_b * c, flat.size, fn)
  resolved = _svd.check_svd_options(
      method, key, oversampling, num_power_iters, n_b * c, flat.size, fn,
      k=k, krylov_dim=krylov_dim, block_size=block_size).method
  if num_steps == 0:
    return _function_space_gd(apply_fn(params, x_a), y_a,
                              apply_fn(params, x_b), y_b, None, lr, 0, loss)
  svd_params = (jax.lax.stop_gradient(params) if resolved == 'randomized'
                else params)
  svd_b = _svd.jacobian_svd(apply_fn, svd_params, x_b, k, method=method,
                            key=key, krylov_dim=krylov_dim,
                            block_size=block_size, oversampling=oversampling,
                            num_power_iters=num_power_iters,
                            chunk_size=chunk_size)
  vt_b = svd_b.vt
  if resolved == 'randomized':
    vt_b = _no_gradient_through(
        vt_b, flat,
        f"{fn}: method='randomized' (the Krylov SVD stops at convergence, a "
        "lax.while_loop) cannot be differentiated in reverse mode with "
        "respect to params; use method='gram', 'dense' or "
        "'subspace_iteration' under jax.grad.")
  f_a0, f_a_jvp = jax.linearize(_jacobian.flat_fn(apply_fn, unravel, x_a),
                                flat)
  f_b0, f_b_jvp = jax.linearize(_jacobian.flat_fn(apply_fn, unravel, x_b),
                                flat)
  # J V_B^T, shape [N * C, k], by k batched JVPs.
  g_a = jax.vmap(lambda v: f_a_jvp(v).reshape(-1))(vt_b).T
  g_b = jax.vmap(lambda v: f_b_jvp(v).reshape(-1))(vt_b).T

  def coefficients(g):  # (J_B V_B^T)^T g, shape [k].
    return jnp.matmul(g_b.T, g, precision=_HIGHEST)

  products = lambda g: (
      jnp.matmul(g_a, coefficients(g), precision=_HIGHEST),
      jnp.matmul(g_b, coefficients(g), precision=_HIGHEST))
  return _function_space_gd(f_a0, y_a, f_b0, y_b, products, lr,
                            num_steps, loss)
