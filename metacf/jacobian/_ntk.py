r"""The empirical neural tangent kernel, matrix-free or by Jacobian contraction.

:math:`\Theta(x_1, x_2) = J(x_1) J(x_2)^\top`, shape ``[N1 * C, N2 * C]``
(conventions in :mod:`metacf.jacobian`). :func:`ntk_vector_products` is the
matrix-free engine, also used by :mod:`metacf.jacobian._forgetting` to get two
kernel blocks from one pass over the columns.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metacf._src import checks
from metacf._src.types import ApplyFn, Params
from metacf.jacobian import _jacobian

# Default block of NTK columns computed together by 'ntk_vector_products'.
_NTK_BLOCK_COLUMNS = 64

_NTK_IMPLEMENTATIONS = ('ntk_vector_products', 'jacobian_contraction')
_HIGHEST = jax.lax.Precision.HIGHEST


def ntk(apply_fn: ApplyFn, params: Params, x1: Any, x2: Any, *,
        implementation: str = 'ntk_vector_products',
        chunk_size: int | None = None,
        mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  r"""The empirical neural tangent kernel :math:`\Theta = J(x_1) J(x_2)^\top`.

  Implementations (Novak et al. 2022 compare their costs):

  * ``'ntk_vector_products'`` (default, matrix-free): column ``j`` of
    :math:`\Theta` is :math:`J_1 (J_2^\top e_j)`: one VJP of :math:`f(x_2)`
    then one JVP of :math:`f(x_1)` (``jax.vjp``/``jax.linearize`` on the whole
    batches, so exact for any model). Columns are computed in blocks of
    ``chunk_size * C`` (``lax.map`` with ``batch_size``); memory is that of
    one block of parameter-space vectors, ``O(chunk_size * C * P)``, and
    ``J`` is never formed. Cost ``N2 * C`` VJPs and JVPs.
  * ``'jacobian_contraction'``: forms both Jacobians with :func:`jacobian`
    (chunked by ``chunk_size`` examples) and contracts them: fastest for
    small ``P``, memory ``O((N1 + N2) * C * P)``.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, C]``.
    params: Parameter pytree (floating).
    x1: Inputs with ``N1`` examples (rows of the kernel).
    x2: Inputs with ``N2`` examples (columns of the kernel).
    implementation: ``'ntk_vector_products'`` or ``'jacobian_contraction'``
      (static).
    chunk_size: Examples of ``x2`` per block of columns for
      ``'ntk_vector_products'`` (default: about 64 columns per block), or
      examples per :func:`jacobian` chunk for ``'jacobian_contraction'``
      (default: one chunk). Static.
    mesh: A 1-D ``jax.sharding.Mesh``, or None. With a mesh, the examples of
      ``x1`` and ``x2`` and the kernel's rows are sharded over its axis and
      ``params`` replicated (sharding constraints; XLA runs the VJPs and
      JVPs data-parallel): the same kernel up to float rounding, for any
      model. ``N1`` and ``N2`` must be divisible by the mesh size. Multi-host
      use as in :func:`jacobian_svd`.

  Returns:
    :math:`\Theta` of shape ``[N1 * C, N2 * C]``, rows and columns in
    (example, output) row-major order.

  Raises:
    ValueError: on an unknown ``implementation``, inputs without a leading
      example axis, outputs that are not ``[N, C]``, ``chunk_size < 1``, or
      a ``mesh`` that is not 1-D or whose size does not divide ``N1``/``N2``.

  References:
    Jacot et al., `Neural Tangent Kernel: Convergence and Generalization in
    Neural Networks <https://arxiv.org/abs/1806.07572>`_, 2018;
    Novak et al., `Fast Finite Width Neural Tangent Kernel
    <https://arxiv.org/abs/2206.08720>`_, 2022 (neural-tangents)
  """
  fn = 'ntk'
  implementation = checks.check_choice(implementation, _NTK_IMPLEMENTATIONS,
                                       'implementation', fn)
  flat, unravel = _jacobian.flatten_params(params, fn)
  x1, n1 = _jacobian.as_batch(x1, 'x1', fn)
  x2, n2 = _jacobian.as_batch(x2, 'x2', fn)
  c1 = _jacobian.num_outputs(apply_fn, unravel, flat, x1, n1, 'x1', fn)
  c2 = _jacobian.num_outputs(apply_fn, unravel, flat, x2, n2, 'x2', fn)
  if c1 != c2:
    raise ValueError(
        f'{fn}: apply_fn(params, x1) and apply_fn(params, x2) must have the '
        f'same number of outputs C, got {c1} and {c2}.')
  if chunk_size is not None:
    chunk_size = checks.check_int(chunk_size, 'chunk_size', fn, min_value=1)
  axis = _jacobian.check_mesh(mesh, n1, 'x1', fn)
  _jacobian.check_mesh(mesh, n2, 'x2', fn)
  shard, replicate = _jacobian.sharding_fns(mesh, axis)
  x1, x2, flat = shard(x1), shard(x2), replicate(flat)
  if implementation == 'jacobian_contraction':
    j1 = _jacobian.jacobian(apply_fn, unravel(flat), x1,
                            chunk_size=chunk_size)
    j2 = _jacobian.jacobian(apply_fn, unravel(flat), x2,
                            chunk_size=chunk_size)
    return shard(jnp.matmul(j1, j2.T, precision=_HIGHEST))
  (kernel,) = ntk_vector_products(
      [_jacobian.flat_fn(apply_fn, unravel, x1)],
      _jacobian.flat_fn(apply_fn, unravel, x2), flat, (n2, c2), chunk_size)
  return shard(kernel)


def ntk_vector_products(row_fns: list[Callable[[jax.Array], jax.Array]],
                        f2: Callable[[jax.Array], jax.Array],
                        flat: jax.Array, shape2: tuple[int, int],
                        chunk_size: int | None,
                        direction_fn: Callable[[jax.Array], jax.Array] | None
                        = None) -> list[jax.Array]:
  """``[J_r J2^T for each row function]``, one block of columns at a time.

  Each column ``J2^T e_j`` comes from one VJP of ``f2`` and is shared by the
  JVPs of every function in ``row_fns``. With ``direction_fn`` (a linear map
  of parameter space, e.g. a projection ``P``) the blocks are
  ``J_r P J2^T``.
  """
  n2, c = shape2
  num_cols = n2 * c
  out2, f2_vjp = jax.vjp(f2, flat)
  row_jvps = [jax.linearize(f1, flat)[1] for f1 in row_fns]
  if chunk_size is None:
    chunk_size = max(1, _NTK_BLOCK_COLUMNS // c)
  block = min(chunk_size * c, num_cols)
  cols = jnp.arange(num_cols, dtype=jnp.int32)

  def column(j):
    cotangent = (cols == j).astype(out2.dtype).reshape(n2, c)
    (direction,) = f2_vjp(cotangent)  # J2^T e_j, shape [P].
    if direction_fn is not None:
      direction = direction_fn(direction)
    return [f1_jvp(direction).reshape(-1) for f1_jvp in row_jvps]

  if block == num_cols:  # One block: a plain vmap, no loop.
    blocks_t = jax.vmap(column)(cols)
  else:
    blocks_t = jax.lax.map(column, cols, batch_size=block)
  return [block_t.T for block_t in blocks_t]

