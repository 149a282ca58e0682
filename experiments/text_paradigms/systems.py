"""The encoder-decoder, and how each variant parametrises and scores it.

A ``System`` holds the model and the pre-trained parameters; for a variant
it makes the trainable pytree and the functions of it that the training
step, the evaluation and ``metacf.jacobian.predicted_forgetting`` share:

* ``b_scores(t, tokens, mask) -> [N, 10]``: B's logits, trained with
  cross-entropy and read by argmax: the probe's head on the frozen
  encoder's pooled states or, text to text, the decoder's first-step logits
  of the ten names' first characters given the speech. The ten speakers'
  initials are distinct (G, D, M, R, P, C, K, I, J, L), so the first
  character names the speaker: this is rank classification of the names
  (T0, FLAN) with each name cut to the prefix that tells it apart, one
  decoder step instead of ten sequences. (Training on all of a name's
  tokens spends most of the loss on its spelling: measured, 300 steps of
  full fine-tuning learned the spelling and left the first character at
  chance, B 10-13%.)
* ``a_params(t)``: the single model deployed after adaptation, whose
  denoising loss measures the forgetting (LoRA merged; the pre-trained
  weights for the probe and the prompt, which leave them untouched).
"""

import copy
from typing import Any

import jax
import jax.numpy as jnp

from experiments.common import models
from experiments.common import utils
from experiments.text_paradigms import data as data_lib
from experiments.text_paradigms.configs import Config
from experiments.text_paradigms.configs import Variant
import metacf.adapters

Params = Any
LORA_TARGETS = r'(query|key|value|out)/kernel$|mlp/fc[12]/kernel$'


def make_model(config: Config, vocab_size: int) -> models.EncoderDecoder:
  return models.EncoderDecoder(
      vocab_size=vocab_size, d_model=config.d_model,
      num_heads=config.num_heads, mlp_dim=config.mlp_dim,
      num_encoder_layers=config.num_layers,
      num_decoder_layers=config.num_layers,
      max_len=max(config.seq_length, config.context_length) + 32)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``log softmax(logits)[..., targets]``, ``[..., T]``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


class System:
  """The model, its pre-trained weights and one variant's parametrisation."""

  def __init__(self, config: Config, vocab: data_lib.Vocab,
               speakers: tuple[str, ...], pretrained: Params,
               variant: Variant):
    self.config, self.variant = config, variant
    self.vocab = vocab
    self.model = make_model(config, vocab.size)
    self.pretrained = pretrained
    names, _ = data_lib.name_targets(vocab, speakers)
    if len(set(names[:, 0].tolist())) != len(speakers):
      raise ValueError(f'System: the speakers {speakers} must have distinct '
                       'first characters (B reads the initial).')
    self.initials = jnp.asarray(names[:, 0])     # [10]

  def bind(self, pretrained: Params) -> 'System':
    """This system with other pre-trained weights (e.g. traced ones, so
    that a jitted function takes them as an argument, not a constant)."""
    other = copy.copy(self)
    other.pretrained = pretrained
    return other

  # ------------------------------------------------------------ model

  def apply(self, params: Params, *args, **kwargs) -> jax.Array:
    return self.model.apply({'params': params}, *args, **kwargs)

  def denoise_logits(self, params: Params, inputs: jax.Array,
                     targets: jax.Array) -> jax.Array:
    """Teacher-forced decoder logits ``[B, T, V]``."""
    return self.apply(params, inputs, models.shift_right(targets,
                                                         data_lib.BOS),
                      input_mask=inputs != data_lib.PAD)

  def initial_scores(self, params: Params, tokens: jax.Array,
                     mask: jax.Array, prompt: jax.Array | None = None
                     ) -> jax.Array:
    """The first decoder step's logits of the ten initials: ``[N, 10]``."""
    start = jnp.full((tokens.shape[0], 1), data_lib.BOS, tokens.dtype)
    logits = self.apply(params, tokens, start, input_mask=mask,
                        prompt=prompt)
    return logits[:, 0, self.initials]

  # ---------------------------------------------------- parametrisation

  def init(self, key: jax.Array) -> Params:
    """The variant's trainable pytree at the start of adaptation."""
    v, d = self.variant, self.config.d_model
    if v.kind == 'probe':
      return {'head': {'kernel': jax.random.normal(key, (d, data_lib
                                                         .NUM_SPEAKERS))
                       * d ** -0.5,
                       'bias': jnp.zeros([data_lib.NUM_SPEAKERS])}}
    if v.kind == 'lora':
      return {'lora': metacf.adapters.lora_init(
          key, self.pretrained, v.rank, targets=LORA_TARGETS,
          fan_in_axes=metacf.adapters.flax_fan_in_axes)}
    if v.kind == 'prompt':
      table = self.pretrained['token_embed']['embedding']
      # Initialised from the embeddings of the characters (Lester et al.).
      chars = table[data_lib.NUM_SPECIAL:data_lib.NUM_SPECIAL
                    + len(self.vocab.chars)]
      return {'prompt': metacf.adapters.soft_prompt_init(
          key, v.prompt_tokens, d, embeddings=chars)}
    if v.kind in ('full', 'lwf', 'replay'):
      return {'params': self.pretrained}
    raise ValueError(f'System.init: {v.kind!r} has no trainable weights.')

  def a_params(self, t: Params) -> Params:
    """The deployed model's weights (denoising, forgetting)."""
    kind = self.variant.kind
    if kind == 'lora':
      return metacf.adapters.lora_merge(self.pretrained, t['lora'])
    if 'params' in t:
      return t['params']
    return self.pretrained

  def b_scores(self, t: Params, tokens: jax.Array,
               mask: jax.Array) -> jax.Array:
    """B's logits ``[N, 10]``."""
    kind = self.variant.kind
    if kind == 'probe':
      feats = self.apply(self.pretrained, tokens, mask,
                         method='pooled_features')
      return feats @ t['head']['kernel'] + t['head']['bias'][None, :]
    if kind == 'prompt':
      return self.initial_scores(self.pretrained, tokens, mask, t['prompt'])
    return self.initial_scores(self.a_params(t), tokens, mask)

  def num_params(self, t: Params) -> dict[str, int]:
    """Trainable parameters, and parameters added per extra task."""
    n = metacf.adapters.count_params(t)
    return {'trainable_params': n, 'params_per_task': n}


def pad_columns(scores: jax.Array, width: int) -> jax.Array:
  """``[N, C]`` to ``[N, width]`` with a constant -1e4 (probability 0):
  one output width for both of ``predicted_forgetting``'s tasks."""
  fill = jnp.full((scores.shape[0], width - scores.shape[1]), -1e4,
                  scores.dtype)
  return jnp.concatenate([scores, fill], axis=1)


def key_for(seed: int, *names: str | int) -> jax.Array:
  return utils.name_key(jax.random.key(seed), *[str(n) for n in names])

