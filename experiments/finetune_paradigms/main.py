r"""Fine-tuning paradigms on a small ViT: MNIST (A) -> Fashion-MNIST (B).

Usage, from the repository root:

  python -m experiments.finetune_paradigms.main --config=default \
      --workdir=runs/finetune_paradigms

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume: the pre-training checkpoint and
every finished run are read back, not recomputed.
"""

import argparse
import os

from tqdm.contrib import logging as tqdm_logging

from experiments.common import utils
from experiments.finetune_paradigms import configs
from experiments.finetune_paradigms import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/finetune_paradigms')
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
