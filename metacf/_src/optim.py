"""Calling optax from inside metacf kernels."""

from typing import Any

import jax
import optax


def update(optimizer: optax.GradientTransformation, updates: Any,
           state: optax.OptState, params: Any = None, **extra_args: Any
           ) -> tuple[Any, optax.OptState]:
  """``optimizer.update(updates, state, params)`` under standard promotion.

  optax's bias corrections (``optax.adam``, ``adamw``, ...; optax 0.2.8) raise
  a Python float to the power of the int32 step count, which
  ``jax_numpy_dtype_promotion='strict'`` rejects (``TypePromotionError: Input
  dtypes ("<class 'float'>", 'int32') have no available implicit dtype
  promotion path``). The update is traced under ``'standard'`` promotion so
  that metacf kernels work for users (and tests) who run strict; the dtypes
  that come out are the ones optax produces under the default setting.
  """
  with jax.numpy_dtype_promotion('standard'):
    return optimizer.update(updates, state, params, **extra_args)
