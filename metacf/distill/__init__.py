"""Knowledge distillation with temperature (Hinton et al. 2015) and LwF.

Examples:
  Hinton et al.'s loss, soft targets at ``T = 4`` mixed with the hard labels:

  >>> import jax.numpy as jnp
  >>> import optax
  >>> import metacf
  >>> student = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])  # [batch, classes]
  >>> teacher = jnp.array([[3.0, 0.0, -2.0], [0.5, 0.5, 2.0]])
  >>> labels = jnp.array([0, 2])
  >>> kd = metacf.distill.tempered_distillation_loss(student, teacher, 4.0)
  >>> kd.shape                                 # per example, no reduction
  (2,)
  >>> ce = optax.losses.softmax_cross_entropy_with_integer_labels(student, labels)
  >>> loss = jnp.mean(0.9 * kd + 0.1 * ce)
  >>> bool(jnp.all(kd >= 0))
  True
  >>> float(metacf.distill.tempered_distillation_loss(teacher, teacher, 4.0)[0])
  0.0
"""

from metacf.distill._losses import distillation_loss_from_probs
from metacf.distill._losses import logit_mse_loss
from metacf.distill._losses import lwf_loss
from metacf.distill._losses import renyi_divergence_loss
from metacf.distill._losses import temper_probs
from metacf.distill._losses import tempered_distillation_loss
from metacf.distill._losses import tempered_softmax

__all__ = [
    'distillation_loss_from_probs',
    'logit_mse_loss',
    'lwf_loss',
    'renyi_divergence_loss',
    'temper_probs',
    'tempered_distillation_loss',
    'tempered_softmax',
]
