r"""MAML on few-shot sinusoid regression (Finn et al. 2017, section 5.1).

Usage, from the repository root:

  python -m experiments.maml_sinusoid.main --config=default \
      --workdir=runs/maml_sinusoid

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run.
"""

import argparse
import os

from experiments.common import utils
from experiments.maml_sinusoid import configs
from experiments.maml_sinusoid import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/maml_sinusoid',
                                   data_flags=False)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  utils.experiment_logger()  # progress lines from train.py
  results = train.train_and_evaluate(configs.get_config(args.config),
                                     args.workdir)
  utils.print_run_summary(train.format_table(results), results,
                          os.path.join(args.workdir, train.RESULTS_JSON))


if __name__ == '__main__':
  main()
