r"""Preventing forgetting: gradient projections and EWC, as optax pieces.

Where :mod:`metacf.jacobian` finds the parameter directions a task trains
along and predicts how much training on another task will forget, this
module keeps training out of those directions or pulls it back:

* :func:`orthogonal_projection` (OGD, PCA-OGD) with a basis grown by
  :func:`extend_basis` or taken from :attr:`metacf.jacobian.JacobianSVD.vt`;
* :func:`gpm_basis` / :func:`gpm_projection`, Gradient Projection Memory's
  layer-wise input spaces (or their projection matrices,
  :func:`gpm_projector`);
* :func:`agem_project` / :func:`agem`, A-GEM's half-space projection, and
  :func:`gem_project` / :func:`gem`, GEM's projection onto all earlier
  tasks' half-spaces;
* :func:`fisher_diagonal` (true or empirical), :func:`ewc_penalty`,
  :func:`online_ewc_update` and :func:`ewc`, elastic weight consolidation;
* :func:`mas_importance` (MAS) and :func:`path_integral` /
  :func:`si_importance` (Synaptic Intelligence): other importances for the
  same quadratic penalty, passed to :func:`ewc_penalty` / :func:`ewc` as
  ``fisher``.

Projections chain with any optax optimizer, first in the chain:

>>> import jax
>>> import jax.numpy as jnp
>>> import optax
>>> from metacf import jacobian, protect
>>> apply_fn = lambda p, x: jnp.tanh(x @ p['w1']) @ p['w2']
>>> k1, k2, kx = jax.random.split(jax.random.key(0), 3)
>>> params = {'w1': jax.random.normal(k1, (4, 8)) / 2,
...           'w2': jax.random.normal(k2, (8, 3)) / 3}
>>> x_a = jax.random.normal(kx, (10, 4))
>>> svd_a = jacobian.jacobian_svd(apply_fn, params, x_a, 5)
>>> tx = optax.chain(protect.orthogonal_projection(svd_a.vt), optax.sgd(0.01))
>>> opt_state = tx.init(params)
>>> grads = jax.tree.map(jnp.ones_like, params)
>>> updates, opt_state = tx.update(grads, opt_state, params)
>>> flat = jax.flatten_util.ravel_pytree(updates)[0]
>>> bool(jnp.allclose(svd_a.vt @ flat, 0.0, atol=1e-5))  # off A's directions
True
>>> # metacf.jacobian.predicted_forgetting(..., protect_basis=svd_a.vt)
>>> # predicts the forgetting of this projected training before it runs.

The arrays a transformation needs live in its optax state, never in its
closure, as optax keeps a learning rate in ``inject_hyperparams``:
:class:`OrthogonalProjectionState` ``(basis)``,
:class:`GpmProjectionState` ``(bases)`` and :class:`EwcState` ``(anchor,
fisher, strength)``. The constructor's arguments are the initial state; a
jitted step that takes the optimizer state as an argument compiles once, its
program holds no ``[k, P]`` constant, and the arrays are swapped between
tasks by field name:

>>> opt_state = tx.init(params)
>>> # ... train on task A
>>> basis_after_a = jnp.zeros_like(svd_a.vt).at[0, 0].set(1.0)
>>> opt_state = optax.tree.set(opt_state, basis=basis_after_a)
>>> # ... train on task B: same compile, same shapes
>>> optax.tree.get(opt_state, 'basis').shape
(5, 56)

``optax.tree.set`` also matches dict keys of the same name inside the
params-like trees (``bases``, ``anchor``, ``fisher``): where the params have
such a key, pass ``lambda path, _: isinstance(path[-1],
optax.tree_utils.NamedTupleKey)`` as its ``filtering`` argument. Donate the
optimizer state to the jitted step (``donate_argnums``): the state it returns
holds the same arrays, which a jitted function copies unless their input
buffers were donated.

Bases that grow keep one shape with zero rows (or GPM's zero columns),
which project nothing: allocate ``k_max`` rows, fill them as tasks come,
swap the padded array in. Rows ``[k, P]`` (``orthogonal_projection``, as
:attr:`metacf.jacobian.JacobianSVD.vt`: one direction of all parameters per
row) and columns ``[d_in, r]`` (``gpm_basis``, Saha et al.'s ``M``: one
direction of a layer's inputs per column) differ on purpose, each that of
its source.

Flattened parameter vectors use ``jax.flatten_util.ravel_pytree`` order, as
in :mod:`metacf.jacobian`. Models from flax and equinox enter as a params
pytree (``nnx.split(model, nnx.Param)``, ``eqx.partition``), as there.
"""

from metacf.protect._ewc import ewc
from metacf.protect._ewc import EwcState
from metacf.protect._ewc import ewc_penalty
from metacf.protect._ewc import fisher_diagonal
from metacf.protect._ewc import online_ewc_update
from metacf.protect._gem import gem
from metacf.protect._gem import gem_project
from metacf.protect._gem import GemState
from metacf.protect._gpm import gpm_basis
from metacf.protect._gpm import gpm_projection
from metacf.protect._gpm import gpm_projector
from metacf.protect._gpm import GpmProjectionState
from metacf.protect._importance import mas_importance
from metacf.protect._importance import path_integral
from metacf.protect._importance import PathIntegralState
from metacf.protect._importance import si_importance
from metacf.protect._projection import agem
from metacf.protect._projection import agem_project
from metacf.protect._projection import AgemState
from metacf.protect._projection import extend_basis
from metacf.protect._projection import orthogonal_projection
from metacf.protect._projection import OrthogonalProjectionState

__all__ = [
    'AgemState',
    'agem',
    'agem_project',
    'EwcState',
    'ewc',
    'ewc_penalty',
    'extend_basis',
    'fisher_diagonal',
    'gem',
    'gem_project',
    'GemState',
    'gpm_basis',
    'GpmProjectionState',
    'gpm_projection',
    'gpm_projector',
    'mas_importance',
    'online_ewc_update',
    'OrthogonalProjectionState',
    'orthogonal_projection',
    'path_integral',
    'PathIntegralState',
    'si_importance',
]
