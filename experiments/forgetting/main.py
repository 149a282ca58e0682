r"""Catastrophic forgetting on class-incremental Split MNIST.

Usage, from the repository root:

  python -m experiments.forgetting.main --config=default \
      --workdir=runs/forgetting

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run.
"""

import argparse
import os

from experiments.common import utils
from experiments.forgetting import configs
from experiments.forgetting import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/forgetting')
  parser.add_argument('--strategies', nargs='+', default=None,
                      metavar='NAME',
                      help='run only these strategies (default: all of the '
                      'config), e.g. --strategies naive joint er_500')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  utils.experiment_logger()  # progress lines from train.py
  config = configs.get_config(args.config)
  if args.strategies is not None:
    config = train.select_strategies(config, args.strategies)
  results = train.train_and_evaluate(config, args.workdir,
                                     raw_dir=args.raw_dir,
                                     data_dir=args.data_dir)
  utils.print_run_summary(train.format_table(results), results,
                          os.path.join(args.workdir, train.RESULTS_JSON))


if __name__ == '__main__':
  main()
