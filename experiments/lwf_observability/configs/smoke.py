"""Smoke config: every kind of task B, tiny data and model, in seconds."""

import dataclasses

from experiments.lwf_observability import configs


def get_config() -> configs.Config:
  return dataclasses.replace(
      configs.get_config('default'),
      seeds=(0, 1),
      widths=(16, 16),
      num_train_a=256,
      num_test_a=200,
      a_epochs=3,
      a_lr=0.01,
      a_batch_size=64,
      num_train_b=64,
      num_test_b=50,
      warmup_steps=5,
      b_steps=20,
      b_batch_size=16,
      b_lr=0.05,
      k_a=4,
      k_b=4,
      num_jac_a=8,
      num_jac_b=8,
      eval_batch_size=64,
      progress_bar=False,
  )
