r"""The meta-learning family on 5-way Omniglot at equal compute.

Usage, from the repository root:

  python -m experiments.meta_baselines.main --config=default \
      --workdir=runs/meta_baselines

On a CPU the default config gives every method x setting the same training
budget (45 s; ``--config.time_budget_s=120`` changes it for all); when JAX
sees a GPU the same
command runs the papers' full protocols (``--config.protocol=cpu`` to keep
the budget there, ``--config.protocol=paper`` to force the papers'). Other
config fields are overridden with ``--config.<field>=<value>``. This file is
intentionally kept short; the logic is in ``train.py``.
"""

from experiments.common import cli
from experiments.meta_baselines import configs
from experiments.meta_baselines import train


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/meta_baselines', argv)


if __name__ == '__main__':
  main()
