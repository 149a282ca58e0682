r"""LwF's protection of task A against the observability of A by task B.

Usage, from the repository root:

  python -m experiments.lwf_observability.main --config=default \
      --workdir=runs/lwf_observability

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume: A's checkpoint and every
finished record are read back, not recomputed.
"""

import argparse
import os

from tqdm.contrib import logging as tqdm_logging

from experiments.common import utils
from experiments.lwf_observability import configs
from experiments.lwf_observability import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/lwf_observability')
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
