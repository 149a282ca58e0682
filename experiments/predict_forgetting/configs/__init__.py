"""Configurations for the forgetting-prediction experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.

The protocol follows the linearised-network analysis of Lee et al. 2019,
"Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient
Descent" (https://arxiv.org/abs/1902.06720), applied to forgetting as in
Doan et al. 2021, "A Theoretical Analysis of Catastrophic Forgetting through
the NTK Overlap Matrix" (https://arxiv.org/abs/2010.04003): a network trained
on task A is the linearisation point; it is then trained on task B by
full-batch gradient descent, the dynamics that
``metacf.jacobian.predicted_forgetting`` models.
"""

from collections.abc import Sequence
import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES

DATASETS = ('mnist', 'fashion_mnist')
FAMILIES = ('rotation', 'permutation', 'split', 'dataset')
LOSSES = ('mse', 'cross_entropy')
ALL_DIGITS = tuple(range(10))


@dataclasses.dataclass(frozen=True)
class Task:
  """A classification task made from MNIST or Fashion-MNIST.

  Every task has the same ten-way label space (one shared head): the digit,
  or the Fashion-MNIST class index.

  Attributes:
    name: Identifies the task's data (its examples and permutation are
      drawn from keys folded from this name): equal names, equal tasks.
    dataset: ``'mnist'`` or ``'fashion_mnist'``.
    digits: Classes kept (split tasks keep two).
    rotation: Counterclockwise rotation of every image, in degrees.
    permuted_fraction: Fraction of the 784 pixel positions whose contents
      are shuffled by one fixed permutation (1.0: permuted MNIST).
  """
  name: str
  dataset: str = 'mnist'
  digits: tuple[int, ...] = ALL_DIGITS
  rotation: float = 0.0
  permuted_fraction: float = 0.0

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f'Task: dataset must be one of {DATASETS}, got '
                       f'{self.dataset!r}.')
    if not self.digits or not set(self.digits) <= set(ALL_DIGITS):
      raise ValueError(f'Task: digits must be a non-empty subset of 0..9, '
                       f'got {self.digits}.')
    if not 0.0 <= self.permuted_fraction <= 1.0:
      raise ValueError(f'Task: permuted_fraction must be in [0, 1], got '
                       f'{self.permuted_fraction}.')


@dataclasses.dataclass(frozen=True)
class Pair:
  """Train on ``task_a``, then on ``task_b``; how much of A is forgotten?

  Attributes:
    name: Key in the results and file name of the pair's record.
    family: One of ``FAMILIES``, for grouping in tables and plots.
    task_a: The task learnt first, whose loss is watched.
    task_b: The task learnt second.
  """
  name: str
  family: str
  task_a: Task
  task_b: Task

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'Pair: family must be one of {FAMILIES}, got '
                       f'{self.family!r}.')


MNIST = Task('mnist')
FASHION = Task('fashion_mnist', dataset='fashion_mnist')


def make_pairs(rotations: Sequence[float] = (),
               permuted_fractions: Sequence[float] = (),
               splits: Sequence[tuple[tuple[int, ...], tuple[int, ...]]] = (),
               datasets: bool = False) -> tuple[Pair, ...]:
  """The task pairs of the experiment, family by family.

  Args:
    rotations: MNIST -> MNIST rotated by each angle (degrees). Angle 0 is
      MNIST again with other examples, the "same task" reference.
    permuted_fractions: MNIST -> MNIST with that fraction of its pixels
      permuted (a different fixed permutation for each fraction).
    splits: Split MNIST, digits ``a`` -> digits ``b``, for each ``(a, b)``.
    datasets: Whether to add MNIST -> Fashion-MNIST and back, the "very
      different tasks" case.

  Returns:
    The pairs, rotations first.
  """
  pairs = []
  for angle in rotations:
    pairs.append(Pair(f'rotate_{angle:g}', 'rotation', MNIST,
                      Task(f'mnist_rotated_{angle:g}', rotation=angle)))
  for fraction in permuted_fractions:
    percent = f'{100 * fraction:g}'
    pairs.append(Pair(
        f'permute_{percent}pct', 'permutation', MNIST,
        Task(f'mnist_permuted_{percent}pct', permuted_fraction=fraction)))
  for digits_a, digits_b in splits:
    a, b = (''.join(str(d) for d in ds) for ds in (digits_a, digits_b))
    pairs.append(Pair(f'split_{a}_to_{b}', 'split',
                      Task(f'mnist_digits_{a}', digits=tuple(digits_a)),
                      Task(f'mnist_digits_{b}', digits=tuple(digits_b))))
  if datasets:
    pairs.append(Pair('mnist_to_fashion', 'dataset', MNIST, FASHION))
    pairs.append(Pair('fashion_to_mnist', 'dataset', FASHION, MNIST))
  return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the forgetting-prediction experiment.

  Attributes:
    seed: Seed of the experiment's PRNG key tree (examples, permutations,
      initialisation, randomized SVDs).
    pairs: The (A, B) task pairs.
    num_train: Training examples of each task (A's and B's), drawn from
      disjoint halves of the training split (A from the first 30k, B from
      the last). Task B's empirical NTK has ``10 * num_train`` rows.
    num_eval: Held-out examples of task A (from the test split) on which
      its loss and accuracy are measured and predicted.
    width: Hidden units of the one-hidden-layer ReLU MLP.
    bias_scale: Biases enter as ``bias_scale * beta`` (NTK
      parameterisation; weights enter as ``omega / sqrt(fan_in)``).
    loss: ``'cross_entropy'`` (labels) or ``'mse'`` (one-hot targets, half
      squared error summed over outputs); mean over examples.
    lr_a: Learning rate of full-batch gradient descent on task A.
    num_steps_a: Gradient steps on task A.
    lr_b: Learning rate of full-batch gradient descent on task B (the
      dynamics that are predicted).
    num_steps_b: Gradient steps on task B.
    overlap_k: Top singular directions of each task's Jacobian compared by
      ``subspace_overlap``.
    low_rank_ks: Ranks of ``predicted_forgetting_low_rank``.
    svd_method: ``jacobian_svd`` method for the overlaps and the low-rank
      predictions.
    ntk_chunk_size: Examples of task B per block of NTK columns.
    regime_pairs: Names of the pairs of the width / learning-rate sweep.
    regime_widths: Hidden widths of the sweep.
    regime_lrs: Learning rates on B of the sweep (``num_steps_b`` steps).
    regime_num_train: Training examples per task in the sweep (the first
      ones of the main run's).
    regime_num_eval: Held-out examples of A in the sweep (likewise).
    progress_bar: Show tqdm bars (they are off anyway when not on a TTY).
  """
  seed: int = 0
  pairs: tuple[Pair, ...] = ()
  num_train: int = 150
  num_eval: int = 150
  width: int = 128
  bias_scale: float = 0.1
  loss: str = 'cross_entropy'
  lr_a: float = 4.0
  num_steps_a: int = 1000
  lr_b: float = 4.0
  num_steps_b: int = 200
  overlap_k: int = 20
  low_rank_ks: tuple[int, ...] = (10, 50)
  svd_method: str = 'randomized'
  ntk_chunk_size: int | None = 20
  regime_pairs: tuple[str, ...] = ()
  regime_widths: tuple[int, ...] = ()
  regime_lrs: tuple[float, ...] = ()
  regime_num_train: int = 80
  regime_num_eval: int = 80
  progress_bar: bool = True

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f'Config: loss must be one of {LOSSES}, got '
                       f'{self.loss!r}.')
    names = [p.name for p in self.pairs]
    if len(set(names)) != len(names):
      raise ValueError(f'Config: pair names must be unique, got {names}.')
    unknown = [n for n in self.regime_pairs if n not in names]
    if unknown:
      raise ValueError(f'Config: regime_pairs {unknown} are not pairs of '
                       'the config.')
    if self.regime_pairs and (not self.regime_widths or
                              not self.regime_lrs):
      raise ValueError('Config: regime_pairs need regime_widths and '
                       'regime_lrs.')
    if (self.regime_num_train > self.num_train
        or self.regime_num_eval > self.num_eval):
      raise ValueError(
          'Config: regime_num_train and regime_num_eval must not exceed '
          f'num_train and num_eval, got {self.regime_num_train} > '
          f'{self.num_train} or {self.regime_num_eval} > {self.num_eval}.')


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
