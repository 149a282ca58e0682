"""Smoke config: 5-way 1-shot, tiny model, 20 iterations (for tests).

Real Omniglot, all characters; 4 tasks per meta-batch and 8 channels so that
it trains in seconds on a CPU. Most of its time is compilation (once per
process).
"""

import dataclasses

from experiments.maml_omniglot.configs import default


def get_config() -> default.Config:
  config = default.get_config()
  return dataclasses.replace(
      config,
      settings=(dataclasses.replace(config.settings[0], meta_batch_size=4),),
      num_iterations=20,
      features=8,
      chunk_size=5,
      checkpoint_every=10,
      eval_schedule=((20, 10),),
      num_curve_tasks=10,
      num_test_tasks=20,
      max_eval_steps=3,
      eval_batch_size=10,
      progress_bar=False,
  )
