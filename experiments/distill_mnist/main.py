r"""Knowledge distillation on MNIST (Hinton et al. 2015, section 3).

Usage, from the repository root:

  python -m experiments.distill_mnist.main --config=default \
      --workdir=runs/distill_mnist

Config fields are overridden with ``--config.<field>=<value>`` (e.g.
``--config.teacher_epochs=5``). This file is intentionally kept short; the
logic is in ``train.py``. Run it again with the same ``--workdir`` to resume
an interrupted run.
"""

from experiments.common import cli
from experiments.distill_mnist import configs
from experiments.distill_mnist import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/distill_mnist', argv)


if __name__ == '__main__':
  main()
