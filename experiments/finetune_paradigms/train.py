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
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from experiments.common import loop
from experiments.common import models
from experiments.common import utils
from experiments.finetune_paradigms import _plots
from experiments.finetune_paradigms.configs import Config
from experiments.finetune_paradigms.configs import Variant
import metacf.adapters
import metacf.distill
import metacf.jacobian
import metacf.masks
import metacf.replay

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
NUM_CLASSES = 10

Params = Any

# Which leaves of the adaptation system each gradient paradigm trains (a
# regex on the '/'-joined paths of {'body', 'head_a', 'head_b', 'lora',
# 'prompt'}); '{last}' is the last block.
TRAINABLE = {
    'linear_probe': r'^head_b/',
    'full_finetune': r'^(body|head_b)/',
    'partial_finetune': r'^(body/({last}|norm)|head_b)/',
    'lora': r'^(lora|head_b)/',
    'prompt_tuning': r'^(prompt$|head_b/)',
    'lwf': r'^(body|head_a|head_b)/',
    'replay': r'^(body|head_a|head_b)/',
}

# Paradigms under which A's model (body or A's head) changes.
CHANGES_A = ('full_finetune', 'partial_finetune', 'lora', 'lwf', 'replay')

# The lecture's table (feature extraction, full fine-tuning, prompt
# engineering, prompt tuning, low-rank adapters) mapped onto our variants.
# Words marked '*' are our reading, not quoted from the lecture.
LECTURE = {
    'linear_probe': ('feature extraction', 'Small', 'Good*', 'OK*'),
    'full_finetune': ('full fine-tuning', 'Huge', 'Bad*', 'Good*'),
    'nearest_class_mean': ('prompt engineering (stand-in)', 'None', 'Good*',
                           'OK*'),
    'prompt_tuning': ('prompt tuning', 'Small', 'Good*', 'OK*'),
    'lora': ('low-rank adapters', 'Small', 'Good*', 'Good*'),
}


def shots_key(k: int | None) -> str:
  """Results key of K: ``'10'``, ..., ``'all'``."""
  return 'all' if k is None else str(k)


# --------------------------------------------------------------------- data


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Real MNIST (A) and Fashion-MNIST (B): train and test splits."""
  a_train, a_test = utils.load_image_splits(
      'mnist', num_train=config.num_train_a, num_test=config.num_test_a,
      raw_dir=raw_dir, data_dir=data_dir)
  b_train, b_test = utils.load_image_splits(
      'fashion_mnist', num_train=config.num_train_b,
      num_test=config.num_test_b, raw_dir=raw_dir, data_dir=data_dir)
  return {'a_train': a_train, 'a_test': a_test, 'b_train': b_train,
          'b_test': b_test}


def shot_indices(labels: np.ndarray, k: int | None,
                 key: jax.Array) -> np.ndarray:
  """Indices of K examples per class, nested in K, in round-robin order.

  Each class's members are permuted once (by ``key``, not by K), and K-shot
  takes the first K of each, so the K = 10 set lies inside the K = 100 set,
  and so on; the result is ordered shot-major (shot 0 of every class, then
  shot 1, ...), so its first ``10 n`` entries are the first ``n`` shots.
  ``None``: every example.
  """
  rng = utils.numpy_rng(key)
  per_class = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    per_class.append(members[rng.permutation(len(members))])
  count = max(len(m) for m in per_class) if k is None else k
  if k is not None and min(len(m) for m in per_class) < k:
    raise ValueError(f'shot_indices: fewer than K={k} examples in a class.')
  order = [m[i] for i in range(count) for m in per_class if i < len(m)]
  return np.asarray(order, np.int32)


def batch_indices(subset: np.ndarray, steps: int, batch_size: int,
                  key: jax.Array) -> np.ndarray:
  """``[steps, batch_size]`` indices: epochs of permutations of ``subset``."""
  rng = utils.numpy_rng(key)
  needed = steps * batch_size
  orders = []
  while sum(len(o) for o in orders) < needed:
    orders.append(subset[rng.permutation(len(subset))])
  return np.concatenate(orders)[:needed].reshape(steps, batch_size)


def _chunks(split: Mapping[str, np.ndarray], chunk: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Test images, labels and mask as ``[num_chunks, chunk, ...]``."""
  batches = list(utils.padded_batches(split, chunk))
  images = np.stack([b['image'] for b, _ in batches])
  labels = np.stack([b['label'] for b, _ in batches])
  mask = np.stack([m for _, m in batches])
  return tuple(jax.device_put(jnp.asarray(a), jax.devices()[0])
               for a in (images, labels, mask))


# -------------------------------------------------------------------- model


def make_model(config: Config) -> models.ViT:
  return models.ViT(num_classes=NUM_CLASSES, patch_size=config.patch_size,
                    dim=config.dim, depth=config.depth,
                    num_heads=config.num_heads, mlp_dim=config.mlp_dim)


def to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 255.0


def apply_head(head: Params, features: jax.Array) -> jax.Array:
  """A linear head ``{'kernel', 'bias'}`` on features ``[N, dim]``."""
  return jnp.matmul(features, head['kernel']) + head['bias'][None]


class System:
  """The adaptation system of one variant: frozen + trainable leaves.

  The full parameter tree is ``{'body', 'head_a', 'head_b'}`` plus
  ``'lora'`` (LoRA) or ``'prompt'`` (prompt tuning); ``split`` cuts it into
  the trainable leaves and the frozen ones (``None`` in place of the
  others), ``merge`` puts them back together.
  """

  def __init__(self, config: Config, variant: Variant):
    self.config = config
    self.variant = variant
    self.model = make_model(config)
    pattern = TRAINABLE.get(variant.kind)
    self.pattern = (None if pattern is None else
                    pattern.format(last=f'block_{config.depth - 1}'))

  def init(self, pretrained: Params, key: jax.Array) -> Params:
    """The variant's parameters before adaptation (B's head is new)."""
    body = {k: v for k, v in pretrained.items() if k != 'head'}
    example = jnp.zeros([1, 28, 28, 1], jnp.float32)
    fresh = self.model.init(utils.name_key(key, 'head_b'), example)['params']
    params = {'body': body, 'head_a': pretrained['head'],
              'head_b': fresh['head']}
    v = self.variant
    if v.kind == 'lora':
      params['lora'] = metacf.adapters.lora_init(
          utils.name_key(key, 'lora'), body, v.rank,
          targets=self.config.lora_targets)
    elif v.kind == 'prompt_tuning':
      prompt_key = utils.name_key(key, 'prompt')
      if v.deep:
        params['prompt'] = jnp.stack([
            metacf.adapters.soft_prompt_init(k, v.prompt_tokens,
                                             self.config.dim)
            for k in jax.random.split(prompt_key, self.config.depth)])
      else:
        params['prompt'] = metacf.adapters.soft_prompt_init(
            prompt_key, v.prompt_tokens, self.config.dim)
    return params

  def mask(self, params: Params) -> Any:
    return metacf.masks.resolve_mask(self.pattern, params)

  def split(self, params: Params) -> tuple[Params, Params]:
    """``(trainable, frozen)``, each with ``None`` in place of the other's."""
    mask = self.mask(params)
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen

  @staticmethod
  def merge(trainable: Params, frozen: Params) -> Params:
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)

  def features(self, params: Params, images: jax.Array, *,
               adapted: bool = True, prompt: bool = True) -> jax.Array:
    """Class-token features; ``adapted=False``: LoRA switched off.

    ``prompt``: use the prompt (task B's input); A is served without it.
    """
    body = params['body']
    if adapted and 'lora' in params:
      body = metacf.adapters.lora_merge(body, params['lora'],
                                        alpha=self.config.lora_alpha)
    kwargs = {}
    if prompt and 'prompt' in params:
      kwargs['deep_prompts' if self.variant.deep else 'prompt'] = (
          params['prompt'])
    return self.model.apply({'params': body}, to_float(images),
                            features_only=True, **kwargs)

  def logits(self, params: Params, images: jax.Array, task: str, *,
             adapted: bool = True) -> jax.Array:
    """Logits of task ``'a'`` (A's head, no prompt) or ``'b'``."""
    feats = self.features(params, images, adapted=adapted,
                          prompt=task == 'b')
    return apply_head(params[f'head_{task}'], feats)

  def two_task_logits(self, params: Params, x: Mapping[str, jax.Array]
                      ) -> jax.Array:
    """One ``apply_fn`` for both tasks: ``x['is_b']`` picks the head."""
    feats_b = self.features(params, x['image'], prompt=True)
    feats_a = (self.features(params, x['image'], prompt=False)
               if 'prompt' in params else feats_b)
    return jnp.where(x['is_b'][:, None],
                     apply_head(params['head_b'], feats_b),
                     apply_head(params['head_a'], feats_a))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits,
                                                                labels)


# -------------------------------------------------------------- pretraining


def pretrain(config: Config, data: Mapping[str, Mapping[str, np.ndarray]],
             workdir: str) -> tuple[Params, dict[str, Any]]:
  """The ViT trained on MNIST; orbax checkpoint per epoch, reused."""
  model = make_model(config)
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
        logits = model.apply({'params': params}, to_float(images[batch_idx]))
        return jnp.mean(_cross_entropy(logits, labels[batch_idx]))
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


# --------------------------------------------------------------- evaluation


class Evaluator:
  """Jitted test-set accuracies, compiled once per variant and task."""

  def __init__(self, config: Config, data: Mapping[str, Any]):
    self.config = config
    self.chunks = {task: _chunks(data[f'{task}_test'],
                                 config.eval_batch_size)
                   for task in ('a', 'b')}
    self.sizes = {task: len(data[f'{task}_test']['label'])
                  for task in ('a', 'b')}
    self._fns: dict[tuple[str, bool, bool], Callable[..., jax.Array]] = {}

  def accuracy(self, system: System, params: Params, task: str, *,
               adapted: bool = True) -> float:
    """Accuracy on task's whole test set (A: A's head, no prompt)."""
    # Compiled per parameter structure (jit's cache), shared by variants.
    key = (task, adapted, system.variant.deep)
    if key not in self._fns:
      def count(params, images, labels, mask):
        def chunk(args):
          im, lab, m = args
          pred = jnp.argmax(system.logits(params, im, task, adapted=adapted),
                            axis=-1)
          return jnp.sum((pred == lab) & m, dtype=jnp.int32)
        return jnp.sum(jax.lax.map(chunk, (images, labels, mask)))
      self._fns[key] = jax.jit(count)
    correct = self._fns[key](params, *self.chunks[task])
    return int(correct) / self.sizes[task]


# ------------------------------------------------------------- adaptation


def make_adapt(config: Config, system: System
               ) -> Callable[..., tuple[Params, jax.Array]]:
  """``adapt(trainable, frozen, extra, idx, keys, images, labels)``.

  Runs ``config.steps`` SGD steps (one ``lax.scan``) on the trainable
  leaves only; returns them and the losses.
  """
  v = system.variant
  tx = optax.sgd(v.learning_rate, momentum=config.momentum)

  def loss_fn(trainable, frozen, extra, images, labels, key):
    params = System.merge(trainable, frozen)
    if v.kind == 'replay':
      key_sample, key_mix = jax.random.split(key)
      replayed = extra['buffer'].sample(key_sample, extra['state'],
                                        images.shape[0])
      batch = {'image': images, 'label': labels}
      batch, is_replay = metacf.replay.mix_replay(key_mix, batch, replayed,
                                                  v.replay_fraction)
      images, labels = batch['image'], batch['label']
      feats = system.features(params, images)
      logits = jnp.where(is_replay[:, None],
                         apply_head(params['head_a'], feats),
                         apply_head(params['head_b'], feats))
      return jnp.mean(_cross_entropy(logits, labels))
    if v.kind == 'lwf':
      feats = system.features(params, images)
      # A's head on B's inputs before any training: the recorded outputs.
      recorded = jax.lax.stop_gradient(apply_head(
          extra['head_a0'], system.model.apply(
              {'params': extra['body0']}, to_float(images),
              features_only=True)))
      return jnp.mean(metacf.distill.lwf_loss(
          apply_head(params['head_b'], feats), labels,
          apply_head(params['head_a'], feats), recorded,
          temperature=v.temperature, old_weight=v.old_weight))
    return jnp.mean(_cross_entropy(system.logits(params, images, 'b'),
                                   labels))

  def adapt(trainable, frozen, extra, idx, keys, images, labels):
    opt_state = tx.init(trainable)

    def step(carry, xs):
      trainable, opt_state = carry
      batch_idx, key = xs
      loss, grads = jax.value_and_grad(loss_fn)(
          trainable, frozen, extra, images[batch_idx], labels[batch_idx], key)
      updates, opt_state = utils.optimizer_update(tx, grads, opt_state,
                                                  trainable)
      return (optax.apply_updates(trainable, updates), opt_state), loss

    (trainable, _), losses = jax.lax.scan(step, (trainable, opt_state),
                                          (idx, keys))
    return trainable, losses

  return adapt


def fill_buffer(variant: Variant, a_train: Mapping[str, jax.Array],
                key: jax.Array) -> tuple[Any, Any]:
  """A reservoir of ``buffer_size`` A training images (a shuffled stream)."""
  buffer = metacf.replay.replay_buffer(variant.buffer_size)
  images, labels = a_train['image'], a_train['label']
  state = buffer.init({'image': images[0], 'label': labels[0]})
  order = jax.random.permutation(utils.name_key(key, 'order'), len(labels))
  add = jax.jit(buffer.add, donate_argnums=1)
  chunk = 1000
  for i, start in enumerate(range(0, len(labels), chunk)):
    idx = order[start:start + chunk]
    state = add(utils.name_key(key, 'add', i), state,
                {'image': images[idx], 'label': labels[idx]})
  return buffer, state


class Runner:
  """Runs the adaptations; compiled functions are kept per variant."""

  def __init__(self, config: Config, data: Mapping[str, Any],
               pretrained: Params, evaluator: Evaluator):
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
    system = System(config, Variant('a_model', 'linear_probe', 1.0))
    params = system.init(pretrained, jax.random.key(0))
    self.a_before = evaluator.accuracy(system, params, 'a')
    self.ntk_a = ntk_subset_a(config, data)
    self.a_loss_before = self.a_loss(system, params)

  def a_loss(self, system: System, params: Params) -> float:
    """A's mean cross-entropy on the NTK subset of A's test images."""
    name = 'a'  # Prompts are not used on A: one function for all.
    if name not in self._loss_a:
      self._loss_a[name] = jax.jit(lambda p, x, y: jnp.mean(_cross_entropy(
          system.logits(p, x, 'a'), y)))
    return float(self._loss_a[name](params, self.ntk_a['image'],
                                    self.ntk_a['label']))

  def run(self, variant: Variant, k: int | None, seed: int) -> dict[str, Any]:
    """One adaptation run: its record."""
    config = self.config
    key = jax.random.key(seed)
    subset = shot_indices(self.data['b_train']['label'], k,
                          utils.name_key(key, 'shots'))
    if variant.kind == 'nearest_class_mean':
      return self._nearest_class_mean(variant, subset)
    system = System(config, variant)
    params = system.init(self.pretrained,
                         utils.name_key(key, 'init', variant.name))
    trainable, frozen = system.split(params)
    extra: dict[str, Any] = {}
    if variant.kind == 'replay':
      buffer, state = fill_buffer(variant, self.device_data['a_train'],
                                  utils.name_key(key, 'buffer'))
      extra = {'state': state}
    elif variant.kind == 'lwf':
      extra = {'body0': params['body'], 'head_a0': params['head_a']}
    idx = jnp.asarray(batch_indices(subset, config.steps, config.batch_size,
                                    utils.name_key(key, 'batches')))
    keys = utils.name_key(key, 'steps', variant.name)
    keys = jax.random.split(keys, config.steps)
    b_train = self.device_data['b_train']
    args = (trainable, frozen, extra, idx, keys, b_train['image'],
            b_train['label'])
    if variant.name not in self._adapt:
      fn = make_adapt(config, system)
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
    adapted = System.merge(trainable, frozen)

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
      system = System(self.config, Variant('a_model', 'linear_probe', 1.0))
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
                      for c in range(NUM_CLASSES)])
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


def ntk_subset_a(config: Config, data: Mapping[str, Any]) -> dict[str, Any]:
  n = min(config.ntk_num_a, len(data['a_test']['label']))
  return {'image': jnp.asarray(data['a_test']['image'][:n]),
          'label': jnp.asarray(data['a_test']['label'][:n])}


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
  system = System(config, variant)
  params = system.init(pretrained, utils.name_key(key, 'init', variant.name))
  trainable, frozen = system.split(params)
  subset = shot_indices(data['b_train']['label'], None,
                        utils.name_key(key, 'shots'))
  n_b = config.ntk_shots_b * NUM_CLASSES
  b_idx = subset[:n_b]
  x_b = jnp.asarray(data['b_train']['image'][b_idx])
  y_b = jnp.asarray(data['b_train']['label'][b_idx])
  is_b = jnp.ones([n_b], bool)
  if variant.kind == 'lwf':
    pseudo = jnp.argmax(system.logits(params, x_b, 'a'), axis=-1)
    x_b, y_b = jnp.concatenate([x_b, x_b]), jnp.concatenate([y_b, pseudo])
    is_b = jnp.concatenate([is_b, jnp.zeros([n_b], bool)])
  elif variant.kind == 'replay':
    _, state = fill_buffer(variant, runner.device_data['a_train'],
                           utils.name_key(key, 'buffer'))
    count = min(n_b, variant.buffer_size)
    x_b = jnp.concatenate([x_b, state.items['image'][:count]])
    y_b = jnp.concatenate([y_b, state.items['label'][:count]])
    is_b = jnp.concatenate([is_b, jnp.zeros([count], bool)])
  a = runner.ntk_a
  task_a = ({'image': a['image'], 'is_b': jnp.zeros([len(a['label'])], bool)},
            a['label'])
  task_b = ({'image': x_b, 'is_b': is_b}, y_b)
  apply_fn = lambda t, x: system.two_task_logits(System.merge(t, frozen), x)
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


# ------------------------------------------------------------ param counts


def param_counts(config: Config, variant: Variant,
                 pretrained: Params) -> dict[str, int]:
  """Trainable parameters per task and parameters added per extra task.

  Added per extra task: what must be stored, besides what already serves
  the other tasks, to serve one more: a full copy (full), the changed block
  (partial), the head (probe; and for LwF and replay, whose body is shared
  and overwritten), adapters + head (LoRA), prompt + head (prompts), the
  class means (nearest class mean).
  """
  if variant.kind == 'nearest_class_mean':
    return {'trainable_params': 0,
            'params_added_per_task': NUM_CLASSES * config.dim}
  system = System(config, variant)
  # Shapes only: count_params counts jax.ShapeDtypeStruct leaves.
  params = jax.eval_shape(lambda: system.init(pretrained, jax.random.key(0)))
  trainable, _ = system.split(params)
  count = metacf.adapters.count_params(trainable)
  if variant.kind in ('lwf', 'replay'):
    added = metacf.adapters.count_params(params['head_b'])
  else:
    added = count
  return {'trainable_params': count, 'params_added_per_task': added}


# ---------------------------------------------------------------- driver


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


def summarize(config: Config, variant: Variant,
              records: Mapping[tuple[str, int], Mapping[str, Any]],
              prediction: Mapping[str, Any] | None,
              counts: Mapping[str, int]) -> dict[str, Any]:
  out: dict[str, Any] = {'paradigm': variant.kind,
                         'variant': dataclasses.asdict(variant), **counts,
                         'predicted_forgetting': None if prediction is None
                         else prediction['predicted_forgetting'],
                         'prediction': prediction, 'shots': {}}
  for k in config.shots:
    rows = [records[shots_key(k), s] for s in config.seeds]
    cell: dict[str, Any] = {}
    keys = ['b_accuracy', 'a_accuracy', 'forgetting', 'a_loss_change',
            'step_time_s']
    if variant.kind == 'lora':
      keys += ['a_accuracy_lora_off', 'forgetting_lora_off']
    for name in keys:
      values = [r[name] for r in rows]
      cell[name], cell[f'{name}_std'] = _mean_std(values)
      cell[f'{name}_per_seed'] = values
    cell['final_loss_per_seed'] = [r['final_loss'] for r in rows]
    out['shots'][shots_key(k)] = cell
  return out


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
  data = load_data(config, raw_dir=raw_dir, data_dir=data_dir)
  pretrained, pre_meta = pretrain(config, data, workdir)
  evaluator = Evaluator(config, data)
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
                        f'K{shots_key(k)}_seed{seed}.json')

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
  records = {(v.name, shots_key(k), s): r
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
           for kk in map(shots_key, config.shots) for s in config.seeds}
    variants[v.name] = summarize(config, v, per, predicted.get(v.name),
                                 param_counts(config, v, pretrained))
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
      'correlation': correlation(config, variants),
  }
  results['wall_time_s'] = time.perf_counter() - wall_start
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_all(results, workdir)
  return results


def correlation(config: Config, variants: Mapping[str, Any]
                ) -> dict[str, Any]:
  """Spearman of predicted vs measured forgetting over gradient variants x K."""
  points = []
  for name, v in variants.items():
    if v['predicted_forgetting'] is None:
      continue
    for k, cell in v['shots'].items():
      points.append({'variant': name, 'shots': k,
                     'predicted': v['predicted_forgetting'],
                     'measured_accuracy_drop': cell['forgetting'],
                     'measured_loss_change': cell['a_loss_change']})
  out: dict[str, Any] = {'points': points, 'num_points': len(points)}
  # Also over the variants whose A model changes at all (not the probe or
  # the prompts, whose A outputs do not depend on what they train).
  changing = [p for p in points
              if variants[p['variant']]['paradigm'] in CHANGES_A]
  out['num_points_changing_a'] = len(changing)
  for suffix, subset in (('', points), ('_changing_a', changing)):
    pred = np.asarray([p['predicted'] for p in subset])
    for key in ('measured_accuracy_drop', 'measured_loss_change'):
      meas = np.asarray([p[key] for p in subset])
      name = f'spearman_{key}{suffix}'
      if len(subset) > 2 and np.ptp(pred) > 0 and np.ptp(meas) > 0:
        rho, pval = stats.spearmanr(pred, meas)
        out[name], out[f'{name}_p'] = float(rho), float(pval)
      else:
        out[name], out[f'{name}_p'] = None, None
  del config
  return out


# ------------------------------------------------------------------- table


def _pct(x: float | None, std: float | None = None) -> str:
  if x is None:
    return '-'
  if std is None:
    return f'{100 * x:.1f}'
  return f'{100 * x:.1f} ± {100 * std:.1f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: the measured cells per variant and K, then the lecture table."""
  shots = [shots_key(k) for k in results['config']['shots']]
  lines = [f'A = MNIST, pre-trained: A test accuracy '
           f'{_pct(results["pretrain"]["a_accuracy"])}%. '
           f'B = Fashion-MNIST; mean ± std over '
           f'{len(results["config"]["seeds"])} seeds, accuracies in %.', '']
  header = ['variant', 'trainable', 'added/task']
  for k in shots:
    header += [f'B acc K={k}', f'forget K={k}']
  header += ['ms/step', 'predicted ΔL_A']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|---|' + '---:|' * (len(header) - 1))
  for name, v in results['variants'].items():
    row = [name, f'{v["trainable_params"]:,}',
           f'{v["params_added_per_task"]:,}']
    for k in shots:
      c = v['shots'][k]
      row += [_pct(c['b_accuracy'], c['b_accuracy_std']),
              _pct(c['forgetting'], c['forgetting_std'])]
    step_ms = np.mean([v['shots'][k]['step_time_s'] for k in shots]) * 1e3
    row.append(f'{step_ms:.1f}')
    p = v['predicted_forgetting']
    row.append('-' if p is None else f'{p:+.4f}')
    lines.append('| ' + ' | '.join(row) + ' |')
  lora = [n for n, v in results['variants'].items()
          if v['paradigm'] == 'lora']
  if lora:
    lines += ['', 'LoRA, A accuracy (%) with the adapters merged (deployed) '
              'and switched off:', '',
              '| variant | ' + ' | '.join(f'merged K={k} | off K={k}'
                                          for k in shots) + ' |',
              '|---|' + '---:|' * (2 * len(shots))]
    for n in lora:
      c = results['variants'][n]['shots']
      lines.append(f'| {n} | ' + ' | '.join(
          f'{_pct(c[k]["a_accuracy"])} | {_pct(c[k]["a_accuracy_lora_off"])}'
          for k in shots) + ' |')
  corr = results['correlation']
  lines += ['', f'Predicted vs measured forgetting over '
            f'{corr["num_points"]} (variant, K) points: Spearman '
            f'{_fmt(corr["spearman_measured_accuracy_drop"])} (accuracy '
            f'drop), {_fmt(corr["spearman_measured_loss_change"])} (loss '
            f'change on the same A subset); over the '
            f'{corr["num_points_changing_a"]} points of the variants whose A '
            f'model changes: '
            f'{_fmt(corr["spearman_measured_accuracy_drop_changing_a"])} and '
            f'{_fmt(corr["spearman_measured_loss_change_changing_a"])}.']
  lines += ['', lecture_table(results)]
  return '\n'.join(lines)


def _fmt(x: float | None) -> str:
  return '-' if x is None else f'{x:.3f}'


def lecture_table(results: Mapping[str, Any]) -> str:
  """The lecture's table, measured cells beside its words."""
  shots = [shots_key(k) for k in results['config']['shots']]
  few, many = shots[0], shots[-1]
  lines = ['| lecture row | ours | trainable params (lecture) | measured | '
           'multi-task scalability (lecture) | added per task | '
           f'performance (lecture) | B acc K={few} / K={many} | '
           f'forgetting K={few} / K={many} |',
           '|---|---|---|---:|---|---:|---|---:|---:|']
  for kind, (row, params, scal, perf) in LECTURE.items():
    names = results['paradigms'].get(kind, [])
    for name in names:
      v = results['variants'][name]
      c = v['shots']
      lines.append(
          f'| {row} | {name} | {params} | {v["trainable_params"]:,} | '
          f'{scal} | {v["params_added_per_task"]:,} | {perf} | '
          f'{_pct(c[few]["b_accuracy"])} / {_pct(c[many]["b_accuracy"])} | '
          f'{_pct(c[few]["forgetting"])} / {_pct(c[many]["forgetting"])} |')
  return '\n'.join(lines)
