"""Part (b): online continual learning in La-MAML's protocol.

MNIST Rotations and Permutations (Lopez-Paz & Ranzato 2017, as used by MER
and La-MAML): ``num_tasks`` tasks of ``num_train`` examples, seen once, in
mini-batches of ``batch_size``, by a 784-100-100-10 ReLU MLP with one shared
head, and a reservoir replay buffer of ``memory_size`` examples
(``metacf.replay.replay_buffer``). Methods:

- ``online``: plain SGD on the stream.
- ``er``: SGD on the stream batch and as many replayed examples.
- ``mer``: ``metacf.maml.mer_update`` (Riemer et al. 2019) on ``mer_batches``
  batches of the stream batch plus replayed examples, one example per SGD
  step.
- ``lamaml``: ``metacf.maml.lamaml_update`` (Gupta et al. 2020): one inner
  step per stream example with learnable per-parameter rates, meta-loss on
  the stream batch and replayed examples, rates clipped at 0 in the outer
  update.
- ``oml``: OML-style (Javed & White 2019): ``metacf.maml.maml_loss`` with
  ``sequential_support=True`` and ``adapt_mask`` on the head: the head takes
  one SGD step per stream example, the meta-loss on the stream batch and
  replayed examples trains all layers (SGD).
- ``er_fa``: ER plus the forgetting-aware objective, ``lambda *
  metacf.jacobian.predicted_forgetting`` of replayed examples (the buffer's
  tasks) under one SGD step on the stream batch (the coming update),
  differentiated with respect to the parameters.

Every method sees the same stream (order, batches) and starts from the same
initialisation for a seed. Replayed examples carry a weight (0 for empty
buffer slots), so the first batches, when the buffer is not yet full, are
handled without a retrace.
"""

from collections.abc import Callable, Mapping
import dataclasses
import functools
import os
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats as scipy_stats

import metacf
from experiments.common import loop
from experiments.common import stats
from experiments.common import utils
from experiments.meta_continual import configs
from experiments.predict_forgetting import _tasks
from experiments.prevent_forgetting import data as pf_data

METHODS = configs.ONLINE_METHODS
BENCHMARKS = configs.ONLINE_BENCHMARKS
OnlineConfig = configs.OnlineConfig
NUM_CLASSES = 10
SUBDIR = 'online'
RESULTS_JSON = 'online_results.json'


# ---------------------------------------------------------------------------
# Data.


def make_stream(benchmark: str, seed: int, config: OnlineConfig,
                splits) -> pf_data.Benchmark:
  """The tasks, through ``prevent_forgetting``'s transformations."""
  # make_benchmark reads these four fields only.
  pf_config = types.SimpleNamespace(
      num_tasks=config.num_tasks, rotation_step=config.rotation_step,
      num_test=config.num_test, train_size=lambda _: config.num_train)
  data = pf_data.make_benchmark(benchmark, seed, pf_config, splits)
  # Back to pixel values in [0, 1], the inputs of GEM's, MER's and La-MAML's
  # MNIST benchmarks, whose learning rates these are (standardised inputs
  # have ~10x the second moment, and those rates diverged on them).
  raw = lambda x: (x * _tasks.PIXEL_STD + _tasks.PIXEL_MEAN).astype(
      np.float32)
  return data._replace(x_train=raw(data.x_train), x_test=raw(data.x_test))


# ---------------------------------------------------------------------------
# Model and losses.


def init_params(key: jax.Array, hidden: tuple[int, ...]) -> list[dict]:
  sizes = (pf_data.NUM_PIXELS,) + tuple(hidden) + (NUM_CLASSES,)
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    params.append({'w': jax.random.normal(k, (m, n)) * float(np.sqrt(2.0 / m)),
                   'b': jnp.zeros((n,))})
  return params


def apply_fn(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'][None, :])
  return x @ params[-1]['w'] + params[-1]['b'][None, :]


def weighted_loss(params, x, y):
  """Mean cross-entropy over examples of weight 1 (``y = (label, weight)``);
  0 when every weight is 0 (empty replay slots)."""
  labels, weights = y
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(
      apply_fn(params, x), labels)
  return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1.0)


# ---------------------------------------------------------------------------
# One update per method: (params, state, x, y, replay, fa_replay, key) ->
# (params, state). ``replay`` is ``(x, labels, weights)``.


def _concat(a, b):
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, b)


def _sgd(params, grads, lr):
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def make_update(method: str, config: OnlineConfig) -> Callable[..., Any]:
  """The method's update of one stream batch."""
  ones = lambda y: jnp.ones(y.shape, jnp.float32)

  if method == 'online':
    def update(params, state, x, y, replay, fa_replay, key):
      del replay, fa_replay, key
      grads = jax.grad(weighted_loss)(params, x, (y, ones(y)))
      return _sgd(params, grads, config.lr), state
    return update

  if method == 'er':
    def update(params, state, x, y, replay, fa_replay, key):
      del fa_replay, key
      rx, ry, rw = replay
      batch = _concat((x, (y, ones(y))), (rx, (ry, rw)))
      grads = jax.grad(weighted_loss)(params, *batch)
      return _sgd(params, grads, config.lr), state
    return update

  if method == 'er_fa':
    predict = functools.partial(
        metacf.jacobian.predicted_forgetting, apply_fn, lr=config.lr,
        num_steps=config.fa_num_steps, loss='cross_entropy')

    def objective(params, x, y, replay, fa_replay):
      rx, ry, rw = replay
      er = weighted_loss(params, *_concat((x, (y, ones(y))), (rx, (ry, rw))))
      # Forgetting of replayed examples (the buffer's tasks) predicted for
      # an SGD step on the stream batch. Empty slots are not in the buffer's
      # tasks: weight 0 removes them from the prediction (their labels are
      # 0, a valid class).
      fx, fy, fw = fa_replay
      forgetting = predict(params, (fx, fy), (x, y))
      return er + config.fa_strength * jnp.min(fw) * forgetting

    def update(params, state, x, y, replay, fa_replay, key):
      del key
      grads = jax.grad(objective)(params, x, y, replay, fa_replay)
      return _sgd(params, grads, config.lr), state
    return update

  if method == 'mer':
    def update(params, state, x, y, replay, fa_replay, key):
      del fa_replay
      rx, ry, rw = replay  # [s, R, ...]: one replay draw per MER batch.
      s = rx.shape[0]
      order = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0]))(
          jax.random.split(key, s))
      bx = jnp.concatenate([x[order], rx], axis=1)        # [s, k, 784]
      by = jnp.concatenate([y[order], ry], axis=1)
      bw = jnp.concatenate([jnp.ones(y[order].shape), rw], axis=1)
      params = metacf.maml.mer_update(
          weighted_loss, params, bx[:, :, None], (by[:, :, None],
                                                  bw[:, :, None]),
          inner_lr=config.mer_inner_lr,
          within_batch_rate=config.mer_within_rate,
          across_batch_rate=config.mer_across_rate)
      return params, state
    return update

  if method == 'lamaml':
    def update(params, state, x, y, replay, fa_replay, key):
      del fa_replay, key
      rx, ry, rw = replay
      meta_x, meta_y = _concat((x, (y, ones(y))), (rx, (ry, rw)))
      out = metacf.maml.lamaml_update(
          weighted_loss, params, state, x[:, None], (y[:, None],
                                                     ones(y)[:, None]),
          meta_x, meta_y, lr_learning_rate=config.lamaml_lr_lr,
          max_grad_norm=config.lamaml_max_grad_norm,
          step_weights=(jnp.full((x.shape[0],), 1.0 / x.shape[0])
                        if config.lamaml_mean_over_steps else None))
      return out.params, out.inner_lr
    return update

  if method == 'oml':
    head = f'^{len(config.hidden)}/'

    def objective(params, x, y, replay):
      rx, ry, rw = replay
      query = _concat((x, (y, ones(y))), (rx, (ry, rw)))
      tasks = metacf.maml.Task(x[None, :, None], (y[None, :, None],
                                                  ones(y)[None, :, None]),
                               query[0][None],
                               jax.tree.map(lambda a: a[None], query[1]))
      return metacf.maml.maml_loss(
          weighted_loss, params, tasks, inner_lr=config.oml_inner_lr,
          num_inner_steps=x.shape[0], adapt_mask=head,
          sequential_support=True)

    def update(params, state, x, y, replay, fa_replay, key):
      del fa_replay, key
      grads = jax.grad(objective)(params, x, y, replay)
      return _sgd(params, grads, config.lr), state
    return update

  raise ValueError(f'unknown method {method!r}; expected one of {METHODS}.')


def init_state(method: str, params, config: OnlineConfig):
  if method == 'lamaml':
    return jax.tree.map(
        lambda p: jnp.full_like(p, config.lamaml_alpha_init), params)
  return ()


# ---------------------------------------------------------------------------
# One run: the stream of tasks, an evaluation after each.


def make_train_task(method: str, config: OnlineConfig):
  """A jitted pass over one task's stream: a scan over its batches."""
  update = make_update(method, config)
  buffer = metacf.replay.replay_buffer(config.memory_size)
  num_draws = config.mer_batches if method == 'mer' else 1

  def draw(key, buffer_state):
    sample = buffer.sample(key, buffer_state, config.replay_batch_size)
    items, valid = sample
    return (items['x'], items['y'], valid.astype(jnp.float32))

  def step(carry, batch):
    params, state, buffer_state, key = carry
    x, y = batch
    key, k_add = jax.random.split(key)
    for glance in range(config.glances):
      k_replay, k_fa, k_update = jax.random.split(
          jax.random.fold_in(key, glance), 3)
      if num_draws == 1:
        replay = draw(k_replay, buffer_state)
      else:
        replay = jax.vmap(draw, (0, None))(
            jax.random.split(k_replay, num_draws), buffer_state)
      fa_replay = draw(k_fa, buffer_state)
      params, state = update(params, state, x, y, replay, fa_replay,
                             k_update)
    buffer_state = buffer.add(k_add, buffer_state, {'x': x, 'y': y})
    return (params, state, buffer_state, key), None

  @jax.jit
  def train_task(params, state, buffer_state, key, xs, ys):
    (params, state, buffer_state, key), _ = jax.lax.scan(
        step, (params, state, buffer_state, key), (xs, ys))
    return params, state, buffer_state, key

  def init_buffer():
    return buffer.init({'x': jnp.zeros((pf_data.NUM_PIXELS,)),
                        'y': jnp.zeros((), jnp.int32)})

  return train_task, init_buffer


@jax.jit
def _accuracies(params, x_test, y_test):
  """Accuracy on every task, ``[T]``."""
  logits = jax.lax.map(lambda x: apply_fn(params, x), x_test)
  return jnp.mean(jnp.argmax(logits, -1) == y_test, axis=-1)


def run_one(benchmark: str, method: str, seed: int, config: OnlineConfig,
            data: pf_data.Benchmark) -> dict[str, Any]:
  """Accuracy matrix ``R[i, j]``: test accuracy on task j after task i."""
  key = utils.name_key(jax.random.key(seed), 'online', benchmark)
  params = init_params(utils.name_key(key, 'init'), config.hidden)
  state = init_state(method, params, config)
  train_task, init_buffer = make_train_task(method, config)
  buffer_state = init_buffer()
  run_key = utils.name_key(key, 'method', method)
  num_batches = config.num_train // config.batch_size
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  rows, compile_s, start = [], None, time.perf_counter()
  for t in range(config.num_tasks):
    order = utils.numpy_rng(utils.name_key(key, 'order', t)).permutation(
        config.num_train)[:num_batches * config.batch_size]
    xs = data.x_train[t][order].reshape(num_batches, config.batch_size, -1)
    ys = data.y_train[t][order].reshape(num_batches, config.batch_size)
    if t == 0:
      t0 = time.perf_counter()
      train_task.lower(params, state, buffer_state, run_key, xs, ys).compile()
      compile_s = time.perf_counter() - t0
    params, state, buffer_state, run_key = train_task(
        params, state, buffer_state, run_key, xs, ys)
    rows.append(np.asarray(_accuracies(params, x_test, y_test)))
  jax.block_until_ready(params)
  wall = time.perf_counter() - start
  r = np.stack(rows)
  final = r[-1]
  diag = np.diag(r)
  record = {
      'accuracy_matrix': r.tolist(),
      'acc': float(final.mean()),
      'bwt': float(np.mean(final[:-1] - diag[:-1])),
      'learning_accuracy': float(diag.mean()),
      'finite': bool(all(np.all(np.isfinite(np.asarray(l)))
                         for l in jax.tree.leaves(params))),
      'train_time_s': wall - compile_s,
      'compile_time_s': compile_s,
  }
  if method == 'lamaml':
    rates = np.concatenate([np.ravel(a) for a in jax.tree.leaves(state)])
    record['lamaml_rates'] = {'mean': float(rates.mean()),
                              'fraction_negative': float(np.mean(rates < 0))}
  return record


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
  """Mean of ``a - b`` over seeds and its 95% Student-t interval."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  mean = float(d.mean())
  if d.size < 2:
    return {'mean': mean, 'ci': None}
  half = float(scipy_stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) /
               np.sqrt(d.size))
  return {'mean': mean, 'ci': [mean - half, mean + half]}


def summarise(records: Mapping[tuple[str, str, int], Mapping[str, Any]],
              config: OnlineConfig) -> dict[str, Any]:
  """Per (benchmark, method): mean and std over seeds; beside ER (when run),
  the paired (same seed, same stream) differences of ACC and BWT."""
  table = {}
  for benchmark in config.benchmarks:
    for method in config.methods:
      cells = [records[(benchmark, method, s)] for s in config.seeds]
      row = {
          'acc': stats.mean_std([c['acc'] for c in cells]),
          'bwt': stats.mean_std([c['bwt'] for c in cells]),
          'learning_accuracy': stats.mean_std(
              [c['learning_accuracy'] for c in cells]),
          'train_time_s': stats.mean_std([c['train_time_s'] for c in cells]),
      }
      if 'er' in config.methods:
        er = [records[(benchmark, 'er', s)] for s in config.seeds]
        for metric in ('acc', 'bwt'):
          row[f'{metric}_minus_er'] = paired_difference(
              [c[metric] for c in cells], [c[metric] for c in er])
        row['time_ratio_to_er'] = float(
            np.mean([c['train_time_s'] for c in cells]) /
            np.mean([c['train_time_s'] for c in er]))
      table[f'{benchmark}/{method}'] = row
  return table


def _difference(cell: Mapping[str, Any] | None) -> str:
  if cell is None:
    return '-'
  if cell['ci'] is None:
    return f"{100 * cell['mean']:+.1f}"
  lo, hi = cell['ci']
  return f"{100 * cell['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def report(table: Mapping[str, Any], config: OnlineConfig) -> str:
  lines = ['| benchmark | method | ACC (%) | BWT (%) | LA (%) | '
           'ACC - ER [95% CI] | BWT - ER [95% CI] | train s/run (x ER) |',
           '|---|---|---|---|---|---|---|---|']
  for benchmark in config.benchmarks:
    for method in config.methods:
      cell = table[f'{benchmark}/{method}']
      ratio = (f" ({cell['time_ratio_to_er']:.1f}x)"
               if 'time_ratio_to_er' in cell else '')
      lines.append(
          f"| {benchmark} | {method} | {stats.pct(cell['acc'])} | "
          f"{stats.pct(cell['bwt'])} | {stats.pct(cell['learning_accuracy'])}"
          f" | {_difference(cell.get('acc_minus_er'))} | "
          f"{_difference(cell.get('bwt_minus_er'))} | "
          f"{cell['train_time_s']['mean']:.1f}{ratio} |")
  return '\n'.join(lines)


FIGURE = 'online_acc_bwt.png'


def plot(table: Mapping[str, Any], config: OnlineConfig, path: str) -> str:
  """ACC, BWT and LA per method and benchmark (mean and std over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metrics = (('acc', 'ACC (%)'), ('bwt', 'BWT (%)'),
             ('learning_accuracy', 'LA (%)'))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  width = 0.8 / len(config.benchmarks)
  positions = np.arange(len(config.methods))
  for ax, (metric, title) in zip(axes, metrics):
    for b, benchmark in enumerate(config.benchmarks):
      cells = [table[f'{benchmark}/{m}'][metric] for m in config.methods]
      ax.bar(positions + (b - (len(config.benchmarks) - 1) / 2) * width,
             [100 * c['mean'] for c in cells], width,
             yerr=[100 * c['std'] for c in cells], capsize=2,
             label=benchmark)
    ax.set_xticks(positions, config.methods, rotation=30)
    ax.axhline(0, color='k', lw=0.5)
    ax.set_title(title, fontsize=10)
  axes[0].legend(fontsize=8)
  fig.suptitle(f'Online continual learning, {config.num_tasks} MNIST tasks, '
               f'mean ± std over {len(config.seeds)} seeds', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def run(config: OnlineConfig, workdir: str, *, raw_dir: str | None = None,
        data_dir: str | None = None, progress_bar: bool = True
        ) -> dict[str, Any]:
  """Every (benchmark, method, seed) run; records in ``workdir/online``."""
  raw_dir = raw_dir if raw_dir is not None else os.environ.get(
      'METACF_RAW_DIR')
  splits = pf_data.load_mnist(raw_dir, data_dir, config.num_test)
  start = time.perf_counter()
  out_dir = os.path.join(workdir, SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  data_cache: dict[tuple[str, int], pf_data.Benchmark] = {}

  def data(benchmark, seed):
    if (benchmark, seed) not in data_cache:
      data_cache[(benchmark, seed)] = make_stream(benchmark, seed, config,
                                                  splits)
    return data_cache[(benchmark, seed)]

  items = [(b, m, s) for b in config.benchmarks for s in config.seeds
           for m in config.methods]
  for b in config.benchmarks:  # Built before the threads start.
    for s in config.seeds:
      data(b, s)
  recipe_fields = {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ('seeds', 'benchmarks', 'methods', 'workers')}
  records = loop.resumable_records(
      items,
      path=lambda item: os.path.join(out_dir, '{}_{}_seed{}.json'.format(
          *item)),
      recipe=lambda item: {'benchmark': item[0], 'method': item[1],
                           'seed': item[2], **recipe_fields},
      compute=lambda item: run_one(item[0], item[1], item[2], config,
                                   data(item[0], item[2])),
      summary=lambda r: f"ACC {100 * r['acc']:.1f} BWT {100 * r['bwt']:.1f}",
      desc='online', progress_bar=progress_bar, workers=config.workers)
  by_item = dict(zip(items, records))
  table = summarise(by_item, config)
  text = report(table, config)
  info = utils.run_info()
  results = {'table': table, 'report': text, 'run_info': info,
             'device': info['device'],
             'wall_time_s': time.perf_counter() - start,
             'config': dataclasses.asdict(config)}
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, 'online_report.md'), 'w') as f:
    f.write(text + '\n')
  plot(table, config, os.path.join(workdir, FIGURE))
  return results
