"""One training step on the experiments' ViT: full fine-tuning vs adapters.

The model is ``experiments.common.models.ViT`` (dim 64, depth 4, 4 heads, MLP
128, 7x7 patches of 28x28x1 images: 16 patch tokens + the class token,
139,018 parameters). One step is: softmax cross-entropy on a batch (random
images and labels, fixed), its gradient with respect to the trainable
leaves, ``optax.adam(1e-3)`` on those leaves only, ``optax.apply_updates``;
one ``jax.jit`` per variant, the trainable leaves and the Adam state donated.

Variants:

* ``full``: gradient w.r.t. all parameters, Adam on all.
* ``lora_merged_r{r}``: ``metacf.adapters.with_lora(apply_fn, alpha=...)``
  (the adapted kernels ``W + (alpha/r) a @ b`` are merged on every call);
  adapters of rank ``r`` on ``r'(attn|mlp)/.*/kernel'`` (the q/k/v/out and
  fc1/fc2 kernels of every block), gradient w.r.t. the adapters, Adam on them.
* ``lora_unmerged_r{r}``: the same adapters, computed as ``x @ W + (alpha/r)
  (x @ a) @ b`` (``metacf.adapters.lora_dense``) inside each targeted
  ``nn.Dense``: ``flax.linen.intercept_methods`` catches ``nn.Dense.__call__``
  and looks the adapter up by the module's path (``'/'.join(module.path)``),
  so the model is not duplicated and no ``[d_in, d_out]`` weight is formed.
  Before anything is timed, its loss and gradients are checked against the
  merged variant's (float32 tolerance), at adapters with ``b != 0``.
* ``prompt``: a soft prompt of ``--prompt-tokens`` tokens
  (``soft_prompt_init``; ``ViT(prompt=...)``), the body frozen, Adam on the
  prompt. ``deep_prompt``: one such prompt per block (VPT-deep,
  ``ViT(deep_prompts=...)``).

Reported per variant and batch size: step time (median [min, max] ms over
``--rounds`` turns of ``--block`` steps of which all but the first are timed,
variants interleaved A B C A B C ... in one process, after AOT compilation,
timed apart, and warm-up), compile seconds, XLA's flop count of the step
(``cost_analysis``), trainable parameters, the Adam state (numbers and bytes:
``2 * trainable + 1`` numbers), XLA's buffer sizes of the compiled step
(``_timing.compiled_memory``: arguments, outputs, temporaries) and, unless
``--no-memory``, the peak RSS growth of one step in a fresh process per
variant (``_timing.peak_rss_growth``, first call after compilation).

  python -m benchmarks.bench_adapters [--batches 64 256 --ranks 1 4 16
      --rounds 30 --block 4 --no-memory --no-save]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _timing
from experiments.common import models
from metacf import adapters

TARGETS = r'(attn|mlp)/.*/kernel'
LEARNING_RATE = 1e-3
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _cross_entropy(logits, labels):
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _path(key_path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                  for k in key_path)


def _flat(tree):
  return [(_path(kp), leaf) for kp, leaf in jax.tree.flatten_with_path(tree)[0]]


def _adapter_table(lora_params):
  """``{module path: {'a', 'b'}}`` for the kernel adapters of ``lora_params``."""
  table = {}
  for key_path, leaf in jax.tree.flatten_with_path(lora_params)[0]:
    path = _path(key_path)  # e.g. 'block_0/attn/query/kernel/a'
    module, param, factor = path.rsplit('/', 2)
    if param != 'kernel':
      raise ValueError(f'unmerged LoRA adapts Dense kernels only, got {path!r}')
    table.setdefault(module, {})[factor] = leaf
  return table


def unmerged_lora_apply(model, *, alpha=None):
  """``fn(params, lora_params, x, **kw)``: ``model`` with unmerged adapters.

  Every ``nn.Dense`` whose kernel has an adapter computes ``lora_dense(x, W,
  a, b) + bias`` instead of ``x @ W + bias``; the other modules run as they
  are. Raises if an adapter is left unused (its module is not a Dense).
  """

  def fn(params, lora_params, x, **kwargs):
    table = _adapter_table(lora_params)
    used = set()

    def interceptor(next_fun, args, kw, context):
      module = context.module
      if not (isinstance(module, nn.Dense)
              and context.method_name == '__call__'):
        return next_fun(*args, **kw)
      adapter = table.get('/'.join(module.path))
      if adapter is None:
        return next_fun(*args, **kw)
      used.add('/'.join(module.path))
      (inputs,) = args
      y = adapters.lora_dense(inputs, module.get_variable('params', 'kernel'),
                              adapter['a'], adapter['b'], alpha=alpha)
      if module.use_bias:
        y = y + module.get_variable('params', 'bias')
      return y

    with nn.intercept_methods(interceptor):
      out = model.apply({'params': params}, x, **kwargs)
    if used != set(table):
      raise ValueError(f'adapters not applied: {sorted(set(table) - used)}')
    return out

  return fn


def _variant_names(ranks, deep_prompt):
  names = ['full']
  for r in ranks:
    names += [f'lora_merged_r{r}', f'lora_unmerged_r{r}']
  names.append('prompt')
  if deep_prompt:
    names.append('deep_prompt')
  return names


def _setup(batch):
  model = models.ViT(num_classes=NUM_CLASSES)
  params = model.init(jax.random.key(0),
                      jnp.zeros((1, *IMAGE_SHAPE)))['params']
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (batch, *IMAGE_SHAPE))
  y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
  return model, params, x, y


def _variant(name, model, params, args):
  """``(loss_fn(trainable, frozen, x, y), trainable, frozen)`` for ``name``."""
  apply_fn = lambda p, x, **kw: model.apply({'params': p}, x, **kw)
  if name == 'full':
    return (lambda p, _, x, y: _cross_entropy(apply_fn(p, x), y)), params, None
  if name.startswith('lora_'):
    rank = int(name.rsplit('_r', 1)[1])
    lora_params = adapters.lora_init(jax.random.key(2), params, rank,
                                     targets=TARGETS)
    if name.startswith('lora_merged'):
      apply_lora = adapters.with_lora(apply_fn, alpha=args.alpha)
    else:
      apply_lora = unmerged_lora_apply(model, alpha=args.alpha)
    return ((lambda lp, p, x, y: _cross_entropy(apply_lora(p, lp, x), y)),
            lora_params, params)
  key = jax.random.key(3)
  if name == 'prompt':
    prompt = adapters.soft_prompt_init(key, args.prompt_tokens, model.dim)
    return ((lambda pr, p, x, y: _cross_entropy(apply_fn(p, x, prompt=pr), y)),
            prompt, params)
  if name == 'deep_prompt':
    prompts = jnp.stack([
        adapters.soft_prompt_init(k, args.prompt_tokens, model.dim)
        for k in jax.random.split(key, model.depth)])
    return ((lambda pr, p, x, y: _cross_entropy(
        apply_fn(p, x, deep_prompts=pr), y)), prompts, params)
  raise ValueError(f'unknown variant {name!r}')


def _make_step(loss_fn):
  tx = optax.adam(LEARNING_RATE)

  def step(trainable, opt_state, frozen, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def _kernel_shaped_dots(fn, args, shapes, contractions):
  """Matmuls (``dot_general``) in ``fn``'s jaxpr that form a kernel-shaped
  matrix: output shape in ``shapes`` (the adapted kernels') and contracted
  size in ``contractions`` (the rank: a merge ``a @ b``; or the batch, or
  more: a weight gradient ``x^T dy`` over samples and tokens)."""

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        (lhs_contract, _), _ = eqn.params['dimension_numbers']
        lhs_shape = eqn.invars[0].aval.shape
        size = int(np.prod([lhs_shape[d] for d in lhs_contract]))
        if (tuple(eqn.outvars[0].aval.shape) in shapes
            and contractions(size)):
          n += 1
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          sub = getattr(sub, 'jaxpr', sub)
          if hasattr(sub, 'eqns'):
            n += count(sub)
    return n

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _nbytes(tree):
  return int(sum(np.dtype(leaf.dtype).itemsize * leaf.size
                 for leaf in jax.tree.leaves(tree)))


class _Runner:
  """A compiled step and its own (donated, updated) trainable leaves and state."""

  def __init__(self, name, model, params, x, y, args):
    loss_fn, trainable, frozen = _variant(name, model, params, args)
    tx, step = _make_step(loss_fn)
    opt_state = tx.init(trainable)
    self.compiled, self.compile_s = _timing.compile_timed(
        step, trainable, opt_state, frozen, x, y)
    shapes = {tuple(np.shape(w)) for path, w in _flat(params)
              if re.search(TARGETS, path)}
    rank = (int(name.rsplit('_r', 1)[1]) if name.startswith('lora_')
            else None)
    dots = _kernel_shaped_dots(
        step, (trainable, opt_state, frozen, x, y), shapes,
        lambda size: size == rank or size >= x.shape[0])
    if name.startswith('lora_unmerged') and dots:
      raise AssertionError(f'{name} forms {dots} kernel-shaped matrices')
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.info = {
        'trainable_params': adapters.count_params(trainable),
        'opt_state_numbers': adapters.count_params(opt_state),
        'opt_state_bytes': _nbytes(opt_state),
        'compile_s': self.compile_s,
        'kernel_shaped_dots': dots,
        'flops': float(cost['flops']) if cost and 'flops' in cost else None,
        'compiled_memory': _timing.compiled_memory(self.compiled),
    }
    self.trainable = jax.tree.map(lambda a: jnp.array(a, copy=True), trainable)
    self.opt_state, self.frozen, self.x, self.y = opt_state, frozen, x, y

  def __call__(self):
    self.trainable, self.opt_state, loss = self.compiled(
        self.trainable, self.opt_state, self.frozen, self.x, self.y)
    return loss


def check_unmerged(model, params, x, y, rank, alpha):
  """Unmerged LoRA's loss and gradients equal the merged form's (float32)."""
  lora_params = adapters.lora_init(jax.random.key(2), params, rank,
                                   targets=TARGETS)
  # b = 0 after lora_init would zero the gradients w.r.t. a: use b != 0.
  leaves, treedef = jax.tree.flatten(lora_params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  lora_params = jax.tree.unflatten(treedef, [
      0.1 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  apply_fn = lambda p, x: model.apply({'params': p}, x)
  merged = adapters.with_lora(apply_fn, alpha=alpha)
  unmerged = unmerged_lora_apply(model, alpha=alpha)
  results = {}
  for name, fn in (('merged', merged), ('unmerged', unmerged)):
    loss = lambda lp, f=fn: _cross_entropy(f(params, lp, x), y)
    results[name] = jax.jit(jax.value_and_grad(loss))(lora_params)
  (loss_m, grad_m), (loss_u, grad_u) = results['merged'], results['unmerged']
  np.testing.assert_allclose(loss_u, loss_m, rtol=1e-5)
  assert jax.tree.structure(grad_u) == jax.tree.structure(grad_m)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_m))
  for gu, gm in zip(jax.tree.leaves(grad_u), jax.tree.leaves(grad_m)):
    np.testing.assert_allclose(gu, gm, rtol=1e-4, atol=1e-5 * scale)
  err = max(float(jnp.max(jnp.abs(gu - gm)))
            for gu, gm in zip(jax.tree.leaves(grad_u), jax.tree.leaves(grad_m)))
  return {'loss_abs_diff': abs(float(loss_u) - float(loss_m)),
          'grad_max_abs_diff_rel': err / scale}


def _probe_memory(spec):
  """Child process: peak RSS growth of one step of one variant (stdout JSON)."""
  args = argparse.Namespace(**spec['args'])
  model, params, x, y = _setup(spec['batch'])
  runner = _Runner(spec['variant'], model, params, x, y, args)
  rec = _timing.peak_rss_growth(runner)
  print(json.dumps(rec))


def _run_probe(batch, variant, args, timeout_s=300):
  spec = json.dumps({'batch': batch, 'variant': variant, 'args': {
      'alpha': args.alpha, 'prompt_tokens': args.prompt_tokens}})
  try:
    out = subprocess.run(
        [sys.executable, '-m', 'benchmarks.bench_adapters', '--probe-memory',
         spec], capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'memory probe timed out after {timeout_s} s'}
  if out.returncode != 0:
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
    return {'error': f'memory probe exited with {out.returncode}: '
                     f'{" ".join(tail)[:300]}'}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(n):
  return f'{n / 2**20:.2f}' if n is not None else '-'


def _kb(n):
  return f'{n / 2**10:.1f}' if n is not None else '-'


def run(args):
  records = []
  names = _variant_names(args.ranks, not args.no_deep_prompt)
  for batch in args.batches:
    model, params, x, y = _setup(batch)
    checks = {r: check_unmerged(model, params, x, y, r, args.alpha)
              for r in args.ranks}
    peak = {}
    if not args.no_memory:
      for name in names:
        peak[name] = _run_probe(batch, name, args)
    runners = {name: _Runner(name, model, params, x, y, args)
               for name in names}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    times = _timing.interleaved(runners, rounds=args.rounds, block=args.block)
    wall_s = time.perf_counter() - t0
    load_after = os.getloadavg()
    stats = {n: _timing.summary_ms(t) for n, t in times.items()}
    full_ms = stats['full']['median_ms']
    print(f'\nbatch {batch}: {args.rounds} rounds x {max(args.block - 1, 1)} '
          f'timed steps, {wall_s:.0f} s, load {load_before[0]:.2f} -> '
          f'{load_after[0]:.2f}')
    print(f'{"variant":19s} {"median ms":>9s} {"[min, max]":>17s} {"/full":>5s}'
          f' {"compile":>7s} {"GFLOP":>6s} {"trainable":>9s} {"adam nums":>9s}'
          f' {"adam KB":>7s} {"W-dots":>6s} {"temp MB":>7s} {"RSS+ MB":>7s}')
    for name in names:
      info, s = runners[name].info, stats[name]
      mem = info['compiled_memory'] or {}
      p = peak.get(name, {})
      rec = {'batch': batch, 'variant': name, 'model': 'ViT',
             'rank': (int(name.rsplit('_r', 1)[1])
                      if name.startswith('lora_') else None),
             'alpha': args.alpha if name.startswith('lora_') else None,
             'prompt_tokens': (args.prompt_tokens if 'prompt' in name
                               else None),
             'targets': TARGETS if name.startswith('lora_') else None,
             'rounds': args.rounds, 'timed_per_round': max(args.block - 1, 1),
             **s, 'ratio_vs_full': s['median_ms'] / full_ms, **info,
             'peak_rss': p or None,
             'loadavg_before': load_before[0], 'loadavg_after': load_after[0]}
      if name.startswith('lora_unmerged'):
        rec['check_vs_merged'] = checks[rec['rank']]
      records.append(rec)
      flops = info['flops']
      spread = f'[{s["min_ms"]:.2f}, {s["max_ms"]:.2f}]'
      print(f'{name:19s} {s["median_ms"]:9.2f} {spread:>17s} '
            f'{rec["ratio_vs_full"]:5.2f} {info["compile_s"]:6.2f}s '
            f'{(flops or 0) / 1e9:6.3f} {info["trainable_params"]:9,d} '
            f'{info["opt_state_numbers"]:9,d} {_kb(info["opt_state_bytes"]):>7s}'
            f' {info["kernel_shaped_dots"]:6d}'
            f' {_mb(mem.get("temp_bytes")):>7s} '
            f'{_mb(p.get("peak_growth_bytes")) if p else "-":>7s}')
    for r, c in checks.items():
      print(f'unmerged vs merged, rank {r}: |loss diff| '
            f'{c["loss_abs_diff"]:.1e}, max |grad diff| / max |grad| '
            f'{c["grad_max_abs_diff_rel"]:.1e}')
    for name, p in peak.items():
      if 'error' in p:
        print(f'peak RSS of {name}: {p["error"]}')
  return records


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batches', type=int, nargs='+', default=[64, 256])
  parser.add_argument('--ranks', type=int, nargs='+', default=[1, 4, 16])
  parser.add_argument('--alpha', type=float, default=8.0,
                      help='LoRA scale numerator (update scaled alpha / r)')
  parser.add_argument('--prompt-tokens', type=int, default=5)
  parser.add_argument('--no-deep-prompt', action='store_true')
  parser.add_argument('--rounds', type=int, default=30)
  parser.add_argument('--block', type=int, default=4,
                      help='steps per turn; all but the first are timed')
  parser.add_argument('--no-memory', action='store_true',
                      help='skip the fresh-process peak RSS probes')
  parser.add_argument('--no-save', action='store_true')
  parser.add_argument('--probe-memory', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.probe_memory:
    _probe_memory(json.loads(args.probe_memory))
    return
  print(f'device: {_timing.device_description()}, jax {jax.__version__}')
  records = run(args)
  if not args.no_save:
    print('appended to', _timing.write_jsonl('adapters', records))


if __name__ == '__main__':
  main()
