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
"""

from collections.abc import Mapping
import dataclasses
import functools
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
from experiments.common import models
from experiments.common import utils
from experiments.distill_mnist.configs import Config
import metacf.distill

# Test errors (of 10,000) reported by Hinton et al. 2015, section 3.
PAPER_TEST_ERRORS = {
    'teacher': 67,
    'student_hard': 146,
    'student_kd_T20': 74,  # "at a temperature of 20"
}
RESULTS_JSON = 'results.json'
RESULTS_PNG = 'results.png'
NUM_CLASSES = 10

Params = Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of the experiment and how it is trained.

  Attributes:
    name: Key in the results, e.g. ``'student_kd_T20'``.
    description: One line for the results table.
    widths: Hidden layer widths.
    dropout: Dropout rate on hidden units.
    input_dropout: Dropout rate on input pixels.
    jitter: Largest random shift of training images, in pixels.
    epochs: Training epochs.
    temperature: Distillation temperature; None trains on hard labels only.
    alpha: Weight of the soft term (the hard term gets ``1 - alpha``).
  """
  name: str
  description: str
  widths: tuple[int, ...]
  dropout: float = 0.0
  input_dropout: float = 0.0
  jitter: int = 0
  epochs: int = 1
  temperature: float | None = None
  alpha: float = 0.0


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState


def model_specs(config: Config) -> list[ModelSpec]:
  """The models the experiment trains, teacher first."""

  def fmt(t: float) -> str:
    return f'{t:g}'

  teacher = ModelSpec(
      name='teacher',
      description=(f'teacher {_widths_str(config.teacher_widths)}, dropout '
                   f'{config.teacher_dropout:g} (inputs '
                   f'{config.teacher_input_dropout:g}), jitter '
                   f'{config.teacher_jitter}px'),
      widths=config.teacher_widths, dropout=config.teacher_dropout,
      input_dropout=config.teacher_input_dropout,
      jitter=config.teacher_jitter, epochs=config.teacher_epochs)
  specs = [teacher, ModelSpec(
      name='student_hard',
      description=f'student {_widths_str(config.student_widths)}, hard labels',
      widths=config.student_widths, epochs=config.student_epochs)]
  for t in config.temperatures:
    specs.append(ModelSpec(
        name=f'student_kd_T{fmt(t)}',
        description=(f'student {_widths_str(config.student_widths)}, KD '
                     f'T={fmt(t)}, alpha={config.alpha:g}'),
        widths=config.student_widths, epochs=config.student_epochs,
        temperature=t, alpha=config.alpha))
  if config.born_again:
    specs.append(dataclasses.replace(
        teacher, name='born_again',
        description=(f'born-again {_widths_str(config.teacher_widths)} '
                     f'(as the teacher), KD '
                     f'T={fmt(config.born_again_temperature)}, alpha='
                     f'{config.born_again_alpha:g}'),
        temperature=config.born_again_temperature,
        alpha=config.born_again_alpha))
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f'model_specs: model names must be unique, got {names}.')
  return specs


def _widths_str(widths: tuple[int, ...]) -> str:
  return 'x'.join(str(w) for w in widths) or 'linear'


def preprocess(images: jax.typing.ArrayLike) -> jax.Array:
  """uint8 pixels ``[batch, 28, 28, 1]`` -> float32 in ``[0, 1]``."""
  return jnp.asarray(images).astype(jnp.float32) / 255.0


def make_optimizer(learning_rate: float, total_steps: int
                   ) -> optax.GradientTransformation:
  """Adam with the learning rate cosine-decayed to 0 over ``total_steps``."""
  schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  return optax.adam(schedule)


def make_init_state(model: models.MLP,
                    optimizer: optax.GradientTransformation):
  """Returns the jitted ``init_state(key, images) -> TrainState``."""

  def init_state(key, images):
    params = model.init(key, preprocess(images))['params']
    return TrainState(params, optimizer.init(params))

  return jax.jit(init_state)


def make_train_step(model: models.MLP, optimizer: optax.GradientTransformation,
                    *, jitter: int, distill: bool,
                    teacher: models.MLP | None = None):
  """Returns the jitted ``train_step``.

  ``train_step(state, batch, key, temperature, alpha, teacher_params) ->
  (state, loss)`` donates ``state``. ``batch`` holds ``'image'`` (uint8
  ``[B, 28, 28, 1]``), ``'label'`` (int32 ``[B]``) and, if ``distill``
  without ``teacher``, the precomputed ``'teacher_logits'`` (float32
  ``[B, 10]``). ``key`` drives jitter and dropout. ``temperature`` and
  ``alpha`` (float32 scalars; ignored unless ``distill``) are arguments
  rather than constants so that students differing only in them share one
  compiled step. ``teacher_params`` is None unless ``teacher`` is given.

  Args:
    model: The network.
    optimizer: Its optimiser.
    jitter: Largest random shift of the training images, in pixels.
    distill: Train on ``alpha * T^2 KL + (1 - alpha) * CE`` instead of CE.
    teacher: If given, the teacher's logits are computed in the step, on the
      same jittered images the student sees (precomputed logits would be of
      the un-jittered images).
  """

  def loss_fn(params, batch, key, temperature, alpha, teacher_params):
    key_jitter, key_dropout = jax.random.split(key)
    images = batch['image']
    if jitter:
      images = utils.random_translate(key_jitter, images, jitter)
    images = preprocess(images)
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': key_dropout})
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label'])
    if distill:
      if teacher is None:
        teacher_logits = batch['teacher_logits']
      else:
        teacher_logits = teacher.apply({'params': teacher_params}, images)
      soft = metacf.distill.tempered_distillation_loss(
          logits, teacher_logits, temperature)
      loss = alpha * soft + (1.0 - alpha) * loss
    return jnp.mean(loss)

  def train_step(state, batch, key, temperature, alpha, teacher_params):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key,
                                              temperature, alpha,
                                              teacher_params)
    updates, opt_state = utils.optimizer_update(optimizer, grads,
                                                state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state), loss

  return jax.jit(train_step, donate_argnums=0)


def make_predict_fn(model: models.MLP):
  """Returns the jitted ``predict(params, images) -> logits`` (no dropout)."""

  def predict(params, images):
    return model.apply({'params': params}, preprocess(images), train=False)

  return jax.jit(predict)


# The jitted functions are cached by everything they close over, so models
# that can share one (the distilled students differ only in temperature; the
# teacher and the born-again student share init and predict) compile it once
# per process, not once per model or per call of train_and_evaluate.


@functools.cache
def _init_state_fn(arch: tuple[Any, ...]):
  # Adam's state does not depend on the schedule: any total_steps will do.
  return make_init_state(_mlp(arch), make_optimizer(1.0, 1))


@functools.cache
def _train_step_fn(arch: tuple[Any, ...], jitter: int, distill: bool,
                   teacher_arch: tuple[Any, ...] | None, learning_rate: float,
                   total_steps: int):
  return make_train_step(
      _mlp(arch), make_optimizer(learning_rate, total_steps), jitter=jitter,
      distill=distill,
      teacher=None if teacher_arch is None else _mlp(teacher_arch))


@functools.cache
def _predict_fn(arch: tuple[Any, ...]):
  return make_predict_fn(_mlp(arch))


def teacher_in_step(spec: ModelSpec) -> bool:
  """Whether ``spec`` needs the teacher's logits on jittered images.

  Otherwise (hard labels, or distillation without jitter) the teacher's
  logits on the training set are computed once and fed with the batches: a
  teacher forward pass per student step costs far more than one pass over
  the training set (see the README).
  """
  return spec.temperature is not None and spec.jitter > 0


def _arch(spec: ModelSpec) -> tuple[Any, ...]:
  """The ``models.MLP`` of ``spec``, as a hashable tuple."""
  return (tuple(spec.widths), spec.dropout, spec.input_dropout)


def _mlp(arch: tuple[Any, ...]) -> models.MLP:
  widths, dropout, input_dropout = arch
  return models.MLP(widths=widths, num_classes=NUM_CLASSES,
                    dropout_rate=dropout, input_dropout_rate=input_dropout)


def predict_logits(predict_fn, params: Params, images: np.ndarray,
                   batch_size: int) -> np.ndarray:
  """Logits for all ``images``, float32 ``[N, 10]``, in fixed-size batches."""
  outputs = []
  for batch, mask in utils.padded_batches({'image': images}, batch_size):
    outputs.append(np.asarray(predict_fn(params, batch['image']))[mask])
  return np.concatenate(outputs)


def count_errors(predict_fn, params: Params, images: np.ndarray,
                 labels: np.ndarray, batch_size: int) -> int:
  """Number of misclassified ``images``."""
  logits = predict_logits(predict_fn, params, images, batch_size)
  return int(np.sum(np.argmax(logits, axis=-1) != labels))


def train_model(spec: ModelSpec, config: Config, key: jax.Array,
                train_arrays: Mapping[str, np.ndarray],
                test_arrays: Mapping[str, np.ndarray], workdir: str, *,
                teacher_spec: ModelSpec | None = None,
                teacher_params: Params | None = None
                ) -> tuple[Params, dict[str, Any]]:
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
  in_step = teacher_in_step(spec)
  if in_step and (teacher_spec is None or teacher_params is None):
    raise ValueError(f'train_model: {spec.name} needs teacher_spec and '
                     'teacher_params (distillation with jitter).')
  needed = ['image', 'label'] + (
      ['teacher_logits'] if spec.temperature is not None and not in_step
      else [])
  train_arrays = {k: train_arrays[k] for k in needed}
  num_test = len(test_arrays['label'])

  def init_state():
    state = _init_state_fn(_arch(spec))(key_init, train_arrays['image'][:1])
    # Orbax restores arrays committed to a device. Commit the fresh state
    # too, so that a fresh and a resumed run call train_step with the same
    # argument signature and it compiles once either way.
    return jax.device_put(state, jax.devices()[0])

  train_step = _train_step_fn(
      _arch(spec), spec.jitter, spec.temperature is not None,
      _arch(teacher_spec) if in_step else None, config.learning_rate,
      total_steps)
  if not in_step:
    teacher_params = None
  predict_fn = _predict_fn(_arch(spec))
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
    errors = count_errors(predict_fn, state.params, test_arrays['image'],
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
    errors = count_errors(predict_fn, state.params, test_arrays['image'],
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


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Train and test ``{'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}``."""
  return utils.load_image_splits(config.dataset, num_train=config.num_train,
                                 num_test=config.num_test, raw_dir=raw_dir,
                                 data_dir=data_dir)


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
  train_arrays, test_arrays = load_data(config, raw_dir=raw_dir,
                                        data_dir=data_dir)
  root_key = jax.random.key(config.seed)
  specs = model_specs(config)

  records: dict[str, dict[str, Any]] = {}
  teacher_spec, teacher_params = specs[0], None
  for spec in specs:
    needs_logits = spec.temperature is not None and not teacher_in_step(spec)
    if needs_logits and 'teacher_logits' not in train_arrays:
      # This student sees un-jittered images: the teacher's logits on them
      # are fixed, so compute them once instead of in every student step.
      train_arrays['teacher_logits'] = predict_logits(
          _predict_fn(_arch(teacher_spec)), teacher_params,
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
  plot_results(results, os.path.join(workdir, RESULTS_PNG))
  return results


def plot_results(results: Mapping[str, Any], path: str) -> None:
  """Test errors per epoch (left) and final test errors vs the paper (right)."""
  fig = Figure(figsize=(12, 4.5), layout='constrained')
  FigureCanvasAgg(fig)
  ax_curve, ax_bar = fig.subplots(1, 2)
  num_test = results['num_test']
  names = list(results['models'])
  for name in names:
    history = results['models'][name]['history']
    ax_curve.plot([h['epoch'] for h in history],
                  [h['test_errors'] for h in history], marker='.', label=name)
  ax_curve.set_xlabel('epoch')
  ax_curve.set_ylabel(f'test errors (of {num_test})')
  ax_curve.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax_curve.grid(True, alpha=0.3)
  ax_curve.legend(fontsize='small')
  ax_curve.set_title('Test errors after each epoch')

  positions = np.arange(len(names))
  ours = [results['models'][n]['test_errors'] for n in names]
  ax_bar.bar(positions - 0.2, ours, width=0.4, label='ours')
  # The paper's counts are of MNIST's 10,000 test images: only comparable on
  # the full test set.
  if num_test == 10_000:
    paper = [(x, results['models'][n]['paper_test_errors'])
             for x, n in zip(positions, names)
             if results['models'][n]['paper_test_errors'] is not None]
    ax_bar.bar([x + 0.2 for x, _ in paper], [v for _, v in paper],
               width=0.4, label='Hinton et al. 2015')
    for x, v in paper:
      ax_bar.annotate(str(v), (x + 0.2, v), ha='center', va='bottom',
                      fontsize='small')
  for x, v in zip(positions, ours):
    ax_bar.annotate(str(v), (x - 0.2, v), ha='center', va='bottom',
                    fontsize='small')
  tallest = max(ours + [results['models'][n]['paper_test_errors'] or 0
                        for n in names])
  ax_bar.set_ylim(0, 1.3 * max(tallest, 1))  # Room for the legend.
  ax_bar.set_xticks(positions, names, rotation=30, ha='right')
  ax_bar.set_ylabel(f'test errors (of {num_test})')
  ax_bar.legend(fontsize='small')
  ax_bar.set_title(f'Final test errors ({results["device"].split(" (")[0]}, '
                   f'{results["date"][:10]})')
  fig.savefig(path, dpi=100)
