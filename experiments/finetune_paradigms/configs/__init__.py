"""Configurations of the fine-tuning paradigms experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
``get_config('default')`` loads it. Configs are frozen dataclasses: derive
variants with ``dataclasses.replace``.
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES

# Paradigms understood by train.py; each is a key of the results.
KINDS = ('linear_probe', 'full_finetune', 'partial_finetune', 'lora',
         'prompt_tuning', 'nearest_class_mean', 'lwf', 'replay')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One adaptation recipe: a paradigm and its hyperparameters.

  Attributes:
    name: Key in the results, e.g. ``'lora_r4'``.
    kind: One of ``KINDS``:

      * ``'linear_probe'``: frozen body, a new head for B (feature
        extraction).
      * ``'full_finetune'``: a new head for B, every body weight trained.
      * ``'partial_finetune'``: a new head, the last block and the final
        LayerNorm trained.
      * ``'lora'``: low-rank adapters (``metacf.adapters.lora_init``) on the
        attention and MLP kernels, and a new head; A is evaluated with the
        adapters merged (the deployed single model) and switched off.
      * ``'prompt_tuning'``: a soft prompt (``prepend_prompt``) and a new
        head; shallow, or deep (VPT-deep: a new prompt per block).
      * ``'nearest_class_mean'``: no gradient; B's class means of the
        frozen features of the K shots, nearest-mean classification (the
        stand-in for prompt engineering in a vision model).
      * ``'lwf'``: full fine-tuning plus Learning without Forgetting: A's
        head kept and trained, A's outputs on B's inputs distilled
        (``metacf.distill.lwf_loss``), no A data.
      * ``'replay'``: full fine-tuning with a small reservoir buffer of A's
        training images (``metacf.replay``) mixed into every batch.
    learning_rate: SGD learning rate (momentum ``Config.momentum``).
    rank: LoRA rank.
    prompt_tokens: Prompt length (per block when ``deep``).
    deep: VPT-deep prompts.
    buffer_size: Replay buffer capacity (A images).
    replay_fraction: Fraction of each batch replaced by replayed A images.
    temperature: LwF distillation temperature (Li & Hoiem: 2).
    old_weight: LwF weight of the distillation term (Li & Hoiem: 1).
  """
  name: str
  kind: str
  learning_rate: float = 0.0
  rank: int = 0
  prompt_tokens: int = 0
  deep: bool = False
  buffer_size: int = 0
  replay_fraction: float = 0.5
  temperature: float = 2.0
  old_weight: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Variant: kind must be one of {KINDS}, got '
                       f'{self.kind!r}.')
    gradient = self.kind != 'nearest_class_mean'
    if gradient and self.learning_rate <= 0:
      raise ValueError(f'Variant: {self.name} needs learning_rate > 0, got '
                       f'{self.learning_rate}.')
    if self.kind == 'lora' and self.rank < 1:
      raise ValueError(f'Variant: {self.name} needs rank >= 1.')
    if self.kind == 'prompt_tuning' and self.prompt_tokens < 1:
      raise ValueError(f'Variant: {self.name} needs prompt_tokens >= 1.')
    if self.kind == 'replay' and self.buffer_size < 1:
      raise ValueError(f'Variant: {self.name} needs buffer_size >= 1.')

  @property
  def gradient(self) -> bool:
    """Whether the variant is trained by gradient descent."""
    return self.kind != 'nearest_class_mean'


def default_variants(*, full_lr: float = 0.01, probe_lr: float = 0.1,
                     lora_lr: float = 0.03, prompt_lr: float = 0.1,
                     buffer_size: int = 500) -> tuple[Variant, ...]:
  """The 13 variants of the study (learning rates: see configs/default.py)."""
  return (
      Variant('linear_probe', 'linear_probe', probe_lr),
      Variant('full_finetune', 'full_finetune', full_lr),
      Variant('partial_finetune', 'partial_finetune', full_lr),
      Variant('lora_r1', 'lora', lora_lr, rank=1),
      Variant('lora_r4', 'lora', lora_lr, rank=4),
      Variant('lora_r16', 'lora', lora_lr, rank=16),
      Variant('prompt_p1', 'prompt_tuning', prompt_lr, prompt_tokens=1),
      Variant('prompt_p5', 'prompt_tuning', prompt_lr, prompt_tokens=5),
      Variant('prompt_p20', 'prompt_tuning', prompt_lr, prompt_tokens=20),
      Variant('prompt_deep5', 'prompt_tuning', prompt_lr, prompt_tokens=5,
              deep=True),
      Variant('nearest_class_mean', 'nearest_class_mean'),
      Variant('lwf', 'lwf', full_lr),
      Variant('replay', 'replay', full_lr, buffer_size=buffer_size),
  )


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the fine-tuning paradigms experiment.

  Attributes:
    seeds: Adaptation seeds (K-shot draw, batch order, new head, adapters,
      prompts, replay buffer); the pre-trained model is the same for all.
    shots: K, labelled B examples per class; ``None`` means all of them.
    num_train_a: First MNIST training images used (None: all 60k).
    num_test_a: First MNIST test images (None: all 10k).
    num_train_b: First Fashion-MNIST training images (None: all 60k).
    num_test_b: First Fashion-MNIST test images (None: all 10k).
    patch_size, dim, depth, num_heads, mlp_dim: The ViT
      (``experiments.common.models.ViT``).
    pretrain_seed: Key of the pre-training (init and batch order).
    pretrain_epochs: Epochs on MNIST (task A).
    pretrain_batch_size: Pre-training batch size.
    pretrain_lr: Peak Adam learning rate (cosine decay, no warm-up).
    steps: Adaptation steps, the same for every variant and K.
    batch_size: Adaptation batch size.
    momentum: SGD momentum of the adaptation.
    lora_targets: Regex of the LoRA target kernels.
    lora_alpha: LoRA scaling numerator (``None``: alpha = rank, scale 1).
    variants: The adaptation recipes.
    eval_batch_size: Test images per evaluation chunk.
    ntk_num_a: A's test images (the first ones) for the NTK prediction.
    ntk_shots_b: B's training images per class for the NTK prediction:
      the first of seed ``seeds[0]``'s nested K-shot draw, so they are in the
      training set of every K.
    progress_bar: Show tqdm bars (off anyway when not on a TTY).
  """
  seeds: tuple[int, ...] = (0, 1, 2)
  shots: tuple[int | None, ...] = (10, 100, 1000, None)
  num_train_a: int | None = None
  num_test_a: int | None = None
  num_train_b: int | None = None
  num_test_b: int | None = None
  patch_size: int = 7
  dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  pretrain_seed: int = 0
  pretrain_epochs: int = 2
  pretrain_batch_size: int = 128
  pretrain_lr: float = 1e-3
  steps: int = 150
  batch_size: int = 32
  momentum: float = 0.9
  lora_targets: str = r'(attn|mlp)/.*/kernel'
  lora_alpha: float | None = None
  variants: tuple[Variant, ...] = default_variants()
  eval_batch_size: int = 2500
  ntk_num_a: int = 100
  ntk_shots_b: int = 2
  ntk_chunk_size: int = 10
  progress_bar: bool = True

  def variant(self, name: str) -> Variant:
    """The variant called ``name`` (KeyError if there is none)."""
    for v in self.variants:
      if v.name == name:
        return v
    raise KeyError(f'Config.variant: no variant named {name!r}; have '
                   f'{[v.name for v in self.variants]}.')


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py`` (ValueError if none)."""
  return utils.load_config(__name__, name)
