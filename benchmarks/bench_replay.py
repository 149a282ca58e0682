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

  python -m benchmarks.bench_replay [--capacities 1000 100000 1000000
                                     --batch 128 --rounds 100]
"""

import argparse
import functools

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


def run(capacities: list[int], batch_size: int, num_classes: int, rounds: int,
        balanced: bool) -> list[dict]:
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
    loop = NumpyLoopReservoir(capacity)
    name = f'numpy_loop@{capacity}'

    def loop_step(loop=loop):
      loop.add(batch['image'], batch['label'])
      return loop.sample(batch_size)

    variants[name] = loop_step
    meta[name] = ('numpy_loop', capacity)

  times = _timing.interleaved(variants, rounds=rounds)
  stats = {n: _timing.summary_ms(t) for n, t in times.items()}
  smallest = min(capacities)
  records = []
  for name, (variant, capacity) in meta.items():
    base = stats[f'{variant}@{smallest}']['median_ms']
    rec = {'variant': variant, 'capacity': capacity, 'batch': batch_size,
           'item': 'uint8[28,28,1]+int32', 'rounds': rounds, **stats[name],
           'compile_s': compile_s.get(name),
           f'ratio_median_vs_{smallest}': stats[name]['median_ms'] / base}
    if variant != 'numpy_loop':
      rec['speedup_vs_numpy_loop'] = (
          stats[f'numpy_loop@{capacity}']['median_ms'] /
          stats[name]['median_ms'])
    if variant == 'metacf_balanced':
      rec['num_classes'] = num_classes
    records.append(rec)
  return records


def _print_table(records: list[dict], smallest: int) -> None:
  print(f"{'variant':18s} {'capacity':>9s} {'median ms':>10s} {'min':>8s} "
        f"{'max':>8s} {'compile s':>9s} {'vs ' + str(smallest):>9s} "
        f"{'speedup':>8s}")
  for rec in sorted(records, key=lambda r: (r['variant'], r['capacity'])):
    compile_s = rec['compile_s']
    speedup = rec.get('speedup_vs_numpy_loop')
    print(f"{rec['variant']:18s} {rec['capacity']:9d} "
          f"{rec['median_ms']:10.3f} {rec['min_ms']:8.3f} {rec['max_ms']:8.3f} "
          f"{'-' if compile_s is None else f'{compile_s:.2f}':>9s} "
          f"{rec[f'ratio_median_vs_{smallest}']:9.3f} "
          f"{'-' if speedup is None else f'{speedup:.1f}x':>8s}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--capacities', type=int, nargs='+',
                      default=[1000, 100000, 1000000])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=100)
  parser.add_argument('--no-balanced', action='store_true')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  records = run(args.capacities, args.batch, args.num_classes, args.rounds,
                not args.no_balanced)
  _print_table(records, min(args.capacities))
  if not args.no_save:
    print('appended to', _timing.write_jsonl('replay', records))


if __name__ == '__main__':
  main()
