r"""How much of A's Jacobian subspace task B's inputs observe, before B.

A's Jacobian on A's inputs and on B's inputs, both of A's centred head
outputs with respect to the shared body (``metacf.jacobian.jacobian_svd``),
compared by ``projected_energy`` (``observability``),
``metacf.jacobian.weighted_subspace_overlap`` and ``excitation_share``.
"""

import functools
import time
from typing import Any

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from experiments.common import utils
from experiments.lwf_observability import steps
from experiments.lwf_observability.configs import Config
from experiments.lwf_observability.configs import TaskB
from experiments.lwf_observability.data import TaskData
import metacf.jacobian

MEASURES = ('observability', 'weighted_overlap', 'excitation_share')

Params = Any


def projected_energy(svd_a: metacf.jacobian.JacobianSVD,
                     svd_b: metacf.jacobian.JacobianSVD) -> jax.Array:
  r"""Energy of A's top subspace inside B's top subspace, in ``[0, 1]``.

  .. math::
    \frac{\sum_i s_{a,i}^2 \lVert V_b v_{a,i} \rVert^2}{\sum_i s_{a,i}^2}
    = \frac{\sum_{i \le k_a} s_{a,i}^2 \sum_{j \le k_b}
      (v_{a,i} \cdot v_{b,j})^2}{\sum_{i \le k_a} s_{a,i}^2}

  with ``V_b`` B's ``k_b`` orthonormal rows: 1 when every direction of A
  lies in B's span, 0 when A's directions are orthogonal to it. Not
  symmetric: it asks how much of A the span of B sees.
  """
  overlap = jnp.matmul(svd_a.vt, svd_b.vt.T,
                       precision=jax.lax.Precision.HIGHEST)
  w = svd_a.s**2
  seen = jnp.sum(overlap**2, axis=1)
  total = jnp.sum(w)
  ratio = jnp.sum(w * seen) / jnp.where(total > 0, total, 1)
  return jnp.clip(ratio, 0.0, 1.0)


def excitation_share(sens_a: jax.Array, sens_b: jax.Array, weights: jax.Array,
                     num_a: int, num_b: int) -> jax.Array:
  r"""Weighted :math:`\rho / (1 + \rho)` of A's directions, in ``[0, 1]``.

  ``sens_*[i]`` is :math:`\lVert J_* v_{a,i} \rVert^2` on the task's
  ``num_*`` inputs; :math:`\rho_i` is their ratio per example (B over A).
  0: B's inputs do not move A's outputs along :math:`v_{a,i}`; 1/2: as much
  as A's inputs; towards 1: more.
  """
  per_a = sens_a / num_a
  per_b = sens_b / num_b
  share = per_b / jnp.where(per_a + per_b > 0, per_a + per_b, 1)
  return jnp.clip(jnp.sum(weights * share) / jnp.sum(weights), 0.0, 1.0)


@functools.cache
def _svd_fn(k: int, method: str, oversampling: int, num_power_iters: int):
  """Jitted ``(body, head, x, key) -> JacobianSVD`` of A's centred head."""
  def svd(body, head, x, key):
    apply_fn = lambda b, xx: steps.centred_logits(head, steps.features(b, xx))
    return metacf.jacobian.jacobian_svd(
        apply_fn, body, x, k, method=method, key=key,
        oversampling=oversampling, num_power_iters=num_power_iters)
  return jax.jit(svd)


@functools.partial(jax.jit, static_argnames=('num_a', 'num_b', 'k'))
def _measures(svd_a: metacf.jacobian.JacobianSVD,
              svd_b: metacf.jacobian.JacobianSVD, sens_a: jax.Array,
              sens_b: jax.Array, *, num_a: int, num_b: int,
              k: int) -> dict[str, jax.Array]:
  """Every observability measure, in one compiled function."""
  return {
      'observability': projected_energy(svd_a, svd_b),
      'weighted_overlap': metacf.jacobian.weighted_subspace_overlap(
          svd_a, svd_b, k),
      'excitation_share': excitation_share(sens_a, sens_b, svd_a.s**2,
                                           num_a, num_b),
      'subspace_overlap': metacf.jacobian.subspace_overlap(svd_a, svd_b, k),
      'rho': (sens_b / num_b) / (sens_a / num_a),
  }


@jax.jit
def _sensitivities(body: Params, head: Params, x: jax.Array,
                   vt: jax.Array) -> jax.Array:
  r""":math:`\lVert J(x) v \rVert^2` for each row ``v`` of ``vt [k, P]``."""
  flat, unravel = flatten_util.ravel_pytree(body)
  f = lambda p: steps.centred_logits(
      head, steps.features(unravel(p), x)).reshape(-1)
  _, f_jvp = jax.linearize(f, flat)
  return jnp.sum(jax.vmap(f_jvp)(vt)**2, axis=1)


class Observer:
  """A's SVD (computed once) and each task's observability record."""

  def __init__(self, config: Config, body: Params, head_a: Params,
               a: TaskData):
    self.config = config
    self.body, self.head_a = body, head_a
    self.x_a = a.x_test[:config.num_jac_a]
    self._svd_a = None

  def _svd(self, x: jax.Array, k: int, name: str):
    c = self.config
    fn = _svd_fn(k, c.svd_method, c.oversampling, c.num_power_iters)
    key = utils.name_key(jax.random.key(c.seed), 'svd', name)
    return fn(self.body, self.head_a, x, key)

  def svd_a(self) -> tuple[metacf.jacobian.JacobianSVD, float]:
    if self._svd_a is None:
      start = time.perf_counter()
      svd = jax.block_until_ready(self._svd(self.x_a, self.config.k_a, 'a'))
      self._svd_a = svd, time.perf_counter() - start
    return self._svd_a

  def observe(self, task: TaskB, b: TaskData) -> dict[str, Any]:
    """Observability of A by ``task`` (before B is trained)."""
    c = self.config
    svd_a, svd_a_s = self.svd_a()
    start = time.perf_counter()
    x_b = b.x_train[:c.num_jac_b]
    svd_b = jax.block_until_ready(self._svd(x_b, c.k_b, task.name))
    k = min(c.k_a, c.k_b)
    sens_a = _sensitivities(self.body, self.head_a, self.x_a, svd_a.vt)
    sens_b = _sensitivities(self.body, self.head_a, x_b, svd_a.vt)
    measures = _measures(svd_a, svd_b, sens_a, sens_b, num_a=c.num_jac_a,
                         num_b=c.num_jac_b, k=k)
    record = {name: float(measures[name]) for name in (
        'observability', 'weighted_overlap', 'excitation_share',
        'subspace_overlap')}
    record.update({
        's_a': np.asarray(svd_a.s).tolist(),
        's_b': np.asarray(svd_b.s).tolist(),
        'rho': np.asarray(measures['rho']).tolist(),
        'svd_a_time_s': svd_a_s,
        'time_s': time.perf_counter() - start,
    })
    return record
