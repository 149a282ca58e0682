"""Smoke config: all 7 methods x 2 settings in seconds (for tests).

One conv block of 4 channels, compiled without XLA's backend optimisations
(most of the smoke run is compilation); 2 tasks per meta-batch, a 1-second
budget (at most 3 updates) per run, 2 inner steps where the papers use
more, 10 test tasks.
"""

import dataclasses

from experiments.meta_baselines.configs import Config
from experiments.meta_baselines.configs import paper_methods


def get_config() -> Config:
  methods = tuple(
      dataclasses.replace(
          m, meta_batch_size=1 if m.name == 'protonets' else 2,
          num_iterations=3, num_inner_steps=min(m.num_inner_steps, 2),
          num_eval_steps=min(m.num_eval_steps, 2),
          train_ways=10 if m.train_ways else None)
      for m in paper_methods())
  return Config(methods=methods, time_budget_s=1.0, protocol='cpu',
                features=4, num_layers=1, fast_compile=True,
                num_test_tasks=10, num_curve_tasks=5, num_curve_points=2,
                eval_batch_size=5)
