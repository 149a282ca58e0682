"""Summaries over seeds and their formatting in results tables.

Every experiment repeats a run over several seeds and reports the mean and
the (population) standard deviation; the results JSON keeps the per-seed
values beside them, and the Markdown tables print accuracies in percent:

  >>> from experiments.common import stats
  >>> cell = stats.mean_std([0.5, 0.75])
  >>> cell
  {'mean': 0.625, 'std': 0.125, 'per_seed': [0.5, 0.75]}
  >>> stats.pct(cell)
  '62.5 ± 12.5'
  >>> stats.pct(cell['mean'], digits=2)
  '62.50'
  >>> stats.pct(None)
  '-'
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def mean_std(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
  """Mean, standard deviation and the values themselves, as Python floats.

  Args:
    values: One number per seed (a sequence or a 1-D array).

  Returns:
    ``{'mean': float(np.mean(values)), 'std': float(np.std(values)),
    'per_seed': [float(v) for v in values]}``; ``std`` is the population
    standard deviation (``ddof=0``), 0 for a single seed. Studies that store
    the mean and std in flat fields read ``cell['mean']`` and
    ``cell['std']``.
  """
  return {'mean': float(np.mean(values)), 'std': float(np.std(values)),
          'per_seed': [float(v) for v in values]}


def pct(mean: float | Mapping[str, Any] | None, std: float | None = None, *,
        digits: int = 1) -> str:
  """A fraction (or a :func:`mean_std` cell) in percent, for Markdown tables.

  Args:
    mean: A fraction in [0, 1] (or any number), a ``{'mean', 'std'}`` cell
      as :func:`mean_std` returns, or None for a missing value.
    std: Its standard deviation, if ``mean`` is a number; None prints the
      mean alone. Ignored when ``mean`` is a cell (the cell's ``std`` is
      used).
    digits: Decimals after the point.

  Returns:
    ``'-'`` for None; ``'12.3 ± 0.4'`` with a std (``100 * mean`` and
    ``100 * std``); ``'12.3'`` without.
  """
  if mean is None:
    return '-'
  if isinstance(mean, Mapping):
    mean, std = mean['mean'], mean['std']
  if std is None:
    return f'{100 * mean:.{digits}f}'
  return f'{100 * mean:.{digits}f} ± {100 * std:.{digits}f}'
