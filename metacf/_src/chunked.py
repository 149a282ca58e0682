"""Per-example sums over a leading axis, a chunk at a time, in O(chunk) memory."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def mean_over_examples(per_example: Callable[[Any], Any], inputs: Any,
                       like: Any, n: int, chunk: int) -> Any:
  """``(1/n) sum_i per_example(inputs[i])``, shaped like ``like``.

  ``vmap(per_example)`` runs on ``chunk`` examples at a time inside a
  ``lax.scan`` carrying the running sum, so memory is ``O(chunk * size)``,
  never ``O(n * size)``. ``n`` need not be a multiple of ``chunk``: the last
  chunk is padded with copies of the first example, weighted 0.
  """
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  weights = jnp.concatenate([jnp.ones((n,)), jnp.zeros((pad,))])

  def chunked(leaf):
    leaf = jnp.asarray(leaf)
    if pad:
      leaf = jnp.concatenate([leaf, jnp.repeat(leaf[:1], pad, axis=0)])
    return leaf.reshape((num_chunks, chunk) + leaf.shape[1:])

  def body(total, xs):
    batch, w = xs
    values = jax.vmap(per_example)(batch)
    return jax.tree.map(
        lambda t, v: t + jnp.tensordot(w.astype(v.dtype), v, 1), total,
        values), None

  zeros = jax.tree.map(jnp.zeros_like, like)
  total, _ = jax.lax.scan(body, zeros, (jax.tree.map(chunked, inputs),
                                        weights.reshape(num_chunks, chunk)))
  return jax.tree.map(lambda t: t / jnp.asarray(n, t.dtype), total)
