"""Loss + grad of `tempered_distillation_loss` vs the plain optax composition.

The reference is what a user would write alone: log-softmaxes at T, optax's
``kl_divergence_with_log_targets``, times T^2, in the same jit. Both variants
are compiled ahead of time (compile time reported apart), warmed up, then
timed interleaved (A B A B ...) in one process.

  python -m benchmarks.bench_distill [--batch 4096 --classes 1000 --rounds 50]

``--checks`` measures instead what metacf's runtime value checks cost when
on (:mod:`metacf.checks`): per loss, ``off`` = a plain ``jax.jit`` of loss +
grad, ``on`` = ``jax.jit(checkify.checkify(..., errors=user_checks))``
traced under ``metacf.runtime_checks()``, and ``on_throw`` = ``on`` plus
``err.throw()`` after each step (what a training loop that wants the error
does; it reads the error code back to the host). The temperature and the
labels/probabilities are arguments of the jitted function (traced), so
their checks are in the program. Losses: ``kd`` (the Hinton loss, one
scalar temperature), ``kd_per_example`` (one temperature per example),
``kd_probs`` (teacher probabilities: a >= 0 check over the whole
``[batch, classes]`` array) and ``lwf`` (labels in range + temperature).

  python -m benchmarks.bench_distill --checks [--rounds 50]
"""

import argparse
import statistics

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import optax

import metacf
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


def _checks_losses(batch: int, classes: int, temperature: float):
  """(name, loss(student, *args), args): the traced arguments are checked."""
  key_s, key_t, key_y = jax.random.split(jax.random.key(0), 3)
  student = 3 * jax.random.normal(key_s, (batch, classes))
  teacher = 3 * jax.random.normal(key_t, (batch, classes))
  labels = jax.random.randint(key_y, (batch,), 0, classes)
  temp = jnp.float32(temperature)
  temps = jnp.full((batch,), temperature, jnp.float32)
  probs = jax.nn.softmax(teacher)
  kd = lambda s, t, temp: jnp.mean(
      distill.tempered_distillation_loss(s, t, temp))
  kd_probs = lambda s, p, temp: jnp.mean(
      distill.distillation_loss_from_probs(s, p, temp))
  lwf = lambda s, y, t, temp: jnp.mean(distill.lwf_loss(
      s, y, s, t, temperature=temp))
  return student, (
      ('kd', kd, (teacher, temp)),
      ('kd_per_example', kd, (teacher, temps)),
      ('kd_probs', kd_probs, (probs, temp)),
      ('lwf', lwf, (labels, teacher, temp)))


def run_checks(batch: int, classes: int, temperature: float,
               rounds: int) -> list[dict]:
  """Checks off (plain jit) vs on (checkify + jit), interleaved."""
  student, losses = _checks_losses(batch, classes, temperature)
  records = []
  for name, loss, args in losses:
    grad = jax.value_and_grad(loss)
    fns, compile_s = {}, {}
    fns['off'], compile_s['off'] = _timing.compile_timed(
        jax.jit(grad), student, *args)
    with metacf.runtime_checks():
      fns['on'], compile_s['on'] = _timing.compile_timed(
          jax.jit(checkify.checkify(grad, errors=checkify.user_checks)),
          student, *args)
    err, _ = fns['on'](student, *args)
    err.throw()  # The inputs are valid: nothing to report.

    def on_throw(f=fns['on']):
      err, out = f(student, *args)
      err.throw()
      return out

    times = _timing.interleaved(
        {'off': lambda f=fns['off']: f(student, *args),
         'on': lambda f=fns['on']: f(student, *args),
         'on_throw': on_throw}, rounds=rounds)
    stats = {n: _timing.summary_ms(v) for n, v in times.items()}
    cost = {n: _cost(fns[n]) for n in ('off', 'on')}
    # Round by round (on and off ran back to back): the ratios share each
    # round's load, so their median is steadier than a ratio of medians.
    paired = sorted(a / b for a, b in zip(times['on'], times['off']))
    quartiles = statistics.quantiles(paired, n=4)
    rec = {'kind': 'runtime_checks', 'loss': name, 'batch': batch,
           'classes': classes, 'temperature': temperature, 'dtype': 'float32',
           'rounds': rounds,
           **{n: {**stats[n], 'compile_s': compile_s.get(n)} for n in stats},
           'ratio_on_off_median': stats['on']['median_ms'] /
                                  stats['off']['median_ms'],
           'ratio_on_off_min': stats['on']['min_ms'] / stats['off']['min_ms'],
           'paired_ratio_median': statistics.median(paired),
           'xla_cost_off': cost['off'], 'xla_cost_on': cost['on'],
           'ratio_bytes_accessed': cost['on']['bytes accessed'] /
                                   cost['off']['bytes accessed'],
           'ratio_flops': cost['on']['flops'] / cost['off']['flops'],
           'paired_ratio_quartiles': [quartiles[0], quartiles[2]],
           'ratio_on_throw_off_median': stats['on_throw']['median_ms'] /
                                        stats['off']['median_ms']}
    records.append(rec)
    print(f"{name:15s} off {stats['off']['median_ms']:7.2f} ms "
          f"[{stats['off']['min_ms']:.2f}, {stats['off']['max_ms']:.2f}]"
          f"  on {stats['on']['median_ms']:7.2f} ms "
          f"[{stats['on']['min_ms']:.2f}, {stats['on']['max_ms']:.2f}]"
          f"  on+throw {stats['on_throw']['median_ms']:7.2f} ms"
          f"  on/off median {rec['ratio_on_off_median']:.3f}"
          f" min {rec['ratio_on_off_min']:.3f}"
          f" paired {rec['paired_ratio_median']:.3f}"
          f" [{quartiles[0]:.3f}, {quartiles[2]:.3f}]"
          f"  compile {compile_s['off']:.2f}s / {compile_s['on']:.2f}s"
          f"  XLA bytes x{rec['ratio_bytes_accessed']:.4f}"
          f" flops x{rec['ratio_flops']:.4f}")
  return records


def _cost(compiled) -> dict[str, float]:
  """XLA's static cost analysis of a compiled step (flops, bytes accessed)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # Older jax: one dict per computation.
    analysis = analysis[0]
  return {k: float(analysis[k]) for k in ('flops', 'bytes accessed',
                                          'transcendentals') if k in analysis}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--classes', type=int, default=1000)
  parser.add_argument('--temperature', type=float, default=4.0)
  parser.add_argument('--rounds', type=int, default=50)
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--checks', action='store_true',
                      help='measure the runtime value checks (off vs on)')
  parser.add_argument('--no-save', action='store_true')
  args = parser.parse_args()
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  if args.checks:
    records = run_checks(args.batch, args.classes, args.temperature,
                         args.rounds)
  else:
    records = run(args.batch, args.classes, args.temperature, args.rounds,
                  args.dtypes)
  if not args.no_save:
    print('appended to', _timing.write_jsonl('distill', records))


if __name__ == '__main__':
  main()
