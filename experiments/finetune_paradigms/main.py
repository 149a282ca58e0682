r"""Fine-tuning paradigms on a small ViT: MNIST (A) -> Fashion-MNIST (B).

Usage, from the repository root:

  python -m experiments.finetune_paradigms.main --config=default \
      --workdir=runs/finetune_paradigms

This file is intentionally kept short; the logic is in ``train.py``. Run it
again with the same ``--workdir`` to resume: the pre-training checkpoint and
every finished run are read back, not recomputed.
"""

from experiments.common import cli
from experiments.finetune_paradigms import configs
from experiments.finetune_paradigms import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/finetune_paradigms', argv)


if __name__ == '__main__':
  main()
