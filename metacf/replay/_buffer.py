"""Fixed-capacity reservoir replay buffer (Vitter's Algorithm R), O(batch) add.

Also :class:`ReplaySample`, what the ``sample`` of every buffer returns, and
the eager checks and row helpers shared by ``_balanced`` and ``_mixing``.
"""

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks
from metacf._src.types import Params

# Slots are int32 and dropped writes use out-of-range slots capacity + i
# (i < batch size), so both must fit in int32 with room to spare.
MAX_CAPACITY = 2**30


class ReplayState(NamedTuple):
  """State of a :func:`replay_buffer`."""
  items: Params        # pytree like example_item, every leaf [capacity, ...]
  num_seen: jax.Array  # shape=(), dtype=int32: items offered so far


class ReplaySample(NamedTuple):
  """Rows drawn by a buffer's ``sample``, and which of them are real items.

  Returned by the ``sample`` of both :func:`replay_buffer` and
  :func:`class_balanced_buffer`; it unpacks as a pair
  (``items, valid = buffer.sample(key, state, batch_size)``) and can be passed
  whole to :func:`mix_replay`, which then takes the mask from it.
  """
  items: Params     # pytree like example_item, every leaf [batch_size, ...]
  valid: jax.Array  # shape=[batch_size], dtype=bool: row is a stored item


class ReplayBuffer(NamedTuple):
  """The pure functions of a reservoir buffer (see :func:`replay_buffer`)."""
  # init(example_item) -> state
  init: Callable[[Params], ReplayState]
  # add(key, state, batch) -> state
  add: Callable[[jax.Array, ReplayState, Params], ReplayState]
  # sample(key, state, batch_size) -> ReplaySample; batch_size is static
  sample: Callable[[jax.Array, ReplayState, int], ReplaySample]


# ---------------------------------------------------------------------------
# Shared eager checks and helpers (also used by _balanced and _mixing).


def check_size(value: Any, name: str, fn: str) -> int:
  """Returns ``value`` as an int after checking it is a positive integer."""
  if checks.is_traced(value):
    raise TypeError(
        f'{fn}: {name} must be a Python int, got a traced value (under jit, '
        f'mark it static, e.g. jax.jit(..., static_argnames={name!r})).')
  if isinstance(value, bool):
    raise TypeError(f'{fn}: {name} must be a Python int, got {value!r}.')
  try:
    size = operator.index(value)
  except TypeError:
    raise TypeError(
        f'{fn}: {name} must be a Python int, got {value!r}.') from None
  if size <= 0:
    raise ValueError(f'{fn}: {name} must be > 0, got {size}.')
  return size


def shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  """Static shape and (canonical, as under jit) dtype of an array-like."""
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    shape, dtype = tuple(x.shape), x.dtype
  else:
    arr = np.asarray(x)
    shape, dtype = arr.shape, arr.dtype
  return shape, np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree.flatten_with_path(tree)
  return [(jax.tree_util.keystr(path) or '<root>', leaf)
          for path, leaf in leaves]


def batch_size_of(batch: Any, name: str, fn: str) -> int:
  """Common leading size of the leaves of ``batch`` (ValueError if none)."""
  return checks.leading_size(batch, name, fn, axis='batch')


def check_batch_like(batch: Any, reference: Any, name: str, ref_name: str,
                     fn: str, ref_has_leading_axis: bool = True) -> int:
  """Checks ``batch`` is a batch of items like ``reference``; returns its size.

  ``reference`` holds items with a leading axis (a buffer's ``items``, or
  another batch) when ``ref_has_leading_axis``, else a single item. Raises
  ValueError on a different pytree structure, leading sizes or item shapes,
  TypeError on a different dtype.
  """
  checks.check_tree_structure(batch, reference, name, ref_name, fn)
  size = batch_size_of(batch, name, fn)
  ref_leaves = jax.tree.leaves(reference)
  for (path, leaf), ref in zip(_leaves_with_paths(batch), ref_leaves):
    shape, dtype = shape_dtype(leaf)
    ref_shape, ref_dtype = shape_dtype(ref)
    item_shape = ref_shape[1:] if ref_has_leading_axis else ref_shape
    if shape[1:] != item_shape:
      want = ', '.join(['batch', *map(str, item_shape)])
      raise ValueError(
          f'{fn}: {name} leaf {path} must have shape [{want}] like '
          f'{ref_name}, got {shape}.')
    if dtype != ref_dtype:
      raise TypeError(
          f'{fn}: {name} leaf {path} must have dtype {ref_dtype} like '
          f'{ref_name}, got {dtype}.')
  return size


def check_state_items(items: Any, capacity: int, fn: str) -> None:
  for path, leaf in _leaves_with_paths(items):
    shape, _ = shape_dtype(leaf)
    if not shape or shape[0] != capacity:
      raise ValueError(
          f'{fn}: state.items leaf {path} must have leading size {capacity} '
          f'(the capacity; use this buffer\'s init), got shape {shape}.')


def zeros_like_items(example_item: Any, capacity: int, fn: str) -> Params:
  if not jax.tree.leaves(example_item):
    raise ValueError(f'{fn}: example_item must have at least one array leaf, '
                     f'got {example_item!r}.')

  def zeros(x):
    shape, dtype = shape_dtype(x)
    return jnp.zeros((capacity,) + shape, dtype)

  return jax.tree.map(zeros, example_item)


def last_writer_wins(slots: jax.Array) -> jax.Array:
  """Bool mask of the entries of ``slots`` that no later entry repeats.

  When several items of one batch pick the same slot, a sequential loop would
  leave the last of them there. A JAX scatter with duplicate indices applies
  them in an unspecified order, so the earlier writers are masked out first.
  O(B log B) in the batch size B (a stable sort), independent of capacity.
  """
  size = slots.shape[0]
  position = jnp.arange(size, dtype=jnp.int32)
  sorted_slots, order = jax.lax.sort((slots, position), num_keys=1,
                                     is_stable=True)
  # Within a run of equal slots the stable sort keeps batch order, so the
  # run's last entry is the latest writer.
  is_last = jnp.concatenate(
      [sorted_slots[1:] != sorted_slots[:-1], jnp.ones([1], bool)])
  return jnp.zeros([size], bool).at[order].set(is_last, unique_indices=True)


def scatter_rows(items: Params, slots: jax.Array, batch: Params) -> Params:
  """``items[slots[i]] = batch[i]`` for every leaf; slots must be unique.

  Out-of-range slots are dropped. Only the written rows are touched, so under
  ``jax.jit(..., donate_argnums=...)`` the update happens in place.
  """
  return jax.tree.map(
      lambda buf, new: buf.at[slots].set(
          jnp.asarray(new), mode='drop', unique_indices=True), items, batch)


def uniform_below(bits: jax.Array, span: jax.Array) -> jax.Array:
  """Integers uniform in ``[0, span)`` from pairs of random uint32 words.

  ``bits`` has shape ``[2, *span.shape]`` (from ``jax.random.bits``); the
  reduction is the one ``jax.random.randint`` applies to its two 32-bit draws,
  so the modulo bias is as negligible. Taking the words as an argument lets a
  function draw all its randomness with one ``jax.random.bits`` call: on CPU
  every threefry call is a separate loop, and a ``randint`` makes three.
  Requires ``span >= 1``.
  """
  span = jnp.asarray(span).astype(jnp.uint32)
  multiplier = jnp.remainder(jnp.uint32(2**16), span)
  multiplier = jnp.remainder(multiplier * multiplier, span)
  offset = (jnp.remainder(bits[0], span) * multiplier +
            jnp.remainder(bits[1], span))
  return jnp.remainder(offset, span).astype(jnp.int32)


def gather_rows(items: Params, index: jax.Array) -> Params:
  return jax.tree.map(
      lambda buf: jnp.take(buf, index, axis=0, mode='clip'), items)


def sample_stored(key: jax.Array, items: Params, num_stored: jax.Array,
                  batch_size: int,
                  slot_of: Callable[[jax.Array], jax.Array] | None = None
                  ) -> ReplaySample:
  """Uniform draws with replacement among ``num_stored`` stored items."""
  bits = jax.random.bits(key, [2, batch_size], jnp.uint32)
  index = uniform_below(bits, jnp.broadcast_to(jnp.maximum(num_stored, 1),
                                               [batch_size]))
  if slot_of is not None:
    index = slot_of(index)
  valid = jnp.broadcast_to(num_stored > 0, [batch_size])
  return ReplaySample(items=gather_rows(items, index), valid=valid)


# ---------------------------------------------------------------------------


def replay_buffer(capacity: int) -> ReplayBuffer:
  r"""A reservoir-sampling replay buffer of fixed ``capacity``.

  After a stream of :math:`M` items has been offered, the buffer holds a
  uniform random subset of :math:`\min(M, \mathrm{capacity})` of them: every
  item, including items that arrived in the same batch, is stored with
  probability :math:`\mathrm{capacity} / M` (Vitter's Algorithm R, the
  reservoir buffer of Chaudhry et al. 2019).

  ``add`` applies Algorithm R to the batch's items in order, vectorised: item
  with global index :math:`n` draws :math:`j \sim U\{0, \dots, n\}` and goes to
  slot :math:`n` if :math:`n < \mathrm{capacity}`, else to slot :math:`j` if
  :math:`j < \mathrm{capacity}`, else nowhere. The draws do not depend on the
  buffer's content, so doing them all at once is exact, provided that when two
  items of one batch pick the same slot the later one wins, as it would in a
  loop: that is resolved explicitly (a stable sort of the batch's slots), not
  left to the scatter. Its cost is O(batch) (O(B log B) for the sort) and
  independent of ``capacity``: the buffer is only touched by one scatter of
  the kept rows, which happens in place when the state is donated
  (``jax.jit(add, donate_argnums=1)``). All leaves of an item land in the
  same slot.

  The three functions are pure and not jitted; all are jittable and
  vmappable (e.g. over keys, or over independent buffers).

  * ``init(example_item) -> ReplayState``: ``items`` is a pytree like
    ``example_item`` (arrays, or anything with ``shape`` and ``dtype`` such as
    ``jax.ShapeDtypeStruct``) whose leaves are zeros of shape
    ``[capacity, *leaf.shape]``; ``num_seen`` is an int32 zero.
  * ``add(key, state, batch) -> ReplayState``: ``batch`` has the structure
    and leaf dtypes of ``example_item`` with a leading batch axis on every
    leaf (the same size for all). Compiles once per batch shape.
  * ``sample(key, state, batch_size) -> ReplaySample(items, valid)``:
    ``items`` are ``batch_size`` items drawn uniformly with replacement among
    the ``min(num_seen, capacity)`` stored ones; ``valid`` is a bool
    ``[batch_size]`` mask, all True once something is stored and all False
    while the buffer is empty. Invalid rows hold slot 0's zeros: mask them out
    of the loss, or pass the whole :class:`ReplaySample` to
    :func:`mix_replay`. It unpacks as a pair:
    ``items, valid = sample(...)``. ``batch_size`` is static
    (``jax.jit(sample, static_argnums=2)``).

  ``num_seen`` is int32: a stream may offer at most ``2**31 - 1`` items in
  all; beyond that the counter wraps and the inclusion probabilities are
  wrong.

  Args:
    capacity: Number of slots, a positive Python int (at most ``2**30``).

  Returns:
    A :class:`ReplayBuffer` ``(init, add, sample)``. Its ``add(key, state,
    batch)`` and ``sample`` have the same signatures as those of a
    :func:`class_balanced_buffer` built with ``label_fn``, so either buffer
    can be passed to one training step.

  Raises:
    TypeError: if ``capacity`` is not an int. ``add`` raises TypeError when a
      batch leaf's dtype differs from ``example_item``'s.
    ValueError: if ``capacity <= 0``. ``add`` raises ValueError when the batch
      has another pytree structure, item shapes, or leaves of different
      leading sizes; ``sample`` when ``batch_size`` is not a positive int.
      All checks are on static information, so they run at trace time.

  Examples:
    Dark Experience Replay, DER++: items are any pytree, so storing the
    logits the network produced when an example was seen, next to the input
    and label, needs no extra API.

    >>> import functools
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import metacf
    >>> apply_fn = lambda params, x: x @ params               # a linear model
    >>> alpha, beta = 0.5, 0.5
    >>> buffer = metacf.replay.replay_buffer(capacity=100)
    >>> state = buffer.init({'x': jnp.zeros([5]), 'y': jnp.zeros([], jnp.int32),
    ...                      'logits': jnp.zeros([3])})
    >>> @functools.partial(jax.jit, donate_argnums=1)
    ... def train_step(key, state, replay, params, x, y):
    ...   # replay: two ReplaySamples of the buffer drawn at the end of the last
    ...   # step (each unpacks as items, valid).
    ...   (der, der_ok), (old, old_ok) = replay
    ...   key_add, key_der, key_ce = jax.random.split(key, 3)
    ...   def loss_fn(params):
    ...     logits = apply_fn(params, x)
    ...     xent = optax.losses.softmax_cross_entropy_with_integer_labels
    ...     loss = jnp.mean(xent(logits, y))
    ...     mse = jnp.sum((apply_fn(params, der['x']) - der['logits'])**2, -1)
    ...     loss += alpha * jnp.mean(jnp.where(der_ok, mse, 0.0))   # DER term
    ...     ce = xent(apply_fn(params, old['x']), old['y'])
    ...     loss += beta * jnp.mean(jnp.where(old_ok, ce, 0.0))     # ++ term
    ...     return loss, logits
    ...   grads, logits = jax.grad(loss_fn, has_aux=True)(params)
    ...   state = buffer.add(key_add, state, {
    ...       'x': x, 'y': y, 'logits': jax.lax.stop_gradient(logits)})
    ...   # Sample after the add: sampling a donated buffer before adding to it
    ...   # makes XLA copy the whole buffer (O(capacity) per step).
    ...   replay = (buffer.sample(key_der, state, x.shape[0]),
    ...             buffer.sample(key_ce, state, x.shape[0]))
    ...   return state, replay, grads
    >>> params = jnp.zeros((5, 3))
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> replay = (buffer.sample(jax.random.key(0), state, 4),) * 2  # empty
    >>> state, replay, grads = train_step(jax.random.key(1), state, replay,
    ...                                   params, x, y)
    >>> int(state.num_seen), replay[0].items['logits'].shape
    (4, (4, 3))

  References:
    Vitter, `Random Sampling with a Reservoir
    <https://doi.org/10.1145/3147.3165>`_, 1985 (Algorithm R);
    Chaudhry et al, `On Tiny Episodic Memories in Continual Learning
    <https://arxiv.org/abs/1902.10486>`_, 2019;
    Buzzega et al, `Dark Experience for General Continual Learning: a Strong,
    Simple Baseline <https://arxiv.org/abs/2004.07211>`_, 2020
  """
  capacity = check_size(capacity, 'capacity', 'replay_buffer')
  if capacity > MAX_CAPACITY:
    raise ValueError(f'replay_buffer: capacity must be <= 2**30, got '
                     f'{capacity}.')

  def init(example_item: Params) -> ReplayState:
    items = zeros_like_items(example_item, capacity, 'replay_buffer.init')
    return ReplayState(items=items, num_seen=jnp.zeros([], jnp.int32))

  def add(key: jax.Array, state: ReplayState, batch: Params) -> ReplayState:
    fn = 'replay_buffer.add'
    check_state_items(state.items, capacity, fn)
    size = check_batch_like(batch, state.items, 'batch', 'example_item', fn)
    if size == 0:
      return state
    n = state.num_seen + jnp.arange(size, dtype=jnp.int32)  # global indices
    # j ~ U{0..n}.
    j = uniform_below(jax.random.bits(key, [2, size], jnp.uint32), n + 1)
    slots = jnp.where(n < capacity, n, jnp.where(j < capacity, j, capacity))
    keep = (slots < capacity) & last_writer_wins(slots)
    # Dropped rows get distinct out-of-range slots, so indices are unique.
    slots = jnp.where(keep, slots,
                      capacity + jnp.arange(size, dtype=jnp.int32))
    items = scatter_rows(state.items, slots, batch)
    return ReplayState(items=items, num_seen=state.num_seen + size)

  def sample(key: jax.Array, state: ReplayState,
             batch_size: int) -> ReplaySample:
    fn = 'replay_buffer.sample'
    batch_size = check_size(batch_size, 'batch_size', fn)
    check_state_items(state.items, capacity, fn)
    num_stored = jnp.clip(state.num_seen, 0, capacity)
    return sample_stored(key, state.items, num_stored, batch_size)

  return ReplayBuffer(init=init, add=add, sample=sample)
