"""Value checks eagerly and under ``jit``: the one place that says how.

metacf checks its arguments in two kinds of ways.

* **Static checks** (shapes, ranks, dtypes, pytree structures, Python
  hyperparameters such as ``num_inner_steps``) run in Python when a function
  is called or traced. They behave the same eagerly and under ``jit``,
  ``vmap`` or ``grad`` and cost nothing at run time.
* **Value checks** read the data: a temperature or learning rate ``<= 0`` or
  not finite, a negative or NaN probability or EWC strength, an integer
  label outside ``[0, num_classes)``, a non-finite or non-orthonormal basis.
  On **concrete** values (an eager call, or a Python number or NumPy array
  closed over by a jitted function) they raise ``ValueError`` at once, with
  the message ``'<function>: <arg> must <expectation>, got <actual>.'``. On
  **traced** values (arguments of a jitted function) they cannot raise:
  Python never sees the numbers. There they are **off by default** (nothing
  is added to the program, zero cost) and **opt-in** through
  :mod:`jax.experimental.checkify`.

Turning runtime checks on (a negative temperature, traced under ``jit``):

>>> import jax
>>> import jax.numpy as jnp
>>> from jax.experimental import checkify
>>> import metacf
>>> def loss_fn(student, teacher, temperature):
...   return jnp.mean(metacf.distill.tempered_distillation_loss(
...       student, teacher, temperature))
>>> checked = jax.jit(checkify.checkify(loss_fn, errors=checkify.user_checks))
>>> logits = jnp.zeros((2, 3))
>>> with metacf.runtime_checks():          # or metacf.set_runtime_checks(True),
...   err, loss = checked(logits, logits, -1.0)  # or METACF_RUNTIME_CHECKS=1
>>> err.throw()   # raises checkify.JaxRuntimeError (a ValueError)
Traceback (most recent call last):
  ...
JaxRuntimeError: tempered_distillation_loss: temperature must be > 0 ...
>>> err, loss = checked(logits, logits, 2.0)   # checks off: traced again
>>> err.get() is None
True

With checks on, every value check that would raise eagerly emits a
``checkify.debug_check`` with the same message (the ``got ...`` part holds
the run-time value, e.g. the smallest temperature or the label range), so
``err.throw()`` raises ``JaxRuntimeError`` (a subclass of ``ValueError``)
whose message starts as the eager ``ValueError``'s does. A
``debug_check`` that ``checkify`` does not functionalise is dropped, so a
function traced with checks on still runs under a plain ``jax.jit``
(without the checks). The flag is read when a function is traced and is
part of jax's trace context (:func:`jax.make_user_context`): a jitted
function called with checks on is traced and compiled again, not served
from a cache filled with checks off (and the reverse), so within a
``with metacf.runtime_checks():`` block calls are checked and outside it
they are not.

Differences that remain between eager calls and ``jit``:

* With runtime checks off (the default), a bad traced value is not
  reported: a negative temperature gives finite numbers, an out-of-range
  label gives NaN (``optax``'s cross-entropy), a NaN probability a NaN loss.
* With them on, the error surfaces only through ``checkify``'s error value
  (``err.throw()``), after the step ran, not as a Python exception at the
  call.
* A value the function closes over (a Python float temperature) is concrete
  even inside ``jit``: it is checked eagerly, at trace time, either way.

Cost with checks on: one fused reduction per checked array (labels,
probabilities, per-example temperatures; a scalar hyperparameter is one
comparison), plus checkify's error plumbing. Measured in
``benchmarks/README.md`` ("Runtime checks").
"""

from metacf._src import checks as _checks

#: ``'METACF_RUNTIME_CHECKS'``, the environment variable that sets the
#: initial global default (``1``, ``true``, ``yes`` or ``on`` turn checks on;
#: ``0``, ``false``, ``no``, ``off`` or unset leave them off).
ENV_VAR = _checks.ENV_VAR


def runtime_checks(enabled: bool = True):
  """Context manager that turns runtime value checks on (or off) inside it.

  The setting is thread-local and overrides the global one
  (:func:`set_runtime_checks`, initially the ``METACF_RUNTIME_CHECKS``
  environment variable: ``1``/``true``/``yes``/``on`` or
  ``0``/``false``/``no``/``off``). It is read when a function is traced,
  and jitted functions are re-traced when it changes; see the module
  docstring.

  Args:
    enabled: Whether value checks on traced values emit ``checkify`` checks.

  Returns:
    A context manager.

  Raises:
    TypeError: if ``enabled`` is not a bool.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> import metacf
    >>> def loss_fn(probs):
    ...   return jnp.sum(metacf.distill.temper_probs(probs, 2.0))
    >>> checked = jax.jit(checkify.checkify(loss_fn,
    ...                                     errors=checkify.user_checks))
    >>> with metacf.runtime_checks():
    ...   err, loss = checked(jnp.array([0.5, -0.5]))
    >>> err.get() is None          # a negative probability was caught
    False
  """
  return _checks.RUNTIME_CHECKS(_check_bool(enabled, 'runtime_checks'))


def set_runtime_checks(enabled: bool) -> bool:
  """Sets the global default of :func:`runtime_checks`; returns the old one.

  Raises:
    TypeError: if ``enabled`` is not a bool.
  """
  previous = bool(_checks.RUNTIME_CHECKS.get_global())
  _checks.RUNTIME_CHECKS.set_global(_check_bool(enabled,
                                                'set_runtime_checks'))
  return previous


def runtime_checks_enabled() -> bool:
  """Whether runtime value checks are on here (context, else global)."""
  return _checks.runtime_checks_enabled()


def _check_bool(enabled, fn: str) -> bool:
  if not isinstance(enabled, bool):
    raise TypeError(f'{fn}: enabled must be a bool, got {enabled!r}.')
  return enabled


__all__ = ['ENV_VAR', 'runtime_checks', 'runtime_checks_enabled',
           'set_runtime_checks']
