"""Importance weights for quadratic penalties: MAS and SI (path integral).

:func:`mas_importance` (Aljundi et al. 2018) and :func:`si_importance` with
its optax wrapper :func:`path_integral` (Zenke et al. 2017) give per-parameter
importances shaped like ``params``. :func:`~metacf.protect.ewc_penalty` and
:func:`~metacf.protect.ewc` take any such importance as their ``fisher``
argument: the quadratic :math:`\\frac{\\lambda}{2}\\sum_i \\Omega_i
(\\theta_i - \\theta^*_i)^2` is MAS's and SI's penalty with
:math:`\\Omega` in place of the Fisher diagonal.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf._src import chunked
from metacf._src.types import ApplyFn, Params

# Examples vmapped together per scan step of mas_importance (as in
# fisher_diagonal: single examples are fastest on CPU).
_DEFAULT_CHUNK = 32
_DEFAULT_CHUNK_CPU = 1


def mas_importance(apply_fn: ApplyFn, params: Params, x: Any, *,
                   chunk_size: int | None = None) -> Params:
  r"""Memory Aware Synapses' importance: mean absolute per-example gradient.

  .. math::
    \Omega = \frac{1}{N} \sum_n \Big| \nabla_\theta
      \lVert f(x_n; \theta) \rVert_2^2 \Big|

  one gradient per example, as in the paper (Aljundi et al. 2018, Eq. 3-4:
  the squared L2 norm of the output, unlabelled data). Avalanche's ``MAS``
  instead takes the absolute value of each *mini-batch's* gradient of the
  batch-mean norm and averages over batches; gradients of examples of
  opposite sign cancel inside a batch there, so its importances are smaller
  and depend on the batch size (equal to these at batch size 1).

  Examples:
    >>> apply_fn = lambda p, x: x @ p['w']
    >>> params = {'w': jnp.array([[1.0], [2.0]])}
    >>> x = jnp.array([[1.0, 0.0], [0.0, -1.0]])   # outputs 1 and -2
    >>> metacf.protect.mas_importance(apply_fn, params, x)['w']
    Array([[1.],
           [2.]], dtype=float32)

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` on a batch (each example is
      passed alone, as a batch of one).
    params: Parameters at the end of the task.
    x: Inputs ``[N, ...]`` (a pytree with a leading example axis).
    chunk_size: Examples per ``vmap`` chunk, inside a ``lax.scan`` that
      carries the running sum (memory ``O(chunk_size P)``, not ``O(N P)``).
      None: 1 on CPU, where XLA's batched small matmuls are slow (a
      784-100-100-10 MLP, N = 1000: ``benchmarks/bench_cl_baselines.py``),
      32 elsewhere.

  Returns:
    Importances shaped like ``params``, non-negative.

  Raises:
    ValueError: if ``x`` has no examples or ``chunk_size < 1``.

  References:
    Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, `Memory Aware
    Synapses: Learning what (not) to forget
    <https://arxiv.org/abs/1711.09601>`_, ECCV 2018
  """
  fn = 'mas_importance'
  n = checks.leading_size(x, 'x', fn)
  if n == 0:
    raise ValueError(f'{fn}: x must have at least one example, got 0.')
  if chunk_size is not None:
    chunk_size = checks.check_int(chunk_size, 'chunk_size', fn, min_value=1)

  def one(example):
    def sq_norm(p):
      out = apply_fn(p, jax.tree.map(lambda a: a[None], example))
      return sum(jnp.sum(jnp.square(o)) for o in jax.tree.leaves(out))
    return jax.tree.map(jnp.abs, jax.grad(sq_norm)(params))

  if chunk_size is None:  # As fisher_diagonal's empirical Fisher (measured).
    chunk_size = (_DEFAULT_CHUNK_CPU if jax.default_backend() == 'cpu'
                  else _DEFAULT_CHUNK)
  return chunked.mean_over_examples(one, x, params, n, min(chunk_size, n))


class PathIntegralState(NamedTuple):
  """State of :func:`path_integral`."""
  inner_state: optax.OptState  # the wrapped optimizer's state.
  omega: Params                # running sum of -g * u, like params.


def path_integral(optimizer: optax.GradientTransformation
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``optimizer`` to accumulate Synaptic Intelligence's path integral.

  The updates are ``optimizer``'s, unchanged; the state
  (:class:`PathIntegralState`) adds ``omega``, the running sum over steps of
  :math:`-g \odot u` (the incoming gradient times the returned update: the
  loss decrease attributed to each parameter, to first order, when the
  update is applied as is). Read it with ``optax.tree.get(state,
  'omega')``; at the end of a task, :func:`si_importance` turns it into
  importances, and ``optax.tree.set(state, omega=zeros)`` starts the next
  task's integral. Put it outermost, around the whole chain whose updates
  are applied (gradients are what the loss gives, updates what
  ``apply_updates`` adds).

  Examples:
    >>> tx = metacf.protect.path_integral(optax.sgd(0.1))
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.array([2.0, 1.0])}
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.tree.get(state, 'omega')['w']        # 0.1 * g**2
    Array([0.4, 0.1], dtype=float32)

  Args:
    optimizer: Any optax transformation.

  Returns:
    An optax ``GradientTransformationExtraArgs`` (extra arguments are passed
    on to ``optimizer``).

  References:
    Zenke, Poole & Ganguli, `Continual Learning Through Synaptic
    Intelligence <https://arxiv.org/abs/1703.04987>`_, ICML 2017
  """
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    return PathIntegralState(inner.init(params), optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, **extra_args):
    grads = updates
    new_updates, inner_state = inner.update(grads, state.inner_state, params,
                                            **extra_args)
    omega = jax.tree.map(lambda w, g, u: w - (g * u).astype(w.dtype),
                         state.omega, grads, new_updates)
    return new_updates, PathIntegralState(inner_state, omega)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def si_importance(omega: Params, delta: Params, *,
                  damping: float = 0.1) -> Params:
  r"""Synaptic Intelligence's importance :math:`\omega / (\Delta^2 + \xi)`.

  Args:
    omega: The path integral of the task (:func:`path_integral`'s
      ``omega``).
    delta: The task's total parameter change :math:`\Delta = \theta_{end} -
      \theta_{start}`, like ``omega``.
    damping: :math:`\xi > 0` (Zenke et al. use 0.1 on Permuted MNIST).

  Returns:
    Importances shaped like ``omega``; add them over tasks (Zenke et al.,
    Eq. 5) and pass them to :func:`~metacf.protect.ewc_penalty` or
    :func:`~metacf.protect.ewc` as ``fisher``.

  Examples:
    >>> omega = {'w': jnp.array([0.4, 0.1])}
    >>> delta = {'w': jnp.array([-0.2, 0.0])}
    >>> metacf.protect.si_importance(omega, delta, damping=0.1)['w']
    Array([2.857143, 1.      ], dtype=float32)

  Raises:
    ValueError: if ``delta`` does not have ``omega``'s structure and shapes,
      or ``damping`` is not > 0.

  References:
    Zenke, Poole & Ganguli, `Continual Learning Through Synaptic
    Intelligence <https://arxiv.org/abs/1703.04987>`_, ICML 2017, Eq. 5
  """
  fn = 'si_importance'
  checks.check_positive(damping, 'damping', fn)
  checks.check_tree_structure(delta, omega, 'delta', 'omega', fn)
  for d, w in zip(jax.tree.leaves(delta), jax.tree.leaves(omega)):
    if np.shape(d) != np.shape(w):
      raise ValueError(f'{fn}: delta must have the shapes of omega, got '
                       f'{np.shape(d)} for a leaf of shape {np.shape(w)}.')
  return jax.tree.map(
      lambda w, d: w / (jnp.square(d).astype(w.dtype)
                        + jnp.asarray(damping, w.dtype)), omega, delta)
