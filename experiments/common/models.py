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
