"""Knowledge-distillation losses with temperature (Hinton et al. 2015) and LwF.

All losses are per example (no batch reduction, like optax losses): for logits
of shape ``[..., num_classes]`` they return shape ``[...]``. Half-precision
inputs are computed (and returned) in float32; float64 stays float64.

Numerics: the losses rest on the stable KL of ``_kl``, accurate at every
temperature.

NaN. A NaN in an example's logits makes that example's loss NaN (other
examples are unaffected): no mask turns it into a number. Probabilities are
checked values: a negative or NaN teacher probability raises ``ValueError``
when concrete, and under ``jit`` when runtime checks are on
(:mod:`metacf.checks`); with them off a traced one makes its example's loss
NaN. Exact zero teacher probabilities are a different case, handled exactly
(``0 log 0 = 0``, finite gradients). Examples masked out by ``where`` give 0
with a zero gradient even if their teacher is NaN (they are not checked).

Temperatures. ``temperature`` is a scalar or one per example (the logits
shape without the class axis, e.g. ``[batch]`` for ``[batch, classes]``
logits); any other shape raises ``ValueError`` rather than broadcasting.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metacf._src import checks
from metacf.distill import _kl

ArrayLike = jax.typing.ArrayLike


def _check_temperature(temperature: ArrayLike, batch_shape: tuple[int, ...],
                       fn: str) -> None:
  """``T`` is a scalar or per example (``batch_shape``), finite and > 0.

  The values are checked eagerly when concrete, and under ``jit`` when
  runtime checks are on (:mod:`metacf.checks`).
  """
  shape = np.shape(temperature)
  if shape not in ((), tuple(batch_shape)):
    raise ValueError(
        f'{fn}: temperature must be a scalar or have shape '
        f'{tuple(batch_shape)} (the logits shape without the class axis), '
        f'got shape {shape}.')
  checks.check_positive(temperature, 'temperature', fn)
  checks.check_finite(temperature, 'temperature', fn)


def _batch_shape(x: ArrayLike, axis: int) -> tuple[int, ...]:
  """The shape of ``x`` without its class ``axis``."""
  shape = np.shape(x)
  axis = axis % len(shape)
  return shape[:axis] + shape[axis + 1:]


def _check_logits_pair(student_logits: ArrayLike, teacher: ArrayLike,
                       teacher_name: str, where: ArrayLike | None,
                       fn: str) -> None:
  checks.check_min_rank(student_logits, 1, 'student_logits', fn)
  checks.check_same_shape(student_logits, teacher, 'student_logits',
                          teacher_name, fn)
  checks.check_mask_shape(where, jnp.shape(student_logits)[:-1], 'where', fn)



def _teacher_where(teacher: jax.Array, where: ArrayLike | None,
                   fill: float) -> jax.Array:
  """``teacher`` with the examples masked out by ``where`` set to ``fill``.

  A masked example's loss is 0 anyway; without this, a NaN teacher there would
  still reach the student's gradient as ``0 * NaN``.
  """
  if where is None:
    return teacher
  keep = jnp.expand_dims(jnp.asarray(where), -1)
  return jnp.where(keep, teacher, jnp.asarray(fill, teacher.dtype))



def _masked(loss: jax.Array, where: ArrayLike | None) -> jax.Array:
  return loss if where is None else jnp.where(where, loss, 0.0)


def tempered_softmax(logits: ArrayLike, temperature: ArrayLike = 1.0,
                     axis: int = -1) -> jax.Array:
  r"""Softmax at temperature ``T``: :math:`\mathrm{softmax}(z / T)`.

  High ``T`` softens the distribution towards uniform, ``T -> 0`` sharpens it
  towards one-hot (Hinton et al. 2015, eq. 1).

  Args:
    logits: Unnormalised scores, shape ``[..., num_classes]``.
    temperature: ``T > 0``, finite: a scalar or one per example (the
      shape of ``logits`` without the class axis).
    axis: The class axis.

  Returns:
    Probabilities of the same shape (float32 for half-precision input).

  Raises:
    ValueError: if ``temperature`` has another shape, or is ``<= 0`` or not
      finite (values: see :mod:`metacf.checks`).

  References:
    Hinton et al, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015
  """
  fn = 'tempered_softmax'
  checks.check_min_rank(logits, 1, 'logits', fn)
  _check_temperature(temperature, _batch_shape(logits, axis), fn)
  dtype = _kl.compute_dtype(logits)
  return jax.nn.softmax(
      jnp.asarray(logits, dtype)
      / _kl.broadcast_temperature(temperature, dtype, axis),
      axis=axis)


def temper_probs(probs: ArrayLike, temperature: ArrayLike,
                 axis: int = -1) -> jax.Array:
  r"""Tempers a probability vector: :math:`p_i^{1/T} / \sum_j p_j^{1/T}`.

  Computed in log space, so tiny probabilities do not underflow before the
  power; zero probabilities stay exactly zero and gradients stay finite. For
  ``probs = softmax(z)`` this equals ``tempered_softmax(z, T)``. A slice that is
  all zeros maps to all zeros (no NaN). A slice containing an infinity (or,
  traced with runtime checks off, a NaN or a negative entry) maps to all NaN.

  Args:
    probs: Non-negative weights along ``axis`` (need not be normalised).
    temperature: ``T > 0``, finite: a scalar or one per slice (the shape of
      ``probs`` without ``axis``).
    axis: The class axis.

  Returns:
    Tempered probabilities, same shape as ``probs``.

  Raises:
    ValueError: if ``temperature`` has another shape, or is ``<= 0`` or not
      finite, or ``probs`` has a negative or NaN entry (values: eagerly, and
      under ``jit`` with runtime checks on, see :mod:`metacf.checks`).

  References:
    Hinton et al, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015
  """
  fn = 'temper_probs'
  checks.check_min_rank(probs, 1, 'probs', fn)
  _check_temperature(temperature, _batch_shape(probs, axis), fn)
  checks.check_nonnegative(probs, 'probs', fn)
  dtype = _kl.compute_dtype(probs)
  p = jnp.asarray(probs, dtype)
  log_p, zero = _kl.log_probs(p)
  scaled = log_p / _kl.broadcast_temperature(temperature, dtype, axis)
  top = jnp.max(scaled, axis=axis, keepdims=True)  # NaN if the slice has one.
  top = jnp.where(top == -jnp.inf, 0.0, top)      # All-zero slice.
  e = jnp.where(zero, 0.0, jnp.exp(jnp.where(zero, 0.0, scaled - top)))
  total = jnp.sum(e, axis=axis, keepdims=True)
  # Only an all-zero slice is divided by 1; a NaN total stays NaN.
  return e / jnp.where(total == 0, 1.0, total)


def tempered_distillation_loss(student_logits: ArrayLike,
                               teacher_logits: ArrayLike,
                               temperature: ArrayLike = 1.0, *,
                               where: ArrayLike | None = None) -> jax.Array:
  r"""Hinton distillation loss :math:`T^2\,\mathrm{KL}(p_t^T \| p_s^T)`, per example.

  With :math:`p^T = \mathrm{softmax}(z / T)`. The :math:`T^2` factor keeps the
  gradient magnitude comparable across temperatures: the gradient with respect
  to the student logits is exactly :math:`T (p_s^T - p_t^T)`, and as
  :math:`T \to \infty` with zero-mean logits the loss tends to
  :math:`\sum_i (z_{s,i} - z_{t,i})^2 / (2C)` (logit matching). Accurate at
  every temperature (see the module docstring); never negative.

  A NaN in an example's logits makes that example's loss NaN. Teacher logits
  must be finite: a ``-inf`` (a class of zero probability) also gives NaN; for
  such teachers use :func:`distillation_loss_from_probs` on
  ``softmax(teacher_logits)``, which handles exact zeros.

  Args:
    student_logits: Student scores, shape ``[..., num_classes]``.
    teacher_logits: Teacher scores, same shape; a constant (``stop_gradient``).
    temperature: ``T > 0``, finite: a scalar or one per example (shape
      ``[...]``). ``T = 1`` is plain KL. Treated as a constant.
    where: Optional boolean mask of shape ``[...]``; masked examples give 0
      (and a zero gradient, even where their teacher is NaN).

  Returns:
    Loss of shape ``[...]`` (no reduction).

  Raises:
    ValueError: if the logits shapes differ, ``where`` or ``temperature`` has
      the wrong shape, or ``temperature <= 0`` or is not finite (values: see
      :mod:`metacf.checks`).

  References:
    Hinton et al, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015
  """
  fn = 'tempered_distillation_loss'
  _check_logits_pair(student_logits, teacher_logits, 'teacher_logits', where,
                     fn)
  _check_temperature(temperature, np.shape(student_logits)[:-1], fn)
  return _tempered_distillation(student_logits, teacher_logits, temperature,
                                where)


def _tempered_distillation(student_logits: ArrayLike,
                           teacher_logits: ArrayLike, temperature: ArrayLike,
                           where: ArrayLike | None) -> jax.Array:
  """:func:`tempered_distillation_loss` on checked arguments."""
  dtype = _kl.compute_dtype(student_logits, teacher_logits)
  t = _teacher_where(jnp.asarray(teacher_logits, dtype), where, 0.0)
  loss = _kl.hinton_loss(
      jnp.asarray(student_logits, dtype), jax.lax.stop_gradient(t),
      jax.lax.stop_gradient(_kl.broadcast_temperature(temperature, dtype)))
  return _masked(loss, where)


def distillation_loss_from_probs(student_logits: ArrayLike,
                                 teacher_probs: ArrayLike,
                                 temperature: ArrayLike = 1.0, *,
                                 where: ArrayLike | None = None) -> jax.Array:
  r"""Distillation loss when only the teacher's probabilities are available.

  :math:`T^2\,\mathrm{KL}(\mathrm{temper}(p_t, T) \| \mathrm{softmax}(s/T))`,
  with the teacher tempered by :func:`temper_probs`. Equal to
  :func:`tempered_distillation_loss` when ``teacher_probs`` is
  ``softmax(teacher_logits)``. Classes of exactly zero teacher probability
  contribute nothing (``0 log 0 = 0``), and the loss and its gradient stay
  finite. An infinity (or, traced with runtime checks off, a NaN or a
  negative entry) in an example's teacher probabilities makes that example's
  loss NaN; so does an all-zero teacher row, which is no distribution.

  Args:
    student_logits: Student scores, shape ``[..., num_classes]``.
    teacher_probs: Teacher probabilities (non-negative, normalised or not),
      same shape; a constant (``stop_gradient``).
    temperature: ``T > 0``, finite: a scalar or one per example (shape
      ``[...]``). Treated as a constant.
    where: Optional boolean mask of shape ``[...]``; masked examples give 0
      (and a zero gradient, even where their teacher is NaN).

  Returns:
    Loss of shape ``[...]`` (no reduction).

  Raises:
    ValueError: if the shapes differ, ``where`` or ``temperature`` has the
      wrong shape, ``temperature <= 0`` or is not finite, or
      ``teacher_probs`` has a negative or NaN entry in an example that
      ``where`` keeps (values: see :mod:`metacf.checks`).

  References:
    Hinton et al, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015
  """
  fn = 'distillation_loss_from_probs'
  _check_logits_pair(student_logits, teacher_probs, 'teacher_probs', where, fn)
  _check_temperature(temperature, np.shape(student_logits)[:-1], fn)
  checks.check_nonnegative(teacher_probs, 'teacher_probs', fn, where=where)
  dtype = _kl.compute_dtype(student_logits, teacher_probs)
  temp = jax.lax.stop_gradient(_kl.broadcast_temperature(temperature, dtype))
  p = _teacher_where(jnp.asarray(teacher_probs, dtype), where, 1.0)
  log_p, _ = _kl.log_probs(jax.lax.stop_gradient(p))
  kl = _kl.ProbsKL(jnp.asarray(student_logits, dtype), log_p, temp).kl()
  return _masked(_kl.per_example(temp)**2 * kl, where)


def logit_mse_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                   where: ArrayLike | None = None) -> jax.Array:
  r"""Logit matching, :math:`\frac{1}{C}\sum_i (z_{s,i} - z_{t,i})^2`, per example.

  Caruana's "analog labels" (Ba & Caruana 2014), the high-temperature limit of
  the Hinton loss up to a factor (Hinton et al. 2015, §2.1).

  Args:
    student_logits: Student scores, shape ``[..., num_classes]``.
    teacher_logits: Teacher scores, same shape; a constant (``stop_gradient``).
    where: Optional boolean mask of shape ``[...]``; masked examples give 0
      (and a zero gradient, even where their teacher is NaN).

  Returns:
    Loss of shape ``[...]`` (no reduction).

  Raises:
    ValueError: if the shapes differ or ``where`` has the wrong shape.

  References:
    Ba & Caruana, `Do Deep Nets Really Need to be Deep?
    <https://arxiv.org/abs/1312.6184>`_, 2014
  """
  fn = 'logit_mse_loss'
  _check_logits_pair(student_logits, teacher_logits, 'teacher_logits', where,
                     fn)
  dtype = _kl.compute_dtype(student_logits, teacher_logits)
  s = jnp.asarray(student_logits, dtype)
  t = _teacher_where(jnp.asarray(teacher_logits, dtype), where, 0.0)
  t = jax.lax.stop_gradient(t)
  return _masked(jnp.mean(jnp.square(s - t), axis=-1), where)


def renyi_divergence_loss(student_logits: ArrayLike, teacher_logits: ArrayLike,
                          alpha: ArrayLike, temperature: ArrayLike = 1.0, *,
                          where: ArrayLike | None = None) -> jax.Array:
  r"""Rényi divergence :math:`D_\alpha(p_t^T \| p_s^T)`, per example.

  .. math::
    D_\alpha(p \| q) = \frac{1}{\alpha - 1} \log \sum_i p_i^\alpha q_i^{1-\alpha}

  with :math:`p^T = \mathrm{softmax}(z / T)` and no :math:`T^2` factor.
  :math:`\alpha = 1` is the KL divergence (the limit is taken exactly), and
  the value is continuous in :math:`\alpha` there. Computed as
  :math:`\mathrm{KL} - M(1-\alpha)/(1-\alpha)`, with :math:`M` the cumulant
  generating function of the centred log-ratio, accurate near 0. A NaN in an
  example's logits makes that example's divergence NaN; teacher logits must be
  finite (as for :func:`tempered_distillation_loss`).

  Args:
    student_logits: Student scores, shape ``[..., num_classes]``.
    teacher_logits: Teacher scores, same shape; a constant (``stop_gradient``).
    alpha: Order ``alpha > 0``.
    temperature: ``T > 0``, finite: a scalar or one per example (shape
      ``[...]``). Treated as a constant.
    where: Optional boolean mask of shape ``[...]``; masked examples give 0
      (and a zero gradient, even where their teacher is NaN).

  Returns:
    Divergence of shape ``[...]`` (no reduction).

  Raises:
    ValueError: if the shapes differ, ``where`` or ``temperature`` has the
      wrong shape, ``alpha <= 0``, or ``temperature <= 0`` or is not finite
      (values: see :mod:`metacf.checks`).

  References:
    Rényi, On Measures of Entropy and Information, 1961;
    van Erven & Harremoës, `Rényi Divergence and Kullback-Leibler Divergence
    <https://arxiv.org/abs/1206.2459>`_, 2014
  """
  fn = 'renyi_divergence_loss'
  _check_logits_pair(student_logits, teacher_logits, 'teacher_logits', where,
                     fn)
  _check_temperature(temperature, np.shape(student_logits)[:-1], fn)
  checks.check_positive(alpha, 'alpha', fn)
  dtype = _kl.compute_dtype(student_logits, teacher_logits)
  s = jnp.asarray(student_logits, dtype)
  t = _teacher_where(jnp.asarray(teacher_logits, dtype), where, 0.0)
  t = jax.lax.stop_gradient(t)
  temp = jax.lax.stop_gradient(_kl.broadcast_temperature(temperature, dtype))
  parts = _kl.hinton_parts(s, t, temp)
  beta = 1.0 - jnp.asarray(alpha, dtype)
  is_kl = beta == 0.0
  safe_beta = jnp.where(is_kl, 1.0, beta)
  # D_alpha = KL - M(beta) / beta, with M the cumulant generating function of
  # dc under p_t (log p_s - log p_t = dc - KL).
  log_p_t = jax.nn.log_softmax(t / temp, axis=-1)
  cgf = _kl.log_expect_exp(safe_beta * parts.dc, parts.p_t, log_p_t)
  return _masked(jnp.where(is_kl, parts.kl, parts.kl - cgf / safe_beta),
                 where)


def _cross_entropy(logits: ArrayLike, labels: ArrayLike, fn: str) -> jax.Array:
  checks.check_integer(labels, 'labels', fn)
  num_classes = jnp.shape(logits)[-1]
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(
        f'{fn}: labels must have shape {jnp.shape(logits)[:-1]} (new_logits '
        f'without the class axis), got {jnp.shape(labels)}.')
  checks.check_labels(labels, num_classes, 'labels', fn)
  dtype = _kl.compute_dtype(logits)
  return optax.losses.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, dtype), labels)


def lwf_loss(new_logits: ArrayLike, labels: ArrayLike,
             old_logits: ArrayLike | Sequence[ArrayLike],
             recorded_old_logits: ArrayLike | Sequence[ArrayLike], *,
             temperature: ArrayLike = 2.0, old_weight: ArrayLike = 1.0,
             where: ArrayLike | None = None) -> jax.Array:
  r"""Learning-without-Forgetting loss, per example.

  .. math::
    \mathrm{CE}(z_\mathrm{new}, y) + \lambda_o \sum_h T^2\,
    \mathrm{KL}(\mathrm{softmax}(\hat z_h / T) \| \mathrm{softmax}(z_h / T))

  where :math:`z_h` are the current network's logits on the old task head
  ``h`` and :math:`\hat z_h` the logits that head produced on the same inputs
  before training on the new task (recorded once, a constant). Li & Hoiem use
  ``T = 2`` and :math:`\lambda_o = 1`. A NaN in an example's logits (new,
  old or recorded) makes that example's loss NaN.

  Args:
    new_logits: New-task logits, shape ``[..., num_new_classes]``.
    labels: Integer new-task labels, shape ``[...]``, in ``[0, num_new)``.
    old_logits: The current old-head logits ``[..., num_old_classes]``, or a
      sequence of them (one per old head).
    recorded_old_logits: The recorded old-head logits, matching
      ``old_logits`` (an array, or a sequence of the same length).
    temperature: Distillation temperature ``T > 0``, finite: a scalar or one
      per example (shape ``[...]``).
    old_weight: :math:`\lambda_o`, the weight of the old-task term.
    where: Optional boolean mask of shape ``[...]``; masked examples give 0
      (and a zero gradient, even where their recorded logits are NaN).

  Returns:
    Loss of shape ``[...]`` (no reduction).

  Raises:
    ValueError: on mismatched shapes, a ``temperature`` of the wrong shape,
      labels out of range or ``temperature <= 0`` (values: see
      :mod:`metacf.checks`), or heads given as sequences of different
      lengths.
    TypeError: if ``labels`` is not an integer array.

  References:
    Li & Hoiem, `Learning without Forgetting
    <https://arxiv.org/abs/1606.09282>`_, 2017
  """
  fn = 'lwf_loss'
  checks.check_min_rank(new_logits, 1, 'new_logits', fn)
  batch_shape = jnp.shape(new_logits)[:-1]
  _check_temperature(temperature, batch_shape, fn)
  checks.check_mask_shape(where, batch_shape, 'where', fn)
  heads_are_seq = isinstance(old_logits, (list, tuple))
  if heads_are_seq != isinstance(recorded_old_logits, (list, tuple)):
    raise ValueError(
        f'{fn}: old_logits and recorded_old_logits must both be arrays or both '
        f'be sequences of arrays, got {type(old_logits).__name__} and '
        f'{type(recorded_old_logits).__name__}.')
  if not heads_are_seq:
    old_logits, recorded_old_logits = [old_logits], [recorded_old_logits]
  if len(old_logits) != len(recorded_old_logits):
    raise ValueError(
        f'{fn}: old_logits and recorded_old_logits must have the same number '
        f'of heads, got {len(old_logits)} and {len(recorded_old_logits)}.')
  loss = _cross_entropy(new_logits, labels, fn)
  for i, (cur, rec) in enumerate(zip(old_logits, recorded_old_logits)):
    name = f'old_logits[{i}]' if heads_are_seq else 'old_logits'
    rec_name = (f'recorded_old_logits[{i}]'
                if heads_are_seq else 'recorded_old_logits')
    checks.check_same_shape(cur, rec, name, rec_name, fn)
    if jnp.shape(cur)[:-1] != batch_shape:
      raise ValueError(
          f'{fn}: {name} must have batch shape {batch_shape} like new_logits, '
          f'got shape {jnp.shape(cur)}.')
    # where= also keeps a NaN recorded logit of a masked example out of the
    # gradient.
    checks.check_min_rank(cur, 1, name, fn)
    distill = _tempered_distillation(cur, rec, temperature, where)
    loss = loss + jnp.asarray(old_weight, loss.dtype) * distill
  return _masked(loss, where)
