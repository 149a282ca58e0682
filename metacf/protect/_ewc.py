r"""Elastic weight consolidation: Fisher diagonals, the penalty, online EWC.

EWC (Kirkpatrick et al. 2017) adds :math:`\tfrac{\lambda}{2} \sum_i F_i
(\theta_i - \theta^*_i)^2` to the new task's loss, with :math:`F` the
diagonal of the Fisher information at the old task's solution
:math:`\theta^*`. Online EWC (Schwarz et al. 2018) keeps one running Fisher,
:math:`F \leftarrow \gamma F + F_\mathrm{new}`, anchored at the latest
solution, instead of one penalty per task::

  fisher = None
  for task in tasks:
    params = train(params, task, penalty=lambda p: (
        0. if fisher is None else ewc_penalty(p, anchor, fisher, strength)))
    new = fisher_diagonal(apply_fn, params, task.x)        # true Fisher
    fisher = new if fisher is None else online_ewc_update(fisher, new, gamma)
    anchor = params

Offline EWC keeps one ``(anchor, fisher)`` pair per task and sums their
penalties.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf._src import chunked
from metacf._src.types import ApplyFn, Params

# Examples vmapped together per scan step. For a 784-100-100-10 MLP on a
# 2-core CPU (benchmarks/bench_protect.py, N = 1000) the true Fisher took
# 326 us/example at 32 and 488 at 1, the empirical one 278 at 32 and 55 at
# 1 (a Python loop of jitted grads: 2877 and 157): XLA's CPU batched small
# matmuls are slow for the single gradients, so the empirical Fisher on CPU
# scans over single examples.
_DEFAULT_CHUNK = 32
_DEFAULT_CHUNK_EMPIRICAL_CPU = 1


def fisher_diagonal(apply_fn: ApplyFn, params: Params, x: Any, *,
                    labels: jax.Array | None = None,
                    chunk_size: int | None = None) -> Params:
  r"""Diagonal of the Fisher information of a classifier, per parameter.

  With :math:`\log p(c \mid x_n; \theta) = \log\mathrm{softmax}(
  \texttt{apply\_fn}(\theta, x))_{nc}`:

  * ``labels=None``, the **true** Fisher, an expectation over the model's
    own predictive distribution:
    :math:`F = \frac1N \sum_n \sum_c p_{nc} (\nabla_\theta \log p_{nc})^2`
    (exact over the ``C`` classes, ``C`` backward passes per example; this
    is what Kirkpatrick et al. and Schwarz et al. define);
  * ``labels=y``, the **empirical** Fisher at those labels:
    :math:`F = \frac1N \sum_n (\nabla_\theta \log p_{n y_n})^2`.

  They differ away from a perfect fit, and the choice changes EWC's results
  (van de Ven 2025, arXiv:2502.11756, Table 1: the empirical Fisher
  protects less); the default is the true one. Squares are elementwise. For
  softmax regression :math:`f = x W + b` the true Fisher is
  :math:`F_{W_{ij}} = \frac1N \sum_n x_{ni}^2 p_{nj}(1 - p_{nj})`
  (tested against this closed form).

  Per-example gradients come from ``vmap`` over examples, each example
  passed to ``apply_fn`` as a batch of one (so a model that mixes examples,
  e.g. with batch statistics, sees single examples). They are computed
  ``chunk_size`` examples at a time inside a ``lax.scan`` that accumulates
  the sum, and the true Fisher's classes are summed one VJP at a time, so
  memory is :math:`O(\mathrm{chunk\_size} \cdot P)`, never :math:`O(NP)`;
  ``N`` need not be a multiple of ``chunk_size`` (the last chunk is padded
  and the padding weighs 0).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits [N, C]``.
    params: Parameter pytree (floating).
    x: Inputs with a leading example axis ``N`` (an array or a pytree).
    labels: None (true Fisher) or integer labels ``[N]`` in ``[0, C)``.
    chunk_size: Examples per chunk (static, >= 1; default 32, and 1 for
      the empirical Fisher on CPU, where XLA:CPU's batched small matmuls
      are slow for single-example gradients; see the benchmarks page).

  Returns:
    A pytree like ``params``: the Fisher diagonal, >= 0, in each leaf's
    dtype.

  Raises:
    ValueError: if ``x`` has no example axis shared by its leaves (or
      ``N = 0``), ``apply_fn`` does not return ``[N, C]``, ``labels`` is
      not ``[N]`` or has values outside ``[0, C)`` (values: see
      :mod:`metacf.checks`), or ``chunk_size < 1``.
    TypeError: if ``labels`` is not integer.

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural
    networks <https://arxiv.org/abs/1612.00796>`_, PNAS 2017; Martens, `New
    insights and perspectives on the natural gradient method
    <https://arxiv.org/abs/1412.1193>`_, JMLR 2020 (true vs empirical
    Fisher); van de Ven, `On the Computation of the Fisher Information in
    Continual Learning <https://arxiv.org/abs/2502.11756>`_, 2025
  """
  fn = 'fisher_diagonal'
  n = checks.leading_size(x, 'x', fn, min_size=1)
  for leaf in jax.tree.leaves(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f'{fn}: params must be floating, got a leaf of dtype '
                      f'{jnp.result_type(leaf)}.')
  chunk = checks.check_int(chunk_size, 'chunk_size', fn, min_value=1,
                           optional=True)
  if chunk is None:
    chunk = (_DEFAULT_CHUNK_EMPIRICAL_CPU
             if labels is not None and jax.default_backend() == 'cpu'
             else _DEFAULT_CHUNK)
  chunk = min(n, chunk)
  one = jax.tree.map(lambda leaf: leaf[:1], x)
  out = jax.eval_shape(apply_fn, params, one)
  if not hasattr(out, 'shape') or len(out.shape) != 2 or out.shape[0] != 1:
    raise ValueError(f'{fn}: apply_fn(params, x) must return logits [N, C], '
                     f'got {getattr(out, "shape", out)} for one example.')
  c = out.shape[1]
  empirical = labels is not None
  if empirical:
    if np.shape(labels) != (n,):
      raise ValueError(f'{fn}: labels must have shape [N] = ({n},), got '
                       f'{np.shape(labels)}.')
    checks.check_integer(labels, 'labels', fn)
    checks.check_labels(labels, c, 'labels', fn)
    labels = jnp.asarray(labels, jnp.int32)
  else:
    labels = jnp.zeros((n,), jnp.int32)  # Unused; keeps one code path.

  def log_probs(p, xi):
    xi = jax.tree.map(lambda leaf: leaf[None], xi)
    return jax.nn.log_softmax(apply_fn(p, xi)[0])

  def squared_grads(xi, yi):
    if empirical:
      g = jax.grad(lambda p: log_probs(p, xi)[yi])(params)
      return jax.tree.map(jnp.square, g)
    lp, vjp = jax.vjp(lambda p: log_probs(p, xi), params)
    probs = jnp.exp(lp)

    # One VJP per class (a row of the [C, P] Jacobian of log p), weighed by
    # p_c and summed in a scan: O(P) memory, and measured 6-8x faster on CPU
    # than vmapping the C VJPs.
    def add_class(total, cls):
      (g,) = vjp(jax.nn.one_hot(cls, c, dtype=lp.dtype))
      return jax.tree.map(
          lambda t, gl: t + probs[cls].astype(gl.dtype) * jnp.square(gl),
          total, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(add_class, zeros, jnp.arange(c))
    return total

  return chunked.mean_over_examples(lambda xy: squared_grads(*xy),
                                    (x, labels), params, n, chunk)


def _check_like(tree: Any, params: Params, name: str, fn: str) -> None:
  checks.check_tree_structure(tree, params, name, 'params', fn)
  for (path, p), t in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(tree)):
    if np.shape(t) != np.shape(p):
      raise ValueError(
          f'{fn}: {name} must have the shapes of params, got {np.shape(t)} '
          f'for params{jax.tree_util.keystr(path)} of shape {np.shape(p)}.')


def _check_scalar_nonnegative(value: Any, name: str, fn: str) -> None:
  """A scalar ``>= 0`` (NaN fails; values: see :mod:`metacf.checks`)."""
  if np.ndim(value) != 0:
    raise ValueError(f'{fn}: {name} must be a scalar, got shape '
                     f'{np.shape(value)}.')
  checks.check_nonnegative(value, name, fn)


def ewc_penalty(params: Params, anchor: Params, fisher: Params,
                strength: Any) -> jax.Array:
  r"""EWC's penalty :math:`\frac{\lambda}{2}\sum_i F_i(\theta_i - \theta^*_i)^2`.

  Add it to the new task's loss; its gradient is
  :math:`\lambda F (\theta - \theta^*)`, which :func:`ewc` adds to the
  updates directly.

  Args:
    params: Current parameters :math:`\theta`.
    anchor: The old task's solution :math:`\theta^*`, like ``params``.
    fisher: Fisher diagonal :math:`F` (e.g. :func:`fisher_diagonal`), like
      ``params``.
    strength: :math:`\lambda \ge 0` (may be traced).

  Returns:
    A scalar.

  Raises:
    ValueError: if ``anchor`` or ``fisher`` does not have ``params``'
      structure and shapes, or a concrete ``strength`` is negative or NaN.

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural
    networks <https://arxiv.org/abs/1612.00796>`_, PNAS 2017, Eq. 3
  """
  fn = 'ewc_penalty'
  _check_like(anchor, params, 'anchor', fn)
  _check_like(fisher, params, 'fisher', fn)
  _check_scalar_nonnegative(strength, 'strength', fn)
  terms = [jnp.sum(f * jnp.square(p - a)) for p, a, f in zip(
      jax.tree.leaves(params), jax.tree.leaves(anchor),
      jax.tree.leaves(fisher))]
  total = sum(terms[1:], terms[0]) if terms else jnp.zeros(())
  return 0.5 * jnp.asarray(strength, total.dtype) * total


def online_ewc_update(fisher: Params, new_fisher: Params, gamma: Any
                      ) -> Params:
  r"""Online EWC's running Fisher, :math:`\gamma F + F_\mathrm{new}`.

  After each task, call it with that task's :func:`fisher_diagonal` at the
  solution, and anchor the next penalty at that solution (Schwarz et al.
  2018, Eq. 8: one penalty, the latest anchor, a decayed sum of Fishers).
  ``gamma = 1`` accumulates without forgetting; Schwarz et al. use
  :math:`\gamma < 1`.

  Args:
    fisher: The running Fisher (a pytree).
    new_fisher: The latest task's Fisher, like ``fisher``.
    gamma: Decay :math:`\gamma \ge 0` (may be traced).

  Returns:
    A pytree like ``fisher``.

  Raises:
    ValueError: on mismatched trees or a negative concrete ``gamma``.

  References:
    Schwarz et al., `Progress & Compress: A scalable framework for continual
    learning <https://arxiv.org/abs/1805.06370>`_, ICML 2018
  """
  fn = 'online_ewc_update'
  _check_like(new_fisher, fisher, 'new_fisher', fn)
  _check_scalar_nonnegative(gamma, 'gamma', fn)
  return jax.tree.map(lambda f, g: jnp.asarray(gamma, f.dtype) * f + g,
                      fisher, new_fisher)


class EwcState(NamedTuple):
  """State of :func:`ewc`: what its penalty gradient reads."""
  anchor: Params    # like the params: the old task's solution.
  fisher: Params    # like the params: the (running) Fisher diagonal.
  strength: jax.Array  # shape=(), floating: lambda.


def ewc(anchor: Params, fisher: Params, strength: Any
        ) -> optax.GradientTransformation:
  r"""Adds EWC's penalty gradient :math:`\lambda F (\theta - \theta^*)`.

  ``optax.chain(metacf.protect.ewc(anchor, fisher, strength),
  optax.sgd(lr))`` trains on ``loss + ewc_penalty(...)`` without changing
  the loss function (the gradient is the same, by linearity), like
  ``optax.add_decayed_weights`` does for weight decay. ``update`` needs
  ``params``.

  **The arrays live in the state** (:class:`EwcState`, fields ``anchor``,
  ``fisher`` and ``strength``): ``init`` puts the constructor's arguments
  there and ``update`` reads them from there, so a jitted step that takes
  the optimizer state as an argument compiles once for every anchor,
  Fisher and strength of the same shapes and dtypes, and holds none of them
  as constants (its program does not grow with ``P``). After a task, swap
  them by name (online EWC, Schwarz et al. 2018):

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import optax
  >>> import metacf
  >>> apply_fn = lambda p, x: x @ p['w']
  >>> params = {'w': jnp.ones((3, 2))}
  >>> x = jnp.arange(12.0).reshape(4, 3) / 12
  >>> zero_fisher = jax.tree.map(jnp.zeros_like, params)
  >>> tx = optax.chain(metacf.protect.ewc(params, zero_fisher, 30.0),
  ...                  optax.sgd(0.1))
  >>> opt_state = tx.init(params)
  >>> fisher = zero_fisher
  >>> for task in range(2):
  ...   # params, opt_state = train(params, opt_state, task)  # one compile
  ...   fisher = metacf.protect.online_ewc_update(
  ...       optax.tree.get(opt_state, 'fisher'),
  ...       metacf.protect.fisher_diagonal(apply_fn, params, x), 0.9)
  ...   opt_state = optax.tree.set(opt_state, anchor=params, fisher=fisher)
  >>> optax.tree.get(opt_state, 'fisher')['w'].shape
  (3, 2)

  ``strength`` is state too, so it can be swapped the same way
  (``optax.tree.set(opt_state, strength=10.0)``; a Python number stays the
  same weak-typed scalar as the initial one when that was a Python number,
  so no retrace). Offline EWC chains one ``ewc`` per task; ``optax.tree.set``
  then sets every ``anchor`` in the chain unless its ``filtering`` argument
  picks one by path, e.g. ``lambda path, _: path[0].idx == t`` for the
  ``t``-th element of the chain's state tuple. ``optax.tree.set`` also
  replaces dict keys of that name inside the params-like trees: if the
  params have a key ``anchor``, ``fisher`` or ``strength``, pass
  ``lambda path, _: isinstance(path[-1], optax.tree_utils.NamedTupleKey)``
  as ``filtering`` (state fields only). Swapped values are checked
  for their tree and shapes when ``update`` is traced, not for values.
  Donate the optimizer state to a jitted step (``donate_argnums``), as for
  :func:`orthogonal_projection`: otherwise each call copies ``anchor`` and
  ``fisher`` (:math:`8P` bytes) into the state it returns.

  Args:
    anchor: The old task's solution, like the params: the initial state
      (``init`` puts copies of ``anchor``, ``fisher`` and ``strength``
      there).
    fisher: The (running) Fisher diagonal, like the params.
    strength: :math:`\lambda \ge 0`, a scalar (stored as a floating array).

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`EwcState`;
    ``init`` and ``update`` raise ``ValueError`` if ``anchor`` or
    ``fisher`` does not have the params' structure and shapes, ``update``
    if it gets no ``params``.

  Raises:
    ValueError: if ``fisher`` does not have ``anchor``'s structure and
      shapes, or a concrete ``strength`` is negative, NaN or not a scalar.

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural
    networks <https://arxiv.org/abs/1612.00796>`_, PNAS 2017; Schwarz et
    al., `Progress & Compress: A scalable framework for continual learning
    <https://arxiv.org/abs/1805.06370>`_, ICML 2018
  """
  fn = 'ewc'
  _check_like(fisher, anchor, 'fisher', fn)
  if np.ndim(strength) != 0:
    raise ValueError(f'{fn}: strength must be a scalar, got shape '
                     f'{np.shape(strength)}.')
  _check_scalar_nonnegative(strength, 'strength', fn)
  initial = EwcState(anchor=jax.tree.map(jnp.asarray, anchor),
                     fisher=jax.tree.map(jnp.asarray, fisher),
                     strength=_float_scalar(strength))

  def init_fn(params):
    _check_like(anchor, params, 'anchor', fn)
    # Copies: the state owns its buffers, so donating it (or params, often
    # passed as the anchor) to a step never consumes the other.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), initial)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f'{fn}: update needs params (the penalty gradient is '
                       'strength * fisher * (params - anchor)), got None.')
    if not all(hasattr(state, f) for f in EwcState._fields):
      raise ValueError(f'{fn}: state must be the EwcState that init '
                       f'returns, got {type(state).__name__}.')
    _check_like(state.anchor, params, 'anchor', fn)
    _check_like(state.fisher, params, 'fisher', fn)
    strength = state.strength
    updates = jax.tree.map(
        lambda u, p, a, f: u + (jnp.asarray(strength).astype(f.dtype) * f *
                                (p - a)).astype(u.dtype),
        updates, params, state.anchor, state.fisher)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _float_scalar(value: Any) -> jax.Array:
  """``value`` as a floating scalar array; Python numbers stay weak-typed."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return jnp.asarray(float(value))
  value = jnp.asarray(value)
  if not jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(jnp.result_type(float))
  return value
