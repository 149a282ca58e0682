"""Configurations for the sinusoid MAML experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.

Hyperparameters are those of Finn, Abbeel & Levine 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", section 5.1
(https://arxiv.org/abs/1703.03400), and of the authors' code
(https://github.com/cbfinn/maml, ``main.py`` and ``maml.py``) where the paper
is silent (weight initialisation, test protocol).
"""

import dataclasses
import math

from experiments.common import utils

NAMES = utils.CONFIG_NAMES


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the sinusoid experiment.

  Attributes:
    seed: Seed of the experiment's PRNG key tree (init, tasks, test tasks).
    methods: The meta-learning methods trained for each K, any of
      ``'maml'`` (Finn et al. 2017), ``'reptile'`` (Nichol et al. 2018) and
      ``'imaml'`` (Rajeswaran et al. 2019); all use the same tasks, network,
      outer optimizer (Adam ``outer_lr``), iterations and test protocol.
    shots: The K of each K-shot run: one meta-training run (and one
      pretrained baseline) per K. Each training task has K support and K
      query points.
    num_iterations: Meta-training iterations of each run (paper: 70,000).
    meta_batch_size: Tasks per meta-update (paper: 25).
    inner_lr: Inner SGD step size alpha, in meta-training and at test time
      (paper: 0.01).
    num_inner_steps: Inner SGD steps in MAML's meta-training (paper: 1).
    reptile_num_inner_steps: Reptile's inner SGD steps (of size
      ``inner_lr``) on each task's K support points per meta-update. Its
      meta-gradient is ``params`` minus the mean adapted parameters
      (``metacf.maml.reptile_grad``), applied with Adam ``outer_lr``.
    imaml_num_inner_steps: iMAML's inner SGD steps (of size ``inner_lr``)
      on the proximally regularised support loss.
    imaml_reg: iMAML's proximal strength lambda.
    imaml_cg_steps: Conjugate-gradient iterations of iMAML's implicit
      meta-gradient (Rajeswaran et al.: 5).
    imaml_clip_norm: iMAML's meta-gradient is scaled down to this global
      norm when larger, before Adam: a precaution against tasks whose inner
      SGD is diverging but still finite (our addition; see the README).
    outer_lr: Adam learning rate of the meta-update and of the pretrained
      baseline (paper: 1e-3, the code's ``meta_lr``).
    hidden_widths: Hidden ReLU layer widths (paper: 40, 40).
    init_stddev: Weights start truncated-normal with this standard deviation
      (within 2 of it), biases at zero, as ``construct_fc_weights`` in the
      authors' ``maml.py``.
    amplitude_range: Amplitudes are uniform in this range (paper: 0.1-5.0).
    phase_range: Phases are uniform in this range (paper: 0-pi).
    input_range: Inputs x are uniform in this range (paper: -5.0-5.0).
    pretrain: Whether to train the pretrained baseline (one network
      regressing on all tasks jointly, then fine-tuned at test time).
    chunk_size: Iterations per jitted call (a ``lax.scan``); the training
      loss is recorded as the mean of each chunk.
    checkpoint_every: Iterations between checkpoints; a multiple of
      ``chunk_size``.
    num_test_tasks: Fresh test tasks (the authors' code: 600).
    num_val_tasks: Further fresh tasks on which the baseline's fine-tuning
      step size is chosen (never the test tasks).
    num_eval_points: Query points per test task on which the adapted
      network is scored. The authors' code scores K query points; both are
      unbiased estimates of the same expected MSE, more points only lower
      its variance.
    max_eval_steps: Test-time SGD steps (paper figures: 0-10).
    baseline_lrs: Fine-tuning step sizes tried for the pretrained baseline
      (the paper: "an automatically tuned step size"); the one with the
      lowest validation MSE after ``max_eval_steps`` steps is used.
    checkpoint_max_to_keep: Checkpoints kept per run.
    progress_bar: Show tqdm bars (they are off anyway when not on a TTY).
  """
  seed: int = 0
  methods: tuple[str, ...] = ('maml', 'reptile', 'imaml')
  shots: tuple[int, ...] = (5, 10, 20)
  num_iterations: int = 70_000
  meta_batch_size: int = 25
  inner_lr: float = 0.01
  num_inner_steps: int = 1
  reptile_num_inner_steps: int = 10
  imaml_num_inner_steps: int = 10
  imaml_reg: float = 10.0
  imaml_cg_steps: int = 5
  imaml_clip_norm: float = 10.0
  outer_lr: float = 1e-3
  hidden_widths: tuple[int, ...] = (40, 40)
  init_stddev: float = 0.01
  amplitude_range: tuple[float, float] = (0.1, 5.0)
  phase_range: tuple[float, float] = (0.0, math.pi)
  input_range: tuple[float, float] = (-5.0, 5.0)
  pretrain: bool = True
  chunk_size: int = 1000
  checkpoint_every: int = 10_000
  num_test_tasks: int = 600
  num_val_tasks: int = 600
  num_eval_points: int = 100
  max_eval_steps: int = 10
  baseline_lrs: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                                     0.1)
  checkpoint_max_to_keep: int = 2
  progress_bar: bool = True


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
