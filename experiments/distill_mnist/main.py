r"""Knowledge distillation on MNIST (Hinton et al. 2015, section 3).

Usage, from the repository root:

  python -m experiments.distill_mnist.main --config=default \
      --workdir=runs/distill_mnist

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run.
"""

import argparse
import os

from tqdm.contrib import logging as tqdm_logging

from experiments.common import utils
from experiments.distill_mnist import configs
from experiments.distill_mnist import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/distill_mnist')
  return parser.parse_args(argv)


def format_table(results: dict) -> str:
  """Markdown table: model | test errors | paper."""
  num_test = results['num_test']
  lines = [f'| model | test errors (of {num_test}) | paper (of 10000) |',
           '|---|---:|---:|']
  for name, record in results['models'].items():
    paper = record['paper_test_errors']
    lines.append(f'| {name} | {record["test_errors"]} | '
                 f'{"-" if paper is None else paper} |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  log = utils.experiment_logger()  # progress lines from train.py
  config = configs.get_config(args.config)
  with tqdm_logging.logging_redirect_tqdm(loggers=[log]):  # Keep bars whole.
    results = train.train_and_evaluate(config, args.workdir,
                                       raw_dir=args.raw_dir,
                                       data_dir=args.data_dir)
  print(format_table(results))
  if 'born_again_beats_teacher' in results:
    print(f'born-again student beats the teacher: '
          f'{results["born_again_beats_teacher"]}')
  print(f'{results["device"]}; this run {results["wall_time_s"]:.0f}s; '
        f'results in {os.path.join(args.workdir, train.RESULTS_JSON)}')


if __name__ == '__main__':
  main()
