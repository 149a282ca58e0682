"""Tests for metacf.replay: reservoir and class-balanced buffers, mix_replay.

The statistical tests use fixed keys, so they are deterministic; their
tolerances are 5 binomial standard deviations per item, plus a chi-square
test over all items at about z = 4.5.
"""

import functools
import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from metacf import replay
from metacf.replay import _buffer


def _items(ids, labels=None):
  """Items whose leaves are all functions of an integer id (and label).

  NumPy arrays: building them compiles nothing.
  """
  ids = np.asarray(ids, np.int32)
  items = {
      'id': ids,
      'x': ids[:, None].astype(np.float32) * np.array([[1.0, -2.0, 0.5]],
                                                      np.float32),
      'nested': ((ids % 256).astype(np.uint8), 3 * ids),
  }
  if labels is not None:
    items['label'] = np.asarray(labels, np.int32)
  return items


def _example(labels=False):
  return jax.tree.map(lambda x: x[0],
                      _items([0], [0] if labels else None))


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _assert_whole(items, ids):
  """Every leaf of a stored item agrees with its id."""
  ids = np.asarray(ids)
  np.testing.assert_array_equal(
      np.asarray(items['x']),
      ids[..., None].astype(np.float32) * np.array([1.0, -2.0, 0.5],
                                                   np.float32))
  np.testing.assert_array_equal(np.asarray(items['nested'][0]),
                                (ids % 256).astype(np.uint8))
  np.testing.assert_array_equal(np.asarray(items['nested'][1]), 3 * ids)


RUNS = 2000      # independent runs of the statistical tests
SAMPLES = 4000   # draws in the sampling tests


def _keys(seed):
  return jax.random.split(jax.random.key(seed), RUNS)


@functools.lru_cache(maxsize=None)
def _reservoir(capacity):
  """A buffer with jitted add and sample, shared so compilations are reused."""
  buffer = replay.replay_buffer(capacity)
  return buffer, jax.jit(buffer.add), jax.jit(buffer.sample, static_argnums=2)


@functools.lru_cache(maxsize=None)
def _balanced(capacity, num_classes):
  buffer = replay.class_balanced_buffer(capacity, num_classes)
  return buffer, jax.jit(buffer.add), jax.jit(buffer.sample, static_argnums=2)


def _full_size_primitives(fn, capacity, *args):
  """Primitives in ``fn``'s jaxpr that produce arrays with ``capacity`` rows.

  Recurses into sub-jaxprs (scan bodies, inner jits); the container
  equations themselves are not listed.
  """
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      subs = []
      for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else [value]:
          inner = getattr(v, 'jaxpr', v)
          if hasattr(inner, 'eqns'):
            subs.append(inner)
      for sub in subs:
        visit(sub)
      if not subs and any(getattr(out.aval, 'shape', ())[:1] == (capacity,)
                          for out in eqn.outvars):
        found.add(eqn.primitive.name)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _chi2_upper(df, z=4.5):
  """Wilson-Hilferty approximation of the chi-square upper z-quantile."""
  h = 2.0 / (9.0 * df)
  return df * (1.0 - h + z * np.sqrt(h))**3


def _assert_inclusion(counts, trials, p, sigmas=5.0, chi2=False):
  """Binomial check per item, and chi-square over exchangeable items."""
  counts, p = np.asarray(counts, np.float64), np.asarray(p, np.float64)
  p = np.broadcast_to(p, counts.shape)
  sd = np.sqrt(p * (1 - p) / trials)
  err = np.abs(counts / trials - p)
  assert np.all(err <= sigmas * sd + 1e-12), (counts / trials, p)
  if chi2 and np.all((p > 0) & (p < 1)):
    # Inclusions of M exchangeable items with a fixed total have covariance
    # p(1-p) M/(M-1) (I - 11^T/M): the scaled statistic is chi2(M - 1).
    m = counts.size
    stat = np.sum((counts - trials * p)**2 /
                  (trials * p * (1 - p) * m / (m - 1)))
    assert stat < _chi2_upper(m - 1), (stat, _chi2_upper(m - 1))


class ReplayBufferTest(chex.TestCase):

  def test_init(self):
    buffer = replay.replay_buffer(4)
    state = buffer.init(_example())
    self.assertIsInstance(state, replay.ReplayState)
    chex.assert_shape(state.items['x'], (4, 3))
    chex.assert_shape(state.items['nested'][0], (4,))
    self.assertEqual(state.items['nested'][0].dtype, jnp.uint8)
    self.assertEqual(state.num_seen.dtype, jnp.int32)
    self.assertEqual(state.num_seen.shape, ())
    self.assertEqual(int(state.num_seen), 0)
    for leaf in jax.tree.leaves(state.items):
      np.testing.assert_array_equal(leaf, 0)

  def test_init_from_shape_dtype_struct(self):
    state = replay.replay_buffer(3).init(
        {'x': jax.ShapeDtypeStruct((2, 5), jnp.bfloat16)})
    chex.assert_shape(state.items['x'], (3, 2, 5))
    self.assertEqual(state.items['x'].dtype, jnp.bfloat16)

  def test_fill_phase_stores_in_order(self):
    # Not jitted: the eager path.
    buffer = replay.replay_buffer(10)
    state = buffer.init(_example())
    state = buffer.add(jax.random.key(0), state, _items(np.arange(1, 5)))
    state = buffer.add(jax.random.key(1), state, _items(np.arange(5, 9)))
    np.testing.assert_array_equal(state.items['id'], [*range(1, 9), 0, 0])
    _assert_whole(state.items, state.items['id'])
    self.assertEqual(int(state.num_seen), 8)

  def test_inclusion_probabilities(self):
    # 49 items in batches of 7 (the fill point, 10, falls inside a batch),
    # over 2000 independent runs vmapped over keys: after M items each one is
    # stored with probability min(1, 10 / M).
    capacity, batch, num_batches = 10, 7, 7
    buffer = replay.replay_buffer(capacity)
    add = jax.jit(jax.vmap(
        lambda key, state, items, b: buffer.add(jax.random.fold_in(key, b),
                                                state, items),
        in_axes=(0, 0, None, None)))
    states = jax.vmap(lambda _: buffer.init(_example()))(jnp.arange(RUNS))
    keys = _keys(42)
    for b in range(num_batches):
      ids = np.arange(b * batch, (b + 1) * batch)
      states = add(keys, states, _items(ids), b)
      seen = (b + 1) * batch
      stored = np.asarray(states.items['id'])[:, :min(seen, capacity)]
      np.testing.assert_array_equal(states.num_seen, seen)
      # No item twice in a buffer, and items stay whole.
      self.assertTrue(np.all(np.diff(np.sort(stored, axis=1), axis=1) > 0))
      _assert_whole(states.items, states.items['id'])
      counts = np.bincount(stored.ravel(), minlength=seen)
      _assert_inclusion(counts, RUNS, min(1.0, capacity / seen), chi2=True)

  def test_collisions_within_a_batch_keep_the_later_item(self):
    # One batch of 12 items into one slot: item n picks it with probability
    # 1 / (n + 1), and only the last writer keeps it, so each item ends there
    # with probability 1 / 12 (first-writer-wins would always keep item 0).
    stream = 12
    buffer = replay.replay_buffer(1)
    states = jax.jit(jax.vmap(
        lambda k: buffer.add(k, buffer.init(_example()),
                             _items(np.arange(stream)))))(_keys(7))
    counts = np.bincount(np.asarray(states.items['id'])[:, 0],
                         minlength=stream)
    _assert_inclusion(counts, RUNS, 1 / stream, chi2=True)

  def test_last_writer_wins_mask(self):
    slots = jnp.array([3, 1, 3, 0, 1, 3, 7], jnp.int32)
    np.testing.assert_array_equal(
        _buffer.last_writer_wins(slots),
        [False, False, False, True, True, True, True])

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample_is_uniform_over_stored_items_and_keyed(self):
    buffer, add, _ = _reservoir(10)
    state = add(jax.random.key(0), buffer.init(_example()),
                _items(np.arange(1, 8)))   # 7 of 10 slots used
    sample = self.variant(lambda k, s: buffer.sample(k, s, SAMPLES))
    batch, valid = sample(jax.random.key(1), state)
    self.assertEqual(valid.dtype, jnp.bool_)
    np.testing.assert_array_equal(valid, np.ones(SAMPLES, bool))
    _assert_whole(batch, batch['id'])
    counts = np.bincount(np.asarray(batch['id']), minlength=8)
    self.assertEqual(counts[0], 0)   # never an empty slot
    _assert_inclusion(counts[1:], SAMPLES, 1 / 7)
    chex.assert_trees_all_equal(replay.ReplaySample(batch, valid),
                                sample(jax.random.key(1), state))
    self.assertFalse(np.array_equal(batch['id'],
                                    sample(jax.random.key(2), state)[0]['id']))

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample_from_empty_buffer_is_all_invalid(self):
    buffer = _reservoir(10)[0]
    batch, valid = self.variant(lambda k, s: buffer.sample(k, s, SAMPLES))(
        jax.random.key(0), buffer.init(_example()))
    np.testing.assert_array_equal(valid, np.zeros(SAMPLES, bool))
    chex.assert_shape(batch['x'], (SAMPLES, 3))
    for leaf in jax.tree.leaves(batch):   # slot 0's zeros
      np.testing.assert_array_equal(leaf, 0)
    # Mixed in with its mask, nothing of it is used.
    new = _items(np.arange(16))
    mixed, is_replay = replay.mix_replay(jax.random.key(1), new, batch, 0.5,
                                         replay_valid=valid)
    chex.assert_trees_all_equal(mixed, new)
    np.testing.assert_array_equal(is_replay, False)

  def test_compiles_once_with_donation(self):
    buffer = replay.replay_buffer(10)
    chex.clear_trace_counter()

    @functools.partial(jax.jit, donate_argnums=1)
    @chex.assert_max_traces(n=1)
    def add(key, state, batch):
      return buffer.add(key, state, batch)

    state = buffer.init(_example())
    for i in range(5):
      old = state
      state = add(jax.random.key(i), state, _items(np.arange(7) + 7 * i))
      self.assertTrue(old.items['x'].is_deleted())   # updated in place
    self.assertEqual(int(state.num_seen), 35)
    _assert_whole(state.items, state.items['id'])
    self.assertEqual(len(set(np.asarray(state.items['id']).tolist())), 10)
    chex.assert_trees_all_equal_dtypes(state, buffer.init(_example()))

  def test_add_touches_only_the_written_rows(self):
    # O(batch), not O(capacity): the only operations producing buffer-sized
    # arrays are the scatters of the kept rows (in place under donation).
    buffer = replay.replay_buffer(1009)
    self.assertEqual(
        _full_size_primitives(buffer.add, 1009, jax.random.key(0),
                              buffer.init(_example()), _items(np.arange(7))),
        {'scatter'})

  def test_keys_and_vmap_over_buffers(self):
    buffer, add, _ = _reservoir(10)
    keys = _keys(3)[:3]
    states = [add(k, buffer.init(_example()), _items(np.arange(7) + 100 * b))
              for b, k in enumerate(keys)]
    new = [_items(np.arange(7, 14) + 100 * b) for b in range(3)]
    keys = _keys(4)[:3]
    looped = [add(k, s, b) for k, s, b in zip(keys, states, new)]
    mapped = jax.jit(jax.vmap(buffer.add))(keys, _stack(states), _stack(new))
    chex.assert_trees_all_equal(mapped, _stack(looped))
    # Same key, same result; another key, another result.
    chex.assert_trees_all_equal(looped[0], add(keys[0], states[0], new[0]))
    self.assertFalse(np.array_equal(
        looped[0].items['id'], add(keys[1], states[0], new[0]).items['id']))

  def test_dark_experience_replay_stores_logits(self):
    # DER/DER++: the logits recorded when an example was seen are stored with
    # it, and come back aligned with their inputs.
    rng = np.random.default_rng(0)
    w_old = rng.standard_normal((3, 4)).astype(np.float32)
    apply_fn = lambda w, x: x @ w
    buffer = replay.replay_buffer(6)
    add = jax.jit(buffer.add)
    state = buffer.init({'x': jnp.zeros([3]), 'y': jnp.zeros([], jnp.int32),
                         'logits': jnp.zeros([4])})
    for i in range(4):
      x = rng.standard_normal((5, 3)).astype(np.float32)
      logits = apply_fn(w_old, x)
      state = add(jax.random.key(i), state, {
          'x': x, 'y': np.argmax(logits, -1).astype(np.int32),
          'logits': logits})
    old, valid = buffer.sample(jax.random.key(9), state, 8)
    np.testing.assert_allclose(old['logits'],
                               apply_fn(w_old, np.asarray(old['x'])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(old['y'], np.argmax(old['logits'], -1))
    self.assertTrue(np.all(np.asarray(valid)))

  @parameterized.named_parameters(('zero', 0, ValueError, 'must be > 0'),
                                  ('negative', -3, ValueError, 'must be > 0'),
                                  ('float', 2.5, TypeError, 'must be a Python'),
                                  ('bool', True, TypeError, 'must be a Python'))
  def test_bad_capacity(self, capacity, error, message):
    with self.assertRaisesRegex(error,
                                f'replay_buffer: capacity {message}'):
      replay.replay_buffer(capacity)

  def test_bad_batch(self):
    buffer = replay.replay_buffer(4)
    state = buffer.init(_example())
    key = jax.random.key(0)
    good = _items(np.arange(3))
    with self.assertRaisesRegex(
        ValueError, 'replay_buffer.add: batch must have the same pytree '
        'structure as example_item'):
      buffer.add(key, state, {'id': good['id'], 'x': good['x']})
    with self.assertRaisesRegex(
        ValueError, r"replay_buffer.add: batch leaf \['x'\] must have shape "
        r"\[batch, 3\] like example_item, got \(3, 4\)\."):
      buffer.add(key, state, {**good, 'x': jnp.zeros((3, 4))})
    with self.assertRaisesRegex(
        TypeError, r"replay_buffer.add: batch leaf \['x'\] must have dtype "
        'float32 like example_item, got int32.'):
      buffer.add(key, state, {**good, 'x': jnp.zeros((3, 3), jnp.int32)})
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'replay_buffer.add: batch must have a leading batch axis shared '
            "by all its leaves, got shapes (3,) for ['id'], (3,) for "
            "['nested'][0], (3,) for ['nested'][1], (2, 3) for ['x'].")):
      buffer.add(key, state, {**good, 'x': jnp.zeros((2, 3))})
    with self.assertRaisesRegex(
        ValueError, re.escape(
            'replay_buffer.add: batch must have a leading batch axis shared '
            "by all its leaves, got shapes () for ['id'], (3,) for "
            "['nested'][0], (3,) for ['nested'][1], (3, 3) for ['x'].")):
      buffer.add(key, state, {**good, 'id': jnp.int32(0)})
    # The same checks run at trace time under jit.
    with self.assertRaisesRegex(TypeError, 'must have dtype float32'):
      jax.jit(buffer.add)(key, state,
                          {**good, 'x': jnp.zeros((3, 3), jnp.float16)})

  @parameterized.named_parameters(('zero', 0, ValueError, 'must be > 0'),
                                  ('float', 2.0, TypeError, 'must be a Python'))
  def test_bad_batch_size(self, batch_size, error, message):
    buffer = replay.replay_buffer(4)
    with self.assertRaisesRegex(
        error, f'replay_buffer.sample: batch_size {message}'):
      buffer.sample(jax.random.key(0), buffer.init(_example()), batch_size)

  def test_traced_batch_size(self):
    buffer = replay.replay_buffer(4)
    with self.assertRaisesRegex(
        TypeError, 'replay_buffer.sample: batch_size must be a Python int, got '
        'a traced value'):
      jax.jit(buffer.sample)(jax.random.key(0), buffer.init(_example()), 3)

  def test_state_from_another_buffer(self):
    state = replay.replay_buffer(4).init(_example())
    with self.assertRaisesRegex(
        ValueError, r"replay_buffer.add: state.items leaf \['id'\] must have "
        'leading size 5'):
      replay.replay_buffer(5).add(jax.random.key(0), state,
                                  _items(np.arange(2)))


def _shares(capacity, seen):
  """Shares of the slots per class, as documented."""
  seen_mask = seen > 0
  k = max(int(seen_mask.sum()), 1)
  rank = np.cumsum(seen_mask) - 1
  return np.where(seen_mask & (rank < capacity),
                  (capacity - 1 - rank) // k + 1, 0)


def _check_balanced_state(state, capacity):
  """The documented invariants of a ClassBalancedState."""
  order = np.asarray(state.slot_order)
  ends = np.asarray(state.class_end)
  labels = np.asarray(state.labels)
  seen = np.asarray(state.class_seen)
  np.testing.assert_array_equal(np.sort(order), np.arange(capacity))
  starts = np.concatenate([[0], ends[:-1]])
  counts = ends - starts
  assert np.all(counts >= 0) and ends[-1] <= capacity, ends
  for c in range(len(ends)):
    np.testing.assert_array_equal(labels[order[starts[c]:ends[c]]], c)
  np.testing.assert_array_equal(labels[order[ends[-1]:]], -1)
  stored = order[:ends[-1]]
  np.testing.assert_array_equal(np.asarray(state.items['label'])[stored],
                                labels[stored])
  ids = np.asarray(state.items['id'])[stored]
  assert len(set(ids.tolist())) == len(ids)
  assert np.all(counts <= seen)
  share = _shares(capacity, seen)
  if ends[-1] < capacity:  # still filling: nothing evicted
    np.testing.assert_array_equal(counts, seen)
  else:  # below its share, a class has lost nothing
    under = counts < share
    np.testing.assert_array_equal(counts[under], seen[under])
    if np.all(seen >= share):
      np.testing.assert_array_equal(counts, share)
  return counts


class ClassBalancedBufferTest(chex.TestCase):

  def test_init(self):
    state = replay.class_balanced_buffer(6, 3).init(_example(labels=True))
    self.assertIsInstance(state, replay.ClassBalancedState)
    np.testing.assert_array_equal(state.labels, -1)
    np.testing.assert_array_equal(state.slot_order, np.arange(6))
    np.testing.assert_array_equal(state.class_end, [0, 0, 0])
    for field in state[1:]:
      self.assertEqual(field.dtype, jnp.int32)

  def test_new_class_evicts_from_largest(self):
    # Shares: 6 for one class, 3 + 3 for two, 2 + 2 + 2 for three. The
    # second class-1 item finds class 0 above its share; the first class-2
    # item finds classes 0 and 1 equally large and equally above their shares
    # and evicts from class 0 (smallest label).
    buffer, add, _ = _balanced(6, 3)
    state = buffer.init(_example(labels=True))
    labels = [0] * 8 + [1] * 2 + [1] * 3 + [2] + [2] * 3
    want = {8: [6, 0, 0], 9: [5, 1, 0], 10: [4, 2, 0], 13: [3, 3, 0],
            14: [2, 3, 1], 17: [2, 2, 2]}
    for i, label in enumerate(labels):
      lab = np.array([label], np.int32)
      state = add(jax.random.key(i), state, _items([i], lab), lab)
      counts = _check_balanced_state(state, 6)
      if i + 1 in want:
        np.testing.assert_array_equal(counts, want[i + 1], err_msg=str(i))

  @parameterized.named_parameters(
      ('skewed', 7, 3, [0.7, 0.2, 0.1], 5, 70),
      ('more_classes_than_slots', 3, 5, [0.4, 0.1, 0.2, 0.1, 0.2], 4, 40),
      ('class_incremental', 12, 6, None, 6, 72))
  def test_invariants_compile_once_and_donation(self, capacity, num_classes,
                                                probs, batch, stream):
    rng = np.random.default_rng(capacity)
    if probs is None:  # two new classes per task of 24 items
      labels = np.repeat(np.arange(num_classes), stream // num_classes)
      labels = np.concatenate(
          [rng.permutation(t) for t in labels.reshape(3, -1)])
    else:
      labels = rng.choice(num_classes, size=stream, p=probs)
    labels = labels.astype(np.int32)
    buffer = replay.class_balanced_buffer(capacity, num_classes)
    chex.clear_trace_counter()   # the counter is per function name

    @functools.partial(jax.jit, donate_argnums=1)
    @chex.assert_max_traces(n=1)
    def add(key, state, batch, labels):
      return buffer.add(key, state, batch, labels)

    state = buffer.init(_example(labels=True))
    for start in range(0, stream, batch):
      lab = labels[start:start + batch]
      old = state
      state = add(jax.random.key(start), state,
                  _items(np.arange(start, start + batch), lab), lab)
      self.assertTrue(old.items['x'].is_deleted())   # updated in place
      _check_balanced_state(state, capacity)
      np.testing.assert_array_equal(
          state.class_seen, np.bincount(labels[:start + batch],
                                        minlength=num_classes))
    self.assertEqual(int(state.num_seen), stream)
    chex.assert_trees_all_equal_dtypes(state,
                                       buffer.init(_example(labels=True)))

  def test_imbalanced_stream_gives_balanced_uniform_buffer(self):
    # Class 0 is 80% of the stream. Every class ends with exactly its share
    # of 5 slots, and within a class every item is kept with probability
    # 5 / n_c. vmapped over keys.
    capacity, num_classes, stream, batch, runs = 20, 4, 240, 16, 400
    rng = np.random.default_rng(0)
    labels = rng.choice(num_classes, size=stream,
                        p=[0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3]).astype(np.int32)
    n_c = np.bincount(labels, minlength=num_classes)
    self.assertTrue(np.all(n_c >= 5))
    buffer = replay.class_balanced_buffer(capacity, num_classes)
    add = jax.jit(jax.vmap(
        lambda key, state, items, labels, b: buffer.add(
            jax.random.fold_in(key, b), state, items, labels),
        in_axes=(0, 0, None, None, None)), donate_argnums=1)
    states = jax.vmap(lambda _: buffer.init(_example(labels=True)))(
        jnp.arange(runs))
    keys = _keys(5)[:runs]
    for start in range(0, stream, batch):
      ids = np.arange(start, start + batch)
      states = add(keys, states, _items(ids, labels[ids]), labels[ids], start)
    stored_labels = np.asarray(states.labels)
    for c in range(num_classes):
      np.testing.assert_array_equal(np.sum(stored_labels == c, axis=1), 5)
    state = jax.tree.map(lambda x: x[0], states)
    _check_balanced_state(state, capacity)
    _assert_whole(states.items, states.items['id'])
    counts = np.bincount(np.asarray(states.items['id']).ravel(),
                         minlength=stream)
    for c in range(num_classes):
      _assert_inclusion(counts[labels == c], runs, 5 / n_c[c], chi2=True)
    # Samples are class balanced.
    batch, valid = buffer.sample(jax.random.key(1), state, SAMPLES)
    self.assertTrue(np.all(np.asarray(valid)))
    _assert_inclusion(np.bincount(np.asarray(batch['label']),
                                  minlength=num_classes), SAMPLES, 0.25)

  def test_shrinking_and_regrowing_classes_stay_uniform(self):
    # Tasks 0, 1, 2, then 0, 1, 2 again: class 0 first holds all 7 slots,
    # then shrinks to its share of 3 (evictions), then sees more items; its
    # stored items must still be a uniform subset of all it has seen.
    capacity, num_classes, batch = 7, 3, 8
    labels = np.array([0] * 20 + [1] * 12 + [2] * 3 + [0] * 5 + [1] * 4 +
                      [2] * 4, np.int32)
    n_c = np.bincount(labels, minlength=num_classes)
    buffer = replay.class_balanced_buffer(capacity, num_classes)
    add = jax.jit(jax.vmap(
        lambda key, state, items, labels, b: buffer.add(
            jax.random.fold_in(key, b), state, items, labels),
        in_axes=(0, 0, None, None, None)), donate_argnums=1)
    states = jax.vmap(lambda _: buffer.init(_example(labels=True)))(
        jnp.arange(RUNS))
    keys = _keys(9)
    for start in range(0, len(labels), batch):
      ids = np.arange(start, start + batch)
      states = add(keys, states, _items(ids, labels[ids]), labels[ids], start)
    shares = [3, 2, 2]
    np.testing.assert_array_equal(states.class_end,
                                  np.broadcast_to(np.cumsum(shares), (RUNS, 3)))
    counts = np.bincount(np.asarray(states.items['id']).ravel(),
                         minlength=len(labels))
    for c in range(num_classes):
      _assert_inclusion(counts[labels == c], RUNS, shares[c] / n_c[c],
                        chi2=True)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample(self):
    buffer, add, _ = _balanced(6, 3)
    state = buffer.init(_example(labels=True))
    sample = self.variant(lambda k, s: buffer.sample(k, s, SAMPLES))
    batch, valid = sample(jax.random.key(0), state)
    np.testing.assert_array_equal(valid, np.zeros(SAMPLES, bool))
    for leaf in jax.tree.leaves(batch):   # slot 0's zeros
      np.testing.assert_array_equal(leaf, 0)
    for i, label in enumerate([1, 0, 1]):
      lab = np.array([label], np.int32)
      state = add(jax.random.key(i), state, _items([5 + i], lab), lab)
    batch, valid = sample(jax.random.key(2), state)
    np.testing.assert_array_equal(valid, np.ones(SAMPLES, bool))
    _assert_whole(batch, batch['id'])
    np.testing.assert_array_equal(batch['label'],
                                  np.where(np.asarray(batch['id']) == 6, 0, 1))
    counts = np.bincount(np.asarray(batch['id']), minlength=8)
    self.assertEqual(counts.sum(), counts[5:].sum())
    _assert_inclusion(counts[5:], SAMPLES, 1 / 3)

  def test_add_touches_only_the_written_rows(self):
    # Per item O(num_classes): inside the scan, slot_order (capacity-sized)
    # is only updated by a scatter of num_classes + 2 entries.
    buffer = replay.class_balanced_buffer(1009, 5)
    lab = np.arange(7, dtype=np.int32) % 5
    self.assertEqual(
        _full_size_primitives(buffer.add, 1009, jax.random.key(0),
                              buffer.init(_example(labels=True)),
                              _items(np.arange(7), lab), lab),
        {'scatter'})

  def test_keys(self):
    buffer, add, _ = _balanced(6, 3)

    def run(seed):
      state = buffer.init(_example(labels=True))
      for i in range(20):
        lab = np.array([i % 3], np.int32)
        state = add(jax.random.key(100 * seed + i), state, _items([i], lab),
                    lab)
      return state

    chex.assert_trees_all_equal(run(0), run(0))
    self.assertFalse(np.array_equal(run(0).items['id'], run(1).items['id']))

  def test_out_of_range_labels_are_skipped_under_jit(self):
    buffer, add, _ = _balanced(6, 3)
    state = buffer.init(_example(labels=True))
    for i, label in enumerate([-1, 3, 2]):
      lab = np.array([label], np.int32)   # traced under jit: not checked
      state = add(jax.random.key(i), state, _items([i + 1], lab), lab)
    np.testing.assert_array_equal(state.class_seen, [0, 0, 1])
    np.testing.assert_array_equal(state.class_end, [0, 0, 1])
    self.assertEqual(int(state.num_seen), 3)
    np.testing.assert_array_equal(state.items['id'], [3, 0, 0, 0, 0, 0])

  @parameterized.named_parameters(
      ('capacity', 0, 3, ValueError, 'capacity must be > 0, got 0'),
      ('num_classes', 4, 0, ValueError, 'num_classes must be > 0, got 0'),
      ('num_classes_float', 4, 2.0, TypeError,
       'num_classes must be a Python int'))
  def test_bad_construction(self, capacity, num_classes, error, message):
    with self.assertRaisesRegex(error, f'class_balanced_buffer: {message}'):
      replay.class_balanced_buffer(capacity, num_classes)

  def test_bad_labels(self):
    buffer = replay.class_balanced_buffer(4, 3)
    state = buffer.init(_example(labels=True))
    key = jax.random.key(0)
    lab = np.array([0, 1, 2], np.int32)
    batch = _items([1, 2, 3], lab)
    with self.assertRaisesRegex(
        ValueError, r'class_balanced_buffer.add: labels must have shape \[3\] '
        r'\(the batch size\), got \(3, 1\)\.'):
      buffer.add(key, state, batch, lab[:, None])
    with self.assertRaisesRegex(
        TypeError, 'class_balanced_buffer.add: labels must have an integer '
        'dtype, got float32.'):
      buffer.add(key, state, batch, lab.astype(np.float32))
    with self.assertRaisesRegex(
        ValueError, r'class_balanced_buffer.add: labels must be in \[0, 3\), '
        r'got values in \[0, 3\]\.'):
      buffer.add(key, state, batch, np.array([0, 3, 1], np.int32))
    with self.assertRaisesRegex(
        TypeError, r"class_balanced_buffer.add: batch leaf \['x'\] must have "
        'dtype float32'):
      buffer.add(key, state, {**batch, 'x': jnp.zeros((3, 3), jnp.int32)},
                 lab)
    with self.assertRaisesRegex(
        ValueError, 'class_balanced_buffer.sample: batch_size must be > 0'):
      buffer.sample(key, state, -1)


class MixReplayTest(chex.TestCase):

  def _batches(self, size=16, replay_rows=16):
    return _items(np.arange(size)), _items(np.arange(replay_rows) + 1000)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('none', 0.0, 0), ('quarter', 0.25, 4),
                                  ('third', 1 / 3, 5), ('all', 1.0, 16))
  def test_counts(self, fraction, want):
    # Under jit the fraction is traced; eagerly it is a Python float.
    new, old = self._batches()
    mixed, is_replay = self.variant(replay.mix_replay)(
        jax.random.key(0), new, old, fraction)
    self.assertEqual(is_replay.dtype, jnp.bool_)
    self.assertEqual(int(np.sum(is_replay)), want)
    ids = np.asarray(mixed['id'])
    is_replay = np.asarray(is_replay)
    # New rows keep their positions; replayed rows are replay's first ones.
    np.testing.assert_array_equal(ids[~is_replay], np.arange(16)[~is_replay])
    np.testing.assert_array_equal(np.sort(ids[is_replay]),
                                  1000 + np.arange(want))
    _assert_whole(mixed, mixed['id'])
    if want == 0:
      chex.assert_trees_all_equal(mixed, new)
    chex.assert_trees_all_equal_dtypes(mixed, new)

  def test_traced_fraction_matches_eager_and_is_clipped(self):
    new, old = self._batches()
    key = jax.random.key(3)
    mix = jax.jit(replay.mix_replay)
    for fraction in (0.0, 0.25, 0.5, 1.0):
      chex.assert_trees_all_equal(mix(key, new, old, fraction),
                                  replay.mix_replay(key, new, old, fraction))
    # Traced: clipped to [0, 1] and to replay_sample's rows.
    self.assertEqual(int(np.sum(mix(key, new, old, 1.5)[1])), 16)
    self.assertEqual(int(np.sum(mix(key, new, old, -0.5)[1])), 0)
    small = _items(np.arange(3) + 1000)
    _, is_replay = replay.mix_replay(key, new, small, 0.125)   # 2 rows
    self.assertEqual(int(np.sum(is_replay)), 2)
    self.assertEqual(int(np.sum(mix(key, new, small, 0.5)[1])), 3)

  def test_positions_are_uniform_and_keyed(self):
    new, old = self._batches()
    keys = _keys(11)
    _, is_replay = jax.jit(jax.vmap(
        lambda k: replay.mix_replay(k, new, old, 0.25)))(keys)
    is_replay = np.asarray(is_replay)
    np.testing.assert_array_equal(is_replay.sum(1), 4)
    _assert_inclusion(is_replay.sum(0), RUNS, 0.25, chi2=True)
    self.assertFalse(np.array_equal(is_replay[0], is_replay[1]))
    chex.assert_trees_all_equal(
        replay.mix_replay(keys[0], new, old, 0.25),
        replay.mix_replay(keys[0], new, old, 0.25))

  def test_replay_valid(self):
    new, old = self._batches()
    key = jax.random.key(0)
    mixed, is_replay = replay.mix_replay(key, new, old, 0.5,
                                         replay_valid=np.zeros(16, bool))
    chex.assert_trees_all_equal(mixed, new)
    np.testing.assert_array_equal(is_replay, False)
    valid = np.arange(16) % 2 == 0   # rows 0, 2, 4, 6 of the first 8
    mixed, is_replay = replay.mix_replay(key, new, old, 0.5,
                                         replay_valid=valid)
    _, all_replay = replay.mix_replay(key, new, old, 0.5)
    is_replay = np.asarray(is_replay)
    self.assertEqual(int(np.sum(is_replay)), 4)
    self.assertTrue(np.all(np.asarray(all_replay)[is_replay]))
    ids = np.asarray(mixed['id'])
    np.testing.assert_array_equal(np.sort(ids[is_replay]),
                                  [1000, 1002, 1004, 1006])
    np.testing.assert_array_equal(ids[~is_replay], np.arange(16)[~is_replay])

  @parameterized.named_parameters(('negative', -0.1), ('above_one', 1.5),
                                  ('nan', float('nan')))
  def test_bad_fraction(self, fraction):
    new, old = self._batches()
    with self.assertRaisesRegex(
        ValueError, r'mix_replay: fraction must be in \[0, 1\]'):
      replay.mix_replay(jax.random.key(0), new, old, fraction)

  def test_bad_inputs(self):
    new, old = self._batches()
    key = jax.random.key(0)
    with self.assertRaisesRegex(
        TypeError, 'mix_replay: fraction must be a real number'):
      replay.mix_replay(key, new, old, True)
    with self.assertRaisesRegex(
        ValueError, 'mix_replay: fraction must be a scalar'):
      replay.mix_replay(key, new, old, np.array([0.5]))
    with self.assertRaisesRegex(
        ValueError, r'mix_replay: replay_sample must have at least 8 rows '
        r'\(round\(fraction \* 16\)\), got 5\.'):
      replay.mix_replay(key, new, _items(np.arange(5)), 0.5)
    with self.assertRaisesRegex(
        ValueError, 'mix_replay: replay_sample must have the same pytree '
        'structure as new_batch'):
      replay.mix_replay(key, new, {'id': old['id']}, 0.5)
    with self.assertRaisesRegex(
        TypeError, r"mix_replay: replay_sample leaf \['x'\] must have dtype "
        'float32 like new_batch, got int32.'):
      replay.mix_replay(key, new, {**old, 'x': jnp.zeros((16, 3), jnp.int32)},
                        0.5)
    with self.assertRaisesRegex(
        ValueError, r'mix_replay: new_batch must have a leading batch axis '
        'shared by all its leaves'):
      replay.mix_replay(key, {**new, 'x': jnp.zeros((15, 3))}, old, 0.5)
    with self.assertRaisesRegex(
        ValueError, r'mix_replay: replay_sample must have a leading batch axis '
        'shared by all its leaves'):
      replay.mix_replay(key, new, {**old, 'x': jnp.zeros((15, 3))}, 0.5)
    with self.assertRaisesRegex(
        ValueError, r'mix_replay: replay_valid must have shape \[16\]'):
      replay.mix_replay(key, new, old, 0.5, replay_valid=np.ones(8, bool))
    with self.assertRaisesRegex(
        TypeError, 'mix_replay: replay_valid must have dtype bool, got '
        'int32'):
      replay.mix_replay(key, new, old, 0.5,
                        replay_valid=np.ones(16, np.int32))

  def test_traced_nan_fraction_propagates(self):
    # Converting a NaN fraction to a row count would give 0 replayed rows,
    # silently; instead every floating leaf of the mixed batch is NaN.
    new, old = self._batches()
    key = jax.random.key(0)
    mix = jax.jit(replay.mix_replay)
    nan = jnp.float32(np.nan)
    for replay_sample in (old, replay.ReplaySample(old, np.ones(16, bool)),
                         _items(np.arange(0) + 1000)):   # also with no rows
      mixed, is_replay = mix(key, new, replay_sample, nan)
      self.assertTrue(np.all(np.isnan(mixed['x'])))
      np.testing.assert_array_equal(mixed['id'], new['id'])   # integer
      chex.assert_trees_all_equal(mixed['nested'], new['nested'])
      np.testing.assert_array_equal(is_replay, False)
      chex.assert_trees_all_equal_dtypes(mixed, new)
    # A finite traced fraction leaves no NaN.
    mixed, _ = mix(key, new, old, jnp.float32(0.5))
    self.assertFalse(np.any(np.isnan(mixed['x'])))


def _sample_cases():
  return (('reservoir', lambda: replay.replay_buffer(6), False),
          ('class_balanced', lambda: replay.class_balanced_buffer(6, 3),
           True),
          ('class_balanced_label_fn',
           lambda: replay.class_balanced_buffer(6, 3, label_fn=_label_of),
           False))


def _label_of(batch):
  return batch['label']


class ReplaySampleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_sample_cases())
  def test_sample_is_a_replay_sample_that_unpacks_as_a_pair(
      self, make_buffer, explicit_labels):
    buffer = make_buffer()
    sample = self.variant(lambda k, s: buffer.sample(k, s, 5))
    state = buffer.init(_example(labels=True))
    empty = sample(jax.random.key(0), state)
    self.assertIsInstance(empty, replay.ReplaySample)
    self.assertEqual(replay.ReplaySample._fields, ('items', 'valid'))
    items, valid = empty
    self.assertIs(items, empty.items)
    self.assertIs(valid, empty.valid)
    self.assertEqual(valid.dtype, jnp.bool_)
    chex.assert_shape(valid, (5,))
    chex.assert_shape(items['x'], (5, 3))
    np.testing.assert_array_equal(valid, False)
    lab = np.array([0, 1, 2], np.int32)
    batch = _items([1, 2, 3], lab)
    if explicit_labels:
      state = buffer.add(jax.random.key(1), state, batch, lab)
    else:
      state = buffer.add(jax.random.key(1), state, batch)
    full = sample(jax.random.key(2), state)
    self.assertIsInstance(full, replay.ReplaySample)
    items, valid = full
    np.testing.assert_array_equal(valid, True)
    _assert_whole(items, items['id'])
    self.assertTrue(set(np.asarray(items['id']).tolist()) <= {1, 2, 3})

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('none', 0.0), ('quarter', 0.25),
                                  ('half', 0.5), ('all', 1.0))
  def test_mix_with_a_replay_sample_equals_explicit_valid(self, fraction):
    mix_sample = self.variant(
        lambda k, new, sample, f: replay.mix_replay(k, new, sample, f))
    mix_explicit = self.variant(
        lambda k, new, items, f, valid: replay.mix_replay(
            k, new, items, f, replay_valid=valid))
    new = _items(np.arange(16), np.arange(16) % 3)
    key = jax.random.key(4)
    # A hand-made mask with invalid rows, and real samples of both buffers,
    # empty (all invalid) and not.
    samples = [replay.ReplaySample(_items(np.arange(16) + 1000,
                                          np.arange(16) % 3),
                                   np.arange(16) % 3 != 1)]
    lab = np.array([0, 1, 2, 0], np.int32)
    for buffer in (replay.replay_buffer(6),
                   replay.class_balanced_buffer(6, 3, label_fn=_label_of)):
      state = buffer.init(_example(labels=True))
      samples.append(buffer.sample(jax.random.key(5), state, 16))
      state = buffer.add(jax.random.key(6), state,
                         _items([100, 101, 102, 103], lab))
      samples.append(buffer.sample(jax.random.key(7), state, 16))
    for i, sample in enumerate(samples):
      got = mix_sample(key, new, sample, fraction)
      want = mix_explicit(key, new, sample.items, fraction, sample.valid)
      chex.assert_trees_all_equal(got, want, custom_message=f'sample {i}')
    # The hand-made mask is used: no row 1 of every 3 is replayed.
    mixed, is_replay = mix_sample(key, new, samples[0], fraction)
    ids = np.asarray(mixed['id'])[np.asarray(is_replay)]
    self.assertTrue(np.all((ids - 1000) % 3 != 1))
    # The empty buffers' samples give back the new batch.
    for sample in (samples[1], samples[3]):
      mixed, is_replay = mix_sample(key, new, sample, fraction)
      chex.assert_trees_all_equal(mixed, new)
      np.testing.assert_array_equal(is_replay, False)

  def test_mix_replay_sample_with_replay_valid_raises(self):
    new = _items(np.arange(16))
    sample = replay.ReplaySample(_items(np.arange(16) + 1000),
                                 np.ones(16, bool))
    message = re.escape(
        'mix_replay: replay_valid must be None when replay_sample is a '
        'ReplaySample (its valid field is the mask), got an array of shape '
        '(16,).')
    with self.assertRaisesRegex(ValueError, message):
      replay.mix_replay(jax.random.key(0), new, sample, 0.5,
                        replay_valid=sample.valid)
    with self.assertRaisesRegex(ValueError, message):   # at trace time
      jax.jit(lambda s, v: replay.mix_replay(
          jax.random.key(0), new, s, 0.5, replay_valid=v))(sample,
                                                           sample.valid)

  def test_mix_replay_sample_bad_valid(self):
    new = _items(np.arange(16))
    old = _items(np.arange(16) + 1000)
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, re.escape(
        "mix_replay: replay_sample.valid must have shape [16] (replay_sample's "
        'leading size), got (8,).')):
      replay.mix_replay(key, new, replay.ReplaySample(old, np.ones(8, bool)),
                        0.5)
    with self.assertRaisesRegex(TypeError, re.escape(
        'mix_replay: replay_sample.valid must have dtype bool, got int32.')):
      replay.mix_replay(key, new,
                        replay.ReplaySample(old, np.ones(16, np.int32)), 0.5)
    with self.assertRaisesRegex(ValueError, re.escape(
        'mix_replay: replay_sample must have the same pytree structure as '
        'new_batch')):
      replay.mix_replay(key, new,
                        replay.ReplaySample({'id': old['id']},
                                            np.ones(16, bool)), 0.5)


class LabelFnTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_label_fn_gives_the_same_state_as_explicit_labels(self):
    explicit = replay.class_balanced_buffer(7, 3)
    implicit = replay.class_balanced_buffer(7, 3, label_fn=_label_of)
    add_explicit = self.variant(explicit.add)
    add_implicit = self.variant(implicit.add)
    state_e = explicit.init(_example(labels=True))
    state_i = implicit.init(_example(labels=True))
    rng = np.random.default_rng(0)
    for i in range(6):   # 30 items: fills, then evicts and replaces
      lab = rng.choice(3, size=5, p=[0.6, 0.3, 0.1]).astype(np.int32)
      batch = _items(np.arange(5 * i, 5 * i + 5), lab)
      key = jax.random.key(i)
      state_e = add_explicit(key, state_e, batch, lab)
      state_i = add_implicit(key, state_i, batch)
      chex.assert_trees_all_equal(state_e, state_i,
                                  custom_message=f'batch {i}')
    _check_balanced_state(state_i, 7)
    self.assertEqual(int(state_i.num_seen), 30)

  def test_label_fn_may_compute_the_labels(self):
    # Any traceable function of the batch, e.g. a label derived from an id.
    buffer = replay.class_balanced_buffer(
        4, 2, label_fn=lambda batch: batch['id'] % 2)
    state = buffer.init(_example())
    state = jax.jit(buffer.add)(jax.random.key(0), state,
                                _items(np.arange(6)))
    np.testing.assert_array_equal(state.class_seen, [3, 3])
    np.testing.assert_array_equal(state.class_end, [2, 4])
    stored = np.asarray(state.items['id'])
    np.testing.assert_array_equal(np.asarray(state.labels), stored % 2)

  def test_missing_or_duplicate_labels(self):
    lab = np.array([0, 1, 2], np.int32)
    batch = _items([1, 2, 3], lab)
    key = jax.random.key(0)
    explicit = replay.class_balanced_buffer(4, 3)
    with self.assertRaisesRegex(ValueError, re.escape(
        'class_balanced_buffer.add: labels must be given when the buffer has '
        'no label_fn (or build it with class_balanced_buffer(..., '
        'label_fn=...)), got None.')):
      explicit.add(key, explicit.init(_example(labels=True)), batch)
    implicit = replay.class_balanced_buffer(4, 3, label_fn=_label_of)
    message = re.escape(
        'class_balanced_buffer.add: labels must not be given when the buffer '
        'has a label_fn (the labels are label_fn(batch)), got labels of '
        'shape (3,).')
    with self.assertRaisesRegex(ValueError, message):
      implicit.add(key, implicit.init(_example(labels=True)), batch, lab)
    with self.assertRaisesRegex(ValueError, message):   # at trace time
      jax.jit(implicit.add)(key, implicit.init(_example(labels=True)), batch,
                            lab)

  def test_bad_label_fn(self):
    with self.assertRaisesRegex(TypeError, re.escape(
        "class_balanced_buffer: label_fn must be callable or None, got "
        "'label'.")):
      replay.class_balanced_buffer(4, 3, label_fn='label')
    key = jax.random.key(0)
    batch = _items([1, 2, 3], [0, 1, 2])
    cases = (
        (lambda b: b['label'][:, None], ValueError,
         'class_balanced_buffer.add: label_fn(batch) must have shape [3] '
         '(the batch size), got (3, 1).'),
        (lambda b: b['x'][:, 0], TypeError,
         'class_balanced_buffer.add: label_fn(batch) must have an integer '
         'dtype, got float32.'),
        (lambda b: b['label'] + 1, ValueError,
         'class_balanced_buffer.add: label_fn(batch) must be in [0, 3), got '
         'values in [1, 3].'),
    )
    for label_fn, error, message in cases:
      buffer = replay.class_balanced_buffer(4, 3, label_fn=label_fn)
      with self.assertRaisesRegex(error, re.escape(message)):
        buffer.add(key, buffer.init(_example(labels=True)), batch)


def _train_loop(buffer, key, state, batches, fraction):
  """A generic replay loop: any buffer whose add is add(key, state, batch).

  Each step mixes the replay drawn at the end of the previous step into the
  batch (the training itself is left out), adds the batch, then samples the
  next step's replay. ``batches`` leaves are ``[num_steps, batch, ...]``.
  """
  batch_size = jax.tree.leaves(batches)[0].shape[1]
  key, key_first = jax.random.split(key)
  first = buffer.sample(key_first, state, batch_size)

  def step(carry, batch):
    key, state, sample = carry
    key, key_mix, key_add, key_sample = jax.random.split(key, 4)
    mixed, is_replay = replay.mix_replay(key_mix, batch, sample, fraction)
    state = buffer.add(key_add, state, batch)
    sample = buffer.sample(key_sample, state, batch_size)
    return (key, state, sample), (mixed, is_replay)

  (_, state, sample), (mixed, is_replay) = jax.lax.scan(
      step, (key, state, first), batches)
  return state, sample, mixed, is_replay


class InterchangeableBuffersTest(chex.TestCase):

  def test_both_buffers_in_one_jitted_train_loop(self):
    chex.clear_trace_counter()
    buffers = (replay.replay_buffer(6),
               replay.class_balanced_buffer(6, 3, label_fn=_label_of))
    # One trace per buffer (a static argument), none on new values.
    loop = jax.jit(chex.assert_max_traces(_train_loop, n=len(buffers)),
                   static_argnums=0)
    steps, size = 5, 4

    def batches(offset):
      ids = np.arange(steps * size) + offset
      items = _items(ids, ids % 3)
      return jax.tree.map(lambda x: x.reshape((steps, size) + x.shape[1:]),
                          items)

    for buffer in buffers:
      state = buffer.init(_example(labels=True))
      for call in range(2):
        key = jax.random.key(call)
        data = batches(100 * call)
        new_state, sample, mixed, is_replay = loop(buffer, key, state, data,
                                                   jnp.float32(0.5))
        self.assertIsInstance(sample, replay.ReplaySample)
        self.assertIsInstance(new_state, type(state))
        chex.assert_trees_all_equal_dtypes(new_state, state)
        # The same steps, one by one in Python and not jitted.
        want = _python_loop(buffer, key, state, data, 0.5)
        chex.assert_trees_all_equal((new_state, sample, mixed, is_replay),
                                    want)
        if call == 0:   # the first step's replay is from an empty buffer
          np.testing.assert_array_equal(is_replay[0], False)
        self.assertEqual(int(np.sum(is_replay[1:])), 2 * (steps - 1))
        _assert_whole(mixed, mixed['id'])
        state = new_state
      self.assertEqual(int(state.num_seen), 2 * steps * size)
    # The class-balanced buffer ends balanced: 2 slots per class.
    np.testing.assert_array_equal(state.class_end, [2, 4, 6])


def _python_loop(buffer, key, state, batches, fraction):
  """``_train_loop`` step by step, eagerly (the fraction is concrete)."""
  num_steps, batch_size = jax.tree.leaves(batches)[0].shape[:2]
  key, key_first = jax.random.split(key)
  sample = buffer.sample(key_first, state, batch_size)
  outputs = []
  for t in range(num_steps):
    batch = jax.tree.map(lambda x, t=t: x[t], batches)
    key, key_mix, key_add, key_sample = jax.random.split(key, 4)
    outputs.append(replay.mix_replay(key_mix, batch, sample, fraction))
    state = buffer.add(key_add, state, batch)
    sample = buffer.sample(key_sample, state, batch_size)
  mixed, is_replay = jax.tree.map(lambda *xs: np.stack(xs), *outputs)
  return state, sample, mixed, is_replay
