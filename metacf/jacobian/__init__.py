"""Jacobians, empirical NTKs, their top-k SVDs and NTK-predicted forgetting.

Example::

  from metacf import jacobian as jac

  svd_a = jac.jacobian_svd(apply_fn, params, x_a, 10, method='gram')
  svd_b = jac.jacobian_svd(apply_fn, params, x_b, 10, method='gram')
  overlap = jac.subspace_overlap(svd_a, svd_b)          # in [0, 1]
  delta = jac.predicted_forgetting(apply_fn, params, (x_a, y_a), (x_b, y_b),
                                   lr=0.1, num_steps=100)  # > 0: forgetting
"""

from metacf.jacobian._jacobian import auto_svd_method
from metacf.jacobian._jacobian import jacobian
from metacf.jacobian._jacobian import jacobian_svd
from metacf.jacobian._jacobian import JacobianSVD
from metacf.jacobian._jacobian import ntk
from metacf.jacobian._jacobian import predicted_forgetting
from metacf.jacobian._jacobian import predicted_forgetting_low_rank
from metacf.jacobian._jacobian import principal_angle_cosines
from metacf.jacobian._jacobian import subspace_overlap
from metacf.jacobian._jacobian import weighted_subspace_overlap

__all__ = [
    'JacobianSVD',
    'auto_svd_method',
    'jacobian',
    'jacobian_svd',
    'ntk',
    'predicted_forgetting',
    'predicted_forgetting_low_rank',
    'principal_angle_cosines',
    'subspace_overlap',
    'weighted_subspace_overlap',
]
