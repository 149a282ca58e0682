r"""Jacobians, empirical NTKs, their top-k SVDs and NTK-predicted forgetting.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> from metacf import jacobian as jac
  >>> def apply_fn(params, x):                    # [N, 4] -> [N, 3]
  ...   return jnp.tanh(x @ params['w1']) @ params['w2']
  >>> k1, k2, ka, kb = jax.random.split(jax.random.key(0), 4)
  >>> params = {'w1': jax.random.normal(k1, (4, 8)) / 2,
  ...           'w2': jax.random.normal(k2, (8, 3)) / 3}
  >>> x_a, x_b = jax.random.normal(ka, (6, 4)), jax.random.normal(kb, (6, 4))
  >>> y_a, y_b = jnp.zeros((6, 3)), jnp.ones((6, 3))
  >>> svd_a = jac.jacobian_svd(apply_fn, params, x_a, 5, method='gram')
  >>> svd_b = jac.jacobian_svd(apply_fn, params, x_b, 5, method='gram')
  >>> svd_a.s.shape, svd_a.vt.shape              # P = 4 * 8 + 8 * 3 = 56
  ((5,), (5, 56))
  >>> overlap = jac.subspace_overlap(svd_a, svd_b)
  >>> bool(0.0 <= overlap <= 1.0)
  True
  >>> delta = jac.predicted_forgetting(apply_fn, params, (x_a, y_a), (x_b, y_b),
  ...                                  lr=0.1, num_steps=100)
  >>> delta.shape                                # > 0: forgetting
  ()

Conventions. ``apply_fn(params, x)`` maps a batch of ``N`` examples to outputs
of shape ``[N, C]``. A Jacobian :math:`J = \partial f / \partial \theta` has
one row per (example, output) pair in row-major order (row ``n * C + c``) and
one column per parameter in ``jax.flatten_util.ravel_pytree(params)`` order:
shape ``[N * C, P]``. The empirical neural tangent kernel is
:math:`\Theta(x_1, x_2) = J(x_1) J(x_2)^\top`, shape ``[N1 * C, N2 * C]``,
with rows and columns in that same (example, output) order.

Static arguments. ``k``, ``method``, ``implementation``, ``mode``, ``loss``,
``num_steps``, ``chunk_size``, ``krylov_dim``, ``block_size``, ``oversampling``,
``num_power_iters``, ``tol``, ``unroll`` and ``mesh`` select
shapes and code paths, so they must be Python values. To use these functions
inside ``jax.jit``, close over ``apply_fn`` and those arguments (e.g. with
``functools.partial``) and pass ``params``, inputs, targets, ``lr`` and ``key``
as traced arguments. Argument checks run on static information only (shapes,
dtypes, Python numbers) and are skipped for traced values.

Batch coupling. :func:`ntk`, the ``'gram'``, ``'randomized'`` and
``'subspace_iteration'`` SVDs and the
forgetting predictions differentiate ``apply_fn`` on the whole batch, so they
are exact for any model, including ones that mix examples (batch statistics).
:func:`jacobian` (and so the ``'dense'`` SVD) evaluates ``apply_fn`` on chunks
of ``chunk_size`` examples: with a chunk size below ``N`` that is exact only
when ``apply_fn`` treats examples independently; the default is one chunk.

Models from flax and equinox enter as a params pytree and a pure
``apply_fn`` (tested in ``tests/test_interop.py``):

>>> import jax
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from metacf import jacobian as jac
>>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.tanh,
...                        nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
>>> graphdef, params = nnx.split(model, nnx.Param)        # flax nnx
>>> apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
>>> svd = jac.jacobian_svd(apply_fn, params, jnp.ones((5, 4)), 3, method='gram')
>>> svd.vt.shape                                          # P = 40 + 27
(3, 67)

For linen, ``apply_fn = lambda p, x: model.apply({'params': p}, x)``; for
equinox, ``params, static = eqx.partition(model, eqx.is_array)`` and
``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``.

Modules: ``_jacobian`` (the dense, chunked :func:`jacobian` and the helpers
shared by the others), ``_ntk`` (:func:`ntk`), ``_svd`` (:func:`jacobian_svd`
and its options), ``_krylov`` (the randomized method's block Krylov solver),
``_subspace`` (the subspace comparisons) and ``_forgetting``
(:func:`predicted_forgetting` and its low-rank variant).
"""

from metacf.jacobian._forgetting import predicted_forgetting
from metacf.jacobian._forgetting import predicted_forgetting_low_rank
from metacf.jacobian._jacobian import jacobian
from metacf.jacobian._ntk import ntk
from metacf.jacobian._krylov import default_krylov_dim
from metacf.jacobian._subspace import principal_angle_cosines
from metacf.jacobian._subspace import subspace_overlap
from metacf.jacobian._subspace import weighted_subspace_overlap
from metacf.jacobian._svd import auto_svd_method
from metacf.jacobian._svd import jacobian_svd
from metacf.jacobian._svd import JacobianSVD

__all__ = [
    'JacobianSVD',
    'auto_svd_method',
    'default_krylov_dim',
    'jacobian',
    'jacobian_svd',
    'ntk',
    'predicted_forgetting',
    'predicted_forgetting_low_rank',
    'principal_angle_cosines',
    'subspace_overlap',
    'weighted_subspace_overlap',
]
