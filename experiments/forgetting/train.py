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
network's logits); LwF (``metacf.distill.lwf_loss``); and replay from a
class-balanced buffer (``metacf.replay.class_balanced_buffer``). The seeds'
instructive example, ten one-digit tasks, shows naive fine-tuning ending up
with only the last digit, where the shuffled stream of the same data learns
all ten.

All seeds of a strategy train together (``jax.vmap``), a chunk of steps per
jitted call (``_steps.make_train_chunk``). Every strategy is checkpointed
after every task; a run started again in the same ``workdir`` resumes where
it stopped and gives bitwise the same numbers, because every random draw
comes from keys folded from (seed, scenario, strategy, task, step) and every
batch order from (seed, scenario, task).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import loop
from experiments.common import utils
from experiments.forgetting import _plots
from experiments.forgetting import _steps
from experiments.forgetting.configs import Config
from experiments.forgetting.configs import Scenario
from experiments.forgetting.configs import Strategy
import metacf.metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
NUM_CLASSES = _steps.NUM_CLASSES

# Seq-MNIST accuracies (%) that Buzzega et al. 2020 report in their Table 2,
# as (class-IL, task-IL), keyed by our strategy names. Only numbers that we
# could check against a copy of the paper go here; see README.md.
PAPER_ACCURACY: dict[str, tuple[float, float]] = {}


class Stream(NamedTuple):
  """The batches of one scenario for every seed and task."""
  steps: list[int]        # [T]: steps of each task (the same for every seed)
  idx: list[np.ndarray]   # [T] of int32 [S, steps[t], B]: training indices


def root_keys(seeds: Sequence[int]) -> jax.Array:
  """One PRNG key per seed, shape ``[S]`` (the experiment's only seeding)."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def task_classes(scenario: Scenario) -> np.ndarray:
  """bool ``[T, 10]``: the digits of each task (in order 0..9).

  Raises:
    ValueError: if ``classes_per_task`` does not divide 10.
  """
  k = scenario.classes_per_task
  if k < 1 or NUM_CLASSES % k:
    raise ValueError(
        f'task_classes: classes_per_task must divide {NUM_CLASSES}, got {k}.')
  classes = np.arange(NUM_CLASSES)
  return (classes[None, :] // k) == np.arange(NUM_CLASSES // k)[:, None]


def make_stream(config: Config, scenario: Scenario, joint: bool,
                labels: np.ndarray, keys: jax.Array) -> Stream:
  """Batch indices of every task and seed.

  Sequential strategies see task ``t``'s examples, shuffled (one permutation
  per epoch), in batches of ``config.batch_size`` (the remainder dropped).
  ``joint`` sees all tasks' examples as one shuffled stream cut into
  ``T`` equal parts, so that its accuracy matrix is read at the same
  points. Orders depend on (seed, scenario, task) only: every sequential
  strategy sees the same batches.
  """
  b = config.batch_size
  num_tasks = NUM_CLASSES // scenario.classes_per_task
  example_task = labels // scenario.classes_per_task
  steps, idx = [], []
  if joint:
    rngs = [utils.numpy_rng(k) for k in
            utils.name_key(keys, 'data', scenario.name, 'joint')]
    orders = [np.concatenate([rng.permutation(len(labels))
                              for _ in range(config.epochs_per_task)])
              for rng in rngs]
    parts = [np.array_split(order, num_tasks) for order in orders]
    for t in range(num_tasks):
      n = (len(parts[0][t]) // b) * b
      steps.append(n // b)
      idx.append(np.stack([p[t][:n].reshape(-1, b) for p in parts]))
  else:
    for t in range(num_tasks):
      members = np.flatnonzero(example_task == t)
      rngs = [utils.numpy_rng(k) for k in
              utils.name_key(keys, 'data', scenario.name, t)]
      orders = [np.concatenate([members[rng.permutation(len(members))]
                                for _ in range(config.epochs_per_task)])
                for rng in rngs]
      n = (len(orders[0]) // b) * b
      steps.append(n // b)
      idx.append(np.stack([o[:n].reshape(-1, b) for o in orders]))
  if min(steps) < 1:
    raise ValueError(
        f'make_stream: every task needs at least batch_size={b} training '
        f'examples; got steps per task {steps} in {scenario.name}.')
  return Stream(steps, [i.astype(np.int32) for i in idx])


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Train and test ``{'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}``."""
  return utils.load_image_splits(config.dataset, num_train=config.num_train,
                                 num_test=config.num_test, raw_dir=raw_dir,
                                 data_dir=data_dir)


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


def _tolist(x: jax.Array) -> list:
  # float32 -> Python float is exact, and JSON round-trips Python floats
  # exactly, so a resumed run's numbers are bitwise those of a fresh run.
  return np.asarray(x).tolist()


class _Evaluator:
  """Test arrays of one scenario on the device, and the jitted evaluation."""

  def __init__(self, config: Config, scenario: Scenario,
               test: Mapping[str, np.ndarray]):
    classes = task_classes(scenario)
    self.num_tasks = classes.shape[0]
    # Padded to 10 tasks, so that every scenario shares one compiled
    # evaluation per test-set size.
    padded = np.zeros((NUM_CLASSES, NUM_CLASSES), bool)
    padded[:self.num_tasks] = classes
    self.task_classes = jnp.asarray(padded)
    labels = test['label']
    task_of = (labels // scenario.classes_per_task).astype(np.int32)
    self.full = (jnp.asarray(test['image']), jnp.asarray(labels),
                 jnp.asarray(task_of))
    n = config.curve_test_size
    self.curve = self.full if n is None else tuple(a[:n] for a in self.full)
    self._evaluate = _steps.make_evaluate(config.widths)

  def matrix_rows(self, params) -> tuple[jax.Array, jax.Array]:
    """``(class_il, task_il)`` accuracies on the whole test set, ``[S, T]``."""
    class_il, task_il = self._evaluate(params, *self.full, self.task_classes)
    return class_il[:, :self.num_tasks], task_il[:, :self.num_tasks]

  def curve_point(self, params) -> jax.Array:
    """Class-IL accuracies ``[S, T]`` on the curve subset of the test set."""
    class_il, _ = self._evaluate(params, *self.curve, self.task_classes)
    return class_il[:, :self.num_tasks]


def train_strategy(config: Config, scenario: Scenario, strategy: Strategy,
                   train: Mapping[str, jax.Array], stream: Stream,
                   evaluator: _Evaluator, keys: jax.Array, workdir: str, *,
                   on_task_end: Callable[[str, str, int], None] | None = None
                   ) -> dict[str, Any]:
  """Trains one strategy through all tasks, for all seeds; resumable.

  Args:
    config: Experiment config.
    scenario: The task split.
    strategy: The strategy.
    train: ``'image'`` uint8 ``[N, 28, 28, 1]`` and ``'label'`` int32 ``[N]``,
      on the device.
    stream: Batch indices (``make_stream``).
    evaluator: Test sets and evaluation.
    keys: Root keys ``[S]`` of the seeds.
    workdir: Checkpoints go to ``workdir/checkpoints/<scenario>/<strategy>``.
    on_task_end: Called as ``on_task_end(scenario, strategy, task)`` after
      each task's checkpoint is written (tests raise from it to simulate a
      kill).

  Returns:
    The raw record: accuracy matrix rows ``[T][S][T]`` (class- and
    task-incremental), the curve, mean losses per chunk and the train time.

  Raises:
    ValueError: if the checkpoints were written by a different recipe.
  """
  num_tasks = len(stream.steps)
  classes = task_classes(scenario)
  chunk_len = config.eval_every
  num_seeds = len(config.seeds)
  example_image = train['image'][0]

  def init_state():
    # The same initial networks for every strategy and scenario.
    params = _steps.make_init_params(config.widths)(
        utils.name_key(keys, 'init'), example_image)
    state = _steps.make_init_state(strategy)(params, example_image)
    # Restored checkpoints are committed to a device; commit fresh states
    # too, so that both hit the same compiled functions (jit caches on it).
    return jax.device_put(state, jax.devices()[0])

  train_chunk = _steps.make_train_chunk(strategy, config.widths,
                                        config.batch_size)
  recipe = utils.jsonable({
      'strategy': dataclasses.asdict(strategy), 'seeds': config.seeds,
      'classes_per_task': scenario.classes_per_task,
      'num_train': int(train['label'].shape[0]),
      'num_test': int(evaluator.full[1].shape[0]),
      'curve_test_size': int(evaluator.curve[1].shape[0]),
      'widths': config.widths, 'batch_size': config.batch_size,
      'epochs_per_task': config.epochs_per_task,
      'eval_every': config.eval_every})
  meta = {'record': {'class_il_rows': [], 'task_il_rows': [], 'curve': [],
                     'losses': [], 'train_time_s': 0.0, 'tasks_done': 0}}

  def start_session(state):
    record = meta['record']
    if not record['curve']:  # A fresh run: the initial networks.
      point = evaluator.curve_point(state['params'])
      record['curve'].append({'step': 0, 'task': 0,
                              'class_il': _tolist(point)})

  def train_task(state, t):
    record = meta['record']
    task_start = time.perf_counter()
    seen = jnp.asarray(classes[:t + 1].any(axis=0))
    old = jnp.asarray(classes[:t].any(axis=0))
    if strategy.kind == 'lwf' and t > 0:
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
      point = evaluator.curve_point(state['params'])
      record['curve'].append({'step': steps_done + hi, 'task': t,
                              'class_il': _tolist(point)})
      record['losses'].append(_tolist(loss))
    class_il, task_il = evaluator.matrix_rows(state['params'])
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


def _metrics(matrices: np.ndarray) -> dict[str, Any]:
  """ACC, BWT and forgetting per seed, and their mean and std over seeds.

  Args:
    matrices: ``[S, T, T]`` accuracy matrices.
  """
  per_seed: dict[str, list[float]] = {
      'acc': [], 'bwt': [], 'forgetting_max': [], 'forgetting_diagonal': []}
  for r in matrices:
    per_seed['acc'].append(float(metacf.metrics.average_accuracy(r)))
    per_seed['bwt'].append(float(metacf.metrics.backward_transfer(r)))
    per_seed['forgetting_max'].append(
        float(metacf.metrics.forgetting(r, reference='max')))
    per_seed['forgetting_diagonal'].append(
        float(metacf.metrics.forgetting(r, reference='diagonal')))
  out: dict[str, Any] = {
      'accuracy_matrix': np.mean(matrices, axis=0).tolist(),
      'accuracy_matrix_per_seed': matrices.tolist(),
  }
  for k, v in per_seed.items():
    out[k] = float(np.mean(v))
    out[f'{k}_std'] = float(np.std(v))
    out[f'{k}_per_seed'] = v
  return out


def summarize(strategy: Strategy, record: Mapping[str, Any],
              stream: Stream) -> dict[str, Any]:
  """The results of one strategy from its raw record."""
  # rows [T][S][T] -> [S, T, T]
  class_il = np.transpose(np.asarray(record['class_il_rows']), (1, 0, 2))
  task_il = np.transpose(np.asarray(record['task_il_rows']), (1, 0, 2))
  curve = record['curve']
  paper = PAPER_ACCURACY.get(strategy.name)
  return {
      'strategy': dataclasses.asdict(strategy),
      'class_il': _metrics(class_il),
      'task_il': _metrics(task_il),
      'curve': {
          'step': [p['step'] for p in curve],
          'task': [p['task'] for p in curve],
          # mean over seeds, [num_points][T]
          'class_il': np.mean(np.asarray([p['class_il'] for p in curve]),
                              axis=1).tolist(),
      },
      'task_boundaries': np.cumsum(stream.steps).tolist(),
      'mean_loss_per_chunk': np.mean(np.asarray(record['losses']),
                                     axis=1).tolist(),
      'train_time_s': record['train_time_s'],
      'paper_class_il': None if paper is None else paper[0] / 100,
      'paper_task_il': None if paper is None else paper[1] / 100,
  }


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
  train_np, test_np = load_data(config, raw_dir=raw_dir, data_dir=data_dir)
  train = {k: jnp.asarray(v) for k, v in train_np.items()}
  keys = root_keys(config.seeds)

  scenarios: dict[str, Any] = {}
  for scenario in config.scenarios:
    evaluator = _Evaluator(config, scenario, test_np)
    streams: dict[bool, Stream] = {}
    strategies: dict[str, Any] = {}
    for strategy_name in scenario.strategies:
      strategy = config.strategy(strategy_name)
      joint = strategy.kind == 'joint'
      if joint not in streams:
        streams[joint] = make_stream(config, scenario, joint,
                                     train_np['label'], keys)
      record = train_strategy(config, scenario, strategy, train,
                              streams[joint], evaluator, keys, workdir,
                              on_task_end=on_task_end)
      strategies[strategy_name] = summarize(strategy, record, streams[joint])
    scenarios[scenario.name] = {
        'classes_per_task': scenario.classes_per_task,
        'num_tasks': NUM_CLASSES // scenario.classes_per_task,
        'strategies': strategies,
    }

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
  table = format_table(results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(table + '\n')
  _plots.plot_all(results, workdir)
  return results


def _pct(mean: float, std: float | None = None) -> str:
  if std is None:
    return f'{100 * mean:.2f}'
  return f'{100 * mean:.2f} ± {100 * std:.2f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown tables, one per scenario: ACC / BWT / forgetting per strategy.

  Accuracies in %, mean ± std over seeds. Forgetting is given with both
  references (``metacf.metrics.forgetting``): ``max`` (the best accuracy
  ever reached on the task, Chaudhry et al. 2018, as in mammoth) and
  ``diag`` (the accuracy right after learning it, as in Avalanche).
  """
  num_seeds = len(results['config']['seeds'])
  lines = []
  for scenario_name, scenario in results['scenarios'].items():
    single = scenario['classes_per_task'] == 1
    lines.append(f'### {scenario_name}: {scenario["num_tasks"]} tasks of '
                 f'{scenario["classes_per_task"]} digit'
                 f'{"" if single else "s"} ({num_seeds} seed'
                 f'{"" if num_seeds == 1 else "s"}, accuracies in %)')
    lines.append('')
    strategies = scenario['strategies']
    # Only columns with numbers: task-IL is trivially 100% with one class
    # per task, and the paper's numbers are shown once there are any.
    paper = not single and any(s['paper_class_il'] is not None
                               for s in strategies.values())
    header = ['strategy', 'class-IL ACC', 'BWT', 'forgetting (max)',
              'forgetting (diag)']
    if not single:
      header += ['task-IL ACC', 'task-IL forgetting (max)']
    if paper:
      header += ['DER paper class-IL', 'DER paper task-IL']
    header += ['train s']
    lines.append('| ' + ' | '.join(header) + ' |')
    lines.append('|' + '---|' + '---:|' * (len(header) - 1))
    for name, s in strategies.items():
      c, ti = s['class_il'], s['task_il']
      row = [name, _pct(c['acc'], c['acc_std']), _pct(c['bwt'], c['bwt_std']),
             _pct(c['forgetting_max'], c['forgetting_max_std']),
             _pct(c['forgetting_diagonal'], c['forgetting_diagonal_std'])]
      if not single:
        row += [_pct(ti['acc'], ti['acc_std']),
                _pct(ti['forgetting_max'], ti['forgetting_max_std'])]
      if paper:
        for key in ('paper_class_il', 'paper_task_il'):
          row.append('-' if s[key] is None else _pct(s[key]))
      row.append(f'{s["train_time_s"]:.0f}')
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  return '\n'.join(lines).rstrip()
