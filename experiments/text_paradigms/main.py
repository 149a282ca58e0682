r"""Text paradigms: T5/BART/BERT-style pre-training, then every adaptation.

Usage, from the repository root:

  python -m experiments.text_paradigms.main --config=default \
      --workdir=runs/text_paradigms

The logic is in ``train.py``. Run it again with the same ``--workdir`` to
resume: pre-training checkpoints, runs and predictions are read back.
"""

from experiments.common import cli
from experiments.text_paradigms import configs
from experiments.text_paradigms import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/text_paradigms', argv)


if __name__ == '__main__':
  main()
