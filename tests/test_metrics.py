"""Tests for metacf.metrics against explicit Python loops (Mammoth/GEM style)."""

from absl.testing import parameterized
import chex
import jax
import numpy as np

from metacf import metrics


def _loop_bwt(r):
  t = len(r)
  return np.mean([r[-1][j] - r[j][j] for j in range(t - 1)])


def _loop_fwt(r, b):
  t = len(r)
  return np.mean([r[j - 1][j] - b[j] for j in range(1, t)])


def _loop_forgetting_max(r):
  t = len(r)
  return np.mean([max(r[l][j] for l in range(t - 1)) - r[-1][j]
                  for j in range(t - 1)])


def _loop_forgetting_diag(r):
  t = len(r)
  return np.mean([r[j][j] - r[-1][j] for j in range(t - 1)])


def _random_matrix(seed, t=5):
  return np.random.default_rng(seed).uniform(0, 1, size=(t, t))


class MetricsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('t2', 2), ('t5', 5), ('t10', 10))
  def test_match_loops(self, t):
    r = _random_matrix(t, t)
    b = np.random.default_rng(100 + t).uniform(0, 1, size=t)
    np.testing.assert_allclose(self.variant(metrics.average_accuracy)(r),
                               np.mean(r[-1]), rtol=1e-6)
    np.testing.assert_allclose(self.variant(metrics.backward_transfer)(r),
                               _loop_bwt(r), rtol=1e-6)
    np.testing.assert_allclose(self.variant(metrics.forward_transfer)(r, b),
                               _loop_fwt(r, b), rtol=1e-6)
    np.testing.assert_allclose(
        self.variant(lambda x: metrics.forgetting(x, reference='max'))(r),
        _loop_forgetting_max(r), rtol=1e-6)
    np.testing.assert_allclose(
        self.variant(lambda x: metrics.forgetting(x, reference='diagonal'))(r),
        _loop_forgetting_diag(r), rtol=1e-6)

  def test_hand_computed_example(self):
    # Two tasks: task 0 learned to 0.9, dropped to 0.3 after task 1.
    r = np.array([[0.9, 0.1], [0.3, 0.8]])
    self.assertAlmostEqual(float(metrics.average_accuracy(r)), 0.55, places=6)
    self.assertAlmostEqual(float(metrics.backward_transfer(r)), -0.6, places=6)
    self.assertAlmostEqual(float(metrics.forgetting(r)), 0.6, places=6)
    self.assertAlmostEqual(
        float(metrics.forward_transfer(r, np.array([0.1, 0.1]))), 0.0,
        places=6)

  def test_max_and_diagonal_forgetting_differ(self):
    # Task 0 peaks after task 1 (positive transfer), then is forgotten.
    r = np.array([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.2, 0.7, 0.9]])
    self.assertAlmostEqual(float(metrics.forgetting(r)),
                           ((0.9 - 0.2) + (0.8 - 0.7)) / 2, places=6)
    self.assertAlmostEqual(float(metrics.forgetting(r, reference='diagonal')),
                           ((0.5 - 0.2) + (0.8 - 0.7)) / 2, places=6)

  def test_no_forgetting_for_perfect_memory(self):
    r = np.tril(np.full((4, 4), 0.95))
    self.assertAlmostEqual(float(metrics.forgetting(r)), 0.0, places=6)
    self.assertAlmostEqual(float(metrics.backward_transfer(r)), 0.0, places=6)

  def test_integer_matrix_is_accepted(self):
    r = np.array([[90, 10], [30, 80]])
    self.assertAlmostEqual(float(metrics.backward_transfer(r)), -60.0, places=4)

  def test_compiles_once(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def all_metrics(r, b):
      return (metrics.average_accuracy(r), metrics.backward_transfer(r),
              metrics.forward_transfer(r, b), metrics.forgetting(r),
              metrics.forgetting(r, reference='diagonal'))

    for seed in range(3):
      all_metrics(_random_matrix(seed), np.zeros(5))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      # (entry set to NaN, metrics that read it)
      ('final_row', (3, 0), ('acc', 'bwt', 'fgt_max', 'fgt_diag')),
      ('diagonal', (1, 1), ('bwt', 'fgt_max', 'fgt_diag')),
      ('below_diagonal', (2, 0), ('fgt_max',)),
      ('superdiagonal', (0, 1), ('fwt', 'fgt_max')),
      ('unread', (0, 3), ()))
  def test_nan_entries_propagate(self, entry, readers):
    # A NaN accuracy is never skipped (no nanmax, no mask): each metric that
    # reads the entry is NaN, the others stay finite.
    r = _random_matrix(0, 4)
    r[entry] = np.nan
    fns = {
        'acc': metrics.average_accuracy,
        'bwt': metrics.backward_transfer,
        'fwt': lambda x: metrics.forward_transfer(x, np.zeros(4)),
        'fgt_max': metrics.forgetting,
        'fgt_diag': lambda x: metrics.forgetting(x, reference='diagonal'),
    }
    for name, fn in fns.items():
      got = float(self.variant(fn)(r))
      self.assertEqual(np.isnan(got), name in readers, msg=name)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(
        ValueError, r'backward_transfer: accuracy_matrix must be square'):
      metrics.backward_transfer(np.zeros((2, 3)))
    with self.assertRaisesRegex(
        ValueError, r'forgetting: accuracy_matrix must cover at least 2 tasks'):
      metrics.forgetting(np.zeros((1, 1)))
    with self.assertRaisesRegex(
        ValueError, r"forgetting: reference must be 'max' or 'diagonal'"):
      metrics.forgetting(np.zeros((3, 3)), reference='min')
    with self.assertRaisesRegex(
        ValueError, r'forward_transfer: baseline must have shape \(3,\)'):
      metrics.forward_transfer(np.zeros((3, 3)), np.zeros(2))
    with self.assertRaisesRegex(
        ValueError, r'average_accuracy: accuracy_matrix must be square'):
      metrics.average_accuracy(np.zeros(3))
