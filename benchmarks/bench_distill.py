"""Loss + grad of `tempered_distillation_loss` vs the plain optax composition.

The reference is what a user would write alone: log-softmaxes at T, optax's
``kl_divergence_with_log_targets``, times T^2, in the same jit. Both variants
are compiled ahead of time (compile time reported apart), warmed up, then
timed interleaved (A B A B ...) in one process.

  python -m benchmarks.bench_distill [--batch 4096 --classes 1000 --rounds 50]
"""

import argparse

import jax
import jax.numpy as jnp
import optax

from benchmarks import _timing
from metacf import distill


def _plain_loss(student, teacher, temperature):
  # Same precision policy as metacf: half precision is computed in float32.
  log_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
  log_t = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher.astype(jnp.float32)) / temperature)
  kl = optax.losses.kl_divergence_with_log_targets(log_s, log_t)
  return jnp.mean(temperature**2 * kl)


def _metacf_loss(student, teacher, temperature):
  return jnp.mean(
      distill.tempered_distillation_loss(student, teacher, temperature))


def run(batch: int, classes: int, temperature: float, rounds: int,
        dtypes: list[str]) -> list[dict]:
  records = []
  key_s, key_t = jax.random.split(jax.random.key(0))
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    student = (3 * jax.random.normal(key_s, (batch, classes))).astype(dtype)
    teacher = (3 * jax.random.normal(key_t, (batch, classes))).astype(dtype)
    fns = {}
    compile_s = {}
    for name, loss in (('plain', _plain_loss), ('metacf', _metacf_loss)):
      step = jax.jit(jax.value_and_grad(
          lambda s, t, f=loss: f(s, t, temperature)))
      fns[name], compile_s[name] = _timing.compile_timed(step, student,
                                                         teacher)
    times = _timing.interleaved(
        {n: (lambda f=f: f(student, teacher)) for n, f in fns.items()},
        rounds=rounds)
    stats = {n: _timing.summary_ms(v) for n, v in times.items()}
    rec = {
        'batch': batch, 'classes': classes, 'temperature': temperature,
        'dtype': dtype_name, 'rounds': rounds,
        'metacf': {**stats['metacf'], 'compile_s': compile_s['metacf']},
        'plain': {**stats['plain'], 'compile_s': compile_s['plain']},
        'ratio_median': stats['metacf']['median_ms'] /
                        stats['plain']['median_ms'],
        'ratio_min': stats['metacf']['min_ms'] / stats['plain']['min_ms'],
    }
    records.append(rec)
    print(f"{dtype_name:9s} metacf {stats['metacf']['median_ms']:7.2f} ms "
          f"[{stats['metacf']['min_ms']:.2f}, {stats['metacf']['max_ms']:.2f}]"
          f"  plain {stats['plain']['median_ms']:7.2f} ms "
          f"[{stats['plain']['min_ms']:.2f}, {stats['plain']['max_ms']:.2f}]"
          f"  ratio(median) {rec['ratio_median']:.3f}"
          f"  ratio(min) {rec['ratio_min']:.3f}"
          f"  compile {compile_s['metacf']:.2f}s / {compile_s['plain']:.2f}s")
  return records


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--classes', type=int, default=1000)
  parser.add_argument('--temperature', type=float, default=4.0)
  parser.add_argument('--rounds', type=int, default=50)
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  records = run(args.batch, args.classes, args.temperature, args.rounds,
                args.dtypes)
  if not args.no_save:
    print('appended to', _timing.write_jsonl('distill', records))


if __name__ == '__main__':
  main()
