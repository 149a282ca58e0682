"""FLOP rates and where a compiled step's time goes, on any XLA backend.

* :func:`matmul_peak` times one large float32 matmul (``jax.jit``), the rate
  a FLOP-bound step could reach on this device.
* :func:`flops` reads XLA's static cost analysis of a lowered program. Inside
  a ``while`` loop (``lax.scan``/``lax.map``) XLA counts the body once, so a
  step over T tasks in chunks of one is counted as one task (see callers).
* :func:`breakdown` runs a compiled step under ``jax.profiler`` (a Perfetto
  trace, no extra packages) and sums the time of each HLO instruction the
  runtime reports, grouped into matmuls (library ``dot`` fusions: YNNPACK /
  XNNPACK / oneDNN on CPU, cuBLAS on GPU), concatenates, slices and pads (the
  patch tensors of an im2col convolution and their transposes), and the
  reductions and the other element-wise fusions.
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

_INSTR = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def matmul_peak(size: int = 2048, rounds: int = 20) -> dict[str, float]:
  """GFLOP/s of a ``[size, size] @ [size, size]`` float32 matmul.

  Returns median and max over ``rounds`` timed calls (after 3 warm-up).
  """
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  mm = jax.jit(jnp.matmul)
  for _ in range(3):
    mm(a, b).block_until_ready()
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  flop = 2.0 * size ** 3
  return {'median_gflops': flop / statistics.median(times) / 1e9,
          'max_gflops': flop / min(times) / 1e9, 'size': size}


def flops(jitted: Any, *args: Any) -> float:
  """XLA's static FLOP count of ``jitted`` lowered for ``args``."""
  cost = jitted.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def _computations(hlo: str) -> dict[str, set[str]]:
  """The opcodes inside each computation of an HLO module's text."""
  ops, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r'\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if header and ' = ' not in line:
      current = ops.setdefault(header.group(1), set())
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      current.add(m.group(3))
  return ops


def _category(opcode: str, line: str, ops: dict[str, set[str]]) -> str:
  called = re.search(r'calls=%?([\w.\-]+)', line)
  inner = ops.get(called.group(1), set()) if called else set()
  if {'dot', 'convolution'} & ({opcode} | inner):
    return 'matmuls'
  if opcode == 'concatenate' or 'concatenate' in inner:
    return 'concatenates'
  if {'pad', 'slice'} & ({opcode} | inner):
    return 'slices and pads'
  if 'reduce' in ({opcode} | inner):
    return 'reductions'
  return 'other element-wise'


def breakdown(compiled: Any, call: Callable[[], Any], steps: int = 3,
              top: int = 12) -> dict[str, Any]:
  """Per-step time of each HLO instruction of ``compiled`` while ``call()``
  runs it ``steps`` times under the profiler, grouped into categories.

  ``call`` must block until its step is done. Times are summed over the
  threads that ran each instruction (on a 2-core CPU the total can exceed
  the wall time). Returns ``{'total_ms', 'categories': {name: ms},
  'top': [(ms, shape, instruction, op_name)]}``.
  """
  hlo = compiled.as_text()
  ops = _computations(hlo)
  info = {}
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if m:
      op_name = _OP_NAME.search(line)
      info[m.group(1)] = (m.group(2), m.group(3),
                          op_name.group(1) if op_name else '', line)
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(steps):
        call()
    (path,) = glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'),
                        recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in info:
      per_op[e['name']] += e.get('dur', 0) / 1e3 / steps  # us -> ms a step.
  categories = collections.Counter()
  for name, ms in per_op.items():
    _, opcode, _, line = info[name]
    categories[_category(opcode, line, ops)] += ms
  return {
      'total_ms': sum(per_op.values()),
      'categories': dict(categories.most_common()),
      'top': [(ms, info[n][0], n, info[n][2][-80:])
              for n, ms in per_op.most_common(top)],
  }
