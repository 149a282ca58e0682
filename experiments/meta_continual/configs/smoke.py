"""Smoke config: part (a) three pairs, five inits, two seeds; part (b) three
tiny tasks, every method, one seed. Seconds plus compilation (what the tests
run)."""

import dataclasses

from experiments.meta_continual import configs


def get_config() -> configs.Config:
  default = configs.get_config('default')
  return dataclasses.replace(
      default,
      orthogonality=dataclasses.replace(
          default.orthogonality,
          seeds=(0, 1),
          hidden=(16,),
          train_rotations=(0.0, 60.0, 120.0),
          num_train_permutations=2,
          pairs=configs.make_pairs(rotations=((10, 90),),
                                   permutations=((100, 101),),
                                   mixed=((configs.TaskSpec(rotation=30),
                                           configs.TaskSpec(
                                               permutation=102)),)),
          meta_images_per_task=16,
          meta_image_pool=1000,
          meta_batch_tasks=2,
          num_support=4,
          num_query=4,
          num_inner_steps=2,
          outer_steps=4,
          steps_per_call=2,
          imaml_cg_steps=2,
          num_train=12,
          num_eval=16,
          num_svd=6,
          num_steps_a=5,
          num_steps_b=5,
          overlap_k=3,
          num_bootstrap=200),
      online=dataclasses.replace(
          default.online, seeds=(0,), num_tasks=3, num_train=40, num_test=40,
          hidden=(16,), memory_size=20, replay_batch_size=5, workers=1),
      progress_bar=False,
  )
