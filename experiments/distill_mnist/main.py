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


def format_table(results: dict) -> str:
  """Markdown table: model | test errors | paper; then the born-again line."""
  num_test = results['num_test']
  lines = [f'| model | test errors (of {num_test}) | paper (of 10000) |',
           '|---|---:|---:|']
  for name, record in results['models'].items():
    paper = record['paper_test_errors']
    lines.append(f'| {name} | {record["test_errors"]} | '
                 f'{"-" if paper is None else paper} |')
  if 'born_again_beats_teacher' in results:
    lines.append(f'born-again student beats the teacher: '
                 f'{results["born_again_beats_teacher"]}')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  cli.run(__doc__, configs, train, 'runs/distill_mnist', argv,
          format_table=format_table)


if __name__ == '__main__':
  main()
