r"""Does LwF protect task A only where task B's inputs observe it?

A ReLU MLP body with one linear head per task is trained on task A, real
MNIST (ten digits). Then, for each task B of ``config.tasks`` (Fashion-MNIST,
MNIST rotated by 30/90/180 degrees, permuted MNIST, Omniglot alphabets,
uniform-noise images with random labels), B is learnt from A's model in two
ways, from the same warm-up, the same new head and the same batches:

* ``finetune``: naive fine-tuning: B's head and the shared body trained with
  B's cross-entropy, A's head untouched, no distillation;
* ``lwf``: Learning without Forgetting (Li & Hoiem 2017): the body and both
  heads trained with B's cross-entropy plus the distillation of A's head's
  outputs on B's inputs towards the outputs the A model gave on those inputs
  before B (``metacf.distill.lwf_loss``, T = 2, weight 1); no A data.

Measured: A's test accuracy after each (retention = after / before), B's
accuracy, and how far A's outputs on B's inputs moved. Before training B, the
*observability of A by B* compares A's Jacobian on A's inputs with A's
Jacobian on B's inputs, both of A's centred head outputs with respect to the
shared body (``metacf.jacobian.jacobian_svd``):

* ``observability``: the fraction of the energy of A's top-``k_a`` Jacobian
  subspace that lies in B's top-``k_b`` subspace,
  :math:`\sum_i s_{a,i}^2 \lVert V_b v_{a,i} \rVert^2 / \sum_i s_{a,i}^2`;
* ``weighted_overlap``: ``metacf.jacobian.weighted_subspace_overlap``;
* ``excitation_share``: how strongly B's inputs excite A's top directions
  relative to A's own inputs, per example, :math:`\sum_i w_i
  \rho_i / (1 + \rho_i)` with :math:`\rho_i = (\lVert J_b v_{a,i} \rVert^2 /
  N_b) / (\lVert J_a v_{a,i} \rVert^2 / N_a)` (no truncation of B).

The A model is an orbax checkpoint per epoch (``workdir/checkpoints/a``);
each task's observability (``workdir/observability/<task>.json``) and each
(task, seed) run (``workdir/runs/<task>/seed<s>.json``) is one JSON record,
through ``experiments.common.loop``: a run started again resumes and, every
draw coming from keys folded from the seed and names, gives bitwise the same
numbers.

The code: ``data.py`` builds the tasks, ``steps.py`` the model and its
jitted training and evaluation, ``observability.py`` the observability
measures, ``report.py`` the summaries, correlations and table, ``_plots.py``
the figure; this file trains A, learns every B and writes the results.
"""

import dataclasses
import os
import time
from typing import Any

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from experiments.common import batching
from experiments.common import loop
from experiments.common import utils
from experiments.lwf_observability import _plots
from experiments.lwf_observability import data
from experiments.lwf_observability import observability
from experiments.lwf_observability import report
from experiments.lwf_observability import steps
from experiments.lwf_observability.configs import Config
from experiments.lwf_observability.configs import TaskB
from experiments.lwf_observability.report import format_table  # For main.py.
import metacf.metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'

Params = Any


def train_a(config: Config, a: data.TaskData,
            workdir: str) -> tuple[Params, dict[str, Any]]:
  """A's MLP trained with Adam on MNIST; orbax checkpoint per epoch."""
  num = int(a.y_train.shape[0])
  steps_per_epoch = utils.num_batches(num, config.a_batch_size)
  init_fn, epoch_fn = steps.a_fns(tuple(config.widths), config.a_lr,
                                  steps_per_epoch * config.a_epochs)
  key = utils.name_key(jax.random.key(config.seed), 'a')
  device = jax.devices()[0]

  def init():
    return jax.device_put(init_fn(utils.name_key(key, 'init')), device)

  meta: dict[str, Any] = {'history': [], 'train_time_s': 0.0}

  def step(state, epoch):
    start = time.perf_counter()
    rng = utils.numpy_rng(utils.name_key(key, 'epoch', epoch))
    order = rng.permutation(num)[:steps_per_epoch * config.a_batch_size]
    idx = jnp.asarray(order.reshape(steps_per_epoch, -1).astype(np.int32))
    state, loss = epoch_fn(state, a.x_train, a.y_train, idx)
    loss = float(loss)
    meta['history'].append({'epoch': epoch + 1, 'train_loss': loss})
    meta['train_time_s'] += time.perf_counter() - start
    return state, f'loss {loss:.4f}'

  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', 'a'), name='task A (MNIST)',
      unit='epoch', total=config.a_epochs, init=init, step=step,
      recipe=a_recipe(config), meta=meta, progress_bar=config.progress_bar)
  return jax.device_put(state['params'], device), meta


def a_recipe(config: Config) -> dict[str, Any]:
  """Everything that changes A's model."""
  return {'seed': config.seed, 'widths': list(config.widths),
          'num_train_a': config.num_train_a, 'epochs': config.a_epochs,
          'batch_size': config.a_batch_size, 'lr': config.a_lr}


class Runner:
  """Learns each task B from A's model, by fine-tuning and by LwF."""

  def __init__(self, config: Config, body: Params, head_a: Params,
               a: data.TaskData):
    self.config = config
    self.body, self.head_a, self.a = body, head_a, a
    self.a_before = steps.accuracy(body, head_a, a.x_test, a.y_test,
                                   config.eval_batch_size)

  def _adapt(self, phase: str, params: Params, recorded: jax.Array,
             b: data.TaskData, idx: jax.Array) -> tuple[Params, np.ndarray]:
    c = self.config
    fn = steps.adapt_fn('lwf' if phase == 'lwf' else 'ce',
                        steps.TRAINABLE[phase], c.b_lr, c.momentum,
                        c.temperature, c.old_weight)
    params, losses = fn(params, recorded, b.x_train, b.y_train, idx)
    return params, np.asarray(jax.block_until_ready(losses))

  def run(self, task: TaskB, b: data.TaskData, seed: int) -> dict[str, Any]:
    """One (task, seed): warm-up, then fine-tuning and LwF; its record."""
    c = self.config
    key = utils.name_key(jax.random.key(c.seed), 'b_run', task.name, seed)
    head_b = steps.head_init_fn(tuple(c.widths))(utils.name_key(key, 'head_b'))
    params = jax.device_put({'body': self.body, 'head_a': self.head_a,
                             'head_b': head_b}, jax.devices()[0])
    num = int(b.y_train.shape[0])
    chunk = c.eval_batch_size
    # A's head on B's inputs before any training on B: the recorded
    # outputs of LwF (the warm-up changes neither the body nor A's head).
    recorded = steps.predict_logits(self.body, self.head_a, b.x_train, chunk)
    record: dict[str, Any] = {'a_before': self.a_before}
    start = time.perf_counter()
    if c.warmup_steps:
      idx = jnp.asarray(batching.shuffled_indices(
          num, c.warmup_steps, c.b_batch_size,
          utils.name_key(key, 'warmup_batches')))
      params, losses = self._adapt('warmup', params, recorded, b, idx)
      record['warmup_final_loss'] = float(losses[-1])
    record['b_warmup_accuracy'] = steps.accuracy(
        params['body'], params['head_b'], b.x_test, b.y_test, chunk)
    record['warmup_time_s'] = time.perf_counter() - start
    idx = jnp.asarray(batching.shuffled_indices(
        num, c.b_steps, c.b_batch_size, utils.name_key(key, 'batches')))
    for method in steps.METHODS:
      start = time.perf_counter()
      adapted, losses = self._adapt(method, params, recorded, b, idx)
      train_s = time.perf_counter() - start
      a_after = steps.accuracy(adapted['body'], adapted['head_a'],
                               self.a.x_test, self.a.y_test, chunk)
      b_after = steps.accuracy(adapted['body'], adapted['head_b'], b.x_test,
                               b.y_test, chunk)
      matrix = jnp.asarray([[self.a_before, record['b_warmup_accuracy']],
                            [a_after, b_after]], jnp.float32)
      current = steps.predict_logits(adapted['body'], adapted['head_a'],
                                     b.x_train, chunk)
      record[method] = {
          'a_accuracy': a_after,
          'retention': a_after / self.a_before,
          'backward_transfer': float(metacf.metrics.backward_transfer(
              matrix)),
          'b_test_accuracy': b_after,
          'b_train_accuracy': steps.accuracy(adapted['body'], adapted['head_b'],
                                             b.x_train, b.y_train, chunk),
          'a_on_b_kl': float(steps.kl_a_on_b(recorded, current)),
          'first_loss': float(losses[0]),
          'final_loss': float(np.mean(losses[-max(1, c.b_steps // 10):])),
          'head_a_unchanged': all(jax.tree.leaves(jax.tree.map(
              lambda u, v: bool(np.array_equal(u, v)), adapted['head_a'],
              self.head_a))),
          'train_time_s': train_s,
      }
    return record


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Trains A (cached), measures observability, learns every B; resumable.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the figure
      (``_plots.FIGURE``), ``checkpoints/a/``, ``observability/`` and
      ``runs/`` (one JSON record each).
    raw_dir: Raw dataset files (default ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir.

  Returns:
    The results written to ``results.json``.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  a, tasks = data.load_data(config, raw_dir=raw_dir, data_dir=data_dir)
  params, a_meta = train_a(config, a, workdir)
  body, head_a = steps.split_mlp(params, len(config.widths))
  observer = observability.Observer(config, body, head_a, a)
  runner = Runner(config, body, head_a, a)
  base = {'a': a_recipe(config), 'num_test_a': int(a.y_test.shape[0]),
          'num_train_b': config.num_train_b, 'num_test_b': config.num_test_b}

  observed = loop.resumable_records(
      config.tasks,
      path=lambda t: os.path.join(workdir, 'observability', f'{t.name}.json'),
      recipe=lambda t: {**base, 'task': dataclasses.asdict(t),
                        **{k: getattr(config, k) for k in (
                            'k_a', 'k_b', 'num_jac_a', 'num_jac_b',
                            'svd_method', 'oversampling',
                            'num_power_iters')}},
      compute=lambda t: observer.observe(t, tasks[t.name]),
      summary=lambda r: f'observability {r["observability"]:.3f}',
      desc='observability', progress_bar=config.progress_bar)

  items = [(t, s) for t in config.tasks for s in config.seeds]
  run_list = loop.resumable_records(
      items,
      path=lambda item: os.path.join(workdir, 'runs', item[0].name,
                                     f'seed{item[1]}.json'),
      recipe=lambda item: {**base, 'task': dataclasses.asdict(item[0]),
                           'seed': item[1], **{k: getattr(config, k) for k in (
                               'warmup_steps', 'b_steps', 'b_batch_size',
                               'b_lr', 'momentum', 'temperature',
                               'old_weight')}},
      compute=lambda item: runner.run(item[0], tasks[item[0].name], item[1]),
      summary=lambda r: (f'A retained: finetune '
                         f'{r["finetune"]["retention"]:.3f}, lwf '
                         f'{r["lwf"]["retention"]:.3f}'),
      desc='B runs', progress_bar=config.progress_bar)
  runs = {(t.name, s): r for (t, s), r in zip(items, run_list)}

  summary = {t.name: report.summarize(config, t, o,
                                      [runs[t.name, s] for s in config.seeds])
             for t, o in zip(config.tasks, observed)}
  results = {
      'experiment': 'lwf_observability',
      **utils.run_info(),
      'config': utils.jsonable(dataclasses.asdict(config)),
      'a': {'history': a_meta['history'],
            'train_time_s': a_meta['train_time_s'],
            'test_accuracy': runner.a_before,
            'num_train': int(a.y_train.shape[0]),
            'num_test': int(a.y_test.shape[0]),
            'num_params_body': int(flatten_util.ravel_pytree(body)[0].size)},
      'tasks': summary,
      'runs': {f'{t}/seed{s}': r for (t, s), r in runs.items()},
      'correlation': report.correlation(summary),
  }
  results['wall_time_s'] = time.perf_counter() - wall_start
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_retention(results, os.path.join(workdir, _plots.FIGURE))
  return results
