"""Mixing replayed items into the current batch (experience replay).

The replayed rows are usually a buffer's :class:`ReplaySample`, passed whole
(the mask of rows that hold stored items comes with it)::

  replay = buffer.sample(key_sample, state, batch_size)
  mixed, is_replay = metacf.replay.mix_replay(key_mix, batch, replay, 0.5)

The older form, items and mask apart, gives the same result:
``mix_replay(key_mix, batch, replay.items, 0.5, replay_valid=replay.valid)``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metacf._src import checks
from metacf._src.types import Params
from metacf.replay import _buffer

ArrayLike = jax.typing.ArrayLike


class MixedBatch(NamedTuple):
  """What :func:`mix_replay` returns; unpacks as ``batch, is_replay``."""
  batch: Params         # like new_batch: [B, ...] per leaf.
  is_replay: jax.Array  # shape=[B], dtype=bool: the rows taken from replay.


def mix_replay(key: jax.Array, new_batch: Params,
               replay_sample: Params | _buffer.ReplaySample,
               fraction: ArrayLike, *,
               replay_valid: ArrayLike | None = None
               ) -> MixedBatch:
  r"""Replaces a fraction of ``new_batch``'s rows by replayed rows.

  Returns a batch of ``new_batch``'s size :math:`B` in which
  :math:`k = \mathrm{round}(\mathrm{fraction} \cdot B)` rows, at
  uniformly random positions, are ``replay_sample``'s first :math:`k` rows (in
  random order), and the other rows are ``new_batch``'s rows at those
  positions. ``is_replay`` marks the replayed rows, so that a loss can weight
  them, e.g. ``jnp.where(is_replay, replay_weight, 1.0) * per_example_loss``.
  Rolnick et al. (2019) mix new and replayed experience 50/50.

  ``fraction = 0`` gives back ``new_batch`` exactly (``is_replay`` all
  False); ``1`` gives ``replay_sample[:B]``, shuffled.

  ``replay_sample`` is usually the :class:`ReplaySample` returned by a
  buffer's ``sample``; its ``valid`` mask is then used as ``replay_valid``
  (which must not be passed as well). With a mask, invalid replay rows are
  not used: those positions keep ``new_batch``'s row and ``is_replay`` is
  False there. So mixing with a sample from an empty buffer gives back the
  new batch, and no zero row is ever passed off as data. A plain pytree of
  items with ``replay_valid`` passed apart (or without a mask: all rows
  valid) works as well; ``mix_replay(key, b, sample, f)`` equals
  ``mix_replay(key, b, sample.items, f, replay_valid=sample.valid)``.

  Rounding is half to even. A concrete ``fraction`` (a Python number
  or a concrete array) is checked to lie in ``[0, 1]`` and ``replay_sample`` to
  have at least ``k`` rows. A traced one is clipped to ``[0, 1]``, :math:`k`
  is computed in float32 (so at an exact tie it may differ by one from the
  eager value) and clipped to ``replay_sample``'s number of rows; a traced NaN
  is not dropped silently: every floating leaf of ``mixed`` is then NaN
  (integer leaves cannot hold NaN; ``is_replay`` is then all False).

  Args:
    key: PRNG key for the positions.
    new_batch: Pytree of arrays with a common leading size :math:`B`.
    replay_sample: A :class:`ReplaySample` ``(items, valid)``, or a pytree of
      items. The items have ``new_batch``'s structure, leaf dtypes and item
      shapes, with a common leading size :math:`R` (:math:`R \ge k`; rows
      beyond the first :math:`k` are ignored).
    fraction: Fraction of replayed rows, in ``[0, 1]``.
    replay_valid: Optional bool mask of shape ``[R]``, only when
      ``replay_sample`` is not a :class:`ReplaySample`.

  Returns:
    A :class:`MixedBatch` ``(batch, is_replay)`` (it unpacks as a pair):
    ``batch`` like ``new_batch``, ``is_replay`` bool of shape ``[B]``.

  Raises:
    ValueError: if the batches differ in structure or item shapes, a batch's
      leaves have different leading sizes, a concrete ``fraction`` is
      outside ``[0, 1]`` (or NaN), ``replay_sample`` has fewer than ``k`` rows,
      the mask has the wrong shape, or ``replay_valid`` is given with a
      :class:`ReplaySample`.
    TypeError: if leaf dtypes differ, ``fraction`` is not a real
      number or the mask is not boolean.

  References:
    Rolnick et al, `Experience Replay for Continual Learning
    <https://arxiv.org/abs/1811.11682>`_, 2019;
    Chaudhry et al, `On Tiny Episodic Memories in Continual Learning
    <https://arxiv.org/abs/1902.10486>`_, 2019
  """
  fn = 'mix_replay'
  valid_name = 'replay_valid'
  if isinstance(replay_sample, _buffer.ReplaySample):
    if replay_valid is not None:
      raise ValueError(
          f'{fn}: replay_valid must be None when replay_sample is a '
          'ReplaySample (its valid field is the mask), got an array of shape '
          f'{_buffer.shape_dtype(replay_valid)[0]}.')
    replay_sample, replay_valid = replay_sample
    valid_name = 'replay_sample.valid'
  size = _buffer.batch_size_of(new_batch, 'new_batch', fn)
  num_rows = _buffer.check_batch_like(replay_sample, new_batch, 'replay_sample',
                                      'new_batch', fn)
  if replay_valid is not None:
    valid_shape, valid_dtype = _buffer.shape_dtype(replay_valid)
    if valid_shape != (num_rows,):
      raise ValueError(
          f'{fn}: {valid_name} must have shape [{num_rows}] (replay_sample\'s '
          f'leading size), got {valid_shape}.')
    if valid_dtype != jnp.bool_:
      raise TypeError(
          f'{fn}: {valid_name} must have dtype bool, got {valid_dtype}.')

  fraction_shape, fraction_dtype = _buffer.shape_dtype(fraction)
  if isinstance(fraction, bool) or not (
      jnp.issubdtype(fraction_dtype, jnp.floating) or
      jnp.issubdtype(fraction_dtype, jnp.integer)):
    raise TypeError(f'{fn}: fraction must be a real number, got '
                    f'{fraction!r}.')
  if fraction_shape:
    raise ValueError(f'{fn}: fraction must be a scalar, got shape '
                     f'{fraction_shape}.')
  is_nan = None
  if checks.is_traced(fraction):
    fraction = jnp.asarray(fraction, jnp.float32)
    # Converting NaN to int32 gives 0 on CPU, i.e. a NaN fraction would
    # silently mean "no replay": make k = 0 explicit and poison the output.
    is_nan = jnp.isnan(fraction)
    fraction = jnp.where(is_nan, 0.0, jnp.clip(fraction, 0.0, 1.0))
    num_replay = jnp.minimum(
        jnp.round(fraction * size).astype(jnp.int32), num_rows)
  else:
    value = checks.static_value(fraction)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
      raise ValueError(
          f'{fn}: fraction must be in [0, 1], got {fraction!r}.')
    num_replay = round(value * size)
    if num_rows < num_replay:
      raise ValueError(
          f'{fn}: replay_sample must have at least {num_replay} rows '
          f'(round(fraction * {size})), got {num_rows}.')

  def propagate_nan(x):
    if is_nan is None or not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    return jnp.where(is_nan, jnp.asarray(jnp.nan, x.dtype), x)

  if num_rows == 0:  # then num_replay == 0
    return MixedBatch(
        jax.tree.map(lambda x: propagate_nan(jnp.asarray(x)), new_batch),
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
    return propagate_nan(jnp.where(mask, picked, new))

  return MixedBatch(jax.tree.map(mix, new_batch, replay_sample), is_replay)
