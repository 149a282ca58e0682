"""Mixing replayed items into the current batch (experience replay)."""

import jax
import jax.numpy as jnp

from metacf._src import checks
from metacf._src.types import Params
from metacf.replay import _buffer

ArrayLike = jax.typing.ArrayLike


def mix_replay(key: jax.Array, new_batch: Params, replay_batch: Params,
               replay_fraction: ArrayLike, *,
               replay_valid: ArrayLike | None = None
               ) -> tuple[Params, jax.Array]:
  r"""Replaces a fraction of ``new_batch``'s rows by replayed rows.

  Returns a batch of ``new_batch``'s size :math:`B` in which
  :math:`k = \mathrm{round}(\mathrm{replay\_fraction} \cdot B)` rows, at
  uniformly random positions, are ``replay_batch``'s first :math:`k` rows (in
  random order), and the other rows are ``new_batch``'s rows at those
  positions. ``is_replay`` marks the replayed rows, so that a loss can weight
  them, e.g. ``jnp.where(is_replay, replay_weight, 1.0) * per_example_loss``.
  Rolnick et al. (2019) mix new and replayed experience 50/50.

  ``replay_fraction = 0`` gives back ``new_batch`` exactly (``is_replay`` all
  False); ``1`` gives ``replay_batch[:B]``, shuffled.

  With ``replay_valid`` (the mask returned by a buffer's ``sample``), invalid
  replay rows are not used: those positions keep ``new_batch``'s row and
  ``is_replay`` is False there. So mixing with a sample from an empty buffer
  gives back the new batch, and no zero row is ever passed off as data.

  Rounding is half to even. A concrete ``replay_fraction`` (a Python number
  or a concrete array) is checked to lie in ``[0, 1]`` and ``replay_batch`` to
  have at least ``k`` rows. A traced one is clipped to ``[0, 1]``, :math:`k`
  is computed in float32 (so at an exact tie it may differ by one from the
  eager value) and clipped to ``replay_batch``'s number of rows.

  Args:
    key: PRNG key for the positions.
    new_batch: Pytree of arrays with a common leading size :math:`B`.
    replay_batch: Pytree of the same structure, leaf dtypes and item shapes,
      with a common leading size :math:`R` (:math:`R \ge k`; rows beyond the
      first :math:`k` are ignored).
    replay_fraction: Fraction of replayed rows, in ``[0, 1]``.
    replay_valid: Optional bool mask of shape ``[R]``.

  Returns:
    ``(mixed, is_replay)``: ``mixed`` like ``new_batch``, ``is_replay`` bool
    of shape ``[B]``.

  Raises:
    ValueError: if the batches differ in structure or item shapes, a batch's
      leaves have different leading sizes, a concrete ``replay_fraction`` is
      outside ``[0, 1]`` (or NaN), ``replay_batch`` has fewer than ``k`` rows,
      or ``replay_valid`` has the wrong shape.
    TypeError: if leaf dtypes differ, ``replay_fraction`` is not a real
      number or ``replay_valid`` is not boolean.

  References:
    Rolnick et al, `Experience Replay for Continual Learning
    <https://arxiv.org/abs/1811.11682>`_, 2019;
    Chaudhry et al, `On Tiny Episodic Memories in Continual Learning
    <https://arxiv.org/abs/1902.10486>`_, 2019
  """
  fn = 'mix_replay'
  size = _buffer.batch_size_of(new_batch, 'new_batch', fn)
  num_rows = _buffer.check_batch_like(replay_batch, new_batch, 'replay_batch',
                                      'new_batch', fn)
  if replay_valid is not None:
    valid_shape, valid_dtype = _buffer.shape_dtype(replay_valid)
    if valid_shape != (num_rows,):
      raise ValueError(
          f'{fn}: replay_valid must have shape [{num_rows}] (replay_batch\'s '
          f'leading size), got {valid_shape}.')
    if valid_dtype != jnp.bool_:
      raise TypeError(
          f'{fn}: replay_valid must have dtype bool, got {valid_dtype}.')

  fraction_shape, fraction_dtype = _buffer.shape_dtype(replay_fraction)
  if isinstance(replay_fraction, bool) or not (
      jnp.issubdtype(fraction_dtype, jnp.floating) or
      jnp.issubdtype(fraction_dtype, jnp.integer)):
    raise TypeError(f'{fn}: replay_fraction must be a real number, got '
                    f'{replay_fraction!r}.')
  if fraction_shape:
    raise ValueError(f'{fn}: replay_fraction must be a scalar, got shape '
                     f'{fraction_shape}.')
  if checks.is_traced(replay_fraction):
    fraction = jnp.clip(jnp.asarray(replay_fraction, jnp.float32), 0.0, 1.0)
    num_replay = jnp.minimum(
        jnp.round(fraction * size).astype(jnp.int32), num_rows)
  else:
    value = checks.static_value(replay_fraction)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
      raise ValueError(
          f'{fn}: replay_fraction must be in [0, 1], got {replay_fraction!r}.')
    num_replay = round(value * size)
    if num_rows < num_replay:
      raise ValueError(
          f'{fn}: replay_batch must have at least {num_replay} rows '
          f'(round(replay_fraction * {size})), got {num_rows}.')

  if num_rows == 0:  # then num_replay == 0
    return (jax.tree.map(jnp.asarray, new_batch),
            jnp.zeros([size], jnp.bool_))

  # Position p takes replay row rank[p] when rank[p] < num_replay: the replay
  # rows land on a uniformly random set of positions, in random order.
  perm = jax.random.permutation(key, size).astype(jnp.int32)
  rank = jnp.zeros([size], jnp.int32).at[perm].set(
      jnp.arange(size, dtype=jnp.int32), unique_indices=True)
  is_replay = rank < num_replay
  row = jnp.clip(rank, 0, num_rows - 1)
  if replay_valid is not None:
    is_replay = is_replay & jnp.take(jnp.asarray(replay_valid), row,
                                     mode='clip')

  def mix(new, replay):
    new = jnp.asarray(new)
    picked = jnp.take(jnp.asarray(replay), row, axis=0, mode='clip')
    mask = is_replay.reshape((size,) + (1,) * (new.ndim - 1))
    return jnp.where(mask, picked, new)

  return jax.tree.map(mix, new_batch, replay_batch), is_replay
