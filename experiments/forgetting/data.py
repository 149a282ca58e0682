"""Split MNIST: the arrays, the tasks' classes and the batch order of a run.

Orders depend on (seed, scenario, task) only, through keys derived by name
(``utils.name_key``), so every sequential strategy sees the same batches.
"""

from typing import NamedTuple

import jax
import numpy as np

from experiments.common import utils
from experiments.forgetting.configs import Config
from experiments.forgetting.configs import Scenario

NUM_CLASSES = 10


class Stream(NamedTuple):
  """The batches of one scenario for every seed and task."""
  steps: list[int]        # [T]: steps of each task (the same for every seed)
  idx: list[np.ndarray]   # [T] of int32 [S, steps[t], B]: training indices


def task_classes(scenario: Scenario) -> np.ndarray:
  """bool ``[T, 10]``: the digits of each task (in order 0..9).

  Raises:
    ValueError: if ``classes_per_task`` does not divide 10.
  """
  k = scenario.classes_per_task
  if k < 1 or NUM_CLASSES % k:
    raise ValueError(
        f'task_classes: classes_per_task must divide {NUM_CLASSES}, got {k}.')
  classes = np.arange(NUM_CLASSES)
  return (classes[None, :] // k) == np.arange(NUM_CLASSES // k)[:, None]


def make_stream(config: Config, scenario: Scenario, joint: bool,
                labels: np.ndarray, keys: jax.Array) -> Stream:
  """Batch indices of every task and seed.

  Sequential strategies see task ``t``'s examples, shuffled (one permutation
  per epoch), in batches of ``config.batch_size`` (the remainder dropped).
  ``joint`` sees all tasks' examples as one shuffled stream cut into
  ``T`` equal parts, so that its accuracy matrix is read at the same
  points. Orders depend on (seed, scenario, task) only: every sequential
  strategy sees the same batches.
  """
  b = config.batch_size
  num_tasks = NUM_CLASSES // scenario.classes_per_task
  example_task = labels // scenario.classes_per_task
  steps, idx = [], []
  if joint:
    rngs = [utils.numpy_rng(k) for k in
            utils.name_key(keys, 'data', scenario.name, 'joint')]
    orders = [np.concatenate([rng.permutation(len(labels))
                              for _ in range(config.epochs_per_task)])
              for rng in rngs]
    parts = [np.array_split(order, num_tasks) for order in orders]
    for t in range(num_tasks):
      n = (len(parts[0][t]) // b) * b
      steps.append(n // b)
      idx.append(np.stack([p[t][:n].reshape(-1, b) for p in parts]))
  else:
    for t in range(num_tasks):
      members = np.flatnonzero(example_task == t)
      rngs = [utils.numpy_rng(k) for k in
              utils.name_key(keys, 'data', scenario.name, t)]
      orders = [np.concatenate([members[rng.permutation(len(members))]
                                for _ in range(config.epochs_per_task)])
                for rng in rngs]
      n = (len(orders[0]) // b) * b
      steps.append(n // b)
      idx.append(np.stack([o[:n].reshape(-1, b) for o in orders]))
  if min(steps) < 1:
    raise ValueError(
        f'make_stream: every task needs at least batch_size={b} training '
        f'examples; got steps per task {steps} in {scenario.name}.')
  return Stream(steps, [i.astype(np.int32) for i in idx])


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Train and test ``{'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}``."""
  return utils.load_image_splits(config.dataset, num_train=config.num_train,
                                 num_test=config.num_test, raw_dir=raw_dir,
                                 data_dir=data_dir)
