"""MAML (Finn et al. 2017): inner/outer loops vmapped over tasks in one jit.

Second-order by default; FOMAML (``first_order=True``), Meta-SGD (pytree
``inner_lr``), ANIL (``adapt_mask``), rematerialised inner loops
(``remat=True``), optax inner optimizers, and a jitted, optionally sharded
meta-training step. Loss functions may return aux outputs (``has_aux=True``,
e.g. query accuracy) and take per-task keys (``key=``, dropout/augmentation).
"""

from metacf.maml._maml import inner_adapt
from metacf.maml._maml import make_meta_train_step
from metacf.maml._maml import maml_loss
from metacf.maml._maml import MetaTrainMetrics
from metacf.maml._maml import Task

__all__ = [
    'MetaTrainMetrics',
    'Task',
    'inner_adapt',
    'make_meta_train_step',
    'maml_loss',
]
