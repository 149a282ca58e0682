r"""Catastrophic forgetting on class-incremental Split MNIST.

Usage, from the repository root:

  python -m experiments.forgetting.main --config=default \
      --workdir=runs/forgetting

Config fields are overridden with ``--config.<field>=<value>`` (e.g.
``--config.seeds='(0, 1)'``), and ``--strategies naive joint er_500`` runs
only those strategies. This file is intentionally kept short; the logic is
in ``train.py`` (the driver) and the modules beside it. Run it again with the
same ``--workdir`` to resume an interrupted run.
"""

import argparse

from experiments.common import cli
from experiments.forgetting import configs
from experiments.forgetting import train


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--strategies', nargs='+', default=None,
                      metavar='NAME',
                      help='run only these strategies (default: all of the '
                      'config), e.g. --strategies naive joint er_500')


def select(config: configs.Config, args: argparse.Namespace
           ) -> configs.Config:
  """``config`` with only the strategies of ``--strategies``, if given."""
  if args.strategies is None:
    return config
  return train.select_strategies(config, args.strategies)


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/forgetting', argv,
          add_flags=add_flags, select=select)


if __name__ == '__main__':
  main()
