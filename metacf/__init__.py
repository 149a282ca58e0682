"""metacf: pure, jitted JAX kernels for meta-learning and continual learning.

Public API. Subpackages: ``metacf.distill``, ``metacf.jacobian``,
``metacf.layers``, ``metacf.maml``, ``metacf.metrics``, ``metacf.replay``.
``metacf.data`` (the only module that imports tensorflow-datasets) is
imported on demand, not here.
"""

from metacf import distill as distill
from metacf import jacobian as jacobian
from metacf import layers as layers
from metacf import maml as maml
from metacf import metrics as metrics
from metacf import replay as replay

__version__ = '0.1.0'

__all__ = ['distill', 'jacobian', 'layers', 'maml', 'metrics', 'replay']
