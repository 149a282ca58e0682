"""Tests for the shared argument checks and the opt-in runtime checks.

metacf._src.checks holds the one copy of each value check; metacf.checks
switches their jit twins on. Eager calls raise ValueError; under jit with
runtime checks on, checkify reports the same message; with them off nothing
is added to the program.
"""

import os
import re
import subprocess
import sys
import textwrap

from absl.testing import parameterized
import chex
import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import optax

import metacf
from metacf import distill
from metacf import jacobian
from metacf import protect
from metacf import replay
from metacf._src import checks


def _checked(fn):
  return jax.jit(checkify.checkify(fn, errors=checkify.user_checks))


def _logits(seed, shape=(4, 5)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _linear_apply(params, x):
  return x @ params['w'] + params['b'][None]


_PARAMS = {'w': np.float32(np.arange(6).reshape(3, 2) / 6.0),
           'b': np.zeros(2, np.float32)}
_X = np.float32(np.linspace(-1.0, 1.0, 12).reshape(4, 3))


def _balanced_add(labels):
  buffer = replay.class_balanced_buffer(4, 3)
  state = buffer.init({'x': jnp.zeros((2,), jnp.float32)})
  batch = {'x': jnp.zeros((4, 2), jnp.float32)}
  return buffer.add(jax.random.key(0), state, batch, labels).num_seen


# (name, fn(value), good value, bad value, message): each value check that
# an eager call makes, called with the checked value as a (traced under jit)
# argument.
_VALUE_CASES = (
    ('tempered_distillation_loss_negative_temperature',
     lambda t: distill.tempered_distillation_loss(_logits(0), _logits(1), t),
     np.float32(2.0), np.float32(-1.0),
     'tempered_distillation_loss: temperature must be > 0, got -1.0.'),
    ('tempered_distillation_loss_zero_temperature',
     lambda t: distill.tempered_distillation_loss(_logits(0), _logits(1), t),
     np.float32(2.0), np.float32(0.0),
     'tempered_distillation_loss: temperature must be > 0, got 0.0.'),
    ('tempered_distillation_loss_nan_temperature',
     lambda t: distill.tempered_distillation_loss(_logits(0), _logits(1), t),
     np.float32(2.0), np.float32(np.nan),
     'tempered_distillation_loss: temperature must be > 0, got nan.'),
    ('tempered_distillation_loss_infinite_temperature',
     lambda t: distill.tempered_distillation_loss(_logits(0), _logits(1), t),
     np.float32(2.0), np.float32(np.inf),
     'tempered_distillation_loss: temperature must be finite, got inf.'),
    ('tempered_distillation_loss_per_example_temperature',
     lambda t: distill.tempered_distillation_loss(_logits(0), _logits(1), t),
     np.float32([1, 2, 3, 4]), np.float32([1, 2, -3, 4]),
     'tempered_distillation_loss: temperature must be > 0, got a minimum of '
     '-3.0.'),
    ('tempered_softmax_negative_temperature',
     lambda t: distill.tempered_softmax(_logits(0), t),
     np.float32(2.0), np.float32(-1.0),
     'tempered_softmax: temperature must be > 0, got -1.0.'),
    ('temper_probs_negative_temperature',
     lambda t: distill.temper_probs(jax.nn.softmax(_logits(0)), t),
     np.float32(2.0), np.float32(-1.0),
     'temper_probs: temperature must be > 0, got -1.0.'),
    ('distillation_loss_from_probs_negative_temperature',
     lambda t: distill.distillation_loss_from_probs(
         _logits(0), jax.nn.softmax(_logits(1)), t),
     np.float32(2.0), np.float32(-1.0),
     'distillation_loss_from_probs: temperature must be > 0, got -1.0.'),
    ('renyi_divergence_loss_negative_temperature',
     lambda t: distill.renyi_divergence_loss(_logits(0), _logits(1), 2.0, t),
     np.float32(2.0), np.float32(-1.0),
     'renyi_divergence_loss: temperature must be > 0, got -1.0.'),
    ('renyi_divergence_loss_negative_alpha',
     lambda a: distill.renyi_divergence_loss(_logits(0), _logits(1), a, 2.0),
     np.float32(2.0), np.float32(-1.0),
     'renyi_divergence_loss: alpha must be > 0, got -1.0.'),
    ('lwf_loss_negative_temperature',
     lambda t: distill.lwf_loss(_logits(0), np.int32([0, 1, 2, 3]),
                                _logits(1), _logits(2), temperature=t),
     np.float32(2.0), np.float32(-1.0),
     'lwf_loss: temperature must be > 0, got -1.0.'),
    ('lwf_loss_labels',
     lambda y: distill.lwf_loss(_logits(0), y, _logits(1), _logits(2)),
     np.int32([0, 1, 2, 4]), np.int32([0, 5, 2, -1]),
     'lwf_loss: labels must be in [0, 5), got values in [-1, 5].'),
    ('distillation_loss_from_probs_negative_probability',
     lambda p: distill.distillation_loss_from_probs(_logits(0), p, 2.0),
     np.full((4, 5), 0.2, np.float32),
     np.float32(np.where(np.eye(4, 5) > 0, -0.5, 0.2)),
     'distillation_loss_from_probs: teacher_probs must be >= 0, got a '
     'minimum of -0.5.'),
    ('temper_probs_nan_probability',
     lambda p: distill.temper_probs(p, 2.0),
     np.full((4, 5), 0.2, np.float32),
     np.float32(np.where(np.eye(4, 5) > 0, np.nan, 0.2)),
     'temper_probs: probs must be >= 0, got a minimum of nan.'),
    ('fisher_diagonal_labels',
     lambda y: protect.fisher_diagonal(_linear_apply, _PARAMS, _X, labels=y),
     np.int32([0, 1, 1, 0]), np.int32([0, 1, 2, 0]),
     'fisher_diagonal: labels must be in [0, 2), got values in [0, 2].'),
    ('ewc_penalty_negative_strength',
     lambda s: protect.ewc_penalty(_PARAMS, _PARAMS, _PARAMS, s),
     np.float32(1.0), np.float32(-2.0),
     'ewc_penalty: strength must be >= 0, got -2.0.'),
    ('online_ewc_update_nan_gamma',
     lambda g: protect.online_ewc_update(_PARAMS, _PARAMS, g),
     np.float32(0.9), np.float32(np.nan),
     'online_ewc_update: gamma must be >= 0, got nan.'),
    ('predicted_forgetting_labels',
     lambda y: jacobian.predicted_forgetting(
         _linear_apply, _PARAMS, (_X, np.int32([0, 1, 0, 1])), (_X, y),
         lr=0.1, num_steps=2, loss='cross_entropy'),
     np.int32([1, 1, 0, 0]), np.int32([1, 3, 0, 0]),
     'predicted_forgetting: task_b labels y must be in [0, 2), got values in '
     '[0, 3].'),
    ('predicted_forgetting_negative_lr',
     lambda lr: jacobian.predicted_forgetting(
         _linear_apply, _PARAMS, (_X, np.zeros((4, 2), np.float32)),
         (_X, np.ones((4, 2), np.float32)), lr=lr, num_steps=2),
     np.float32(0.1), np.float32(-0.1),
     'predicted_forgetting: lr must be > 0, got -0.1.'),
    ('predicted_forgetting_non_orthonormal_basis',
     lambda v: jacobian.predicted_forgetting(
         _linear_apply, _PARAMS, (_X, np.zeros((4, 2), np.float32)),
         (_X, np.ones((4, 2), np.float32)), lr=0.1, num_steps=2,
         protect_basis=v),
     np.eye(2, 8, dtype=np.float32), np.ones((2, 8), np.float32),
     'predicted_forgetting: protect_basis must have orthonormal rows (V V^T = '
     'I; zero rows allowed), got max |(V V^T)^2 q - V V^T q| / max |q| = 5.79 '
     'for a random q (tolerance 0.001); orthonormalise it, e.g. with '
     'metacf.protect.extend_basis(None, vectors).'),
    ('predicted_forgetting_nan_basis',
     lambda v: jacobian.predicted_forgetting(
         _linear_apply, _PARAMS, (_X, np.zeros((4, 2), np.float32)),
         (_X, np.ones((4, 2), np.float32)), lr=0.1, num_steps=2,
         protect_basis=v),
     np.eye(2, 8, dtype=np.float32),
     np.where(np.eye(2, 8) > 0, np.nan, 0.0).astype(np.float32),
     'predicted_forgetting: protect_basis must have orthonormal rows (V V^T = '
     'I; zero rows allowed), got max |(V V^T)^2 q - V V^T q| / max |q| = nan '
     'for a random q (tolerance 0.001); orthonormalise it, e.g. with '
     'metacf.protect.extend_basis(None, vectors).'),
    ('class_balanced_buffer_add_labels',
     _balanced_add,
     np.int32([0, 1, 2, 2]), np.int32([0, 1, 3, 2]),
     'class_balanced_buffer.add: labels must be in [0, 3), got values in '
     '[0, 3].'),
)


class RuntimeChecksTest(parameterized.TestCase):
  """Every eager value check is reachable under jit with the checks on."""

  @parameterized.named_parameters(*_VALUE_CASES)
  def test_eager_raises_value_error(self, fn, good, bad, message):
    fn(good)
    with self.assertRaisesRegex(ValueError, re.escape(message)):
      fn(bad)
    # The switch changes nothing for concrete values.
    with metacf.runtime_checks():
      with self.assertRaisesRegex(ValueError, re.escape(message)):
        fn(bad)

  @parameterized.named_parameters(*_VALUE_CASES)
  def test_jit_with_checks_on_reports_the_message(self, fn, good, bad,
                                                  message):
    checked = _checked(fn)
    with metacf.runtime_checks():
      err, _ = checked(good)
      err.throw()  # Nothing to report.
      err, _ = checked(bad)
    self.assertEqual(err.get(), message + ' (`check` failed)')
    with self.assertRaisesRegex(checkify.JaxRuntimeError, re.escape(message)):
      err.throw()
    self.assertTrue(issubclass(checkify.JaxRuntimeError, ValueError))

  @parameterized.named_parameters(*_VALUE_CASES)
  def test_jit_with_checks_off_adds_nothing(self, fn, good, bad, message):
    del good, message
    self.assertFalse(metacf.checks.runtime_checks_enabled())
    jax.block_until_ready(jax.jit(fn)(bad))   # Plain jit, no checkify.
    err, _ = _checked(fn)(bad)
    self.assertIsNone(err.get())
    self.assertNotIn('check', str(jax.make_jaxpr(fn)(bad)))

  def test_plain_jit_with_checks_on_drops_them(self):
    fn = lambda t: distill.tempered_distillation_loss(_logits(0), _logits(1),
                                                      t)
    with metacf.runtime_checks():
      self.assertIn('check', str(jax.make_jaxpr(fn)(np.float32(-1.0))))
      got = jax.jit(fn)(np.float32(-1.0))   # No checkify: no error.
    self.assertTrue(np.all(np.isfinite(got)))

  def test_vmap_grad_and_scan_inside_checkify(self):
    def loss(s, temps):
      per_t = jax.vmap(lambda t: jnp.mean(distill.tempered_distillation_loss(
          s, _logits(1), t)))
      return jnp.sum(per_t(temps))

    def scanned(s, temps):
      body = lambda c, t: (c + jax.grad(loss)(s, t[None]), None)
      return jax.lax.scan(body, jnp.zeros_like(s), temps)[0]

    with metacf.runtime_checks():
      err, _ = _checked(jax.value_and_grad(loss))(_logits(0),
                                                  np.float32([1, -2, 3]))
      self.assertEqual(
          err.get(), 'tempered_distillation_loss: temperature must be > 0, '
          'got -2.0. (`check` failed)')
      err, _ = _checked(scanned)(_logits(0), np.float32([1, 2, -4]))
      self.assertIn('temperature must be > 0, got -4.0.', err.get())

  def test_flag_is_part_of_the_jit_cache_key(self):
    traces = []

    @jax.jit
    def step(s, t):
      traces.append(metacf.checks.runtime_checks_enabled())
      return jnp.mean(distill.tempered_distillation_loss(s, _logits(1), t))

    checked = _checked(step)
    err, _ = checked(_logits(0), np.float32(-1.0))
    self.assertIsNone(err.get())
    with metacf.runtime_checks():
      err, _ = checked(_logits(0), np.float32(-1.0))   # Traced again.
      self.assertIn('temperature must be > 0', err.get())
      err, _ = checked(_logits(2), np.float32(-3.0))   # Cached.
      self.assertIn('got -3.0', err.get())
    err, _ = checked(_logits(0), np.float32(-1.0))   # Off: cached too.
    self.assertIsNone(err.get())
    self.assertEqual(traces, [False, True])

  def test_switches(self):
    self.assertFalse(metacf.checks.runtime_checks_enabled())
    with metacf.runtime_checks():
      self.assertTrue(metacf.checks.runtime_checks_enabled())
      with metacf.runtime_checks(False):
        self.assertFalse(metacf.checks.runtime_checks_enabled())
      self.assertTrue(metacf.checks.runtime_checks_enabled())
    self.assertFalse(metacf.checks.runtime_checks_enabled())
    try:
      self.assertFalse(metacf.set_runtime_checks(True))
      self.assertTrue(metacf.checks.runtime_checks_enabled())
      with metacf.runtime_checks(False):
        self.assertFalse(metacf.checks.runtime_checks_enabled())
      self.assertTrue(metacf.set_runtime_checks(False))
    finally:
      metacf.set_runtime_checks(False)
    self.assertFalse(metacf.checks.runtime_checks_enabled())
    with self.assertRaisesRegex(TypeError, re.escape(
        'runtime_checks: enabled must be a bool, got 1.')):
      metacf.runtime_checks(1)
    with self.assertRaisesRegex(TypeError, re.escape(
        "set_runtime_checks: enabled must be a bool, got 'yes'.")):
      metacf.set_runtime_checks('yes')

  def test_environment_variable(self):
    code = textwrap.dedent("""
        import metacf
        print(metacf.checks.runtime_checks_enabled())
    """)
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    for value, want in (('1', 'True'), ('on', 'True'), ('0', 'False'),
                        ('', 'False')):
      env[checks.ENV_VAR] = value
      out = subprocess.run([sys.executable, '-c', code], env=env,
                           capture_output=True, text=True, check=True)
      self.assertEqual(out.stdout.strip(), want, msg=value)
    env[checks.ENV_VAR] = 'maybe'
    out = subprocess.run([sys.executable, '-c', code], env=env,
                         capture_output=True, text=True)
    self.assertNotEqual(out.returncode, 0)
    self.assertIn(
        "metacf: the environment variable METACF_RUNTIME_CHECKS must be one "
        "of '1', 'true', 'yes', 'on', '0', 'false', 'no', 'off' or unset, "
        "got 'maybe'.", out.stderr)


class SharedChecksTest(chex.TestCase):
  """The one copy of each check, with its messages."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_label_check_accepts_valid_labels(self):
    fn = self.variant(lambda y: (checks.check_labels(y, 3, 'y', 'f'), y)[1])
    np.testing.assert_array_equal(fn(np.int32([0, 2, 1])), [0, 2, 1])

  def test_label_check_messages(self):
    for labels, low, high in (([0, 3], 0, 3), ([-1, 2], -1, 2),
                              ([-2, 7], -2, 7)):
      with self.assertRaisesRegex(ValueError, re.escape(
          f'f: y must be in [0, 3), got values in [{low}, {high}].')):
        checks.check_labels(np.int32(labels), 3, 'y', 'f')
    checks.check_labels(np.zeros((0,), np.int32), 3, 'y', 'f')  # Empty.

  def test_nonnegative_nan_raises(self):
    # One behaviour for NaN everywhere: NaN is not >= 0.
    for value, got in ((np.nan, 'nan'), (-1.0, '-1.0'), (-0.5, '-0.5')):
      with self.assertRaisesRegex(ValueError, re.escape(
          f'f: x must be >= 0, got {got}.')):
        checks.check_nonnegative(value, 'x', 'f')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: x must be >= 0, got a minimum of nan.')):
      checks.check_nonnegative(np.float32([0.5, np.nan, -1.0]), 'x', 'f')
    checks.check_nonnegative(np.float32([0.0, -0.0, np.inf]), 'x', 'f')
    with self.assertRaisesRegex(TypeError, re.escape(
        "f: x must be a real number, got 'a'.")):
      checks.check_nonnegative('a', 'x', 'f')

  def test_nonnegative_where_skips_masked_rows(self):
    x = np.float32([[0.1, np.nan], [0.2, 0.3], [-4.0, 0.0]])
    checks.check_nonnegative(x, 'x', 'f', where=np.array([False, True, False]))
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: x must be >= 0, got a minimum of -4.0.')):
      checks.check_nonnegative(x, 'x', 'f', where=np.array([False, True, True]))

  def test_positive_and_finite(self):
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: t must be > 0, got 0.0.')):
      checks.check_positive(0.0, 't', 'f')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: t must be > 0, got a minimum of -1.0.')):
      checks.check_positive(np.float32([1.0, -1.0]), 't', 'f')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: t must be finite, got inf.')):
      checks.check_finite(float('inf'), 't', 'f')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: t must be finite, got 2 non-finite of 3 entries.')):
      checks.check_finite(np.float32([1.0, np.nan, -np.inf]), 't', 'f')

  @chex.variants(with_jit=True, without_jit=True)
  def test_leading_size_is_static(self):
    # Shapes only: the size is a Python int under jit too.
    fn = self.variant(lambda t: jnp.zeros(checks.leading_size(t, 'x', 'f')))
    self.assertEqual(fn({'a': np.zeros((3, 2)), 'b': np.zeros(3)}).shape,
                     (3,))

  def test_leading_size_messages(self):
    self.assertEqual(checks.leading_size({'a': np.zeros((3, 2)),
                                          'b': np.zeros(3)}, 'x', 'f'), 3)
    with self.assertRaisesRegex(ValueError, re.escape(
        "f: x must have a leading example axis shared by all its leaves, got "
        "shapes (3, 2) for ['a'], (2,) for ['b'].")):
      checks.leading_size({'a': np.zeros((3, 2)), 'b': np.zeros(2)}, 'x', 'f')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: x must have a leading batch axis shared by all its leaves, got '
        'shape ().')):
      checks.leading_size(np.float32(1.0), 'x', 'f', axis='batch')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: x must have a leading task axis shared by all its leaves, got no '
        'array.')):
      checks.leading_size({}, 'x', 'f', axis='task')
    with self.assertRaisesRegex(ValueError, re.escape(
        'f: x must have >= 1 examples on its leading axis, got 0.')):
      checks.leading_size(np.zeros((0, 2)), 'x', 'f', min_size=1)

  def test_leading_size_callers(self):
    with self.assertRaisesRegex(ValueError, re.escape(
        "fisher_diagonal: x must have a leading example axis shared by all "
        "its leaves, got shapes (4, 3) for ['a'], (2,) for ['b'].")):
      protect.fisher_diagonal(lambda p, x: _linear_apply(p, x['a']), _PARAMS,
                              {'a': _X, 'b': np.zeros(2)})
    with self.assertRaisesRegex(ValueError, re.escape(
        'fisher_diagonal: x must have >= 1 examples on its leading axis, got '
        '0.')):
      protect.fisher_diagonal(_linear_apply, _PARAMS, _X[:0])
    with self.assertRaisesRegex(ValueError, re.escape(
        'ntk: x1 must have a leading example axis shared by all its leaves, '
        'got shape ().')):
      jacobian.ntk(_linear_apply, _PARAMS, np.float32(1.0), _X)

  def test_value_check_formats_fields(self):
    summary = lambda xp, v: {'top': xp.max(v)}
    ok = lambda xp, top: top <= 2
    checks.value_check([np.int32([1, 2])], summary, ok, 'f: {top} > 2.')
    with self.assertRaisesRegex(ValueError, re.escape('f: 3 > 2.')):
      checks.value_check([np.int32([1, 3])], summary, ok, 'f: {top} > 2.')
    with metacf.runtime_checks():
      err, _ = _checked(lambda v: checks.value_check(
          [v], summary, ok, 'f: {top} > 2.'))(np.int32([1, 3]))
    self.assertEqual(err.get(), 'f: 3 > 2. (`check` failed)')


if __name__ == '__main__':
  import absl.testing.absltest  # pylint: disable=g-import-not-at-top
  absl.testing.absltest.main()


class SwappedBasisChecksTest(chex.TestCase):
  """A basis swapped into the optax state is value-checked under jit, opt-in."""

  def _step(self, tx):
    def step(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return updates, opt_state
    return _checked(step)

  def test_orthogonal_projection_state_basis(self):
    params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
    good = jnp.eye(8)[:2]
    tx = protect.orthogonal_projection(good)
    opt_state = tx.init(params)
    bad_state = optax.tree.set(opt_state, basis=2.0 * good)
    step = self._step(tx)
    with metacf.runtime_checks():
      err, _ = step(params, opt_state, params)
      err.throw()
      err, _ = step(params, bad_state, params)
    self.assertIn('orthogonal_projection: basis must have orthonormal rows',
                  err.get())
    err, _ = step(params, bad_state, params)   # Checks off: not reported.
    self.assertIsNone(err.get())

  def test_gpm_projection_state_bases(self):
    params = {'w': jnp.ones((4, 2)), 'b': jnp.ones((2,))}
    good = {'w': jnp.eye(4)[:, :2], 'b': None}
    tx = protect.gpm_projection(good)
    opt_state = tx.init(params)
    bad_state = optax.tree.set(
        opt_state, bases={'w': jnp.full((4, 2), jnp.nan), 'b': None})
    step = self._step(tx)
    with metacf.runtime_checks():
      err, _ = step(params, opt_state, params)
      err.throw()
      err, _ = step(params, bad_state, params)
    self.assertIn("gpm_projection: bases['w'] must have orthonormal columns",
                  err.get())
