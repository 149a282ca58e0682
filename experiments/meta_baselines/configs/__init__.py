"""Configurations of the meta-learning baselines on Omniglot, by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``
(``default``: the CPU equal-budget run; ``paper``: the papers' protocols for a
GPU; ``smoke``: seconds, for tests). Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES
METHOD_KINDS = ('maml', 'fomaml', 'reptile', 'imaml', 'protonets', 'anil',
                'maml++')


@dataclasses.dataclass(frozen=True)
class Method:
  """One meta-learning method: its hyperparameters and the paper's numbers.

  Attributes:
    name: ``'maml'``, ``'fomaml'``, ``'reptile'``, ``'imaml'``,
      ``'protonets'``, ``'anil'`` or ``'maml++'``.
    meta_batch_size: Tasks per meta-update (ProtoNets: episodes per update).
    num_iterations: Meta-updates when there is no time budget (the paper's
      count, where it gives one); with a budget, an upper bound.
    outer_lr: Meta learning rate (Adam; Reptile: the initial outer SGD step
      epsilon, annealed linearly to 0 over training).
    inner_lr: Inner step size (SGD; Reptile: inner Adam's learning rate;
      MAML++: the initial value of every learned per-layer, per-step rate).
    num_inner_steps: Inner steps in meta-training.
    num_eval_steps: Inner steps at test time.
    reg: iMAML's proximal strength lambda.
    cg_steps: iMAML's conjugate-gradient iterations.
    train_shots: Reptile: support examples per class of a training task
      (Nichol et al.'s ``--train-shots``); None: the setting's shots.
    train_ways: ProtoNets: classes of a training episode (Snell et al.: 60);
      None: the setting's ways.
    msl_fraction: MAML++: the multi-step-loss weights are annealed from
      uniform to the last step only over this fraction of training.
    first_order_fraction: MAML++: first-order meta-gradients for this
      fraction of training, second order after (derivative-order
      annealing).
    paper: The paper's 5-way test accuracy, ``{shots: accuracy}`` in [0, 1]
      (missing: no number).
    source: Where ``paper`` comes from.
  """
  name: str
  meta_batch_size: int
  num_iterations: int
  outer_lr: float = 1e-3
  inner_lr: float = 0.4
  num_inner_steps: int = 1
  num_eval_steps: int = 3
  reg: float = 2.0
  cg_steps: int = 5
  train_shots: int | None = None
  train_ways: int | None = None
  msl_fraction: float = 0.1
  first_order_fraction: float = 0.5
  paper: tuple[tuple[int, float], ...] = ()
  source: str = ''


# The papers' 5-way Omniglot numbers (1-shot, 5-shot) and sources; see the
# README for which were checked against the papers in this session.
PAPER = {
    'maml': (((1, 0.987), (5, 0.999)),
             'Finn, Abbeel & Levine 2017, arXiv:1703.03400, Table 1'),
    'fomaml': (((1, 0.983), (5, 0.992)),
               'Finn, Abbeel & Levine 2017, Table 1 (first-order rows); '
               'numbers as given in the issue, not checked here'),
    'reptile': (((1, 0.9768), (5, 0.9948)),
                'Nichol, Achiam & Schulman 2018, arXiv:1803.02999, Table 1 '
                '(transductive); numbers as given in the issue, not checked '
                'here'),
    'imaml': (((1, 0.9916), (5, 0.9967)),
              'Rajeswaran, Finn, Kakade & Levine 2019, arXiv:1909.04630, '
              'Table 2 (iMAML, Hessian-free); as given in the issue, not '
              'checked here'),
    'protonets': (((1, 0.988), (5, 0.997)),
                  'Snell, Swersky & Zemel 2017, arXiv:1703.05175, Table 1; '
                  'as given in the issue, not checked here'),
    'anil': ((), 'Raghu, Raghu, Bengio & Vinyals 2020, arXiv:1909.09157: '
             'no 5-way Omniglot number is used here (its Omniglot results '
             'are 20-way; not checked in this session)'),
    'maml++': (((1, 0.9947), (5, 0.9993)),
               'Antoniou, Edwards & Storkey 2019, arXiv:1810.09502, Table 1; '
               'as given in the issue, not checked here'),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the baselines experiment.

  Attributes:
    seed: Seed of the experiment's PRNG key tree.
    settings: ``(ways, shots)`` of each problem (5-way 1- and 5-shot).
    methods: The methods, each trained once per setting.
    time_budget_s: Seconds of training of every (method, setting) run: the
      same wall-clock budget for all. Compilation and the accuracy-curve
      evaluations are not counted (timed apart and reported). None: train
      ``num_iterations`` of each method (the papers' protocols).
    features: Channels of every conv layer of Conv-4 (papers: 64).
    num_layers: Conv blocks (Conv-4: 4; the smoke config uses 1, which
      compiles faster).
    fast_compile: Compile with XLA's backend optimisations off (faster to
      compile, slower to run: the smoke config).
    image_size: Image side (papers: 28).
    num_train_characters: The first this many characters meta-train, the
      rest test (papers: 1200 of 1623).
    rotations: Classes are characters at a random multiple of 90 degrees.
    train_query: Query examples per class of a training task (ProtoNets'
      training episodes too).
    test_query: Query examples per class of a test task.
    num_test_tasks: Test tasks of the final evaluation (600).
    num_curve_tasks: Test tasks of each point of the accuracy curve.
    num_curve_points: Curve points after the start (equally spaced in
      training progress: seconds with a budget, iterations without).
    eval_batch_size: Test tasks per jitted evaluation call; divides
      ``num_curve_tasks`` and ``num_test_tasks``.
    log_every_s: Seconds between progress log lines.
    protocol: ``'cpu'``: ``methods`` under ``time_budget_s`` as given;
      ``'paper'``: the papers' protocols (:func:`paper_methods`, no time
      budget, every method its paper's iterations and meta-batch);
      ``'auto'``: ``'paper'`` when JAX's default backend is a GPU, else
      ``'cpu'`` (see :func:`resolve`).
  """
  seed: int = 0
  settings: tuple[tuple[int, int], ...] = ((5, 1), (5, 5))
  methods: tuple[Method, ...] = ()
  time_budget_s: float | None = None
  features: int = 64
  num_layers: int = 4
  fast_compile: bool = False
  image_size: int = 28
  num_train_characters: int = 1200
  rotations: bool = True
  train_query: int = 5
  test_query: int = 15
  num_test_tasks: int = 600
  num_curve_tasks: int = 100
  num_curve_points: int = 4
  eval_batch_size: int = 50
  log_every_s: float = 30.0
  protocol: str = 'cpu'

  def __post_init__(self):
    if self.protocol not in ('cpu', 'paper', 'auto'):
      raise ValueError(f"Config: protocol must be 'cpu', 'paper' or 'auto', "
                       f'got {self.protocol!r}.')
    names = [m.name for m in self.methods]
    unknown = [n for n in names if n not in METHOD_KINDS]
    if unknown or len(set(names)) != len(names):
      raise ValueError(f'Config: methods must be distinct names of '
                       f'{METHOD_KINDS}, got {names}.')
    for n in ('num_test_tasks', 'num_curve_tasks'):
      if getattr(self, n) % self.eval_batch_size:
        raise ValueError(f'Config: {n} must be a multiple of eval_batch_size'
                         f' ({self.eval_batch_size}), got '
                         f'{getattr(self, n)}.')
    if self.time_budget_s is not None and self.time_budget_s <= 0:
      raise ValueError(f'Config: time_budget_s must be > 0 or None, got '
                       f'{self.time_budget_s}.')
    for ways, shots in self.settings:
      if shots + max(self.train_query, self.test_query) > 20:
        raise ValueError(f'Config: shots + query must be <= 20 drawers, got '
                         f'{shots} + {max(self.train_query, self.test_query)}.')


def paper_methods() -> tuple[Method, ...]:
  """The papers' protocols (for a GPU); see the README's protocol table."""
  def paper(name):
    numbers, source = PAPER[name]
    return {'paper': numbers, 'source': source}

  return (
      # Finn et al. 2017: 60,000 iterations of 32 tasks, 1 inner step of 0.4
      # (3 at test), Adam 1e-3.
      Method('maml', meta_batch_size=32, num_iterations=60_000,
             inner_lr=0.4, num_inner_steps=1, num_eval_steps=3,
             **paper('maml')),
      Method('fomaml', meta_batch_size=32, num_iterations=60_000,
             inner_lr=0.4, num_inner_steps=1, num_eval_steps=3,
             **paper('fomaml')),
      # Nichol et al. 2018 (their README's Omniglot commands): 100,000
      # meta-iterations of 5 tasks, 5 inner Adam steps (lr 1e-3, beta1 0)
      # on 10 shots per class, outer step 1.0 annealed to 0, 50 test steps.
      Method('reptile', meta_batch_size=5, num_iterations=100_000,
             outer_lr=1.0, inner_lr=1e-3, num_inner_steps=5,
             num_eval_steps=50, train_shots=10, **paper('reptile')),
      # Rajeswaran et al. 2019: lambda = 2, 16 inner GD steps, 5 CG steps.
      # Iterations and meta-batch not checked: MAML's are used.
      Method('imaml', meta_batch_size=32, num_iterations=60_000,
             inner_lr=0.4, num_inner_steps=16, num_eval_steps=16, reg=2.0,
             cg_steps=5, **paper('imaml')),
      # Snell et al. 2017: 60-way training episodes, 5 queries per class,
      # Adam 1e-3 (their halving every 2,000 episodes is not applied);
      # 20,000 episodes here (they train to convergence on validation).
      Method('protonets', meta_batch_size=1, num_iterations=20_000,
             train_ways=60, **paper('protonets')),
      # Raghu et al. 2020: MAML's protocol, head adapted only.
      Method('anil', meta_batch_size=32, num_iterations=60_000,
             inner_lr=0.4, num_inner_steps=1, num_eval_steps=3,
             **paper('anil')),
      # Antoniou et al. 2019: 5 inner steps, LSLR initialised at 0.1, MSL
      # annealed over the first 10% of training, first order for the first
      # half. Meta-batch 16 and 100 epochs of 500 iterations: not checked.
      Method('maml++', meta_batch_size=16, num_iterations=50_000,
             inner_lr=0.1, num_inner_steps=5, num_eval_steps=5,
             msl_fraction=0.1, first_order_fraction=0.5, **paper('maml++')),
  )


def resolve(config: Config, backend: str) -> Config:
  """``config`` with its protocol applied.

  Args:
    config: A config; its ``protocol`` may be ``'auto'``.
    backend: ``jax.default_backend()``.
  """
  protocol = config.protocol
  if protocol == 'auto':
    protocol = 'paper' if backend == 'gpu' else 'cpu'
  if protocol == 'paper':
    return dataclasses.replace(config, protocol='paper',
                               methods=paper_methods(), time_budget_s=None)
  return dataclasses.replace(config, protocol='cpu')


def setting_name(setting: tuple[int, int]) -> str:
  return f'{setting[0]}way{setting[1]}shot'


def get_config(name: str) -> Config:
  """The config of ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
