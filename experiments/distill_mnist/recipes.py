"""The models the study trains and their training recipes.

The teacher, the students (hard labels, distilled at each temperature) and
the born-again student, as ``ModelSpec`` records.
"""

import dataclasses
from typing import Any

from experiments.distill_mnist.configs import Config


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of the experiment and how it is trained.

  Attributes:
    name: Key in the results, e.g. ``'student_kd_T20'``.
    description: One line for the results table.
    widths: Hidden layer widths.
    dropout: Dropout rate on hidden units.
    input_dropout: Dropout rate on input pixels.
    jitter: Largest random shift of training images, in pixels.
    epochs: Training epochs.
    temperature: Distillation temperature; None trains on hard labels only.
    alpha: Weight of the soft term (the hard term gets ``1 - alpha``).
  """
  name: str
  description: str
  widths: tuple[int, ...]
  dropout: float = 0.0
  input_dropout: float = 0.0
  jitter: int = 0
  epochs: int = 1
  temperature: float | None = None
  alpha: float = 0.0


def model_specs(config: Config) -> list[ModelSpec]:
  """The models the experiment trains, teacher first."""

  def fmt(t: float) -> str:
    return f'{t:g}'

  teacher = ModelSpec(
      name='teacher',
      description=(f'teacher {_widths_str(config.teacher_widths)}, dropout '
                   f'{config.teacher_dropout:g} (inputs '
                   f'{config.teacher_input_dropout:g}), jitter '
                   f'{config.teacher_jitter}px'),
      widths=config.teacher_widths, dropout=config.teacher_dropout,
      input_dropout=config.teacher_input_dropout,
      jitter=config.teacher_jitter, epochs=config.teacher_epochs)
  specs = [teacher, ModelSpec(
      name='student_hard',
      description=f'student {_widths_str(config.student_widths)}, hard labels',
      widths=config.student_widths, epochs=config.student_epochs)]
  for t in config.temperatures:
    specs.append(ModelSpec(
        name=f'student_kd_T{fmt(t)}',
        description=(f'student {_widths_str(config.student_widths)}, KD '
                     f'T={fmt(t)}, alpha={config.alpha:g}'),
        widths=config.student_widths, epochs=config.student_epochs,
        temperature=t, alpha=config.alpha))
  if config.born_again:
    specs.append(dataclasses.replace(
        teacher, name='born_again',
        description=(f'born-again {_widths_str(config.teacher_widths)} '
                     f'(as the teacher), KD '
                     f'T={fmt(config.born_again_temperature)}, alpha='
                     f'{config.born_again_alpha:g}'),
        temperature=config.born_again_temperature,
        alpha=config.born_again_alpha))
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f'model_specs: model names must be unique, got {names}.')
  return specs


def _widths_str(widths: tuple[int, ...]) -> str:
  return 'x'.join(str(w) for w in widths) or 'linear'


def teacher_in_step(spec: ModelSpec) -> bool:
  """Whether ``spec`` needs the teacher's logits on jittered images.

  Otherwise (hard labels, or distillation without jitter) the teacher's
  logits on the training set are computed once and fed with the batches: a
  teacher forward pass per student step costs far more than one pass over
  the training set (see the README).
  """
  return spec.temperature is not None and spec.jitter > 0


def arch(spec: ModelSpec) -> tuple[Any, ...]:
  """The ``models.MLP`` of ``spec``, as a hashable tuple (``steps.mlp``)."""
  return (tuple(spec.widths), spec.dropout, spec.input_dropout)
