r"""Meta-learning meets continual learning (issue 28), parts (a) and (b).

Usage, from the repository root:

  python -m experiments.meta_continual.main --config=default \
      --workdir=runs/meta_continual [--part=a|b|all]

Part (a), ``orthogonality.py``: subspace overlap, NTK-predicted and measured
forgetting of held-out MNIST task pairs at five initialisations (random,
jointly pre-trained, MAML, Reptile, iMAML). Part (b), ``online.py``: online
continual learning. This file is intentionally kept short. Run it again with
the same ``--workdir`` to resume an interrupted run: finished records and
trained initialisations are read back, not recomputed.
"""

import argparse
import logging
import os
from typing import Any

from tqdm.contrib import logging as tqdm_logging

from experiments.common import cli
from experiments.meta_continual import configs
from experiments.meta_continual import orthogonality

PARTS = ('a', 'b', 'all')


def _add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--part', choices=PARTS, default='all',
                      help='a: orthogonality at meta-learned inits; b: '
                      'online continual learning; all: both (default).')


def _run_part_b(config: configs.Config, workdir: str, *,
                required: bool) -> Any:
  """``online.run(config, workdir)``; None (logged) if ``online.py`` is not
  there yet and the part was not asked for alone."""
  # Imported here: part (a) runs without part (b)'s module.
  try:
    from experiments.meta_continual import online  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != 'experiments.meta_continual.online':
      raise
    if required:
      raise SystemExit('--part=b: experiments/meta_continual/online.py '
                       'does not exist yet.') from e
    logging.getLogger('experiments').info(
        'part (b) skipped: experiments/meta_continual/online.py does not '
        'exist yet.')
    return None
  return online.run(config, workdir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args, config = cli.parse_args(__doc__, configs, 'runs/meta_continual', argv,
                                add_flags=_add_flags)
  log = cli.experiment_logger()  # Progress lines from the parts.
  results = {}
  with tqdm_logging.logging_redirect_tqdm(loggers=[log]):  # Keep bars whole.
    if args.part in ('a', 'all'):
      results['a'] = orthogonality.train_and_evaluate(
          config, args.workdir, raw_dir=args.raw_dir, data_dir=args.data_dir)
      cli.print_run_summary(
          orthogonality.format_table(results['a']), results['a'],
          os.path.join(args.workdir, orthogonality.SUBDIR,
                       orthogonality.RESULTS_JSON))
    if args.part in ('b', 'all'):
      results['b'] = _run_part_b(config, args.workdir,
                                 required=args.part == 'b')
  return results


if __name__ == '__main__':
  main()
