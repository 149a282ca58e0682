"""Configurations for the Omniglot MAML experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.

Hyperparameters are those of Finn, Abbeel & Levine 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", section 5.2 and appendix
A.1 (https://arxiv.org/abs/1703.03400), and of the authors' code
(https://github.com/cbfinn/maml: ``main.py``, ``maml.py``, ``utils.py``,
``data_generator.py``, ``data/omniglot_resized/resize_images.py``) where the
paper is silent.
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES


@dataclasses.dataclass(frozen=True)
class Setting:
  """One N-way K-shot problem: MAML's hyperparameters and the paper's number.

  Attributes:
    ways: N, the classes of a task.
    shots: K, the support examples of each class.
    meta_batch_size: Tasks per meta-update (paper: 32 for 5-way, 16 for
      20-way).
    inner_lr: Inner SGD step size alpha, in meta-training and at test time
      (paper: 0.4 for 5-way, 0.1 for 20-way).
    num_inner_steps: Inner SGD steps in meta-training (paper: 1 for 5-way, 5
      for 20-way).
    paper_eval_steps: Test-time SGD steps the paper's accuracy is reported
      after (appendix A.1: 3 for 5-way, 5 for 20-way).
    paper_accuracy: MAML's test accuracy in the paper's Table 1, in [0, 1]
      (None: not reported).
    paper_ci95: Its 95% confidence half-width, in [0, 1].
  """
  ways: int
  shots: int
  meta_batch_size: int
  inner_lr: float
  num_inner_steps: int
  paper_eval_steps: int
  paper_accuracy: float | None = None
  paper_ci95: float | None = None

  @property
  def name(self) -> str:
    """``'5way1shot'`` etc.: the run's name in checkpoints and results."""
    return f'{self.ways}way{self.shots}shot'


# Finn et al. 2017, Table 1 (MAML, "Omniglot" columns) and appendix A.1; the
# training commands of the authors' README (`--update_lr=0.4 --num_updates=1
# --meta_batch_size=32` for 5-way, `--update_lr=0.1 --num_updates=5
# --meta_batch_size=16` for 20-way).
SETTINGS = (
    Setting(ways=5, shots=1, meta_batch_size=32, inner_lr=0.4,
            num_inner_steps=1, paper_eval_steps=3, paper_accuracy=0.987,
            paper_ci95=0.004),
    Setting(ways=5, shots=5, meta_batch_size=32, inner_lr=0.4,
            num_inner_steps=1, paper_eval_steps=3, paper_accuracy=0.999,
            paper_ci95=0.001),
    Setting(ways=20, shots=1, meta_batch_size=16, inner_lr=0.1,
            num_inner_steps=5, paper_eval_steps=5, paper_accuracy=0.958,
            paper_ci95=0.003),
    Setting(ways=20, shots=5, meta_batch_size=16, inner_lr=0.1,
            num_inner_steps=5, paper_eval_steps=5, paper_accuracy=0.989,
            paper_ci95=0.002),
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the Omniglot experiment.

  Attributes:
    seed: Seed of the experiment's PRNG key tree (init, tasks, test tasks).
    settings: The N-way K-shot problems, one meta-training run each.
    num_iterations: Meta-training iterations of each run (paper: 60,000).
    outer_lr: Adam learning rate of the meta-update (paper: 1e-3).
    num_query: Query examples per class of a task (training and test). None:
      K, as the authors' code (``DataGenerator(update_batch_size * 2, ...)``:
      K support and K query drawings of each class).
    loss_times_ways: Whether the loss is N times the mean cross-entropy,
      i.e. the sum over the N K examples divided by K, as in the authors'
      code (``xent``: per-example cross-entropy ``/ FLAGS.update_batch_size``,
      which ``tf.gradients`` sums), where alpha acts on that sum. False (the
      default): the mean, as the paper's text and most reimplementations;
      alpha = 0.4 on it is a step N times smaller. With our Conv-4 (flax
      initialisation, BatchNorm scale adapted in the inner loop) the
      authors' scale (an effective step of 2.0 on the mean for both 5-way
      and 20-way) made the first post-update losses explode (97 against
      5 ln 5 = 8.0 at chance) and stay at chance for 50 iterations, where
      the mean learned at once (see the README).
    features: Channels of every conv layer of Conv-4 (paper: 64).
    image_size: Images are resized to this side (paper: 28).
    num_train_characters: The first this many of the 1623 characters
      (background then evaluation split, in Omniglot's character order) are
      for meta-training, the rest for testing (paper: 1200).
    rotations: Augment with rotations by multiples of 90 degrees, each a new
      class (paper, after Santoro et al. 2016): every class of a task, in
      training and at test, is a character at a random rotation.
    chunk_size: Iterations per jitted call (a ``lax.scan``); the training
      loss is recorded as the mean of each chunk, and a time budget is
      checked between chunks.
    checkpoint_every: Iterations between checkpoints; a multiple of
      ``chunk_size``.
    eval_schedule: ``(until, every)`` pairs: the test accuracy curve is
      evaluated at iteration 0 and every ``every`` iterations up to
      ``until`` (then the next pair), and at the end of training.
    num_curve_tasks: Test tasks of each point of the curve (the first ones
      of the final evaluation's).
    num_test_tasks: Test tasks of the final evaluation (the authors'
      ``NUM_TEST_POINTS``: 600).
    max_eval_steps: Test-time SGD steps; accuracy is recorded after 0 to this
      many (the authors' ``test_num_updates``: 10).
    eval_batch_size: Test tasks per jitted evaluation call; divides
      ``num_curve_tasks`` and ``num_test_tasks``.
    task_chunk_size: If set, the meta-gradient is accumulated over chunks of
      this many tasks (memory; ``make_meta_train_step``).
    time_budget_s: If set, each run (setting) trains for about this many
      seconds in one session (compilation, training and curve evaluations;
      the final evaluation comes after): a chunk is started only if the
      previous one's duration still fits. At least one chunk runs per
      session. The run is checkpointed where it stopped; run again with the
      same workdir to continue.
    checkpoint_max_to_keep: Checkpoints kept per run.
    progress_bar: Show tqdm bars (they are off anyway when not on a TTY).
  """
  seed: int = 0
  settings: tuple[Setting, ...] = SETTINGS
  num_iterations: int = 60_000
  outer_lr: float = 1e-3
  num_query: int | None = None
  loss_times_ways: bool = False
  features: int = 64
  image_size: int = 28
  num_train_characters: int = 1200
  rotations: bool = True
  chunk_size: int = 20
  checkpoint_every: int = 500
  eval_schedule: tuple[tuple[int, int], ...] = ((1000, 100), (10_000, 500),
                                                (60_000, 2000))
  num_curve_tasks: int = 100
  num_test_tasks: int = 600
  max_eval_steps: int = 10
  eval_batch_size: int = 20
  task_chunk_size: int | None = None
  time_budget_s: float | None = None
  checkpoint_max_to_keep: int = 2
  progress_bar: bool = True


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
