"""Shared timing helpers: compile apart, warm up, interleave variants, report."""

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

# $METACF_BENCH_RESULTS_DIR redirects the JSON lines (benchmarks/gpu.py gives
# each run its own folder, so its records are read back apart).
RESULTS_DIR = os.environ.get('METACF_BENCH_RESULTS_DIR') or os.path.join(
    os.path.dirname(__file__), 'results')


def device_description() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, 'device_kind', '') or platform.processor() or 'cpu'
  return f'{jax.default_backend()}:{kind} x{jax.device_count()} ({os.cpu_count()} host cores)'


def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """AOT-compiles a jitted ``fn`` for ``args``; returns (compiled, seconds)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def interleaved(variants: Mapping[str, Callable[[], Any]], *, rounds: int,
                warmup: int = 2, block: int = 1) -> dict[str, list[float]]:
  """Times the variants in turns, A B A B ... (seconds per call).

  Interleaving spreads slow phases of a shared, noisy machine over all
  variants instead of penalising whichever happened to run then. The first
  ``warmup`` calls of each variant are not timed. With ``block > 1`` each turn
  runs a variant ``block`` times and times all but the first: a call right
  after another variant's runs on caches that variant evicted (a 0.8 ms MAML
  step took 1.1 ms right after a torch.func step), which is not the steady
  state of a training loop.
  """
  for _ in range(warmup):
    for f in variants.values():
      jax.block_until_ready(f())
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, f in variants.items():
      if block > 1:
        jax.block_until_ready(f())
      for _ in range(max(block - 1, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        times[name].append(time.perf_counter() - t0)
  return times


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
  ms = [1e3 * s for s in samples]
  return {'median_ms': statistics.median(ms), 'min_ms': min(ms),
          'max_ms': max(ms)}


def write_jsonl(bench: str, records: Sequence[dict[str, Any]]) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f'{bench}.jsonl')
  stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')
  with open(path, 'a') as f:
    for rec in records:
      f.write(json.dumps({'bench': bench, 'date': stamp,
                          'device': device_description(),
                          'jax': jax.__version__, **rec}) + '\n')
  return path


def rss_bytes(field: str = 'VmRSS') -> int:
  """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f'{field} not in /proc/self/status')


def reset_peak_rss() -> int:
  """Resets this process's peak RSS (``VmHWM``) to its RSS; returns the RSS.

  Writing 5 to ``/proc/self/clear_refs`` (Linux) resets the high-water mark,
  so ``rss_bytes('VmHWM')`` afterwards is the peak since this call.
  """
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  return rss_bytes('VmRSS')


def peak_rss_growth(fn: Callable[[], Any]) -> dict[str, int]:
  """Peak RSS of one blocked call of ``fn`` above the RSS before it.

  Meant for a fresh process per variant, after set-up and compilation: what
  was resident before (inputs, compiled code, runtimes) is not counted, and
  nothing another variant freed can be reused unseen.
  """
  before = reset_peak_rss()
  jax.block_until_ready(fn())
  peak = rss_bytes('VmHWM')
  return {'rss_before_bytes': before, 'peak_rss_bytes': peak,
          'peak_growth_bytes': peak - before}


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """XLA's buffer sizes for a compiled executable (``memory_analysis()``).

  ``total_bytes`` = arguments + outputs + temporaries. It leaves out memory a
  custom call allocates itself (the LAPACK workspaces of CPU ``svd``, ``eigh``
  and ``qr``), so it is a lower bound of what a call needs.
  """
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  sizes = {'argument_bytes': int(memory.argument_size_in_bytes),
           'output_bytes': int(memory.output_size_in_bytes),
           'temp_bytes': int(memory.temp_size_in_bytes)}
  return {**sizes, 'total_bytes': sum(sizes.values())}
