r"""Preventing forgetting on Permuted and Rotated MNIST with metacf.protect.

Usage, from the repository root:

  python -m experiments.prevent_forgetting.main --config=default \
      --workdir=runs/prevent_forgetting

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run: finished
runs and pairs are read back, not recomputed.
"""

import argparse
import os

from tqdm.contrib import logging as tqdm_logging

from experiments.common import utils
from experiments.prevent_forgetting import configs
from experiments.prevent_forgetting import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/prevent_forgetting')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  log = utils.experiment_logger()  # progress lines from train.py
  with tqdm_logging.logging_redirect_tqdm(loggers=[log]):  # Keep bars whole.
    results = train.train_and_evaluate(configs.get_config(args.config),
                                       args.workdir, raw_dir=args.raw_dir,
                                       data_dir=args.data_dir)
  utils.print_run_summary(train.format_table(results), results,
                          os.path.join(args.workdir, train.RESULTS_JSON))


if __name__ == '__main__':
  main()
