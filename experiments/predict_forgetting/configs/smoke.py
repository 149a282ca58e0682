"""Smoke config: five pairs, every family, tiny, in seconds (for tests)."""

import dataclasses

from experiments.predict_forgetting import configs


def get_config() -> configs.Config:
  pairs = configs.make_pairs(rotations=(0, 90), permuted_fractions=(1.0,),
                             splits=(((0, 1), (2, 3)),), datasets=True)
  return dataclasses.replace(
      configs.get_config('default'),
      pairs=tuple(p for p in pairs if p.name != 'fashion_to_mnist'),
      num_train=24,
      num_eval=32,
      width=16,
      num_steps_a=100,
      num_steps_b=20,
      overlap_k=4,
      low_rank_ks=(4,),
      ntk_chunk_size=None,
      regime_pairs=('rotate_90', 'permute_100pct'),
      regime_widths=(8, 32),
      regime_lrs=(0.5, 4.0),
      regime_num_train=16,
      regime_num_eval=16,
      progress_bar=False,
  )
