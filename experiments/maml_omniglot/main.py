r"""MAML on few-shot Omniglot classification (Finn et al. 2017, section 5.2).

Usage, from the repository root:

  python -m experiments.maml_omniglot.main --config=default \
      --workdir=runs/maml_omniglot

On a CPU, train one setting for a while (here 25 minutes), then again later
with the same command to continue:

  python -m experiments.maml_omniglot.main --config=default \
      --workdir=runs/maml_omniglot --settings=5way1shot --time_budget_s=1500

Config fields are overridden with ``--config.<field>=<value>``, settings'
fields by index (``--config.settings.0.inner_lr=0.2``). This file is
intentionally kept short; the logic is in ``train.py``. Run it again with
the same ``--workdir`` to resume an interrupted run.
"""

import argparse
import dataclasses

from experiments.common import cli
from experiments.maml_omniglot import configs
from experiments.maml_omniglot import train


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      '--settings', default=None,
      help='comma-separated settings to run, e.g. 5way1shot,20way1shot '
      '(default: all of the config\'s)')
  parser.add_argument(
      '--time_budget_s', type=float, default=None,
      help='train each setting for about this many seconds in this session, '
      'then checkpoint and evaluate (default: the config\'s, None: until '
      'done)')


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
  cli.run(__doc__, configs, train, 'runs/maml_omniglot', argv,
          add_flags=add_flags,
          select=lambda config, args: select(config, args.settings,
                                             args.time_budget_s))


if __name__ == '__main__':
  main()
