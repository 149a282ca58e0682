"""Class-incremental pieces: ER-ACE's loss and iCaRL's herding selection.

Conventions in :mod:`metacf.replay`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from metacf._src import checks


def ace_cross_entropy(logits: jax.Array, labels: jax.Array,
                      active_classes: jax.Array) -> jax.Array:
  r"""Asymmetric cross-entropy (ER-ACE): the softmax over active classes only.

  .. math::
    \ell_b = \log \sum_{c \in A_b} e^{z_{bc}} - z_{b y_b}

  where :math:`A_b` are the active classes of example ``b``. ER-ACE (Caccia
  et al. 2022) uses it for the incoming batch with :math:`A` = the classes
  present in that batch, so that learning new classes does not push the old
  classes' logits down; the replayed batch takes the plain cross-entropy
  (all classes active). Inactive classes get no gradient.

  Examples:
    >>> logits = jnp.array([[2.0, 0.0, 5.0]])
    >>> active = jnp.array([True, True, False])      # class 2 not in the batch
    >>> loss = metacf.replay.ace_cross_entropy(logits, jnp.array([0]), active)
    >>> round(float(loss[0]), 4)                     # log(1 + e^-2)
    0.1269

  Args:
    logits: ``[B, C]`` logits.
    labels: ``[B]`` integer labels.
    active_classes: Booleans, ``[C]`` (the same for every example) or ``[B,
      C]``; every label must be active.

  Returns:
    ``[B]`` per-example losses.

  Raises:
    ValueError: on shapes other than the above, or (eagerly, and under
      :func:`metacf.runtime_checks`) a label whose class is not active.
    TypeError: if ``labels`` are not integers or ``active_classes`` not
      booleans.

  References:
    Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, `New Insights
    on Reducing Abrupt Representation Change in Online Continual Learning
    <https://arxiv.org/abs/2104.05025>`_, ICLR 2022
  """
  fn = 'ace_cross_entropy'
  shape = np.shape(logits)
  if len(shape) != 2:
    raise ValueError(f'{fn}: logits must be [batch, classes], got shape '
                     f'{shape}.')
  if np.shape(labels) != shape[:1]:
    raise ValueError(f'{fn}: labels must have shape {shape[:1]}, got '
                     f'{np.shape(labels)}.')
  checks.check_integer(labels, 'labels', fn)
  if np.shape(active_classes) not in (shape[1:], shape):
    raise ValueError(
        f'{fn}: active_classes must have shape {shape[1:]} or {shape}, got '
        f'{np.shape(active_classes)}.')
  if jnp.result_type(active_classes) != jnp.bool_:
    raise TypeError(f'{fn}: active_classes must be booleans, got dtype '
                    f'{jnp.result_type(active_classes)}.')
  checks.check_labels(labels, shape[1], 'labels', fn)
  active = jnp.broadcast_to(jnp.asarray(active_classes), shape)

  def label_active(xp, y, a):
    rows = xp.arange(np.shape(y)[0])
    return {'ok': xp.all(a[rows, y])}

  checks.value_check(
      [labels, active], label_active, lambda xp, ok: ok,
      f'{fn}: every label must be one of active_classes (a label whose '
      'class is not active has no probability).')
  masked = jnp.where(active, logits, -jnp.inf)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(masked, axis=-1) - label_logit


def herding_selection(features: jax.Array, num_exemplars: int) -> jax.Array:
  r"""iCaRL's herding: exemplars whose running mean tracks the class mean.

  Step ``k`` (1-based) picks the unused example :math:`i` minimising
  :math:`\lVert \mu - \frac{1}{k}(f_i + \sum_{j<k} f_{p_j}) \rVert`, with
  :math:`\mu` the mean of all ``features`` (Rebuffi et al. 2017, Algorithm
  4); ties go to the lowest index. iCaRL L2-normalises the features first:
  do so before calling if you follow it. Keep the first ``m`` indices to
  shrink a class's exemplar set to ``m`` (Algorithm 5). iCaRL's
  nearest-mean-of-exemplars classifier is
  :func:`metacf.maml.prototype_logits` on the exemplars' features.

  Examples:
    >>> f = jnp.array([[0.0], [1.0], [2.0], [10.0]])   # mean 3.25
    >>> metacf.replay.herding_selection(f, 3)
    Array([2, 1, 3], dtype=int32)

  Args:
    features: ``[N, D]`` features of one class's examples.
    num_exemplars: How many to select (static, ``0 <= num_exemplars <=
      N``).

  Returns:
    int32 ``[num_exemplars]`` indices into ``features``, in selection order,
    distinct.

  Raises:
    ValueError: if ``features`` is not 2-D or ``num_exemplars`` is outside
      ``[0, N]``.

  References:
    Rebuffi, Kolesnikov, Sperl & Lampert, `iCaRL: Incremental Classifier and
    Representation Learning <https://arxiv.org/abs/1611.07725>`_, CVPR 2017
  """
  fn = 'herding_selection'
  shape = np.shape(features)
  if len(shape) != 2:
    raise ValueError(f'{fn}: features must be [num_examples, dim], got shape '
                     f'{shape}.')
  n = shape[0]
  num_exemplars = checks.check_int(num_exemplars, 'num_exemplars', fn,
                                   min_value=0)
  if num_exemplars > n:
    raise ValueError(
        f'{fn}: num_exemplars must be <= the number of examples ({n}), got '
        f'{num_exemplars}.')
  if num_exemplars == 0:
    return jnp.zeros((0,), jnp.int32)
  features = jnp.asarray(features)
  mean = jnp.mean(features, axis=0)

  def body(k, carry):
    total, used, chosen = carry
    candidate = (total[None, :] + features) / (k + 1).astype(features.dtype)
    dist = jnp.sum(jnp.square(mean[None, :] - candidate), axis=-1)
    index = jnp.argmin(jnp.where(used, jnp.inf, dist)).astype(jnp.int32)
    return (total + features[index], used.at[index].set(True),
            chosen.at[k].set(index))

  init = (jnp.zeros_like(mean), jnp.zeros(n, bool),
          jnp.zeros(num_exemplars, jnp.int32))
  return jax.lax.fori_loop(0, num_exemplars, body, init)[2]
