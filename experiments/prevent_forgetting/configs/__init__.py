"""Configurations for the forgetting-prevention study, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.

The protocol is that of Gradient Projection Memory on permuted MNIST (Saha,
Garg & Roy 2021, https://arxiv.org/abs/2103.09762, and their released
``main_pmnist.py``): a 784-100-100-10 ReLU MLP without biases, one shared
ten-way head, plain SGD (lr 0.01, batch 10), 5 epochs per task, 10 tasks.
"""

from collections.abc import Sequence
import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES

BENCHMARKS = ('permuted', 'rotated')
STRATEGIES = ('naive', 'ewc', 'online_ewc', 'si', 'mas', 'agem', 'gem', 'er',
              'ogd', 'pca_ogd', 'gpm', 'joint')
GPM_SCHEDULES = ('constant', 'linear')


@dataclasses.dataclass(frozen=True)
class Pair:
  """Predicted vs measured forgetting of ``task_a`` when training ``task_b``.

  Attributes:
    name: Key in the results and file name of the pair's record.
    benchmark: ``'permuted'`` or ``'rotated'``.
    task_a: Index of the task learnt first (with the benchmark's protocol).
    task_b: Index of the task then learnt by full-batch gradient descent.
  """
  name: str
  benchmark: str
  task_a: int
  task_b: int


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the forgetting-prevention study.

  Attributes:
    seeds: One run of every (benchmark, strategy) per seed; the seed draws
      the permutations, the training examples, the initialisation and the
      batch order.
    benchmarks: Subset of ``BENCHMARKS``.
    strategies: Subset of ``STRATEGIES``, in table order.
    num_tasks: Tasks per benchmark.
    rotation_step: Rotated MNIST's task ``t`` is rotated by ``t *
      rotation_step`` degrees (0, 10, ..., 90 by default).
    num_train: Training examples per task of permuted MNIST (drawn per
      task from MNIST's 60k training images without replacement; 60,000 is
      all of them, in a random order).
    rotated_num_train: The same for rotated MNIST (None: ``num_train``).
    num_test: Test examples per task (the first ones of MNIST's test split,
      transformed by the task).
    hidden: Widths of the hidden layers.
    lr: SGD learning rate (every strategy).
    batch_size: Minibatch size.
    num_epochs: Epochs per task.
    eval_batch_size: Test examples per evaluation chunk.
    ewc_strength: EWC's lambda (offline EWC, one penalty per task); picked
      from {1, 3, 10, 30, 100, 1000, 10000} by ACC on permuted MNIST with
      1,000 images per task and a seed (100) outside ``seeds``; the
      default config's, at the full data, on that seed's first 4 tasks
      (README). Larger values make SGD on the stiff penalty unstable
      (lr * lambda * sum F > 2 diverges).
    online_ewc_strength: Online EWC's lambda, picked the same way from
      {1, 10, 30, 100, 300, 1000, 10000}.
    online_ewc_gamma: Online EWC's decay of the running Fisher.
    si_strength: SI's lambda: ``ewc(anchor, Omega, lambda)`` with Omega the
      sum over tasks of ``si_importance(omega, delta, damping=si_damping)``
      (Zenke et al.'s ``c`` is lambda / 2); picked like ``ewc_strength``.
    si_damping: SI's xi (Zenke et al.: 0.1 on permuted MNIST).
    mas_strength: MAS's lambda: ``ewc(anchor, Omega, lambda)`` with Omega
      the sum over tasks of ``mas_importance``; picked like
      ``ewc_strength``.
    mas_examples: Training examples of a task on which its MAS importance
      is computed.
    fisher_examples: Training examples of a task on which its (true)
      Fisher diagonal is computed.
    memory_per_task: Examples stored per task by A-GEM and ER.
    agem_sample_size: Memory examples per A-GEM reference gradient.
    gem_sample_size: Memory examples of each earlier task per GEM
      constraint gradient, drawn every step (GEM's code: all of them).
    er_fraction: Share of each ER minibatch replaced by memory examples.
    ogd_examples: Examples per task whose ground-truth-logit gradients OGD
      stores.
    pca_examples: Examples per task whose gradients PCA-OGD decomposes.
    pca_k: Principal directions PCA-OGD keeps per task.
    gpm_examples: Examples per task in each layer's representation matrix.
    gpm_thresholds: GPM's energy thresholds, one per layer.
    gpm_schedule: ``'constant'`` (Saha et al.'s PMNIST code) or ``'linear'``
      (their CIFAR code: ``threshold + t * (1 - threshold) / num_tasks``).
    pairs: Predicted-vs-measured pairs.
    pair_seed: Seed of the pairs.
    protect_ks: Top-k rows of A's Jacobian SVD protected.
    jac_examples: Examples of A (training) on which the Jacobian SVD is
      taken and A's loss is predicted and measured.
    heldout_examples: Held-out (test) examples of A on which A's loss
      change is also predicted and measured.
    b_examples: Training examples of B for the full-batch descent.
    b_lr: Learning rate of the full-batch descent on B.
    b_steps: Steps of the full-batch descent on B.
    workers: Runs computed at the same time (threads): one run's step on
      this small MLP keeps about one core busy.
    progress_bar: Show tqdm bars (off anyway when not on a TTY).
  """
  seeds: tuple[int, ...] = (0, 1, 2)
  benchmarks: tuple[str, ...] = BENCHMARKS
  strategies: tuple[str, ...] = STRATEGIES
  num_tasks: int = 10
  rotation_step: float = 10.0
  num_train: int = 1000
  rotated_num_train: int | None = None
  num_test: int = 5000
  hidden: tuple[int, ...] = (100, 100)
  lr: float = 0.01
  batch_size: int = 10
  num_epochs: int = 5
  eval_batch_size: int = 1000
  ewc_strength: float = 3.0
  online_ewc_strength: float = 30.0
  online_ewc_gamma: float = 0.9
  si_strength: float = 10.0
  si_damping: float = 0.1
  mas_strength: float = 0.1
  mas_examples: int = 1000
  fisher_examples: int = 200
  memory_per_task: int = 250
  agem_sample_size: int = 64
  gem_sample_size: int = 10
  er_fraction: float = 0.5
  ogd_examples: int = 10
  pca_examples: int = 200
  pca_k: int = 10
  gpm_examples: int = 300
  gpm_thresholds: tuple[float, ...] = (0.95, 0.99, 0.99)
  gpm_schedule: str = 'constant'
  pairs: tuple[Pair, ...] = ()
  pair_seed: int = 0
  protect_ks: tuple[int, ...] = (0, 5, 20, 100)
  jac_examples: int = 100
  heldout_examples: int = 200
  b_examples: int = 50
  b_lr: float = 0.1
  b_steps: int = 100
  workers: int = 1
  progress_bar: bool = True

  def __post_init__(self):
    for name, values, allowed in (('benchmarks', self.benchmarks, BENCHMARKS),
                                  ('strategies', self.strategies,
                                   STRATEGIES)):
      unknown = [v for v in values if v not in allowed]
      if unknown:
        raise ValueError(f'Config: {name} {unknown} not in {allowed}.')
    if self.gpm_schedule not in GPM_SCHEDULES:
      raise ValueError(f'Config: gpm_schedule must be one of '
                       f'{GPM_SCHEDULES}, got {self.gpm_schedule!r}.')
    if len(self.gpm_thresholds) != len(self.hidden) + 1:
      raise ValueError('Config: gpm_thresholds needs one threshold per '
                       f'layer ({len(self.hidden) + 1}), got '
                       f'{self.gpm_thresholds}.')
    for bench in self.benchmarks:
      n = self.train_size(bench)
      if n % self.batch_size:
        raise ValueError(f'Config: {bench} MNIST\'s num_train ({n}) must be '
                         f'a multiple of batch_size ({self.batch_size}).')
      for name in ('memory_per_task', 'fisher_examples', 'mas_examples',
                   'ogd_examples', 'pca_examples', 'gpm_examples',
                   'jac_examples', 'b_examples'):
        if getattr(self, name) > n:
          raise ValueError(f'Config: {name} must not exceed {bench} MNIST\'s '
                           f'num_train ({n}).')
    if self.gem_sample_size > self.memory_per_task:
      raise ValueError('Config: gem_sample_size must not exceed '
                       'memory_per_task.')
    if self.workers < 1:
      raise ValueError(f'Config: workers must be >= 1, got {self.workers}.')
    if self.pca_k > self.pca_examples:
      raise ValueError('Config: pca_k must not exceed pca_examples.')
    if self.num_test % min(self.eval_batch_size, self.num_test):
      raise ValueError('Config: num_test must be a multiple of '
                       'eval_batch_size.')
    if self.heldout_examples > self.num_test:
      raise ValueError('Config: heldout_examples must not exceed num_test.')
    for pair in self.pairs:
      if pair.benchmark not in BENCHMARKS or not (
          0 <= pair.task_a < self.num_tasks and
          0 <= pair.task_b < self.num_tasks):
        raise ValueError(f'Config: bad pair {pair}.')
    if max(self.protect_ks, default=0) > 10 * self.jac_examples:
      raise ValueError('Config: protect_ks must not exceed 10 * '
                       'jac_examples (the Jacobian rows).')


  def train_size(self, benchmark: str) -> int:
    """Training examples per task of ``benchmark``."""
    if benchmark == 'rotated' and self.rotated_num_train is not None:
      return self.rotated_num_train
    return self.num_train


def make_pairs(specs: Sequence[tuple[str, int, int]]) -> tuple[Pair, ...]:
  """Pairs named ``<benchmark>_<a>_to_<b>`` from (benchmark, a, b)."""
  return tuple(Pair(f'{b}_{a}_to_{t}', b, a, t) for b, a, t in specs)


def get_config(name: str) -> Config:
  """The config of ``configs/<name>.py`` (ValueError if there is none)."""
  return utils.load_config(__name__, name)
