"""Smoke config: every strategy and scenario, tiny, in seconds (for tests)."""

import dataclasses

from experiments.forgetting import configs


def _shrink(strategy: configs.Strategy) -> configs.Strategy:
  if strategy.buffer_size:
    return dataclasses.replace(strategy, buffer_size=min(strategy.buffer_size,
                                                         40),
                               minibatch_size=min(strategy.minibatch_size, 8))
  return strategy


def get_config() -> configs.Config:
  default = configs.get_config('default')
  return dataclasses.replace(
      default,
      seeds=(0, 1),
      num_train=1500,     # ~150 images per digit, 15 steps per digit
      num_test=300,
      widths=(32,),
      strategies=tuple(_shrink(s) for s in default.strategies),
      eval_every=10,
      curve_test_size=100,
      progress_bar=False,
  )
