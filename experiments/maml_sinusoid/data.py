"""Sinusoid regression tasks (Finn et al. 2017, section 5.1).

A task is a sinusoid ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``
and phase ``phi ~ U[0, pi]``, observed at ``x ~ U[-5, 5]`` (the config's
ranges), as ``generate_sinusoid_batch`` of the authors' code. Tasks are drawn
on the device from a key, inside the jitted training chunk.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from experiments.maml_sinusoid.configs import Config
from metacf import maml


class SinusoidTasks(NamedTuple):
  """A batch of sinusoid tasks and the functions they sample."""
  tasks: maml.Task       # fields [num_tasks, num_points, 1], float32
  amplitude: jax.Array   # [num_tasks], float32
  phase: jax.Array       # [num_tasks], float32


def sample_tasks(key: jax.Array, num_tasks: int, num_support: int,
                 num_query: int, config: Config) -> SinusoidTasks:
  """Draws sinusoid tasks and their support and query points.

  The amplitudes and phases depend only on ``key`` and ``num_tasks``, so
  the same key gives the same functions for every K.

  Args:
    key: PRNG key.
    num_tasks: Number of tasks (static).
    num_support: Support points per task (static).
    num_query: Query points per task (static).
    config: Gives the amplitude, phase and input ranges.
  """
  key_amp, key_phase, key_support, key_query = jax.random.split(key, 4)
  amplitude = jax.random.uniform(key_amp, (num_tasks,), jnp.float32,
                                 *config.amplitude_range)
  phase = jax.random.uniform(key_phase, (num_tasks,), jnp.float32,
                             *config.phase_range)

  def points(k, n):
    x = jax.random.uniform(k, (num_tasks, n, 1), jnp.float32,
                           *config.input_range)
    return x, sinusoid(x, amplitude[:, None, None], phase[:, None, None])

  support_x, support_y = points(key_support, num_support)
  query_x, query_y = points(key_query, num_query)
  return SinusoidTasks(maml.Task(support_x, support_y, query_x, query_y),
                       amplitude, phase)


def sinusoid(x: jax.typing.ArrayLike, amplitude: jax.typing.ArrayLike,
             phase: jax.typing.ArrayLike) -> jax.Array:
  """``amplitude * sin(x - phase)``, as ``generate_sinusoid_batch``."""
  return amplitude * jnp.sin(jnp.asarray(x) - phase)
