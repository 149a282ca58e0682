"""Tests of ``experiments/predict_forgetting`` (NTK-predicted forgetting).

``train_and_evaluate(smoke_config, workdir)`` runs once on real MNIST and
Fashion-MNIST (five tiny pairs, one of each family, and a two-width sweep);
the tests check the records, correlations, files, and that a run missing
some records recomputes them bitwise. The protocol itself is checked on a
model linear in its parameters, where the linearised prediction is exact:
predicted and measured forgetting, computed by the experiment's own
functions, agree to rounding in float64.
"""

import contextlib
import dataclasses
import io
import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import _smoke_run
from experiments.common import models
from experiments.predict_forgetting import _plots
from experiments.predict_forgetting import _tasks
from experiments.predict_forgetting import configs
from experiments.predict_forgetting import main as predict_main
from experiments.predict_forgetting import report
from experiments.predict_forgetting import steps
from experiments.predict_forgetting import train

_DEFAULT_RAW = os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                            'data')
RAW_DIR = os.environ.get('METACF_RAW_DIR') or (
    os.path.abspath(_DEFAULT_RAW) if os.path.isdir(_DEFAULT_RAW) else None)

PAIRS = ('rotate_0', 'rotate_90', 'permute_100pct', 'split_01_to_23',
         'mnist_to_fashion')


def _run(workdir, config=None):
  config = configs.get_config('smoke') if config is None else config
  return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR)


def _numbers(results):
  """Everything a resumed run must reproduce exactly (not timings, dates)."""
  def strip(record):
    return {k: v for k, v in record.items() if k != 'time_s'}
  return ([strip(r) for r in results['pairs']],
          [strip(r) for r in results['regime_records']],
          results['summary'], results['regime'], results['overlap_vs_angle'])


class PredictForgettingSmokeTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return _run(workdir, cls.config)

  def test_every_pair_has_a_complete_finite_record(self):
    self.assertEqual([r['name'] for r in self.results['pairs']], list(PAIRS))
    self.assertEqual(self.results['num_pairs'], len(PAIRS))
    self.assertEqual(sorted({r['family'] for r in self.results['pairs']}),
                     sorted(configs.FAMILIES))
    k = self.config.overlap_k
    for r in self.results['pairs']:
      with self.subTest(r['name']):
        for key in ('predicted', 'measured', 'loss_a_before', 'loss_a_after',
                    'loss_b_before', 'loss_b_after', 'ratio',
                    'loss_a_train'):
          self.assertTrue(math.isfinite(r[key]), key)
        self.assertAlmostEqual(r['measured'],
                               r['loss_a_after'] - r['loss_a_before'],
                               places=6)
        for key in ('accuracy_a_before', 'accuracy_a_after',
                    'accuracy_b_after', 'accuracy_a_train', 'overlap',
                    'weighted_overlap'):
          self.assertBetween(r[key], 0.0, 1.0)
        self.assertAlmostEqual(r['accuracy_drop'], r['accuracy_a_before']
                               - r['accuracy_a_after'], places=6)
        # Training on B lowers B's loss.
        self.assertLess(r['loss_b_after'], r['loss_b_before'])
        cosines = np.asarray(r['principal_cosines'])
        self.assertEqual(cosines.shape, (k,))
        self.assertTrue(np.all((cosines >= 0) & (cosines <= 1)))
        self.assertTrue(np.all(np.diff(cosines) <= 1e-6))
        # The overlap is the mean squared principal cosine.
        self.assertAlmostEqual(r['overlap'], float(np.mean(cosines**2)),
                               places=5)
        for key in ('top_singular_values_a', 'top_singular_values_b'):
          s = np.asarray(r[key])
          self.assertEqual(s.shape, (k,))
          self.assertTrue(np.all(s > 0) and np.all(np.diff(s) <= 1e-4 * s[0]))
        self.assertEqual(list(r['low_rank']),
                         [str(k) for k in self.config.low_rank_ks])
        for low in r['low_rank'].values():
          self.assertTrue(math.isfinite(low['predicted']))
          self.assertGreaterEqual(low['relative_error_vs_full'], 0.0)

  def test_forgetting_has_the_expected_order(self):
    pairs = {r['name']: r for r in self.results['pairs']}
    # Class-incremental split MNIST forgets far more than anything else,
    # measured and predicted (the new digits take over the shared head).
    for key in ('measured', 'predicted'):
      others = [r[key] for n, r in pairs.items() if n != 'split_01_to_23']
      self.assertGreater(pairs['split_01_to_23'][key], max(others), key)
    self.assertGreater(pairs['split_01_to_23']['accuracy_drop'], 0.5)

  def test_correlations_are_in_range_and_match_the_records(self):
    summary = self.results['summary']
    predicted = [r['predicted'] for r in self.results['pairs']]
    measured = [r['measured'] for r in self.results['pairs']]
    self.assertEqual(summary['loss']['spearman'],
                     report.spearman(predicted, measured))
    self.assertEqual(summary['loss']['pearson'],
                     report.pearson(predicted, measured))
    values = [summary['loss']['spearman'], summary['loss']['pearson'],
              summary['accuracy_drop']['spearman'],
              summary['accuracy_drop']['pearson']]
    values += [v['spearman'] for v in summary['overlap'].values()]
    values += [v[c] for v in summary['low_rank'].values()
               for c in ('spearman', 'pearson')]
    values += [row['spearman'] for row in self.results['regime']]
    for value in values:
      self.assertBetween(value, -1.0, 1.0)
    self.assertEqual(summary['meets_goal'],
                     summary['loss']['spearman'] >= report.GOAL_SPEARMAN)
    # Five pairs spanning very different amounts of forgetting: the
    # prediction ranks them (the default config's 21 pairs are the claim).
    self.assertGreater(summary['loss']['spearman'], 0.5)

  def test_overlap_vs_angle_is_the_rotation_pairs(self):
    curve = self.results['overlap_vs_angle']
    self.assertEqual(curve['angle'], [0.0, 90.0])
    pairs = {r['name']: r for r in self.results['pairs']}
    self.assertEqual(curve['overlap'], [pairs['rotate_0']['overlap'],
                                        pairs['rotate_90']['overlap']])
    # The same task (other examples) shares more of its top directions.
    self.assertGreater(curve['overlap'][0], curve['overlap'][1])

  def test_regime_sweep_covers_every_width_and_lr(self):
    config, rows = self.config, self.results['regime']
    self.assertEqual([(r['width'], r['lr']) for r in rows],
                     [(w, lr) for w in config.regime_widths
                      for lr in config.regime_lrs])
    for row in rows:
      self.assertEqual(list(row['predicted']), list(config.regime_pairs))
      for name in config.regime_pairs:
        self.assertTrue(math.isfinite(row['predicted'][name]))
        self.assertTrue(math.isfinite(row['measured'][name]))
      self.assertTrue(math.isfinite(row['slope']))
      self.assertGreaterEqual(row['relative_error'], 0.0)
    records = self.results['regime_records']
    self.assertLen(records, len(config.regime_widths) *
                   len(config.regime_pairs))
    for record in records:
      self.assertLen(record['predicted'], len(config.regime_lrs))

  def test_writes_json_markdown_png_and_records(self):
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(self.results)))
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, written)
    self.assertEqual(written['jax_version'], jax.__version__)
    with open(os.path.join(self.workdir, train.RESULTS_MD)) as f:
      self.assertEqual(f.read().strip(), train.format_table(self.results))
    for name in _plots.FIGURES:
      with open(os.path.join(self.workdir, name), 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n', name)
    self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, 'pairs'))),
                     sorted(f'{n}.json' for n in PAIRS))
    self.assertLen(os.listdir(os.path.join(self.workdir, 'regime')),
                   len(self.results['regime_records']))

  def test_missing_records_are_recomputed_bitwise(self):
    # What a run killed during rotate_90 and the sweep leaves behind; the
    # recomputed records match the first run's exactly (same keys, same
    # programs), and the others are read back, not recomputed.
    workdir = self._copy_of_run()
    os.remove(os.path.join(workdir, 'pairs', 'rotate_90.json'))
    for name in os.listdir(os.path.join(workdir, 'regime')):
      if name.startswith('permute_100pct'):
        os.remove(os.path.join(workdir, 'regime', name))
    resumed = _run(workdir)
    self.assertEqual(_numbers(resumed), _numbers(self.results))
    for before, after in zip(self.results['pairs'], resumed['pairs']):
      if before['name'] != 'rotate_90':
        self.assertEqual(before['time_s'], after['time_s'])

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(self.config, lr_b=0.5)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(self._copy_of_run(), config)

  def test_main_prints_table(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      predict_main.main(['--config=smoke', f'--workdir={self._copy_of_run()}',
                         f'--raw_dir={RAW_DIR}'])
    self.assertIn(train.format_table(self.results), out.getvalue())
    self.assertIn('**Spearman', out.getvalue())


def _linear_apply(params, x):
  return x @ params['w'] + params['b'][None, :]


class ProtocolTest(parameterized.TestCase):

  @parameterized.named_parameters(('cross_entropy', 'cross_entropy'),
                                  ('mse', 'mse'))
  def test_linear_model_prediction_equals_measurement(self, loss):
    # For f linear in its parameters the linearisation is the model, so the
    # NTK prediction and the experiment's own training and measurement must
    # agree to float64 rounding.
    with jax.enable_x64(True):
      keys = jax.random.split(jax.random.key(0), 6)
      num_classes, dim = 3, 5
      params = {
          'w': jax.random.normal(keys[0], (dim, num_classes), jnp.float64),
          'b': jax.random.normal(keys[1], (num_classes,), jnp.float64)}
      x_a = jax.random.normal(keys[2], (7, dim), jnp.float64)
      x_b = jax.random.normal(keys[3], (6, dim), jnp.float64)
      labels_a = jax.random.randint(keys[4], (7,), 0, num_classes)
      labels_b = jax.random.randint(keys[5], (6,), 0, num_classes)
      fn = steps.forgetting_fn(_linear_apply, num_steps=12, loss=loss,
                               num_classes=num_classes)
      out = fn(params, x_a, labels_a, x_b, labels_b, 0.3)
      self.assertEqual(out['predicted'].dtype, jnp.float64)
      self.assertGreater(abs(float(out['measured'])), 1e-2)  # Not trivial.
      np.testing.assert_allclose(out['predicted'], out['measured'],
                                 rtol=1e-10, atol=1e-12)
      # The sweep's vmap over learning rates is the same computation.
      lrs = jnp.asarray([0.1, 0.3], jnp.float64)
      swept = steps.forgetting_fn(_linear_apply, num_steps=12, loss=loss,
                                  num_classes=num_classes, over_lrs=True)(
                                      params, x_a, labels_a, x_b, labels_b,
                                      lrs)
      np.testing.assert_allclose(swept['predicted'], swept['measured'],
                                 rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(swept['measured'][1], out['measured'],
                                 rtol=1e-12)

  def test_correlations_match_the_textbook_formulas(self):
    # scipy.stats against the definitions: Pearson's r of the values, and
    # of the ranks (ties sharing their average rank) for Spearman's rho.
    def pearson(x, y):
      x, y = x - x.mean(), y - y.mean()
      return np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y))

    def ranks(v):
      return np.array([np.sum(v < a) + (np.sum(v == a) + 1) / 2 for a in v])

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 30).astype(float)  # Ties.
    y = x + rng.normal(size=30)
    np.testing.assert_array_equal(ranks(x), stats.rankdata(x))
    self.assertAlmostEqual(report.spearman(x, y), pearson(ranks(x), ranks(y)),
                           delta=1e-12)
    self.assertAlmostEqual(report.pearson(x, y), pearson(x, y), delta=1e-12)
    self.assertEqual(report.spearman(x, -2 * x), -1.0)
    self.assertIsNone(report.pearson(x, np.ones(30)))
    self.assertIsNone(report.spearman(x, np.ones(30)))
    self.assertIsNone(report.spearman([1.0], [2.0]))

  def test_agreement_of_a_scaled_prediction(self):
    measured = np.array([0.1, -0.2, 0.5, 1.0])
    out = report.agreement(2 * measured, measured)
    self.assertAlmostEqual(out['slope'], 2.0)
    self.assertAlmostEqual(out['relative_error'], 1.0)
    self.assertAlmostEqual(out['median_ratio'], 2.0)
    self.assertAlmostEqual(out['spearman'], 1.0)

  def test_ntk_parameterisation_is_flax_mlp_at_init(self):
    model = steps.make_model(32, 0.1)
    key = jax.random.key(3)
    x = jax.random.normal(jax.random.key(4), (5, _tasks.NUM_PIXELS))
    flax_mlp = models.MLP(widths=(32,))
    standard = flax_mlp.init(key, x[:1])['params']
    np.testing.assert_allclose(model.apply(model.init(key), x),
                               flax_mlp.apply({'params': standard}, x),
                               rtol=1e-5, atol=1e-5)
    self.assertIs(steps.make_model(32, 0.1), model)  # Cached: one compile.

  def test_rotation(self):
    image = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28)
    # Counterclockwise as displayed, exactly on whole pixels at 90 degrees.
    np.testing.assert_array_equal(_tasks.rotate(image, 90.0),
                                  np.rot90(image, 1, axes=(1, 2)))
    np.testing.assert_array_equal(_tasks.rotate(image, 180.0),
                                  image[:, ::-1, ::-1])
    np.testing.assert_array_equal(_tasks.rotate(image, 0.0), image)

  @parameterized.parameters(0.0, 0.1, 1.0)
  def test_partial_permutation(self, fraction):
    perm = _tasks.partial_permutation(jax.random.key(0), 784, fraction)
    np.testing.assert_array_equal(np.sort(perm), np.arange(784))
    self.assertGreaterEqual(np.sum(perm == np.arange(784)),
                            784 - round(fraction * 784))
    np.testing.assert_array_equal(
        perm, _tasks.partial_permutation(jax.random.key(0), 784, fraction))

  def test_task_data_pools_are_disjoint_and_nested(self):
    train_split, test_split = (
        {'label': np.repeat(np.arange(10, dtype=np.int32), 20)},
        {'label': np.repeat(np.arange(10, dtype=np.int32), 5)})
    key = jax.random.key(0)
    a = _tasks._draw(train_split, (0, 1, 2), slice(0, 100), 20, key)
    b = _tasks._draw(train_split, (5, 6, 7), slice(100, None), 20, key)
    self.assertTrue(np.all(a < 100) and np.all(b >= 100))
    self.assertTrue(np.isin(train_split['label'][a], (0, 1, 2)).all())
    self.assertTrue(np.isin(train_split['label'][b], (5, 6, 7)).all())
    np.testing.assert_array_equal(
        _tasks._draw(train_split, (0, 1, 2), slice(0, 100), 8, key), a[:8])
    with self.assertRaisesRegex(ValueError, 'the pool has'):
      _tasks._draw(test_split, (0,), slice(0, None), 6, key)

  @parameterized.named_parameters(
      ('rank', {'overlap_k': 10**6}, 'overlap_k'),
      ('low_rank', {'low_rank_ks': (0,)}, 'low_rank_ks'))
  def test_bad_config_raises(self, changes, message):
    config = dataclasses.replace(configs.get_config('smoke'), **changes)
    with self.assertRaisesRegex(ValueError, message):
      train.check_config(config)

  def test_bad_config_fields_raise(self):
    smoke = configs.get_config('smoke')
    with self.assertRaisesRegex(ValueError, 'not pairs of the config'):
      dataclasses.replace(smoke, regime_pairs=('rotate_45',))
    with self.assertRaisesRegex(ValueError, 'loss must be one of'):
      dataclasses.replace(smoke, loss='hinge')
    with self.assertRaisesRegex(ValueError, 'dataset must be one of'):
      configs.Task('x', dataset='cifar10')


if __name__ == '__main__':
  absltest.main()
