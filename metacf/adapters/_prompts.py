"""Soft prompts (prompt tuning, Lester et al. 2021): init and prepending.

A soft prompt is a trainable ``[num_tokens, dim]`` array prepended to the
(frozen) model's input embeddings; only the prompt is trained. Example::

  prompt = metacf.adapters.soft_prompt_init(key, 20, d_model,
                                            embeddings=table[:5000])

  def loss_fn(prompt, params, tokens, y):
    h = metacf.adapters.prepend_prompt(prompt, table[tokens])  # [B, 20 + L, D]
    return loss(apply_fn(params, h), y)   # extend the attention mask by 20

  grads = jax.grad(loss_fn)(prompt, params, tokens, y)

Deep prompts (VPT-deep, Jia et al. 2022: new prompt tokens at the input of
every transformer layer, replacing the previous layer's outputs at those
positions) live in the model: keep one ``[num_tokens, dim]`` array per layer,
made with :func:`soft_prompt_init`, and in each block replace the first
``num_tokens`` positions of the hidden states (or :func:`prepend_prompt` at
the first block and overwrite those positions after).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks

# Lester et al. 2021, "Random Uniform" initialisation: U[-0.5, 0.5].
_UNIFORM_BOUND = 0.5


def soft_prompt_init(key: jax.Array, num_tokens: int, dim: int, *,
                     embeddings: jax.typing.ArrayLike | None = None,
                     dtype: Any = None) -> jax.Array:
  """Initialises a soft prompt of shape ``[num_tokens, dim]``.

  Two of the paper's initialisations:

  * ``embeddings=None``: random uniform, ``U[-0.5, 0.5]`` per entry (Lester et
    al.'s "random uniform" initialisation);
  * ``embeddings`` a ``[vocab_size, dim]`` table: ``num_tokens`` rows of the
    table drawn uniformly at random, without replacement when ``num_tokens <=
    vocab_size`` (with replacement otherwise). This is "sampled vocab"; the
    paper samples from the 5,000 most common tokens, i.e. pass
    ``embeddings=table[most_common[:5000]]``.

  Args:
    key: A PRNG key.
    num_tokens: The prompt length ``P``, a Python int ``>= 1``.
    dim: The embedding size ``D``, a Python int ``>= 1``.
    embeddings: Optional ``[vocab_size, dim]`` embedding table to sample from.
    dtype: The output dtype; default float32 for the random init and the
      table's dtype for sampled rows.

  Returns:
    The prompt, shape ``[num_tokens, dim]``.

  Raises:
    TypeError: if ``num_tokens`` or ``dim`` is not a Python int.
    ValueError: if ``num_tokens < 1`` or ``dim < 1``, or ``embeddings`` is
      not a non-empty ``[vocab_size, dim]`` table.

  References:
    Lester et al, `The Power of Scale for Parameter-Efficient Prompt Tuning
    <https://arxiv.org/abs/2104.08691>`_, 2021
  """
  fn = 'soft_prompt_init'
  num_tokens = checks.check_int(num_tokens, 'num_tokens', fn, min_value=1)
  dim = checks.check_int(dim, 'dim', fn, min_value=1)
  if embeddings is None:
    dtype = jnp.float32 if dtype is None else dtype
    return jax.random.uniform(key, (num_tokens, dim), dtype, -_UNIFORM_BOUND,
                              _UNIFORM_BOUND)
  shape = np.shape(embeddings)
  if len(shape) != 2 or shape[1] != dim or shape[0] < 1:
    raise ValueError(
        f'{fn}: embeddings must have shape [vocab_size, dim] with dim = {dim} '
        f'and vocab_size >= 1, got {shape}.')
  vocab_size = shape[0]
  rows = jax.random.choice(key, vocab_size, (num_tokens,),
                           replace=num_tokens > vocab_size)
  prompt = jnp.take(jnp.asarray(embeddings), rows, axis=0)
  return prompt if dtype is None else prompt.astype(dtype)


def prepend_prompt(prompt: jax.typing.ArrayLike,
                   embeddings: jax.typing.ArrayLike) -> jax.Array:
  """Prepends a soft prompt to every sequence of a batch of embeddings.

  Args:
    prompt: Shape ``[num_tokens, dim]``; cast to ``embeddings``' dtype (the
      gradient flows back through the cast).
    embeddings: Shape ``[batch, length, dim]``.

  Returns:
    Shape ``[batch, num_tokens + length, dim]``: the prompt, then the
    sequence. Attention/padding masks need ``num_tokens`` valid positions
    prepended to match.

  Raises:
    ValueError: if the ranks are not 2 and 3, or the last dimensions differ.

  References:
    Lester et al, `The Power of Scale for Parameter-Efficient Prompt Tuning
    <https://arxiv.org/abs/2104.08691>`_, 2021
  """
  fn = 'prepend_prompt'
  if np.ndim(prompt) != 2:
    raise ValueError(
        f'{fn}: prompt must have shape [num_tokens, dim], got '
        f'{np.shape(prompt)}.')
  if np.ndim(embeddings) != 3:
    raise ValueError(
        f'{fn}: embeddings must have shape [batch, length, dim], got '
        f'{np.shape(embeddings)}.')
  num_tokens, dim = np.shape(prompt)
  batch, _, emb_dim = np.shape(embeddings)
  if dim != emb_dim:
    raise ValueError(
        f'{fn}: prompt and embeddings must have the same last dimension '
        f'(dim), got {dim} and {emb_dim}.')
  embeddings = jnp.asarray(embeddings)
  prompt = jnp.asarray(prompt).astype(embeddings.dtype)
  prompts = jnp.broadcast_to(prompt[None], (batch, num_tokens, dim))
  return jnp.concatenate([prompts, embeddings], axis=1)
