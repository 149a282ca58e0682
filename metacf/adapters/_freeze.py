"""Training a subset of the parameters: labels, a freezing optimizer, counts.

``trainable=`` takes the one leaf-selection form of :mod:`metacf.masks`;
metacf only resolves it, and the optimizer is optax's own
``optax.transforms.selective_transform``. Example (train the head and every
bias, keep the rest bit-identical)::

  tx = metacf.adapters.freeze(optax.adam(1e-3), params, r'^head/|bias$')
  opt_state = tx.init(params)              # no Adam moments for frozen leaves
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)   # frozen: updates exactly 0
  metacf.adapters.count_params(params), metacf.adapters.count_params(opt_state)
"""

import math
from typing import Any

import jax
import numpy as np
import optax

from metacf._src import masks
from metacf._src import optim
from metacf._src.types import Params

TRAINABLE = 'trainable'
FROZEN = 'frozen'


def _trainable_mask(params: Params, trainable: masks.MaskSpec,
                    fn: str) -> Any:
  return masks.resolve_mask(trainable, params, name='trainable', fn=fn)


def trainable_labels(params: Params, trainable: masks.MaskSpec) -> Any:
  """Labels each leaf of ``params`` ``'trainable'`` or ``'frozen'``.

  The labels fit ``optax.partition`` / ``optax.multi_transform``, e.g.
  ``optax.partition({'trainable': optax.adam(1e-3), 'frozen':
  optax.set_to_zero()}, trainable_labels(params, r'^head/'))``.

  Args:
    params: A pytree of arrays.
    trainable: The leaves to train (:mod:`metacf.masks`): ``None`` (all), a
      pytree of bools like ``params``, a callable ``(path, leaf) -> bool``, or
      a regex searched in the ``/``-joined path.

  Returns:
    A pytree like ``params`` whose leaves are ``'trainable'`` or ``'frozen'``.

  Raises:
    ValueError: if a pytree ``trainable`` does not have ``params``'
      structure, or a callable/regex selects no leaf.
  """
  mask = _trainable_mask(params, trainable, 'trainable_labels')
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def freeze(optimizer: optax.GradientTransformation, params: Params,
           trainable: masks.MaskSpec) -> optax.GradientTransformation:
  """Runs ``optimizer`` on the trainable leaves only; frozen updates are 0.

  This is ``optax.transforms.selective_transform(optimizer,
  freeze_mask=...)`` with the mask resolved from ``trainable``: trainable
  leaves are routed through ``optimizer`` exactly as a plain ``optimizer``
  on the trainable subset would (same updates, same state); frozen leaves
  get updates that are exactly zero (``optax.set_to_zero``), so
  ``optax.apply_updates`` returns them unchanged, and ``optimizer`` keeps no
  state for them (optax's ``MaskedNode``, a pytree with no leaves, stands in
  their place: with Adam the state holds ``2 * count_params(trainable) + 1``
  numbers).

  ``update`` is traced under ``jax.numpy_dtype_promotion('standard')``:
  optax's bias corrections mix a Python float with the int32 step count,
  which strict promotion rejects; the dtypes that come out are optax's own.

  Args:
    optimizer: The optax optimizer for the trainable leaves.
    params: The parameters (only their structure and paths are read); ``init``
      and ``update`` must be given pytrees of this structure.
    trainable: The leaves to train (:mod:`metacf.masks`): ``None`` (all), a
      pytree of bools like ``params``, a callable ``(path, leaf) -> bool``, or
      a regex searched in the ``/``-joined path.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: if ``optimizer`` is not an optax ``GradientTransformation``.
    ValueError: if a pytree ``trainable`` does not have ``params``'
      structure, or a callable/regex selects no leaf.
  """
  fn = 'freeze'
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        f'{fn}: optimizer must be an optax.GradientTransformation, got '
        f'{type(optimizer).__name__}.')
  mask = _trainable_mask(params, trainable, fn)
  freeze_mask = jax.tree.map(lambda m: not m, mask)
  inner = optax.transforms.selective_transform(optimizer,
                                               freeze_mask=freeze_mask)

  def update_fn(updates, state, params=None, **extra_args):
    return optim.update(inner, updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def count_params(tree: Any) -> int:
  """The total number of array elements in ``tree``; ``None`` leaves ignored.

  Works on parameters, adapters (``lora_init``'s output, with ``None`` off the
  targets), optimizer states (``optax.MaskedNode`` counts 0) and
  ``jax.ShapeDtypeStruct`` trees; a Python scalar counts 1.

  Args:
    tree: A pytree of arrays (or anything with a ``shape``) and scalars.

  Returns:
    A Python int.

  Raises:
    TypeError: if a leaf is neither array-like nor a number.
  """
  flat, _ = jax.tree.flatten_with_path(tree)
  total = 0
  for key_path, leaf in flat:
    if hasattr(leaf, 'shape'):
      total += math.prod(leaf.shape)
    elif isinstance(leaf, (bool, int, float, complex, np.number, np.bool_)):
      total += 1
    else:
      raise TypeError(
          f'count_params: tree leaves must be arrays or numbers, got '
          f'{type(leaf).__name__} at {masks.path_str(key_path)!r}.')
  return int(total)
