r"""Top-``k`` SVDs of the Jacobian: :func:`jacobian_svd` and its options.

:func:`jacobian_svd` computes :math:`J \approx U S V^\top` (``'dense'``,
``'gram'``, ``'randomized'`` or ``'subspace_iteration'``, chosen by
:func:`auto_svd_method` for ``'auto'``). The randomized method's block Krylov
solver is in ``_krylov``; comparisons of the parameter-space subspaces of two
SVDs are in ``_subspace``. Conventions in :mod:`metacf.jacobian`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metacf._src import checks
from metacf._src.types import ApplyFn, Params
from metacf.jacobian import _jacobian
from metacf.jacobian import _krylov
from metacf.jacobian import _ntk

# `auto` picks 'dense' while the Jacobian has at most this many entries
# (N * C * P <= 4,194,304: 32 MiB in float64) ...
_DENSE_MAX_ENTRIES = 2**22
# ... else 'gram' while the NTK is at most this many rows (4096 x 4096) ...
_GRAM_MAX_ROWS = 4096
# ... else 'randomized'.

_SVD_METHODS = ('auto', 'dense', 'gram', 'randomized', 'subspace_iteration')

# Subspace iteration's defaults (the randomized method's before metacf 0.3).
_SUBSPACE_OVERSAMPLING = 10
# The randomized method stops once every top-k triplet has
# ||J v - s u|| / s <= this (see _krylov._converged). Off by default: on a
# flat spectrum, converged Ritz pairs need not be the top k yet (see
# jacobian_svd's tol and the benchmarks page).
_DEFAULT_TOL = 0.0
_SUBSPACE_POWER_ITERS = 2


class JacobianSVD(NamedTuple):
  """Top-``k`` singular triplets of a Jacobian, :math:`J \\approx U S V^\\top`.

  Attributes:
    s: Singular values, descending.
    vt: Right singular vectors as rows: orthonormal directions in parameter
      space (``ravel_pytree(params)`` order). Signs are canonical: the
      largest-magnitude entry of each row is positive.
    u: Left singular vectors as columns: orthonormal directions in function
      space, rows in (example, output) order; signs match ``vt``.
    residual: ``residual[i]`` is :math:`\\lVert J v_i - s_i u_i \\rVert_2`,
      the convergence check of triplet ``i`` (``J^T u_i = s_i v_i`` holds by
      construction for every method; compare ``residual / s`` with the
      accuracy you need: a relative residual ``r`` bounds the error of
      ``s_i`` by about ``r``, and by ``r^2 s_i / gap`` once isolated).
      Computed from ``J`` (``'dense'``), the NTK (``'gram'``) or the stored
      Krylov products (``'randomized'``, no extra product); ``inf`` where
      ``s_i = 0`` (``v_i`` is then arbitrary); None for
      ``'subspace_iteration'`` (it would cost ``k`` more JVPs). Shape [k].
    num_products: Jacobian-vector products (JVPs + VJPs) used, an int32
      scalar; None for ``'dense'`` (which forms ``J``).
  """
  s: jax.Array   # shape=[k], descending, >= 0.
  vt: jax.Array  # shape=[k, P], orthonormal rows.
  u: jax.Array   # shape=[N * C, k], orthonormal columns.
  residual: jax.Array | None = None  # shape=[k].
  num_products: jax.Array | None = None  # shape=[], int32.


class SvdOptions(NamedTuple):
  """Resolved, static options of :func:`jacobian_svd` (see its docstring)."""
  method: str
  oversampling: int | None     # subspace_iteration only.
  num_power_iters: int | None  # subspace_iteration only.
  block_size: int | None       # randomized only.
  num_blocks: int | None       # randomized only: Krylov depth + 1 (at most).
  tol: float | None            # randomized only: stopping rule.


# ---------------------------------------------------------------------------
# Top-k SVD of the Jacobian.


def check_rank(k: Any, num_rows: int, num_params: int, fn: str) -> int:
  """Returns ``k`` after checking ``1 <= k <= min(N * C, P)``."""
  k = checks.check_int(k, 'k', fn)
  bound = min(num_rows, num_params)
  if not 1 <= k <= bound:
    raise ValueError(
        f'{fn}: k must satisfy 1 <= k <= min(N * C, P) = '
        f'min({num_rows}, {num_params}) = {bound}, got {k}.')
  return k


def auto_svd_method(num_rows: int, num_params: int, *,
                    has_key: bool = True) -> str:
  """The method ``jacobian_svd(..., method='auto')`` uses for a ``J`` shape.

  The rule, for ``J`` of shape ``[num_rows, num_params] = [N * C, P]``:

  1. ``'dense'`` if ``N * C * P <= 2**22`` (the dense Jacobian is at most
     about 4M entries, 32 MiB in float64);
  2. else ``'gram'`` if ``N * C <= 4096`` (the NTK is at most 4096 x 4096)
     or if no key is given (``has_key=False``: ``'auto'`` never needs a key,
     so a call that works on a small problem does not fail on a large one
     for want of it; the NTK then costs ``(N * C)**2`` memory);
  3. else ``'randomized'`` (with the caller's key).

  Args:
    num_rows: ``N * C``.
    num_params: ``P``.
    has_key: Whether the caller passed a PRNG key.

  Returns:
    One of ``'dense'``, ``'gram'``, ``'randomized'``.
  """
  if num_rows * num_params <= _DENSE_MAX_ENTRIES:
    return 'dense'
  if num_rows <= _GRAM_MAX_ROWS or not has_key:
    return 'gram'
  return 'randomized'


def check_svd_options(method: Any, key: Any, oversampling: Any,
                      num_power_iters: Any, num_rows: int, num_params: int,
                      fn: str, *, k: int | None = None,
                      krylov_dim: Any = None,
                      block_size: Any = None,
                      tol: Any = _DEFAULT_TOL) -> SvdOptions:
  """Checks :func:`jacobian_svd`'s options; resolves defaults and ``'auto'``.

  ``k`` (already checked) is needed to resolve the randomized method's
  Krylov space; without it only the checks run.
  """
  method = checks.check_choice(method, _SVD_METHODS, 'method', fn)
  oversampling = checks.check_int(oversampling, 'oversampling', fn,
                                  min_value=0, optional=True)
  num_power_iters = checks.check_int(num_power_iters, 'num_power_iters', fn,
                                     min_value=0, optional=True)
  krylov_dim = checks.check_int(krylov_dim, 'krylov_dim', fn, min_value=1,
                                optional=True)
  block_size = checks.check_int(block_size, 'block_size', fn, min_value=1,
                                optional=True)
  if (isinstance(tol, bool) or not isinstance(tol, (int, float))
      or not 0 <= tol < 1):
    raise ValueError(f'{fn}: tol must be a Python float in [0, 1), got '
                     f'{tol!r}.')
  if method == 'auto':
    method = auto_svd_method(num_rows, num_params, has_key=key is not None)
  if method in ('randomized', 'subspace_iteration') and key is None:
    raise ValueError(
        f'{fn}: key must be a jax.random key when method is {method!r}, got '
        'None.')
  legacy = oversampling is not None or num_power_iters is not None
  krylov = krylov_dim is not None or block_size is not None
  if method == 'subspace_iteration' and krylov:
    raise ValueError(
        f"{fn}: krylov_dim and block_size must be None for method="
        f"'subspace_iteration' (it takes oversampling and num_power_iters), "
        f'got krylov_dim={krylov_dim}, block_size={block_size}.')
  if method == 'randomized' and legacy and krylov:
    raise ValueError(
        f"{fn}: method='randomized' takes either (krylov_dim, block_size) or "
        f'(oversampling, num_power_iters), not both, got krylov_dim='
        f'{krylov_dim}, block_size={block_size}, oversampling='
        f'{oversampling}, num_power_iters={num_power_iters}.')
  if oversampling is None:
    oversampling = _SUBSPACE_OVERSAMPLING
  if num_power_iters is None:
    num_power_iters = _SUBSPACE_POWER_ITERS
  if method == 'subspace_iteration':
    return SvdOptions(method, oversampling, num_power_iters, None, None,
                      None)
  if method != 'randomized' or k is None:
    return SvdOptions(method, None, None, None, None, None)
  bound = min(num_rows, num_params)
  if legacy:  # Block Krylov with subspace iteration's probes and depth.
    block_size = k + oversampling
    krylov_dim = block_size * (num_power_iters + 1)
  else:
    block_size = 1 if block_size is None else block_size
    if krylov_dim is None:
      krylov_dim = _krylov.default_krylov_dim(k)
    elif krylov_dim < k:
      raise ValueError(f'{fn}: krylov_dim must be >= k = {k}, got '
                       f'{krylov_dim}.')
  block_size, num_blocks = _krylov.krylov_shape(k, krylov_dim, block_size,
                                                 bound)
  return SvdOptions(method, None, None, block_size, num_blocks, float(tol))


def _canonical_signs(u: jax.Array, s: jax.Array, vt: jax.Array,
                     residual: jax.Array | None,
                     num_products: Any = None) -> JacobianSVD:
  """Flips each pair (u_i, v_i) so that the largest-|.| entry of v_i is > 0."""
  pivot_idx = jnp.argmax(jnp.abs(vt), axis=1)
  pivot = jnp.take_along_axis(vt, pivot_idx[:, None], axis=1)[:, 0]
  sign = jnp.where(pivot < 0, -1, 1)
  return JacobianSVD(s=s, vt=vt * sign.astype(vt.dtype)[:, None],
                     u=u * sign.astype(u.dtype)[None, :], residual=residual,
                     num_products=None if num_products is None else
                     jnp.asarray(num_products, jnp.int32))


def jacobian_svd(apply_fn: ApplyFn, params: Params, x: Any, k: int, *,
                 method: str = 'auto', key: jax.Array | None = None,
                 krylov_dim: int | None = None,
                 block_size: int | None = None,
                 oversampling: int | None = None,
                 num_power_iters: int | None = None,
                 tol: float = _DEFAULT_TOL,
                 chunk_size: int | None = None,
                 mesh: jax.sharding.Mesh | None = None,
                 unroll: bool | None = None) -> JacobianSVD:
  r"""Top-``k`` singular values and vectors of the Jacobian ``J [N * C, P]``.

  Methods (``method`` is static):

  * ``'dense'``: ``jnp.linalg.svd`` of :func:`jacobian`. Memory
    ``O(N * C * P)``; the reference.
  * ``'gram'``: ``eigh`` of the ``N*C x N*C`` empirical NTK :math:`J J^\top`
    (from :func:`ntk`, matrix-free) gives the top-``k`` left vectors
    :math:`U_k`; then :math:`B = U_k^\top J = S_k V_k^\top` by ``k`` batched
    VJPs and an SVD of the small ``[k, P]`` matrix ``B`` gives ``s`` and
    ``vt``. Memory ``O((N * C)^2 + k * P)``.
  * ``'randomized'``: block Krylov, matrix-free (Musco & Musco 2015; with
    ``block_size=1``, Lanczos with full re-orthogonalisation on
    :math:`J J^\top`, Golub & Van Loan Sec. 10.1). From
    :math:`Q_0 = \mathrm{orth}(J \Omega)` (``block_size`` Gaussian probes,
    batched JVPs), each step applies :math:`J J^\top` to the newest block
    (``block_size`` VJPs then JVPs), orthogonalises the result against the
    whole basis (block Gram-Schmidt, twice), and appends it, until every
    top-``k`` Ritz triplet has :math:`\lVert J v_i - s_i u_i \rVert \le`
    ``tol`` :math:`s_i` (tested every 4 columns, from the stored products)
    or the basis :math:`Q` has about ``krylov_dim`` columns, the space
    :math:`\mathrm{span}\{J\Omega, (JJ^\top) J\Omega, (JJ^\top)^2 J\Omega,
    \dots\}`. Rayleigh-Ritz: the top-``k`` eigenvectors ``Y`` of
    :math:`Q^\top J J^\top Q` (from the stored products) give
    :math:`U_k = Q Y`, and the SVD of :math:`U_k^\top J` (``k`` VJPs)
    gives ``s``, ``vt`` and ``u`` (where ``krylov_dim * P`` floats fit in 1
    GiB the VJPs :math:`J^\top Q` are kept and :math:`U_k^\top J = Y^\top
    J^\top Q` costs no product). Jacobian products: at most
    ``block_size + 2 * krylov_dim (+ k)`` (201 for k = 20; the number used
    is returned in ``num_products``); memory ``O(N * C * krylov_dim +
    (block_size + k) * P)``, plus ``krylov_dim * P`` up to 1 GiB: ``J`` is
    never formed. With the defaults (``krylov_dim = 4 k + 20``, single
    vectors, no early stop) the top-``k`` singular values are accurate to
    better than ``1e-3`` relative on spectra as flat as ``s_k / s_(k+1) =
    1.01`` (power-law, geometric and clustered spectra, tested for many
    keys; ``1e-5`` in float64 NumPy, :func:`default_krylov_dim`), and
    ``residual`` tells you how far each triplet converged. ``tol > 0``
    stops early and saves products, but see ``tol``. Larger
    ``block_size`` batches more
    products per step (faster on accelerators and for memory-bound models)
    but a block of ``b`` vectors needs a larger ``krylov_dim`` for the same
    accuracy (about 1.5-2x for ``b = 8``). Given ``oversampling`` and/or
    ``num_power_iters`` instead, the blocks have ``k + oversampling``
    vectors and there are ``num_power_iters + 1`` of them: the Krylov space
    then contains the subspace of ``'subspace_iteration'`` with the same
    settings, so it is at least as accurate (at about twice the products).
  * ``'subspace_iteration'``: randomized subspace iteration (Halko,
    Martinsson & Tropp 2011, Algorithms 4.4 and 5.1; ``'randomized'`` before
    metacf 0.3): ``l = min(k + oversampling, N * C, P)`` probes (default
    ``oversampling = 10``), ``num_power_iters`` (default 2) rounds of
    :math:`Y \leftarrow J J^\top Y` with QR re-orthonormalisations, then the
    SVD of :math:`Q^\top J`. ``2 l (num_power_iters + 1)`` products. Fast but
    rough on flat spectra, such as those of MNIST MLPs (see the benchmarks
    page). Kept as the peer of the benchmark and for reproducing earlier
    results.
  * ``'auto'``: chosen from the shape of ``J`` by :func:`auto_svd_method`:
    ``'dense'`` if ``N * C * P <= 2**22``, else ``'gram'`` if
    ``N * C <= 4096``, else ``'randomized'`` when a ``key`` is given and
    ``'gram'`` when none is (``'auto'`` never needs a key: randomness only
    comes from a key the caller passes).

  The gram method deviates from the textbook :math:`V^\top = S^{-1} U^\top J`:
  it takes the SVD of :math:`U_k^\top J` instead of dividing by ``s``, which
  is the same in exact arithmetic but keeps ``vt`` orthonormal and finite when
  some singular values are (near) zero, and computes ``s`` from ``J`` rather
  than from the square roots of NTK eigenvalues (accurate to
  :math:`\epsilon s_1` instead of :math:`\epsilon s_1^2 / s_i`). The
  randomized method does the same with its Ritz vectors.

  Signs are canonical for every method (the largest-magnitude entry of each
  ``vt`` row is positive), so methods agree up to their accuracy.

  Several devices (``mesh``). With a 1-D ``jax.sharding.Mesh`` the examples
  of ``x`` (and the rows of every function-space array: ``u``, the NTK, the
  Krylov basis) are sharded over the mesh axis and ``params`` and the
  parameter-space vectors are replicated, by sharding constraints; XLA's
  SPMD partitioner then runs every JVP, VJP and NTK column data-parallel and
  inserts the all-reduces (a VJP sums over examples). The result equals the
  one-device one up to float rounding, for any model. ``N`` must be
  divisible by the mesh size. Multi-host (``jax.distributed.initialize()``
  on every process): build the mesh from all ``jax.devices()``, pass ``x``
  as a global ``jax.Array`` (e.g. ``jax.make_array_from_process_local_data(
  NamedSharding(mesh, PartitionSpec(axis)), local_x)``), the same
  ``params`` and ``key`` on every process, and call the same jitted function
  on all of them; ``s`` and ``vt`` come back replicated, ``u`` sharded by
  rows (gather it with ``jax.experimental.multihost_utils.process_allgather``
  if a host needs all of it).

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, C]``.
    params: Parameter pytree (floating).
    x: Inputs with a leading example axis ``N``.
    k: Number of singular triplets, ``1 <= k <= min(N * C, P)`` (static).
    method: ``'auto'``, ``'dense'``, ``'gram'``, ``'randomized'`` or
      ``'subspace_iteration'``.
    key: A ``jax.random`` key; required for ``'randomized'`` and
      ``'subspace_iteration'``, optional for ``'auto'`` (which picks
      ``'randomized'`` only with a key), ignored otherwise. Same key, same
      result.
    krylov_dim: Columns of the randomized method's Krylov basis (static,
      ``>= k``; default ``4 k + 20``, capped at ``min(N * C, P)``, where the
      result is exact).
    block_size: Vectors per Krylov block of the randomized method (static,
      >= 1; default 1).
    oversampling: Extra probes per block, for ``'subspace_iteration'``
      (default 10) or, instead of ``krylov_dim``/``block_size``, for
      ``'randomized'`` (static, >= 0).
    num_power_iters: Power iterations of ``'subspace_iteration'`` (default
      2), or Krylov depth of ``'randomized'`` with ``oversampling`` (static,
      >= 0).
    tol: Stopping rule of ``'randomized'``: the largest relative residual
      :math:`\lVert J v_i - s_i u_i \rVert / s_i`, ``i < k``, to stop at
      (static Python float in ``[0, 1)``; default 0: run to
      ``krylov_dim``). The error of a converged ``s_i`` is about
      ``tol^2 s_i / (2 gap)`` (Kato-Temple; ``gap`` the relative gap of
      ``s_i^2``), but on flat spectra the converged Ritz pairs need not be
      the top ``k`` yet, so a small ``tol`` can stop early with every
      residual small and ``s`` still off (see the benchmarks page). Use it
      where the spectrum decays, and check against ``tol=0``.
    chunk_size: Forwarded to :func:`jacobian` (``'dense'``) or :func:`ntk`
      (``'gram'``).
    mesh: A 1-D ``jax.sharding.Mesh`` to shard the examples over, or None.
    unroll: Whether the randomized method unrolls its Krylov steps (static;
      needs ``tol=0``) instead of a ``while_loop``. Default None: unrolled
      on the CPU backend when ``apply_fn`` has a convolution, whose JVPs
      and VJPs XLA:CPU runs slowly inside a ``while_loop``; unrolling costs
      compile time, so it is not the default elsewhere (see the benchmarks
      page).

  Returns:
    A :class:`JacobianSVD` ``(s [k], vt [k, P], u [N * C, k], residual [k],
    num_products [])`` (``residual`` None for ``'subspace_iteration'``,
    ``num_products`` None for ``'dense'``).

  Raises:
    ValueError: if ``k`` is outside ``[1, min(N * C, P)]``, ``method`` is
      unknown, ``key`` is None for a randomized method, ``krylov_dim < k``,
      options of one method are given to another, or ``mesh`` is not 1-D or
      its size does not divide ``N``.
    TypeError: if ``k`` or an option is not a Python int, or ``mesh`` is not
      a ``Mesh``.

  References:
    Musco & Musco, `Randomized Block Krylov Methods for Stronger and Faster
    Approximate Singular Value Decomposition
    <https://arxiv.org/abs/1504.05477>`_, NeurIPS 2015;
    Halko, Martinsson & Tropp, `Finding Structure with Randomness:
    Probabilistic Algorithms for Constructing Approximate Matrix
    Decompositions <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011;
    Golub & Van Loan, Matrix Computations, 4th ed., 2013, Ch. 10;
    Jacot et al., `Neural Tangent Kernel <https://arxiv.org/abs/1806.07572>`_,
    2018; Novak et al., `Fast Finite Width Neural Tangent Kernel
    <https://arxiv.org/abs/2206.08720>`_, 2022
  """
  fn = 'jacobian_svd'
  flat, unravel = _jacobian.flatten_params(params, fn)
  x, n = _jacobian.as_batch(x, 'x', fn)
  c = _jacobian.num_outputs(apply_fn, unravel, flat, x, n, 'x', fn)
  num_rows, num_params = n * c, flat.size
  k = check_rank(k, num_rows, num_params, fn)
  opts = check_svd_options(method, key, oversampling, num_power_iters,
                           num_rows, num_params, fn, k=k,
                           krylov_dim=krylov_dim, block_size=block_size,
                           tol=tol)
  _krylov.check_unroll(unroll, opts.tol or 0.0, fn)
  axis = _jacobian.check_mesh(mesh, n, 'x', fn)
  shard, replicate = _jacobian.sharding_fns(mesh, axis)
  x, flat = shard(x), replicate(flat)

  if opts.method == 'dense':
    j = _jacobian.jacobian(apply_fn, unravel(flat), x, chunk_size=chunk_size)
    u, s, vt = _krylov.thin_svd(j)
    u, s, vt = u[:, :k], s[:k], vt[:k]
    residual = jnp.linalg.norm(_krylov.mm(j, vt.T) - u * s[None, :], axis=0)
    return _canonical_signs(u, s, vt, residual)

  f = _jacobian.flat_fn(apply_fn, unravel, x)
  _, f_vjp = jax.vjp(f, flat)

  def project_rows(q):  # q [N*C, l] -> q^T J [l, P], by l batched VJPs.
    return replicate(jax.vmap(lambda col: f_vjp(col.reshape(n, c))[0])(q.T))

  if opts.method == 'gram':
    kernel = _ntk.ntk(apply_fn, unravel(flat), x, x, chunk_size=chunk_size)
    kernel = shard(0.5 * (kernel + kernel.T))
    _, eigvecs = jnp.linalg.eigh(kernel)  # Ascending eigenvalues.
    q = shard(eigvecs[:, ::-1][:, :k])
    u_small, s, vt = _krylov.thin_svd(project_rows(q))
    u = _krylov.mm(q, u_small)
    residual = _krylov.ritz_residual(_krylov.mm(kernel, u), u, s)
    return _canonical_signs(u, s, vt, residual, 2 * num_rows + k)

  _, f_jvp = jax.linearize(f, flat)

  def apply_j(vt):  # vt [l, P] -> J vt^T [N*C, l], by l batched JVPs.
    return shard(jax.vmap(lambda v: f_jvp(v).reshape(num_rows))(vt).T)

  if opts.method == 'randomized':
    u, s, vt, residual, num_products = _krylov.block_krylov(
        project_rows, apply_j, num_rows, num_params, flat.dtype, k,
        opts.block_size, opts.num_blocks, opts.tol, key, shard,
        _krylov.auto_unroll(f, flat, opts.tol) if unroll is None else unroll)
    return _canonical_signs(u, s, vt, residual, num_products)

  num_probes = min(k + opts.oversampling, num_rows, num_params)
  omega = jax.random.normal(key, (num_probes, num_params), flat.dtype)
  q, _ = jnp.linalg.qr(apply_j(omega))
  for _ in range(opts.num_power_iters):
    z, _ = jnp.linalg.qr(project_rows(q).T)  # Orthonormal basis [P, l].
    q, _ = jnp.linalg.qr(apply_j(z.T))
  # Rayleigh-Ritz: SVD of the small projected matrix Q^T J [l, P].
  u_small, s, vt = _krylov.thin_svd(project_rows(q))
  u = _krylov.mm(q, u_small)
  return _canonical_signs(u[:, :k], s[:k], vt[:k], None,
                          2 * num_probes * (opts.num_power_iters + 1))
