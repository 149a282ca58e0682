r"""Forgetting predicted by the empirical NTK against forgetting measured.

Usage, from the repository root:

  python -m experiments.predict_forgetting.main --config=default \
      --workdir=runs/predict_forgetting

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume an interrupted run: finished
pairs are read back, not recomputed.
"""

from experiments.common import cli
from experiments.predict_forgetting import configs
from experiments.predict_forgetting import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/predict_forgetting', argv)


if __name__ == '__main__':
  main()
