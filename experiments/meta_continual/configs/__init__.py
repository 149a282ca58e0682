"""Configurations for the meta-continual study, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``. The study has two parts that share
this ``Config``: part (a), task-subspace orthogonality at meta-learned
initialisations (``Config.orthogonality``, an :class:`OrthogonalityConfig`,
run by ``orthogonality.py``), and part (b), online continual learning.

Part (a) asks whether meta-training (MAML, Finn et al. 2017,
https://arxiv.org/abs/1703.03400; Reptile, Nichol et al. 2018,
https://arxiv.org/abs/1803.02999; iMAML, Rajeswaran et al. 2019,
https://arxiv.org/abs/1909.04630) makes two tasks' top Jacobian singular
subspaces more orthogonal, and whether the forgetting measured and the
forgetting predicted through the empirical NTK (Lee et al. 2019,
https://arxiv.org/abs/1902.06720; Doan et al. 2021,
https://arxiv.org/abs/2010.04003) follow.
"""

from collections.abc import Sequence
import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES

INITS = ('random', 'joint', 'maml', 'reptile', 'imaml')
FAMILIES = ('rotation', 'permutation', 'mixed')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """An MNIST task: digits rotated by ``rotation`` or pixels permuted.

  Attributes:
    rotation: Counterclockwise rotation of every image, in degrees (used
      when ``permutation`` is None).
    permutation: Id of a fixed random permutation of the 784 pixels (drawn
      from a key folded from the data seed and this id), or None.
  """
  rotation: float = 0.0
  permutation: int | None = None

  @property
  def name(self) -> str:
    if self.permutation is not None:
      return f'perm{self.permutation}'
    return f'rot{self.rotation:g}'


@dataclasses.dataclass(frozen=True)
class Pair:
  """Fine-tune on ``task_a``, then train on ``task_b``; watch A's loss."""
  task_a: TaskSpec
  task_b: TaskSpec

  @property
  def name(self) -> str:
    return f'{self.task_a.name}_to_{self.task_b.name}'

  @property
  def family(self) -> str:
    kinds = {t.permutation is None for t in (self.task_a, self.task_b)}
    if kinds == {True}:
      return 'rotation'
    return 'permutation' if kinds == {False} else 'mixed'


def rotation_pair(a: float, b: float) -> Pair:
  return Pair(TaskSpec(rotation=a), TaskSpec(rotation=b))


def permutation_pair(a: int, b: int) -> Pair:
  return Pair(TaskSpec(permutation=a), TaskSpec(permutation=b))


def make_pairs(rotations: Sequence[tuple[float, float]] = (),
               permutations: Sequence[tuple[int, int]] = (),
               mixed: Sequence[tuple[TaskSpec, TaskSpec]] = ()
               ) -> tuple[Pair, ...]:
  """Rotation pairs ``(angle_a, angle_b)``, permutation pairs ``(id_a,
  id_b)`` and mixed pairs of task specs, in that order."""
  return (tuple(rotation_pair(a, b) for a, b in rotations)
          + tuple(permutation_pair(a, b) for a, b in permutations)
          + tuple(Pair(a, b) for a, b in mixed))


@dataclasses.dataclass(frozen=True)
class OrthogonalityConfig:
  """Part (a): subspace overlap and forgetting at five initialisations.

  Attributes:
    seeds: One initialisation of each kind per seed (the random init, and
      the meta-training's task draws, from keys folded from the seed).
    data_seed: Seed of the images, permutations and SVD probes shared by
      every seed (the pairs' data do not change with the seed).
    inits: Subset of ``INITS``, in table order.
    hidden: Widths of the hidden ReLU layers (standard parameterisation).
    train_rotations: Angles (degrees) of the meta-training rotation tasks.
    num_train_permutations: Meta-training permutation tasks (ids ``0 ..
      n - 1``); held-out pairs use ids >= 100.
    pairs: Held-out evaluation pairs (angles not in ``train_rotations``,
      permutation ids >= 100).
    meta_images_per_task: Images per meta-training task, drawn from the
      first ``meta_image_pool`` training images.
    meta_image_pool: Training images reserved for meta-training; the
      evaluation tasks draw theirs from the rest (A from the first half of
      the rest, B from the second), and A's held-out images from the test
      split.
    meta_batch_tasks: Tasks per outer step (every meta-learner and the
      joint pre-training see the same number of images per step).
    num_support: Support images per task (inner loop).
    num_query: Query images per task (outer loss). Reptile adapts on
      support and query together (it has no query set); joint
      pre-training takes one gradient step on all of them.
    inner_lr: SGD step size of the inner loops.
    num_inner_steps: Inner SGD steps of MAML, Reptile and iMAML.
    outer_lr: Adam step size of every outer loop (and of joint training).
    outer_steps: Outer steps of every meta-learner and of joint training.
    steps_per_call: Outer steps per jitted call (one ``lax.scan``).
    imaml_reg: iMAML's proximal strength lambda. Picked from {0.1, 0.3, 1,
      3, 10, 30, 100} by the accuracy after the evaluation's fine-tuning
      (``num_steps_a`` steps at ``lr_a`` on 100 images) on the
      meta-training tasks, at a seed (100) outside ``seeds`` (README);
      the paper's 0.5-2 barely moved the MLP from its random
      initialisation here. Inner SGD on the proximal loss is stable only
      for ``inner_lr * imaml_reg < 2``.
    imaml_cg_steps: iMAML's conjugate-gradient iterations.
    num_train: Training images of each evaluation task.
    num_eval: Held-out test images of A (forgetting is measured on them).
    num_svd: Images of each task whose Jacobian is decomposed (the first
      ``num_svd`` training images).
    lr_a: Step size of full-batch gradient descent on A (fine-tuning).
    num_steps_a: Steps on A.
    lr_b: Step size of full-batch gradient descent on B (the dynamics that
      are predicted).
    num_steps_b: Steps on B.
    overlap_k: Top singular directions compared.
    svd_method: ``jacobian_svd`` method.
    ntk_chunk_size: Examples of B per block of NTK columns in the
      prediction (None: one block).
    num_bootstrap: Bootstrap resamples of every interval.
  """
  seeds: tuple[int, ...] = (0, 1, 2)
  data_seed: int = 0
  inits: tuple[str, ...] = INITS
  hidden: tuple[int, ...] = (100, 100)
  train_rotations: tuple[float, ...] = tuple(float(a)
                                             for a in range(0, 360, 20))
  num_train_permutations: int = 18
  pairs: tuple[Pair, ...] = ()
  meta_images_per_task: int = 500
  meta_image_pool: int = 50_000
  meta_batch_tasks: int = 8
  num_support: int = 20
  num_query: int = 20
  inner_lr: float = 0.1
  num_inner_steps: int = 5
  outer_lr: float = 1e-3
  outer_steps: int = 400
  steps_per_call: int = 50
  imaml_reg: float = 10.0
  imaml_cg_steps: int = 5
  num_train: int = 100
  num_eval: int = 200
  num_svd: int = 50
  lr_a: float = 0.1
  num_steps_a: int = 20
  lr_b: float = 0.1
  num_steps_b: int = 50
  overlap_k: int = 10
  svd_method: str = 'randomized'
  ntk_chunk_size: int | None = None
  num_bootstrap: int = 2000

  def __post_init__(self):
    unknown = [i for i in self.inits if i not in INITS]
    if unknown or not self.inits:
      raise ValueError(f'OrthogonalityConfig: inits must be a non-empty '
                       f'subset of {INITS}, got {self.inits}.')
    if not self.seeds:
      raise ValueError('OrthogonalityConfig: seeds must not be empty.')
    names = [p.name for p in self.pairs]
    if len(set(names)) != len(names):
      raise ValueError(f'OrthogonalityConfig: pair names must be unique, '
                       f'got {names}.')
    train = set(self.train_rotations)
    for pair in self.pairs:
      for task in (pair.task_a, pair.task_b):
        if task.permutation is None and task.rotation % 360 in train:
          raise ValueError(
              f'OrthogonalityConfig: pair {pair.name} uses the '
              f'meta-training angle {task.rotation}; pairs must be held out.')
        if (task.permutation is not None
            and task.permutation < self.num_train_permutations):
          raise ValueError(
              f'OrthogonalityConfig: pair {pair.name} uses the '
              f'meta-training permutation {task.permutation}; pairs must '
              'be held out.')
    if self.outer_steps % self.steps_per_call:
      raise ValueError('OrthogonalityConfig: outer_steps must be a multiple '
                       f'of steps_per_call, got {self.outer_steps} and '
                       f'{self.steps_per_call}.')
    if self.num_support + self.num_query > self.meta_images_per_task:
      raise ValueError('OrthogonalityConfig: num_support + num_query must '
                       'not exceed meta_images_per_task.')
    if self.num_svd > self.num_train:
      raise ValueError('OrthogonalityConfig: num_svd must not exceed '
                       'num_train.')
    if not 1 <= self.overlap_k <= 10 * self.num_svd:
      raise ValueError('OrthogonalityConfig: overlap_k must be in [1, 10 * '
                       f'num_svd], got {self.overlap_k}.')


ONLINE_METHODS = ('online', 'er', 'mer', 'lamaml', 'oml', 'er_fa')
ONLINE_BENCHMARKS = ('rotated', 'permuted')


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """Hyperparameters of part (b), online continual learning (``online.py``).

  Each method's rates were picked by ``select_online.py`` (ACC after the
  first 4 tasks of Permuted MNIST at seed 100, outside ``seeds``; grid and
  results in the README).

  Attributes:
    seeds: One run of every (benchmark, method) per seed (data, stream order,
      initialisation).
    benchmarks: Subset of ``BENCHMARKS``.
    methods: Subset of ``METHODS``, in table order.
    num_tasks: Tasks per benchmark (La-MAML: 20).
    num_train: Training examples per task, seen once (La-MAML: 1,000).
    num_test: Test examples per task (the first ones of MNIST's test split).
    rotation_step: Task ``t`` of MNIST Rotations is rotated by ``t *
      rotation_step`` degrees (9: 0 to 171 degrees over 20 tasks, as GEM's
      evenly spaced rotations).
    hidden: Hidden widths (La-MAML: 100, 100).
    batch_size: Stream mini-batch (La-MAML: 10).
    glances: Updates per stream batch, each with a fresh replay draw
      (La-MAML's "glances"; every method gets the same number).
    memory_size: Replay buffer capacity (La-MAML's MNIST runs: 200).
    replay_batch_size: Replayed examples per update.
    lr: SGD learning rate of ``online``, ``er``, ``er_fa`` and OML's outer
      step.
    mer_inner_lr: MER's alpha (per-example SGD step).
    mer_within_rate: MER's beta.
    mer_across_rate: MER's gamma.
    mer_batches: MER's s: batches per stream batch, each the stream batch
      (shuffled) and ``replay_batch_size`` replayed examples, one SGD step
      per example.
    lamaml_alpha_init: La-MAML's initial per-parameter rate.
    lamaml_lr_lr: La-MAML's eta, the rates' SGD step.
    lamaml_max_grad_norm: Clip of both La-MAML meta-gradients (the authors'
      code: 2.0).
    lamaml_mean_over_steps: La-MAML's meta-loss is the mean over the inner
      steps of the meta-batch loss after each (the authors' code), not the
      loss after the last step only (the paper's Algorithm 1).
    oml_inner_lr: OML's head step per stream example.
    fa_strength: lambda of the forgetting-aware objective.
    fa_num_steps: Function-space steps of the prediction (the coming update
      is one SGD step: 1).
    workers: Runs computed at the same time (threads).
  """
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  benchmarks: tuple[str, ...] = ONLINE_BENCHMARKS
  methods: tuple[str, ...] = ONLINE_METHODS
  num_tasks: int = 20
  num_train: int = 1000
  num_test: int = 1000
  rotation_step: float = 9.0
  hidden: tuple[int, ...] = (100, 100)
  batch_size: int = 10
  glances: int = 1
  memory_size: int = 200
  replay_batch_size: int = 10
  lr: float = 0.1
  mer_inner_lr: float = 0.03
  mer_within_rate: float = 0.3
  mer_across_rate: float = 1.0
  mer_batches: int = 2
  lamaml_alpha_init: float = 0.1
  lamaml_lr_lr: float = 0.3
  lamaml_max_grad_norm: float = 2.0
  lamaml_mean_over_steps: bool = True
  oml_inner_lr: float = 0.03
  fa_strength: float = 0.3
  fa_num_steps: int = 1
  workers: int = 2

  def __post_init__(self):
    for name, allowed in (('methods', ONLINE_METHODS),
                          ('benchmarks', ONLINE_BENCHMARKS)):
      unknown = set(getattr(self, name)) - set(allowed)
      if unknown:
        raise ValueError(f'OnlineConfig: unknown {name} {sorted(unknown)}; '
                         f'expected some of {allowed}.')
    if self.num_train % self.batch_size:
      raise ValueError(f'OnlineConfig: num_train ({self.num_train}) must be a '
                       f'multiple of batch_size ({self.batch_size}).')
    for name in ('glances', 'memory_size', 'replay_batch_size', 'mer_batches',
                 'workers', 'num_tasks'):
      if getattr(self, name) < 1:
        raise ValueError(f'OnlineConfig: {name} must be >= 1, got '
                         f'{getattr(self, name)}.')



@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the meta-continual study.

  Attributes:
    orthogonality: Part (a), see :class:`OrthogonalityConfig`.
    online: Part (b), see :class:`OnlineConfig`.
    progress_bar: Show tqdm bars (off anyway when not on a TTY).
  """
  orthogonality: OrthogonalityConfig = OrthogonalityConfig()
  online: OnlineConfig = OnlineConfig()
  progress_bar: bool = True


def get_config(name: str) -> Config:
  """The config of ``configs/<name>.py`` (ValueError if there is none)."""
  return utils.load_config(__name__, name)
