r"""Gradient Projection Memory (Saha et al. 2021): layer-wise input bases.

For a layer :math:`y = x W` the gradient is :math:`\nabla_W L = x^\top
\delta`: its columns lie in the span of the layer's inputs. GPM keeps, per
layer, an orthonormal basis :math:`M` of the input space that earlier tasks
used (from the SVD of their representations, :func:`gpm_basis`) and removes
that span from later gradients (:func:`gpm_projection`), so the layer's
response to earlier tasks' inputs does not change.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import basis as basis_lib
from metacf._src import checks

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_threshold(threshold: Any, fn: str) -> float:
  value = checks.static_value(threshold)
  if value is None or not 0 < value < 1:
    raise ValueError(f'{fn}: threshold must be a number in (0, 1), got '
                     f'{threshold!r}.')
  return value


def gpm_basis(representation: jax.Array, threshold: float,
              basis: jax.Array | None = None) -> jax.Array:
  r"""Grows a layer's GPM basis with one task's representation matrix.

  ``representation`` :math:`R \in \mathbb{R}^{d \times n}` holds the layer's
  inputs for ``n`` examples of the task as columns (Saha et al. use a few
  hundred). With :math:`\epsilon` = ``threshold``:

  * First task (``basis=None``): with :math:`R = U S V^\top`, keep the
    first :math:`r = \#\{i : \sum_{j \le i} s_j^2 / \sum_j s_j^2 <
    \epsilon\}` left singular vectors (Saha et al., Eq. 5 and their code).
  * Later tasks: :math:`\hat R = R - M M^\top R`, :math:`\hat R = \hat U
    \hat S \hat V^\top`. The energy already captured is
    :math:`\|R\|_F^2 - \|\hat R\|_F^2`; residual directions
    :math:`\hat u_0, \hat u_1, \ldots` are added while
    :math:`(\|R\|_F^2 - \|\hat R\|_F^2 + \sum_{\text{added}} \hat s_j^2) /
    \|R\|_F^2 < \epsilon` (Eq. 8-9), so none when the basis already holds
    an :math:`\epsilon` share (the loop of Saha et al.'s released code;
    it adds the direction that crosses :math:`\epsilon`, where the
    first-task count stops just below it), and the basis becomes :math:`[M, \hat U_{:,
    :r}]`, truncated to at most ``d`` columns.

  The number of columns depends on the data, so this runs eagerly, in
  float64 NumPy (``d`` and ``n`` are layer widths and sample counts, so the
  SVD is small). Saha et al. raise :math:`\epsilon` over tasks (PMNIST:
  0.95 for the first layer, 0.99 for the others).

  Args:
    representation: ``[d, n]``, one column per example.
    threshold: :math:`\epsilon \in (0, 1)`.
    basis: ``[d, r0]`` with orthonormal columns from earlier tasks, or None.
      Checked like :func:`extend_basis` checks its rows (a probe of
      :math:`4 d r_0` flops): the columns must be orthonormal (the
      unpadded basis: zero columns pass the check but stay in the output).

  Returns:
    ``[d, r]`` with orthonormal columns, ``basis``' columns first, in the
    dtype of ``representation``.

  Raises:
    ValueError: if ``threshold`` is not in (0, 1), ``representation`` is
      not 2-D or not finite, or ``basis`` is not ``[d, r0]``, not finite or
      its columns are not orthonormal.
    TypeError: if ``basis`` is not floating.

  References:
    Saha, Garg & Roy, `Gradient Projection Memory for Continual Learning
    <https://arxiv.org/abs/2103.09762>`_, ICLR 2021
  """
  fn = 'gpm_basis'
  if checks.is_traced(representation) or checks.is_traced(basis):
    raise TypeError(f'{fn}: representation and basis must be concrete '
                    'arrays (the number of columns depends on their values, '
                    'so it cannot run under jit), got a tracer.')
  epsilon = _check_threshold(threshold, fn)
  if np.ndim(representation) != 2:
    raise ValueError(f'{fn}: representation must have shape [d, n] (one '
                     f'column per example), got shape '
                     f'{np.shape(representation)}.')
  dtype = jnp.result_type(representation)
  r = np.asarray(representation, np.float64)
  if not np.all(np.isfinite(r)):
    raise ValueError(f'{fn}: representation must be finite, got NaN or inf.')
  d = r.shape[0]
  total = float(np.sum(r**2))
  if basis is None:
    if total == 0:
      return jnp.zeros((d, 0), dtype)
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    rank = int(np.sum(np.cumsum(s**2) / total < epsilon))
    return jnp.asarray(u[:, :rank], dtype)
  if np.ndim(basis) != 2 or np.shape(basis)[0] != d:
    raise ValueError(f'{fn}: basis must have shape [d, r] = [{d}, r] (the '
                     "representation's d rows), got shape "
                     f'{np.shape(basis)}.')
  if not np.all(np.isfinite(np.asarray(basis))):
    raise ValueError(f'{fn}: basis must be finite, got NaN or inf.')
  basis_lib.check_basis(basis, d, 'basis', fn, columns=True)
  m = np.asarray(basis, np.float64)
  if total == 0:
    return jnp.asarray(m, dtype)
  residual = r - m @ (m.T @ r)
  u, s, _ = np.linalg.svd(residual, full_matrices=False)
  captured = (total - float(np.sum(residual**2))) / total
  # Direction i is added iff the share before it is still below epsilon.
  before = captured + np.concatenate([[0.], np.cumsum(s**2)[:-1]]) / total
  rank = int(np.sum(before < epsilon))
  out = np.concatenate([m, u[:, :rank]], axis=1)[:, :d]
  return jnp.asarray(out, dtype)


class GpmProjectionState(NamedTuple):
  """State of :func:`gpm_projection`: the per-leaf bases it projects out."""
  bases: Any  # the params' tree; leaves None, [d_in, r] or [d_in, d_in].


def gpm_projector(basis: jax.Array) -> jax.Array:
  r"""The projection matrix :math:`M M^\top` ``[d, d]`` of a GPM basis.

  Saha et al.'s released code keeps this matrix (``feature_mat``), not
  :math:`M`, and projects with one product per step: pass it to
  :func:`gpm_projection` with ``projectors=True``. Zero (padding) columns
  of ``basis`` add nothing, so a padded basis gives the same matrix.

  >>> import jax.numpy as jnp
  >>> import metacf
  >>> m = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # one column + pad
  >>> metacf.protect.gpm_projector(m)
  Array([[1., 0., 0.],
         [0., 0., 0.],
         [0., 0., 0.]], dtype=float32)

  Args:
    basis: ``[d, r]`` with orthonormal (or zero) columns, from
      :func:`gpm_basis`.

  Returns:
    ``[d, d]``, symmetric and idempotent.

  Raises:
    ValueError: if ``basis`` is not 2-D with orthonormal or zero columns.
    TypeError: if it is not floating.
  """
  basis_lib.check_basis(basis, None, 'basis', 'gpm_projector', columns=True)
  m = jnp.asarray(basis)
  return jnp.matmul(m, m.T, precision=_HIGHEST)


def _projector_error(q: Any) -> Any:
  """``max(|Q Q p - Q p|, |Q^T p - Q p|) / max |p|`` for a fixed random p."""
  q = jnp.asarray(q)
  p = np.random.default_rng(0).standard_normal(q.shape[0]).astype(q.dtype)
  once = jnp.matmul(q, p, precision=_HIGHEST)
  err = jnp.maximum(
      jnp.max(jnp.abs(jnp.matmul(q, once, precision=_HIGHEST) - once)),
      jnp.max(jnp.abs(jnp.matmul(p, q, precision=_HIGHEST) - once))
  ) / np.max(np.abs(p))
  return err if checks.is_traced(err) else float(err)


def _check_projector(q: Any, name: str, fn: str) -> None:
  shape = np.shape(q)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f'{fn}: {name} must be a square [d_in, d_in] projection '
                     f'matrix (projectors=True), got shape {shape}.')
  dtype = jnp.result_type(q)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{fn}: {name} must be floating, got dtype {dtype}.')
  message = (f'{fn}: {name} must be a symmetric idempotent matrix M M^T '
             '(gpm_projector), got max(|Q Q p - Q p|, |Q^T p - Q p|) / '
             'max |p| = {err:.3g} for a random p (tolerance '
             f'{basis_lib.ORTHONORMAL_TOL:g}).')
  ok = lambda xp, err: err <= basis_lib.ORTHONORMAL_TOL  # False for NaN too.
  if checks.is_traced(q):
    checks.value_check([q], lambda xp, v: {'err': _projector_error(v)}, ok,
                       message)
    return
  err = _projector_error(q)
  if not ok(np, err):
    raise ValueError(message.format(err=err))


def gpm_projection(bases: Any, *, projectors: bool = False
                   ) -> optax.GradientTransformation:
  r"""Removes each kernel's protected input span from its updates.

  For a leaf with basis :math:`M \in \mathbb{R}^{d_\mathrm{in} \times r}`
  and a kernel ``W [..., d_out]`` (dense ``[d_in, d_out]``, conv ``[kh, kw,
  c_in, c_out]`` so that :math:`d_\mathrm{in} = k_h k_w c_\mathrm{in}`, the
  im2col patch size), the update reshaped to :math:`G \in
  \mathbb{R}^{d_\mathrm{in} \times d_\mathrm{out}}` becomes :math:`G - M
  M^\top G` (Saha et al. 2021, Eq. 10); leaves whose basis is ``None``
  (biases, norms, the head) pass unchanged. This is flax's layout (nnx and
  linen kernels are ``[d_in, d_out]``; build ``bases`` with
  ``jax.tree_util.tree_map_with_path`` over the params, as in
  ``tests/test_interop.py``); equinox's ``Linear.weight`` is ``[d_out,
  d_in]`` and is not handled. Put it first in the chain, as
  with :func:`orthogonal_projection`:

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import optax
  >>> import metacf
  >>> params = {'dense1': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.zeros(3)}}
  >>> inputs = jax.random.normal(jax.random.key(0), (4, 50))  # [d_in, n]
  >>> m1 = metacf.protect.gpm_basis(inputs, 0.97)            # [d_in, r]
  >>> bases = {'dense1': {'kernel': m1, 'bias': None}}       # params' tree
  >>> tx = optax.chain(metacf.protect.gpm_projection(bases), optax.sgd(0.01))
  >>> opt_state = tx.init(params)
  >>> m1.shape[0]
  4

  **The bases live in the state** (:class:`GpmProjectionState`, field
  ``bases``): ``init`` puts them there and ``update`` reads them from
  there, so a jitted step that takes the optimizer state as an argument
  compiles once for every set of bases of the same shapes and holds none of
  them as constants. Swap them between tasks with
  ``optax.tree.set(opt_state, bases=new_bases)`` (a whole tree, ``None``
  leaves where they were). GPM's bases grow from task to task: keep one
  shape by zero padding, e.g. ``[d_in, d_in]`` (or ``[d_in, r_max]``) with
  :func:`gpm_basis`' columns first and zero columns after (zero columns
  project nothing):

  >>> import functools
  >>> import numpy as np
  >>> padded = {'dense1': {'kernel': np.zeros((4, 4), np.float32),
  ...                      'bias': None}}                 # [d_in, d_in]
  >>> tx = optax.chain(metacf.protect.gpm_projection(padded), optax.sgd(0.1))
  >>> opt_state = tx.init(params)
  >>> @functools.partial(jax.jit, donate_argnums=(0, 1))
  ... def step(params, opt_state, grads):
  ...   updates, opt_state = tx.update(grads, opt_state, params)
  ...   return optax.apply_updates(params, updates), opt_state
  >>> m = None
  >>> for task in range(2):
  ...   grads = jax.tree.map(jnp.ones_like, params)
  ...   params, opt_state = step(params, opt_state, grads)  # train on the task
  ...   representation = jax.random.normal(jax.random.key(task), (4, 2))
  ...   m = metacf.protect.gpm_basis(representation, 0.97, m)
  ...   padded['dense1']['kernel'][:, :m.shape[1]] = m
  ...   opt_state = optax.tree.set(
  ...       opt_state, bases=jax.tree.map(jnp.asarray, padded))
  >>> m.shape, step._cache_size()                           # one compile
  ((4, 2), 1)

  Swapped bases are checked for their shapes when ``update`` is traced,
  and for orthonormal columns and finiteness only with runtime checks on
  (:mod:`metacf.checks`). Donate the optimizer state to a jitted step, as
  for :func:`orthogonal_projection`: otherwise each call copies the bases
  into the state it returns.

  Args:
    bases: A pytree with the params' structure whose leaves are ``None`` or
      ``[d_in, r]`` arrays with orthonormal columns (from :func:`gpm_basis`;
      zero columns allowed): the initial state. Concrete bases are checked
      for orthonormal columns (a probe of :math:`4 d_\mathrm{in} r` flops).
    projectors: If True, the leaves are the projection matrices
      :math:`Q = M M^\top` ``[d_in, d_in]`` (:func:`gpm_projector`) and the
      update is :math:`G - Q G`: one product of :math:`2 d_\mathrm{in}^2
      d_\mathrm{out}` flops instead of two of :math:`2 d_\mathrm{in} r
      d_\mathrm{out}`, cheaper once :math:`r > d_\mathrm{in} / 2` and
      for bases zero-padded to :math:`d_\mathrm{in}` columns (what Saha
      et al.'s code keeps). The result is the same up to rounding. Concrete
      matrices are checked to be symmetric and idempotent (a probe).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`GpmProjectionState`; ``init`` and ``update`` raise
    ``ValueError`` if the params/updates do not have ``bases``' structure
    or a basis' ``d_in`` does not match its leaf.

  Raises:
    ValueError: if a leaf of ``bases`` is not ``None`` or a 2-D array with
      orthonormal columns.
    TypeError: if a basis is not floating.

  References:
    Saha, Garg & Roy, `Gradient Projection Memory for Continual Learning
    <https://arxiv.org/abs/2103.09762>`_, ICLR 2021
  """
  fn = 'gpm_projection'

  def check_leaf(m, path):
    name = f'bases{jax.tree_util.keystr(path)}'
    if projectors:
      _check_projector(m, name, fn)
    else:
      basis_lib.check_basis(m, None, name, fn, columns=True)

  for path, m in jax.tree_util.tree_leaves_with_path(bases, is_leaf=_is_none):
    if m is not None:
      check_leaf(m, path)
  initial = jax.tree.map(lambda m: None if m is None else jnp.asarray(m),
                         bases, is_leaf=_is_none)

  def check(state_bases, tree, name):
    want = jax.tree.structure(state_bases, is_leaf=_is_none)
    leaves = want.flatten_up_to(tree) if _prefix_ok(want, tree) else None
    if leaves is None:
      raise ValueError(
          f'{fn}: {name} must have the structure of bases, got '
          f'{jax.tree.structure(tree)} and bases {want}.')
    for (path, m), leaf in zip(jax.tree_util.tree_leaves_with_path(
        state_bases, is_leaf=_is_none), leaves):
      if m is None:
        continue
      shape = np.shape(leaf)
      d_in = int(np.prod(shape[:-1])) if len(shape) >= 2 else None
      if projectors and np.shape(m) != (d_in, d_in):
        raise ValueError(
            f'{fn}: bases{jax.tree_util.keystr(path)} must have shape '
            f'[d_in, d_in] with d_in = prod(kernel.shape[:-1]) for the '
            f'kernel of shape {shape} (projectors=True), got shape '
            f'{np.shape(m)}.')
      if np.ndim(m) != 2 or d_in != np.shape(m)[0]:
        raise ValueError(
            f'{fn}: bases{jax.tree_util.keystr(path)} must have shape '
            f'[d_in, r] with d_in = prod(kernel.shape[:-1]) rows for the '
            f'kernel of shape {shape}, got shape {np.shape(m)}.')

  def init_fn(params):
    check(initial, params, 'params')
    # Copies: the state owns its buffers (see orthogonal_projection).
    return GpmProjectionState(bases=jax.tree.map(
        lambda m: jnp.array(m, copy=True), initial))

  def project(m, g):
    if m is None:
      return g
    g2 = g.reshape(m.shape[0], g.shape[-1])
    m = m.astype(g.dtype)
    if projectors:
      return (g2 - jnp.matmul(m, g2, precision=_HIGHEST)).reshape(g.shape)
    g2 = g2 - jnp.matmul(m, jnp.matmul(m.T, g2, precision=_HIGHEST),
                         precision=_HIGHEST)
    return g2.reshape(g.shape)

  def update_fn(updates, state, params=None):
    del params
    if not hasattr(state, 'bases'):
      raise ValueError(f'{fn}: state must be the GpmProjectionState that '
                       f'init returns, got {type(state).__name__}.')
    check(state.bases, updates, 'updates')
    if checks.runtime_checks_enabled():  # Opt-in: a 4 d r flops probe.
      for path, m in jax.tree_util.tree_leaves_with_path(
          state.bases, is_leaf=_is_none):
        if m is not None:
          check_leaf(m, path)
    return jax.tree.map(project, state.bases, updates,
                        is_leaf=_is_none), state

  return optax.GradientTransformation(init_fn, update_fn)


def _is_none(x: Any) -> bool:
  return x is None


def _prefix_ok(treedef: Any, tree: Any) -> bool:
  try:
    treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    return False
  return True
