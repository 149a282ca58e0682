"""Configurations of the text paradigms experiment, selected by name.

Each module ``configs/<name>.py`` defines ``get_config() -> Config``;
configs are frozen dataclasses (derive variants with
``dataclasses.replace``).
"""

import dataclasses

from experiments.common import utils

NAMES = utils.CONFIG_NAMES
OBJECTIVES = ('t5', 'bart', 'bert')
KINDS = ('probe', 'full', 'lora', 'prompt', 'few_shot', 'lwf', 'replay')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of adapting a pre-trained model to speaker attribution.

  Attributes:
    name: Key in the results, e.g. ``'lora_r8'``.
    kind: One of ``KINDS``:

      * ``'probe'``: feature extraction: the frozen encoder's mean-pooled
        states, a new linear head.
      * ``'full'``: every weight trained, text to text: the speech in, the
        speaker's name out, read from the decoder's first step (the ten
        names' initials are distinct; ``systems.System.b_scores``).
      * ``'lora'``: LoRA adapters on every attention (query, key, value,
        out) and MLP kernel of the encoder and the decoder, text to text.
      * ``'prompt'``: a soft prompt before the encoder input (Lester et al.
        2021), the model frozen, text to text.
      * ``'few_shot'``: no gradient step: the query's speaker name is masked
        as the model's own pre-training corruption would hide it
        (``'<?>:\\nspeech'``), demos from the K-shot set follow in the
        encoder's context, and the label is the name the decoder scores
        highest. ``max_demos = 0`` is zero-shot.
      * ``'lwf'``: ``'full'`` plus Learning without Forgetting: the
        pre-trained model's denoising outputs on B's inputs (corrupted by
        its own objective) are distilled (``metacf.distill``).
      * ``'replay'``: ``'full'`` plus the denoising loss on pre-training
        windows replayed from a ``metacf.replay`` buffer.
    learning_rate: SGD learning rate (momentum ``Config.momentum``).
    rank: LoRA rank.
    prompt_tokens: Soft prompt length.
    max_demos: Few-shot demos at most (as many as fit in the context).
  """
  name: str
  kind: str
  learning_rate: float = 0.0
  rank: int = 0
  prompt_tokens: int = 0
  max_demos: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Variant: kind must be one of {KINDS}, got '
                       f'{self.kind!r}.')
    if self.gradient and self.learning_rate <= 0:
      raise ValueError(f'Variant: {self.name} needs learning_rate > 0.')
    if self.kind == 'lora' and self.rank < 1:
      raise ValueError(f'Variant: {self.name} needs rank >= 1.')
    if self.kind == 'prompt' and self.prompt_tokens < 1:
      raise ValueError(f'Variant: {self.name} needs prompt_tokens >= 1.')

  @property
  def gradient(self) -> bool:
    return self.kind != 'few_shot'


def default_variants(*, full_lr: float = 0.003, probe_lr: float = 0.1,
                     lora_lr: float = 0.03, prompt_lr: float = 0.3
                     ) -> tuple[Variant, ...]:
  """The variants of the study (learning rates: see README.md)."""
  return (
      Variant('probe', 'probe', probe_lr),
      Variant('full', 'full', full_lr),
      Variant('lora_r1', 'lora', lora_lr, rank=1),
      Variant('lora_r8', 'lora', lora_lr, rank=8),
      Variant('prompt_p5', 'prompt', prompt_lr, prompt_tokens=5),
      Variant('prompt_p20', 'prompt', prompt_lr, prompt_tokens=20),
      Variant('zero_shot', 'few_shot', max_demos=0),
      Variant('few_shot', 'few_shot', max_demos=10),
      Variant('lwf', 'lwf', full_lr),
      Variant('replay', 'replay', full_lr),
  )


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of the text paradigms experiment.

  Attributes:
    objectives: Pre-training objectives, a model each (``OBJECTIVES``).
    seeds: Adaptation seeds (K-shot draw, batch order, heads, adapters,
      prompts, demos, corruption keys).
    shots: K, B's training speeches per speaker (None: all of the pool).
    b_test_per_speaker: B's test speeches per speaker.
    b_length: Characters of a speech B reads (its beginning).
    seq_length: Pre-training window, characters.
    d_model, num_heads, mlp_dim, num_layers: The encoder-decoder
      (``experiments.common.models.EncoderDecoder``; ``num_layers`` each).
    pretrain_seed: Key of the pre-training (init, windows, corruption).
    pretrain_steps: Adam steps of the full-format objectives (BART, BERT);
      T5's cheaper steps are scaled up to the same XLA FLOP count.
    pretrain_batch_size: Windows per pre-training step.
    pretrain_lr: Peak Adam learning rate (linear warm-up, cosine decay).
    checkpoint_every: Pre-training steps between checkpoints.
    steps, batch_size, momentum: Adaptation: SGD steps, batch, momentum.
    variants: The adaptation recipes.
    lwf_temperature, lwf_weight: LwF's T and old-task weight.
    replay_capacity, replay_batch: Replayed pre-training windows: buffer
      size and windows per step.
    context_length, query_chars, demo_chars: Few-shot prompts: encoder
      tokens, characters of the query and of each demo speech.
    num_valid: Validation windows for the denoising metrics.
    num_ntk_a, ntk_b_per_speaker: The forgetting prediction's task A
      (validation windows) and B (speeches per speaker).
    eval_batch_size: Examples per evaluation chunk.
    progress_bar: Show tqdm bars.
  """
  objectives: tuple[str, ...] = OBJECTIVES
  seeds: tuple[int, ...] = (0, 1, 2)
  shots: tuple[int | None, ...] = (8, 32, None)
  b_test_per_speaker: int = 20
  b_length: int = 96
  seq_length: int = 128
  d_model: int = 128
  num_heads: int = 4
  mlp_dim: int = 256
  num_layers: int = 2
  pretrain_seed: int = 0
  pretrain_steps: int = 800
  pretrain_batch_size: int = 32
  pretrain_lr: float = 2e-3
  checkpoint_every: int = 100
  steps: int = 60
  batch_size: int = 16
  momentum: float = 0.9
  variants: tuple[Variant, ...] = default_variants()
  lwf_temperature: float = 2.0
  lwf_weight: float = 1.0
  replay_capacity: int = 256
  replay_batch: int = 8
  context_length: int = 128
  query_chars: int = 48
  demo_chars: int = 24
  num_valid: int = 64
  num_ntk_a: int = 2
  ntk_b_per_speaker: int = 2
  eval_batch_size: int = 100
  progress_bar: bool = True

  def __post_init__(self):
    for o in self.objectives:
      if o not in OBJECTIVES:
        raise ValueError(f'Config: objectives must be in {OBJECTIVES}, got '
                         f'{o!r}.')
    utils.check_positive_multiples(self, ['pretrain_steps'],
                                   'checkpoint_every', 'Config')


def get_config(name: str) -> Config:
  """Returns the config defined by ``configs/<name>.py``."""
  return utils.load_config(__name__, name)
