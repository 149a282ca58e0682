"""metacf: pure, jit-compatible JAX kernels for meta-learning and continual learning.

Kernels are plain, jit-compatible functions (not jitted themselves): call them
inside your own ``jax.jit``/``vmap``/``grad``; ``metacf.maml.make_meta_train_step``
returns a jitted step. Arguments are checked eagerly; value checks under
``jit`` are opt-in (``metacf.runtime_checks()``): see ``metacf.checks``.
Public API. Subpackages: ``metacf.adapters``, ``metacf.distill``,
``metacf.jacobian``, ``metacf.layers``, ``metacf.maml``, ``metacf.masks``,
``metacf.metrics``, ``metacf.noise``, ``metacf.protect``, ``metacf.replay``,
``metacf.typing``.
``metacf.data`` (the only module that imports tensorflow-datasets) is
imported on demand, not here.
"""

from metacf import adapters as adapters
from metacf import checks as checks
from metacf import distill as distill
from metacf import jacobian as jacobian
from metacf import layers as layers
from metacf import maml as maml
from metacf import masks as masks
from metacf import metrics as metrics
from metacf import noise as noise
from metacf import protect as protect
from metacf import replay as replay
from metacf import typing as typing
from metacf.checks import runtime_checks as runtime_checks
from metacf.checks import set_runtime_checks as set_runtime_checks

__version__ = '0.1.0'

__all__ = ['adapters', 'checks', 'distill', 'jacobian', 'layers', 'maml', 'masks', 'metrics',
           'noise', 'protect', 'replay', 'runtime_checks', 'set_runtime_checks',
           'typing']
