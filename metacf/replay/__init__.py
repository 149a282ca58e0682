"""Replay buffers for continual learning: reservoir and class-balanced.

A buffer is a factory returning a NamedTuple of pure functions
``(init, add, sample)`` over an explicit state, so it lives inside a jitted
training step (donate the state for in-place updates). Items are any pytree:
storing the network's logits next to inputs and labels gives Dark Experience
Replay (DER/DER++) with no extra API. Example::

  buffer = metacf.replay.replay_buffer(capacity=500)
  state = buffer.init({'x': jnp.zeros([28, 28, 1], jnp.uint8),
                       'y': jnp.zeros([], jnp.int32)})

  @functools.partial(jax.jit, donate_argnums=1)
  def train_step(key, state, params, x, y):
    key_add, key_sample, key_mix = jax.random.split(key, 3)
    replay, valid = buffer.sample(key_sample, state, x.shape[0])
    batch, is_replay = metacf.replay.mix_replay(
        key_mix, {'x': x, 'y': y}, replay, 0.5, replay_valid=valid)
    ...  # loss and update on batch
    return buffer.add(key_add, state, {'x': x, 'y': y}), params
"""

from metacf.replay._balanced import class_balanced_buffer
from metacf.replay._balanced import ClassBalancedBuffer
from metacf.replay._balanced import ClassBalancedState
from metacf.replay._buffer import replay_buffer
from metacf.replay._buffer import ReplayBuffer
from metacf.replay._buffer import ReplayState
from metacf.replay._mixing import mix_replay

__all__ = [
    'ClassBalancedBuffer',
    'ClassBalancedState',
    'ReplayBuffer',
    'ReplayState',
    'class_balanced_buffer',
    'mix_replay',
    'replay_buffer',
]
