"""Replay buffers for continual learning: reservoir and class-balanced.

A buffer is a factory returning a NamedTuple of pure functions
``(init, add, sample)`` over an explicit state, so it lives inside a jitted
training step (donate the state for in-place updates). Items are any pytree:
storing the network's logits next to inputs and labels gives Dark Experience
Replay (DER/DER++) with no extra API. Both buffers' ``sample`` return a
:class:`ReplaySample` ``(items, valid)``, which :func:`mix_replay` takes
whole, and with ``label_fn`` the class-balanced buffer's ``add(key, state,
batch)`` has the reservoir buffer's signature, so either buffer fits the same
step.

Examples:
  >>> import functools
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import metacf
  >>> buffer = metacf.replay.replay_buffer(capacity=8)
  >>> # or: metacf.replay.class_balanced_buffer(
  >>> #         capacity=8, num_classes=10, label_fn=lambda batch: batch['y'])
  >>> state = buffer.init({'x': jnp.zeros([3]), 'y': jnp.zeros([], jnp.int32)})
  >>> replay = buffer.sample(jax.random.key(0), state, 4)
  >>> replay.valid.tolist()                     # nothing stored yet
  [False, False, False, False]
  >>> @functools.partial(jax.jit, donate_argnums=1)
  ... def train_step(key, state, replay, x, y):
  ...   key_add, key_next, key_mix = jax.random.split(key, 3)
  ...   batch, is_replay = metacf.replay.mix_replay(
  ...       key_mix, {'x': x, 'y': y}, replay, 0.5)   # replay.valid is the mask
  ...   # ... loss and update on batch
  ...   state = buffer.add(key_add, state, {'x': x, 'y': y})
  ...   return state, buffer.sample(key_next, state, x.shape[0])
  >>> for t in range(3):
  ...   x, y = jnp.full((4, 3), t, jnp.float32), jnp.full((4,), t)
  ...   state, replay = train_step(jax.random.key(t + 1), state, replay, x, y)
  >>> int(state.num_seen), replay.valid.tolist()
  (12, [True, True, True, True])

A ``ReplaySample`` unpacks as a pair (``items, valid = buffer.sample(...)``),
and ``mix_replay(key, batch, items, 0.5, replay_valid=valid)`` is the same
mix as passing the sample whole.

Order matters for speed: in a jitted step with the state donated, ``add``
the new batch first and ``sample`` after it (drawing the next step's replay,
as above: the same distribution as sampling before the add of the next
batch). If a step samples the donated buffer and then adds to it, XLA copies
the whole buffer to keep the sampled rows valid, so the step costs
O(capacity) (see the benchmarks page).
"""

from metacf.replay._balanced import class_balanced_buffer
from metacf.replay._balanced import ClassBalancedBuffer
from metacf.replay._balanced import ClassBalancedState
from metacf.replay._buffer import replay_buffer
from metacf.replay._class_incremental import ace_cross_entropy
from metacf.replay._class_incremental import herding_selection
from metacf.replay._buffer import ReplayBuffer
from metacf.replay._buffer import ReplaySample
from metacf.replay._buffer import ReplayState
from metacf.replay._mixing import mix_replay
from metacf.replay._mixing import MixedBatch

__all__ = [
    'ClassBalancedBuffer',
    'ClassBalancedState',
    'MixedBatch',
    'ReplayBuffer',
    'ReplaySample',
    'ReplayState',
    'ace_cross_entropy',
    'class_balanced_buffer',
    'herding_selection',
    'mix_replay',
    'replay_buffer',
]
