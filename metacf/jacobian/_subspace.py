r"""Comparisons of the parameter-space subspaces of two Jacobian SVDs.

:func:`subspace_overlap`, :func:`weighted_subspace_overlap` and
:func:`principal_angle_cosines` compare the top-``k`` right singular vectors
(``vt`` rows) of two :class:`~metacf.jacobian.JacobianSVD`. Conventions in
:mod:`metacf.jacobian`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf.jacobian._svd import JacobianSVD

_HIGHEST = jax.lax.Precision.HIGHEST


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
