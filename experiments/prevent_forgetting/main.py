r"""Preventing forgetting on Permuted and Rotated MNIST with metacf.protect.

Usage, from the repository root:

  python -m experiments.prevent_forgetting.main --config=default \
      --workdir=runs/prevent_forgetting

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run: finished
runs and pairs are read back, not recomputed.
"""

from experiments.common import cli
from experiments.prevent_forgetting import configs
from experiments.prevent_forgetting import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/prevent_forgetting', argv)


if __name__ == '__main__':
  main()
