"""Class-balanced replay buffer: an equal share of the slots per class seen.

Like Avalanche's ``ClassBalancedBuffer`` and GDumb's greedy class-balanced
sampler, but streaming: within each class it is a reservoir, so an
imbalanced stream still gives a class-balanced buffer whose items are, class
by class, uniform random subsets of what was seen::

  buffer = metacf.replay.class_balanced_buffer(
      capacity=1000, num_classes=10, label_fn=lambda batch: batch['y'])
  state = buffer.init({'x': jnp.zeros([28, 28, 1], jnp.uint8),
                       'y': jnp.zeros([], jnp.int32)})
  add = jax.jit(buffer.add, donate_argnums=1)
  state = add(key_add, state, {'x': x, 'y': y})      # balance on batch['y']
  replay = buffer.sample(key_sample, state, 32)      # ReplaySample
  items, valid = replay                              # unpacks as a pair

With ``label_fn``, ``add(key, state, batch)`` has the signature of
:func:`replay_buffer`'s, so the two buffers are interchangeable in a training
step. Without it the labels are passed explicitly:
``add(key_add, state, {'x': x, 'y': y}, y)``.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metacf._src import checks
from metacf._src.types import Params
from metacf.replay import _buffer

ArrayLike = jax.typing.ArrayLike


class ClassBalancedState(NamedTuple):
  """State of a :func:`class_balanced_buffer`.

  ``slot_order`` lists the slots grouped by class: positions
  ``[class_end[c - 1], class_end[c])`` (``class_end[-1] = 0`` for ``c = 0``)
  hold the slots of class ``c``, in no particular order, and positions
  ``[class_end[num_classes - 1], capacity)`` the free slots. So the number of
  items stored for class ``c`` is ``class_end[c] - class_end[c - 1]``
  (``jnp.diff(class_end, prepend=0)``), and ``class_end[-1]`` is the number
  stored in all.
  """
  items: Params          # pytree like example_item, every leaf [capacity, ...]
  labels: jax.Array      # shape=[capacity], dtype=int32: slot's class, -1 free
  slot_order: jax.Array  # shape=[capacity], dtype=int32: slots grouped by class
  class_end: jax.Array   # shape=[num_classes], dtype=int32: cumulative counts
  class_seen: jax.Array  # shape=[num_classes], dtype=int32: offered per class
  num_seen: jax.Array    # shape=(), dtype=int32: items offered in all


class ClassBalancedBuffer(NamedTuple):
  """The pure functions of :func:`class_balanced_buffer`."""
  # init(example_item) -> state
  init: Callable[[Params], ClassBalancedState]
  # add(key, state, batch, labels=None) -> state; labels only without label_fn
  add: Callable[[jax.Array, ClassBalancedState, Params, ArrayLike | None],
                ClassBalancedState]
  # sample(key, state, batch_size) -> ReplaySample; batch_size is static
  sample: Callable[[jax.Array, ClassBalancedState, int],
                   _buffer.ReplaySample]


def _move_slot(order: jax.Array, class_end: jax.Array, q: jax.Array,
               src: jax.Array, dst: jax.Array,
               do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Moves the slot at position ``q`` of ``order`` from segment src to dst.

  Segments ``0..num_classes-1`` are the classes, segment ``num_classes`` the
  free slots; ``src != dst`` whenever ``do``. In effect the slot is swapped to
  the end of src that faces dst, then each non-empty segment in between
  shifts by one position towards src (its element at the far end moves to the
  near end), and dst grows by one at its near end, where the slot goes.
  O(num_classes): one gather and one scatter of num_classes + 2 entries of
  ``order`` (a single scatter, so that XLA updates the loop-carried ``order``
  in place), and the slot's contents are not touched.

  Returns:
    ``(order, class_end, slot)``, ``slot = order[q]`` before the move.
  """
  capacity = order.shape[0]
  num_segments = class_end.shape[0] + 1
  ends = jnp.concatenate([class_end, jnp.full([1], capacity, jnp.int32)])
  starts = jnp.concatenate([jnp.zeros([1], jnp.int32), class_end])
  k = jnp.arange(num_segments, dtype=jnp.int32)
  forward = src < dst
  # The position at src's end facing dst. Its value v moves to q; the
  # position itself is always rewritten below (by the first non-empty segment
  # after src, or by the slot), so it is not written here.
  boundary = jnp.clip(jnp.where(forward, ends[src] - 1, starts[src]), 0,
                      capacity - 1)
  lo, hi = jnp.minimum(src, dst), jnp.maximum(src, dst)
  between = (k > lo) & (k < hi) & (ends > starts)
  read = jnp.clip(jnp.where(forward, ends - 1, starts), 0, capacity - 1)
  write = jnp.where(forward, starts - 1, ends)
  # All reads come from the original order; they lie in other segments than
  # q and boundary, and all written positions are distinct.
  gathered = order[jnp.concatenate([jnp.stack([q, boundary]), read])]
  slot, other, moved = gathered[0], gathered[1], gathered[2:]
  values = jnp.concatenate([other[None], jnp.where(k == dst, slot, moved)])
  mask = jnp.concatenate([(do & (q != boundary))[None],
                          do & (between | (k == dst))])
  index = jnp.concatenate([q[None], write])
  dropped = capacity + jnp.arange(num_segments + 1, dtype=jnp.int32)
  order = order.at[jnp.where(mask, index, dropped)].set(
      values, mode='drop', unique_indices=True)
  # Segments lo..hi-1 end one position earlier (forward) or later.
  shift = jnp.where((k >= lo) & (k < hi) & do,
                    jnp.where(forward, -1, 1), 0).astype(jnp.int32)
  return order, class_end + shift[:-1], slot


def class_balanced_buffer(
    capacity: int, num_classes: int, *,
    label_fn: Callable[[Params], ArrayLike] | None = None
) -> ClassBalancedBuffer:
  r"""A replay buffer that keeps an equal share of ``capacity`` per class.

  Every class seen so far gets an equal share of the slots: with :math:`K`
  classes seen, the class of rank :math:`r` (by label, among the seen ones)
  gets :math:`|\{i < \mathrm{capacity} : i \equiv r \pmod K\}|` slots, i.e.
  ``capacity // K`` plus one for the ``capacity % K`` smallest seen labels
  (none when :math:`r \ge \mathrm{capacity}`: with more classes than slots,
  the largest labels get no share). Items are offered one by one, in order:

  1. While the buffer has free slots, the item is stored (greedy fill, as in
     GDumb: a class may hold more than its share while others are short).
  2. Otherwise, if its class holds fewer items than its share (e.g. a new
     class), a uniformly random item of the currently largest class is
     evicted and replaced by it. Among equally large classes the one furthest
     above its share is chosen (ties: smallest label), so that no class is
     ever pushed below its share.
  3. Otherwise its class is at (or above) its share, holding :math:`m_c`
     items of the :math:`n_c` it has seen (this one included): the item
     replaces a uniformly random item of its class with probability
     :math:`m_c / n_c` (Algorithm R within the class).

  Steps 2 and 3 are the class-balancing reservoir sampling (CBRS) of
  Chrysakis & Moens (2020), with the equal shares made explicit.

  Consequences: once every class has been seen at least ``share`` times the
  stored counts are equal to within one (exactly the shares), and the items
  stored for class :math:`c` are always a uniform random subset of the
  :math:`n_c` items of class :math:`c` seen so far. (Shares never grow, so a
  class below its share has lost nothing, and evictions never push a class
  below its share: growing a class that had been subsampled, which no single
  pass can do exactly, never happens.) ``sample`` draws uniformly with
  replacement among the stored items, hence about equally from every class.

  Cost: ``add`` is a ``lax.scan`` over the batch's items whose step costs
  O(num_classes) (the share and eviction bookkeeping, plus moving one slot
  between class segments of ``slot_order``), independent of ``capacity``;
  the items themselves are then written by one scatter of the kept rows
  (later items win when two pick the same slot), in place when the state is
  donated (``jax.jit(add, donate_argnums=1)``). O(capacity) per item is
  avoided by keeping ``slot_order``, a permutation of the slots grouped by
  class, so that a uniform random item of a class is one index away. Compiles
  once per batch shape. All random draws of a batch come from one
  ``jax.random.bits`` call made before the scan.

  * ``init(example_item) -> ClassBalancedState``: as for
    :func:`replay_buffer`, plus ``labels`` all -1, ``slot_order`` the identity,
    ``class_end`` and ``class_seen`` zeros.
  * ``add(key, state, batch, labels=None) -> ClassBalancedState``: the
    labels are an integer array of shape ``[batch]`` with values in
    ``[0, num_classes)``, the class used for balancing (also recorded per
    slot in ``state.labels``). With ``label_fn`` they are
    ``label_fn(batch)`` and ``labels`` is not passed, so that ``add(key,
    state, batch)`` has :func:`replay_buffer`'s signature; without it they
    are passed as ``labels`` (usually also a leaf of ``batch``). The two
    forms give the same state. Out-of-range labels raise ValueError when
    concrete (and under ``jit`` with runtime checks on, see
    :mod:`metacf.checks`); traced with the checks off, such items are
    skipped (counted in ``num_seen`` only).
  * ``sample(key, state, batch_size) -> ReplaySample(items, valid)``: exactly
    as :func:`replay_buffer`'s (invalid rows, when empty, hold slot 0's
    zeros).

  Counters are int32: at most ``2**31 - 1`` items in all.

  Args:
    capacity: Number of slots, a positive Python int (at most ``2**30``).
    num_classes: Number of classes, a positive Python int.
    label_fn: Optional ``label_fn(batch) -> labels``, traceable (e.g.
      ``lambda batch: batch['y']``), giving the integer labels ``[batch]`` to
      balance on; then ``add`` takes no ``labels``.

  Returns:
    A :class:`ClassBalancedBuffer` ``(init, add, sample)``.

  Raises:
    TypeError: if ``capacity`` or ``num_classes`` is not an int or
      ``label_fn`` is neither callable nor None; ``add`` on a batch leaf dtype
      different from ``example_item``'s or non-integer labels.
    ValueError: if ``capacity <= 0`` or ``num_classes <= 0``; ``add`` when
      ``labels`` is missing without ``label_fn`` or given with one, on a
      different pytree structure, item shapes, leading sizes, labels of the
      wrong shape or labels out of range; ``sample`` on a
      ``batch_size`` that is not a positive int.

  References:
    Prabhu et al, `GDumb: A Simple Approach that Questions Our Progress in
    Continual Learning <https://doi.org/10.1007/978-3-030-58536-5_31>`_,
    2020 (class-balanced greedy sampler);
    Chrysakis & Moens, `Online Continual Learning from Imbalanced Data
    <https://proceedings.mlr.press/v119/chrysakis20a.html>`_, 2020 (class-
    balancing reservoir sampling);
    Lomonaco et al, `Avalanche: an End-to-End Library for Continual Learning
    <https://arxiv.org/abs/2104.00405>`_, 2021 (``ClassBalancedBuffer``)
  """
  fn_factory = 'class_balanced_buffer'
  capacity = _buffer.check_size(capacity, 'capacity', fn_factory)
  num_classes = _buffer.check_size(num_classes, 'num_classes', fn_factory)
  if capacity > _buffer.MAX_CAPACITY:
    raise ValueError(f'{fn_factory}: capacity must be <= 2**30, got '
                     f'{capacity}.')
  if num_classes > _buffer.MAX_CAPACITY:
    raise ValueError(f'{fn_factory}: num_classes must be <= 2**30, got '
                     f'{num_classes}.')
  if label_fn is not None and not callable(label_fn):
    raise TypeError(f'{fn_factory}: label_fn must be callable or None, got '
                    f'{label_fn!r}.')

  def init(example_item: Params) -> ClassBalancedState:
    items = _buffer.zeros_like_items(example_item, capacity,
                                     'class_balanced_buffer.init')
    return ClassBalancedState(
        items=items,
        labels=jnp.full([capacity], -1, jnp.int32),
        slot_order=jnp.arange(capacity, dtype=jnp.int32),
        class_end=jnp.zeros([num_classes], jnp.int32),
        class_seen=jnp.zeros([num_classes], jnp.int32),
        num_seen=jnp.zeros([], jnp.int32))

  def step(carry, xs):
    order, class_end, class_seen = carry
    label, bits = xs
    ok = (label >= 0) & (label < num_classes)
    c = jnp.clip(label, 0, num_classes - 1)
    class_seen = class_seen.at[c].add(ok.astype(jnp.int32))
    n_c = class_seen[c]
    starts = jnp.concatenate([jnp.zeros([1], jnp.int32), class_end[:-1]])
    count = class_end - starts
    stored = class_end[-1]
    seen = class_seen > 0
    num_seen_classes = jnp.sum(seen, dtype=jnp.int32)
    rank = jnp.cumsum(seen, dtype=jnp.int32) - 1
    share = jnp.where(
        seen & (rank < capacity),
        (capacity - 1 - rank) // jnp.maximum(num_seen_classes, 1) + 1, 0)
    full = stored >= capacity
    under = count[c] < share[c]
    # Largest class, ties broken by the excess over the share, then by label.
    # When c is under its share the buffer holds more than the shares
    # somewhere, and that class has the largest excess.
    excess = jnp.where(count == jnp.max(count), count - share,
                       jnp.iinfo(jnp.int32).min)
    victim = jnp.argmax(excess).astype(jnp.int32)
    # r: which item of the victim class to evict; j: the reservoir draw.
    r = _buffer.uniform_below(bits[0], jnp.maximum(count[victim], 1))
    j = _buffer.uniform_below(bits[1], jnp.maximum(n_c, 1))
    grow = ok & (~full | under)                    # cases 1 and 2
    replace = ok & full & ~under & (j < count[c])  # case 3
    src = jnp.where(full, victim, num_classes)     # num_classes: free slots
    q = jnp.where(grow, jnp.where(full, starts[victim] + r, stored),
                  starts[c] + j)
    q = jnp.clip(q, 0, capacity - 1)
    order, class_end, slot = _move_slot(order, class_end, q, src, c, grow)
    slot = jnp.where(grow | replace, slot, capacity)
    return (order, class_end, class_seen), slot

  def add(key: jax.Array, state: ClassBalancedState, batch: Params,
          labels: ArrayLike | None = None) -> ClassBalancedState:
    fn = 'class_balanced_buffer.add'
    _buffer.check_state_items(state.items, capacity, fn)
    size = _buffer.check_batch_like(batch, state.items, 'batch',
                                    'example_item', fn)
    if label_fn is None:
      if labels is None:
        raise ValueError(
            f'{fn}: labels must be given when the buffer has no label_fn '
            '(or build it with class_balanced_buffer(..., label_fn=...)), '
            'got None.')
      name = 'labels'
    else:
      if labels is not None:
        raise ValueError(
            f'{fn}: labels must not be given when the buffer has a label_fn '
            '(the labels are label_fn(batch)), got labels of shape '
            f'{_buffer.shape_dtype(labels)[0]}.')
      labels = label_fn(batch)
      name = 'label_fn(batch)'
    label_shape, _ = _buffer.shape_dtype(labels)
    if label_shape != (size,):
      raise ValueError(
          f'{fn}: {name} must have shape [{size}] (the batch size), got '
          f'{label_shape}.')
    checks.check_integer(labels, name, fn)
    checks.check_labels(labels, num_classes, name, fn)
    if size == 0:
      return state
    labels = jnp.asarray(labels).astype(jnp.int32)
    carry = (state.slot_order, state.class_end, state.class_seen)
    (order, class_end, class_seen), slots = jax.lax.scan(
        step, carry,
        (labels, jax.random.bits(key, [size, 2, 2], jnp.uint32)))
    keep = (slots < capacity) & _buffer.last_writer_wins(slots)
    slots = jnp.where(keep, slots,
                      capacity + jnp.arange(size, dtype=jnp.int32))
    return ClassBalancedState(
        items=_buffer.scatter_rows(state.items, slots, batch),
        labels=state.labels.at[slots].set(labels, mode='drop',
                                          unique_indices=True),
        slot_order=order, class_end=class_end, class_seen=class_seen,
        num_seen=state.num_seen + size)

  def sample(key: jax.Array, state: ClassBalancedState,
             batch_size: int) -> _buffer.ReplaySample:
    fn = 'class_balanced_buffer.sample'
    batch_size = _buffer.check_size(batch_size, 'batch_size', fn)
    _buffer.check_state_items(state.items, capacity, fn)
    # Positions [0, stored) of slot_order are exactly the stored slots.
    return _buffer.sample_stored(
        key, state.items, state.class_end[-1], batch_size,
        slot_of=lambda index: jnp.take(state.slot_order, index, mode='clip'))

  return ClassBalancedBuffer(init=init, add=add, sample=sample)
