r"""Preventing forgetting on Permuted and Rotated MNIST with metacf.protect.

Ten tasks per benchmark, learnt one after the other by one MLP with a shared
ten-way head (domain-incremental):

* ``permuted``: task ``t`` permutes the 784 pixels by its own random
  permutation (task 0 too, as in Saha et al.'s and GEM's loaders);
* ``rotated``: task ``t`` rotates the digits by ``t * rotation_step``
  degrees (bilinear, zero fill; ``predict_forgetting._tasks.rotate``).

Strategies, all with the same model, SGD and batch order (per seed):
``naive`` SGD; ``ewc`` (one penalty per task, true Fisher) and
``online_ewc`` (one running Fisher, decayed by gamma);
``agem`` (episodic memory, reference gradient on a memory sample each
step); ``er`` (the same memory, replayed into each minibatch with
``metacf.replay.mix_replay``); ``ogd`` (ground-truth-logit gradients of
earlier tasks, ``extend_basis``, ``orthogonal_projection``); ``pca_ogd``
(their top principal directions per task); ``gpm`` (layer-wise input
spaces, ``gpm_basis``, ``gpm_projection``); ``joint`` (one model on the
union of all tasks, the multitask upper bound).

Each strategy's optimizer, ``optax.chain(<protection>, optax.sgd(lr))``, is
built once, and one jitted function per strategy runs all epochs of a task
as one ``lax.scan`` over minibatches. The protection keeps its arrays in
its optax state (EWC's ``anchor`` and ``fisher``, OGD's ``basis``, GPM's
``bases``: zeros of a fixed shape at first, bases padded with zero rows or
columns, which project nothing); after each task they are swapped in with
``optax.tree.set`` and the state goes back into the same compiled function,
with the replay state of A-GEM and ER, so it compiles once per strategy and
is reused for every task, benchmark and seed. Swapped bases are not
probed for orthonormality (``extend_basis`` and ``gpm_basis`` return
orthonormal rows and columns).

Then, for a few task pairs A -> B, forgetting under protection is predicted
(``metacf.jacobian.predicted_forgetting(..., protect_basis=V_k)``, V_k the
top-k rows of A's Jacobian SVD) and measured (B trained by full-batch
gradient descent through ``optax.chain(protect.orthogonal_projection(V_k),
optax.sgd(lr))``).

Every (benchmark, strategy, seed) run and every pair is one JSON record
(``experiments.common.loop.resumable_records``): a run started again reads
back what is done; every draw comes from keys folded from the seed and
names, so recomputed records are bitwise the same.

The code: ``data.py`` builds the benchmarks, ``steps.py`` the model, the
strategies' optimizers and jitted loops and the protected gradient descent
of the pairs, ``memories.py`` what each strategy keeps between tasks,
``report.py`` the summaries and tables, ``_plots.py`` the figures; this file
runs the strategies and the pairs and writes the results.
"""

from collections.abc import Mapping
import dataclasses
import os
import threading
import time
from typing import Any

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from experiments.common import batching
from experiments.common import loop
from experiments.common import utils
from experiments.prevent_forgetting import _plots
from experiments.prevent_forgetting import data as data_lib
from experiments.prevent_forgetting import memories
from experiments.prevent_forgetting import report
from experiments.prevent_forgetting import steps
from experiments.prevent_forgetting.configs import Config
from experiments.prevent_forgetting.configs import Pair
from experiments.prevent_forgetting.report import format_table  # For main.py.
import metacf.metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
Params = Any


# --------------------------------------------------------------------- runs


def run_strategy(config: Config, benchmark: str, data: data_lib.Benchmark,
                 strategy: str, seed: int) -> dict[str, Any]:
  """One continual-learning run: the accuracy matrix and its metrics."""
  start = time.perf_counter()
  root = jax.random.key(seed)
  params = steps.init_params(utils.name_key(root, 'init'), config.hidden)
  num_params = int(flatten_util.ravel_pytree(params)[0].shape[0])
  memory = memories.Memory(strategy, config, params)
  t_all = config.num_tasks
  if strategy == 'joint':
    x = jnp.asarray(data.x_train.reshape(-1, data_lib.NUM_PIXELS))
    y = jnp.asarray(data.y_train.reshape(-1))
    order = batching.epoch_indices(
        utils.name_key(root, 'order', benchmark, 'joint'), int(y.shape[0]),
        config.num_epochs, config.batch_size)
    params = memory.train(params, x, y, jnp.asarray(order),
                          utils.name_key(root, strategy, benchmark))
    final = steps.accuracies(params, data, config)
    return {'params_finite': steps.all_finite(params),
            'final_accuracies': final.tolist(), 'acc': float(np.mean(final)),
            'bwt': None, 'forgetting': None, 'accuracy_matrix': None,
            'num_params': num_params,
            'memory': {'floats': int(y.shape[0]) * (data_lib.NUM_PIXELS + 1),
                       'what': f'all {int(y.shape[0])} examples x 785'},
            'steps_per_call': int(order.shape[0]),
            'train_time_s': memory.train_times,
            'time_s': time.perf_counter() - start}
  matrix = np.zeros((t_all, t_all))
  finite = True
  for t in range(t_all):
    order = batching.epoch_indices(
        utils.name_key(root, 'order', benchmark, t),
        config.train_size(benchmark),
        config.num_epochs, config.batch_size)
    params = memory.train(params, jnp.asarray(data.x_train[t]),
                          jnp.asarray(data.y_train[t]), jnp.asarray(order),
                          utils.name_key(root, strategy, benchmark, t))
    matrix[t] = steps.accuracies(params, data, config)
    finite = finite and steps.all_finite(params)
    if t < t_all - 1:
      memory.remember(params, data.x_train[t], data.y_train[t], t,
                      utils.name_key(root, 'memory', strategy, benchmark, t))
  if not np.all(np.isfinite(matrix)):
    raise FloatingPointError(f'{benchmark}/{strategy}/seed{seed}: accuracy '
                             'matrix is not finite.')
  return {'accuracy_matrix': matrix.tolist(),
          'final_accuracies': matrix[-1].tolist(),
          'acc': float(metacf.metrics.average_accuracy(matrix)),
          'bwt': float(metacf.metrics.backward_transfer(matrix)),
          'forgetting': float(metacf.metrics.forgetting(matrix)),
          'num_params': num_params,
          'params_finite': finite,
          'memory': memory.floats(),
          'steps_per_call': int(order.shape[0]),
          'train_time_s': memory.train_times,
          'time_s': time.perf_counter() - start}


def run_pair(config: Config, pair: Pair,
             data: data_lib.Benchmark) -> dict[str, Any]:
  """Train A (the naive protocol), then predict and measure for each k."""
  start = time.perf_counter()
  root = jax.random.key(config.pair_seed)
  params = steps.init_params(utils.name_key(root, 'init'), config.hidden)
  order = batching.epoch_indices(utils.name_key(root, 'order', pair.name),
                                 config.train_size(pair.benchmark),
                                 config.num_epochs,
                                 config.batch_size)
  a, b = pair.task_a, pair.task_b
  params = memories.Memory('naive', config, params).train(
      params, jnp.asarray(data.x_train[a]), jnp.asarray(data.y_train[a]),
      jnp.asarray(order), utils.name_key(root, 'naive', pair.name))
  x_a = jnp.asarray(data.x_train[a][:config.jac_examples])
  y_a = jnp.asarray(data.y_train[a][:config.jac_examples])
  evals = {'jac': (x_a, y_a),
           'heldout': (jnp.asarray(data.x_test[a][:config.heldout_examples]),
                       jnp.asarray(data.y_test[a][:config.heldout_examples]))}
  task_b = (jnp.asarray(data.x_train[b][:config.b_examples]),
            jnp.asarray(data.y_train[b][:config.b_examples]))
  k_max = max(config.protect_ks)
  svd = steps.jacobian_svd(params, x_a, k_max) if k_max else None
  vt = None if svd is None else svd.vt
  per_k = {}
  for k in config.protect_ks:
    per_k[str(k)] = steps.forgetting_under_protection(
        steps.apply_fn, params, evals, task_b, vt, k=k, lr=config.b_lr,
        num_steps=config.b_steps)
  acc_a = float(steps.chunked_accuracies(
      params, data.x_test[a:a + 1], data.y_test[a:a + 1],
      min(config.eval_batch_size, config.num_test))[0])
  return {'name': pair.name, 'benchmark': pair.benchmark, 'task_a': a,
          'task_b': b, 'accuracy_a_test': acc_a, 'per_k': per_k,
          'singular_values': None if svd is None else np.asarray(
              svd.s).tolist(),
          'time_s': time.perf_counter() - start}


# ------------------------------------------------------------------ driver

# Relative time per step of each strategy (measured; orders parallel work).
_COST = {'gem': 8, 'gpm': 7, 'ogd': 6, 'pca_ogd': 6, 'agem': 5, 'mas': 2,
         'ewc': 2, 'joint': 1}


class _Lazy:
  """A value computed on first use, once, by any of several threads."""

  def __init__(self, make: Any):
    self._make, self._value, self._lock = make, None, threading.Lock()

  def __call__(self) -> Any:
    with self._lock:
      if self._value is None:
        self._value = self._make()
      return self._value



def _pair_summary(record: Mapping[str, Any]) -> str:
  k0 = next(iter(record['per_k'].values()))['jac']
  return (f'{record["name"]}: k=0 predicted {k0["predicted"]:.4f}, '
          f'measured {k0["measured"]:.4f}')


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Every (benchmark, strategy, seed) run and every pair; resumable.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the
      figures (``_plots.FIGURES``), ``runs/<benchmark>/<strategy>/seed<s>
      .json`` and ``pairs/<name>.json``.
    raw_dir: Raw dataset files (default ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir.

  Returns:
    The results written to ``results.json``.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  splits = data_lib.load_mnist(raw_dir, data_dir, config.num_test)
  fields = [f.name for f in dataclasses.fields(config)
            if f.name not in ('seeds', 'benchmarks', 'strategies', 'pairs',
                              'pair_seed', 'protect_ks', 'jac_examples',
                              'heldout_examples', 'b_examples', 'b_lr',
                              'b_steps', 'progress_bar')]
  base = {f: getattr(config, f) for f in fields}
  runs = {}
  for bench in config.benchmarks:
    for seed in config.seeds:  # One benchmark's data in memory at a time.
      data = _Lazy(lambda b=bench, s=seed: data_lib.make_benchmark(
          b, s, config, splits))
      # Longest runs first, so that parallel workers finish together.
      order = sorted(config.strategies, key=lambda st: -_COST.get(st, 0))
      records = loop.resumable_records(
          order,
          path=lambda st, b=bench, s=seed: os.path.join(
              workdir, 'runs', b, st, f'seed{s}.json'),
          recipe=lambda st, b=bench, s=seed: {**base, 'benchmark': b,
                                              'seed': s, 'strategy': st},
          compute=lambda st, b=bench, s=seed, d=data: run_strategy(
              config, b, d(), st, s),
          summary=lambda r: f'ACC {r["acc"]:.3f}',
          desc=f'{bench} seed {seed}', progress_bar=config.progress_bar,
          workers=config.workers)
      runs.update({(bench, st, seed): r for st, r in zip(order, records)})
      del data

  pair_data = {}

  def data_for(bench: str) -> data_lib.Benchmark:
    if bench not in pair_data:
      pair_data.clear()
      pair_data[bench] = data_lib.make_benchmark(bench, config.pair_seed,
                                                 config, splits)
    return pair_data[bench]

  pairs = loop.resumable_records(
      config.pairs,
      path=lambda p: os.path.join(workdir, 'pairs', f'{p.name}.json'),
      recipe=lambda p: {**base, 'pair': dataclasses.asdict(p),
                        **{k: getattr(config, k) for k in (
                            'pair_seed', 'protect_ks', 'jac_examples',
                            'heldout_examples', 'b_examples', 'b_lr',
                            'b_steps')}},
      compute=lambda p: run_pair(config, p, data_for(p.benchmark)),
      summary=_pair_summary,
      desc='pairs', progress_bar=config.progress_bar)

  results = {
      'experiment': 'prevent_forgetting',
      **utils.run_info(),
      'config': utils.jsonable(dataclasses.asdict(config)),
      'summary': report.summarize(config, runs),
      'runs': {f'{b}/{st}/seed{s}': r for (b, st, s), r in runs.items()},
      'pairs': pairs,
  }
  results['wall_time_s'] = time.perf_counter() - wall_start
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_all(results, workdir)
  return results
