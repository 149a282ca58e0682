"""Models shared by the experiments (flax linen).

The library itself is model-agnostic: kernels take any ``apply_fn(params, x)``.
Models live here, one place for all experiments, as in flax's examples. A linen
module enters a kernel as ``apply_fn = lambda p, x: model.apply({'params': p},
x)``.

Example:

  model = MLP(widths=(800, 800))
  params = model.init(jax.random.key(0), jnp.zeros([1, 28, 28, 1]))['params']
  logits = model.apply({'params': params}, images)  # [batch, 10]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metacf import adapters
from metacf import layers


class MLP(nn.Module):
  """Fully connected ReLU classifier on flattened inputs.

  ``flatten -> [Dense -> ReLU -> Dropout] * len(widths) -> Dense``. Dropout is
  active only with ``train=True`` and a positive rate, and then needs a
  ``'dropout'`` PRNG key: ``model.apply(variables, x, train=True,
  rngs={'dropout': key})``.

  Attributes:
    widths: Number of units of each hidden layer, e.g. ``(1200, 1200)``.
    num_classes: Number of output logits.
    dropout_rate: Probability of dropping a hidden unit during training.
    input_dropout_rate: Probability of dropping an input pixel during training.
  """
  widths: Sequence[int]
  num_classes: int = 10
  dropout_rate: float = 0.0
  input_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *, train: bool = False
               ) -> jax.Array:
    """Returns logits of shape ``[batch, num_classes]``.

    Args:
      x: Inputs of shape ``[batch, ...]``, flattened to ``[batch, features]``.
      train: Whether dropout is active.
    """
    x = jnp.reshape(x, (jnp.shape(x)[0], -1))
    if self.input_dropout_rate > 0:
      x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class TransductiveBatchNorm(nn.Module):
  """BatchNorm with the statistics of the batch at hand, no running averages.

  MAML's BatchNorm (Finn et al. 2017): inside ``maml_loss`` the support set's
  statistics are used in the inner loop and the query set's in the outer
  loss; there is no model state to thread. ``scale``/``bias`` are parameters.
  ``fast=False`` computes the textbook formula with ``jnp`` (autodiff through
  the mean and variance) instead of :func:`metacf.layers.batch_norm`.
  """
  epsilon: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32  # As flax's layers (also under x64).
  fast: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,),
                       self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,),
                      self.param_dtype)
    if self.fast:
      return layers.batch_norm(x, scale, bias, epsilon=self.epsilon)
    # The textbook formula, differentiated by autodiff: the reference.
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon)
            * scale.reshape((1,) * (x.ndim - 1) + (-1,))
            + bias.reshape((1,) * (x.ndim - 1) + (-1,)))


class Conv4(nn.Module):
  """The few-shot Conv-4 (Vinyals et al. 2016; Finn et al. 2017).

  ``[conv 3x3 'SAME' -> BatchNorm (transductive) -> ReLU -> max-pool 2x2] x
  4 -> Dense``; 28x28 inputs end at 1x1xfeatures. With ``fast=True`` the
  convolutions, BatchNorms and pools are :mod:`metacf.layers` (im2col +
  matmul, closed-form BatchNorm derivative, max-pool by selects), which stay
  fast under ``vmap`` with per-task weights; with ``fast=False`` they are
  flax's defaults (``lax.conv_general_dilated``, ``reduce_window``) and the
  textbook BatchNorm formula. Both compute the same function.

  Attributes:
    num_classes: Number of output logits (the ways).
    features: Channels of every conv layer.
    fast: Use :mod:`metacf.layers` (default) or flax's conv and pool.
  """
  num_classes: int
  features: int = 64
  fast: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns logits ``[batch, num_classes]`` for images ``[batch, H, W, C]``."""
    conv = layers.conv_general_dilated if self.fast else None
    pool = layers.max_pool if self.fast else nn.max_pool
    for i in range(4):
      x = nn.Conv(self.features, (3, 3), padding='SAME',
                  conv_general_dilated=conv, name=f'conv{i}')(x)
      x = TransductiveBatchNorm(fast=self.fast, name=f'bn{i}')(x)
      x = pool(nn.relu(x), (2, 2), (2, 2))
    x = jnp.reshape(x, (x.shape[0], -1))
    return nn.Dense(self.num_classes, name='head')(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with plain ``nn.Dense`` projections.

  The query, key, value and output projections are separate ``nn.Dense``
  layers (``query``, ``key``, ``value``, ``out``) with 2-D ``[dim, dim]``
  kernels, so that each is a LoRA target of its own (Hu et al. 2021 adapt
  ``W_q, W_k, W_v, W_o`` this way).

  Attributes:
    num_heads: Attention heads; must divide the input's last dimension.
  """
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[batch, tokens, dim] -> [batch, tokens, dim]``."""
    batch, tokens, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f'SelfAttention: num_heads ({self.num_heads}) must '
                       f'divide dim ({dim}).')
    head_dim = dim // self.num_heads

    def project(name):
      y = nn.Dense(dim, name=name)(x)
      return y.reshape(batch, tokens, self.num_heads, head_dim)

    q, k, v = project('query'), project('key'), project('value')
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(
        jnp.asarray(head_dim, q.dtype))
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, tokens, dim)
    return nn.Dense(dim, name='out')(y)


class ViTBlock(nn.Module):
  """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, ``+ mlp(LN(.))``.

  Submodules: ``norm1``, ``attn`` (:class:`SelfAttention`), ``norm2``, and
  ``mlp`` with ``fc1`` (``[dim, mlp_dim]``, GELU) and ``fc2`` (``[mlp_dim,
  dim]``).
  """
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = x + SelfAttention(self.num_heads, name='attn')(
        nn.LayerNorm(name='norm1')(x))
    h = nn.LayerNorm(name='norm2')(x)
    h = _MLPBlock(self.mlp_dim, dim, name='mlp')(h)
    return x + h


class _MLPBlock(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(nn.Dense(self.hidden, name='fc1')(x))
    return nn.Dense(self.out, name='fc2')(x)


class ViT(nn.Module):
  """A small Vision Transformer (Dosovitskiy et al. 2021) with soft prompts.

  Images ``[batch, H, W, C]`` are cut into non-overlapping
  ``patch_size x patch_size`` patches (28x28 with 7x7 patches: 16 tokens),
  each flattened and embedded by ``embed`` (``nn.Dense``); a learnt class
  token ``cls`` is prepended and learnt position embeddings ``pos_embed``
  added; ``depth`` pre-LN blocks (``block_0``, ...); the final ``norm`` of
  the class token feeds the linear ``head``. Attention and MLP kernels are
  2-D (``block_i/attn/{query,key,value,out}/kernel``,
  ``block_i/mlp/{fc1,fc2}/kernel``), so ``r'(attn|mlp)/.*/kernel'`` selects
  them as LoRA targets.

  Prompts (prompt tuning, Lester et al. 2021; VPT, Jia et al. 2022) enter
  after the patch embedding, through ``metacf.adapters.prepend_prompt``, in
  front of the class token and without position embeddings:

  * ``prompt [P, dim]`` (shallow): prepended once, before the first block;
    its tokens then flow through every block like the others.
  * ``deep_prompts [depth, P, dim]`` (VPT-deep): ``deep_prompts[0]`` is
    prepended before the first block, and before block ``i > 0`` the first
    ``P`` tokens (the previous block's outputs at the prompt positions) are
    replaced by ``deep_prompts[i]``.

  A prompt of zero tokens (``[0, dim]``) gives the plain model.

  Example::

    model = ViT()
    params = model.init(key, jnp.zeros([1, 28, 28, 1]))['params']
    logits = model.apply({'params': params}, images)             # [B, 10]
    feats = model.apply({'params': params}, images, features_only=True)

  Attributes:
    num_classes: Outputs of ``head``.
    patch_size: Side of the square patches; must divide the image sides.
    dim: Token width.
    depth: Transformer blocks.
    num_heads: Attention heads per block.
    mlp_dim: Hidden units of each block's MLP.
  """
  num_classes: int = 10
  patch_size: int = 7
  dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, *,
               prompt: jax.typing.ArrayLike | None = None,
               deep_prompts: jax.typing.ArrayLike | None = None,
               features_only: bool = False) -> jax.Array:
    """Logits ``[batch, num_classes]`` (or features ``[batch, dim]``).

    Args:
      x: Images ``[batch, H, W, C]`` (floating).
      prompt: Optional shallow soft prompt ``[P, dim]``.
      deep_prompts: Optional deep prompts ``[depth, P, dim]``.
      features_only: Return the normalised class token (the head's input)
        instead of the logits; ``head`` is then not used.
    """
    x = jnp.asarray(x)
    batch, height, width, channels = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'ViT: patch_size ({p}) must divide the image sides, '
                       f'got {height}x{width}.')
    if prompt is not None and deep_prompts is not None:
      raise ValueError('ViT: give prompt or deep_prompts, not both.')
    if deep_prompts is not None and jnp.shape(deep_prompts)[0] != self.depth:
      raise ValueError(f'ViT: deep_prompts must have shape [depth={self.depth}'
                       f', P, dim], got {jnp.shape(deep_prompts)}.')
    patches = x.reshape(batch, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, (height // p) * (width // p), p * p * channels)
    tokens = nn.Dense(self.dim, name='embed')(patches)
    cls = self.param('cls', nn.initializers.normal(0.02), (1, self.dim),
                     tokens.dtype)
    tokens = adapters.prepend_prompt(cls, tokens)
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     tokens.shape[1:], tokens.dtype)
    tokens = tokens + pos[None]
    num_prompt = 0
    if prompt is not None:
      tokens = adapters.prepend_prompt(prompt, tokens)
      num_prompt = jnp.shape(prompt)[0]
    for i in range(self.depth):
      if deep_prompts is not None:
        if i == 0:
          num_prompt = jnp.shape(deep_prompts)[1]
          tokens = adapters.prepend_prompt(deep_prompts[0], tokens)
        else:
          tokens = adapters.prepend_prompt(deep_prompts[i],
                                           tokens[:, num_prompt:])
      tokens = ViTBlock(self.num_heads, self.mlp_dim, name=f'block_{i}')(
          tokens)
    features = nn.LayerNorm(name='norm')(tokens[:, num_prompt])
    if features_only:
      return features
    return nn.Dense(self.num_classes, name='head')(features)


# ----------------------------------------------------------------------------
# A small encoder-decoder Transformer for text (issue 30).


def shift_right(targets: jax.typing.ArrayLike, start_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing: ``start_id`` then ``targets[:, :-1]``.

  The decoder predicts ``targets[:, t]`` from ``targets[:, :t]``, so its input
  at position ``t`` is ``targets[:, t - 1]`` (and ``start_id`` at ``t = 0``).

  Args:
    targets: Integer tokens ``[batch, length]``.
    start_id: The start (BOS) token, a Python int.

  Returns:
    Tokens ``[batch, length]`` of ``targets``' dtype.

  Raises:
    ValueError: if ``targets`` is not 2-D.
  """
  targets = jnp.asarray(targets)
  if targets.ndim != 2:
    raise ValueError(f'shift_right: targets must have shape [batch, length], '
                     f'got {targets.shape}.')
  start = jnp.full((targets.shape[0], 1), start_id, targets.dtype)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


def encoder_mask(inputs: jax.typing.ArrayLike,
                 input_mask: jax.typing.ArrayLike | None = None,
                 prompt: jax.typing.ArrayLike | None = None) -> jax.Array:
  """The mask of :meth:`EncoderDecoder.encode`'s outputs, prompt included.

  Args:
    inputs: Tokens ``[batch, length]`` (only the shape is read).
    input_mask: Optional ``[batch, length]``, True at real tokens and False
      at padding; ``None`` means all real.
    prompt: Optional soft prompt ``[P, d_model]`` or ``[batch, P, d_model]``
      (only the shape is read).

  Returns:
    Bool ``[batch, P + length]``: True at the ``P`` prompt positions, then
    ``input_mask``.

  Raises:
    ValueError: if ``input_mask``'s shape is not ``inputs``'.
  """
  batch, length = jnp.shape(inputs)
  if input_mask is None:
    mask = jnp.ones((batch, length), jnp.bool_)
  else:
    mask = jnp.asarray(input_mask).astype(jnp.bool_)
    if mask.shape != (batch, length):
      raise ValueError(f'encoder_mask: input_mask must have the shape of '
                       f'inputs {(batch, length)}, got {mask.shape}.')
  if prompt is None:
    return mask
  num_prompt = jnp.shape(prompt)[-2]
  return jnp.concatenate([jnp.ones((batch, num_prompt), jnp.bool_), mask],
                         axis=1)


def sinusoidal_positions(max_len: int, dim: int) -> np.ndarray:
  """Vaswani et al.'s fixed position table, ``[max_len, dim]`` float32.

  ``sin(p / 10000^(2i/dim))`` in the first half of the features and ``cos``
  in the second (flax's WMT example, ``sinusoidal_init``, lays them out so).
  """
  half = dim // 2
  position = np.arange(max_len, dtype=np.float64)[:, None]
  div = np.exp(np.arange(half, dtype=np.float64) * -(np.log(10000.0) / half))
  table = np.zeros((max_len, dim), np.float64)
  table[:, :half] = np.sin(position * div)
  table[:, half:2 * half] = np.cos(position * div)
  return table.astype(np.float32)


# Token (and learnt position) embeddings ~ N(0, 1), as flax's WMT example and
# T5; with tied embeddings the logits are scaled by d_model**-0.5.
_EMBED_INIT = nn.initializers.normal(stddev=1.0)


class _Positions(nn.Module):
  """Adds position embeddings to ``[batch, length, d]``: learnt or fixed.

  Learnt positions are the param ``embedding`` ``[max_len, d]``, a name
  LoRA's default targets skip, as they skip token embeddings.
  """
  max_len: int
  kind: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    length, dim = x.shape[1], x.shape[2]
    if length > self.max_len:
      raise ValueError(f'EncoderDecoder: sequences must have length <= '
                       f'max_len = {self.max_len}, got {length}.')
    if self.kind == 'learnt':
      table = self.param('embedding', _EMBED_INIT, (self.max_len, dim),
                         jnp.float32)
    else:
      table = jnp.asarray(sinusoidal_positions(self.max_len, dim))
    return x + table[None, :length].astype(x.dtype)


class EncoderLayer(nn.Module):
  """Pre-LayerNorm encoder block: ``x + attn(LN(x))``, then ``+ mlp(LN(.))``.

  Submodules: ``norm1``, ``self_attn`` (``nn.MultiHeadDotProductAttention``),
  ``norm2``, ``mlp`` (``fc1`` GELU ``fc2``).
  """
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x [B, L, d]``, ``mask [B, 1, 1|L, L]`` (True: attend) -> same."""
    h = nn.LayerNorm(name='norm1')(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name='self_attn')(h, mask=mask)
    h = nn.LayerNorm(name='norm2')(x)
    return x + _MLPBlock(self.mlp_dim, x.shape[-1], name='mlp')(h)


class DecoderLayer(nn.Module):
  """Pre-LayerNorm decoder block: causal self-attention, cross-attention, MLP.

  Submodules: ``norm1``, ``self_attn``, ``norm2``, ``cross_attn`` (both
  ``nn.MultiHeadDotProductAttention``), ``norm3``, ``mlp``.
  """
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, y: jax.Array, encoded: jax.Array, self_mask: jax.Array,
               cross_mask: jax.Array) -> jax.Array:
    """``y [B, T, d]``, ``encoded [B, L, d]``, masks ``[B, 1, T, T|L]``."""
    h = nn.LayerNorm(name='norm1')(y)
    y = y + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name='self_attn')(h, mask=self_mask)
    h = nn.LayerNorm(name='norm2')(y)
    y = y + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name='cross_attn')(h, encoded,
                                                     mask=cross_mask)
    h = nn.LayerNorm(name='norm3')(y)
    return y + _MLPBlock(self.mlp_dim, y.shape[-1], name='mlp')(h)


class _Stack(nn.Module):
  """Positions, ``num_layers`` blocks (``layers_{i}``) and a final ``norm``.

  A container (``encoder``, ``decoder``): :class:`EncoderDecoder` calls its
  submodules in turn, so that ``encode`` and ``decode`` share one module.
  """
  layer_cls: type
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_len: int
  positions: str

  def setup(self):
    self.pos = _Positions(self.max_len, self.positions)
    self.layers = [self.layer_cls(self.num_heads, self.mlp_dim)
                   for _ in range(self.num_layers)]
    self.norm = nn.LayerNorm()


class EncoderDecoder(nn.Module):
  """A small pre-LN encoder-decoder Transformer (Vaswani et al. 2017).

  Built from flax's own ``nn.MultiHeadDotProductAttention`` (encoder
  self-attention, decoder causal self-attention, cross-attention), so that
  :mod:`metacf.adapters` meets its 3-D ``DenseGeneral`` kernels as it would a
  user's model: ``query``/``key``/``value`` ``[d_model, heads, head_dim]``,
  ``out`` ``[heads, head_dim, d_model]``.

  Layout of ``params`` (the ``/``-joined paths of :mod:`metacf.masks`)::

    token_embed/embedding                      [vocab, d]  (shared, see below)
    encoder/pos/embedding                      [max_len, d] (positions='learnt')
    encoder/layers_{i}/{norm1,norm2}/{scale,bias}
    encoder/layers_{i}/self_attn/{query,key,value,out}/{kernel,bias}
    encoder/layers_{i}/mlp/{fc1,fc2}/{kernel,bias}
    encoder/norm/{scale,bias}
    decoder/pos/embedding                      (positions='learnt')
    decoder/layers_{j}/{norm1,norm2,norm3}/{scale,bias}
    decoder/layers_{j}/{self_attn,cross_attn}/{query,key,value,out}/...
    decoder/layers_{j}/mlp/{fc1,fc2}/{kernel,bias}
    decoder/norm/{scale,bias}
    logits/{kernel,bias}                       [d, vocab] (tie_embeddings=False)

  Embeddings. One token table ``token_embed`` is shared by the encoder and the
  decoder inputs (as T5 and BART); with ``tie_embeddings=True`` (default) it
  is also the output projection, ``logits = y @ E.T / sqrt(d_model)`` (T5's
  scaling; flax's WMT example), else a separate ``logits`` Dense. Tables are
  initialised ``N(0, 1)``. Because the table is shared, freezing the encoder
  (``trainable=r'^(?!encoder/)'``) still moves its input embeddings: freeze
  ``token_embed`` too (``r'^(?!encoder/|token_embed/)'``) to keep the
  encoder's function fixed.

  Positions: ``'sinusoidal'`` (default, fixed, no parameters) or ``'learnt'``
  (``N(0, 1)`` tables, one for the encoder and one for the decoder); both are
  added to the token embeddings, absolute, for lengths up to ``max_len``.

  Masks. ``input_mask [B, L]`` (True at real tokens) masks the encoder's keys
  in self-attention and the decoder's cross-attention keys; the encoder's
  outputs at padded positions are set to 0, so whatever padded positions hold
  changes nothing anywhere. The decoder's self-attention is causal: logits at
  ``t`` depend on ``decoder_inputs[:, :t + 1]`` only, so right-padded decoder
  inputs need no mask (mask the loss instead).

  Soft prompts (prompt tuning, Lester et al. 2021). ``prompt`` ``[P, d]``
  (one for the batch) or ``[B, P, d]`` (one per example) is prepended to the
  encoder's input embeddings after the positions are added (prompt tokens
  have no position, the input keeps positions ``0..L-1``), and the mask is
  extended by ``P`` valid positions (:func:`encoder_mask`). ``prompt=None``
  is the plain model.

  Adapters (:mod:`metacf.adapters`, on ``params = variables['params']``):

  * LoRA: ``lora_init(key, params, rank, targets=r'(query|value)/kernel$|
    mlp/fc[12]/kernel$', fan_in_axes=flax_fan_in_axes)`` and
    ``with_lora(apply_fn, alpha=...)`` (``apply_fn = lambda p, *a, **k:
    model.apply({'params': p}, *a, **k)``); ``fan_in_axes`` is required, as
    the attention kernels are 3-D. The default targets (no ``targets=``) are
    every ``kernel``: embeddings, biases and norm scales are left out.
  * Prompt tuning: ``soft_prompt_init(key, P, d_model)`` passed as
    ``prompt=``.
  * Freezing: ``freeze(optax.adam(lr), params, trainable=...)`` with a regex
    on the paths above, e.g. ``r'^decoder/'``.

  Example::

    model = EncoderDecoder(vocab_size=67, max_len=256)
    variables = model.init(key, tokens, shift_right(targets, BOS))
    logits = model.apply(variables, tokens, shift_right(targets, BOS),
                         input_mask=tokens != PAD)           # [B, T, vocab]
    encoded = model.apply(variables, tokens, method='encode')  # [B, L, d]
    logits = model.apply(variables, encoded, encoder_mask(tokens),
                         decoder_inputs, method='decode')
    feats = model.apply(variables, tokens, input_mask=mask,
                        method='pooled_features')              # [B, d]

  Attributes:
    vocab_size: Number of tokens.
    d_model: Width of every token vector.
    num_heads: Attention heads (must divide ``d_model``).
    mlp_dim: Hidden units of each block's MLP.
    num_encoder_layers: Encoder blocks.
    num_decoder_layers: Decoder blocks.
    max_len: The longest encoder or decoder input (position tables).
    positions: ``'sinusoidal'`` or ``'learnt'``.
    tie_embeddings: Output projection = token table transposed (default) or
      a separate ``logits`` Dense.
  """
  vocab_size: int
  d_model: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  max_len: int = 512
  positions: str = 'sinusoidal'
  tie_embeddings: bool = True

  def setup(self):
    if self.positions not in ('sinusoidal', 'learnt'):
      raise ValueError(f"EncoderDecoder: positions must be 'sinusoidal' or "
                       f"'learnt', got {self.positions!r}.")
    if self.d_model % self.num_heads:
      raise ValueError(f'EncoderDecoder: num_heads ({self.num_heads}) must '
                       f'divide d_model ({self.d_model}).')
    self.token_embed = nn.Embed(self.vocab_size, self.d_model,
                                embedding_init=_EMBED_INIT)
    self.encoder = _Stack(EncoderLayer, self.num_encoder_layers,
                          self.num_heads, self.mlp_dim, self.max_len,
                          self.positions)
    self.decoder = _Stack(DecoderLayer, self.num_decoder_layers,
                          self.num_heads, self.mlp_dim, self.max_len,
                          self.positions)
    if not self.tie_embeddings:
      self.logits = nn.Dense(self.vocab_size)

  def encode(self, inputs: jax.typing.ArrayLike,
             input_mask: jax.typing.ArrayLike | None = None,
             prompt: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Encoder outputs ``[B, P + L, d]`` (``P = 0`` without a prompt).

    Args:
      inputs: Integer tokens ``[B, L]``.
      input_mask: Optional ``[B, L]``, True at real tokens (default: all).
      prompt: Optional soft prompt ``[P, d]`` or ``[B, P, d]``.

    Returns:
      The final-LayerNormed encoder states, 0 where :func:`encoder_mask` is
      False.
    """
    inputs = jnp.asarray(inputs)
    if inputs.ndim != 2:
      raise ValueError(f'EncoderDecoder: inputs must have shape [batch, '
                       f'length], got {inputs.shape}.')
    mask = encoder_mask(inputs, input_mask, prompt)
    x = self.encoder.pos(self.token_embed(inputs))
    if prompt is not None:
      prompt = jnp.asarray(prompt)
      if prompt.ndim == 2:
        x = adapters.prepend_prompt(prompt, x)
      elif prompt.ndim == 3 and prompt.shape[0] == x.shape[0]:
        x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
      else:
        raise ValueError(f'EncoderDecoder: prompt must have shape [P, d] or '
                         f'[batch, P, d], got {prompt.shape}.')
    attn_mask = mask[:, None, None, :]                     # keys only
    for layer in self.encoder.layers:
      x = layer(x, attn_mask)
    x = self.encoder.norm(x)
    return jnp.where(mask[:, :, None], x, jnp.zeros((), x.dtype))

  def decode(self, encoded: jax.typing.ArrayLike,
             encoder_mask: jax.typing.ArrayLike | None,
             decoder_inputs: jax.typing.ArrayLike) -> jax.Array:
    """Causal decoder logits ``[B, T, vocab]``.

    Args:
      encoded: :meth:`encode`'s outputs ``[B, S, d]``.
      encoder_mask: ``[B, S]`` bool, True at the positions to attend to
        (:func:`encoder_mask` of the same inputs and prompt), or ``None``
        for all.
      decoder_inputs: Integer tokens ``[B, T]`` (e.g. :func:`shift_right`
        of the targets).
    """
    encoded = jnp.asarray(encoded)
    decoder_inputs = jnp.asarray(decoder_inputs)
    if decoder_inputs.ndim != 2:
      raise ValueError(f'EncoderDecoder: decoder_inputs must have shape '
                       f'[batch, length], got {decoder_inputs.shape}.')
    length = decoder_inputs.shape[1]
    if encoder_mask is None:
      encoder_mask = jnp.ones(encoded.shape[:2], jnp.bool_)
    cross_mask = jnp.asarray(encoder_mask).astype(jnp.bool_)[:, None, None, :]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    y = self.decoder.pos(self.token_embed(decoder_inputs))
    for layer in self.decoder.layers:
      y = layer(y, encoded, causal, cross_mask)
    y = self.decoder.norm(y)
    if self.tie_embeddings:
      return self.token_embed.attend(y) * (self.d_model ** -0.5)
    return self.logits(y)

  def __call__(self, inputs: jax.typing.ArrayLike,
               decoder_inputs: jax.typing.ArrayLike,
               input_mask: jax.typing.ArrayLike | None = None,
               prompt: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Logits ``[B, T, vocab]``: :meth:`encode`, then :meth:`decode`."""
    encoded = self.encode(inputs, input_mask, prompt)
    return self.decode(encoded, encoder_mask(inputs, input_mask, prompt),
                       decoder_inputs)

  def pooled_features(self, inputs: jax.typing.ArrayLike,
                      input_mask: jax.typing.ArrayLike | None = None,
                      prompt: jax.typing.ArrayLike | None = None
                      ) -> jax.Array:
    """Mean of the encoder outputs over unmasked positions, ``[B, d]``.

    The features of a linear probe (feature extraction). With a prompt, its
    ``P`` positions count as unmasked.
    """
    encoded = self.encode(inputs, input_mask, prompt)
    mask = encoder_mask(inputs, input_mask, prompt)
    count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
    return jnp.sum(encoded, axis=1) / count.astype(encoded.dtype)
