"""Configurations for the Split MNIST forgetting experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.

Hyperparameters follow the Seq-MNIST protocol of Buzzega et al. 2020, "Dark
Experience for General Continual Learning: a Strong, Simple Baseline"
(https://arxiv.org/abs/2004.07211): an MLP with two hidden layers of 100 ReLU
units, plain SGD, one epoch per task, batch size 10. Learning rates, replay
minibatch sizes and loss weights are the ``seq-mnist`` entries of the
authors' ``utils/best_args.py`` in https://github.com/aimagelab/mammoth
(read at commit 0d727a7235cf836698418ca33a973431d1d671f0).
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES

# Strategy kinds understood by steps.py.
KINDS = ('naive', 'joint', 'er', 'derpp', 'lwf', 'class_balanced', 'er_ace',
         'icarl')
# Kinds that keep examples: they need buffer_size and minibatch_size.
REPLAY_KINDS = ('er', 'derpp', 'class_balanced', 'er_ace', 'icarl')


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One continual-learning strategy and its hyperparameters.

  Attributes:
    name: Key in the results and on the command line, e.g. ``'er_500'``.
    kind: One of ``KINDS``:

      * ``'naive'``: fine-tune on each task in turn (cross-entropy on the
        current batch only; the lower bound).
      * ``'joint'``: the same examples as one i.i.d. shuffled stream over all
        tasks (the upper bound); its accuracy matrix is read after each
        ``1/num_tasks`` of the stream.
      * ``'er'``: experience replay, a reservoir buffer
        (``metacf.replay.replay_buffer``); each step trains on the current
        batch concatenated with ``minibatch_size`` replayed examples.
      * ``'derpp'``: DER++, a reservoir buffer of inputs, labels and the
        logits the network gave them; loss ``CE(batch) + alpha * MSE(logits
        on a replayed minibatch, stored logits) + beta * CE(a second replayed
        minibatch)``.
      * ``'lwf'``: Learning without Forgetting in a single head: the previous
        task's network is kept, and its logits on the current inputs are
        distilled (``metacf.distill.lwf_loss``) into the logits of the
        classes of previous tasks.
      * ``'class_balanced'``: ER with ``metacf.replay.class_balanced_buffer``
        (an equal share of the slots per class seen).
      * ``'er_ace'``: ER-ACE (Caccia et al. 2022): ER's reservoir buffer, but
        the current batch's cross-entropy is restricted to the classes
        present in the batch (``metacf.replay.ace_cross_entropy``); the
        replayed minibatch takes the plain cross-entropy.
      * ``'icarl'``: iCaRL (Rebuffi et al. 2017): ``buffer_size`` exemplars in
        all, ``buffer_size // classes_seen`` per class, chosen by herding
        (``metacf.replay.herding_selection``) on the normalised penultimate
        features at the end of each task; sigmoid binary cross-entropy with
        the previous task's network's outputs as targets of the old classes;
        classification by the nearest mean of exemplars
        (``metacf.maml.prototype_logits``).
    learning_rate: SGD learning rate.
    buffer_size: Replay buffer capacity (replay kinds only); iCaRL's total
      exemplar memory ``K``.
    minibatch_size: Replayed examples per step (replay kinds only; iCaRL
      draws them uniformly from its exemplars).
    alpha: DER++ weight of the logit MSE; LwF weight of the distillation
      term in mammoth's convention (cross-entropy between the softened
      distributions, no ``T^2`` factor: ``lwf_loss`` gets
      ``old_weight = alpha / temperature**2``).
    beta: DER++ weight of the replayed cross-entropy.
    temperature: LwF distillation temperature.
    weight_decay: L2 weight decay added to the gradient (as torch's SGD).
  """
  name: str
  kind: str
  learning_rate: float
  buffer_size: int = 0
  minibatch_size: int = 0
  alpha: float = 0.0
  beta: float = 0.0
  temperature: float = 2.0
  weight_decay: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Strategy: kind must be one of {KINDS}, got '
                       f'{self.kind!r}.')
    replay = self.kind in REPLAY_KINDS
    if replay and (self.buffer_size < 1 or self.minibatch_size < 1):
      raise ValueError(
          f'Strategy: {self.name} needs buffer_size >= 1 and minibatch_size '
          f'>= 1, got {self.buffer_size} and {self.minibatch_size}.')
    if self.learning_rate <= 0:
      raise ValueError(f'Strategy: learning_rate must be > 0, got '
                       f'{self.learning_rate}.')


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A split of MNIST's ten digits into tasks, and the strategies run on it.

  Attributes:
    name: Key in the results, e.g. ``'split_mnist'``.
    classes_per_task: Digits per task, in order: ``2`` gives the five tasks
      {0, 1}, {2, 3}, ..., {8, 9}; ``1`` gives ten one-digit tasks.
    strategies: Names of ``Config.strategies`` to run on it, in order.
  """
  name: str
  classes_per_task: int
  strategies: tuple[str, ...]


# The class-incremental baselines of issue 27. Not in the DER paper's
# Seq-MNIST table nor in mammoth's seq-mnist best_args: ER-ACE takes ER's
# settings (it is ER with another loss on the incoming batch); iCaRL replays
# minibatches of 10 exemplars as ER does, lr 0.1 (see README.md).
CLASS_IL_STRATEGIES = (
    Strategy('er_ace_200', 'er_ace', learning_rate=0.01, buffer_size=200,
             minibatch_size=10),
    Strategy('er_ace_500', 'er_ace', learning_rate=0.1, buffer_size=500,
             minibatch_size=10),
    Strategy('er_ace_5120', 'er_ace', learning_rate=0.1, buffer_size=5120,
             minibatch_size=10),
    Strategy('icarl_200', 'icarl', learning_rate=0.1, buffer_size=200,
             minibatch_size=10),
    Strategy('icarl_500', 'icarl', learning_rate=0.1, buffer_size=500,
             minibatch_size=10),
    Strategy('icarl_5120', 'icarl', learning_rate=0.1, buffer_size=5120,
             minibatch_size=10),
)

# Seq-MNIST entries of mammoth's utils/best_args.py (batch_size 10 and
# n_epochs 1 for all). 'joint' has no entry there: it uses SGD's rate. The
# class-balanced buffer is not in the DER paper: it uses ER's settings.
PAPER_STRATEGIES = (
    Strategy('naive', 'naive', learning_rate=0.03),
    Strategy('joint', 'joint', learning_rate=0.03),
    Strategy('er_200', 'er', learning_rate=0.01, buffer_size=200,
             minibatch_size=10),
    Strategy('er_500', 'er', learning_rate=0.1, buffer_size=500,
             minibatch_size=10),
    Strategy('er_5120', 'er', learning_rate=0.1, buffer_size=5120,
             minibatch_size=10),
    Strategy('derpp_200', 'derpp', learning_rate=0.03, buffer_size=200,
             minibatch_size=128, alpha=0.2, beta=1.0),
    Strategy('derpp_500', 'derpp', learning_rate=0.03, buffer_size=500,
             minibatch_size=10, alpha=1.0, beta=0.5),
    Strategy('derpp_5120', 'derpp', learning_rate=0.1, buffer_size=5120,
             minibatch_size=64, alpha=0.2, beta=0.5),
    Strategy('lwf', 'lwf', learning_rate=0.03, alpha=1.0, temperature=2.0,
             weight_decay=0.0005),
    Strategy('class_balanced_200', 'class_balanced', learning_rate=0.01,
             buffer_size=200, minibatch_size=10),
    Strategy('class_balanced_500', 'class_balanced', learning_rate=0.1,
             buffer_size=500, minibatch_size=10),
    Strategy('class_balanced_5120', 'class_balanced', learning_rate=0.1,
             buffer_size=5120, minibatch_size=10),
) + CLASS_IL_STRATEGIES

PAPER_SCENARIOS = (
    # The seeds' instructive example first: one digit at a time.
    Scenario('one_class_at_a_time', 1, ('naive', 'joint')),
    Scenario('split_mnist', 2, tuple(s.name for s in PAPER_STRATEGIES)),
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the forgetting experiment.

  Attributes:
    seeds: Independent runs (init, data order, replay draws); they are
      trained together, vectorised with ``jax.vmap``, and reported as mean
      and standard deviation.
    dataset: ``metacf.data.load_arrays`` dataset name.
    num_train: Use the first ``num_train`` training images (None: all 60k).
    num_test: Use the first ``num_test`` test images (None: all 10k).
    widths: Hidden layer widths of the MLP (DER paper: 2 x 100).
    batch_size: Examples of the current task per step (DER paper: 10).
    epochs_per_task: Passes over each task's data (DER paper: 1).
    strategies: The strategies that scenarios may name.
    scenarios: Task splits to run, each with its strategies.
    eval_every: Steps between points of the accuracy-over-time curves
      (the test sets are also evaluated at the end of every task). Also the
      number of steps a jitted training call runs.
    curve_test_size: The curves are measured on the first
      ``curve_test_size`` test images (None: all); the accuracy matrices
      always use the whole test set.
    curve_exemplars_per_class: iCaRL's curve points classify by the mean of
      the first ``curve_exemplars_per_class`` exemplars of each class, in
      herding order (None: all); its accuracy matrices use all exemplars.
    checkpoint_max_to_keep: Checkpoints kept per strategy.
    progress_bar: Show tqdm bars (they are off anyway when not on a TTY).
  """
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  dataset: str = 'mnist'
  num_train: int | None = None
  num_test: int | None = None
  widths: tuple[int, ...] = (100, 100)
  batch_size: int = 10
  epochs_per_task: int = 1
  strategies: tuple[Strategy, ...] = PAPER_STRATEGIES
  scenarios: tuple[Scenario, ...] = PAPER_SCENARIOS
  eval_every: int = 100
  curve_test_size: int | None = 2000
  curve_exemplars_per_class: int | None = 100
  checkpoint_max_to_keep: int = 2
  progress_bar: bool = True

  def strategy(self, name: str) -> Strategy:
    """The strategy called ``name`` (KeyError if there is none)."""
    for s in self.strategies:
      if s.name == name:
        return s
    raise KeyError(f'Config.strategy: no strategy named {name!r}; have '
                   f'{[s.name for s in self.strategies]}.')


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
