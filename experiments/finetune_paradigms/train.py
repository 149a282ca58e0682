r"""Fine-tuning paradigms: what each one learns, costs and forgets.

A small ViT (``experiments.common.models.ViT``) is pre-trained on task A,
real MNIST (all ten digits), then adapted to task B, real Fashion-MNIST,
from K labelled examples per class, by each variant of ``config.variants``:
a linear probe, full and partial fine-tuning, LoRA (ranks 1, 4, 16 on the
attention and MLP kernels), prompt tuning (shallow 1/5/20 tokens and
VPT-deep), nearest class means of the frozen features (no gradient: the
stand-in for prompt engineering), and the two cures of full fine-tuning's
forgetting, LwF and replay. For every variant and K, over the seeds:
trainable parameters, parameters added per extra task, B's test accuracy,
A's test accuracy after adaptation with A's head (forgetting = before -
after), and wall time per step.

Before training, ``metacf.jacobian.predicted_forgetting`` predicts the change
of A's loss (A's head, a fixed subset of A's test images) under gradient
descent on B in the variant's own parametrisation (its trainable leaves
only; the frozen ones are closed over), with one ``apply_fn`` for both
tasks whose head is chosen by a per-example task flag in the input.

Every adaptation run is one JSON record (``workdir/runs/<variant>/``), the
pre-training an orbax checkpoint per epoch (``workdir/checkpoints/``), each
prediction one record (``workdir/predictions/``), all through
``experiments.common.loop``: a run started again in the same workdir resumes
and, since every draw comes from keys folded from the seed and names, gives
bitwise the same numbers.

The code: ``data.py`` loads the data and draws the K-shot sets,
``systems.py`` the ViT and each variant's trainable leaves, ``steps.py`` the
jitted adaptation loop and evaluation, ``report.py`` the summaries,
correlation and tables, ``_plots.py`` the figures; this file pre-trains,
runs the adaptations and predictions and writes the results.
"""

from collections.abc import Mapping
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import batching
from experiments.common import loop
from experiments.common.losses import cross_entropy
from experiments.common import utils
from experiments.finetune_paradigms import _plots
from experiments.finetune_paradigms import data as data_lib
from experiments.finetune_paradigms import report
from experiments.finetune_paradigms import steps
from experiments.finetune_paradigms import systems
from experiments.finetune_paradigms.configs import Config
from experiments.finetune_paradigms.configs import Variant
from experiments.finetune_paradigms.report import format_table  # For main.py.
import metacf.jacobian

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'

Params = Any


# -------------------------------------------------------------- pretraining


def pretrain(config: Config, data: Mapping[str, Mapping[str, np.ndarray]],
             workdir: str) -> tuple[Params, dict[str, Any]]:
  """The ViT trained on MNIST; orbax checkpoint per epoch, reused."""
  model = systems.make_model(config)
  train = data['a_train']
  num = len(train['label'])
  steps_per_epoch = utils.num_batches(num, config.pretrain_batch_size)
  total = steps_per_epoch * config.pretrain_epochs
  tx = optax.adam(optax.cosine_decay_schedule(config.pretrain_lr, total))
  key = jax.random.key(config.pretrain_seed)
  device = jax.devices()[0]
  images = jax.device_put(jnp.asarray(train['image']), device)
  labels = jax.device_put(jnp.asarray(train['label']), device)

  def init():
    params = model.init(utils.name_key(key, 'init'),
                        jnp.zeros([1, 28, 28, 1], jnp.float32))['params']
    return jax.device_put({'params': params, 'opt_state': tx.init(params)},
                          device)

  @jax.jit
  def epoch_fn(state, idx):
    def step(state, batch_idx):
      def loss_fn(params):
        logits = model.apply({'params': params},
                             systems.to_float(images[batch_idx]))
        return jnp.mean(cross_entropy(logits, labels[batch_idx]))
      loss, grads = jax.value_and_grad(loss_fn)(state['params'])
      updates, opt_state = utils.optimizer_update(tx, grads,
                                                  state['opt_state'],
                                                  state['params'])
      return {'params': optax.apply_updates(state['params'], updates),
              'opt_state': opt_state}, loss
    state, losses = jax.lax.scan(step, state, idx)
    return state, jnp.mean(losses)

  meta: dict[str, Any] = {'history': [], 'train_time_s': 0.0}

  def step(state, epoch):
    start = time.perf_counter()
    rng = utils.numpy_rng(utils.name_key(key, 'epoch', epoch))
    order = rng.permutation(num)[:steps_per_epoch * config.pretrain_batch_size]
    idx = jnp.asarray(order.reshape(steps_per_epoch, -1).astype(np.int32))
    state, loss = epoch_fn(state, idx)
    loss = float(loss)
    meta['history'].append({'epoch': epoch + 1, 'train_loss': loss})
    meta['train_time_s'] += time.perf_counter() - start
    return state, f'loss {loss:.4f}'

  recipe = {'model': _model_recipe(config), 'seed': config.pretrain_seed,
            'epochs': config.pretrain_epochs,
            'batch_size': config.pretrain_batch_size,
            'lr': config.pretrain_lr, 'num_train': num}
  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', 'pretrain'), name='pretrain (A)',
      unit='epoch', total=config.pretrain_epochs, init=init, step=step,
      recipe=recipe, meta=meta, progress_bar=config.progress_bar)
  return jax.device_put(state['params'], device), meta


def _model_recipe(config: Config) -> dict[str, Any]:
  return {k: getattr(config, k)
          for k in ('patch_size', 'dim', 'depth', 'num_heads', 'mlp_dim')}


# ------------------------------------------------------------- adaptation


class Runner:
  """Runs the adaptations; compiled functions are kept per variant."""

  def __init__(self, config: Config, data: Mapping[str, Any],
               pretrained: Params, evaluator: steps.Evaluator):
    self.config = config
    self.data = data
    self.pretrained = pretrained
    self.evaluator = evaluator
    device = jax.devices()[0]
    self.device_data = {
        split: {k: jax.device_put(jnp.asarray(v), device)
                for k, v in data[split].items()}
        for split in ('a_train', 'b_train')}
    self._adapt: dict[str, Any] = {}
    self._loss_a: dict[str, Any] = {}
    self._features: dict[str, np.ndarray] | None = None
    # A's accuracy and loss (on the NTK subset) before adaptation.
    system = systems.System(config, Variant('a_model', 'linear_probe', 1.0))
    params = system.init(pretrained, jax.random.key(0))
    self.a_before = evaluator.accuracy(system, params, 'a')
    self.ntk_a = data_lib.ntk_subset_a(config, data)
    self.a_loss_before = self.a_loss(system, params)

  def a_loss(self, system: systems.System, params: Params) -> float:
    """A's mean cross-entropy on the NTK subset of A's test images."""
    name = 'a'  # Prompts are not used on A: one function for all.
    if name not in self._loss_a:
      self._loss_a[name] = jax.jit(lambda p, x, y: jnp.mean(
          cross_entropy(system.logits(p, x, 'a'), y)))
    return float(self._loss_a[name](params, self.ntk_a['image'],
                                    self.ntk_a['label']))

  def run(self, variant: Variant, k: int | None, seed: int) -> dict[str, Any]:
    """One adaptation run: its record."""
    config = self.config
    key = jax.random.key(seed)
    subset = data_lib.shot_indices(self.data['b_train']['label'], k,
                                   utils.name_key(key, 'shots'))
    if variant.kind == 'nearest_class_mean':
      return self._nearest_class_mean(variant, subset)
    system = systems.System(config, variant)
    params = system.init(self.pretrained,
                         utils.name_key(key, 'init', variant.name))
    trainable, frozen = system.split(params)
    extra: dict[str, Any] = {}
    if variant.kind == 'replay':
      buffer, state = steps.fill_buffer(variant, self.device_data['a_train'],
                                        utils.name_key(key, 'buffer'))
      extra = {'state': state}
    elif variant.kind == 'lwf':
      extra = {'body0': params['body'], 'head_a0': params['head_a']}
    idx = jnp.asarray(batching.shuffled_indices(
        subset, config.steps, config.batch_size,
        utils.name_key(key, 'batches')))
    keys = utils.name_key(key, 'steps', variant.name)
    keys = jax.random.split(keys, config.steps)
    b_train = self.device_data['b_train']
    args = (trainable, frozen, extra, idx, keys, b_train['image'],
            b_train['label'])
    if variant.name not in self._adapt:
      fn = steps.make_adapt(config, system)
      if variant.kind == 'replay':
        # The buffer's functions are static; its state is an argument.
        inner = fn
        fn = lambda t, f, e, *a: inner(t, f, {**e, 'buffer': buffer}, *a)
      start = time.perf_counter()
      self._adapt[variant.name] = (jax.jit(fn).lower(*args).compile(),
                                   time.perf_counter() - start)
    compiled, compile_s = self._adapt[variant.name]
    start = time.perf_counter()
    trainable, losses = compiled(*args)
    losses = np.asarray(jax.block_until_ready(losses))
    train_s = time.perf_counter() - start
    adapted = systems.System.merge(trainable, frozen)

    record: dict[str, Any] = {
        'b_accuracy': self.evaluator.accuracy(system, adapted, 'b'),
        'step_time_s': train_s / config.steps,
        'compile_time_s': compile_s,
        'first_loss': float(losses[0]),
        'final_loss': float(np.mean(losses[-max(1, config.steps // 10):])),
    }
    if variant.kind in ('linear_probe', 'prompt_tuning'):
      # A's head and body are the pre-trained ones, bitwise (checked), and
      # A is served without the prompt: A's evaluation is the one before.
      _check_unchanged(adapted, params)
      record['a_accuracy'] = self.a_before
      record['a_loss_change'] = 0.0
    else:
      record['a_accuracy'] = self.evaluator.accuracy(system, adapted, 'a')
      record['a_loss_change'] = (self.a_loss(system, adapted)
                                 - self.a_loss_before)
    if variant.kind == 'lora':
      # Switched off, the body is the pre-trained one: A as before.
      record['a_accuracy_lora_off'] = self.a_before
      record['forgetting_lora_off'] = (self.a_before
                                       - record['a_accuracy_lora_off'])
    record['forgetting'] = self.a_before - record['a_accuracy']
    return record

  def b_features(self) -> dict[str, np.ndarray]:
    """Frozen features of all of B's training and test images (cached)."""
    if self._features is None:
      system = systems.System(self.config,
                              Variant('a_model', 'linear_probe', 1.0))
      params = system.init(self.pretrained, jax.random.key(0))
      fn = jax.jit(lambda p, x: system.features(p, x, prompt=False))
      chunk = self.config.eval_batch_size
      out = {}
      for split in ('b_train', 'b_test'):
        feats = [np.asarray(fn(params, jnp.asarray(batch['image'])))[mask]
                 for batch, mask in utils.padded_batches(self.data[split],
                                                         chunk)]
        out[split] = np.concatenate(feats)
      self._features = out
    return self._features

  def _nearest_class_mean(self, variant: Variant,
                          subset: np.ndarray) -> dict[str, Any]:
    feats = self.b_features()
    labels = self.data['b_train']['label'][subset]
    start = time.perf_counter()
    x = feats['b_train'][subset]
    means = np.stack([x[labels == c].mean(axis=0)
                      for c in range(data_lib.NUM_CLASSES)])
    fit_s = time.perf_counter() - start
    test = feats['b_test']
    dist = ((test[:, None, :] - means[None]) ** 2).sum(-1)
    pred = np.argmax(-dist, axis=1)
    del variant
    return {
        'b_accuracy': float(np.mean(pred == self.data['b_test']['label'])),
        'step_time_s': 0.0, 'fit_time_s': fit_s, 'compile_time_s': 0.0,
        'first_loss': None, 'final_loss': None,
        # Nothing of A's model changes.
        'a_accuracy': self.a_before, 'a_loss_change': 0.0,
        'forgetting': 0.0,
    }


def _check_unchanged(adapted: Params, params: Params) -> None:
  for name in ('body', 'head_a'):
    same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)),
                        adapted[name], params[name])
    if not all(jax.tree.leaves(same)):
      raise AssertionError(f'{name} changed under a frozen paradigm.')


# --------------------------------------------------------------- prediction


def predict(config: Config, variant: Variant, data: Mapping[str, Any],
            pretrained: Params, runner: 'Runner') -> dict[str, Any]:
  """``predicted_forgetting`` of A under the variant's parametrisation.

  Task A: A's head on the first ``ntk_num_a`` test images of A. Task B:
  the first ``ntk_shots_b`` shots per class of seed ``seeds[0]``'s nested
  draw (in every K's training set), B's head; for ``lwf`` also the same
  inputs with A's head and A's pseudo-labels (argmax of the recorded
  outputs: a hard-label stand-in for the distillation term), for
  ``replay`` also as many images of the seed's A buffer with A's head and
  labels. Full-batch gradient descent with the variant's learning rate
  divided by ``1 - momentum`` (heavy ball's long-run step) for
  ``config.steps`` steps.
  """
  seed = config.seeds[0]
  key = jax.random.key(seed)
  system = systems.System(config, variant)
  params = system.init(pretrained, utils.name_key(key, 'init', variant.name))
  trainable, frozen = system.split(params)
  subset = data_lib.shot_indices(data['b_train']['label'], None,
                                 utils.name_key(key, 'shots'))
  n_b = config.ntk_shots_b * data_lib.NUM_CLASSES
  b_idx = subset[:n_b]
  x_b = jnp.asarray(data['b_train']['image'][b_idx])
  y_b = jnp.asarray(data['b_train']['label'][b_idx])
  is_b = jnp.ones([n_b], bool)
  if variant.kind == 'lwf':
    pseudo = jnp.argmax(system.logits(params, x_b, 'a'), axis=-1)
    x_b, y_b = jnp.concatenate([x_b, x_b]), jnp.concatenate([y_b, pseudo])
    is_b = jnp.concatenate([is_b, jnp.zeros([n_b], bool)])
  elif variant.kind == 'replay':
    _, state = steps.fill_buffer(variant, runner.device_data['a_train'],
                                 utils.name_key(key, 'buffer'))
    count = min(n_b, variant.buffer_size)
    x_b = jnp.concatenate([x_b, state.items['image'][:count]])
    y_b = jnp.concatenate([y_b, state.items['label'][:count]])
    is_b = jnp.concatenate([is_b, jnp.zeros([count], bool)])
  a = runner.ntk_a
  task_a = ({'image': a['image'], 'is_b': jnp.zeros([len(a['label'])], bool)},
            a['label'])
  task_b = ({'image': x_b, 'is_b': is_b}, y_b)
  apply_fn = lambda t, x: system.two_task_logits(
      systems.System.merge(t, frozen), x)
  lr = variant.learning_rate / (1.0 - config.momentum)
  fn = jax.jit(lambda t, ta, tb: metacf.jacobian.predicted_forgetting(
      apply_fn, t, ta, tb, lr=lr, num_steps=config.steps,
      loss='cross_entropy', chunk_size=config.ntk_chunk_size))
  start = time.perf_counter()
  value = float(fn(trainable, task_a, task_b))
  return {'predicted_forgetting': value,
          'num_a': int(len(a['label'])), 'num_b': int(len(y_b)),
          'lr': lr, 'num_steps': config.steps,
          'time_s': time.perf_counter() - start}


# ---------------------------------------------------------------- driver


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Pre-trains on A (cached), adapts every variant to B; resumable.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the figures
      (``_plots.figure_names``), ``checkpoints/`` (pre-training),
      ``runs/`` and ``predictions/`` (one JSON record each).
    raw_dir: Raw MNIST / Fashion-MNIST files (default ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir.

  Returns:
    The results written to ``results.json``.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  data = data_lib.load_data(config, raw_dir=raw_dir, data_dir=data_dir)
  pretrained, pre_meta = pretrain(config, data, workdir)
  evaluator = steps.Evaluator(config, data)
  runner = Runner(config, data, pretrained, evaluator)
  base_recipe = {'model': _model_recipe(config),
                 'pretrain': {'seed': config.pretrain_seed,
                              'epochs': config.pretrain_epochs,
                              'lr': config.pretrain_lr,
                              'batch_size': config.pretrain_batch_size},
                 'sizes': {k: len(v['label']) for k, v in data.items()},
                 'steps': config.steps, 'batch_size': config.batch_size,
                 'momentum': config.momentum,
                 'lora_targets': config.lora_targets,
                 'lora_alpha': config.lora_alpha}

  def path(item):
    variant, k, seed = item
    return os.path.join(workdir, 'runs', variant.name,
                        f'K{data_lib.shots_key(k)}_seed{seed}.json')

  items = [(v, k, s) for v in config.variants for k in config.shots
           for s in config.seeds]
  records_list = loop.resumable_records(
      items, path=path,
      recipe=lambda item: {**base_recipe, 'variant':
                           dataclasses.asdict(item[0]),
                           'shots': item[1], 'seed': item[2]},
      compute=lambda item: runner.run(*item),
      summary=lambda r: (f'B {r["b_accuracy"]:.3f} forgetting '
                         f'{r["forgetting"]:+.3f}'),
      desc='adaptation runs', progress_bar=config.progress_bar)
  records = {(v.name, data_lib.shots_key(k), s): r
             for (v, k, s), r in zip(items, records_list)}

  gradient = [v for v in config.variants if v.gradient]
  predictions = loop.resumable_records(
      gradient,
      path=lambda v: os.path.join(workdir, 'predictions', f'{v.name}.json'),
      recipe=lambda v: {**base_recipe, 'variant': dataclasses.asdict(v),
                        'seed': config.seeds[0],
                        'ntk_num_a': config.ntk_num_a,
                        'ntk_shots_b': config.ntk_shots_b},
      compute=lambda v: predict(config, v, data, pretrained, runner),
      summary=lambda r: f'predicted {r["predicted_forgetting"]:+.4f}',
      desc='NTK predictions', progress_bar=config.progress_bar)
  predicted = {v.name: p for v, p in zip(gradient, predictions)}

  variants = {}
  for v in config.variants:
    per = {(kk, s): records[v.name, kk, s]
           for kk in map(data_lib.shots_key, config.shots)
           for s in config.seeds}
    variants[v.name] = report.summarize(
        config, v, per, predicted.get(v.name),
        systems.param_counts(config, v, pretrained))
  paradigms: dict[str, list[str]] = {}
  for v in config.variants:
    paradigms.setdefault(v.kind, []).append(v.name)

  results = {
      'experiment': 'finetune_paradigms',
      **utils.run_info(),
      'config': utils.jsonable(dataclasses.asdict(config)),
      'sizes': {k: int(len(v['label'])) for k, v in data.items()},
      'pretrain': {'history': pre_meta['history'],
                   'train_time_s': pre_meta['train_time_s'],
                   'a_accuracy': runner.a_before,
                   'a_loss_ntk_subset': runner.a_loss_before},
      'paradigms': paradigms,
      'variants': variants,
      'correlation': report.correlation(config, variants),
  }
  results['wall_time_s'] = time.perf_counter() - wall_start
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_all(results, workdir)
  return results
