"""Smoke config: every paradigm, tiny data and model, in seconds (for tests)."""

import dataclasses

from experiments.finetune_paradigms import configs

# One variant per paradigm: each variant compiles its own adaptation and NTK
# prediction (seconds each), which is most of the smoke run's time. Deep
# prompts are tested on the ViT itself (tests/test_finetune_paradigms.py).
SMOKE_VARIANTS = ('linear_probe', 'full_finetune', 'partial_finetune',
                  'lora_r4', 'prompt_p1', 'nearest_class_mean', 'lwf',
                  'replay')


def get_config() -> configs.Config:
  default = configs.get_config('default')
  return dataclasses.replace(
      default,
      seeds=(0, 1),
      shots=(2, None),
      num_train_a=256,
      num_test_a=100,
      num_train_b=200,
      num_test_b=100,
      dim=16,
      depth=1,  # Compiles faster; partial fine-tuning trains block_0.
      num_heads=2,
      mlp_dim=32,
      pretrain_epochs=2,
      pretrain_batch_size=64,
      steps=4,
      batch_size=8,
      variants=tuple(dataclasses.replace(v, buffer_size=min(v.buffer_size,
                                                            16))
                     for v in default.variants if v.name in SMOKE_VARIANTS),
      eval_batch_size=64,
      ntk_num_a=8,
      ntk_shots_b=1,
      ntk_chunk_size=20,  # One block of NTK columns: compiles faster.
      progress_bar=False,
  )
