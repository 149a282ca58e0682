"""The ViT and each variant's adaptation system: which leaves it trains.

``System`` holds the full parameter tree of a variant (the pre-trained body,
A's head, B's new head, and LoRA factors or soft prompts), cuts it into
trainable and frozen leaves (``TRAINABLE``) and applies it to either task.
``param_counts`` counts what a variant trains and adds per task.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from experiments.common import models
from experiments.common import utils
from experiments.finetune_paradigms.configs import Config
from experiments.finetune_paradigms.configs import Variant
from experiments.finetune_paradigms.data import NUM_CLASSES
import metacf.adapters
import metacf.masks

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
