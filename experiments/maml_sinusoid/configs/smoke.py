"""Smoke config: one K, a few iterations, in seconds (for tests)."""

import dataclasses

from experiments.maml_sinusoid.configs import default


def get_config() -> default.Config:
  return dataclasses.replace(
      default.get_config(),
      shots=(5,),
      num_iterations=400,
      chunk_size=100,
      checkpoint_every=200,
      num_test_tasks=100,
      num_val_tasks=100,
      baseline_lrs=(0.01, 0.02),
      progress_bar=False,
  )
