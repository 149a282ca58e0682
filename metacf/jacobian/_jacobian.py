r"""Jacobians, empirical NTKs, top-k Jacobian SVDs and NTK-predicted forgetting.

Conventions. ``apply_fn(params, x)`` maps a batch of ``N`` examples to outputs
of shape ``[N, C]``. A Jacobian :math:`J = \partial f / \partial \theta` has
one row per (example, output) pair in row-major order (row ``n * C + c``) and
one column per parameter in ``jax.flatten_util.ravel_pytree(params)`` order:
shape ``[N * C, P]``. The empirical neural tangent kernel is
:math:`\Theta(x_1, x_2) = J(x_1) J(x_2)^\top`, shape ``[N1 * C, N2 * C]``,
with rows and columns in that same (example, output) order.

Example::

  from metacf import jacobian as jac

  svd_a = jac.jacobian_svd(apply_fn, params, x_a, 10, method='gram')
  svd_b = jac.jacobian_svd(apply_fn, params, x_b, 10, method='gram')
  overlap = jac.subspace_overlap(svd_a, svd_b)          # in [0, 1]
  delta = jac.predicted_forgetting(apply_fn, params, (x_a, y_a), (x_b, y_b),
                                   lr=0.1, num_steps=100)  # > 0: forgetting

Static arguments. ``k``, ``method``, ``implementation``, ``mode``, ``loss``,
``num_steps``, ``chunk_size``, ``oversampling`` and ``num_power_iters`` select
shapes and code paths, so they must be Python values. To use these functions
inside ``jax.jit``, close over ``apply_fn`` and those arguments (e.g. with
``functools.partial``) and pass ``params``, inputs, targets, ``lr`` and ``key``
as traced arguments. Argument checks run on static information only (shapes,
dtypes, Python numbers) and are skipped for traced values.

Batch coupling. :func:`ntk`, the ``'gram'`` and ``'randomized'`` SVDs and the
forgetting predictions differentiate ``apply_fn`` on the whole batch, so they
are exact for any model, including ones that mix examples (batch statistics).
:func:`jacobian` (and so the ``'dense'`` SVD) evaluates ``apply_fn`` on chunks
of ``chunk_size`` examples: with a chunk size below ``N`` that is exact only
when ``apply_fn`` treats examples independently; the default is one chunk.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf._src.types import ApplyFn, Params

# `auto` picks 'dense' while the Jacobian has at most this many entries
# (N * C * P <= 4,194,304: 32 MiB in float64) ...
_DENSE_MAX_ENTRIES = 2**22
# ... else 'gram' while the NTK is at most this many rows (4096 x 4096) ...
_GRAM_MAX_ROWS = 4096
# ... else 'randomized'.

# Default block of NTK columns computed together by 'ntk_vector_products'.
_NTK_BLOCK_COLUMNS = 64

# Function-space GD steps unrolled per scan iteration: the steps are small
# matrix-vector products, and unrolling them measured ~1.4x faster to compile
# (3 and 6 steps, CPU) than a rolled scan.
_SCAN_UNROLL = 8

_SVD_METHODS = ('auto', 'dense', 'gram', 'randomized')
_NTK_IMPLEMENTATIONS = ('ntk_vector_products', 'jacobian_contraction')
_JACOBIAN_MODES = ('rev', 'fwd')
_LOSSES = ('mse', 'cross_entropy')
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
# Argument checks (static information only).


def _check_static_int(value: Any, name: str, fn: str, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{fn}: {name} must be a Python int, got {value!r}.')
  if value < minimum:
    raise ValueError(f'{fn}: {name} must be >= {minimum}, got {value}.')
  return int(value)


def _check_choice(value: Any, name: str, choices: tuple[str, ...],
                  fn: str) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f'{fn}: {name} must be one of '
        f'{", ".join(repr(c) for c in choices)}, got {value!r}.')
  return value


def _check_rank(k: Any, num_rows: int, num_params: int, fn: str) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f'{fn}: k must be a Python int, got {k!r}.')
  bound = min(num_rows, num_params)
  if not 1 <= k <= bound:
    raise ValueError(
        f'{fn}: k must satisfy 1 <= k <= min(N * C, P) = '
        f'min({num_rows}, {num_params}) = {bound}, got {k}.')
  return int(k)


def _flatten_params(params: Params,
                    fn: str) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  flat, unravel = ravel_pytree(params)
  if flat.size == 0:
    raise ValueError(f'{fn}: params must contain at least one parameter, got '
                     'an empty pytree.')
  if not jnp.issubdtype(flat.dtype, jnp.floating):
    raise TypeError(
        f'{fn}: params must have a floating dtype, got {flat.dtype}.')
  return flat, unravel


def _as_batch(x: Any, name: str, fn: str) -> tuple[Any, int]:
  """Converts the leaves of ``x`` to arrays; returns it and its batch size."""
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves:
    raise ValueError(f'{fn}: {name} must contain at least one array, got '
                     f'{x!r}.')
  shapes = [np.shape(leaf) for leaf in leaves]
  sizes = {s[0] if s else None for s in shapes}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f'{fn}: {name} must have a leading example axis shared by all its '
        f'leaves, got shapes {shapes}.')
  n = sizes.pop()
  if n < 1:
    raise ValueError(f'{fn}: {name} must contain at least one example, got '
                     f'{n}.')
  return jax.tree_util.tree_map(jnp.asarray, x), n


def _num_outputs(apply_fn: ApplyFn, unravel: Callable[[jax.Array], Any],
                 flat: jax.Array, x: Any, n: int, name: str, fn: str) -> int:
  """Checks ``apply_fn(params, x)`` has shape [N, C] (abstractly); returns C."""
  out = jax.eval_shape(lambda theta: apply_fn(unravel(theta), x), flat)
  if len(out.shape) != 2 or out.shape[0] != n:
    raise ValueError(
        f'{fn}: apply_fn(params, {name}) must return outputs of shape [N, C] '
        f'with N = {n}, got shape {tuple(out.shape)}.')
  if out.shape[1] < 1:
    raise ValueError(f'{fn}: apply_fn(params, {name}) must return at least '
                     'one output per example, got C = 0.')
  return out.shape[1]


def _flat_fn(apply_fn: ApplyFn, unravel: Callable[[jax.Array], Any],
             x: Any) -> Callable[[jax.Array], jax.Array]:
  return lambda theta: apply_fn(unravel(theta), x)


# ---------------------------------------------------------------------------
# Jacobian and NTK.


def jacobian(apply_fn: ApplyFn, params: Params, x: Any, *,
             chunk_size: int | None = None, mode: str = 'rev') -> jax.Array:
  r"""The dense Jacobian of ``apply_fn`` with respect to the parameters.

  :math:`J[n C + c, p] = \partial f(\theta, x)_{n c} / \partial \theta_p`,
  computed one chunk of ``chunk_size`` examples at a time (``jax.jacrev`` or
  ``jax.jacfwd`` of the chunk's outputs; ``lax.map`` over whole chunks, one
  more call for the remainder). Meant for small models and as a reference;
  :func:`ntk` and :func:`jacobian_svd` avoid forming ``J``.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, C]``.
    params: Parameter pytree (floating).
    x: Inputs, an array or pytree of arrays with a leading example axis ``N``.
    chunk_size: Examples per chunk (static; default all ``N`` in one chunk,
      exact for any model). Smaller chunks bound the memory of one
      ``jacrev``/``jacfwd`` but assume that ``apply_fn`` treats examples
      independently. In ``'rev'`` mode a chunk of ``b`` examples costs
      ``b * C`` backward passes over ``b`` examples.
    mode: ``'rev'`` (``jax.jacrev``, best when ``C * chunk_size < P``) or
      ``'fwd'`` (``jax.jacfwd``, ``P`` forward-mode passes).

  Returns:
    ``J`` of shape ``[N * C, P]``, in the dtype of the outputs.

  Raises:
    ValueError: if ``x`` has no shared leading axis, ``apply_fn`` does not
      return ``[N, C]``, ``chunk_size < 1`` or ``mode`` is unknown.
    TypeError: if ``params`` is not floating or ``chunk_size`` not an int.
  """
  fn = 'jacobian'
  mode = _check_choice(mode, 'mode', _JACOBIAN_MODES, fn)
  flat, unravel = _flatten_params(params, fn)
  x, n = _as_batch(x, 'x', fn)
  _num_outputs(apply_fn, unravel, flat, x, n, 'x', fn)
  if chunk_size is None:
    chunk_size = n
  chunk_size = min(_check_static_int(chunk_size, 'chunk_size', fn, minimum=1),
                   n)
  num_params = flat.size
  jac = jax.jacrev if mode == 'rev' else jax.jacfwd

  def chunk_jacobian(x_chunk):
    j = jac(_flat_fn(apply_fn, unravel, x_chunk))(flat)  # [b, C, P]
    return j.reshape(-1, num_params)

  num_full, rest = divmod(n, chunk_size)
  blocks = []
  if num_full == 1:
    blocks.append(chunk_jacobian(
        jax.tree_util.tree_map(lambda a: a[:chunk_size], x)))
  elif num_full > 1:
    chunks = jax.tree_util.tree_map(
        lambda a: a[:num_full * chunk_size].reshape(
            (num_full, chunk_size) + a.shape[1:]), x)
    blocks.append(
        jax.lax.map(chunk_jacobian, chunks).reshape(-1, num_params))
  if rest:
    blocks.append(chunk_jacobian(
        jax.tree_util.tree_map(lambda a: a[num_full * chunk_size:], x)))
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=0)


def ntk(apply_fn: ApplyFn, params: Params, x1: Any, x2: Any, *,
        implementation: str = 'ntk_vector_products',
        chunk_size: int | None = None) -> jax.Array:
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

  Returns:
    :math:`\Theta` of shape ``[N1 * C, N2 * C]``, rows and columns in
    (example, output) row-major order.

  Raises:
    ValueError: on an unknown ``implementation``, inputs without a leading
      example axis, outputs that are not ``[N, C]``, or ``chunk_size < 1``.

  References:
    Jacot et al., `Neural Tangent Kernel: Convergence and Generalization in
    Neural Networks <https://arxiv.org/abs/1806.07572>`_, 2018;
    Novak et al., `Fast Finite Width Neural Tangent Kernel
    <https://arxiv.org/abs/2206.08720>`_, 2022 (neural-tangents)
  """
  fn = 'ntk'
  implementation = _check_choice(implementation, 'implementation',
                                 _NTK_IMPLEMENTATIONS, fn)
  flat, unravel = _flatten_params(params, fn)
  x1, n1 = _as_batch(x1, 'x1', fn)
  x2, n2 = _as_batch(x2, 'x2', fn)
  c1 = _num_outputs(apply_fn, unravel, flat, x1, n1, 'x1', fn)
  c2 = _num_outputs(apply_fn, unravel, flat, x2, n2, 'x2', fn)
  if c1 != c2:
    raise ValueError(
        f'{fn}: apply_fn(params, x1) and apply_fn(params, x2) must have the '
        f'same number of outputs C, got {c1} and {c2}.')
  if chunk_size is not None:
    chunk_size = _check_static_int(chunk_size, 'chunk_size', fn, minimum=1)
  if implementation == 'jacobian_contraction':
    j1 = jacobian(apply_fn, params, x1, chunk_size=chunk_size)
    j2 = jacobian(apply_fn, params, x2, chunk_size=chunk_size)
    return jnp.matmul(j1, j2.T, precision=_HIGHEST)
  (kernel,) = _ntk_vector_products([_flat_fn(apply_fn, unravel, x1)],
                                   _flat_fn(apply_fn, unravel, x2), flat,
                                   (n2, c2), chunk_size)
  return kernel


def _ntk_vector_products(row_fns: list[Callable[[jax.Array], jax.Array]],
                         f2: Callable[[jax.Array], jax.Array],
                         flat: jax.Array, shape2: tuple[int, int],
                         chunk_size: int | None) -> list[jax.Array]:
  """``[J_r J2^T for each row function]``, one block of columns at a time.

  Each column ``J2^T e_j`` comes from one VJP of ``f2`` and is shared by the
  JVPs of every function in ``row_fns``.
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
    return [f1_jvp(direction).reshape(-1) for f1_jvp in row_jvps]

  if block == num_cols:  # One block: a plain vmap, no loop.
    blocks_t = jax.vmap(column)(cols)
  else:
    blocks_t = jax.lax.map(column, cols, batch_size=block)
  return [block_t.T for block_t in blocks_t]


# ---------------------------------------------------------------------------
# Top-k SVD of the Jacobian.


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
  method = _check_choice(method, 'method', _SVD_METHODS, fn)
  flat, unravel = _flatten_params(params, fn)
  x, n = _as_batch(x, 'x', fn)
  c = _num_outputs(apply_fn, unravel, flat, x, n, 'x', fn)
  num_rows, num_params = n * c, flat.size
  k = _check_rank(k, num_rows, num_params, fn)
  oversampling = _check_static_int(oversampling, 'oversampling', fn,
                                   minimum=0)
  num_power_iters = _check_static_int(num_power_iters, 'num_power_iters', fn,
                                      minimum=0)
  if method == 'auto':
    method = auto_svd_method(num_rows, num_params)
  if method == 'randomized' and key is None:
    raise ValueError(
        f"{fn}: key must be a jax.random key when method is (or 'auto' "
        "resolves to) 'randomized', got None.")

  if method == 'dense':
    j = jacobian(apply_fn, params, x, chunk_size=chunk_size)
    u, s, vt = _thin_svd(j)
    return _canonical_signs(u[:, :k], s[:k], vt[:k])

  f = _flat_fn(apply_fn, unravel, x)
  _, f_vjp = jax.vjp(f, flat)

  def project_rows(q):  # q [N*C, l] -> q^T J [l, P], by l batched VJPs.
    return jax.vmap(lambda col: f_vjp(col.reshape(n, c))[0])(q.T)

  if method == 'gram':
    kernel = ntk(apply_fn, params, x, x, chunk_size=chunk_size)
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
  if k is None:
    k = bound
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f'{fn}: k must be a Python int or None, got {k!r}.')
  if not 1 <= k <= bound:
    raise ValueError(
        f'{fn}: k must satisfy 1 <= k <= min(rank of svd_a, rank of svd_b) = '
        f'min({vt_a.shape[0]}, {vt_b.shape[0]}) = {bound}, got {k}.')
  return vt_a[:k], vt_b[:k], int(k)


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
  spectrum is all zeros.

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
  positive = den > 0
  ratio = jnp.where(positive, num / jnp.where(positive, den, 1), 0)
  return jnp.clip(ratio, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Forgetting predicted by the linearised model.


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
  x, n = _as_batch(x, f'{name} x', fn)
  c = _num_outputs(apply_fn, unravel, flat, x, n, f'{name} x', fn)
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
  if not checks.is_traced(y):
    labels = np.asarray(y)
    if labels.min() < 0 or labels.max() >= c:
      raise ValueError(
          f'{fn}: {name} labels y must be in [0, C) = [0, {c}), got values '
          f'in [{labels.min()}, {labels.max()}].')
  return x, jnp.asarray(y), n, c


def _check_forgetting_args(apply_fn, params, task_a, task_b, lr, num_steps,
                           loss, fn):
  loss = _check_choice(loss, 'loss', _LOSSES, fn)
  if np.ndim(lr) != 0:
    raise ValueError(f'{fn}: lr must be a scalar, got shape {np.shape(lr)}.')
  checks.check_positive(lr, 'lr', fn)
  num_steps = _check_static_int(num_steps, 'num_steps', fn, minimum=0)
  flat, unravel = _flatten_params(params, fn)
  x_a, y_a, n_a, c_a = _check_task(task_a, 'task_a', loss, apply_fn, unravel,
                                   flat, fn)
  x_b, y_b, n_b, c_b = _check_task(task_b, 'task_b', loss, apply_fn, unravel,
                                   flat, fn)
  if c_a != c_b:
    raise ValueError(
        f'{fn}: task_a and task_b outputs must have the same number of '
        f'outputs C, got {c_a} and {c_b}.')
  return loss, num_steps, flat, unravel, (x_a, y_a, n_a), (x_b, y_b, n_b), c_a


# g [N_B * C] -> (kernel block) @ g, for one task; None when num_steps = 0.
_KernelProduct = Callable[[jax.Array], jax.Array] | None


def _function_space_gd(f_a0: jax.Array, y_a: jax.Array, f_b0: jax.Array,
                       y_b: jax.Array, step_a: _KernelProduct,
                       step_b: _KernelProduct, lr: Any, num_steps: int,
                       loss: str) -> jax.Array:
  """Runs the linearised dynamics; returns L_A(f_A^T) - L_A(f_A^0)."""
  if loss == 'mse':
    y_a, y_b = y_a.astype(f_a0.dtype), y_b.astype(f_b0.dtype)
  lr = jnp.asarray(lr).astype(f_b0.dtype)
  grad_b = jax.grad(lambda f: _task_loss(f, y_b, loss))  # Includes the 1/N_B.

  def step(carry, _):
    f_a, f_b = carry
    g = grad_b(f_b).reshape(-1)
    return (f_a - lr * step_a(g).reshape(f_a.shape),
            f_b - lr * step_b(g).reshape(f_b.shape)), None

  f_a = f_a0
  if num_steps:
    (f_a, _), _ = jax.lax.scan(step, (f_a0, f_b0), None, length=num_steps,
                               unroll=min(num_steps, _SCAN_UNROLL))
  return _task_loss(f_a, y_a, loss) - _task_loss(f_a0, y_a, loss)


def predicted_forgetting(apply_fn: ApplyFn, params: Params, task_a: Any,
                         task_b: Any, *, lr: Any, num_steps: int,
                         loss: str = 'mse',
                         chunk_size: int | None = None) -> jax.Array:
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
      share each column's VJP).

  Returns:
    The predicted change of :math:`L_A`, a scalar.

  Raises:
    ValueError: on an unknown ``loss``, ``lr <= 0``, ``num_steps < 0``,
      targets of the wrong shape (``[N, C]`` for mse, ``[N]`` for
      cross-entropy), labels outside ``[0, C)``, or tasks whose inputs have
      no leading example axis.
    TypeError: if a task is not a pair, or labels are not integers.

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
    chunk_size = _check_static_int(chunk_size, 'chunk_size', fn, minimum=1)
  f_a0 = apply_fn(params, x_a)
  f_b0 = apply_fn(params, x_b)
  if num_steps == 0:
    return _function_space_gd(f_a0, y_a, f_b0, y_b, None, None, lr, 0, loss)
  # Both blocks from one pass over the columns (the VJPs of f_B are shared).
  theta_ab, theta_bb = _ntk_vector_products(
      [_flat_fn(apply_fn, unravel, x_a), _flat_fn(apply_fn, unravel, x_b)],
      _flat_fn(apply_fn, unravel, x_b), flat, (n_b, c), chunk_size)
  step_b = lambda g: jnp.matmul(theta_bb, g, precision=_HIGHEST)
  step_a = lambda g: jnp.matmul(theta_ab, g, precision=_HIGHEST)
  return _function_space_gd(f_a0, y_a, f_b0, y_b, step_a, step_b, lr,
                            num_steps, loss)


def predicted_forgetting_low_rank(
    apply_fn: ApplyFn, params: Params, task_a: Any, task_b: Any, *, k: int,
    lr: Any, num_steps: int, loss: str = 'mse', method: str = 'auto',
    key: jax.Array | None = None, oversampling: int = 10,
    num_power_iters: int = 2, chunk_size: int | None = None) -> jax.Array:
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
  k = _check_rank(k, n_b * c, flat.size, fn)
  if num_steps == 0:
    return _function_space_gd(apply_fn(params, x_a), y_a,
                              apply_fn(params, x_b), y_b, None, None, lr, 0,
                              loss)
  svd_b = jacobian_svd(apply_fn, params, x_b, k, method=method, key=key,
                       oversampling=oversampling,
                       num_power_iters=num_power_iters, chunk_size=chunk_size)
  f_a0, f_a_jvp = jax.linearize(_flat_fn(apply_fn, unravel, x_a), flat)
  f_b0, f_b_jvp = jax.linearize(_flat_fn(apply_fn, unravel, x_b), flat)
  # J V_B^T, shape [N * C, k], by k batched JVPs.
  g_a = jax.vmap(lambda v: f_a_jvp(v).reshape(-1))(svd_b.vt).T
  g_b = jax.vmap(lambda v: f_b_jvp(v).reshape(-1))(svd_b.vt).T

  def coefficients(g):  # (J_B V_B^T)^T g, shape [k].
    return jnp.matmul(g_b.T, g, precision=_HIGHEST)

  step_b = lambda g: jnp.matmul(g_b, coefficients(g), precision=_HIGHEST)
  step_a = lambda g: jnp.matmul(g_a, coefficients(g), precision=_HIGHEST)
  return _function_space_gd(f_a0, y_a, f_b0, y_b, step_a, step_b, lr,
                            num_steps, loss)
