"""The encoder-decoder, and how each variant parametrises and scores it.

A ``System`` holds the model and the pre-trained parameters; for a variant
it makes the trainable pytree and the functions of it that the training
step, the evaluation and ``metacf.jacobian.predicted_forgetting`` share:

* ``b_rows(t, tokens, mask, labels) -> ([R, C], [R], weights [R])``: what
  B is trained on: the probe's head logits (one row per speech, 10 classes)
  or, text to text, the decoder's logits at each token of the speaker's
  name and EOS (one row per token, the vocabulary; padding rows weigh 0).
  B's loss is the weighted mean cross-entropy of the rows;
* ``b_scores(t, tokens, mask) -> [N, 10]``: B's prediction: the probe's
  logits, or each of the ten names' decoder log-likelihood given the speech
  (rank classification);
* ``a_params(t)``: the single model deployed after adaptation, whose
  denoising loss measures the forgetting (LoRA merged; the pre-trained
  weights for the probe and the prompt, which leave them untouched).
"""

from collections.abc import Callable
import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    names, names_mask = data_lib.name_targets(vocab, speakers)
    self.names = jnp.asarray(names)              # [10, T]
    self.names_mask = jnp.asarray(names_mask)    # [10, T]

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

  def name_scores(self, params: Params, tokens: jax.Array, mask: jax.Array,
                  prompt: jax.Array | None = None) -> jax.Array:
    """Log-likelihood of each of the ten names (then EOS): ``[N, 10]``."""
    encoded = self.apply(params, tokens, mask, prompt, method='encode')
    enc_mask = models.encoder_mask(tokens, mask, prompt)
    n, c = tokens.shape[0], self.names.shape[0]
    encoded = jnp.repeat(encoded, c, axis=0)
    enc_mask = jnp.repeat(enc_mask, c, axis=0)
    names = jnp.tile(self.names, (n, 1))
    logits = self.apply(params, encoded, enc_mask,
                        models.shift_right(names, data_lib.BOS),
                        method='decode')
    logp = token_log_probs(logits, names) * jnp.tile(self.names_mask, (n, 1))
    return jnp.sum(logp, axis=-1).reshape(n, c)

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
      return feats @ t['head']['kernel'] + t['head']['bias']
    if kind == 'prompt':
      return self.name_scores(self.pretrained, tokens, mask, t['prompt'])
    return self.name_scores(self.a_params(t), tokens, mask)

  def b_rows(self, t: Params, tokens: jax.Array, mask: jax.Array,
             labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """B's training rows: ``(logits [R, C], labels [R], weights [R])``."""
    if self.variant.kind == 'probe':
      return (self.b_scores(t, tokens, mask), labels,
              jnp.ones(labels.shape, jnp.float32))
    targets = self.names[labels]                       # [N, T]
    prompt = t['prompt'] if self.variant.kind == 'prompt' else None
    params = (self.pretrained if self.variant.kind == 'prompt'
              else self.a_params(t))
    logits = self.apply(params, tokens,
                        models.shift_right(targets, data_lib.BOS),
                        input_mask=mask, prompt=prompt)
    return (logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
            self.names_mask[labels].reshape(-1).astype(jnp.float32))

  def num_params(self, t: Params) -> dict[str, int]:
    """Trainable parameters, and parameters added per extra task."""
    n = metacf.adapters.count_params(t)
    return {'trainable_params': n, 'params_per_task': n}


def flat_rows(mask: np.ndarray) -> np.ndarray:
  """Flat indices of the True entries (static rows for the NTK)."""
  return np.flatnonzero(np.asarray(mask).reshape(-1))


def pad_columns(scores: jax.Array, width: int) -> jax.Array:
  """``[N, C]`` to ``[N, width]`` with a constant -1e4 (probability 0):
  one output width for both of ``predicted_forgetting``'s tasks."""
  fill = jnp.full((scores.shape[0], width - scores.shape[1]), -1e4,
                  scores.dtype)
  return jnp.concatenate([scores, fill], axis=1)


def key_for(seed: int, *names: str | int) -> jax.Array:
  return utils.name_key(jax.random.key(seed), *[str(n) for n in names])


ScoreFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
