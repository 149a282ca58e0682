"""Orthonormal row bases of parameter space: checks and projections.

Shared by :mod:`metacf.protect` (gradient projections) and
:mod:`metacf.jacobian` (forgetting predicted under a projection).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks

_HIGHEST = jax.lax.Precision.HIGHEST
# Largest deviation of ``V V^T x`` from ``x`` (relative) accepted as
# orthonormal: float32 bases from an SVD or QR sit near 1e-6.
ORTHONORMAL_TOL = 1e-3


def check_basis(basis: Any, num_params: int | None, name: str,
                fn: str, *, columns: bool = False) -> None:
  """Checks ``basis [k, P]``: rank 2, floating, width P, orthonormal rows.

  Rows that are all zero are allowed (padding that keeps a growing basis at
  a fixed shape, so a jitted step compiles once); they project nothing.
  Orthonormality is checked on concrete bases only, by one probe: for a
  fixed random ``q [k]`` and ``w = V V^T q``, ``V V^T w`` must equal ``w``
  to :data:`ORTHONORMAL_TOL` relative to ``max |q|`` (cost ``4 k P``, not
  the ``k^2 P`` of the Gram matrix). For rows that are orthonormal or zero
  ``V V^T`` is a 0/1 diagonal, which passes; for a generic ``V`` (rows not
  unit, or not orthogonal) ``(V V^T)^2 q != V V^T q`` and it fails. What
  passes is (up to the probe) any ``V`` whose ``V^T V`` is an orthogonal
  projector, which is all that :func:`project_out` needs. A traced basis is
  checked under ``jit`` only with runtime checks on (:mod:`metacf.checks`).

  With ``columns=True`` the basis is ``M [d, r]`` with one direction per
  column (GPM's layout, :func:`metacf.protect.gpm_basis`): the same checks
  on ``M^T``, ``num_params`` is ``d`` and the messages say columns.
  """
  shape = np.shape(basis)
  if len(shape) != 2:
    layout = ('[d, r] (one orthonormal direction per column)' if columns
              else '[k, P] (one orthonormal direction per row)')
    raise ValueError(f'{fn}: {name} must have shape {layout}, got shape '
                     f'{shape}.')
  dtype = jnp.result_type(basis)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{fn}: {name} must be floating, got dtype {dtype}.')
  width = shape[0] if columns else shape[1]
  if num_params is not None and width != num_params:
    what = 'row per input dimension, d' if columns else (
        'column per parameter, P')
    raise ValueError(
        f'{fn}: {name} must have one {what} = {num_params}, got shape '
        f'{shape}.')
  k = shape[1] if columns else shape[0]
  if k == 0:
    return
  if columns:
    message = (
        f'{fn}: {name} must have orthonormal columns (M^T M = I; zero '
        'columns allowed), got max |(M^T M)^2 q - M^T M q| / max |q| = '
        '{err:.3g} for a random q (tolerance '
        f'{ORTHONORMAL_TOL:g}); orthonormalise it, e.g. with '
        'jnp.linalg.qr(basis)[0].')
  else:
    message = (
        f'{fn}: {name} must have orthonormal rows (V V^T = I; zero rows '
        'allowed), got max |(V V^T)^2 q - V V^T q| / max |q| = {err:.3g} '
        f'for a random q (tolerance {ORTHONORMAL_TOL:g}); orthonormalise '
        'it, e.g. with metacf.protect.extend_basis(None, vectors).')
  ok = lambda xp, err: err <= ORTHONORMAL_TOL  # Also False for NaN.
  if checks.is_traced(basis):
    # Checked under checkify when runtime checks are on (metacf.checks).
    checks.value_check([basis], lambda xp, v: {'err': _probe_error(v, columns)},
                       ok, message)
    return
  # On the basis' device, no host copy; evaluated now even inside a trace
  # (a concrete basis closed over by a jitted function).
  with jax.ensure_compile_time_eval():
    err = _probe_error(basis, columns)
  if not ok(np, err):
    raise ValueError(message.format(err=err))


def _probe_error(basis: Any, columns: bool) -> Any:
  """``max |(V V^T)^2 q - V V^T q| / max |q|`` for a fixed random ``q``."""
  dtype = jnp.result_type(basis)
  v = jnp.asarray(basis)
  if columns:
    v = v.T
  probe = np.random.default_rng(0).standard_normal(v.shape[0]).astype(dtype)
  gram_times = lambda q: jnp.matmul(v, jnp.matmul(q, v, precision=_HIGHEST),
                                    precision=_HIGHEST)
  once = gram_times(jnp.asarray(probe))
  err = jnp.max(jnp.abs(gram_times(once) - once)) / np.max(np.abs(probe))
  return err if checks.is_traced(err) else float(err)


def project_out(basis: jax.Array, flat: jax.Array) -> jax.Array:
  """``flat - basis^T (basis flat)`` for ``basis [k, P]``, ``flat [P]``."""
  basis = basis.astype(flat.dtype)
  coefficients = jnp.matmul(basis, flat, precision=_HIGHEST)
  return flat - jnp.matmul(coefficients, basis, precision=_HIGHEST)
