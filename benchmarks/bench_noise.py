"""Cost of :mod:`metacf.noise`: T5 span corruption vs a NumPy loop; infilling.

Part 1 (always): a batch of ``B = 256`` sequences of ``L = 568`` tokens (T5's
``random_spans_helper(512)`` raw length: inputs 512 and targets 114 with
EOS), ``noise_density = 0.15``, ``mean_noise_span_length = 3``:

* ``metacf_span_corruption``: ``jax.jit(jax.vmap(span_corruption))`` over
  ``B`` keys (split inside the jitted call from one key, a new key per
  call), tokens already a device array;
* ``metacf_span_corruption_numpy_io``: the same, fed a NumPy array and
  returning NumPy arrays (host -> device -> host, as a NumPy data pipeline
  would see it);
* ``numpy_hf_loop``: the algorithm of HF ``run_t5_mlm_flax.py``
  (``FlaxDataCollatorForT5MLM``), re-written here from its description:
  per example, ``random_spans_noise_mask`` with a shuffle of
  ``[1] * (m - 1) + [0] * (n - m)`` for each segmentation, cumsum and
  segment lengths, interleave, span-start indicator, cumsum parity; then,
  on the batch, ``create_sentinel_ids`` and ``filter_input_ids`` for inputs
  and labels (NumPy, a ``np.random.Generator``);
* ``metacf_text_infilling``: ``jax.jit(jax.vmap(text_infilling))`` on the
  same batch (``mask_ratio = 0.3``, ``poisson_lambda = 3``), no peer;
* ``metacf_token_masking``: ``jax.jit(jax.vmap(token_masking))``, BERT's
  setting (``mask_ratio = 0.15``, 80/10/10: ``random_token_ratio = 0.1``,
  ``keep_ratio = 0.1``);
* ``numpy_hf_bert``: HF's ``DataCollatorForLanguageModeling``
  (``numpy_mask_tokens``) re-written from its description, on the batch:
  Bernoulli(0.15) positions, of which Bernoulli(0.8) become the mask token
  and half the rest random tokens (NumPy, a ``np.random.Generator``). Its
  number of masked tokens varies per sequence; metacf's is fixed.

All are checked first: every example's inputs and targets decode back to
its tokens (an independent NumPy decoder), with the static T5 shapes.
Variants are timed interleaved (A B C D A B ...; ``_timing.interleaved``,
``block`` calls per turn, all but the first timed), after AOT compilation
(timed apart) and warm-up.

Part 2 (``--profile``): the sub-steps of ``span_corruption`` and the
alternatives tried for them, same batch, interleaved in one group:

* ``rng_bits``: only the PRNG words one call needs (``2 (m - 1)``);
* ``uniform_below``: those words as exactly uniform integers (Lemire);
* ``randint``: ``jax.random.randint`` for the same bounds (biased modulus);
* ``boundaries``: the two uniform compositions (Floyd's algorithm,
  vectorised, and ordering by counting): ``_spans._boundaries``;
* ``boundaries_jnp_sort``: the same with ``jnp.sort`` for the ordering;
* ``boundaries_long_row_path``: Floyd with the code path of long rows
  (scatter-min duplicate test, pointer jumping by gathers in a loop);
* ``cuts_permutation``: the cut points from ``jax.random.permutation`` of
  the 0/1 gap vector (T5's ``stateless_shuffle``) + ``jnp.nonzero``;
* ``cuts_sort_keys``: the first ``m - 1`` of an argsort of random words;
* ``cuts_top_k``: ``lax.top_k`` of random floats, then sorted;
* ``outputs_compare`` / ``outputs_scatter``: inputs and targets from given
  span boundaries, by a ``[positions, spans]`` compare-and-sum or by a
  scatter of the spans + cumsum (``_sampling.count_and_sum``'s two paths);
* ``gather``: one gather of ``L`` token indices, alone;
* ``naive_jax``: a straightforward JAX port (permutation segmentation,
  cumsums, scatter compaction of the sentinel-filled sequence);
* ``span_corruption``: the full kernel.

  python -m benchmarks.bench_noise [--batch 256] [--length 568]
      [--rounds 40] [--block 3] [--profile] [--no-save]
"""

import argparse
import functools
import os
import statistics
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing
from metacf import noise
from metacf.noise import _sampling
from metacf.noise import _spans

VOCAB = 32100  # T5's vocabulary size; sentinels count down from VOCAB - 1
EOS_ID = 1


# ------------------------------------------------- NumPy peer (HF's recipe)


def np_random_spans_noise_mask(length: int, noise_density: float,
                               mean_noise_span_length: float,
                               rng: np.random.Generator) -> np.ndarray:
  """One example's T5 mask, the HF collator's way (shuffle + cumsum)."""
  num_noise = int(np.round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
  num_nonnoise = length - num_noise

  def segment_lengths(num_items, num_segments):
    first = (np.arange(num_items - 1) < num_segments - 1).astype(np.int64)
    rng.shuffle(first)
    segment_id = np.cumsum(np.concatenate([[0], first]))
    return np.bincount(segment_id, minlength=num_segments)

  noise_lengths = segment_lengths(num_noise, num_spans)
  nonnoise_lengths = segment_lengths(num_nonnoise, num_spans)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], 1).reshape(-1)
  starts = np.cumsum(interleaved)[:-1]
  indicator = np.zeros(length, np.int8)
  indicator[starts] = 1
  return np.cumsum(indicator) % 2 == 1


def np_create_sentinel_ids(mask: np.ndarray) -> np.ndarray:
  """Sentinel at each span start, -1 on the rest of the span, 0 elsewhere."""
  start = mask - np.roll(mask, 1, axis=-1) * mask
  start[:, 0] = mask[:, 0]
  ids = np.where(start != 0, np.cumsum(start, axis=-1), start)
  ids = np.where(ids != 0, VOCAB - ids, 0)
  return ids - (mask - start)


def np_filter_input_ids(input_ids: np.ndarray,
                        sentinel_ids: np.ndarray) -> np.ndarray:
  full = np.where(sentinel_ids != 0, sentinel_ids, input_ids)
  out = full[full >= 0].reshape((input_ids.shape[0], -1))
  eos = np.full((input_ids.shape[0], 1), EOS_ID, out.dtype)
  return np.concatenate([out, eos], axis=-1)


def numpy_span_corruption(input_ids: np.ndarray, rng: np.random.Generator,
                          noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0):
  batch, length = input_ids.shape
  mask = np.asarray([
      np_random_spans_noise_mask(length, noise_density,
                                 mean_noise_span_length, rng)
      for _ in range(batch)])
  inputs = np_filter_input_ids(
      input_ids, np_create_sentinel_ids(mask.astype(np.int8)))
  labels = np_filter_input_ids(
      input_ids, np_create_sentinel_ids((~mask).astype(np.int8)))
  return inputs, labels


# ------------------------------------------------------------- checking


def decode(inputs: np.ndarray, targets: np.ndarray, first_sentinel: int,
           eos_id: int) -> np.ndarray:
  """Rebuilds one sequence from T5 (inputs, targets), independently."""
  assert inputs[-1] == eos_id and targets[-1] == eos_id
  inputs, targets = list(inputs[:-1]), list(targets[:-1])
  is_sentinel = lambda t: first_sentinel - 1000 < t <= first_sentinel
  spans, current = {}, None
  for t in targets:
    if is_sentinel(t):
      current = first_sentinel - t
      spans[current] = []
    else:
      spans[current].append(t)
  out, expected = [], 0
  for t in inputs:
    if is_sentinel(t):
      assert first_sentinel - t == expected, 'sentinels out of order'
      out.extend(spans[expected])
      expected += 1
    else:
      out.append(t)
  assert expected == len(spans)
  return np.asarray(out)


def check_t5(tokens, inputs, targets, name):
  tokens, inputs, targets = map(np.asarray, (tokens, inputs, targets))
  want = noise.span_corruption_lengths(tokens.shape[1], eos=True)
  assert (inputs.shape[1], targets.shape[1]) == want, (name, inputs.shape)
  for row in range(tokens.shape[0]):
    np.testing.assert_array_equal(
        decode(inputs[row], targets[row], VOCAB - 1, EOS_ID), tokens[row],
        err_msg=name)


def check_infilling(tokens, noised, lengths, ratio):
  tokens, noised, lengths = map(np.asarray, (tokens, noised, lengths))
  budget = int(np.ceil(ratio * tokens.shape[1]))
  for row in range(tokens.shape[0]):
    seq = noised[row, :lengths[row]]
    assert np.all(noised[row, lengths[row]:] == 0)
    kept = seq[seq != 1]
    assert kept.size == tokens.shape[1] - budget


# --------------------------------------------------- profile alternatives


def _naive_span_corruption(key, tokens, n_noise, n_spans):
  """A straightforward JAX port: permutation segmentation, scatters."""
  length = tokens.shape[0]
  n_nonnoise = length - n_noise
  key_a, key_b = jax.random.split(key)

  def segment_lengths(k, num_items):
    first = jax.random.permutation(
        k, (jnp.arange(num_items - 1) < n_spans - 1).astype(jnp.int32))
    segment_id = jnp.cumsum(jnp.concatenate([jnp.zeros(1, jnp.int32),
                                             first]))
    return jax.ops.segment_sum(jnp.ones(num_items, jnp.int32), segment_id,
                               num_segments=n_spans)

  interleaved = jnp.stack([segment_lengths(key_b, n_nonnoise),
                           segment_lengths(key_a, n_noise)], 1).reshape(-1)
  starts = jnp.cumsum(interleaved)[:-1]
  indicator = jnp.zeros(length, jnp.int32).at[starts].add(1)
  mask = jnp.cumsum(indicator) % 2 == 1

  def to_sentinels(m, size):
    previous = jnp.concatenate([jnp.zeros(1, jnp.bool_), m[:-1]])
    first = m & ~previous
    sentinel = (VOCAB - 1) - (jnp.cumsum(first.astype(jnp.int32)) - 1)
    values = jnp.where(first, sentinel, tokens)
    keep = ~(m & previous)
    where = jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32)) - 1, size)
    return jnp.zeros(size, tokens.dtype).at[where].set(values, mode='drop')

  return (to_sentinels(mask, n_nonnoise + n_spans),
          to_sentinels(~mask, n_noise + n_spans))


def _cuts_to_boundaries(cuts_a, cuts_b, n_noise, n_nonnoise):
  zero = jnp.zeros((1,), jnp.int32)
  a = jnp.concatenate([zero, cuts_a + 1, jnp.full((1,), n_noise, jnp.int32)])
  b = jnp.concatenate([zero, cuts_b + 1,
                       jnp.full((1,), n_nonnoise, jnp.int32)])
  return a, b


def _profile_variants(keys, tokens, n_noise, n_spans):
  """name -> (function of (keys [B], tokens [B, L]), batched over keys)."""
  length = tokens.shape[1]
  n_nonnoise = length - n_noise
  k = n_spans - 1
  base_a, base_b = n_noise - 1 - k, n_nonnoise - 1 - k
  bounds = np.concatenate([_sampling.floyd_bounds(base_a, k),
                           _sampling.floyd_bounds(base_b, k)])

  def floyd_pair(key, order):
    draws = _sampling.uniform_below(key, bounds)
    return (order(_sampling.floyd_subset(draws[:k], base_a)),
            order(_sampling.floyd_subset(draws[k:], base_b)))

  def permutation_cuts(key):
    out = []
    for sub, n in zip(jax.random.split(key), (n_noise, n_nonnoise)):
      gaps = jax.random.permutation(sub, jnp.arange(n - 1) < k)
      out.append(jnp.nonzero(gaps, size=k)[0].astype(jnp.int32))
    return _cuts_to_boundaries(*out, n_noise, n_nonnoise)

  def sort_key_cuts(key):
    out = []
    for sub, n in zip(jax.random.split(key), (n_noise, n_nonnoise)):
      words = jax.random.bits(sub, (n - 1,), jnp.uint32)
      out.append(jnp.sort(jnp.argsort(words)[:k]).astype(jnp.int32))
    return _cuts_to_boundaries(*out, n_noise, n_nonnoise)

  def top_k_cuts(key):
    out = []
    for sub, n in zip(jax.random.split(key), (n_noise, n_nonnoise)):
      _, idx = lax.top_k(jax.random.uniform(sub, (n - 1,)), k)
      out.append(jnp.sort(idx).astype(jnp.int32))
    return _cuts_to_boundaries(*out, n_noise, n_nonnoise)

  def per_key(fn):
    return lambda keys, toks: jax.vmap(fn)(keys)

  def full(key, tok):
    return noise.span_corruption(key, tok, sentinel_start=VOCAB - 1,
                                 eos_id=EOS_ID)

  # Given boundaries (fixed: constants of the compiled outputs variants).
  fixed_a, fixed_b = jax.jit(jax.vmap(lambda key: _spans._boundaries(
      key, n_noise, n_nonnoise, n_spans)))(keys)

  def outputs(keys, toks):
    del keys
    return jax.vmap(lambda tok, a, b: _spans._corrupt(
        tok, a, b, n_noise, n_nonnoise, VOCAB - 1, EOS_ID))(
            toks, fixed_a, fixed_b)

  gather_idx = jax.random.randint(jax.random.key(7), tokens.shape, 0, length)
  return {
      'rng_bits': per_key(lambda key: jax.random.bits(key, (2 * k,))),
      'uniform_below': per_key(lambda key: _sampling.uniform_below(
          key, bounds)),
      'randint': per_key(lambda key: jax.random.randint(
          key, (2 * k,), 0, bounds.astype(np.int32))),
      'boundaries': per_key(lambda key: _spans._boundaries(
          key, n_noise, n_nonnoise, n_spans)),
      'boundaries_jnp_sort': per_key(lambda key: floyd_pair(key, jnp.sort)),
      'boundaries_long_row_path': ('long_rows', per_key(
          lambda key: floyd_pair(key, jnp.sort))),
      'cuts_permutation': per_key(permutation_cuts),
      'cuts_sort_keys': per_key(sort_key_cuts),
      'cuts_top_k': per_key(top_k_cuts),
      'outputs_compare': ('compare', outputs),
      'outputs_scatter': ('scatter', outputs),
      'gather': lambda keys, toks: jnp.take_along_axis(toks, gather_idx, 1),
      'naive_jax': jax.vmap(lambda key, tok: _naive_span_corruption(
          key, tok, n_noise, n_spans)),
      'span_corruption': jax.vmap(full),
  }


def _compile_with(mode, fn, *args):
  """AOT-compiles ``jax.jit(fn)`` with ``_sampling``'s code paths forced."""
  saved = _sampling.COMPARE_MAX, _sampling._ONE_HOT_MAX
  try:
    if mode == 'compare':
      _sampling.COMPARE_MAX = 10**9
    elif mode == 'scatter':
      _sampling.COMPARE_MAX = 0
    elif mode == 'long_rows':
      _sampling._ONE_HOT_MAX = 0
    return _timing.compile_timed(jax.jit(fn), *args)
  finally:
    _sampling.COMPARE_MAX, _sampling._ONE_HOT_MAX = saved


# ----------------------------------------------------------------- main


def numpy_bert_masking(input_ids: np.ndarray, rng: np.random.Generator, *,
                       mask_id: int, vocab_size: int,
                       probability: float = 0.15
                       ) -> tuple[np.ndarray, np.ndarray]:
  """HF ``numpy_mask_tokens`` on a batch: ``(inputs, targets_mask)``."""
  inputs = input_ids.copy()
  masked = rng.binomial(1, probability, size=inputs.shape).astype(bool)
  replaced = rng.binomial(1, 0.8, size=inputs.shape).astype(bool) & masked
  inputs[replaced] = mask_id
  random = (rng.binomial(1, 0.5, size=inputs.shape).astype(bool) & masked
            & ~replaced)
  inputs[random] = rng.integers(0, vocab_size, size=int(random.sum()),
                                dtype=inputs.dtype)
  return inputs, masked


def check_masking(tokens, inputs, targets_mask, ratio):
  """Exact count per row; unchosen tokens unchanged."""
  inputs, targets_mask = np.asarray(inputs), np.asarray(targets_mask)
  n = noise.token_masking_count(tokens.shape[1], ratio)
  if not (targets_mask.sum(axis=1) == n).all():
    raise AssertionError('token_masking: wrong number of masked positions')
  if not (inputs[~targets_mask] == tokens[~targets_mask]).all():
    raise AssertionError('token_masking: an unchosen token changed')


def _stats(times, reference=None):
  stats = {name: {**_timing.summary_ms(t), 'samples': len(t)}
           for name, t in times.items()}
  if reference is not None:
    ref = stats[reference]['median_ms']
    for name in stats:
      stats[name]['speedup_vs_' + reference] = ref / stats[name]['median_ms']
      stats[name]['median_of_speedups'] = statistics.median(
          r / t for r, t in zip(times[reference], times[name]))
  return stats


def run_main(args) -> list[dict]:
  batch, length = args.batch, args.length
  rng = np.random.default_rng(0)
  tokens_np = rng.integers(5, VOCAB - 1000, (batch, length), dtype=np.int32)
  tokens = jnp.asarray(tokens_np)
  n_keys = 64
  keys = list(jax.random.split(jax.random.key(0), n_keys))

  def corrupt(key, toks):
    return jax.vmap(lambda k, x: noise.span_corruption(
        k, x, sentinel_start=VOCAB - 1, eos_id=EOS_ID))(
            jax.random.split(key, toks.shape[0]), toks)

  def infill(key, toks):
    return jax.vmap(lambda k, x: noise.text_infilling(
        k, x, mask_id=1, pad_id=0))(jax.random.split(key, toks.shape[0]),
                                    toks)

  def bert(key, toks):
    return jax.vmap(lambda k, x: noise.token_masking(
        k, x, mask_ratio=0.15, mask_id=2, random_token_ratio=0.1,
        keep_ratio=0.1, vocab_size=VOCAB))(
            jax.random.split(key, toks.shape[0]), toks)

  corrupt_exe, corrupt_c = _timing.compile_timed(jax.jit(corrupt), keys[0],
                                                 tokens)
  bert_exe, bert_c = _timing.compile_timed(jax.jit(bert), keys[0], tokens)
  infill_exe, infill_c = _timing.compile_timed(jax.jit(infill), keys[0],
                                               tokens)
  counter = {'i': 0}

  def next_key():
    counter['i'] += 1
    return keys[counter['i'] % n_keys]

  check_t5(tokens_np, *corrupt_exe(keys[1], tokens), 'metacf')
  check_t5(tokens_np, *numpy_span_corruption(tokens_np, rng), 'numpy')
  check_infilling(tokens_np, *infill_exe(keys[2], tokens), 0.3)
  check_masking(tokens_np, *bert_exe(keys[3], tokens), 0.15)
  print('  checked: every example decodes back to its tokens; token '
        'masking masks exactly round(0.15 L) tokens', flush=True)

  variants = {
      'metacf_span_corruption': lambda: corrupt_exe(next_key(), tokens),
      'metacf_span_corruption_numpy_io': lambda: tuple(
          np.asarray(x) for x in corrupt_exe(next_key(), tokens_np)),
      'numpy_hf_loop': lambda: numpy_span_corruption(tokens_np, rng),
      'metacf_text_infilling': lambda: infill_exe(next_key(), tokens),
      'metacf_token_masking': lambda: bert_exe(next_key(), tokens),
      'numpy_hf_bert': lambda: numpy_bert_masking(
          tokens_np, rng, mask_id=2, vocab_size=VOCAB),
  }
  compile_s = {'metacf_span_corruption': corrupt_c,
               'metacf_span_corruption_numpy_io': corrupt_c,
               'numpy_hf_loop': None, 'metacf_text_infilling': infill_c,
               'metacf_token_masking': bert_c, 'numpy_hf_bert': None}
  times = _timing.interleaved(variants, rounds=args.rounds, warmup=2,
                              block=args.block)
  stats = _stats(times, 'numpy_hf_loop')
  bert_ratio = (stats['numpy_hf_bert']['median_ms']
                / stats['metacf_token_masking']['median_ms'])
  stats['metacf_token_masking']['speedup_vs_numpy_hf_bert'] = bert_ratio
  in_len, tg_len = noise.span_corruption_lengths(length, eos=True)
  records = []
  for name, st in stats.items():
    records.append({'part': 'main', 'variant': name, 'batch': batch,
                    'length': length, 'inputs_length': in_len,
                    'targets_length': tg_len, 'rounds': args.rounds,
                    'block': args.block, **st,
                    'compile_s': compile_s[name]})
    print(f"  {name:34s} {st['median_ms']:8.2f} ms [{st['min_ms']:.2f}, "
          f"{st['max_ms']:.2f}]  speedup vs numpy "
          f"{st['speedup_vs_numpy_hf_loop']:5.2f} (median of ratios "
          f"{st['median_of_speedups']:5.2f})  compile "
          + (f'{compile_s[name]:.2f} s' if compile_s[name] else '-'),
          flush=True)
  print(f'  token masking vs the NumPy BERT collator: {bert_ratio:.2f}x',
        flush=True)
  return records


def run_profile(args) -> list[dict]:
  batch, length = args.batch, args.length
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(5, VOCAB - 1000, (batch, length),
                                    dtype=np.int32))
  n_noise, n_spans = _spans._span_counts('bench', length, 0.15, 3.0)
  keys = jax.random.split(jax.random.key(3), batch)
  variants, compile_s = {}, {}
  for name, spec in _profile_variants(keys, tokens, n_noise,
                                               n_spans).items():
    mode, fn = spec if isinstance(spec, tuple) else (None, spec)
    exe, compile_s[name] = _compile_with(mode, fn, keys, tokens)
    variants[name] = functools.partial(exe, keys, tokens)
  reference = jax.block_until_ready(variants['span_corruption']())
  naive = jax.block_until_ready(variants['naive_jax']())
  check_t5(tokens, *reference, 'span_corruption (profile)')
  assert naive[0].shape[1] + 1 == reference[0].shape[1]
  a = jax.block_until_ready(variants['outputs_compare']())
  b = jax.block_until_ready(variants['outputs_scatter']())
  assert all(bool(jnp.all(x == y)) for x, y in zip(a, b))
  times = _timing.interleaved(variants, rounds=args.rounds, warmup=2,
                              block=args.block)
  stats = _stats(times, 'span_corruption')
  records = []
  for name, st in stats.items():
    records.append({'part': 'profile', 'variant': name, 'batch': batch,
                    'length': length, 'n_noise': n_noise,
                    'n_spans': n_spans, 'rounds': args.rounds,
                    'block': args.block, **st,
                    'compile_s': compile_s[name]})
    print(f"  {name:28s} {st['median_ms']:8.3f} ms [{st['min_ms']:.3f}, "
          f"{st['max_ms']:.3f}]  compile {compile_s[name]:.2f} s", flush=True)
  return records


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--length', type=int, default=568)
  parser.add_argument('--rounds', type=int, default=40)
  parser.add_argument('--block', type=int, default=3,
                      help='calls per turn, all but the first timed')
  parser.add_argument('--profile', action='store_true',
                      help='also time the sub-steps and the alternatives')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  start = time.perf_counter()
  load = os.getloadavg()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}, '
        f'numpy {np.__version__}; load average {load[0]:.2f} (1 min)',
        flush=True)
  print(f'span corruption / text infilling, batch {args.batch} x '
        f'{args.length} tokens:', flush=True)
  records = run_main(args)
  if args.profile:
    print('profile of span_corruption (same batch):', flush=True)
    records += run_profile(args)
  load_end = os.getloadavg()
  for rec in records:
    rec.update({'load_start': load[0], 'load_end': load_end[0],
                'host_cores': os.cpu_count(), 'numpy': np.__version__})
  print(f'wall {time.perf_counter() - start:.0f} s; load average '
        f'{load_end[0]:.2f} at the end')
  if not args.no_save:
    print('appended to', _timing.write_jsonl('noise', records))


if __name__ == '__main__':
  main()
