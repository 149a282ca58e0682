"""Few-shot sinusoid regression: MAML, Reptile, iMAML, a pretrained network.

Reproduces section 5.1 of Finn, Abbeel & Levine 2017
(https://arxiv.org/abs/1703.03400). A task is a sinusoid
``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``phi ~ U[0, pi]``, observed at ``x ~ U[-5, 5]``. For each K in
``config.shots``:

1. ``maml_K{K}``: an MLP 1-40-40-1 (ReLU) meta-trained with
   ``metacf.maml.make_meta_train_step``: K support and K query points per
   task, one inner SGD step of size ``inner_lr``, meta-batches of 25 tasks,
   Adam.
2. ``reptile_K{K}`` and ``imaml_K{K}`` (``config.methods`` chooses among
   the three methods): the same MLP meta-trained on the same tasks with
   ``metacf.maml.reptile_grad`` (Nichol, Achiam & Schulman 2018;
   ``reptile_num_inner_steps`` SGD steps of size ``inner_lr`` on the K
   support points) or ``metacf.maml.imaml_grad`` (Rajeswaran, Finn, Kakade
   & Levine 2019; ``imaml_num_inner_steps`` steps on the proximally
   regularised support loss, implicit gradient by ``imaml_cg_steps`` of CG),
   Adam ``outer_lr`` as MAML.
3. ``pretrained_K{K}`` (the paper's baseline): the same MLP trained with Adam
   to regress on all tasks jointly (the same 25 tasks x 2K points an
   iteration), then fine-tuned at test time like MAML's network. The paper
   fine-tunes it "using an automatically tuned step size": we pick the step
   size with the lowest MSE after ``max_eval_steps`` steps on validation
   tasks, and also report it at MAML's ``inner_lr``.

All are evaluated on the same fresh test tasks: K support points to adapt
on (0 to ``max_eval_steps`` SGD steps), ``num_eval_points`` query points to
score on. The published reference is the MAML row of Li et al. 2017
(Meta-SGD), Table 1: MSE after one adaptation step (see ``PAPER``).

Training runs ``chunk_size`` iterations per jitted call (``lax.scan``); the
tasks of iteration ``i`` are drawn inside it from
``fold_in(run_key, i)``, so no data crosses from the host. Every run is
checkpointed every ``checkpoint_every`` iterations; a run started again in
the same ``workdir`` resumes where it stopped and gives bitwise the same
numbers.

This module is the driver; the tasks are in ``data.py``, the model, jitted
training chunks and evaluation in ``steps.py``, the table and figures in
``report.py``.
"""

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from experiments.common import loop
from experiments.common import utils
from experiments.maml_sinusoid.configs import Config
from experiments.maml_sinusoid import data
from experiments.maml_sinusoid import report
from experiments.maml_sinusoid import steps as steps_lib
from experiments.maml_sinusoid.report import format_mse
from experiments.maml_sinusoid.report import format_table  # For main.py.
from experiments.maml_sinusoid.steps import KINDS
from experiments.maml_sinusoid.steps import METHODS

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

logger = logging.getLogger(__name__)


def check_config(config: Config) -> None:
  """Raises ValueError on iteration counts that do not fit together."""
  utils.check_positive_multiples(
      config, ('num_iterations', 'checkpoint_every'), 'chunk_size',
      'check_config')
  if not config.shots:
    raise ValueError('check_config: shots must not be empty.')
  if (not config.methods or len(set(config.methods)) != len(config.methods)
      or not set(config.methods) <= set(METHODS)):
    raise ValueError(f'check_config: methods must be distinct names among '
                     f'{METHODS}, got {config.methods!r}.')
  if config.max_eval_steps < 1:
    raise ValueError('check_config: max_eval_steps must be >= 1, got '
                     f'{config.max_eval_steps}.')


def _method_recipe(kind: str, config: Config) -> dict[str, Any]:
  """The config fields that only ``kind``'s training reads."""
  fields = {'maml': ('inner_lr', 'num_inner_steps'),
            'reptile': ('inner_lr', 'reptile_num_inner_steps'),
            'imaml': ('inner_lr', 'imaml_num_inner_steps', 'imaml_reg',
                      'imaml_cg_steps', 'imaml_clip_norm'),
            'pretrained': ()}[kind]
  return {f: getattr(config, f) for f in fields}


def train_run(kind: str, shots: int, config: Config, key: jax.Array,
              workdir: str) -> tuple[steps_lib.Params, dict[str, Any]]:
  """Trains one network, resuming from its checkpoints.

  Args:
    kind: One of ``KINDS``.
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
      **_method_recipe(kind, config),
  })
  meta = {'iteration': 0, 'history': [], 'train_time_s': 0.0,
          'compile_s': 0.0}

  def start_session(state):
    del state
    start = time.perf_counter()
    # Cached for train_chunk.
    steps_lib.compile_train_chunk(kind, config, shots)
    meta['compile_s'] += time.perf_counter() - start

  def train_chunk(state, iteration):
    start = time.perf_counter()
    state, losses = steps_lib.compile_train_chunk(kind, config, shots)(
        state, key_tasks, np.int32(iteration))
    loss = float(np.mean(np.asarray(losses)))
    meta['train_time_s'] += time.perf_counter() - start
    meta['iteration'] = iteration + config.chunk_size
    meta['history'].append({'iteration': meta['iteration'], 'loss': loss})
    return state, f'loss {loss:.4f} ({meta["train_time_s"]:.1f}s)'

  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', name), name=name,
      unit='iteration', total=config.num_iterations,
      stride=config.chunk_size,
      init=lambda: steps_lib.init_state(key_init, config),
      start=start_session, step=train_chunk, recipe=recipe, meta=meta,
      checkpoint_every=config.checkpoint_every,
      max_to_keep=config.checkpoint_max_to_keep,
      progress_bar=config.progress_bar)
  return state.params, {'iterations': meta['iteration'],
                        'train_time_s': meta['train_time_s'],
                        'compile_s': meta['compile_s'],
                        'history': meta['history']}


# ------------------------------------------------------------- experiment


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Runs the whole experiment; resumes from checkpoints in ``workdir``.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.png``,
      ``fits.png`` and ``checkpoints/``.

  Returns:
    The results written to ``results.json``: run info, config, the paper's
    numbers, and per K (``results['shots'][str(K)]``) for each of
    ``config.methods`` and ``'pretrained'``: the mean test MSE after
    0..max_eval_steps steps with its 95% interval, the step size used, and
    the training history.
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
    test = data.sample_tasks(key_test, config.num_test_tasks, shots,
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
    kinds = [*config.methods, *(['pretrained'] if config.pretrain else [])]
    for kind in kinds:
      params, run = train_run(
          kind, shots, config,
          utils.name_key(root_key, f'{kind}_K{shots}', full_crc32=True),
          workdir)
      if kind in METHODS:
        lr = config.inner_lr
      else:
        val = data.sample_tasks(key_val, config.num_val_tasks, shots,
                                config.num_eval_points, config)
        lr, run['val_mse_by_lr'] = steps_lib.tune_baseline_lr(
            params, val.tasks, config)
        run['at_inner_lr'] = steps_lib.adaptation_curve(
            params, test.tasks, config.inner_lr, steps)
      run.update(lr=lr, **steps_lib.adaptation_curve(params, test.tasks, lr,
                                                     steps))
      fit = steps_lib.fit_fn(steps)(params, test.tasks.support_x[i],
                                    test.tasks.support_y[i], fits_x,
                                    np.float32(lr))
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
  report.plot_results(results, os.path.join(workdir, RESULTS_PNG))
  report.plot_fits(results, os.path.join(workdir, FITS_PNG))
  return results
