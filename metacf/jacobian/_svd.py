r"""Top-``k`` SVDs of the Jacobian and comparisons of their subspaces.

:func:`jacobian_svd` computes :math:`J \approx U S V^\top` (``'dense'``,
``'gram'`` or ``'randomized'``, chosen by :func:`auto_svd_method` for
``'auto'``); :func:`subspace_overlap`, :func:`weighted_subspace_overlap` and
:func:`principal_angle_cosines` compare the parameter-space subspaces of two
such SVDs. Conventions in :mod:`metacf.jacobian`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf._src.types import ApplyFn, Params
from metacf.jacobian import _jacobian
from metacf.jacobian import _ntk

# `auto` picks 'dense' while the Jacobian has at most this many entries
# (N * C * P <= 4,194,304: 32 MiB in float64) ...
_DENSE_MAX_ENTRIES = 2**22
# ... else 'gram' while the NTK is at most this many rows (4096 x 4096) ...
_GRAM_MAX_ROWS = 4096
# ... else 'randomized'.

_SVD_METHODS = ('auto', 'dense', 'gram', 'randomized')
_HIGHEST = jax.lax.Precision.HIGHEST


class JacobianSVD(NamedTuple):
  """Top-``k`` singular triplets of a Jacobian, :math:`J \\approx U S V^\\top`.

  Attributes:
    s: Singular values, descending.
    vt: Right singular vectors as rows: orthonormal directions in parameter
      space (``ravel_pytree(params)`` order). Signs are canonical: the
      largest-magnitude entry of each row is positive.
    u: Left singular vectors as columns: orthonormal directions in function
      space, rows in (example, output) order; signs match ``vt``.
  """
  s: jax.Array   # shape=[k], descending, >= 0.
  vt: jax.Array  # shape=[k, P], orthonormal rows.
  u: jax.Array   # shape=[N * C, k], orthonormal columns.


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


def auto_svd_method(num_rows: int, num_params: int) -> str:
  """The method ``jacobian_svd(..., method='auto')`` uses for a ``J`` shape.

  The rule, for ``J`` of shape ``[num_rows, num_params] = [N * C, P]``:

  1. ``'dense'`` if ``N * C * P <= 2**22`` (the dense Jacobian is at most
     about 4M entries, 32 MiB in float64);
  2. else ``'gram'`` if ``N * C <= 4096`` (the NTK is at most 4096 x 4096);
  3. else ``'randomized'`` (which then needs a ``key``).

  Args:
    num_rows: ``N * C``.
    num_params: ``P``.

  Returns:
    One of ``'dense'``, ``'gram'``, ``'randomized'``.
  """
  if num_rows * num_params <= _DENSE_MAX_ENTRIES:
    return 'dense'
  if num_rows <= _GRAM_MAX_ROWS:
    return 'gram'
  return 'randomized'


def _canonical_signs(u: jax.Array, s: jax.Array, vt: jax.Array) -> JacobianSVD:
  """Flips each pair (u_i, v_i) so that the largest-|.| entry of v_i is > 0."""
  pivot_idx = jnp.argmax(jnp.abs(vt), axis=1)
  pivot = jnp.take_along_axis(vt, pivot_idx[:, None], axis=1)[:, 0]
  sign = jnp.where(pivot < 0, -1, 1)
  return JacobianSVD(s=s, vt=vt * sign.astype(vt.dtype)[:, None],
                     u=u * sign.astype(u.dtype)[None, :])


def _thin_svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``jnp.linalg.svd(a, full_matrices=False)``, through ``a.T`` if wide.

  LAPACK's SVD of a wide ``[l, P]`` matrix measured 2-2.7x slower on CPU than
  that of its transpose (``[20, 1e7]``: 10.0 s vs 4.8 s), same values.
  """
  if a.shape[0] >= a.shape[1]:
    return jnp.linalg.svd(a, full_matrices=False)
  v, s, ut = jnp.linalg.svd(a.T, full_matrices=False)
  return ut.T, s, v.T


def check_svd_options(method: Any, key: Any, oversampling: Any,
                      num_power_iters: Any, num_rows: int, num_params: int,
                      fn: str) -> tuple[str, int, int]:
  """Checks :func:`jacobian_svd`'s options; resolves ``method='auto'``."""
  method = checks.check_choice(method, _SVD_METHODS, 'method', fn)
  oversampling = checks.check_int(oversampling, 'oversampling', fn,
                                  min_value=0)
  num_power_iters = checks.check_int(num_power_iters, 'num_power_iters', fn,
                                     min_value=0)
  if method == 'auto':
    method = auto_svd_method(num_rows, num_params)
  if method == 'randomized' and key is None:
    raise ValueError(
        f"{fn}: key must be a jax.random key when method is (or 'auto' "
        "resolves to) 'randomized', got None.")
  return method, oversampling, num_power_iters


def jacobian_svd(apply_fn: ApplyFn, params: Params, x: Any, k: int, *,
                 method: str = 'auto', key: jax.Array | None = None,
                 oversampling: int = 10, num_power_iters: int = 2,
                 chunk_size: int | None = None) -> JacobianSVD:
  r"""Top-``k`` singular values and vectors of the Jacobian ``J [N * C, P]``.

  Methods (``method`` is static):

  * ``'dense'``: ``jnp.linalg.svd`` of :func:`jacobian`. Memory
    ``O(N * C * P)``; the reference.
  * ``'gram'``: ``eigh`` of the ``N*C x N*C`` empirical NTK :math:`J J^\top`
    (from :func:`ntk`, matrix-free) gives the top-``k`` left vectors
    :math:`U_k`; then :math:`B = U_k^\top J = S_k V_k^\top` by ``k`` batched
    VJPs and an SVD of the small ``[k, P]`` matrix ``B`` gives ``s`` and
    ``vt``. Memory ``O((N * C)^2 + k * P)``.
  * ``'randomized'``: randomized subspace iteration (Halko, Martinsson & Tropp
    2011, Algorithms 4.4 and 5.1), matrix-free: ``l = min(k + oversampling,
    N * C, P)`` Gaussian probes, :math:`Y = J \Omega` by batched JVPs,
    ``num_power_iters`` rounds of :math:`Y \leftarrow J J^\top Y` with a QR
    re-orthonormalisation after every product, then the SVD of
    :math:`Q^\top J` (batched VJPs). ``J`` is never formed: memory
    ``O(l * (N * C + P))``. Its accuracy improves with the spectral decay of
    ``J``, ``oversampling`` and ``num_power_iters``; the defaults are fast but
    rough on the flat spectra of MNIST MLPs (``benchmarks/bench_jacobian.py``,
    k = 20: ``s[19]`` off by 2-8% with ``(oversampling, num_power_iters) =
    (10, 2)``, 1e-5 to 2e-3 with ``(40, 4)``): raise them, or use ``'gram'``
    (1e-6) while ``N * C`` allows, when the tail singular values matter.
  * ``'auto'``: chosen from the shape of ``J`` by :func:`auto_svd_method`:
    ``'dense'`` if ``N * C * P <= 2**22``, else ``'gram'`` if
    ``N * C <= 4096``, else ``'randomized'``.

  The gram method deviates from the textbook :math:`V^\top = S^{-1} U^\top J`:
  it takes the SVD of :math:`U_k^\top J` instead of dividing by ``s``, which
  is the same in exact arithmetic but keeps ``vt`` orthonormal and finite when
  some singular values are (near) zero, and computes ``s`` from ``J`` rather
  than from the square roots of NTK eigenvalues (accurate to
  :math:`\epsilon s_1` instead of :math:`\epsilon s_1^2 / s_i`).

  Signs are canonical for every method (the largest-magnitude entry of each
  ``vt`` row is positive), so methods agree up to their accuracy.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, C]``.
    params: Parameter pytree (floating).
    x: Inputs with a leading example axis ``N``.
    k: Number of singular triplets, ``1 <= k <= min(N * C, P)`` (static).
    method: ``'auto'``, ``'dense'``, ``'gram'`` or ``'randomized'``.
    key: A ``jax.random`` key; required when the method is (or resolves to)
      ``'randomized'``, ignored otherwise.
    oversampling: Extra random probes for ``'randomized'`` (static, >= 0).
    num_power_iters: Power iterations for ``'randomized'`` (static, >= 0).
    chunk_size: Forwarded to :func:`jacobian` (``'dense'``) or :func:`ntk`
      (``'gram'``).

  Returns:
    A :class:`JacobianSVD` ``(s [k], vt [k, P], u [N * C, k])``.

  Raises:
    ValueError: if ``k`` is outside ``[1, min(N * C, P)]``, ``method`` is
      unknown, ``key`` is None for the randomized method, or
      ``oversampling``/``num_power_iters`` is negative.
    TypeError: if ``k``, ``oversampling`` or ``num_power_iters`` is not a
      Python int.

  References:
    Halko, Martinsson & Tropp, `Finding Structure with Randomness:
    Probabilistic Algorithms for Constructing Approximate Matrix
    Decompositions <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011;
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
  method, oversampling, num_power_iters = check_svd_options(
      method, key, oversampling, num_power_iters, num_rows, num_params, fn)

  if method == 'dense':
    j = _jacobian.jacobian(apply_fn, params, x, chunk_size=chunk_size)
    u, s, vt = _thin_svd(j)
    return _canonical_signs(u[:, :k], s[:k], vt[:k])

  f = _jacobian.flat_fn(apply_fn, unravel, x)
  _, f_vjp = jax.vjp(f, flat)

  def project_rows(q):  # q [N*C, l] -> q^T J [l, P], by l batched VJPs.
    return jax.vmap(lambda col: f_vjp(col.reshape(n, c))[0])(q.T)

  if method == 'gram':
    kernel = _ntk.ntk(apply_fn, params, x, x, chunk_size=chunk_size)
    kernel = 0.5 * (kernel + kernel.T)
    _, eigvecs = jnp.linalg.eigh(kernel)  # Ascending eigenvalues.
    q = eigvecs[:, ::-1][:, :k]
  else:
    _, f_jvp = jax.linearize(f, flat)
    num_probes = min(k + oversampling, num_rows, num_params)

    def apply_j(vt):  # vt [l, P] -> J vt^T [N*C, l], by l batched JVPs.
      return jax.vmap(lambda v: f_jvp(v).reshape(num_rows))(vt).T

    omega = jax.random.normal(key, (num_probes, num_params), flat.dtype)
    q, _ = jnp.linalg.qr(apply_j(omega))
    for _ in range(num_power_iters):
      z, _ = jnp.linalg.qr(project_rows(q).T)  # Orthonormal basis [P, l].
      q, _ = jnp.linalg.qr(apply_j(z.T))
  # Rayleigh-Ritz: SVD of the small projected matrix Q^T J [l, P].
  u_small, s, vt = _thin_svd(project_rows(q))
  u = jnp.matmul(q, u_small, precision=_HIGHEST)
  return _canonical_signs(u[:, :k], s[:k], vt[:k])


# ---------------------------------------------------------------------------
# Subspace comparisons.


def _top_rows(svd_a: Any, svd_b: Any, k: int | None,
              fn: str) -> tuple[jax.Array, jax.Array, int]:
  """Validates a pair of SVDs and returns their top-k ``vt`` rows and k."""
  vts = []
  for name, svd in (('svd_a', svd_a), ('svd_b', svd_b)):
    if not hasattr(svd, 'vt') or not hasattr(svd, 's'):
      raise TypeError(
          f'{fn}: {name} must be a JacobianSVD (with fields s and vt), got '
          f'{type(svd).__name__}.')
    if np.ndim(svd.vt) != 2 or np.shape(svd.s) != np.shape(svd.vt)[:1]:
      raise ValueError(
          f'{fn}: {name} must have s of shape [k] and vt of shape [k, P], '
          f'got {np.shape(svd.s)} and {np.shape(svd.vt)}.')
    vts.append(jnp.asarray(svd.vt))
  vt_a, vt_b = vts
  if vt_a.shape[1] != vt_b.shape[1]:
    raise ValueError(
        f'{fn}: svd_a.vt and svd_b.vt must have the same number of columns '
        f'(parameters P), got {vt_a.shape[1]} and {vt_b.shape[1]}.')
  bound = min(vt_a.shape[0], vt_b.shape[0])
  k = checks.check_int(k, 'k', fn, optional=True)
  if k is None:
    k = bound
  if not 1 <= k <= bound:
    raise ValueError(
        f'{fn}: k must satisfy 1 <= k <= min(rank of svd_a, rank of svd_b) = '
        f'min({vt_a.shape[0]}, {vt_b.shape[0]}) = {bound}, got {k}.')
  return vt_a[:k], vt_b[:k], k


def principal_angle_cosines(svd_a: JacobianSVD, svd_b: JacobianSVD,
                            k: int | None = None) -> jax.Array:
  r"""Cosines of the principal angles between two top-``k`` subspaces.

  The singular values of :math:`V_a V_b^\top` (``vt`` rows ``[:k]`` of each),
  descending and clipped to ``[0, 1]``.

  Args:
    svd_a: A :class:`JacobianSVD` (only ``vt`` is used).
    svd_b: Another one, with the same number of parameters ``P``.
    k: Directions of each to compare (static; default the smaller ``k``).

  Returns:
    Cosines of shape ``[k]``: 1 for shared directions, 0 for orthogonal ones.

  Raises:
    ValueError: if the ``vt`` widths differ or ``k`` is outside
      ``[1, min(k_a, k_b)]``.
  """
  vt_a, vt_b, _ = _top_rows(svd_a, svd_b, k, 'principal_angle_cosines')
  overlap = jnp.matmul(vt_a, vt_b.T, precision=_HIGHEST)
  return jnp.clip(jnp.linalg.svd(overlap, compute_uv=False), 0.0, 1.0)


def subspace_overlap(svd_a: JacobianSVD, svd_b: JacobianSVD,
                     k: int | None = None) -> jax.Array:
  r"""Mean squared cosine of the principal angles between top-``k`` subspaces.

  .. math::
    \mathrm{overlap} = \frac{1}{k} \lVert V_a V_b^\top \rVert_F^2
      = \frac{1}{k} \sum_{i, j \le k} (v_{a,i} \cdot v_{b,j})^2 \in [0, 1],

  symmetric; 1 when both span the same subspace, 0 when they are orthogonal.
  This is the unweighted version of the NTK overlap of Doan et al. 2021.

  Args:
    svd_a: A :class:`JacobianSVD` (only ``vt`` is used).
    svd_b: Another one, with the same number of parameters ``P``.
    k: Directions of each to compare (static; default the smaller ``k``).

  Returns:
    A scalar in ``[0, 1]``.

  Raises:
    ValueError: if the ``vt`` widths differ or ``k`` is outside
      ``[1, min(k_a, k_b)]``.

  References:
    Doan et al., `A Theoretical Analysis of Catastrophic Forgetting through
    the NTK Overlap Matrix <https://arxiv.org/abs/2010.04003>`_, AISTATS 2021
  """
  vt_a, vt_b, k = _top_rows(svd_a, svd_b, k, 'subspace_overlap')
  overlap = jnp.matmul(vt_a, vt_b.T, precision=_HIGHEST)
  return jnp.clip(jnp.sum(overlap**2) / k, 0.0, 1.0)


def weighted_subspace_overlap(svd_a: JacobianSVD, svd_b: JacobianSVD,
                              k: int | None = None) -> jax.Array:
  r"""Energy-weighted overlap of two top-``k`` subspaces.

  With :math:`K_a = V_a^\top S_a^2 V_a` and :math:`K_b` likewise (the rank-k
  approximations of :math:`J_a^\top J_a`, :math:`J_b^\top J_b`), this is the
  cosine similarity of the two PSD matrices:

  .. math::
    \frac{\langle K_a, K_b \rangle_F}{\lVert K_a \rVert_F
      \lVert K_b \rVert_F}
    = \frac{\sum_{i, j \le k} s_{a,i}^2 s_{b,j}^2
      (v_{a,i} \cdot v_{b,j})^2}{\sqrt{\sum_i s_{a,i}^4}
      \sqrt{\sum_j s_{b,j}^4}} \in [0, 1]

  (Cauchy-Schwarz), symmetric, 1 for identical SVDs (or proportional
  spectra on the same directions), 0 for orthogonal subspaces; 0 if either
  spectrum is all zeros. NaN in ``s`` or ``vt`` gives NaN.

  Args:
    svd_a: A :class:`JacobianSVD` (``s`` and ``vt`` are used).
    svd_b: Another one, with the same number of parameters ``P``.
    k: Directions of each to compare (static; default the smaller ``k``).

  Returns:
    A scalar in ``[0, 1]``.

  Raises:
    ValueError: if the ``vt`` widths differ or ``k`` is outside
      ``[1, min(k_a, k_b)]``.

  References:
    Doan et al., `A Theoretical Analysis of Catastrophic Forgetting through
    the NTK Overlap Matrix <https://arxiv.org/abs/2010.04003>`_, AISTATS 2021
  """
  vt_a, vt_b, k = _top_rows(svd_a, svd_b, k, 'weighted_subspace_overlap')
  w_a = jnp.asarray(svd_a.s)[:k]**2
  w_b = jnp.asarray(svd_b.s)[:k]**2
  overlap = jnp.matmul(vt_a, vt_b.T, precision=_HIGHEST)
  num = jnp.matmul(w_a, jnp.matmul(overlap**2, w_b, precision=_HIGHEST),
                   precision=_HIGHEST)
  den = jnp.linalg.norm(w_a) * jnp.linalg.norm(w_b)
  # den is 0 only when a spectrum is all zeros, and then the overlap is 0.
  # Test den == 0 rather than den > 0, and keep 0 * ratio (0, or NaN when
  # num is), so that NaN in s or vt gives NaN instead of a silent 0.
  zero = den == 0
  ratio = num / jnp.where(zero, 1, den)
  ratio = jnp.where(zero, 0 * ratio, ratio)
  return jnp.clip(ratio, 0.0, 1.0)

