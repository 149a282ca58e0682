r"""LwF's protection of task A against the observability of A by task B.

Usage, from the repository root:

  python -m experiments.lwf_observability.main --config=default \
      --workdir=runs/lwf_observability

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume: A's checkpoint and every
finished record are read back, not recomputed.
"""

from experiments.common import cli
from experiments.lwf_observability import configs
from experiments.lwf_observability import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/lwf_observability', argv)


if __name__ == '__main__':
  main()
