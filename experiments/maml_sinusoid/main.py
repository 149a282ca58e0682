r"""MAML on few-shot sinusoid regression (Finn et al. 2017, section 5.1).

Usage, from the repository root:

  python -m experiments.maml_sinusoid.main --config=default \
      --workdir=runs/maml_sinusoid

Config fields are overridden with ``--config.<field>=<value>`` (e.g.
``--config=smoke --config.seed=3``). This file is intentionally kept short;
the logic is in ``train.py``. Run it again with the same ``--workdir`` to
resume an interrupted run.
"""

from experiments.common import cli
from experiments.maml_sinusoid import configs
from experiments.maml_sinusoid import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/maml_sinusoid', argv,
          data_flags=False)


if __name__ == '__main__':
  main()
