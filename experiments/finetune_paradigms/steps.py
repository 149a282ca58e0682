"""The jitted adaptation loop, the replay buffer and test-set evaluation.

``make_adapt`` returns a variant's ``adapt``: all of its SGD steps on the
trainable leaves in one ``lax.scan``, with the loss of its paradigm (B's
cross-entropy, LwF's distillation, or replay of A's images); ``Evaluator``
computes test accuracies in jitted chunks, compiled once per task.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.common.losses import cross_entropy
from experiments.common import utils
from experiments.finetune_paradigms import data as data_lib
from experiments.finetune_paradigms.configs import Config
from experiments.finetune_paradigms.configs import Variant
from experiments.finetune_paradigms.systems import apply_head
from experiments.finetune_paradigms.systems import System
from experiments.finetune_paradigms.systems import to_float
import metacf.distill
import metacf.replay

Params = Any


# --------------------------------------------------------------- evaluation


class Evaluator:
  """Jitted test-set accuracies, compiled once per variant and task."""

  def __init__(self, config: Config, data: Mapping[str, Any]):
    self.config = config
    self.chunks = {task: data_lib.eval_chunks(data[f'{task}_test'],
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
      return jnp.mean(cross_entropy(logits, labels))
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
    return jnp.mean(cross_entropy(system.logits(params, images, 'b'),
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
