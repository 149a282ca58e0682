"""Replay-buffer ``add`` + ``sample`` step time vs capacity, vs a Python loop.

One step offers a batch of MNIST-sized items (uint8 ``[28, 28, 1]`` image +
int32 label) to a full buffer and draws a batch of the same size:

* ``metacf_reservoir``: ``replay_buffer``'s ``add`` then ``sample`` in one
  ``jax.jit`` with the state donated (updated in place);
* ``metacf_balanced``: the same with ``class_balanced_buffer`` (10 classes);
* ``numpy_loop``: the straightforward per-sample reservoir of Mammoth
  (``mammoth/utils/buffer.py``: a Python ``for`` over the batch, one random
  draw per sample, in-place row assignment into preallocated arrays), in NumPy
  since torch is not installed here. It draws with a ``np.random.Generator``
  rather than the global ``np.random``, and samples with replacement like
  metacf (Mammoth's ``np.random.choice(..., replace=False)`` permutes the
  whole population, O(capacity) per step).

Buffers start full (the steady state, where every item goes through the
reservoir draw): the reservoir's ``num_seen`` is set to its capacity (its rows
are zeros; the step's work does not depend on their content), and the
class-balanced state is the one a stream of ``capacity`` items with labels
``i % num_classes`` leaves behind. All variants and capacities are timed
interleaved in one loop (A B C A B C ...), after AOT compilation (timed
apart) and warm-up.

The capacity ratio (largest vs smallest capacity, same variant) is reported
three ways, since a median ratio alone has been seen anywhere from 1.01 to
1.30 for the same code: the ratio of the two medians; the per-round ratio
(round ``i`` of one capacity over round ``i`` of the other, both timed in the
same round of the interleaved loop) as median [min, max]; and, with
``--repeats N``, the whole interleaved measurement run N times in one
process, each run's ratio of medians listed with their min and max. Each
record also carries the load average before and after and the process's
minor page faults per timed call (all variants together).

With ``--block 1`` (default) a call runs right after the other variants, on
the caches they left; ``--block 2`` times the second of two back-to-back
calls of a variant, its steady state. The smallest capacity's step is mostly
fixed cost (dispatch, the random bits, the sort), which the other variants' calls
inflate 2-4x (0.15-0.19 ms back to back, 0.39-0.66 ms interleaved, 10^3
reservoir, 2026-12-07) while the largest capacity's extra cost (cache and TLB
misses on the random rows) stays: so the cold ratio is lower than the warm
one, and both move with the machine's load (see benchmarks/README.md).
``--no-balanced --no-loop`` times the reservoir buffer alone (1e3, 1e6
back to back), the least favourable ratio.

  python -m benchmarks.bench_replay [--capacities 1000 100000 1000000
                                     --batch 128 --rounds 100 --repeats 1
                                     --block 1]
"""

import argparse
import functools
import os
import resource
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing
from metacf import replay

_IMAGE = (28, 28, 1)


def _example():
  return {'image': jnp.zeros(_IMAGE, jnp.uint8),
          'label': jnp.zeros([], jnp.int32)}


def _batch(batch, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (batch,) + _IMAGE, dtype=np.uint8),
          'label': rng.integers(0, num_classes, batch, dtype=np.int32)}


def _full_balanced_state(buffer, capacity: int, num_classes: int):
  """The state after a stream of ``capacity`` items labelled ``i % N``.

  While the buffer fills every item is stored, so class ``c`` holds the
  items with ``i % N == c``; here item ``i`` sits in slot ``i``.
  """
  state = buffer.init(_example())
  labels = np.arange(capacity, dtype=np.int32) % num_classes
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  return state._replace(
      labels=jnp.asarray(labels),
      slot_order=jnp.asarray(np.argsort(labels, kind='stable')
                             .astype(np.int32)),
      class_end=jnp.asarray(np.cumsum(counts, dtype=np.int32)),
      class_seen=jnp.asarray(counts),
      num_seen=jnp.asarray(capacity, jnp.int32))


class NumpyLoopReservoir:
  """Mammoth-style reservoir: per-sample Python loop, in-place numpy rows."""

  def __init__(self, capacity: int, seed: int = 0):
    self.capacity = capacity
    self.images = np.zeros((capacity,) + _IMAGE, np.uint8)
    self.labels = np.zeros([capacity], np.int32)
    self.num_seen = capacity  # full, like the metacf buffers
    self.rng = np.random.default_rng(seed)

  def _reservoir(self) -> int:
    if self.num_seen < self.capacity:
      return self.num_seen
    rand = int(self.rng.integers(0, self.num_seen + 1))
    return rand if rand < self.capacity else -1

  def add(self, images: np.ndarray, labels: np.ndarray) -> None:
    for i in range(images.shape[0]):
      index = self._reservoir()
      self.num_seen += 1
      if index >= 0:
        self.images[index] = images[i]
        self.labels[index] = labels[i]

  def sample(self, size: int) -> tuple[np.ndarray, np.ndarray]:
    index = self.rng.integers(0, min(self.num_seen, self.capacity), size)
    return self.images[index], self.labels[index]


def _jax_variant(buffer, state, batch, batch_size, balanced):
  """A zero-argument step closure over a donated state, and compile seconds."""

  @functools.partial(jax.jit, donate_argnums=1)
  def step(key, state, batch):
    key, key_add, key_sample = jax.random.split(key, 3)
    if balanced:
      state = buffer.add(key_add, state, batch, batch['label'])
    else:
      state = buffer.add(key_add, state, batch)
    replayed, valid = buffer.sample(key_sample, state, batch_size)
    return key, state, replayed, valid

  key = jax.random.key(0)
  batch = jax.device_put(batch)
  compiled, compile_s = _timing.compile_timed(step, key, state, batch)
  holder = {'key': key, 'state': state}

  def run():
    holder['key'], holder['state'], replayed, valid = compiled(
        holder['key'], holder['state'], batch)
    return holder['state'], replayed, valid

  old = holder['state']
  jax.block_until_ready(run())
  assert jax.tree.leaves(old)[0].is_deleted(), 'state was not donated'
  return run, compile_s


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _spread(values) -> dict[str, float]:
  return {'median': statistics.median(values), 'min': min(values),
          'max': max(values)}


def run(capacities: list[int], batch_size: int, num_classes: int, rounds: int,
        balanced: bool, *, repeats: int = 1, block: int = 1,
        loop: bool = True) -> list[dict]:
  batch = _batch(batch_size, num_classes)
  variants, compile_s, meta = {}, {}, {}
  for capacity in capacities:
    res = replay.replay_buffer(capacity)
    state = res.init(_example())._replace(
        num_seen=jnp.asarray(capacity, jnp.int32))
    name = f'metacf_reservoir@{capacity}'
    variants[name], compile_s[name] = _jax_variant(res, state, batch,
                                                   batch_size, False)
    meta[name] = ('metacf_reservoir', capacity)
    if balanced:
      cb = replay.class_balanced_buffer(capacity, num_classes)
      name = f'metacf_balanced@{capacity}'
      variants[name], compile_s[name] = _jax_variant(
          cb, _full_balanced_state(cb, capacity, num_classes), batch,
          batch_size, True)
      meta[name] = ('metacf_balanced', capacity)
    if not loop:
      continue
    name = f'numpy_loop@{capacity}'

    def loop_step(reservoir=NumpyLoopReservoir(capacity)):
      reservoir.add(batch['image'], batch['label'])
      return reservoir.sample(batch_size)

    variants[name] = loop_step
    meta[name] = ('numpy_loop', capacity)

  smallest = min(capacities)
  load_before = os.getloadavg()
  samples = {name: [] for name in variants}  # all runs pooled
  round_ratios = {name: [] for name in variants}
  runs = {name: [] for name in variants}
  for _ in range(repeats):
    faults = _minor_faults()
    times = _timing.interleaved(variants, rounds=rounds, block=block)
    faults = _minor_faults() - faults
    num_calls = sum(len(t) for t in times.values())
    for name, (variant, _) in meta.items():
      base = times[f'{variant}@{smallest}']
      ratios = [t / b for t, b in zip(times[name], base)]
      samples[name] += times[name]
      round_ratios[name] += ratios
      runs[name].append({
          'median_ms': 1e3 * statistics.median(times[name]),
          'ratio_of_medians': (statistics.median(times[name]) /
                               statistics.median(base)),
          'round_ratio': _spread(ratios),
          'minor_faults_per_call': faults / num_calls,
          'load1': os.getloadavg()[0]})
  load_after = os.getloadavg()
  stats = {n: _timing.summary_ms(t) for n, t in samples.items()}
  records = []
  for name, (variant, capacity) in meta.items():
    base = stats[f'{variant}@{smallest}']['median_ms']
    run_ratios = [r['ratio_of_medians'] for r in runs[name]]
    rec = {'variant': variant, 'capacity': capacity, 'batch': batch_size,
           'item': 'uint8[28,28,1]+int32', 'rounds': rounds,
           'repeats': repeats, 'block': block, **stats[name],
           'compile_s': compile_s.get(name),
           f'ratio_median_vs_{smallest}': stats[name]['median_ms'] / base,
           f'round_ratio_vs_{smallest}': _spread(round_ratios[name]),
           f'run_ratio_vs_{smallest}': {**_spread(run_ratios),
                                         'runs': run_ratios},
           'runs': runs[name],
           'load_before': list(load_before), 'load_after': list(load_after)}
    if loop and variant != 'numpy_loop':
      rec['speedup_vs_numpy_loop'] = (
          stats[f'numpy_loop@{capacity}']['median_ms'] /
          stats[name]['median_ms'])
    if variant == 'metacf_balanced':
      rec['num_classes'] = num_classes
    records.append(rec)
  return records


def _print_table(records: list[dict], smallest: int) -> None:
  print(f"{'variant':18s} {'capacity':>9s} {'median ms [min, max]':>26s} "
        f"{'compile s':>9s} {'vs ' + str(smallest):>6s} "
        f"{'per-round ratio':>22s} {'runs min-max':>12s} {'speedup':>8s}")
  for rec in sorted(records, key=lambda r: (r['variant'], r['capacity'])):
    compile_s = rec['compile_s']
    speedup = rec.get('speedup_vs_numpy_loop')
    rr = rec[f'round_ratio_vs_{smallest}']
    runs = rec[f'run_ratio_vs_{smallest}']
    times = (f"{rec['median_ms']:.3f} [{rec['min_ms']:.3f}, "
             f"{rec['max_ms']:.3f}]")
    print(f"{rec['variant']:18s} {rec['capacity']:9d} {times:>26s} "
          f"{'-' if compile_s is None else f'{compile_s:.2f}':>9s} "
          f"{rec[f'ratio_median_vs_{smallest}']:6.3f} "
          f"{rr['median']:6.3f} [{rr['min']:.2f}, {rr['max']:.2f}] "
          f"{runs['min']:5.3f}-{runs['max']:5.3f} "
          f"{'-' if speedup is None else f'{speedup:.1f}x':>8s}")
  for rec in records:
    if rec['capacity'] != smallest and rec['repeats'] > 1:
      print(f"{rec['variant']}@{rec['capacity']} vs {smallest}, ratio of "
            'medians per run: ' + ', '.join(
                f'{r:.3f}' for r in rec[f'run_ratio_vs_{smallest}']['runs']))
  print('load average before / after: '
        f"{records[0]['load_before']} / {records[0]['load_after']}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--capacities', type=int, nargs='+',
                      default=[1000, 100000, 1000000])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=1,
                      help='run the interleaved measurement this many times')
  parser.add_argument('--block', type=int, default=1,
                      help='calls per turn, all but the first timed')
  parser.add_argument('--no-balanced', action='store_true')
  parser.add_argument('--no-loop', action='store_true',
                      help='leave out the numpy_loop variant')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  records = run(args.capacities, args.batch, args.num_classes, args.rounds,
                not args.no_balanced, repeats=args.repeats, block=args.block,
                loop=not args.no_loop)
  _print_table(records, min(args.capacities))
  if not args.no_save:
    print('appended to', _timing.write_jsonl('replay', records))


if __name__ == '__main__':
  main()
