"""Knowledge distillation with temperature (Hinton et al. 2015) and LwF.

Example::

  import jax, metacf
  def loss(student_params, x, teacher_logits, labels):
    s = apply_fn(student_params, x)
    kd = metacf.distill.tempered_distillation_loss(s, teacher_logits, 4.0)
    return jnp.mean(0.9 * kd + 0.1 * optax.losses
                    .softmax_cross_entropy_with_integer_labels(s, labels))
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
