"""Smoke config: 3 tasks, 100 examples, 5 epochs, every strategy, seconds."""

import dataclasses

from experiments.prevent_forgetting import configs


def get_config() -> configs.Config:
  return dataclasses.replace(
      configs.get_config('default'),
      seeds=(0,),
      num_tasks=3,
      rotation_step=45.0,
      num_train=100,
      rotated_num_train=None,
      workers=1,
      num_test=200,
      hidden=(32, 32),
      lr=0.05,
      num_epochs=5,
      eval_batch_size=200,
      fisher_examples=20,
      ewc_strength=3.0,  # The default's 30 (full data) is too stiff here.
      si_strength=10.0,  # The Config defaults, picked at 1,000 images.
      mas_strength=0.1,
      mas_examples=20,
      gem_sample_size=5,
      online_ewc_strength=3.0,  # 30 diverges with this small net at lr 0.05.
      memory_per_task=20,
      agem_sample_size=10,
      ogd_examples=10,
      pca_examples=20,
      pca_k=4,
      gpm_examples=50,
      pairs=configs.make_pairs((('permuted', 0, 1), ('rotated', 0, 2))),
      protect_ks=(0, 5, 20),
      jac_examples=10,
      heldout_examples=10,  # = jac_examples: one compiled prediction for both.
      b_examples=10,
      b_steps=10,
      progress_bar=False,
  )
