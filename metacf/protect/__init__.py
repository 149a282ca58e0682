r"""Preventing forgetting: gradient projections and EWC, as optax pieces.

Where :mod:`metacf.jacobian` finds the parameter directions a task trains
along and predicts how much training on another task will forget, this
module keeps training out of those directions or pulls it back:

* :func:`orthogonal_projection` (OGD, PCA-OGD) with a basis grown by
  :func:`extend_basis` or taken from :attr:`metacf.jacobian.JacobianSVD.vt`;
* :func:`gpm_basis` / :func:`gpm_projection`, Gradient Projection Memory's
  layer-wise input spaces;
* :func:`agem_project` / :func:`agem`, A-GEM's half-space projection;
* :func:`fisher_diagonal` (true or empirical), :func:`ewc_penalty`,
  :func:`online_ewc_update` and :func:`ewc`, elastic weight consolidation.

Projections chain with any optax optimizer, first in the chain::

  from metacf import jacobian, protect

  svd_a = jacobian.jacobian_svd(apply_fn, params, x_a, 20)
  tx = optax.chain(protect.orthogonal_projection(svd_a.vt), optax.sgd(0.01))
  # metacf.jacobian.predicted_forgetting(..., protect_basis=svd_a.vt)
  # predicts the forgetting of this projected training before it runs.

Flattened parameter vectors use ``jax.flatten_util.ravel_pytree`` order, as
in :mod:`metacf.jacobian`. Models from flax and equinox enter as a params
pytree (``nnx.split(model, nnx.Param)``, ``eqx.partition``), as there.
"""

from metacf.protect._ewc import ewc
from metacf.protect._ewc import ewc_penalty
from metacf.protect._ewc import fisher_diagonal
from metacf.protect._ewc import online_ewc_update
from metacf.protect._gpm import gpm_basis
from metacf.protect._gpm import gpm_projection
from metacf.protect._projection import agem
from metacf.protect._projection import agem_project
from metacf.protect._projection import AgemState
from metacf.protect._projection import extend_basis
from metacf.protect._projection import orthogonal_projection

__all__ = [
    'AgemState',
    'agem',
    'agem_project',
    'ewc',
    'ewc_penalty',
    'extend_basis',
    'fisher_diagonal',
    'gpm_basis',
    'gpm_projection',
    'online_ewc_update',
    'orthogonal_projection',
]
