"""Tests for metacf.noise: T5 span corruption and BART text infilling.

The references are written independently of the kernels: the counts from
NumPy's round-half-even, T5's sentinel construction as a Python loop over
the mask, a decoder that rebuilds the sequence from (inputs, targets), the
exact marginal law of a uniform composition, and a NumPy simulation of the
documented text-infilling law (NumPy's Poisson sampler, rejection of zero
lengths, a uniform arrangement). The statistical tests use fixed keys and
seeds, so they are deterministic; each passes at a p-value far above its
threshold of 1e-4.
"""

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from metacf import noise

_P_MIN = 1e-4  # chi-square tests fail below this p-value


def _counts(length, density, mean):
  """(n_noise, n_spans) as the contract states, with the documented cap."""
  n_noise = int(np.clip(np.round(length * density), 1, length - 1))
  n_spans = max(int(np.round(n_noise / mean)), 1)
  return n_noise, min(n_spans, length - n_noise)


def _runs(mask):
  """[(value, run length)] of a 1-D bool array."""
  mask = np.asarray(mask)
  change = np.flatnonzero(mask[1:] != mask[:-1]) + 1
  edges = np.concatenate([[0], change, [mask.size]])
  return [(bool(mask[s]), int(e - s)) for s, e in zip(edges[:-1], edges[1:])]


def _t5_from_mask(tokens, mask, sentinel_start, eos_id=None):
  """T5's inputs and targets for a given mask, one token at a time."""
  inputs, targets, span = [], [], -1
  for i, (token, is_noise) in enumerate(zip(tokens, mask)):
    if is_noise:
      if i == 0 or not mask[i - 1]:
        span += 1
        inputs.append(sentinel_start - span)
        targets.append(sentinel_start - span)
      targets.append(token)
    else:
      inputs.append(token)
  if eos_id is not None:
    inputs.append(eos_id)
    targets.append(eos_id)
  return np.array(inputs), np.array(targets)


def _decode(inputs, targets, lowest_sentinel):
  """The original tokens from (inputs, targets); ids >= lowest are sentinels."""
  spans, current = {}, None
  for token in targets:
    if token >= lowest_sentinel:
      current = int(token)
      assert current not in spans, f'sentinel {current} repeated in targets'
      spans[current] = []
    else:
      assert current is not None, 'targets do not start with a sentinel'
      spans[current].append(int(token))
  out = []
  for token in inputs:
    if token >= lowest_sentinel:
      out.extend(spans.pop(int(token)))
    else:
      out.append(int(token))
  assert not spans, f'sentinels {sorted(spans)} of targets not in inputs'
  return np.array(out)


def _composition_pmf(n, m):
  """P(first part = j), j = 1..n-m+1, uniform composition of n into m."""
  j = np.arange(1, n - m + 2)
  return np.array([math.comb(n - int(x) - 1, m - 2) for x in j],
                  np.float64) / math.comb(n - 1, m - 1)


def _chi_square_p(observed, expected_probs, min_expected=5.0):
  """p-value of a goodness-of-fit test, tail bins merged to min_expected."""
  observed = np.asarray(observed, np.float64)
  expected = np.asarray(expected_probs, np.float64) * observed.sum()
  obs, exp, o_acc, e_acc = [], [], 0.0, 0.0
  for o, e in zip(observed, expected):
    o_acc, e_acc = o_acc + o, e_acc + e
    if e_acc >= min_expected:
      obs.append(o_acc)
      exp.append(e_acc)
      o_acc = e_acc = 0.0
  obs[-1] += o_acc
  exp[-1] += e_acc
  statistic = np.sum((np.array(obs) - np.array(exp))**2 / np.array(exp))
  return stats.chi2.sf(statistic, len(obs) - 1)


def _two_sample_p(a, b, min_count=10):
  """p-value that two integer samples share one law (contingency chi-square)."""
  a, b = np.asarray(a), np.asarray(b)
  values = np.union1d(a, b)
  table = np.stack([[np.sum(a == v) for v in values],
                    [np.sum(b == v) for v in values]]).astype(np.float64)
  merged, acc = [], np.zeros(2)
  for col in table.T:  # merge sparse columns with their neighbours
    acc = acc + col
    if acc.sum() >= min_count:
      merged.append(acc)
      acc = np.zeros(2)
  if acc.sum():
    merged[-1] = merged[-1] + acc
  if len(merged) < 2:
    return 1.0
  return stats.chi2_contingency(np.stack(merged, axis=1))[1]


def _masks(seed, num, length, density=0.15, mean=3.0):
  keys = jax.random.split(jax.random.key(seed), num)
  fn = jax.jit(jax.vmap(lambda k: noise.random_spans_noise_mask(
      k, length, density, mean)))
  return np.asarray(fn(keys))


def _corrupt_batch(seed, tokens, **kwargs):
  keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
  fn = jax.jit(jax.vmap(functools.partial(noise.span_corruption, **kwargs)))
  inputs, targets = fn(keys, tokens)
  return np.asarray(inputs), np.asarray(targets)


# (length, noise_density, mean_noise_span_length): T5's setting, short
# sequences, the clips of n_noise and n_spans, and a long row (n_spans - 1
# > 64 cut points: the kernels' scatter and pointer-jumping loop paths).
_CASES = (
    (568, 0.15, 3.0), (2, 0.15, 3.0), (3, 0.5, 1.0), (7, 0.15, 3.0),
    (10, 0.9, 1.0), (37, 0.3, 2.5), (100, 0.5, 1.0), (100, 0.05, 10.0),
    (64, 0.15, 1.0), (2000, 0.15, 3.0),
)


class CountsTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_lengths_match_counts(self, length, density, mean):
    n_noise, n_spans = _counts(length, density, mean)
    self.assertEqual(
        noise.span_corruption_lengths(length, density, mean),
        (length - n_noise + n_spans, n_noise + n_spans))
    self.assertEqual(
        noise.span_corruption_lengths(length, density, mean, eos=True),
        (length - n_noise + n_spans + 1, n_noise + n_spans + 1))

  def test_round_half_even(self):
    # 10 * 0.25 = 2.5 -> 2 and 30 * 0.15 = 4.5 -> 4 (half-even), 6 / 4 = 1.5
    # -> 2 spans.
    self.assertEqual(noise.span_corruption_lengths(10, 0.25, 3.0),
                     (8 + 1, 2 + 1))
    self.assertEqual(noise.span_corruption_lengths(30, 0.15, 3.0),
                     (26 + 1, 4 + 1))
    self.assertEqual(noise.span_corruption_lengths(40, 0.15, 4.0),
                     (34 + 2, 6 + 2))

  def test_tokens_length_t5_defaults(self):
    self.assertEqual(noise.span_corruption_tokens_length(512), (568, 114))

  @parameterized.parameters((0.15, 3.0), (0.5, 3.0), (0.3, 2.0), (0.5, 1.0),
                            (0.05, 8.0))
  def test_tokens_length_is_t5_random_spans_helper(self, density, mean):

    def t5_lengths(tokens_length):  # T5's helper, one sentinel per span
      num_noise = int(round(tokens_length * density))
      num_spans = int(round(num_noise / mean))
      return (tokens_length - num_noise + num_spans + 1,
              num_noise + num_spans + 1)

    for inputs_length in (16, 64, 100, 128, 512, 1024):
      tokens_length = inputs_length - 1
      while t5_lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
      got_inputs, targets_length = t5_lengths(tokens_length)
      if density == 0.5 and targets_length > got_inputs:
        tokens_length -= 1
        targets_length -= 1
      got = noise.span_corruption_tokens_length(inputs_length, density, mean)
      self.assertEqual(got, (tokens_length, targets_length))
      if int(round(round(got[0] * density) / mean)) < 1:
        continue  # T5's zero spans; the kernel clips to one (documented)
      # The kernel corrupts that many tokens to at most inputs_length.
      inputs, targets = noise.span_corruption_lengths(
          got[0], density, mean, eos=True)
      self.assertLessEqual(inputs, inputs_length)
      if density != 0.5:  # T5's 0.5 adjustment decrements targets blindly
        self.assertEqual(targets, got[1])
      else:
        self.assertIn(got[1] - targets, (0, 1))


class RandomSpansNoiseMaskTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_invariants(self, length, density, mean):
    n_noise, n_spans = _counts(length, density, mean)
    masks = _masks(0, 64, length, density, mean)
    self.assertEqual(masks.dtype, np.bool_)
    self.assertEqual(masks.shape, (64, length))
    for mask in masks:
      runs = _runs(mask)
      self.assertEqual(mask.sum(), n_noise)
      self.assertEqual(len(runs), 2 * n_spans)
      # Alternating, non-noise first (so it ends with noise).
      self.assertEqual([v for v, _ in runs], [False, True] * n_spans)

  def test_uniform_compositions_joint(self):
    # length 12, density 0.5, mean 2: 6 noise and 6 non-noise tokens, 3
    # spans each: 10 x 10 equally likely (noise, non-noise) compositions.
    n_noise, n_spans = _counts(12, 0.5, 2.0)
    self.assertEqual((n_noise, n_spans), (6, 3))
    masks = _masks(1, 20_000, 12, 0.5, 2.0)
    cells = {}
    for mask in masks:
      runs = tuple(n for _, n in _runs(mask))
      cells[runs] = cells.get(runs, 0) + 1
    self.assertLen(cells, 100)  # every pair of compositions occurs
    observed = np.array(list(cells.values()))
    self.assertGreater(_chi_square_p(observed, np.full(100, 0.01)), _P_MIN)

  @parameterized.parameters((568, 0.15, 3.0), (2000, 0.15, 3.0),
                            (300, 0.5, 1.5))
  def test_span_lengths_follow_uniform_composition(self, length, density,
                                                   mean):
    # One span per sequence (span index = sequence index mod n_spans, the
    # spans being exchangeable), so that the samples are independent.
    n_noise, n_spans = _counts(length, density, mean)
    masks = _masks(2, 4096, length, density, mean)
    noise_len, other_len = [], []
    for i, mask in enumerate(masks):
      runs = _runs(mask)
      j = i % n_spans
      other_len.append(runs[2 * j][1])
      noise_len.append(runs[2 * j + 1][1])
    for lengths, total in ((noise_len, n_noise),
                           (other_len, length - n_noise)):
      pmf = _composition_pmf(total, n_spans)
      observed = np.bincount(np.array(lengths) - 1, minlength=pmf.size)
      self.assertEqual(observed.size, pmf.size)
      self.assertGreater(_chi_square_p(observed, pmf), _P_MIN)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree_and_key_determines_output(self):
    fn = self.variant(lambda k: noise.random_spans_noise_mask(k, 50))
    key = jax.random.key(7)
    first, again = np.asarray(fn(key)), np.asarray(fn(key))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(
        first, np.asarray(jax.jit(
            lambda k: noise.random_spans_noise_mask(k, 50))(key)))
    others = [np.asarray(fn(jax.random.key(s))) for s in range(8, 16)]
    self.assertTrue(any((o != first).any() for o in others))

  def test_legacy_uint32_key_matches_typed_key(self):
    np.testing.assert_array_equal(
        noise.random_spans_noise_mask(jax.random.PRNGKey(3), 40),
        noise.random_spans_noise_mask(jax.random.key(3), 40))

  @parameterized.named_parameters(
      ('density_zero', dict(noise_density=0.0), ValueError, 'noise_density'),
      ('density_one', dict(noise_density=1.0), ValueError, 'noise_density'),
      ('density_nan', dict(noise_density=float('nan')), ValueError,
       'noise_density'),
      ('density_str', dict(noise_density='0.1'), TypeError, 'noise_density'),
      ('mean_below_one', dict(mean_noise_span_length=0.5), ValueError,
       'mean_noise_span_length'),
      ('length_one', dict(length=1), ValueError, 'length'),
      ('length_float', dict(length=10.0), TypeError, 'length'),
  )
  def test_bad_arguments(self, kwargs, error, name):
    kwargs = {'length': 20, **kwargs}
    with self.assertRaisesRegex(error, f'random_spans_noise_mask: {name}'):
      noise.random_spans_noise_mask(jax.random.key(0), **kwargs)


class SpanCorruptionTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_matches_t5_on_its_mask_and_decodes(self, length, density, mean):
    n_noise, n_spans = _counts(length, density, mean)
    num, sentinel_start = 16, 5000
    tokens = np.stack([np.random.default_rng(i).permutation(length) + 10
                       for i in range(num)]).astype(np.int32)
    inputs, targets = _corrupt_batch(
        3, tokens, noise_density=density, mean_noise_span_length=mean,
        sentinel_start=sentinel_start, eos_id=1)
    self.assertEqual((inputs.shape[1], targets.shape[1]),
                     noise.span_corruption_lengths(length, density, mean,
                                                   eos=True))
    masks = _masks(3, num, length, density, mean)  # the same keys
    for tok, inp, tgt, mask in zip(tokens, inputs, targets, masks):
      ref_in, ref_tgt = _t5_from_mask(tok, mask, sentinel_start, eos_id=1)
      np.testing.assert_array_equal(inp, ref_in)
      np.testing.assert_array_equal(tgt, ref_tgt)
      self.assertEqual(inp[-1], 1)
      self.assertEqual(tgt[-1], 1)
      np.testing.assert_array_equal(
          _decode(inp[:-1], tgt[:-1], sentinel_start - n_spans + 1), tok)

  def test_readme_example(self):
    # The README's example, and the output it shows.
    words = 'Thank you for inviting me to your party last week .'.split()
    vocab = sorted(set(words)) + ['<mask>', '<Y>', '<X>']
    tokens = jnp.array([vocab.index(w) for w in words], jnp.int32)
    decode = lambda ids: ' '.join(vocab[i] for i in ids)
    inputs, targets = noise.span_corruption(
        jax.random.key(0), tokens, noise_density=0.3,
        mean_noise_span_length=1.5, sentinel_start=len(vocab) - 1)
    # 11 words: round(3.3) = 3 noise tokens in round(2) = 2 spans.
    self.assertEqual((inputs.shape, targets.shape), ((10,), (5,)))
    self.assertEqual(decode(inputs),
                     'Thank you for inviting me to your <X> week <Y>')
    self.assertEqual(decode(targets), '<X> party last <Y> .')
    np.testing.assert_array_equal(
        _decode(np.asarray(inputs), np.asarray(targets), len(vocab) - 2),
        tokens)
    noised, n = noise.text_infilling(
        jax.random.key(1), tokens, mask_ratio=0.3,
        mask_id=vocab.index('<mask>'), pad_id=0)
    self.assertEqual(decode(noised[:n]),
                     'Thank you for inviting <mask> to your party <mask>')

  @parameterized.parameters(jnp.int32, jnp.uint16, jnp.int8)
  def test_keeps_dtype(self, dtype):
    tokens = jnp.arange(30, dtype=dtype)
    inputs, targets = noise.span_corruption(
        jax.random.key(0), tokens, sentinel_start=100, eos_id=1)
    self.assertEqual((inputs.dtype, targets.dtype), (dtype, dtype))

  def test_traced_ids_and_vmap_equals_loop(self):
    tokens = jnp.tile(jnp.arange(60, dtype=jnp.int32), (5, 1))
    keys = jax.random.split(jax.random.key(4), 5)

    @jax.jit
    def batched(keys, tokens, sentinel_start, eos_id):
      return jax.vmap(lambda k, t: noise.span_corruption(
          k, t, sentinel_start=sentinel_start, eos_id=eos_id))(keys, tokens)

    inputs, targets = batched(keys, tokens, jnp.int32(999), jnp.int32(1))
    for i in range(5):
      ref_in, ref_tgt = noise.span_corruption(keys[i], tokens[i],
                                              sentinel_start=999, eos_id=1)
      np.testing.assert_array_equal(inputs[i], ref_in)
      np.testing.assert_array_equal(targets[i], ref_tgt)
    self.assertEqual(batched._cache_size(), 1)

  def test_no_retrace(self):
    fn = jax.jit(jax.vmap(functools.partial(
        noise.span_corruption, sentinel_start=32099, eos_id=1)))
    for seed in range(4):
      keys = jax.random.split(jax.random.key(seed), 8)
      tokens = jax.random.randint(jax.random.key(seed + 100), (8, 568), 2,
                                  32000)
      jax.block_until_ready(fn(keys, tokens))
    self.assertEqual(fn._cache_size(), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    fn = self.variant(functools.partial(
        noise.span_corruption, noise_density=0.3, sentinel_start=500))
    tokens = jnp.arange(40, dtype=jnp.int32)
    key = jax.random.key(11)
    ref = jax.jit(functools.partial(
        noise.span_corruption, noise_density=0.3, sentinel_start=500))(
            key, tokens)
    for _ in range(2):  # same key, same output
      got = fn(key, tokens)
      chex.assert_trees_all_equal(got, ref)

  @parameterized.named_parameters(
      ('tokens_2d', dict(tokens=np.zeros((2, 10), np.int32)), ValueError,
       'tokens must be 1-D'),
      ('tokens_float', dict(tokens=np.zeros(10, np.float32)), TypeError,
       'tokens must have an integer dtype'),
      ('tokens_short', dict(tokens=np.zeros(1, np.int32)), ValueError,
       'tokens must have length >= 2'),
      ('density', dict(noise_density=1.5), ValueError, 'noise_density'),
      ('mean', dict(mean_noise_span_length=0.0), ValueError,
       'mean_noise_span_length'),
      ('sentinel_negative', dict(sentinel_start=2), ValueError,
       'sentinel_start must be >= 9'),
      ('sentinel_float', dict(sentinel_start=5.0), TypeError,
       'sentinel_start must be an integer'),
      ('sentinel_vector', dict(sentinel_start=np.array([5, 6])), ValueError,
       'sentinel_start must be a scalar'),
      ('eos_float', dict(eos_id=1.5), TypeError, 'eos_id must be an integer'),
  )
  def test_bad_arguments(self, kwargs, error, message):
    # 200 tokens: 30 noise tokens in 10 spans, sentinels start - 0..9.
    kwargs = {'tokens': np.arange(200, dtype=np.int32),
              'sentinel_start': 1000, **kwargs}
    with self.assertRaisesRegex(error, f'span_corruption: {message}'):
      noise.span_corruption(jax.random.key(0), **kwargs)

  def test_bad_lengths_helpers(self):
    with self.assertRaisesRegex(ValueError,
                                'span_corruption_lengths: length'):
      noise.span_corruption_lengths(1)
    with self.assertRaisesRegex(TypeError, 'span_corruption_lengths: eos'):
      noise.span_corruption_lengths(10, eos=1)
    with self.assertRaisesRegex(
        ValueError, 'span_corruption_tokens_length: noise_density'):
      noise.span_corruption_tokens_length(512, noise_density=0.0)
    with self.assertRaisesRegex(
        ValueError, 'span_corruption_tokens_length: inputs_length'):
      noise.span_corruption_tokens_length(2)


def _infill_batch(seed, tokens, **kwargs):
  keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
  fn = jax.jit(jax.vmap(functools.partial(noise.text_infilling, **kwargs)))
  noised, lengths = fn(keys, tokens)
  return np.asarray(noised), np.asarray(lengths)


def _infill_arange(seed, num, length, ratio, lam):
  """Text infilling of ``num`` copies of ``arange(length)``; masks -1, pads -2.

  The ids equal the positions, so the kept ones show what was removed.
  """
  tokens = np.tile(np.arange(length, dtype=np.int32), (num, 1))
  return _infill_batch(seed, tokens, mask_ratio=ratio, poisson_lambda=lam,
                       mask_id=-1, pad_id=-2)


def _infill_structure(noised, length, mask_id, num_tokens):
  """(kept token ids, masks per gap) of one output over tokens arange(L).

  ``gaps[g]`` is the number of masks before the g-th kept token (the last
  entry: after the last kept one); ``removed[g]`` the tokens removed there.
  """
  body = noised[:length]
  kept = body[body != mask_id]
  masks, count = [], 0
  for token in body:
    if token == mask_id:
      count += 1
    else:
      masks.append(count)
      count = 0
  masks.append(count)
  edges = np.concatenate([[-1], kept, [num_tokens]])
  removed = np.diff(edges) - 1
  return kept, np.array(masks), removed


def _numpy_infilling(rng, num_tokens, ratio, lam):
  """The documented law, sampled with NumPy: bool removed [L], n spans."""
  budget = min(math.ceil(ratio * num_tokens), num_tokens)
  lengths, total = [], 0
  while total < budget:
    x = int(rng.poisson(lam))
    if x == 0:
      continue
    lengths.append(min(x, budget - total))
    total += lengths[-1]
  n = len(lengths)
  is_mask = np.zeros(num_tokens - budget + n, bool)
  is_mask[rng.choice(is_mask.size, n, replace=False)] = True
  order = rng.permutation(n)
  removed, pos, span = np.zeros(num_tokens, bool), 0, 0
  for slot_is_mask in is_mask:
    if slot_is_mask:
      removed[pos:pos + lengths[order[span]]] = True
      pos += lengths[order[span]]
      span += 1
    else:
      pos += 1
  assert pos == num_tokens
  return removed, n


def _summaries(removed, n):
  """Per-sequence statistics: n, first removed index, its run's length."""
  first = int(np.argmax(removed))
  run = int(np.argmin(np.append(removed[first:], False)))
  return n, first, run


class TextInfillingTest(parameterized.TestCase):

  @parameterized.parameters((1, 0.3, 3.0), (2, 0.3, 3.0), (10, 0.3, 3.0),
                            (64, 0.3, 3.0), (64, 1.0, 3.0), (100, 0.15, 0.5),
                            (200, 0.5, 8.0), (513, 0.3, 3.0))
  def test_invariants(self, length, ratio, lam):
    mask_id, pad_id = -1, -2
    budget = math.ceil(ratio * length)
    noised, lengths = _infill_arange(0, 64, length, ratio, lam)
    self.assertEqual(noised.shape, (64, length))
    self.assertEqual(lengths.dtype, np.int32)
    for out, n in zip(noised, lengths):
      np.testing.assert_array_equal(out[n:], pad_id)
      kept, masks, removed = _infill_structure(out, n, mask_id, length)
      num_masks = int(masks.sum())
      self.assertEqual(kept.size, length - budget)
      self.assertTrue(np.all(np.diff(kept) > 0))  # order preserved
      self.assertEqual(n, length - budget + num_masks)
      self.assertGreaterEqual(num_masks, 1)
      # Each run of masks stands for at least as many removed tokens, and
      # no tokens vanish without a mask.
      self.assertTrue(np.all(removed >= masks))
      self.assertTrue(np.all((removed > 0) == (masks > 0)))
      self.assertEqual(removed.sum(), budget)

  def test_law_matches_numpy_simulation(self):
    # Observable statistics, one of each per sequence (independent
    # samples): number of masks, first removed index, the length of the
    # removed run there (adjacent spans merge in both samplers).
    length, ratio, lam, num = 64, 0.3, 3.0, 8192
    noised, lengths = _infill_arange(5, num, length, ratio, lam)
    ours = []
    for out, n in zip(noised, lengths):
      kept, masks, _ = _infill_structure(out, n, -1, length)
      removed = np.ones(length, bool)
      removed[kept] = False
      ours.append(_summaries(removed, int(masks.sum())))
    rng = np.random.default_rng(0)
    ref = [_summaries(*_numpy_infilling(rng, length, ratio, lam))
           for _ in range(num)]
    ours, ref = np.array(ours), np.array(ref)
    for column in range(3):
      self.assertGreater(_two_sample_p(ours[:, column], ref[:, column]),
                         _P_MIN, msg=f'statistic {column}')
    # The mean number of spans is R / E[X] to first order, E[X] for the
    # zero-truncated Poisson(3) = 3 / (1 - e^-3).
    expected = math.ceil(ratio * length) / (lam / -math.expm1(-lam))
    self.assertAlmostEqual(ours[:, 0].mean(), expected, delta=0.6)

  def test_isolated_span_lengths_are_truncated_poisson(self):
    # A mask between two kept tokens stands for one whole span; far from
    # the budget, its length is the zero-truncated Poisson draw. Long
    # sequences make trimmed spans rare: 1 span in ~190 per sequence.
    length, ratio, lam, num = 2000, 0.3, 3.0, 256
    noised, lengths = _infill_arange(6, num, length, ratio, lam)
    spans = []
    for i, (out, n) in enumerate(zip(noised, lengths)):
      _, masks, removed = _infill_structure(out, n, -1, length)
      single = np.flatnonzero(masks[1:-1] == 1) + 1
      spans.append(removed[single[i % single.size]])  # one per sequence
    spans = np.array(spans)
    x = np.arange(1, 12)
    pmf = stats.poisson.pmf(x, lam) / stats.poisson.sf(0, lam)
    pmf[-1] += stats.poisson.sf(x[-1], lam) / stats.poisson.sf(0, lam)
    observed = np.bincount(np.minimum(spans, x[-1]) - 1, minlength=x.size)
    self.assertGreater(_chi_square_p(observed, pmf), _P_MIN)

  def test_same_key_same_output_and_no_retrace(self):
    fn = jax.jit(jax.vmap(functools.partial(
        noise.text_infilling, mask_id=3, pad_id=0)))
    tokens = jnp.tile(jnp.arange(10, 138, dtype=jnp.int32), (4, 1))
    keys = jax.random.split(jax.random.key(0), 4)
    first = fn(keys, tokens)
    chex.assert_trees_all_equal(first, fn(keys, tokens))
    for seed in range(1, 4):
      fn(jax.random.split(jax.random.key(seed), 4), tokens + seed)
    self.assertEqual(fn._cache_size(), 1)
    loop = [noise.text_infilling(keys[i], tokens[i], mask_id=3, pad_id=0)
            for i in range(4)]
    chex.assert_trees_all_equal(first, jax.tree.map(
        lambda *x: jnp.stack(x), *loop))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    fn = self.variant(functools.partial(noise.text_infilling, mask_id=-1,
                                        pad_id=-2))
    tokens = jnp.arange(50, dtype=jnp.int32)
    key = jax.random.key(9)
    ref = jax.jit(functools.partial(noise.text_infilling, mask_id=-1,
                                    pad_id=-2))(key, tokens)
    chex.assert_trees_all_equal(fn(key, tokens), ref)

  def test_traced_ids(self):
    fn = jax.jit(lambda k, t, m, p: noise.text_infilling(
        k, t, mask_id=m, pad_id=p))
    tokens = jnp.arange(5, 45, dtype=jnp.int32)
    key = jax.random.key(1)
    chex.assert_trees_all_equal(
        fn(key, tokens, jnp.int32(1), jnp.int32(0)),
        noise.text_infilling(key, tokens, mask_id=1, pad_id=0))

  @parameterized.named_parameters(
      ('ratio_zero', dict(mask_ratio=0.0), ValueError, 'mask_ratio'),
      ('ratio_big', dict(mask_ratio=1.5), ValueError, 'mask_ratio'),
      ('lambda_zero', dict(poisson_lambda=0.0), ValueError, 'poisson_lambda'),
      ('lambda_inf', dict(poisson_lambda=float('inf')), ValueError,
       'poisson_lambda'),
      ('tokens_2d', dict(tokens=np.zeros((2, 3), np.int32)), ValueError,
       'tokens must be 1-D'),
      ('tokens_empty', dict(tokens=np.zeros((0,), np.int32)), ValueError,
       'tokens must have length >= 1'),
      ('mask_float', dict(mask_id=0.5), TypeError, 'mask_id'),
      ('pad_vector', dict(pad_id=np.zeros(2, np.int32)), ValueError,
       'pad_id must be a scalar'),
  )
  def test_bad_arguments(self, kwargs, error, message):
    kwargs = {'tokens': np.arange(20, dtype=np.int32), 'mask_id': 1,
              'pad_id': 0, **kwargs}
    with self.assertRaisesRegex(error, f'text_infilling: {message}'):
      noise.text_infilling(jax.random.key(0), **kwargs)


if __name__ == '__main__':
  absltest.main()
