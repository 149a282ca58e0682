r"""MAML on few-shot Omniglot classification (Finn et al. 2017, section 5.2).

Usage, from the repository root:

  python -m experiments.maml_omniglot.main --config=default \
      --workdir=runs/maml_omniglot

On a CPU, train one setting for a while (here 25 minutes), then again later
with the same command to continue:

  python -m experiments.maml_omniglot.main --config=default \
      --workdir=runs/maml_omniglot --settings=5way1shot --time_budget_s=1500

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run.
"""

import argparse
import dataclasses
import os

from tqdm.contrib import logging as tqdm_logging

from experiments.common import utils
from experiments.maml_omniglot import configs
from experiments.maml_omniglot import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = utils.experiment_parser(__doc__, 'runs/maml_omniglot')
  parser.add_argument(
      '--settings', default=None,
      help='comma-separated settings to run, e.g. 5way1shot,20way1shot '
      '(default: all of the config\'s)')
  parser.add_argument(
      '--time_budget_s', type=float, default=None,
      help='train each setting for about this many seconds in this session, '
      'then checkpoint and evaluate (default: the config\'s, None: until '
      'done)')
  return parser.parse_args(argv)


def select(config: configs.Config, settings: str | None,
           time_budget_s: float | None) -> configs.Config:
  """``config`` with only the named settings and the given time budget.

  Raises:
    ValueError: on a setting name the config does not have.
  """
  if settings is not None:
    known = {s.name: s for s in config.settings}
    names = [n.strip() for n in settings.split(',') if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
      raise ValueError(f'--settings must name some of {list(known)}, got '
                       f'{settings!r}.')
    config = dataclasses.replace(config,
                                 settings=tuple(known[n] for n in names))
  if time_budget_s is not None:
    config = dataclasses.replace(config, time_budget_s=time_budget_s)
  return config


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  log = utils.experiment_logger()  # progress lines from train.py
  config = select(configs.get_config(args.config), args.settings,
                  args.time_budget_s)
  with tqdm_logging.logging_redirect_tqdm(loggers=[log]):  # Keep bars whole.
    results = train.train_and_evaluate(config, args.workdir,
                                       raw_dir=args.raw_dir,
                                       data_dir=args.data_dir)
  utils.print_run_summary(train.format_table(results), results,
                          os.path.join(args.workdir, train.RESULTS_JSON))


if __name__ == '__main__':
  main()
