"""Tests for metacf.distill against float64 NumPy references."""

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np

from metacf import distill
from metacf.distill import _kl


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kd(s, t, temperature):
  """T^2 KL(softmax(t/T) || softmax(s/T)) in float64."""
  s, t = np.float64(s), np.float64(t)
  log_t = _np_log_softmax(t / temperature)
  log_s = _np_log_softmax(s / temperature)
  return temperature**2 * np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)


def _np_renyi(s, t, alpha, temperature):
  log_t = _np_log_softmax(np.float64(t) / temperature)
  log_s = _np_log_softmax(np.float64(s) / temperature)
  z = alpha * log_t + (1 - alpha) * log_s
  m = z.max(-1)
  return (m + np.log(np.exp(z - m[..., None]).sum(-1))) / (alpha - 1)


def _logits(seed, shape=(6, 10), scale=2.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(dtype)


class TemperedSoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('t_0.5', 0.5), ('t_1', 1.0), ('t_7', 7.0))
  def test_matches_float64_reference(self, temperature):
    z = _logits(0)
    got = self.variant(distill.tempered_softmax)(z, temperature)
    want = np.exp(_np_log_softmax(np.float64(z) / temperature))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    self.assertEqual(got.dtype, jnp.float32)

  def test_axis(self):
    z = _logits(1, (4, 5))
    got = distill.tempered_softmax(z, 3.0, axis=0)
    want = np.exp(_np_log_softmax(np.float64(z).T / 3.0)).T
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_half_precision_computed_in_float32(self):
    z = jnp.asarray(_logits(2), jnp.bfloat16)
    got = distill.tempered_softmax(z, 2.0)
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(
        got, np.exp(_np_log_softmax(np.float64(z.astype(jnp.float32)) / 2.0)),
        rtol=1e-5)

  @parameterized.named_parameters(('zero', 0.0), ('negative', -1.0),
                                  ('nan', float('nan')))
  def test_bad_temperature(self, temperature):
    with self.assertRaisesRegex(ValueError,
                                'tempered_softmax: temperature must be > 0'):
      distill.tempered_softmax(_logits(0), temperature)


class TemperProbsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('t_0.3', 0.3), ('t_2', 2.0), ('t_50', 50.0))
  def test_matches_float64_reference(self, temperature):
    p = np.float64(np.random.default_rng(0).dirichlet(np.ones(8), size=5))
    got = self.variant(distill.temper_probs)(np.float32(p), temperature)
    want = p**(1 / temperature)
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=2e-5)

  def test_equals_tempered_softmax_of_logits(self):
    z = _logits(3)
    np.testing.assert_allclose(
        distill.temper_probs(jax.nn.softmax(z), 4.0),
        distill.tempered_softmax(z, 4.0), rtol=2e-5)

  def test_zeros_stay_exactly_zero_and_no_nan(self):
    p = np.array([[0.0, 0.2, 0.8], [0.0, 0.0, 0.0], [1e-30, 0.0, 1.0]],
                 np.float32)
    got = np.asarray(distill.temper_probs(p, 3.0))
    self.assertTrue(np.all(np.isfinite(got)))
    np.testing.assert_array_equal(got[p == 0], 0.0)
    np.testing.assert_array_equal(got[1], 0.0)
    # log space: 1e-30 ** (1/3) = 1e-10 does not underflow.
    np.testing.assert_allclose(got[2, 0], 1e-10, rtol=1e-4)
    grad = jax.grad(lambda q: jnp.sum(distill.temper_probs(q, 3.0)[:, 1]))(p)
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_gradients(self):
    # Away from 0, where log's curvature would swamp the finite differences.
    p = 0.1 + np.random.default_rng(1).dirichlet(np.ones(5), size=3)
    with jax.enable_x64(True):
      check_grads(jax.jit(lambda q: distill.temper_probs(q, 2.5)), (p,),
                  order=2, modes=('rev',), eps=1e-6)

  def test_bad_temperature(self):
    with self.assertRaisesRegex(ValueError,
                                'temper_probs: temperature must be > 0'):
      distill.temper_probs(np.ones((2, 3)) / 3, 0.0)


class TemperedDistillationLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('t_0.5', 0.5), ('t_1', 1.0), ('t_4', 4.0),
                                  ('t_20', 20.0), ('t_1000', 1000.0))
  def test_matches_float64_reference(self, temperature):
    s, t = _logits(0), _logits(1)
    got = self.variant(distill.tempered_distillation_loss)(s, t, temperature)
    self.assertEqual(got.shape, (6,))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, _np_kd(s, t, temperature), rtol=1e-5)

  def test_batch_shape_is_kept(self):
    s, t = _logits(0, (2, 3, 7)), _logits(1, (2, 3, 7))
    got = distill.tempered_distillation_loss(s, t, 2.0)
    self.assertEqual(got.shape, (2, 3))
    np.testing.assert_allclose(got, _np_kd(s, t, 2.0), rtol=1e-5)

  def test_float64_is_tight(self):
    s, t = _logits(0, dtype=np.float64), _logits(1, dtype=np.float64)
    with jax.enable_x64(True):
      got = distill.tempered_distillation_loss(s, t, 3.0)
      self.assertEqual(got.dtype, jnp.float64)
      np.testing.assert_allclose(got, _np_kd(s, t, 3.0), rtol=1e-10)

  def test_high_temperature_limit_is_logit_matching(self):
    s, t = _logits(0), _logits(1)
    s, t = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
    limit = np.sum((np.float64(s) - t)**2, -1) / (2 * s.shape[-1])
    err = {}
    for temperature in (1e2, 1e3, 1e4):
      got = distill.tempered_distillation_loss(s, t, temperature)
      err[temperature] = np.max(np.abs(got - limit) / limit)
    # The gap to the limit is O(1/T), and float32 resolves it at T = 1e4.
    self.assertLess(err[1e3], 5e-3)
    self.assertLess(err[1e4], 5e-4)
    self.assertLess(err[1e4], err[1e3] / 5)
    self.assertLess(err[1e3], err[1e2] / 5)

  @parameterized.named_parameters(('t_0.05', 0.05), ('t_1', 1.0),
                                  ('t_1000', 1000.0))
  def test_extreme_logits_are_finite_and_accurate(self, temperature):
    s = _logits(5, scale=1e4)
    t = _logits(6, scale=1e4)
    for student, teacher in ((s, t), (t, s), (s, s)):
      got = np.asarray(
          distill.tempered_distillation_loss(student, teacher, temperature))
      self.assertTrue(np.all(np.isfinite(got)))
      self.assertTrue(np.all(got >= 0))
      want = _np_kd(student, teacher, temperature)
      # s / T itself is rounded by eps |s| / T; the loss carries a factor T^2.
      atol = 8 * np.finfo(np.float32).eps * np.abs(s).max() * temperature
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)

  def test_wide_logit_range_fallback_rows_are_accurate(self):
    # Logit ranges / T above 80 take the log-sum-exp path (exp would overflow).
    s, t = _logits(7, scale=40.0), _logits(8, scale=40.0)
    got = distill.tempered_distillation_loss(s, t, 1.0)
    np.testing.assert_allclose(got, _np_kd(s, t, 1.0), rtol=1e-5)
    grad = jax.grad(
        lambda x: jnp.sum(distill.tempered_distillation_loss(x, t, 1.0)))(s)
    p_s = np.exp(_np_log_softmax(np.float64(s)))
    p_t = np.exp(_np_log_softmax(np.float64(t)))
    np.testing.assert_allclose(grad, p_s - p_t, atol=1e-6)

  def test_identical_logits_give_exactly_zero(self):
    s = _logits(0)
    for temperature in (0.05, 1.0, 1000.0):
      np.testing.assert_array_equal(
          distill.tempered_distillation_loss(s, s, temperature), 0.0)

  @parameterized.named_parameters(('t_1', 1.0), ('t_4', 4.0), ('t_100', 100.0))
  def test_student_gradient_is_t_times_prob_difference(self, temperature):
    s, t = _logits(0), _logits(1)
    grad = jax.grad(
        lambda x: jnp.sum(distill.tempered_distillation_loss(x, t, temperature))
    )(s)
    p_s = np.exp(_np_log_softmax(np.float64(s) / temperature))
    p_t = np.exp(_np_log_softmax(np.float64(t) / temperature))
    np.testing.assert_allclose(grad, temperature * (p_s - p_t), atol=1e-6)

  def test_teacher_gradient_is_exactly_zero(self):
    s, t = _logits(0), _logits(1)
    grad = jax.grad(
        lambda y: jnp.sum(distill.tempered_distillation_loss(s, y, 2.0)))(t)
    np.testing.assert_array_equal(grad, 0.0)

  @parameterized.named_parameters(('t_0.7', 0.7), ('t_3', 3.0))
  def test_check_grads_float64(self, temperature):
    with jax.enable_x64(True):
      s, t = _logits(0, dtype=np.float64), _logits(1, dtype=np.float64)
      check_grads(
          jax.jit(lambda x: distill.tempered_distillation_loss(
              x, t, temperature)),
          (s,), order=2, modes=('rev', 'fwd'))

  def test_private_jvp_rule_covers_teacher_and_temperature(self):
    # The public loss stops gradients to the teacher and T; the custom rule
    # must still be right for every argument.
    with jax.enable_x64(True):
      s, t = _logits(0, dtype=np.float64), _logits(1, dtype=np.float64)
      check_grads(jax.jit(_kl.hinton_loss), (s, t, np.float64(1.7)),
                  order=2, modes=('rev', 'fwd'))

  def test_where_masks_examples_and_their_gradients(self):
    s, t = _logits(0), _logits(1)
    where = np.array([True, False, True, False, True, True])
    loss_fn = lambda x: distill.tempered_distillation_loss(x, t, 2.0,
                                                           where=where)
    got = loss_fn(s)
    want = np.where(where, _np_kd(s, t, 2.0), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(loss_fn(x)))(s)
    np.testing.assert_array_equal(grad[~where], 0.0)

  @parameterized.named_parameters(('bf16', jnp.bfloat16), ('f16', jnp.float16))
  def test_half_precision_computed_in_float32(self, dtype):
    s = jnp.asarray(_logits(0), dtype)
    t = jnp.asarray(_logits(1), dtype)
    got = distill.tempered_distillation_loss(s, t, 4.0)
    self.assertEqual(got.dtype, jnp.float32)
    want = _np_kd(np.float32(s), np.float32(t), 4.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_vmap_matches_batch(self):
    s, t = _logits(0, (3, 4, 10)), _logits(1, (3, 4, 10))
    batched = distill.tempered_distillation_loss(s, t, 2.0)
    mapped = jax.vmap(lambda a, b: distill.tempered_distillation_loss(a, b, 2.0)
                     )(s, t)
    np.testing.assert_allclose(mapped, batched, rtol=1e-6)

  def test_traced_temperature(self):
    s, t = _logits(0), _logits(1)
    got = jax.jit(distill.tempered_distillation_loss)(s, t, 3.0)
    np.testing.assert_allclose(got, _np_kd(s, t, 3.0), rtol=1e-5)

  def test_compiles_once(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, t):
      return jnp.mean(distill.tempered_distillation_loss(s, t, 2.0))

    for seed in range(3):
      step(_logits(seed), _logits(seed + 10))

  @parameterized.named_parameters(('zero', 0.0), ('negative', -2.0),
                                  ('nan', float('nan')))
  def test_bad_temperature(self, temperature):
    with self.assertRaisesRegex(
        ValueError, 'tempered_distillation_loss: temperature must be > 0'):
      distill.tempered_distillation_loss(_logits(0), _logits(1), temperature)

  def test_infinite_temperature(self):
    with self.assertRaisesRegex(
        ValueError, 'tempered_distillation_loss: temperature must be finite'):
      distill.tempered_distillation_loss(_logits(0), _logits(1), float('inf'))

  def test_mismatched_shapes(self):
    with self.assertRaisesRegex(
        ValueError, r'tempered_distillation_loss: student_logits and '
        r'teacher_logits must have the same shape, got \(6, 10\) and \(6, 9\)'):
      distill.tempered_distillation_loss(_logits(0), _logits(1, (6, 9)))

  def test_bad_where_shape(self):
    with self.assertRaisesRegex(
        ValueError, r'tempered_distillation_loss: where must have shape \(6,\)'):
      distill.tempered_distillation_loss(_logits(0), _logits(1),
                                         where=np.ones((6, 10), bool))


class DistillationLossFromProbsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('t_1', 1.0), ('t_4', 4.0), ('t_500', 500.0))
  def test_equals_logits_version(self, temperature):
    s, t = _logits(0), _logits(1)
    got = self.variant(distill.distillation_loss_from_probs)(
        s, jax.nn.softmax(t), temperature)
    np.testing.assert_allclose(got, _np_kd(s, t, temperature), rtol=1e-4)

  def test_zero_teacher_probabilities(self):
    s = _logits(0, (3, 5))
    p = np.array([[0.0, 0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0],
                  [1.0, 0.0, 0.0, 0.0, 0.0]], np.float64)
    temperature = 2.0
    got = distill.distillation_loss_from_probs(s, np.float32(p), temperature)
    # float64 reference over the support (0 log 0 = 0).
    q = np.where(p > 0, p, 1.0)**(1 / temperature) * (p > 0)
    q /= q.sum(-1, keepdims=True)
    log_s = _np_log_softmax(np.float64(s) / temperature)
    log_q = np.log(np.where(q > 0, q, 1.0))
    want = temperature**2 * np.sum(q * (log_q - log_s), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(
        distill.distillation_loss_from_probs(x, np.float32(p), temperature)))(s)
    np.testing.assert_allclose(
        grad, temperature * (np.exp(log_s) - q), atol=1e-6)

  def test_check_grads_float64(self):
    with jax.enable_x64(True):
      s = _logits(0, dtype=np.float64)
      p = np.random.default_rng(0).dirichlet(np.ones(10), size=6)
      p[:, 3] = 0.0
      check_grads(jax.jit(
          lambda x: distill.distillation_loss_from_probs(x, p, 1.5)),
                  (s,), order=2, modes=('rev',))

  def test_teacher_gradient_is_exactly_zero(self):
    s = _logits(0)
    p = np.float32(np.random.default_rng(0).dirichlet(np.ones(10), size=6))
    grad = jax.grad(lambda q: jnp.sum(
        distill.distillation_loss_from_probs(s, q, 2.0)))(p)
    np.testing.assert_array_equal(grad, 0.0)

  def test_bad_inputs(self):
    p = np.full((6, 10), 0.1, np.float32)
    with self.assertRaisesRegex(
        ValueError, 'distillation_loss_from_probs: temperature must be > 0'):
      distill.distillation_loss_from_probs(_logits(0), p, -1.0)
    with self.assertRaisesRegex(
        ValueError, 'distillation_loss_from_probs: student_logits and '
        'teacher_probs must have the same shape'):
      distill.distillation_loss_from_probs(_logits(0), p[:, :5])


class LogitMseLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    s, t = _logits(0), _logits(1)
    got = self.variant(distill.logit_mse_loss)(s, t)
    np.testing.assert_allclose(
        got, np.mean((np.float64(s) - t)**2, -1), rtol=1e-6)

  def test_gradient_and_teacher_constant(self):
    s, t = _logits(0), _logits(1)
    g_s, g_t = jax.grad(lambda a, b: jnp.sum(distill.logit_mse_loss(a, b)),
                        argnums=(0, 1))(s, t)
    np.testing.assert_allclose(g_s, 2 * (s - t) / s.shape[-1], rtol=1e-5)
    np.testing.assert_array_equal(g_t, 0.0)

  def test_where_and_bad_shapes(self):
    s, t = _logits(0), _logits(1)
    where = np.arange(6) % 2 == 0
    got = distill.logit_mse_loss(s, t, where=where)
    np.testing.assert_array_equal(np.asarray(got)[~where], 0.0)
    with self.assertRaisesRegex(ValueError, 'logit_mse_loss: student_logits and'
                                ' teacher_logits must have the same shape'):
      distill.logit_mse_loss(s, t[:3])


class RenyiDivergenceLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('a_0.5_t_1', 0.5, 1.0),
                                  ('a_2_t_1', 2.0, 1.0),
                                  ('a_3_t_4', 3.0, 4.0),
                                  ('a_0.1_t_20', 0.1, 20.0))
  def test_matches_float64_reference(self, alpha, temperature):
    s, t = _logits(0), _logits(1)
    got = self.variant(distill.renyi_divergence_loss)(s, t, alpha, temperature)
    np.testing.assert_allclose(got, _np_renyi(s, t, alpha, temperature),
                               rtol=1e-5)

  def test_alpha_one_is_kl_and_continuous(self):
    s, t = _logits(0), _logits(1)
    kl = _np_kd(s, t, 2.0) / 4.0
    np.testing.assert_allclose(distill.renyi_divergence_loss(s, t, 1.0, 2.0),
                               kl, rtol=1e-5)
    for alpha in (1 - 1e-4, 1 + 1e-4):
      np.testing.assert_allclose(
          distill.renyi_divergence_loss(s, t, alpha, 2.0), kl, rtol=1e-3)
      # and close to the float64 closed form at that alpha
      np.testing.assert_allclose(
          distill.renyi_divergence_loss(s, t, alpha, 2.0),
          _np_renyi(s, t, alpha, 2.0), rtol=1e-5)

  def test_monotone_in_alpha(self):
    s, t = _logits(0), _logits(1)
    values = [distill.renyi_divergence_loss(s, t, a, 1.0)
              for a in (0.25, 0.5, 1.0, 2.0, 4.0)]
    self.assertTrue(np.all(np.diff(np.stack(values), axis=0) >= -1e-6))

  def test_extreme_logits_are_finite(self):
    s, t = _logits(5, scale=1e4), _logits(6, scale=1e4)
    for temperature in (0.05, 1000.0):
      got = distill.renyi_divergence_loss(s, t, 2.0, temperature)
      self.assertTrue(np.all(np.isfinite(got)))
      np.testing.assert_allclose(got, _np_renyi(s, t, 2.0, temperature),
                                 rtol=1e-4)

  def test_check_grads_float64(self):
    with jax.enable_x64(True):
      s, t = _logits(0, dtype=np.float64), _logits(1, dtype=np.float64)
      # One jitted function, alpha an argument: each derivative check_grads
      # takes compiles once for the three alphas (alpha = 1 included: the KL
      # limit is taken inside the traced computation).
      loss = jax.jit(lambda x, a: distill.renyi_divergence_loss(x, t, a, 1.5))
      for alpha in (0.5, 1.0, 2.0):
        check_grads(lambda x, a=np.float64(alpha): loss(x, a), (s,),
                    order=2, modes=('rev',))

  @parameterized.named_parameters(('zero', 0.0), ('negative', -0.5))
  def test_bad_alpha(self, alpha):
    with self.assertRaisesRegex(
        ValueError, 'renyi_divergence_loss: alpha must be > 0'):
      distill.renyi_divergence_loss(_logits(0), _logits(1), alpha)


class LwfLossTest(chex.TestCase):

  def _np_lwf(self, new, labels, heads, temperature, old_weight):
    ce = -np.take_along_axis(_np_log_softmax(np.float64(new)),
                             labels[:, None], -1)[:, 0]
    kd = sum(_np_kd(cur, rec, temperature) for cur, rec in heads)
    return ce + old_weight * kd

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    new, old, rec = _logits(0, (6, 4)), _logits(1), _logits(2)
    labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
    got = self.variant(lambda *a: distill.lwf_loss(
        *a, temperature=2.0, old_weight=0.5))(new, labels, old, rec)
    np.testing.assert_allclose(
        got, self._np_lwf(new, labels, [(old, rec)], 2.0, 0.5), rtol=1e-5)

  def test_sequence_of_heads(self):
    new = _logits(0, (6, 4))
    heads = [(_logits(1), _logits(2)), (_logits(3, (6, 3)), _logits(4, (6, 3)))]
    labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
    got = distill.lwf_loss(new, labels, [h[0] for h in heads],
                           [h[1] for h in heads])
    np.testing.assert_allclose(got, self._np_lwf(new, labels, heads, 2.0, 1.0),
                               rtol=1e-5)

  def test_gradients(self):
    labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
    with jax.enable_x64(True):
      new, old = _logits(0, (6, 4), dtype=np.float64), _logits(
          1, dtype=np.float64)
      rec = _logits(2, dtype=np.float64)
      check_grads(jax.jit(
          lambda n, o: distill.lwf_loss(n, labels, o, rec)),
                  (new, old), order=2, modes=('rev',))
      g_rec = jax.grad(lambda r: jnp.sum(distill.lwf_loss(new, labels, old, r))
                      )(rec)
      np.testing.assert_array_equal(g_rec, 0.0)

  def test_bad_inputs(self):
    new, old, rec = _logits(0, (6, 4)), _logits(1), _logits(2)
    labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
    with self.assertRaisesRegex(ValueError,
                                r'lwf_loss: labels must be in \[0, 4\)'):
      distill.lwf_loss(new, labels + 1, old, rec)
    with self.assertRaisesRegex(TypeError, 'lwf_loss: labels must have an '
                                'integer dtype'):
      distill.lwf_loss(new, np.float32(labels), old, rec)
    with self.assertRaisesRegex(ValueError, 'lwf_loss: temperature must be > 0'):
      distill.lwf_loss(new, labels, old, rec, temperature=0.0)
    with self.assertRaisesRegex(ValueError, 'lwf_loss: old_logits and '
                                'recorded_old_logits must have the same shape'):
      distill.lwf_loss(new, labels, old, rec[:, :4])
    with self.assertRaisesRegex(ValueError, 'same number of heads'):
      distill.lwf_loss(new, labels, [old, old], [rec])
    with self.assertRaisesRegex(ValueError, 'both be sequences'):
      distill.lwf_loss(new, labels, [old], rec)
    with self.assertRaisesRegex(ValueError, r'lwf_loss: old_logits must have '
                                r'batch shape \(6,\)'):
      distill.lwf_loss(new, labels, old[:3], rec[:3])


def _np_temper_probs(p, temperature):
  """(temper(p, T), its log with 0 off the support) in float64, in log space."""
  p = np.float64(p)
  support = p > 0
  log_w = np.where(support, np.log(np.where(support, p, 1.0)) / temperature,
                   -np.inf)
  top = log_w.max(-1, keepdims=True)
  log_q = log_w - top - np.log(np.exp(log_w - top).sum(-1, keepdims=True))
  return np.exp(log_q), np.where(support, log_q, 0.0)


def _np_kd_from_probs(s, p, temperature):
  """T^2 KL(temper(p, T) || softmax(s/T)) in float64, with 0 log 0 = 0."""
  q, log_q = _np_temper_probs(p, temperature)
  log_s = _np_log_softmax(np.float64(s) / temperature)
  return temperature**2 * np.sum(q * (log_q - log_s), -1)


_NEW_LOGITS = _logits(9, (6, 4))
_LABELS = np.array([0, 1, 2, 3, 0, 1], np.int32)

# (name, loss(student, teacher, where), teacher kind): every public loss with a
# teacher, NaN-checked below.
_TEACHER_LOSSES = (
    ('tempered_distillation_loss_t2',
     lambda s, t, w=None: distill.tempered_distillation_loss(s, t, 2.0,
                                                             where=w),
     'logits'),
    ('tempered_distillation_loss_t1000',
     lambda s, t, w=None: distill.tempered_distillation_loss(s, t, 1000.0,
                                                             where=w),
     'logits'),
    ('distillation_loss_from_probs_t4',
     lambda s, p, w=None: distill.distillation_loss_from_probs(s, p, 4.0,
                                                               where=w),
     'probs'),
    ('logit_mse_loss',
     lambda s, t, w=None: distill.logit_mse_loss(s, t, where=w), 'logits'),
    ('renyi_divergence_loss_a1',
     lambda s, t, w=None: distill.renyi_divergence_loss(s, t, 1.0, 2.0,
                                                        where=w),
     'logits'),
    ('renyi_divergence_loss_a3',
     lambda s, t, w=None: distill.renyi_divergence_loss(s, t, 3.0, 2.0,
                                                        where=w),
     'logits'),
    ('lwf_loss',
     lambda s, t, w=None: distill.lwf_loss(_NEW_LOGITS, _LABELS, s, t,
                                           where=w),
     'logits'),
)


def _teacher(kind):
  t = _logits(1)
  if kind == 'logits':
    return t
  p = np.asarray(jax.nn.softmax(t)).copy()
  p[3, [0, 4]] = 0.0  # Genuine zeros in another example stay exact.
  return p


def _with_nan(x, row=1, col=2):
  x = np.array(x, copy=True)
  x[row, col] = np.nan
  return x


class NanPropagationTest(chex.TestCase):
  """NaN inputs give NaN for their own example, never a silent number.

  NaN teacher probabilities are checked values: they raise eagerly (and
  under jit with runtime checks on, tests/test_checks.py); the NaN
  propagation below is what a traced one does with the checks off.
  """

  def _variant(self, fn, kind):
    # Concrete NaN probabilities raise (NanProbabilitiesRaiseTest).
    return self.variant(jax.jit(fn) if kind == 'probs' else fn)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_TEACHER_LOSSES)
  def test_nan_teacher_poisons_only_its_example(self, loss_fn, kind):
    s, teacher = _logits(0), _teacher(kind)
    fn = self._variant(lambda a, b: loss_fn(a, b), kind)
    clean = np.asarray(fn(s, teacher))
    got = np.asarray(fn(s, _with_nan(teacher)))
    self.assertTrue(np.all(np.isfinite(clean)))
    self.assertTrue(np.isnan(got[1]))
    others = np.arange(6) != 1
    np.testing.assert_allclose(got[others], clean[others], rtol=1e-6)

  @parameterized.named_parameters(*_TEACHER_LOSSES)
  def test_nan_teacher_student_gradient_is_nan_only_there(self, loss_fn, kind):
    s, teacher = _logits(0), _teacher(kind)
    grad = lambda t: np.asarray(jax.jit(jax.grad(
        lambda x, t: jnp.sum(loss_fn(x, t))))(s, t))
    clean, got = grad(teacher), grad(_with_nan(teacher))
    self.assertTrue(np.all(np.isfinite(clean)))
    # The whole row for the softmax losses, the NaN entry alone for the MSE.
    self.assertTrue(np.isnan(got[1, 2]))
    others = np.arange(6) != 1
    np.testing.assert_allclose(got[others], clean[others], rtol=1e-5,
                               atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_TEACHER_LOSSES)
  def test_nan_student_poisons_only_its_example(self, loss_fn, kind):
    s, teacher = _logits(0), _teacher(kind)
    fn = self.variant(lambda a, b: loss_fn(a, b))
    clean = np.asarray(fn(s, teacher))
    got = np.asarray(fn(_with_nan(s, row=4), teacher))
    self.assertTrue(np.isnan(got[4]))
    others = np.arange(6) != 4
    np.testing.assert_allclose(got[others], clean[others], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_TEACHER_LOSSES)
  def test_masked_nan_teacher_gives_zero_and_zero_gradient(self, loss_fn,
                                                           kind):
    s, teacher = _logits(0), _with_nan(_teacher(kind))
    where = np.arange(6) != 1
    fn = self.variant(lambda a, b: loss_fn(a, b, where))
    got = np.asarray(fn(s, teacher))
    self.assertEqual(got[1], 0.0)
    np.testing.assert_allclose(got[where], np.asarray(loss_fn(
        s, _teacher(kind)))[where], rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(fn(x, teacher)))(s)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(grad[1], 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tempered_softmax_nan_row(self):
    got = np.asarray(self.variant(distill.tempered_softmax)(
        _with_nan(_logits(0)), 3.0))
    self.assertTrue(np.all(np.isnan(got[1])))
    self.assertTrue(np.all(np.isfinite(np.delete(got, 1, axis=0))))

  @parameterized.named_parameters(('axis_last', -1), ('axis_0', 0))
  def test_temper_probs_nan_makes_its_slice_nan(self, axis):
    p = np.float32(np.random.default_rng(2).dirichlet(np.ones(6), size=5))
    p[3, 0] = 0.0
    if axis == 0:
      p = p.T.copy()
    p_nan = p.copy()
    p_nan[(1, 2) if axis == -1 else (2, 1)] = np.nan
    fn = jax.jit(lambda q: distill.temper_probs(q, 2.0, axis=axis))
    clean, got = np.asarray(fn(p)), np.asarray(fn(p_nan))
    if axis == 0:
      clean, got = clean.T, got.T
    self.assertTrue(np.all(np.isnan(got[1])))
    np.testing.assert_allclose(np.delete(got, 1, axis=0),
                               np.delete(clean, 1, axis=0), rtol=1e-6)
    self.assertEqual(got[3, 0], 0.0)

  def test_infinite_probability_is_nan_not_zero(self):
    p = _teacher('probs')
    p[2, 1] = np.inf
    got = np.asarray(distill.distillation_loss_from_probs(_logits(0), p, 2.0))
    self.assertTrue(np.isnan(got[2]))
    self.assertTrue(np.all(np.isfinite(np.delete(got, 2))))
    tempered = np.asarray(distill.temper_probs(p, 2.0))
    self.assertTrue(np.all(np.isnan(tempered[2])))

  @parameterized.named_parameters(
      ('temper_probs', lambda p: distill.temper_probs(p, 2.0)),
      ('distillation_loss_from_probs',
       lambda p: distill.distillation_loss_from_probs(_logits(0), p, 2.0)))
  def test_traced_negative_probability_gives_nan(self, fn):
    p = _teacher('probs')
    p[1, 2] = -0.25
    got = np.asarray(jax.jit(fn)(p))
    self.assertTrue(np.all(np.isnan(got[1])))
    self.assertTrue(np.all(np.isfinite(np.delete(got, 1, axis=0))))

  @parameterized.named_parameters(('numpy', np.asarray), ('jax', jnp.asarray))
  def test_negative_teacher_probs_raise(self, as_array):
    p = np.full((6, 10), 0.1, np.float32)
    p[2, 3], p[4, 1] = -0.25, -0.5
    with self.assertRaisesRegex(ValueError, re.escape(
        'distillation_loss_from_probs: teacher_probs must be >= 0, got a '
        'minimum of -0.5.')):
      distill.distillation_loss_from_probs(_logits(0), as_array(p), 2.0)
    with self.assertRaisesRegex(ValueError, re.escape(
        'temper_probs: probs must be >= 0, got a minimum of -0.5.')):
      distill.temper_probs(as_array(p), 2.0)

  def test_negative_zero_does_not_raise(self):
    p = _teacher('probs')
    p[0, 1] = -0.0
    got = np.asarray(distill.distillation_loss_from_probs(_logits(0), p, 2.0))
    self.assertTrue(np.all(np.isfinite(got)))

  @parameterized.named_parameters(('numpy', np.asarray), ('jax', jnp.asarray))
  def test_nan_probabilities_raise(self, as_array):
    # NaN is not >= 0: the one non-negativity check (metacf._src.checks).
    p = _teacher('probs')
    p[1, 2] = np.nan
    with self.assertRaisesRegex(ValueError, re.escape(
        'distillation_loss_from_probs: teacher_probs must be >= 0, got a '
        'minimum of nan.')):
      distill.distillation_loss_from_probs(_logits(0), as_array(p), 2.0)
    with self.assertRaisesRegex(ValueError, re.escape(
        'temper_probs: probs must be >= 0, got a minimum of nan.')):
      distill.temper_probs(as_array(p), 2.0)

  def test_masked_out_examples_are_not_checked(self):
    p = _teacher('probs')
    p[1, 2], p[4, 0] = np.nan, -0.5
    where = np.ones(6, bool)
    where[[1, 4]] = False
    got = np.asarray(distill.distillation_loss_from_probs(
        _logits(0), p, 2.0, where=where))
    np.testing.assert_array_equal(got[[1, 4]], 0.0)
    where[4] = True
    with self.assertRaisesRegex(ValueError, re.escape(
        'distillation_loss_from_probs: teacher_probs must be >= 0, got a '
        'minimum of -0.5.')):
      distill.distillation_loss_from_probs(_logits(0), p, 2.0, where=where)


class ZeroTeacherProbabilitiesTest(chex.TestCase):
  """Genuine zeros: 0 log 0 = 0 exactly, finite gradients."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('t_0.5', 0.5), ('t_1', 1.0), ('t_3', 3.0),
                                  ('t_100', 100.0))
  def test_matches_float64_reference(self, temperature):
    with jax.enable_x64(True):
      s = _logits(0, (4, 6), dtype=np.float64)
      p = np.array([[0.0, 0.5, 0.25, 0.25, 0.0, 0.0],
                    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                    [0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
                    [1e-300, 0.0, 0.4, 0.0, 0.0, 0.6]], np.float64)
      fn = self.variant(
          lambda x: distill.distillation_loss_from_probs(x, p, temperature))
      got = fn(s)
      self.assertEqual(got.dtype, jnp.float64)
      np.testing.assert_allclose(got, _np_kd_from_probs(s, p, temperature),
                                 rtol=1e-10)
      grad = np.asarray(jax.grad(lambda x: jnp.sum(fn(x)))(s))
      self.assertTrue(np.all(np.isfinite(grad)))
      q, _ = _np_temper_probs(p, temperature)
      p_s = np.exp(_np_log_softmax(s / temperature))
      np.testing.assert_allclose(grad, temperature * (p_s - q), rtol=1e-9,
                                 atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_temper_probs_zeros_exact_with_finite_gradients(self):
    p = np.array([[0.0, 0.3, 0.7], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
                 np.float32)
    fn = self.variant(lambda q: distill.temper_probs(q, 2.0))
    got = np.asarray(fn(p))
    np.testing.assert_array_equal(got[p == 0], 0.0)
    want = np.sqrt(np.float64(p[[0, 2]]))
    np.testing.assert_allclose(got[[0, 2]], want / want.sum(-1, keepdims=True),
                               rtol=1e-6)
    grad = jax.grad(lambda q: jnp.sum(fn(q) * jnp.arange(3.0)[None]))(p)
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_all_zero_teacher_row_is_nan(self):
    # No distribution to distil: NaN for that row, not a made-up number.
    p = _teacher('probs')
    p[5] = 0.0
    got = np.asarray(distill.distillation_loss_from_probs(_logits(0), p, 2.0))
    self.assertTrue(np.isnan(got[5]))
    self.assertTrue(np.all(np.isfinite(got[:5])))

  def test_compiles_once(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, p):
      return jnp.mean(distill.distillation_loss_from_probs(s, p, 2.0))

    for seed in range(3):
      step(_logits(seed), _teacher('probs') + np.float32(seed))


_NEW_4 = _logits(9, (4, 3))
_LABELS_4 = np.array([0, 1, 2, 0], np.int32)

# (name, fn(logits, temperature)): every function that takes a temperature;
# the logits are [4, 5].
_TEMPERATURE_FNS = (
    ('tempered_softmax', distill.tempered_softmax),
    ('temper_probs',
     lambda z, temp: distill.temper_probs(jax.nn.softmax(z), temp)),
    ('tempered_distillation_loss',
     lambda z, temp: distill.tempered_distillation_loss(
         z, _logits(1, (4, 5)), temp)),
    ('distillation_loss_from_probs',
     lambda z, temp: distill.distillation_loss_from_probs(
         z, jax.nn.softmax(_logits(1, (4, 5))), temp)),
    ('renyi_divergence_loss',
     lambda z, temp: distill.renyi_divergence_loss(
         z, _logits(1, (4, 5)), 2.0, temp)),
    ('lwf_loss',
     lambda z, temp: distill.lwf_loss(_NEW_4, _LABELS_4, z,
                                      _logits(1, (4, 5)), temperature=temp)),
)


class TemperatureShapeTest(chex.TestCase):
  """temperature is a scalar or per example: never silently broadcast."""

  @parameterized.named_parameters(*_TEMPERATURE_FNS)
  def test_other_shapes_raise(self, fn):
    name = self._testMethodName.split('raise_')[-1]
    z = _logits(0, (4, 5))
    for shape in ((4, 1), (1,), (5,), (1, 4), (4, 5)):
      with self.assertRaisesRegex(ValueError, re.escape(
          f'{name}: temperature must be a scalar or have shape (4,) (the '
          f'logits shape without the class axis), got shape {shape}.')):
        fn(z, jnp.full(shape, 2.0))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_TEMPERATURE_FNS)
  def test_per_example_equals_one_call_per_example(self, fn):
    z = _logits(0, (4, 5))
    temps = np.array([0.5, 1.0, 3.0, 100.0], np.float32)
    got = np.asarray(self.variant(fn)(z, temps))
    for i, temp in enumerate(temps):
      want = np.asarray(fn(z, np.float32(temp)))[i]
      np.testing.assert_allclose(got[i], want, rtol=2e-6, atol=1e-7,
                                 err_msg=f'example {i}')

  def test_per_example_temperature_gradient(self):
    # d/ds T^2 KL = T (p_s - p_t), row by row with that row's T.
    with jax.enable_x64(True):
      s = _logits(0, (4, 5), dtype=np.float64)
      t = _logits(1, (4, 5), dtype=np.float64)
      temps = np.array([0.5, 1.0, 3.0, 100.0])
      grad = jax.grad(lambda x: jnp.sum(distill.tempered_distillation_loss(
          x, t, temps)))(s)
      p_s = np.exp(_np_log_softmax(s / temps[:, None]))
      p_t = np.exp(_np_log_softmax(t / temps[:, None]))
      np.testing.assert_allclose(grad, temps[:, None] * (p_s - p_t),
                                 rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(
          distill.tempered_distillation_loss(s, t, temps),
          [_np_kd(s[i], t[i], temps[i]) for i in range(4)], rtol=1e-10)
      check_grads(jax.jit(lambda x: distill.tempered_distillation_loss(
          x, t, temps)), (s,), order=2, modes=('rev',))

  @parameterized.named_parameters(('tempered_softmax', False),
                                  ('temper_probs', True))
  def test_per_slice_temperature_along_another_axis(self, probs):
    z = _logits(0, (5, 4))       # classes on axis 0, 4 slices.
    temps = np.array([0.5, 1.0, 3.0, 7.0], np.float32)
    if probs:
      fn = lambda temp: distill.temper_probs(jax.nn.softmax(z, axis=0), temp,
                                             axis=0)
    else:
      fn = lambda temp: distill.tempered_softmax(z, temp, axis=0)
    got = np.asarray(fn(temps))
    want = np.exp(_np_log_softmax(np.float64(z).T / temps[:, None])).T
    np.testing.assert_allclose(got, want, rtol=1e-5)
    name = 'temper_probs' if probs else 'tempered_softmax'
    with self.assertRaisesRegex(ValueError, re.escape(
        f'{name}: temperature must be a scalar or have shape (4,) (the '
        'logits shape without the class axis), got shape (5,).')):
      fn(np.ones(5, np.float32))

  @parameterized.named_parameters(*_TEMPERATURE_FNS)
  def test_bad_per_example_values(self, fn):
    name = self._testMethodName.split('values_')[-1]
    z = _logits(0, (4, 5))
    with self.assertRaisesRegex(ValueError, re.escape(
        f'{name}: temperature must be > 0, got a minimum of -2.0.')):
      fn(z, np.array([1.0, -2.0, 3.0, 0.0], np.float32))
    with self.assertRaisesRegex(ValueError, re.escape(
        f'{name}: temperature must be finite, got 1 non-finite of 4 '
        'entries.')):
      fn(z, np.array([1.0, np.inf, 3.0, 2.0], np.float32))
    with self.assertRaisesRegex(ValueError, re.escape(
        f'{name}: temperature must be > 0, got -1.0.')):
      fn(z, -1.0)
