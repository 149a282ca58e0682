"""Catastrophic forgetting on Split MNIST, and what replay and distillation do.

Class-incremental Split MNIST (Buzzega et al. 2020's Seq-MNIST): the ten
digits arrive as tasks of ``classes_per_task`` digits, one after the other,
and a single 10-way head must tell all digits seen so far apart. After each
task the network is tested on every task's test images, which fills the
accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training through
task ``i``), both class-incrementally (argmax over all ten logits) and
task-incrementally (argmax over the logits of the task's own classes). From
``R``: average accuracy, backward transfer and forgetting
(``metacf.metrics``).

Strategies (``configs.Strategy``): naive fine-tuning; joint training (the
same examples as one i.i.d. stream); experience replay with a reservoir
buffer (``metacf.replay.replay_buffer``); DER++ (the buffer also keeps the
network's logits); LwF (``metacf.distill.lwf_loss``); replay from a
class-balanced buffer (``metacf.replay.class_balanced_buffer``); and the
class-incremental baselines ER-ACE (``metacf.replay.ace_cross_entropy``) and
iCaRL (``metacf.replay.herding_selection`` for the exemplars, the nearest
mean of exemplars by ``metacf.maml.prototype_logits``). The seeds'
instructive example, ten one-digit tasks, shows naive fine-tuning ending up
with only the last digit, where the shuffled stream of the same data learns
all ten.

All seeds of a strategy train together (``jax.vmap``), a chunk of steps per
jitted call (``steps.make_train_chunk``). Every strategy is checkpointed
after every task; a run started again in the same ``workdir`` resumes where
it stopped and gives bitwise the same numbers, because every random draw
comes from keys folded from (seed, scenario, strategy, task, step) and every
batch order from (seed, scenario, task).

This module is the driver; the data and batch orders are in ``data.py``, the
jitted training chunks and evaluation in ``steps.py``, the summaries and
tables in ``report.py``, the figures in ``_plots.py``.
"""

from collections.abc import Callable, Mapping, Sequence
import concurrent.futures
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import loop
from experiments.common import utils
from experiments.forgetting import _plots
from experiments.forgetting import data
from experiments.forgetting import report
from experiments.forgetting import steps
from experiments.forgetting.configs import Config
from experiments.forgetting.configs import Scenario
from experiments.forgetting.configs import Strategy
from experiments.forgetting.report import format_table  # For main.py.

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'


def root_keys(seeds: Sequence[int]) -> jax.Array:
  """One PRNG key per seed, shape ``[S]`` (the experiment's only seeding)."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def select_strategies(config: Config, names: Sequence[str]) -> Config:
  """``config`` restricted to the strategies called ``names``.

  Scenarios left with no strategy are dropped.

  Raises:
    ValueError: if a name is not one of ``config.strategies``.
  """
  known = [s.name for s in config.strategies]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'select_strategies: unknown strategies {unknown}; '
                     f'choose from {known}.')
  scenarios = []
  for scenario in config.scenarios:
    kept = tuple(n for n in scenario.strategies if n in names)
    if kept:
      scenarios.append(dataclasses.replace(scenario, strategies=kept))
  return dataclasses.replace(config, scenarios=tuple(scenarios))


def warm_up(config: Config, scenario: Scenario, strategy: Strategy,
            train: Mapping[str, jax.Array], keys: jax.Array) -> None:
  """Compiles a strategy's jitted functions without training anything.

  Its state init and training chunk (called once with zero steps and the
  argument types of ``train_strategy``'s calls, so that those hit the jit
  caches) and, for iCaRL, every herding of ``steps.update_memory``.
  ``train_and_evaluate`` runs it in a background thread for the strategies
  to come while one trains: a training chunk keeps about one core busy, and
  the compiles (seconds each) use the other. The numbers do not change.
  """
  image = train['image'][0]
  shapes = jax.eval_shape(steps.make_init_params(config.widths), keys, image)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  state = jax.device_put(steps.make_init_state(strategy)(params, image),
                         jax.devices()[0])
  classes = data.task_classes(scenario)
  idx = np.zeros((len(config.seeds), config.eval_every, config.batch_size),
                 np.int32)
  train_chunk = steps.make_train_chunk(strategy, config.widths,
                                       config.batch_size)
  jax.block_until_ready(train_chunk(
      state, train['image'], train['label'], jnp.asarray(idx), jnp.int32(0),
      jnp.int32(0), utils.name_key(keys, 'warm-up'),
      jnp.asarray(classes[0]), jnp.asarray(classes[0])))
  if strategy.kind == 'icarl':
    steps.precompile_update_memory(np.asarray(train['label']),
                                   strategy.buffer_size, classes,
                                   len(config.seeds), config.widths)


def _tolist(x: jax.Array) -> list:
  # float32 -> Python float is exact, and JSON round-trips Python floats
  # exactly, so a resumed run's numbers are bitwise those of a fresh run.
  return np.asarray(x).tolist()


def train_strategy(config: Config, scenario: Scenario, strategy: Strategy,
                   train: Mapping[str, jax.Array], stream: data.Stream,
                   evaluator: steps.Evaluator, keys: jax.Array,
                   workdir: str, *,
                   on_task_end: Callable[[str, str, int], None] | None = None,
                   compiled: concurrent.futures.Future | None = None
                   ) -> dict[str, Any]:
  """Trains one strategy through all tasks, for all seeds; resumable.

  Args:
    config: Experiment config.
    scenario: The task split.
    strategy: The strategy.
    train: ``'image'`` uint8 ``[N, 28, 28, 1]`` and ``'label'`` int32 ``[N]``,
      on the device.
    stream: Batch indices (``data.make_stream``).
    evaluator: Test sets and evaluation.
    keys: Root keys ``[S]`` of the seeds.
    workdir: Checkpoints go to ``workdir/checkpoints/<scenario>/<strategy>``.
    on_task_end: Called as ``on_task_end(scenario, strategy, task)`` after
      each task's checkpoint is written (tests raise from it to simulate a
      kill).
    compiled: A ``warm_up`` of this strategy running in another thread;
      waited for before training (else both threads would compile).

  Returns:
    The raw record: accuracy matrix rows ``[T][S][T]`` (class- and
    task-incremental), the curve, mean losses per chunk and the train time;
    for iCaRL also the exemplars per class after each task, ``[T][S][10]``.

  Raises:
    ValueError: if the checkpoints were written by a different recipe.
  """
  num_tasks = len(stream.steps)
  classes = data.task_classes(scenario)
  chunk_len = config.eval_every
  num_seeds = len(config.seeds)
  example_image = train['image'][0]
  train_labels = np.asarray(train['label'])

  def init_state():
    # The same initial networks for every strategy and scenario.
    params = steps.make_init_params(config.widths)(
        utils.name_key(keys, 'init'), example_image)
    state = steps.make_init_state(strategy)(params, example_image)
    # Restored checkpoints are committed to a device; commit fresh states
    # too, so that both hit the same compiled functions (jit caches on it).
    return jax.device_put(state, jax.devices()[0])

  if compiled is not None:
    compiled.result()
  train_chunk = steps.make_train_chunk(strategy, config.widths,
                                       config.batch_size)
  recipe = utils.jsonable({
      'strategy': dataclasses.asdict(strategy), 'seeds': config.seeds,
      'classes_per_task': scenario.classes_per_task,
      'num_train': int(train['label'].shape[0]),
      'num_test': int(evaluator.full[1].shape[0]),
      'curve_test_size': int(evaluator.curve[1].shape[0]),
      'widths': config.widths, 'batch_size': config.batch_size,
      'epochs_per_task': config.epochs_per_task,
      'eval_every': config.eval_every,
      'curve_exemplars_per_class': config.curve_exemplars_per_class})
  meta = {'record': {'class_il_rows': [], 'task_il_rows': [], 'curve': [],
                     'losses': [], 'train_time_s': 0.0, 'tasks_done': 0}}
  if strategy.kind == 'icarl':
    meta['record']['exemplars_per_class'] = []

  session: dict[str, Any] = {}  # Not checkpointed (unlike meta).

  def curve_memory(state):
    # iCaRL's curve points classify with a prefix of each class's exemplars.
    if 'memory' not in state:
      return None
    return steps.memory_prefix(state['memory'],
                               config.curve_exemplars_per_class)

  def start_session(state):
    record = meta['record']
    session['curve_memory'] = curve_memory(state)
    if not record['curve']:  # A fresh run: the initial networks.
      point = evaluator.curve_point(state['params'], session['curve_memory'])
      record['curve'].append({'step': 0, 'task': 0,
                              'class_il': _tolist(point)})

  def train_task(state, t):
    record = meta['record']
    task_start = time.perf_counter()
    seen = jnp.asarray(classes[:t + 1].any(axis=0))
    old = jnp.asarray(classes[:t].any(axis=0))
    if strategy.kind in ('lwf', 'icarl') and t > 0:
      # The previous task's network, frozen: a copy, since params are
      # donated to (and updated in place by) the training chunks.
      state['old_params'] = jax.tree.map(jnp.copy, state['params'])
    steps_done = sum(stream.steps[:t])
    num_chunks = -(-stream.steps[t] // chunk_len)
    task_keys = utils.name_key(keys, 'train', scenario.name, strategy.name, t)
    for c in range(num_chunks):
      lo, hi = c * chunk_len, min((c + 1) * chunk_len, stream.steps[t])
      idx = np.zeros((num_seeds, chunk_len, config.batch_size), np.int32)
      idx[:, :hi - lo] = stream.idx[t][:, lo:hi]
      state, loss = train_chunk(state, train['image'], train['label'],
                                jnp.asarray(idx), jnp.int32(lo),
                                jnp.int32(hi - lo), task_keys, seen, old)
      if strategy.kind == 'icarl' and c == num_chunks - 1:
        # The task's exemplars are herded once it is learnt, so that its
        # last curve point and matrix row classify with them.
        state['memory'] = jax.device_put(
            steps.update_memory(state['memory'], state['params'],
                                train['image'], train_labels,
                                classes[:t].any(axis=0), classes[t],
                                config.widths),
            jax.devices()[0])
        record['exemplars_per_class'].append(
            [np.bincount(y[y >= 0], minlength=data.NUM_CLASSES).tolist()
             for y in np.asarray(state['memory']['y'])])
        session['curve_memory'] = curve_memory(state)
      point = evaluator.curve_point(state['params'], session['curve_memory'])
      record['curve'].append({'step': steps_done + hi, 'task': t,
                              'class_il': _tolist(point)})
      record['losses'].append(_tolist(loss))
    class_il, task_il = evaluator.matrix_rows(state['params'],
                                              state.get('memory'))
    record['class_il_rows'].append(_tolist(class_il))
    record['task_il_rows'].append(_tolist(task_il))
    record['tasks_done'] = t + 1
    record['train_time_s'] += time.perf_counter() - task_start
    mean_acc = float(np.mean(np.asarray(class_il)[:, :t + 1]))
    return state, f'class-IL accuracy on tasks seen {mean_acc:.4f}'

  def checkpointed(tasks_done):
    if on_task_end is not None:
      on_task_end(scenario.name, strategy.name, tasks_done - 1)

  _, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', scenario.name, strategy.name),
      name=f'{scenario.name}/{strategy.name}', unit='task', total=num_tasks,
      init=init_state, start=start_session, step=train_task, recipe=recipe,
      meta=meta, on_checkpoint=checkpointed,
      max_to_keep=config.checkpoint_max_to_keep,
      progress_bar=config.progress_bar)
  return meta['record']


def _run_scenarios(config: Config, train_np: Mapping[str, np.ndarray],
                   test_np: Mapping[str, np.ndarray],
                   train: Mapping[str, jax.Array], keys: jax.Array,
                   workdir: str,
                   on_task_end: Callable[[str, str, int], None] | None,
                   warm: Mapping[tuple[str, str], concurrent.futures.Future]
                   ) -> dict[str, Any]:
  """Trains every scenario's strategies in turn; their summaries by name."""
  scenarios: dict[str, Any] = {}
  for scenario in config.scenarios:
    evaluator = steps.Evaluator(config, scenario, test_np)
    streams: dict[bool, data.Stream] = {}
    strategies: dict[str, Any] = {}
    for strategy_name in scenario.strategies:
      strategy = config.strategy(strategy_name)
      joint = strategy.kind == 'joint'
      if joint not in streams:
        streams[joint] = data.make_stream(config, scenario, joint,
                                          train_np['label'], keys)
      record = train_strategy(config, scenario, strategy, train,
                              streams[joint], evaluator, keys, workdir,
                              on_task_end=on_task_end,
                              compiled=warm.get((scenario.name,
                                                 strategy_name)))
      strategies[strategy_name] = report.summarize(strategy, record,
                                                   streams[joint])
    scenarios[scenario.name] = {
        'classes_per_task': scenario.classes_per_task,
        'num_tasks': data.NUM_CLASSES // scenario.classes_per_task,
        'strategies': strategies,
    }
  return scenarios


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None,
                       on_task_end: Callable[[str, str, int], None] | None
                       = None) -> dict[str, Any]:
  """Runs every scenario and strategy of ``config``; resumes from ``workdir``.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the figures
      (``_plots.figure_names``) and ``checkpoints/``.
    raw_dir: Raw MNIST files (``metacf.data`` default: ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir (``metacf.data`` default).
    on_task_end: Called as ``on_task_end(scenario, strategy, task)`` after
      every task's checkpoint is written.

  Returns:
    The results written to ``results.json``: run info, config, and per
    scenario (``results['scenarios'][name]``) per strategy
    (``[...]['strategies'][name]``) the class- and task-incremental accuracy
    matrices (mean over seeds and per seed), ACC, BWT and both forgetting
    measures (mean, std and per seed), the accuracy-over-time curve and the
    train time.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  train_np, test_np = data.load_data(config, raw_dir=raw_dir,
                                     data_dir=data_dir)
  train = {k: jnp.asarray(v) for k, v in train_np.items()}
  keys = root_keys(config.seeds)

  # Compile the strategies to come in the background (see warm_up), except
  # those already finished in workdir (they are restored, not trained).
  pool = concurrent.futures.ThreadPoolExecutor(1)
  warm: dict[tuple[str, str], concurrent.futures.Future] = {}
  for scenario in config.scenarios:
    num_tasks = data.NUM_CLASSES // scenario.classes_per_task
    for name in scenario.strategies:
      if not os.path.isdir(os.path.join(workdir, 'checkpoints', scenario.name,
                                        name, str(num_tasks))):
        warm[scenario.name, name] = pool.submit(
            warm_up, config, scenario, config.strategy(name), train, keys)
  try:
    scenarios = _run_scenarios(config, train_np, test_np, train, keys,
                               workdir, on_task_end, warm)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)

  results = {
      'experiment': 'forgetting',
      **utils.run_info(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'num_train': int(train_np['label'].shape[0]),
      'num_test': int(test_np['label'].shape[0]),
      'scenarios': scenarios,
  }
  # Strategies restored from finished checkpoints report the time they took
  # when they ran; wall_time_s is this invocation's.
  results['train_time_s'] = sum(
      s['train_time_s'] for sc in scenarios.values()
      for s in sc['strategies'].values())
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  table = report.format_table(results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(table + '\n')
  _plots.plot_all(results, workdir)
  return results
