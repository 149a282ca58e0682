r"""Meta-learning meets continual learning (issue 28), parts (a) and (b).

Usage, from the repository root:

  python -m experiments.meta_continual.main --config=default \
      --workdir=runs/meta_continual [--part=a|b|all]

Part (a), ``orthogonality.py``: subspace overlap, NTK-predicted and measured
forgetting of held-out MNIST task pairs at five initialisations (random,
jointly pre-trained, MAML, Reptile, iMAML). Part (b), ``online.py``: online
continual learning. This file is intentionally kept short. Run it again with
the same ``--workdir`` to resume an interrupted run: finished records and
trained initialisations are read back, not recomputed.
"""

import argparse
import os
from typing import Any

from tqdm.contrib import logging as tqdm_logging

from experiments.common import cli
from experiments.meta_continual import configs
from experiments.meta_continual import online
from experiments.meta_continual import orthogonality

PARTS = ('a', 'b', 'all')


def _add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--part', choices=PARTS, default='all',
                      help='a: orthogonality at meta-learned inits; b: '
                      'online continual learning; all: both (default).')


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args, config = cli.parse_args(__doc__, configs, 'runs/meta_continual', argv,
                                add_flags=_add_flags)
  log = cli.experiment_logger()  # Progress lines from the parts.
  results = {}
  with tqdm_logging.logging_redirect_tqdm(loggers=[log]):  # Keep bars whole.
    if args.part in ('a', 'all'):
      results['a'] = orthogonality.train_and_evaluate(
          config, args.workdir, raw_dir=args.raw_dir, data_dir=args.data_dir)
      cli.print_run_summary(
          orthogonality.format_table(results['a']), results['a'],
          os.path.join(args.workdir, orthogonality.SUBDIR,
                       orthogonality.RESULTS_JSON))
    if args.part in ('b', 'all'):
      results['b'] = online.run(
          config.online, args.workdir, raw_dir=args.raw_dir,
          data_dir=args.data_dir, progress_bar=config.progress_bar)
      cli.print_run_summary(results['b']['report'], results['b'],
                            os.path.join(args.workdir, online.RESULTS_JSON))
  return results


if __name__ == '__main__':
  main()
