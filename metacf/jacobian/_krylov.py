r"""Matrix-free block Krylov solver for the top of :math:`J J^\top`.

The randomized method of :func:`metacf.jacobian.jacobian_svd`: block Lanczos
with full re-orthogonalisation on :math:`J J^\top` (Musco & Musco 2015; Golub
& Van Loan Sec. 10.1), driven by batched JVPs and VJPs, with Rayleigh-Ritz
extraction, an optional stopping rule on the Ritz residuals, and the small
dense helpers it shares with the other methods (:func:`thin_svd`,
:func:`ritz_residual`). Conventions in :mod:`metacf.jacobian`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST

# Relative size of the random part added to each Krylov block (see
# block_krylov): eps ** this.
_RESTART_EXPONENT = 0.75
# The randomized method keeps J^T Q (and skips k VJPs) up to this size.
_KEEP_JT_Q_BYTES = 2**30
# The randomized method tests its stopping rule every this many columns.
_CHECK_COLUMNS = 4


def default_krylov_dim(k: int) -> int:
  """The randomized method's default Krylov dimension, ``4 k + 20``.

  Chosen by measurement (float64 NumPy, 1000 x 5000 and 300 x 2000 matrices
  with ``s_k / s_(k+1)`` = 1.01-1.02, power-law, geometric and clustered
  spectra, k = 5, 10, 20, 4 keys each): single-vector blocks reached
  relative errors <= 1e-5 on every ``s_i``, ``i <= k``, where ``3 k`` (k >= 10)
  or ``6 k`` (k = 5) still missed 1e-3 on some. Capped at ``min(N * C, P)``.
  """
  return 4 * k + 20


def krylov_shape(k: int, krylov_dim: int, block_size: int,
                  bound: int) -> tuple[int, int]:
  """``(block_size, num_blocks)`` for a Krylov space of about ``krylov_dim``.

  The space never exceeds ``bound = min(N * C, P)`` columns (its vectors
  could not all be orthogonal). Where the requested space covers the whole
  row space, one block of ``bound`` vectors gives it exactly, in one
  batched product; where capping leaves fewer than ``k`` columns, likewise.
  """
  num_blocks = math.ceil(krylov_dim / block_size)
  if block_size * num_blocks >= bound:
    num_blocks = bound // block_size
    if krylov_dim >= bound or block_size * num_blocks < k:
      return bound, 1
  return block_size, num_blocks


def thin_svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``jnp.linalg.svd(a, full_matrices=False)``, through ``a.T`` if wide.

  LAPACK's SVD of a wide ``[l, P]`` matrix is slower on CPU than that of its
  transpose, with the same values (see the benchmarks page).
  """
  if a.shape[0] >= a.shape[1]:
    return jnp.linalg.svd(a, full_matrices=False)
  v, s, ut = jnp.linalg.svd(a.T, full_matrices=False)
  return ut.T, s, v.T


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def ritz_residual(jjt_u: jax.Array, u: jax.Array, s: jax.Array) -> jax.Array:
  r""":math:`\lVert J v_i - s_i u_i \rVert` from :math:`J J^\top u_i`.

  With :math:`J^\top u_i = s_i v_i`, :math:`J v_i = J J^\top u_i / s_i`.
  """
  r = jnp.linalg.norm(jjt_u - u * (s**2)[None, :], axis=0)
  return jnp.where(s > 0, r / jnp.where(s > 0, s, 1), jnp.inf)


def _orthonormalize(z: jax.Array, basis: jax.Array) -> jax.Array:
  """Orthonormal columns spanning ``z`` minus its part in ``basis``.

  Block classical Gram-Schmidt, twice ("twice is enough", Giraud et al.
  2005), then a QR within the block. Zero columns of ``basis`` (the unfilled
  part of a preallocated Krylov basis) do nothing.
  """
  for _ in range(2):
    z = z - mm(basis, mm(basis.T, z))
  if z.shape[1] == 1:  # Lanczos: a norm, not a LAPACK QR per step.
    return z / jnp.linalg.norm(z)
  q, _ = jnp.linalg.qr(z)
  return q


def _ritz(basis: jax.Array, products: jax.Array,
          k: int) -> tuple[jax.Array, jax.Array]:
  """Top-``k`` Ritz pairs ``(theta, y)`` of ``J J^T`` on ``span(basis)``.

  Unfilled (zero) columns of a preallocated basis give zero rows and columns
  of ``G = Q^T J J^T Q``, so zero eigenvalues below every positive one.
  """
  gram = mm(basis.T, products)
  theta, y = jnp.linalg.eigh(0.5 * (gram + gram.T))  # Ascending.
  return theta[::-1][:k], y[:, ::-1][:, :k]


def _converged(basis: jax.Array, products: jax.Array, k: int,
               tol: float) -> jax.Array:
  r"""Whether every top-``k`` Ritz pair has relative residual ``<= tol``.

  For a Ritz pair :math:`(\theta_i, Q y_i)` of :math:`J J^\top`,
  :math:`\rho_i = \lVert J J^\top Q y_i - \theta_i Q y_i \rVert / \theta_i`
  is about :math:`\lVert J v_i - s_i u_i \rVert / s_i`, and the error of
  ``s_i`` is then about :math:`\rho_i^2 s_i / (2 \delta_i)` (Kato-Temple),
  :math:`\delta_i` the relative gap of :math:`s_i^2` to the rest of the
  spectrum: ``tol = 1e-3`` and ``s_k / s_(k+1) = 1.01``
  (:math:`\delta \approx 0.02`) give about ``3e-5``. A larger ``tol`` can
  stop on Ritz values that lag a whole gap behind (1e-2 gave 1.1e-2).
  """
  theta, y = _ritz(basis, products, k)
  r = jnp.linalg.norm(mm(products, y) - mm(basis, y) * theta[None, :],
                      axis=0)
  return jnp.all((theta > 0) & (r <= tol * theta))


def _has_convolution(f, flat: jax.Array) -> bool:
  """Whether ``f(flat)`` contains a convolution (its jaxpr, nested too)."""
  return 'conv_general_dilated' in str(jax.make_jaxpr(f)(flat))


def check_unroll(unroll: Any, tol: float, fn: str) -> None:
  if unroll is not None and not isinstance(unroll, bool):
    raise TypeError(f'{fn}: unroll must be None or a bool, got {unroll!r}.')
  if unroll and tol > 0:
    raise ValueError(f'{fn}: unroll=True needs tol=0 (a stopping rule needs '
                     f'a while_loop), got tol={tol!r}.')


def auto_unroll(f, flat: jax.Array, tol: float) -> bool:
  """``unroll=None``: unroll the Krylov steps for a CNN on CPU.

  On XLA:CPU the JVPs and VJPs of a convolutional network run much slower
  inside a ``while_loop`` than unrolled, while unrolling costs compile time
  (see the benchmarks page). Hence: unrolled only with ``tol=0``, on the CPU
  backend, for a model with a convolution.
  """
  return (tol == 0 and jax.default_backend() == 'cpu'
          and _has_convolution(f, flat))


def block_krylov(jt_fn, j_fn, num_rows: int, num_params: int, dtype,
                  k: int, block_size: int, num_blocks: int, tol: float,
                  key: jax.Array, shard,
                  unroll: bool) -> tuple[jax.Array, ...]:
  r"""Block Krylov (block Lanczos with full re-orthogonalisation) of ``J J^T``.

  Returns the top-``k`` ``(u, s, vt, residual, num_products)``. See
  :func:`jacobian_svd`.
  """
  b, dim = block_size, block_size * num_blocks
  start_key, noise_key = jax.random.split(key)
  # A tiny random part (eps ** 0.75 relative) keeps the basis orthogonal
  # when the Krylov space is exhausted (J J^T q already in the span, e.g.
  # rank(J) < krylov_dim): the block is then completed by random directions
  # instead of rounding noise, which lost orthogonality (s off by 2x on a
  # rank-12 J without it). Measured: eps ** 0.5 left a relative residual
  # floor of 3e-4 in float32; eps ** 0.75 and 0.9 gave the same s.
  tau = float(np.finfo(dtype).eps) ** _RESTART_EXPONENT
  omega = jax.random.normal(start_key, (b, num_params), dtype)
  q0 = shard(_orthonormalize(j_fn(omega), jnp.zeros((num_rows, 1), dtype)))
  # The stopping rule costs an eigh of [dim, dim]: test it about every
  # _CHECK_COLUMNS new columns, once the basis has k of them.
  check_every = max(1, _CHECK_COLUMNS // b)

  # Keeping J^T Q ([dim, P]) saves the k VJPs of U_k^T J at the end, where
  # it fits in _KEEP_JT_Q_BYTES.
  keep = dim * num_params * np.dtype(dtype).itemsize <= _KEEP_JT_Q_BYTES
  jt_q = jnp.zeros((dim if keep else 0, num_params), dtype)

  # All the random directions at once: one PRNG call (a call per step made
  # compiling 100 unrolled steps of an MLP take 24 s instead of 15 s).
  noise = jax.random.normal(noise_key, (num_blocks, num_rows, b), dtype)
  noise = noise / jnp.linalg.norm(noise, axis=1, keepdims=True)

  def step(carry):
    i, basis, products, jt_q, q, _ = carry
    w = jt_fn(q)  # J^T q: b VJPs.
    z = shard(j_fn(w))  # J J^T q: b JVPs.
    basis = jax.lax.dynamic_update_slice_in_dim(basis, q, i * b, axis=1)
    products = jax.lax.dynamic_update_slice_in_dim(products, z, i * b,
                                                   axis=1)
    if keep:
      jt_q = jax.lax.dynamic_update_slice_in_dim(jt_q, w, i * b, axis=0)
    g = shard(jax.lax.dynamic_index_in_dim(noise, i, keepdims=False))
    z = z + tau * jnp.linalg.norm(z, axis=0, keepdims=True) * g
    test = ((i + 1) % check_every == 0) & ((i + 1) * b >= k)
    if tol > 0:
      done = jax.lax.cond(
          test, lambda: _converged(basis, products, k, tol),
          lambda: jnp.asarray(False))
    else:
      done = jnp.asarray(False)
    return (i + 1, basis, products, jt_q, shard(_orthonormalize(z, basis)),
            done)

  zeros = shard(jnp.zeros((num_rows, dim), dtype))
  carry = (jnp.asarray(0, jnp.int32), zeros, zeros, jt_q, q0,
           jnp.asarray(False))
  if unroll:  # See auto_unroll.
    for _ in range(num_blocks):
      carry = step(carry)
  else:
    carry = jax.lax.while_loop(
        lambda carry: (carry[0] < num_blocks) & ~carry[5], step, carry)
  num_blocks_used, basis, products, jt_q, _, _ = carry
  # Rayleigh-Ritz on span(basis): G = Q^T J J^T Q, top-k eigenvectors.
  _, y = _ritz(basis, products, k)
  u_k = mm(basis, y)
  # B = U_k^T J = U' S V^T; u = U_k U'. J J^T u from the stored products.
  u_small, s, vt = thin_svd(mm(y.T, jt_q) if keep else jt_fn(u_k))
  u = mm(u_k, u_small)
  residual = ritz_residual(mm(products, mm(y, u_small)), u, s)
  num_products = b * (1 + 2 * num_blocks_used) + (0 if keep else k)
  return u, s, vt, residual, num_products
