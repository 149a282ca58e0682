"""Smoke config: every model of the experiment, tiny, in seconds (for tests)."""

import dataclasses

from experiments.distill_mnist.configs import default


def get_config() -> default.Config:
  return dataclasses.replace(
      default.get_config(),
      num_train=64,
      num_test=100,
      teacher_widths=(16, 16),
      student_widths=(8, 8),
      teacher_epochs=2,
      student_epochs=2,
      batch_size=16,
      max_steps_per_epoch=2,
      eval_batch_size=64,  # 100 test images: exercises the padded last batch
      progress_bar=False,
  )
