r"""Gradient projections: orthogonal to a basis (OGD, PCA-OGD) and A-GEM.

Parameter-space vectors are flattened in ``jax.flatten_util.ravel_pytree``
order, the order of :attr:`metacf.jacobian.JacobianSVD.vt` and of the
Jacobian columns in :mod:`metacf.jacobian`, so the top right singular
vectors of a task's Jacobian are a basis to protect as they are.
"""

from typing import Any, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import basis as basis_lib
from metacf._src import checks

_HIGHEST = jax.lax.Precision.HIGHEST


class OrthogonalProjectionState(NamedTuple):
  """State of :func:`orthogonal_projection`: the basis it projects out."""
  basis: jax.Array  # shape=[k, P], orthonormal (or zero) rows.


def _num_params(tree: Any) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def orthogonal_projection(basis: jax.typing.ArrayLike
                          ) -> optax.GradientTransformation:
  r"""Projects updates onto the orthogonal complement of ``basis``' rows.

  With the updates flattened to :math:`g \in \mathbb{R}^P`
  (``ravel_pytree`` order), :math:`g \leftarrow g - V^\top (V g)`. Chained
  before an optimizer, a first-order step then leaves the outputs whose
  gradients span the rows of :math:`V` unchanged: orthogonal gradient
  descent (OGD, Farajtabar et al. 2020) with :math:`V` the orthonormalised
  output gradients of earlier tasks, PCA-OGD (Doan et al. 2021) with their
  top principal directions, e.g. :attr:`metacf.jacobian.JacobianSVD.vt`:

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import optax
  >>> import metacf
  >>> apply_fn = lambda p, x: jnp.tanh(x @ p['w1']) @ p['w2']
  >>> params = {'w1': jnp.ones((4, 8)) / 4, 'w2': jnp.ones((8, 3)) / 8}
  >>> x_a = jnp.arange(20.0).reshape(5, 4) / 20
  >>> svd_a = metacf.jacobian.jacobian_svd(apply_fn, params, x_a, 3)
  >>> tx = optax.chain(metacf.protect.orthogonal_projection(svd_a.vt),
  ...                  optax.sgd(0.01))
  >>> opt_state = tx.init(params)
  >>> type(opt_state[0]).__name__
  'OrthogonalProjectionState'

  Put it first in the chain: momentum or Adam after it act on projected
  gradients (their output then also stays in the complement for SGD with
  momentum, not for Adam's per-coordinate scaling). The update is two
  matrix-vector products, :math:`4kP` flops.

  **The basis lives in the state** (:class:`OrthogonalProjectionState`,
  field ``basis``): ``init`` puts ``basis`` there and ``update`` reads it
  from there, as ``optax.inject_hyperparams`` keeps a learning rate. A
  jitted step that takes the optimizer state as an argument therefore
  compiles once for every basis of the same shape and dtype, and its
  program does not hold :math:`V` (no :math:`kP` constant). Between tasks,
  swap the basis by its field name,
  ``opt_state = optax.tree.set(opt_state, basis=new_basis)``.

  A basis that grows from task to task keeps one shape by zero padding:
  allocate ``k_max`` rows of zeros (zero rows project nothing), fill the
  first rows as tasks come (:func:`extend_basis` returns orthonormal rows)
  and swap the padded array in with ``optax.tree.set``; the jitted step
  compiles once:

  >>> import functools
  >>> import numpy as np
  >>> params = jnp.zeros(6)
  >>> padded = np.zeros((4, 6), np.float32)                # k_max = 4 rows
  >>> tx = optax.chain(metacf.protect.orthogonal_projection(padded),
  ...                  optax.sgd(0.1))
  >>> opt_state = tx.init(params)
  >>> @functools.partial(jax.jit, donate_argnums=(0, 1))
  ... def step(params, opt_state, grads):
  ...   updates, opt_state = tx.update(grads, opt_state, params)
  ...   return optax.apply_updates(params, updates), opt_state
  >>> grown = None
  >>> for task in range(3):
  ...   grads = jax.random.normal(jax.random.key(task), (6,))
  ...   params, opt_state = step(params, opt_state, grads)  # train on the task
  ...   grown = metacf.protect.extend_basis(grown, grads[None])
  ...   padded[:grown.shape[0]] = grown
  ...   opt_state = optax.tree.set(opt_state, basis=jnp.asarray(padded))
  >>> grown.shape, step._cache_size()                     # one compile
  ((3, 6), 1)

  Donate the optimizer state to the step (``jax.jit(step,
  donate_argnums=(0, 1))`` for ``step(params, opt_state, ...)``): ``update``
  returns the basis unchanged in the new state, and a jitted function that
  returns an input it was not given to keep copies it, :math:`4kP` bytes
  per call, which can dominate an SGD step (see the benchmarks page). A
  donated basis is consumed: swap in a fresh array
  (``jnp.asarray(padded)``), not one you use afterwards.

  A swapped basis is checked for its shape when ``update`` is traced, and
  for orthonormality and finiteness only with runtime checks on
  (:mod:`metacf.checks`; the probe costs another :math:`4kP` flops per
  step); pass the same dtype (a new dtype is a new trace).
  If the chain holds several transformations with a ``basis`` field,
  ``optax.tree.set``'s ``filtering`` argument picks one by its path.

  Args:
    basis: ``[k, P]`` with orthonormal rows (``k = 0`` projects nothing);
      rows that are all zero are allowed and project nothing, so a basis
      that grows between tasks can keep a fixed shape. The initial state.
      A concrete basis is checked for orthonormality by a cheap probe
      (:math:`4kP` flops); ``init`` puts a copy of it in the state (so a
      donated state never consumes ``basis``); it is cast to the updates'
      dtype in ``update``.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`OrthogonalProjectionState`. ``init(params)`` and
    ``update(updates, state)`` raise ``ValueError`` if the params or updates
    do not have ``P`` numbers in all (at trace time, under ``jit``), or if
    ``state.basis`` is not ``[k, P]``.

  Raises:
    ValueError: if ``basis`` is not 2-D or its rows are not orthonormal.
    TypeError: if ``basis`` is not floating.

  References:
    Farajtabar et al., `Orthogonal Gradient Descent for Continual Learning
    <https://arxiv.org/abs/1910.07104>`_, AISTATS 2020; Doan et al., `A
    Theoretical Analysis of Catastrophic Forgetting through the NTK Overlap
    Matrix <https://arxiv.org/abs/2010.04003>`_, AISTATS 2021
  """
  fn = 'orthogonal_projection'
  basis_lib.check_basis(basis, None, 'basis', fn)
  initial = jnp.asarray(basis)

  def check_width(state_basis: Any, num: int, what: str) -> None:
    shape = np.shape(state_basis)
    if len(shape) != 2 or shape[1] != num:
      raise ValueError(
          f'{fn}: basis must have shape [k, P] with P = {num}, the number '
          f'of parameters in the {what}, got shape {shape}.')

  def init_fn(params):
    check_width(initial, _num_params(params), 'params')
    # A copy: the state owns its buffer, so donating it to a step never
    # consumes the caller's array (or the next init's).
    return OrthogonalProjectionState(basis=jnp.array(initial, copy=True))

  def update_fn(updates, state, params=None):
    del params
    if not hasattr(state, 'basis'):
      raise ValueError(f'{fn}: state must be the OrthogonalProjectionState '
                       f'that init returns, got {type(state).__name__}.')
    flat, unravel = flatten_util.ravel_pytree(updates)
    check_width(state.basis, flat.shape[0], 'updates')
    if checks.runtime_checks_enabled():  # Opt-in: 4kP more flops per step.
      basis_lib.check_basis(state.basis, flat.shape[0], 'basis', fn)
    return unravel(basis_lib.project_out(state.basis, flat)), state

  return optax.GradientTransformation(init_fn, update_fn)


def extend_basis(basis: jax.Array | None, vectors: jax.Array, *,
                 tol: float = 1e-6) -> jax.Array:
  r"""Orthonormal rows spanning ``basis`` and ``vectors``, in that order.

  Each row :math:`v` of ``vectors`` is orthogonalised against the basis so
  far (the rows of ``basis``, then the rows of ``vectors`` already kept) by
  classical Gram-Schmidt applied twice (CGS2; Giraud et al. 2005: twice is
  enough for orthogonality to working precision), and kept, normalised, if
  its residual :math:`r` satisfies :math:`\|r\| > \mathrm{tol}\,\|v\|`;
  zero rows and rows already in the span are dropped. The rows of ``basis``
  come out first and unchanged. This is OGD's memory update (Farajtabar et
  al. 2020) and grows a :func:`orthogonal_projection` basis task by task.

  The number of rows kept depends on the data, so this runs eagerly (not
  under ``jit``). The work is done in float64 NumPy, blocked: both passes
  against ``basis`` are matrix products, then the new rows are processed one
  by one against each other (:math:`O(m^2 P)`).

  Args:
    basis: ``[k, P]`` with orthonormal rows, or None (start empty).
    vectors: ``[m, P]`` (a single vector ``[P]`` is taken as one row).
    tol: Relative residual norm at or below which a row is dropped (> 0).

  Returns:
    ``[k', P]`` with orthonormal rows, ``k <= k' <= k + m``, in the dtype of
    ``basis`` (or of ``vectors`` if ``basis`` is None).

  Raises:
    ValueError: on non-finite or bad-shaped inputs, a width that differs
      from ``basis``' or a ``tol`` that is not > 0.
  """
  fn = 'extend_basis'
  if checks.is_traced(vectors) or checks.is_traced(basis):
    raise TypeError(f'{fn}: basis and vectors must be concrete arrays (the '
                    'number of rows kept depends on their values, so it '
                    'cannot run under jit), got a tracer.')
  checks.check_positive(tol, 'tol', fn)
  if np.ndim(vectors) == 1:
    vectors = np.asarray(vectors)[None]
  if np.ndim(vectors) != 2:
    raise ValueError(f'{fn}: vectors must have shape [m, P], got shape '
                     f'{np.shape(vectors)}.')
  width = np.shape(vectors)[1]
  if basis is not None:
    basis_lib.check_basis(basis, width, 'basis', fn)
    dtype = jnp.result_type(basis)
    old = np.asarray(basis, np.float64)
  else:
    dtype = jnp.result_type(vectors)
    if not jnp.issubdtype(dtype, jnp.floating):
      dtype = jnp.result_type(float)
    old = np.zeros((0, width))
  new = np.asarray(vectors, np.float64)
  if not np.all(np.isfinite(new)):
    raise ValueError(f'{fn}: vectors must be finite, got NaN or inf.')
  norms = np.linalg.norm(new, axis=1)
  residual = new
  for _ in range(2):  # CGS2 against the old basis, blocked.
    residual = residual - (residual @ old.T) @ old
  kept = []
  for i in range(new.shape[0]):
    r = residual[i]
    for _ in range(2):  # ... then against the rows kept from this block.
      if kept:
        q = np.stack(kept)
        r = r - (q @ r) @ q
    r_norm = np.linalg.norm(r)
    if norms[i] > 0 and r_norm > tol * norms[i]:
      kept.append(r / r_norm)
  out = np.concatenate([old, np.asarray(kept).reshape(-1, width)], axis=0)
  return jnp.asarray(out, dtype)


def _tree_vdot(a: Any, b: Any) -> jax.Array:
  products = [jnp.vdot(x, y, precision=_HIGHEST)
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return sum(products[1:], products[0]) if products else jnp.zeros(())


def agem_project(grads: Any, reference_grads: Any) -> Any:
  r"""A-GEM's projection: :math:`g - \min(g \cdot r, 0) / (r \cdot r)\, r`.

  If the gradient :math:`g` on the current task would increase the loss on
  the episodic memory to first order (:math:`g \cdot r < 0`, with
  :math:`r` the memory's gradient), it is projected onto the half-space
  :math:`g \cdot r \ge 0` (Chaudhry et al. 2019, Eq. 11); otherwise it is
  returned unchanged. Dot products run over all leaves. A zero reference
  leaves ``grads`` unchanged.

  Args:
    grads: The current task's gradient, a pytree.
    reference_grads: The memory's gradient, a pytree of the same structure
      and shapes.

  Returns:
    The projected gradient, a pytree like ``grads``.

  Raises:
    ValueError: if ``reference_grads`` does not have ``grads``' structure or
      leaf shapes.

  References:
    Chaudhry et al., `Efficient Lifelong Learning with A-GEM
    <https://arxiv.org/abs/1812.00420>`_, ICLR 2019
  """
  fn = 'agem_project'
  checks.check_tree_structure(reference_grads, grads, 'reference_grads',
                              'grads', fn)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(reference_grads)):
    if np.shape(g) != np.shape(r):
      raise ValueError(
          f'{fn}: reference_grads must have the shapes of grads, got '
          f'{np.shape(r)} for grads{jax.tree_util.keystr(path)} of shape '
          f'{np.shape(g)}.')
  dot = _tree_vdot(grads, reference_grads)
  ref_sq = _tree_vdot(reference_grads, reference_grads)
  safe = jnp.where(ref_sq > 0, ref_sq, jnp.ones_like(ref_sq))
  coefficient = jnp.where(ref_sq > 0, jnp.minimum(dot, 0) / safe,
                          jnp.zeros_like(dot))
  return jax.tree.map(lambda g, r: g - (coefficient * r).astype(g.dtype),
                      grads, reference_grads)


class AgemState(NamedTuple):
  """``agem()`` keeps no state; an empty NamedTuple for optax."""


def agem() -> optax.GradientTransformationExtraArgs:
  """:func:`agem_project` as an optax transformation.

  ``update(updates, state, params, reference_grads=r)`` returns
  ``agem_project(updates, r)``; in an ``optax.chain`` the keyword reaches
  it through ``chain``'s extra arguments:

  >>> import jax.numpy as jnp
  >>> import optax
  >>> import metacf
  >>> params = {'w': jnp.zeros(2)}
  >>> tx = optax.chain(metacf.protect.agem(), optax.sgd(1.0))
  >>> opt_state = tx.init(params)
  >>> grads = {'w': jnp.array([1.0, -1.0])}
  >>> memory_grads = {'w': jnp.array([0.0, 1.0])}
  >>> updates, opt_state = tx.update(grads, opt_state, params,
  ...                                reference_grads=memory_grads)
  >>> updates['w'].tolist() == [-1.0, 0.0]   # the conflicting part removed
  True

  It closes over no array, like :func:`orthogonal_projection`, whose basis
  lives in its state: the memory gradient changes every step, so it is an
  argument of ``update`` rather than state, and a jitted step that takes
  it as an argument compiles once.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an empty
    :class:`AgemState`; ``update`` raises ``ValueError`` when
    ``reference_grads`` is missing.

  References:
    Chaudhry et al., `Efficient Lifelong Learning with A-GEM
    <https://arxiv.org/abs/1812.00420>`_, ICLR 2019
  """

  def init_fn(params):
    del params
    return AgemState()

  def update_fn(updates, state, params=None, *, reference_grads=None,
                **extra_args):
    del params, extra_args
    if reference_grads is None:
      raise ValueError('agem: update needs the memory gradient as the '
                       'keyword argument reference_grads=, got None.')
    return agem_project(updates, reference_grads), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
