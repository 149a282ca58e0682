"""Knowledge distillation on MNIST: teacher, students, born-again student.

Reproduces the MNIST experiment of Hinton, Vinyals & Dean 2015, section 3
(https://arxiv.org/abs/1503.02531), on a budget of minutes:

1. ``teacher``: a 2 x 1200 ReLU MLP with dropout, inputs jittered by up to
   2 pixels, trained on hard labels.
2. ``student_hard``: a 2 x 800 MLP, no regularisation, hard labels only.
3. ``student_kd_T{T}``: the same student trained with
   ``alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``,
   the soft term from ``metacf.distill.tempered_distillation_loss``.
4. ``born_again``: one generation of a born-again network (Furlanello et al.
   2018, https://arxiv.org/abs/1805.04770): the teacher's architecture,
   dropout, jitter and epochs, trained from the teacher's soft targets.

The 2 x 800 students see un-jittered images, so the teacher's logits on the
training set are computed once, after the teacher is trained, and fed to the
students' train steps with each batch. The born-again student is trained like
the teacher, jitter included, so its step runs the teacher on the same
jittered images.

Every model is checkpointed after every epoch; a run started again in the
same ``workdir`` resumes where it stopped, and gives the same numbers.

This module is the driver; the data are in ``data.py``, the models and their
recipes in ``recipes.py``, the jitted steps in ``steps.py``, the table and
figure in ``report.py``.
"""

from collections.abc import Mapping
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
import optax

from experiments.common import loop
from experiments.common import utils
from experiments.distill_mnist import data
from experiments.distill_mnist import report
from experiments.distill_mnist import recipes
from experiments.distill_mnist import steps
from experiments.distill_mnist.configs import Config
from experiments.distill_mnist.report import format_table  # For main.py.

# Test errors (of 10,000) reported by Hinton et al. 2015, section 3.
PAPER_TEST_ERRORS = {
    'teacher': 67,
    'student_hard': 146,
    'student_kd_T20': 74,  # "at a temperature of 20"
}
RESULTS_JSON = 'results.json'
RESULTS_PNG = 'results.png'


def train_model(spec: recipes.ModelSpec, config: Config, key: jax.Array,
                train_arrays: Mapping[str, np.ndarray],
                test_arrays: Mapping[str, np.ndarray], workdir: str, *,
                teacher_spec: recipes.ModelSpec | None = None,
                teacher_params: steps.Params | None = None
                ) -> tuple[steps.Params, dict[str, Any]]:
  """Trains one model, resuming from its checkpoints, and evaluates it.

  Args:
    spec: The model and its training recipe.
    config: Experiment config (batch size, optimiser, ...).
    key: This model's PRNG key.
    train_arrays: ``'image'``, ``'label'`` and, for distillation without
      jitter, ``'teacher_logits'``; leading dimension ``num_train``.
    test_arrays: ``'image'`` and ``'label'``.
    workdir: Checkpoints go to ``workdir/checkpoints/<spec.name>``.
    teacher_spec: The teacher, for distillation with jitter.
    teacher_params: Its parameters.

  Returns:
    ``(params, record)``; ``record`` holds the final test errors and the
    per-epoch history.

  Raises:
    ValueError: if the checkpoints were written by a different recipe.
  """
  key_init, key_dropout, key_data = jax.random.split(key, 3)
  num_train = len(train_arrays['label'])
  steps_per_epoch = utils.num_batches(num_train, config.batch_size)
  if config.max_steps_per_epoch is not None:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  if steps_per_epoch < 1:
    raise ValueError(
        f'train_model: batch_size must be <= num_train, got '
        f'{config.batch_size} > {num_train}.')
  total_steps = spec.epochs * steps_per_epoch
  in_step = recipes.teacher_in_step(spec)
  if in_step and (teacher_spec is None or teacher_params is None):
    raise ValueError(f'train_model: {spec.name} needs teacher_spec and '
                     'teacher_params (distillation with jitter).')
  needed = ['image', 'label'] + (
      ['teacher_logits'] if spec.temperature is not None and not in_step
      else [])
  train_arrays = {k: train_arrays[k] for k in needed}
  num_test = len(test_arrays['label'])

  def init_state():
    state = steps.init_state_fn(recipes.arch(spec))(
        key_init, train_arrays['image'][:1])
    # Orbax restores arrays committed to a device. Commit the fresh state
    # too, so that a fresh and a resumed run call train_step with the same
    # argument signature and it compiles once either way.
    return jax.device_put(state, jax.devices()[0])

  train_step = steps.train_step_fn(
      recipes.arch(spec), spec.jitter, spec.temperature is not None,
      recipes.arch(teacher_spec) if in_step else None, config.learning_rate,
      total_steps)
  if not in_step:
    teacher_params = None
  predict_fn = steps.predict_fn(recipes.arch(spec))
  temperature = np.float32(1.0 if spec.temperature is None
                           else spec.temperature)
  alpha = np.float32(spec.alpha)

  # Everything that changes the numbers; a mismatch means another recipe.
  recipe = {'spec': dataclasses.asdict(spec), 'seed': config.seed,
            'dataset': config.dataset, 'num_train': num_train,
            'batch_size': config.batch_size,
            'steps_per_epoch': steps_per_epoch,
            'learning_rate': config.learning_rate}
  del recipe['spec']['description']  # Cosmetic.
  recipe = utils.jsonable(recipe)
  meta = {'epoch': 0, 'history': [], 'train_time_s': 0.0}

  def train_epoch(state, epoch):
    start = time.perf_counter()
    rng = utils.numpy_rng(jax.random.fold_in(key_data, epoch))
    losses = []
    for i, batch in enumerate(utils.batches(
        train_arrays, config.batch_size, rng=rng,
        max_batches=steps_per_epoch)):
      step_key = jax.random.fold_in(key_dropout, epoch * steps_per_epoch + i)
      state, loss = train_step(state, batch, step_key, temperature, alpha,
                               teacher_params)
      losses.append(loss)
    train_loss = float(np.mean(jax.device_get(losses)))
    errors = steps.count_errors(predict_fn, state.params, test_arrays['image'],
                                test_arrays['label'], config.eval_batch_size)
    epoch_time = time.perf_counter() - start
    meta['epoch'] = epoch + 1
    meta['history'].append({'epoch': epoch + 1, 'train_loss': train_loss,
                            'test_errors': errors,
                            'epoch_time_s': epoch_time})
    meta['train_time_s'] += epoch_time
    return state, (f'loss {train_loss:.4f}, test errors {errors}/{num_test} '
                   f'({epoch_time:.1f}s)')

  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', spec.name), name=spec.name,
      unit='epoch', total=spec.epochs, init=init_state, step=train_epoch,
      recipe=recipe, meta=meta, max_to_keep=config.checkpoint_max_to_keep,
      progress_bar=config.progress_bar)
  history = meta['history']
  if history:  # The last epoch's evaluation is of the final parameters.
    errors = history[-1]['test_errors']
  else:
    errors = steps.count_errors(predict_fn, state.params, test_arrays['image'],
                                test_arrays['label'], config.eval_batch_size)
  record = {
      'description': spec.description,
      'test_errors': errors,
      'num_test': num_test,
      'test_accuracy': 1.0 - errors / num_test,
      'paper_test_errors': PAPER_TEST_ERRORS.get(spec.name),
      'train_time_s': meta['train_time_s'],
      'epochs': spec.epochs,
      'steps': total_steps,
      'num_params': optax.tree.size(state.params),
      'temperature': spec.temperature,
      'alpha': spec.alpha if spec.temperature is not None else None,
      'history': history,
  }
  return state.params, record


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Runs the whole experiment; resumes from checkpoints in ``workdir``.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.png`` and
      ``checkpoints/``.
    raw_dir: Raw MNIST files (``metacf.data`` default: ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir (``metacf.data`` default).

  Returns:
    The results written to ``results.json``: run info, config, and per model
    (``results['models'][name]``) the test error count, accuracy, train time
    and per-epoch history.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  train_arrays, test_arrays = data.load_data(config, raw_dir=raw_dir,
                                             data_dir=data_dir)
  root_key = jax.random.key(config.seed)
  specs = recipes.model_specs(config)

  records: dict[str, dict[str, Any]] = {}
  teacher_spec, teacher_params = specs[0], None
  for spec in specs:
    needs_logits = (spec.temperature is not None
                    and not recipes.teacher_in_step(spec))
    if needs_logits and 'teacher_logits' not in train_arrays:
      # This student sees un-jittered images: the teacher's logits on them
      # are fixed, so compute them once instead of in every student step.
      train_arrays['teacher_logits'] = steps.predict_logits(
          steps.predict_fn(recipes.arch(teacher_spec)), teacher_params,
          train_arrays['image'], config.eval_batch_size)
    params, records[spec.name] = train_model(
        spec, config, utils.name_key(root_key, spec.name, full_crc32=True),
        train_arrays,
        test_arrays, workdir, teacher_spec=teacher_spec,
        teacher_params=teacher_params)
    if spec is teacher_spec:
      teacher_params = params

  results = {
      'experiment': 'distill_mnist',
      **utils.run_info(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'num_train': len(train_arrays['label']),
      'num_test': len(test_arrays['label']),
      'models': records,
  }
  if 'born_again' in records:
    results['born_again_beats_teacher'] = (
        records['born_again']['test_errors']
        < records['teacher']['test_errors'])
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  report.plot_results(results, os.path.join(workdir, RESULTS_PNG))
  return results
