"""Configurations for the MNIST distillation experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the distillation experiment.

  The paper's numbers are Hinton, Vinyals & Dean 2015, section 3
  (https://arxiv.org/abs/1503.02531); born-again networks are Furlanello et
  al. 2018 (https://arxiv.org/abs/1805.04770).

  Attributes:
    seed: Seed of the experiment's PRNG key tree (init, dropout, shuffling).
    dataset: ``metacf.data.load_arrays`` dataset name.
    num_train: Use the first ``num_train`` training images (None: all 60k).
    num_test: Use the first ``num_test`` test images (None: all 10k).
    teacher_widths: Hidden layer widths of the teacher (paper: 2 x 1200).
    teacher_dropout: Dropout rate on the teacher's hidden units.
    teacher_input_dropout: Dropout rate on the teacher's input pixels.
    teacher_jitter: Largest random shift of the teacher's training images, in
      pixels (paper: 2).
    teacher_epochs: Training epochs of the teacher.
    student_widths: Hidden layer widths of the students (paper: 2 x 800).
    student_epochs: Training epochs of each 2 x 800 student.
    temperatures: Distillation temperatures, one distilled student each.
    alpha: Weight of the soft term ``T^2 KL``; the hard-label cross-entropy
      gets ``1 - alpha`` (the paper weights the hard term "considerably
      lower").
    born_again: Whether to train a born-again student (the teacher's
      architecture, dropout, jitter and epochs, trained from the teacher's
      soft targets).
    born_again_temperature: Temperature of the born-again student.
    born_again_alpha: Soft-term weight of the born-again student (1: soft
      targets only, as in Furlanello et al.'s basic BAN).
    batch_size: Training batch size (the remainder of an epoch is dropped).
    learning_rate: Peak Adam learning rate; cosine-decayed to 0 over training.
    max_steps_per_epoch: Cap on steps per epoch (None: a full pass).
    eval_batch_size: Batch size for test evaluation and teacher logits.
    checkpoint_max_to_keep: Checkpoints kept per model.
    progress_bar: Show tqdm bars (they are off anyway when not on a TTY).
  """
  seed: int = 0
  dataset: str = 'mnist'
  num_train: int | None = None
  num_test: int | None = None
  teacher_widths: tuple[int, ...] = (1200, 1200)
  teacher_dropout: float = 0.2
  teacher_input_dropout: float = 0.0
  teacher_jitter: int = 2
  teacher_epochs: int = 10
  student_widths: tuple[int, ...] = (800, 800)
  student_epochs: int = 10
  temperatures: tuple[float, ...] = (1.0, 4.0, 20.0)
  alpha: float = 0.9
  born_again: bool = True
  born_again_temperature: float = 1.0
  born_again_alpha: float = 1.0
  batch_size: int = 256
  learning_rate: float = 1e-3
  max_steps_per_epoch: int | None = None
  eval_batch_size: int = 10_000
  checkpoint_max_to_keep: int = 2
  progress_bar: bool = True


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
