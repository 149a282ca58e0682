"""Few-shot sinusoid regression: MAML against a pretrained network.

Reproduces section 5.1 of Finn, Abbeel & Levine 2017
(https://arxiv.org/abs/1703.03400). A task is a sinusoid
``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``phi ~ U[0, pi]``, observed at ``x ~ U[-5, 5]``. For each K in
``config.shots``:

1. ``maml_K{K}``: an MLP 1-40-40-1 (ReLU) meta-trained with
   ``metacf.maml.make_meta_train_step``: K support and K query points per
   task, one inner SGD step of size ``inner_lr``, meta-batches of 25 tasks,
   Adam.
2. ``pretrained_K{K}`` (the paper's baseline): the same MLP trained with Adam
   to regress on all tasks jointly (the same 25 tasks x 2K points an
   iteration), then fine-tuned at test time like MAML's network. The paper
   fine-tunes it "using an automatically tuned step size": we pick the step
   size with the lowest MSE after ``max_eval_steps`` steps on validation
   tasks, and also report it at MAML's ``inner_lr``.

Both are evaluated on the same fresh test tasks: K support points to adapt
on (0 to ``max_eval_steps`` SGD steps), ``num_eval_points`` query points to
score on. The published reference is the MAML row of Li et al. 2017
(Meta-SGD), Table 1: MSE after one adaptation step (see ``PAPER``).

Training runs ``chunk_size`` iterations per jitted call (``lax.scan``); the
tasks of iteration ``i`` are drawn inside it from
``fold_in(run_key, i)``, so no data crosses from the host. Every run is
checkpointed every ``checkpoint_every`` iterations; a run started again in
the same ``workdir`` resumes where it stopped and gives bitwise the same
numbers.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import optax

from experiments.common import loop
from experiments.common import utils
from experiments.maml_sinusoid.configs import Config
from metacf import maml

# MSE of MAML after one gradient step at test time, as published.
PAPER = {
    'source': ('Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn '
               'Quickly for Few-Shot Learning", arXiv:1707.09835, Table 1, '
               'row MAML (the MAML paper itself reports these curves only as '
               'figures)'),
    'metric': 'MSE after 1 test-time gradient step',
    'maml_mse_1_step': {5: 1.13, 10: 0.77, 20: 0.48},
}
RESULTS_JSON = 'results.json'
RESULTS_PNG = 'results.png'
FITS_PNG = 'fits.png'
KINDS = ('maml', 'pretrained')

Params = Any
logger = logging.getLogger(__name__)


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState


class SinusoidTasks(NamedTuple):
  """A batch of sinusoid tasks and the functions they sample."""
  tasks: maml.Task       # fields [num_tasks, num_points, 1], float32
  amplitude: jax.Array   # [num_tasks], float32
  phase: jax.Array       # [num_tasks], float32


# ------------------------------------------------------------------ model


def init_mlp(key: jax.Array, widths: Sequence[int], stddev: float) -> Params:
  """An MLP ``1 -> widths -> 1`` as a list of ``{'w', 'b'}`` layers.

  Weights are truncated normal (cut at 2 standard deviations) with standard
  deviation ``stddev``, biases zero: ``construct_fc_weights`` of the
  authors' code (``tf.truncated_normal(..., stddev=0.01)``).
  """
  sizes = (1, *widths, 1)
  keys = jax.random.split(key, len(sizes) - 1)
  return [{'w': stddev * jax.random.truncated_normal(k, -2.0, 2.0, (m, n)),
           'b': jnp.zeros([n], jnp.float32)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def apply_mlp(params: Params, x: jax.typing.ArrayLike) -> jax.Array:
  """``[num_points, 1] -> [num_points, 1]``, ReLU between the layers."""
  h = jnp.asarray(x)
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer['w'] + layer['b'][None, :])
  return h @ params[-1]['w'] + params[-1]['b'][None, :]


def mse_loss(params: Params, x: jax.typing.ArrayLike,
             y: jax.typing.ArrayLike) -> jax.Array:
  """Mean squared error of the MLP on one task's points."""
  return jnp.mean((apply_mlp(params, x) - y) ** 2)


# ------------------------------------------------------------------ tasks


def sample_tasks(key: jax.Array, num_tasks: int, num_support: int,
                 num_query: int, config: Config) -> SinusoidTasks:
  """Draws sinusoid tasks and their support and query points.

  The amplitudes and phases depend only on ``key`` and ``num_tasks``, so
  the same key gives the same functions for every K.

  Args:
    key: PRNG key.
    num_tasks: Number of tasks (static).
    num_support: Support points per task (static).
    num_query: Query points per task (static).
    config: Gives the amplitude, phase and input ranges.
  """
  key_amp, key_phase, key_support, key_query = jax.random.split(key, 4)
  amplitude = jax.random.uniform(key_amp, (num_tasks,), jnp.float32,
                                 *config.amplitude_range)
  phase = jax.random.uniform(key_phase, (num_tasks,), jnp.float32,
                             *config.phase_range)

  def points(k, n):
    x = jax.random.uniform(k, (num_tasks, n, 1), jnp.float32,
                           *config.input_range)
    return x, sinusoid(x, amplitude[:, None, None], phase[:, None, None])

  support_x, support_y = points(key_support, num_support)
  query_x, query_y = points(key_query, num_query)
  return SinusoidTasks(maml.Task(support_x, support_y, query_x, query_y),
                       amplitude, phase)


def sinusoid(x: jax.typing.ArrayLike, amplitude: jax.typing.ArrayLike,
             phase: jax.typing.ArrayLike) -> jax.Array:
  """``amplitude * sin(x - phase)``, as ``generate_sinusoid_batch``."""
  return amplitude * jnp.sin(jnp.asarray(x) - phase)


# --------------------------------------------------------------- training


def make_optimizer(config: Config) -> optax.GradientTransformation:
  return optax.adam(config.outer_lr)


def make_train_chunk(kind: str, config: Config, shots: int):
  """Returns ``chunk(state, key, first_iteration) -> (state, losses)``.

  Runs ``config.chunk_size`` iterations in a ``lax.scan``; iteration ``i``
  trains on ``meta_batch_size`` tasks drawn from ``fold_in(key, i)``.
  ``losses`` (float32 ``[chunk_size]``) is MAML's meta-loss (the query MSE
  after adaptation, before the update) or the pretrained network's MSE.
  Not jitted: see ``compile_train_chunk``.

  Args:
    kind: ``'maml'`` or ``'pretrained'``.
    config: Experiment config.
    shots: K, the support (and query) points per training task.
  """
  optimizer = make_optimizer(config)
  if kind == 'maml':
    meta_step = maml.make_meta_train_step(
        mse_loss, optimizer, inner_lr=config.inner_lr,
        num_inner_steps=config.num_inner_steps, donate=False)

    def step(state, tasks):
      params, opt_state, metrics = meta_step(state.params, state.opt_state,
                                             tasks)
      return TrainState(params, opt_state), metrics.loss
  elif kind == 'pretrained':

    def step(state, tasks):
      # All points of all tasks, support and query: the data MAML sees.
      x = jnp.concatenate([tasks.support_x, tasks.query_x], 1).reshape(-1, 1)
      y = jnp.concatenate([tasks.support_y, tasks.query_y], 1).reshape(-1, 1)
      loss, grads = jax.value_and_grad(mse_loss)(state.params, x, y)
      updates, opt_state = utils.optimizer_update(
          optimizer, grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates),
                        opt_state), loss
  else:
    raise ValueError(f'make_train_chunk: kind must be one of {KINDS}, got '
                     f'{kind!r}.')

  def chunk(state, key, first_iteration):
    def body(state, iteration):
      tasks = sample_tasks(jax.random.fold_in(key, iteration),
                           config.meta_batch_size, shots, shots, config).tasks
      return step(state, tasks)

    iterations = first_iteration + jnp.arange(config.chunk_size,
                                              dtype=jnp.int32)
    return jax.lax.scan(body, state, iterations)

  return chunk


def _init_state(key: jax.Array, config: Config) -> TrainState:
  params = init_mlp(key, config.hidden_widths, config.init_stddev)
  return TrainState(params, make_optimizer(config).init(params))


@functools.cache
def compile_train_chunk(kind: str, config: Config, shots: int):
  """AOT-compiles ``make_train_chunk`` (state donated).

  Cached per process, so a resumed or repeated run does not compile again.
  """
  state = jax.eval_shape(functools.partial(_init_state, config=config),
                         jax.random.key(0))
  key = jax.eval_shape(jax.random.key, 0)
  start = jax.ShapeDtypeStruct((), jnp.int32)
  jitted = jax.jit(make_train_chunk(kind, config, shots), donate_argnums=0)
  return jitted.lower(state, key, start).compile()


def check_config(config: Config) -> None:
  """Raises ValueError on iteration counts that do not fit together."""
  utils.check_positive_multiples(
      config, ('num_iterations', 'checkpoint_every'), 'chunk_size',
      'check_config')
  if not config.shots:
    raise ValueError('check_config: shots must not be empty.')
  if config.max_eval_steps < 1:
    raise ValueError('check_config: max_eval_steps must be >= 1, got '
                     f'{config.max_eval_steps}.')


def train_run(kind: str, shots: int, config: Config, key: jax.Array,
              workdir: str) -> tuple[Params, dict[str, Any]]:
  """Trains one network, resuming from its checkpoints.

  Args:
    kind: ``'maml'`` or ``'pretrained'``.
    shots: K.
    config: Experiment config.
    key: This run's PRNG key (initialisation and training tasks).
    workdir: Checkpoints go to ``workdir/checkpoints/<kind>_K<shots>``.

  Returns:
    ``(params, record)``; ``record`` holds the training history (mean loss
    of each chunk), the time spent training and compiling (over all the
    sessions of the run; compiling is skipped when the process has already
    compiled the same chunk).

  Raises:
    ValueError: if the checkpoints were written by a different recipe.
  """
  name = f'{kind}_K{shots}'
  key_init, key_tasks = jax.random.split(key)
  # Everything that changes the numbers; a mismatch means another recipe.
  recipe = utils.jsonable({
      'kind': kind, 'shots': shots, 'seed': config.seed,
      **{f: getattr(config, f) for f in (
          'num_iterations', 'meta_batch_size', 'outer_lr', 'hidden_widths',
          'init_stddev', 'amplitude_range', 'phase_range', 'input_range')},
      **({'inner_lr': config.inner_lr,
          'num_inner_steps': config.num_inner_steps} if kind == 'maml'
         else {}),
  })
  meta = {'iteration': 0, 'history': [], 'train_time_s': 0.0,
          'compile_s': 0.0}

  def start_session(state):
    del state
    start = time.perf_counter()
    compile_train_chunk(kind, config, shots)  # Cached for train_chunk.
    meta['compile_s'] += time.perf_counter() - start

  def train_chunk(state, iteration):
    start = time.perf_counter()
    state, losses = compile_train_chunk(kind, config, shots)(
        state, key_tasks, np.int32(iteration))
    loss = float(np.mean(np.asarray(losses)))
    meta['train_time_s'] += time.perf_counter() - start
    meta['iteration'] = iteration + config.chunk_size
    meta['history'].append({'iteration': meta['iteration'], 'loss': loss})
    return state, f'loss {loss:.4f} ({meta["train_time_s"]:.1f}s)'

  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', name), name=name,
      unit='iteration', total=config.num_iterations,
      stride=config.chunk_size, init=lambda: _init_state(key_init, config),
      start=start_session, step=train_chunk, recipe=recipe, meta=meta,
      checkpoint_every=config.checkpoint_every,
      max_to_keep=config.checkpoint_max_to_keep,
      progress_bar=config.progress_bar)
  return state.params, {'iterations': meta['iteration'],
                        'train_time_s': meta['train_time_s'],
                        'compile_s': meta['compile_s'],
                        'history': meta['history']}


# ------------------------------------------------------------- evaluation


@functools.cache
def _adaptation_curve_fn(num_steps: int):
  """Jitted ``curve(params, tasks, lr) -> mse [num_tasks, num_steps + 1]``.

  Column ``s`` is the query MSE after ``s`` SGD steps of size ``lr`` on the
  task's support points (column 0: before adaptation).
  """

  def curve(params, tasks, lr):
    def per_task(task):
      def body(p, _):
        p = maml.inner_adapt(mse_loss, p, task.support_x, task.support_y,
                             inner_lr=lr, num_inner_steps=1)
        return p, mse_loss(p, task.query_x, task.query_y)

      _, after = jax.lax.scan(body, params, None, length=num_steps)
      before = mse_loss(params, task.query_x, task.query_y)
      return jnp.concatenate([before[None], after])

    return jax.vmap(per_task)(tasks)

  return jax.jit(curve)


def adaptation_curve(params: Params, tasks: maml.Task, lr: float,
                     num_steps: int) -> dict[str, list[Any]]:
  """Test MSE after 0..num_steps steps: mean, 95% half-width, median.

  The half-width is ``1.96 std / sqrt(num_tasks)``, as in the authors'
  ``main.py``. A task whose MSE overflows (SGD diverged on it) makes the
  mean and half-width of that step ``None``; ``num_diverged`` counts such
  tasks per step, and the median counts them as infinite.
  """
  mse = np.asarray(_adaptation_curve_fn(num_steps)(params, tasks,
                                                   np.float32(lr)),
                   np.float64)
  num_tasks = mse.shape[0]
  finite = np.isfinite(mse).all(0)
  with np.errstate(invalid='ignore', over='ignore'):
    mean = mse.mean(0)
    ci95 = 1.96 * mse.std(0) / np.sqrt(num_tasks)
  return {'mse_mean': [float(m) if f else None for m, f in zip(mean, finite)],
          'mse_ci95': [float(c) if f else None for c, f in zip(ci95, finite)],
          # Diverged tasks (inf, or nan once inf - inf) count as +inf.
          'mse_median': np.median(np.where(np.isfinite(mse), mse, np.inf),
                                  0).tolist(),
          'num_diverged': (~np.isfinite(mse)).sum(0).tolist()}


@functools.cache
def _fit_fn(num_steps: int):
  """Jitted ``fit(params, support_x, support_y, x, lr) -> [steps + 1, n]``."""

  def fit(params, support_x, support_y, x, lr):
    def body(p, _):
      p = maml.inner_adapt(mse_loss, p, support_x, support_y, inner_lr=lr,
                           num_inner_steps=1)
      return p, apply_mlp(p, x)[:, 0]

    _, after = jax.lax.scan(body, params, None, length=num_steps)
    return jnp.concatenate([apply_mlp(params, x)[:, 0][None], after])

  return jax.jit(fit)


def tune_baseline_lr(params: Params, val_tasks: maml.Task,
                     config: Config) -> tuple[float, dict[str, float]]:
  """The grid step size with the lowest validation MSE after the last step."""
  scores = {}
  for lr in config.baseline_lrs:
    curve = adaptation_curve(params, val_tasks, lr, config.max_eval_steps)
    scores[f'{lr:g}'] = curve['mse_mean'][-1]  # None if diverged
  finite = {lr: s for lr, s in scores.items() if s is not None}
  best = min(finite, key=finite.get) if finite else f'{config.inner_lr:g}'
  return float(best), scores


# ------------------------------------------------------------- experiment


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Runs the whole experiment; resumes from checkpoints in ``workdir``.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.png``,
      ``fits.png`` and ``checkpoints/``.

  Returns:
    The results written to ``results.json``: run info, config, the paper's
    numbers, and per K (``results['shots'][str(K)]``) for ``'maml'`` and
    ``'pretrained'``: the mean test MSE after 0..max_eval_steps steps with
    its 95% interval, the step size used, and the training history.
  """
  check_config(config)
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  root_key = jax.random.key(config.seed)
  key_test = utils.name_key(root_key, 'test', full_crc32=True)
  key_val = utils.name_key(root_key, 'validation', full_crc32=True)
  steps = config.max_eval_steps
  fits_x = np.linspace(*config.input_range, 201, dtype=np.float32)[:, None]

  per_shots: dict[str, Any] = {}
  for shots in config.shots:
    test = sample_tasks(key_test, config.num_test_tasks, shots,
                        config.num_eval_points, config)
    record: dict[str, Any] = {
        'paper_maml_mse_1_step': PAPER['maml_mse_1_step'].get(shots)}
    # The fit plot shows the first test task of amplitude >= 2 (small
    # amplitudes make for a flat, unreadable plot); the same for every K.
    i = int(np.argmax(np.asarray(test.amplitude) >= 2.0))
    fits: dict[str, Any] = {
        'task_index': i,
        'support_x': np.asarray(test.tasks.support_x[i, :, 0]).tolist(),
        'support_y': np.asarray(test.tasks.support_y[i, :, 0]).tolist(),
        'amplitude': float(test.amplitude[i]),
        'phase': float(test.phase[i])}
    for kind in KINDS if config.pretrain else KINDS[:1]:
      params, run = train_run(
          kind, shots, config,
          utils.name_key(root_key, f'{kind}_K{shots}', full_crc32=True),
          workdir)
      if kind == 'maml':
        lr = config.inner_lr
      else:
        val = sample_tasks(key_val, config.num_val_tasks, shots,
                           config.num_eval_points, config)
        lr, run['val_mse_by_lr'] = tune_baseline_lr(params, val.tasks, config)
        run['at_inner_lr'] = adaptation_curve(params, test.tasks,
                                              config.inner_lr, steps)
      run.update(lr=lr, **adaptation_curve(params, test.tasks, lr, steps))
      fit = _fit_fn(steps)(params, test.tasks.support_x[i],
                           test.tasks.support_y[i], fits_x, np.float32(lr))
      fits[kind] = {'lr': lr, 'pred': {
          str(s): np.asarray(fit[s]).tolist() for s in (0, 1, steps)}}
      record[kind] = run
      logger.info('K=%d %s: test MSE %s before, %s after 1 step, %s after '
                  '%d steps (lr %g)', shots, kind, format_mse(run, 0),
                  format_mse(run, 1), format_mse(run, steps), steps, lr)
    record['fit'] = fits
    per_shots[str(shots)] = record

  results = {
      'experiment': 'maml_sinusoid',
      **utils.run_info(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'paper': utils.jsonable(PAPER),
      'fits_x': fits_x[:, 0].tolist(),
      'shots': per_shots,
  }
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  plot_results(results, os.path.join(workdir, RESULTS_PNG))
  plot_fits(results, os.path.join(workdir, FITS_PNG))
  return results


def format_mse(run: Mapping[str, Any], step: int) -> str:
  """``'mean ± ci95'`` after ``step`` steps, or the median if SGD diverged."""
  mean, ci = run['mse_mean'][step], run['mse_ci95'][step]
  if mean is None:
    return (f'diverged on {run["num_diverged"][step]} tasks (median '
            f'{run["mse_median"][step]:.3f})')
  return f'{mean:.3f} ± {ci:.3f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown table: test MSE after 1 and 10 steps, paper vs ours."""
  steps = results['config']['max_eval_steps']
  lines = [f'| K | MAML, paper (1 step) | MAML, ours (1 step) | MAML, ours '
           f'({steps} steps) | pretrained, ours (1 step) | pretrained, ours '
           f'({steps} steps) | pretrained lr |',
           '|---:|---:|---:|---:|---:|---:|---:|']
  for shots, record in results['shots'].items():
    paper = record['paper_maml_mse_1_step']
    cells = ['-' if paper is None else f'{paper:.2f}',
             format_mse(record['maml'], 1),
             format_mse(record['maml'], steps)]
    pre = record.get('pretrained')
    cells += ([format_mse(pre, 1), format_mse(pre, steps), f'{pre["lr"]:g}']
              if pre else ['-'] * 3)
    lines.append(f'| {shots} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ------------------------------------------------------------------ plots


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """MSE vs test-time steps per K (as Finn et al. Fig. 3), training losses."""
  shots = list(results['shots'])
  fig = Figure(figsize=(4.2 * (len(shots) + 1), 4), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(shots) + 1, squeeze=False)[0]
  steps = np.arange(results['config']['max_eval_steps'] + 1)
  inner_lr = results['config']['inner_lr']
  for ax, k in zip(axes, shots):
    record = results['shots'][k]
    curves = [('MAML', record['maml'], 'C0', '-')]
    if 'pretrained' in record:
      pre = record['pretrained']
      curves.append((f'pretrained, step={pre["lr"]:g}', pre, 'C1', '-'))
      curves.append((f'pretrained, step={inner_lr:g}', pre['at_inner_lr'],
                     'C1', ':'))
    for label, run, color, style in curves:
      # Steps where SGD diverged on some task have no mean: a gap, and the
      # median instead.
      mean, ci = (np.array([np.nan if v is None else v for v in run[k]])
                  for k in ('mse_mean', 'mse_ci95'))
      ax.plot(steps, mean, style, color=color, marker='.', label=label)
      ax.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.2)
      if np.isnan(mean).any():
        ax.plot(steps, run['mse_median'], style, color=color, marker='x',
                alpha=0.6, label=f'{label} (median: diverged on '
                f'{max(run["num_diverged"])} tasks)')
    paper = record['paper_maml_mse_1_step']
    if paper is not None:
      ax.plot([1], [paper], 'kx', markersize=9,
              label='MAML, Meta-SGD paper Tab. 1')
    ax.set_xlabel('number of gradient steps')
    ax.set_ylabel('test MSE')
    ax.set_yscale('log')
    # A diverging mean would flatten everything else: it leaves the top.
    ax.set_ylim(top=3 * max(c[1]['mse_median'][0] for c in curves))
    ax.grid(True, which='both', alpha=0.3)
    ax.set_title(f'K = {k}')
    ax.legend(fontsize='small')
  ax = axes[-1]
  for i, k in enumerate(shots):
    for kind, style in (('maml', '-'), ('pretrained', ':')):
      if kind in results['shots'][k]:
        history = results['shots'][k][kind]['history']
        ax.plot([h['iteration'] for h in history],
                [h['loss'] for h in history], style, color=f'C{i + 2}',
                label=f'{kind}, K={k}')
  ax.set_xlabel('training iteration')
  ax.xaxis.set_major_formatter(
      ticker.FuncFormatter(lambda v, _: f'{v / 1000:g}k'))
  ax.set_ylabel('training loss (mean per chunk)')
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize='small')
  ax.set_title(f'Training ({results["device"].split(" (")[0]}, '
               f'{results["date"][:10]})')
  fig.savefig(path, dpi=100)


def plot_fits(results: Mapping[str, Any], path: str) -> None:
  """One test task: pre-update, after 1 and N steps, truth (Finn Fig. 2)."""
  shots = list(results['shots'])
  kinds = [k for k in KINDS if k in results['shots'][shots[0]]['fit']]
  fig = Figure(figsize=(4.2 * len(shots), 3.6 * len(kinds)),
               layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(kinds), len(shots), squeeze=False)
  x = np.asarray(results['fits_x'])
  steps = results['config']['max_eval_steps']
  for col, k in enumerate(shots):
    fit = results['shots'][k]['fit']
    truth = fit['amplitude'] * np.sin(x - fit['phase'])
    for row, kind in enumerate(kinds):
      ax = axes[row, col]
      ax.plot(x, truth, 'r-', label='ground truth')
      pred = fit[kind]['pred']
      ax.plot(x, pred['0'], ':', color='C2', label='pre-update')
      ax.plot(x, pred['1'], '--', color='C0', label='1 grad step')
      ax.plot(x, pred[str(steps)], '-', color='C0', alpha=0.6,
              label=f'{steps} grad steps')
      ax.plot(fit['support_x'], fit['support_y'], 'k^',
              label=f'{k} support points')
      ax.set_title(f'{"MAML" if kind == "maml" else "pretrained"}, K={k}, '
                   f'step={fit[kind]["lr"]:g}')
      ax.grid(True, alpha=0.3)
      if row == 0 and col == 0:
        ax.legend(fontsize='small')
  fig.savefig(path, dpi=100)
