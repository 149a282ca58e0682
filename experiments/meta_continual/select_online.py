"""Picks part (b)'s per-method hyperparameters on a seed outside the reported
ones (100), by ACC after the first 4 tasks of Permuted MNIST.

    python -m experiments.meta_continual.select_online

Prints one line per setting; the README gives the grid's results and the
picks (the defaults of ``configs.OnlineConfig``).
"""

import dataclasses
import os
import sys
import time

from experiments.meta_continual import configs
from experiments.meta_continual import online

SEED = 100
GRID = (
    ('online', dict(lr=0.03)), ('online', dict(lr=0.1)),
    ('online', dict(lr=0.3)),
    ('er', dict(lr=0.03)), ('er', dict(lr=0.1)), ('er', dict(lr=0.3)),
    ('mer', dict(mer_inner_lr=0.03, mer_within_rate=0.3)),
    ('mer', dict(mer_inner_lr=0.03, mer_within_rate=1.0)),
    ('mer', dict(mer_inner_lr=0.1, mer_within_rate=0.1)),
    ('mer', dict(mer_inner_lr=0.1, mer_within_rate=0.3)),
    ('lamaml', dict(lamaml_alpha_init=0.03, lamaml_lr_lr=0.03,
                    lamaml_mean_over_steps=False)),
    ('lamaml', dict(lamaml_alpha_init=0.1, lamaml_lr_lr=0.03,
                    lamaml_mean_over_steps=False)),
    ('lamaml', dict(lamaml_alpha_init=0.03, lamaml_lr_lr=0.3,
                    lamaml_mean_over_steps=False)),
    ('lamaml', dict(lamaml_alpha_init=0.1, lamaml_lr_lr=0.3,
                    lamaml_mean_over_steps=False)),
    ('lamaml', dict(lamaml_alpha_init=0.1, lamaml_lr_lr=0.03,
                    lamaml_mean_over_steps=True)),
    ('lamaml', dict(lamaml_alpha_init=0.1, lamaml_lr_lr=0.3,
                    lamaml_mean_over_steps=True)),
    ('lamaml', dict(lamaml_alpha_init=0.3, lamaml_lr_lr=0.3,
                    lamaml_mean_over_steps=True)),
    ('oml', dict(oml_inner_lr=0.03, lr=0.1)),
    ('oml', dict(oml_inner_lr=0.1, lr=0.1)),
    ('oml', dict(oml_inner_lr=0.03, lr=0.3)),
    ('er_fa', dict(fa_strength=0.3)), ('er_fa', dict(fa_strength=1.0)),
    ('er_fa', dict(fa_strength=3.0)), ('er_fa', dict(fa_strength=10.0)),
)


def main(only: str | None = None) -> None:
  base = dataclasses.replace(configs.OnlineConfig(), num_tasks=4,
                             seeds=(SEED,))
  splits = online.pf_data.load_mnist(os.environ.get('METACF_RAW_DIR'), None,
                                     base.num_test)
  data = online.make_stream('permuted', SEED, base, splits)
  for method, overrides in GRID:
    if only and method != only:
      continue
    config = dataclasses.replace(base, **overrides)
    start = time.perf_counter()
    r = online.run_one('permuted', method, SEED, config, data)
    print(f"{method:7s} {overrides} ACC {100 * r['acc']:.1f} "
          f"BWT {100 * r['bwt']:.1f} LA {100 * r['learning_accuracy']:.1f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
