"""The dense, chunked Jacobian and the helpers shared by ``metacf.jacobian``.

The shared helpers check and prepare the arguments every kernel takes
(``params``, a batch ``x``, ``apply_fn``'s output shape) on static information
only. The conventions (row and column order, static arguments, batch
coupling) are in the package docstring, :mod:`metacf.jacobian`.
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

from metacf._src import checks
from metacf._src.types import ApplyFn, Params

_JACOBIAN_MODES = ('rev', 'fwd')


# ---------------------------------------------------------------------------
# Shared argument checks and helpers (static information only).


def flatten_params(params: Params,
                   fn: str) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  flat, unravel = ravel_pytree(params)
  if flat.size == 0:
    raise ValueError(f'{fn}: params must contain at least one parameter, got '
                     'an empty pytree.')
  if not jnp.issubdtype(flat.dtype, jnp.floating):
    raise TypeError(
        f'{fn}: params must have a floating dtype, got {flat.dtype}.')
  return flat, unravel


def as_batch(x: Any, name: str, fn: str) -> tuple[Any, int]:
  """Converts the leaves of ``x`` to arrays; returns it and its batch size."""
  n = checks.leading_size(x, name, fn, min_size=1)
  return jax.tree.map(jnp.asarray, x), n


def num_outputs(apply_fn: ApplyFn, unravel: Callable[[jax.Array], Any],
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


def flat_fn(apply_fn: ApplyFn, unravel: Callable[[jax.Array], Any],
            x: Any) -> Callable[[jax.Array], jax.Array]:
  return lambda theta: apply_fn(unravel(theta), x)


def check_mesh(mesh: Any, n: int, name: str, fn: str) -> str | None:
  """Checks a 1-D ``jax.sharding.Mesh`` for ``n`` examples; returns its axis."""
  if mesh is None:
    return None
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f'{fn}: mesh must be a jax.sharding.Mesh or None, got '
                    f'{type(mesh).__name__}.')
  if len(mesh.axis_names) != 1:
    raise ValueError(
        f'{fn}: mesh must be 1-D (one axis, over which the examples are '
        f'sharded), got axes {mesh.axis_names} of shape '
        f'{tuple(mesh.devices.shape)}.')
  if n % mesh.size:
    raise ValueError(
        f'{fn}: the number of examples of {name} must be divisible by the '
        f'mesh size {mesh.size}, got {n}.')
  return mesh.axis_names[0]


def sharding_fns(mesh: Any, axis: str | None):
  """``(shard_rows, replicate)``: sharding constraints, identities if no mesh.

  ``shard_rows`` puts the leading axis (examples, or the (example, output)
  rows of ``J``) over the mesh axis; ``replicate`` puts a whole copy on every
  device (parameters and parameter-space vectors).
  """
  if axis is None:
    return (lambda a: a), (lambda a: a)
  # with_sharding_constraint takes Auto axes only; jax.make_mesh makes
  # Explicit ones. The same devices with Auto axes let XLA's partitioner
  # place every intermediate (explicit mode would need an out_sharding on
  # each contraction over examples).
  auto = jax.sharding.AxisType.Auto
  if any(t != auto for t in mesh.axis_types):
    mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(auto,) * len(mesh.axis_names))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shard_rows = lambda t: jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(a, rows), t)
  replicate = lambda t: jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(a, whole), t)
  return shard_rows, replicate


# ---------------------------------------------------------------------------
# The dense Jacobian.


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
  mode = checks.check_choice(mode, _JACOBIAN_MODES, 'mode', fn)
  flat, unravel = flatten_params(params, fn)
  x, n = as_batch(x, 'x', fn)
  num_outputs(apply_fn, unravel, flat, x, n, 'x', fn)
  if chunk_size is None:
    chunk_size = n
  chunk_size = min(checks.check_int(chunk_size, 'chunk_size', fn, min_value=1),
                   n)
  num_params = flat.size
  jac = jax.jacrev if mode == 'rev' else jax.jacfwd

  def chunk_jacobian(x_chunk):
    j = jac(flat_fn(apply_fn, unravel, x_chunk))(flat)  # [b, C, P]
    return j.reshape(-1, num_params)

  num_full, rest = divmod(n, chunk_size)
  blocks = []
  if num_full == 1:
    blocks.append(chunk_jacobian(
        jax.tree.map(lambda a: a[:chunk_size], x)))
  elif num_full > 1:
    chunks = jax.tree.map(
        lambda a: a[:num_full * chunk_size].reshape(
            (num_full, chunk_size) + a.shape[1:]), x)
    blocks.append(
        jax.lax.map(chunk_jacobian, chunks).reshape(-1, num_params))
  if rest:
    blocks.append(chunk_jacobian(
        jax.tree.map(lambda a: a[num_full * chunk_size:], x)))
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=0)

