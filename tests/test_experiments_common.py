"""The helpers in ``experiments/common`` that the studies share."""

import doctest

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import batching
from experiments.common import losses
from experiments.common import stats


class StatsTest(parameterized.TestCase):

  def test_mean_std_matches_numpy_population_std(self):
    values = [0.25, 0.5, 1.0]
    cell = stats.mean_std(values)
    self.assertEqual(cell['per_seed'], values)
    self.assertAlmostEqual(cell['mean'], 7 / 12)
    self.assertAlmostEqual(cell['std'],
                           np.sqrt(np.mean((np.array(values) - 7 / 12)**2)))
    self.assertTrue(all(type(v) is float for v in  # pylint: disable=unidiomatic-typecheck
                        (cell['mean'], cell['std'], *cell['per_seed'])))

  def test_mean_std_of_one_seed_has_zero_std(self):
    self.assertEqual(stats.mean_std(np.array([0.3], np.float32))['std'], 0.0)

  @parameterized.named_parameters(
      ('none', (None,), {}, '-'),
      ('mean', (0.1234,), {}, '12.3'),
      ('mean_std', (0.1234, 0.0051), {}, '12.3 ± 0.5'),
      ('digits', (0.1234, 0.0051), {'digits': 2}, '12.34 ± 0.51'),
      ('cell', ({'mean': 0.5, 'std': 0.25},), {}, '50.0 ± 25.0'),
  )
  def test_pct(self, args, kwargs, expected):
    self.assertEqual(stats.pct(*args, **kwargs), expected)

  def test_module_examples(self):
    for module in (stats, batching):
      with self.subTest(module.__name__):
        result = doctest.testmod(module)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(result.failed, 0)


class CrossEntropyTest(absltest.TestCase):

  def test_matches_log_softmax_per_example(self):
    logits = jax.random.normal(jax.random.key(0), (4, 5))
    labels = jnp.array([0, 1, 4, 2])
    expected = -np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[:, None],
        axis=1)[:, 0]
    np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                               expected, rtol=1e-6)


class BatchingTest(parameterized.TestCase):

  @parameterized.parameters((10, 4, 3), (7, 20, 5), (5, 1, 5))
  def test_shuffled_indices_are_back_to_back_epochs(self, num, steps,
                                                    batch_size):
    idx = batching.shuffled_indices(num, steps, batch_size,
                                    jax.random.key(num))
    self.assertEqual(idx.shape, (steps, batch_size))
    self.assertEqual(idx.dtype, np.int32)
    flat = idx.ravel()
    for start in range(0, len(flat) - num + 1, num):  # each whole epoch
      self.assertEqual(sorted(flat[start:start + num]), list(range(num)))
    tail = flat[len(flat) - len(flat) % num:]
    self.assertLen(set(tail.tolist()), len(tail))

  def test_shuffled_indices_of_a_subset_stay_in_it(self):
    subset = np.array([3, 9, 11, 2, 40], np.int32)
    idx = batching.shuffled_indices(subset, 3, 5, jax.random.key(1))
    for row in idx:
      self.assertEqual(sorted(row.tolist()), sorted(subset.tolist()))

  def test_shuffled_indices_follow_the_key(self):
    a = batching.shuffled_indices(50, 4, 8, jax.random.key(0))
    np.testing.assert_array_equal(
        a, batching.shuffled_indices(50, 4, 8, jax.random.key(0)))
    self.assertFalse(np.array_equal(
        a, batching.shuffled_indices(50, 4, 8, jax.random.key(1))))

  def test_epoch_indices_reshuffle_each_epoch_by_its_own_key(self):
    key = jax.random.key(3)
    order = batching.epoch_indices(key, 12, 3, 4)
    self.assertEqual(order.shape, (9, 4))
    self.assertEqual(order.dtype, np.int32)
    epochs = order.reshape(3, 12)
    for e in range(3):
      self.assertEqual(sorted(epochs[e].tolist()), list(range(12)))
    # Epoch 1 does not depend on how many epochs there are.
    np.testing.assert_array_equal(
        batching.epoch_indices(key, 12, 2, 4).reshape(2, 12)[1], epochs[1])

  def test_epoch_indices_reject_a_partial_batch(self):
    with self.assertRaisesRegex(ValueError, 'multiple of batch_size'):
      batching.epoch_indices(jax.random.key(0), 10, 1, 4)


if __name__ == '__main__':
  absltest.main()
