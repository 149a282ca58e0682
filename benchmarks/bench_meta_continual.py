"""Online meta-continual kernels beside hand-written ``jax.jit`` references.

    python -m benchmarks.bench_meta_continual

What part (b) of ``experiments/meta_continual`` runs per stream batch, on its
784-100-100-10 ReLU MLP, batch 10 and 10 replayed examples:

- ``lamaml_update`` (second order, 10 sequential inner steps, meta-loss mean
  over steps, both gradients clipped) vs the same update written out: a
  Python loop of ``jax.grad`` steps, ``jax.value_and_grad`` of it, the rate
  and weight updates, in one ``jax.jit``.
- ``mer_update`` (2 batches of 20 single-example SGD steps) vs a written-out
  loop in one ``jax.jit``.
- ``jax.value_and_grad`` of ``predicted_forgetting(num_steps=1)`` (the
  forgetting-aware objective's term) vs a written-out linearize/vjp version.

No peer library implements these in JAX; PyTorch's (Avalanche, the authors'
code) are not installed here. Compile time is reported apart; the steady
state is timed interleaved (A B A B ...), median/min/max over rounds.
"""

import functools

import jax
import jax.numpy as jnp
import optax

import metacf
from benchmarks import _timing
from experiments.meta_continual import online

# The experiment's network, 784-100-100-10 ReLU.
_params = functools.partial(online.init_params, hidden=(100, 100))
_apply = online.apply_fn


def _loss(params, x, y):
  return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
      _apply(params, x), y))


def _clip(tree, max_norm):
  norm = optax.tree.norm(tree)
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / norm), tree)


def _lamaml_by_hand(params, rates, x, y, meta_x, meta_y):
  k = x.shape[0]

  def meta_loss(theta, alpha):
    total = 0.0
    for j in range(k):
      g = jax.grad(_loss)(theta, x[j], y[j])
      theta = jax.tree.map(lambda p, a, gp: p - a * gp, theta, alpha, g)
      total = total + _loss(theta, meta_x, meta_y) / k
    return total

  loss, (g, g_alpha) = jax.value_and_grad(meta_loss, (0, 1))(params, rates)
  g, g_alpha = _clip(g, 2.0), _clip(g_alpha, 2.0)
  rates = jax.tree.map(lambda a, ga: a - 0.3 * ga, rates, g_alpha)
  params = jax.tree.map(lambda p, a, gp: p - jnp.maximum(a, 0) * gp, params,
                        rates, g)
  return params, rates, loss


def _lamaml_metacf(params, rates, x, y, meta_x, meta_y):
  out = metacf.maml.lamaml_update(
      _loss, params, rates, x, y, meta_x, meta_y, lr_learning_rate=0.3,
      max_grad_norm=2.0, step_weights=jnp.full((x.shape[0],), 1 / x.shape[0]))
  return out.params, out.inner_lr, out.loss


def _mer_by_hand(params, x, y):
  start = theta = params
  for i in range(x.shape[0]):
    w = theta
    for j in range(x.shape[1]):
      w = jax.tree.map(lambda p, g: p - 0.03 * g, w,
                       jax.grad(_loss)(w, x[i, j], y[i, j]))
    theta = jax.tree.map(lambda a, b: a + 0.3 * (b - a), theta, w)
  return jax.tree.map(lambda a, b: a + 1.0 * (b - a), start, theta)


def _mer_metacf(params, x, y):
  return metacf.maml.mer_update(_loss, params, x, y, inner_lr=0.03,
                                within_batch_rate=0.3, across_batch_rate=1.0)


def _forgetting_by_hand(params, xa, ya, xb, yb):
  f_a, jvp_a = jax.linearize(lambda p: _apply(p, xa), params)
  f_b, vjp_b = jax.vjp(lambda p: _apply(p, xb), params)
  ce = lambda f, y: jnp.mean(
      optax.losses.softmax_cross_entropy_with_integer_labels(f, y))
  (v,) = vjp_b(jax.grad(ce)(f_b, yb))
  return ce(f_a - 0.1 * jvp_a(v), ya) - ce(f_a, ya)


def _forgetting_metacf(params, xa, ya, xb, yb):
  return metacf.jacobian.predicted_forgetting(
      _apply, params, (xa, ya), (xb, yb), lr=0.1, num_steps=1,
      loss='cross_entropy')


def _case(name, variants, args, rounds):
  records, compiled = [], {}
  for label, fn in variants.items():
    compiled[label], compile_s = _timing.compile_timed(jax.jit(fn), *args)
    records.append({'case': name, 'variant': label,
                    'compile_s': round(compile_s, 3)})
  # Same results (float32 rounding apart).
  outs = [jax.tree.leaves(c(*args)) for c in compiled.values()]
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*outs))
  times = _timing.interleaved(
      {label: functools.partial(c, *args) for label, c in compiled.items()},
      rounds=rounds, block=3)
  for rec in records:
    rec.update(_timing.summary_ms(times[rec['variant']]))
    rec['max_abs_difference'] = err
  base = records[1]['median_ms']
  for rec in records:
    rec['ratio_to_reference'] = round(rec['median_ms'] / base, 3)
  return records


def main() -> None:
  k = jax.random.split(jax.random.key(0), 6)
  params = _params(k[0])
  x = jax.random.uniform(k[1], (10, 1, 784))
  y = jax.random.randint(k[2], (10, 1), 0, 10)
  meta_x = jax.random.uniform(k[3], (20, 784))
  meta_y = jax.random.randint(k[4], (20,), 0, 10)
  rates = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  mer_x = jax.random.uniform(k[5], (2, 20, 1, 784))
  mer_y = jax.random.randint(k[5], (2, 20, 1), 0, 10)
  records = []
  records += _case('lamaml_update',
                   {'metacf': _lamaml_metacf, 'by_hand': _lamaml_by_hand},
                   (params, rates, x, y, meta_x, meta_y), rounds=30)
  records += _case('mer_update',
                   {'metacf': _mer_metacf, 'by_hand': _mer_by_hand},
                   (params, mer_x, mer_y), rounds=30)
  records += _case(
      'grad predicted_forgetting(num_steps=1)',
      {'metacf': jax.value_and_grad(_forgetting_metacf),
       'by_hand': jax.value_and_grad(_forgetting_by_hand)},
      (params, meta_x[:10], meta_y[:10], x[:, 0], y[:, 0]), rounds=50)
  print(f'device: {_timing.device_description()}')
  print('| case | variant | compile s | median ms | min | max | ratio | '
        'max abs diff |')
  print('|---|---|---|---|---|---|---|---|')
  for r in records:
    print(f"| {r['case']} | {r['variant']} | {r['compile_s']:.2f} | "
          f"{r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['max_ms']:.3f} | "
          f"{r['ratio_to_reference']:.2f} | {r['max_abs_difference']:.1e} |")
  print(_timing.write_jsonl('bench_meta_continual', records))


if __name__ == '__main__':
  main()
