"""Configurations of the LwF-observability experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.

Learning without Forgetting follows Li & Hoiem 2017, "Learning without
Forgetting" (https://arxiv.org/abs/1606.09282): A's head is kept, its outputs
on B's inputs are recorded before training on B, and they are distilled
(temperature 2, weight 1) while B is learnt; no A data is used.
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES

# What a task B is made of (see TaskB).
KINDS = ('fashion_mnist', 'rotation', 'permutation', 'omniglot', 'noise')
SVD_METHODS = ('gram', 'randomized', 'dense')


@dataclasses.dataclass(frozen=True)
class TaskB:
  """A ten-class task learnt after MNIST.

  Attributes:
    name: Key in the results and file name of its records; its data (draws,
      permutation, noise) come from keys folded from this name.
    kind: One of ``KINDS``:

      * ``'fashion_mnist'``: real Fashion-MNIST, its ten classes.
      * ``'rotation'``: MNIST digits (other training images than A's)
        rotated by ``rotation`` degrees, the digit as label.
      * ``'permutation'``: MNIST digits with one fixed random permutation
        of the 784 pixels (permuted MNIST), the digit as label.
      * ``'omniglot'``: real Omniglot (background split) characters of
        ten alphabets, strokes white on black like MNIST, 105x105
        area-averaged to 28x28; the alphabet is the label. Drawers 0-15
        give the training images, drawers 16-19 the test images.
      * ``'noise'``: a declared synthetic task: images of i.i.d.
        uniform [0, 1] pixels with labels drawn uniformly from ten classes,
        independently of the image (random labels: B can only be
        memorised, its test accuracy is chance by construction).
    rotation: Counterclockwise rotation in degrees (``'rotation'`` only).
  """
  name: str
  kind: str
  rotation: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'TaskB: kind must be one of {KINDS}, got '
                       f'{self.kind!r}.')
    if self.kind != 'rotation' and self.rotation:
      raise ValueError(f'TaskB: {self.name} has rotation {self.rotation} '
                       f'but kind {self.kind!r}.')


def default_tasks() -> tuple[TaskB, ...]:
  """The seven tasks B of the study."""
  return (
      TaskB('fashion_mnist', 'fashion_mnist'),
      TaskB('rotate_30', 'rotation', 30.0),
      TaskB('rotate_90', 'rotation', 90.0),
      TaskB('rotate_180', 'rotation', 180.0),
      TaskB('permuted', 'permutation'),
      TaskB('omniglot', 'omniglot'),
      TaskB('noise', 'noise'),
  )


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the LwF-observability experiment.

  Attributes:
    seed: Root of the key tree: A's data, initialisation and batches, every
      task B's data (draws, permutation, noise images and labels) and the
      randomized SVDs.
    seeds: Seeds of the B runs (new head, batch order); the A model and the
      tasks' data are the same for all.
    tasks: The tasks B.
    widths: Hidden widths of the shared ReLU body (784 -> widths); A and B
      each have a linear head on it.
    num_train_a: MNIST training images of A, drawn from the first 30k.
    num_test_a: First MNIST test images on which A's accuracy is measured
      (None: all 10k).
    a_epochs: Epochs of Adam on A.
    a_batch_size: Batch size on A.
    a_lr: Adam learning rate on A (cosine decay to 0).
    num_train_b: Training images of each task B (MNIST-based ones from the
      last 30k of MNIST's training split).
    num_test_b: Test images of each task B.
    warmup_steps: Li & Hoiem's warm-up: SGD steps on B's new head alone
      (body and A's head frozen) before the joint training; shared by both
      methods.
    b_steps: SGD steps of the joint training on B.
    b_batch_size: Batch size on B.
    b_lr: SGD learning rate on B (warm-up and joint training).
    momentum: SGD momentum on B.
    temperature: LwF distillation temperature (Li & Hoiem: 2).
    old_weight: LwF weight of the distillation term (Li & Hoiem: 1).
    k_a: Top singular directions of A's Jacobian (A's head, A's inputs).
    k_b: Top singular directions of the Jacobian of A's head on B's inputs.
    num_jac_a: A's test images (the first ones) of A's Jacobian.
    num_jac_b: B's training images (the first ones) of B's Jacobian.
    svd_method: ``metacf.jacobian.jacobian_svd`` method.
    oversampling: Extra probes of the randomized SVD.
    num_power_iters: Power iterations of the randomized SVD.
    eval_batch_size: Images per evaluation chunk.
    progress_bar: Show tqdm bars (off anyway when not on a TTY).
  """
  seed: int = 0
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  tasks: tuple[TaskB, ...] = default_tasks()
  widths: tuple[int, ...] = (256, 256)
  num_train_a: int = 20000
  num_test_a: int | None = None
  a_epochs: int = 8
  a_batch_size: int = 128
  a_lr: float = 1e-3
  num_train_b: int = 4000
  num_test_b: int = 1000
  warmup_steps: int = 100
  b_steps: int = 2000
  b_batch_size: int = 64
  b_lr: float = 0.02
  momentum: float = 0.9
  temperature: float = 2.0
  old_weight: float = 1.0
  k_a: int = 30
  k_b: int = 30
  num_jac_a: int = 200
  num_jac_b: int = 200
  svd_method: str = 'gram'
  oversampling: int = 30
  num_power_iters: int = 4
  eval_batch_size: int = 1000
  progress_bar: bool = True

  def __post_init__(self):
    names = [t.name for t in self.tasks]
    if not names or len(set(names)) != len(names):
      raise ValueError(f'Config: task names must be unique and non-empty, '
                       f'got {names}.')
    if self.svd_method not in SVD_METHODS:
      raise ValueError(f'Config: svd_method must be one of {SVD_METHODS}, '
                       f'got {self.svd_method!r}.')
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'Config: seeds must be unique and non-empty, got '
                       f'{self.seeds}.')
    if self.num_jac_a > (10000 if self.num_test_a is None
                         else self.num_test_a):
      raise ValueError('Config: num_jac_a must not exceed num_test_a.')
    if self.num_jac_b > self.num_train_b:
      raise ValueError('Config: num_jac_b must not exceed num_train_b.')
    for name in ('a_epochs', 'b_steps', 'k_a', 'k_b', 'num_train_a',
                 'num_train_b', 'num_test_b'):
      if getattr(self, name) < 1:
        raise ValueError(f'Config: {name} must be >= 1, got '
                         f'{getattr(self, name)}.')


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
