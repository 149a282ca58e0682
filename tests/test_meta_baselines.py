"""The meta-learning baselines experiment: smoke run and its pieces.

``train_and_evaluate(smoke_config, workdir)`` runs once for the class on real
Omniglot: all 7 methods x 5-way 1- and 5-shot, one conv block of 4
channels, a 1-second budget per run (at most 3 updates), 10 test tasks. Far
too little to learn anything: accuracies are only checked to be valid.
Most of its time is compilation (21 programs).
"""

import json
import math
import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.meta_baselines import configs
from experiments.meta_baselines import steps
from experiments.meta_baselines import train

METHODS = ('maml', 'fomaml', 'reptile', 'imaml', 'protonets', 'anil',
           'maml++')
SETTINGS = ('5way1shot', '5way5shot')


class MetaBaselinesSmokeTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return train.train_and_evaluate(cls.config, str(workdir),
                                    raw_dir=RAW_DIR)

  def test_every_method_and_setting_present_and_valid(self):
    config, results = self.config, self.results
    self.assertEqual(tuple(results['runs']), SETTINGS)
    for sname, runs in results['runs'].items():
      self.assertEqual(tuple(runs), METHODS)
      for method, r in runs.items():
        with self.subTest(f'{method}/{sname}'):
          self.assertEqual((r['ways'], r['shots']),
                           (5, int(sname[4])))
          self.assertBetween(r['accuracy'], 0.0, 1.0)
          self.assertGreater(r['ci95'], 0.0)
          self.assertLess(r['ci95'], 1.0)
          self.assertEqual(r['num_test_tasks'], config.num_test_tasks)
          self.assertGreaterEqual(r['iterations'], 1)
          self.assertLessEqual(r['iterations'], 3)  # num_iterations
          self.assertLen(r['losses'], r['iterations'])
          self.assertTrue(all(math.isfinite(x) for x in r['losses']))
          for key in ('train_time_s', 'step_time_s', 'compile_s',
                      'curve_eval_s', 'final_eval_s'):
            self.assertGreater(r[key], 0.0, key)
          # Curve: start, the points crossed, and the end (seconds rising).
          curve = r['curve']
          self.assertEqual(curve[0]['iteration'], 0)
          self.assertEqual(curve[0]['train_time_s'], 0.0)
          self.assertEqual(curve[-1]['iteration'], r['iterations'])
          times = [p['train_time_s'] for p in curve]
          self.assertEqual(times, sorted(times))
          for p in curve:
            self.assertBetween(p['accuracy'], 0.0, 1.0)
            self.assertBetween(p['ci95'], 0.0, 1.0)

  def test_paper_numbers_attached(self):
    runs = self.results['runs']
    self.assertEqual(runs['5way1shot']['maml']['paper_accuracy'], 0.987)
    self.assertEqual(runs['5way5shot']['maml']['paper_accuracy'], 0.999)
    self.assertEqual(runs['5way1shot']['reptile']['paper_accuracy'], 0.9768)
    self.assertEqual(runs['5way5shot']['protonets']['paper_accuracy'], 0.997)
    self.assertIsNone(runs['5way1shot']['anil']['paper_accuracy'])

  def test_maml_plus_plus_switches_to_second_order(self):
    for sname in SETTINGS:
      r = self.results['runs'][sname]['maml++']
      if r['iterations'] >= 2:  # progress >= 0.5 reached before the end.
        self.assertIsNotNone(r['second_order_from_iteration'])
      self.assertIsNone(
          self.results['runs'][sname]['maml']['second_order_from_iteration'])

  def test_files_written(self):
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(self.results)))
    with open(os.path.join(self.workdir, train.RESULTS_PNG), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
    table = train.format_table(self.results)
    self.assertLen(table.splitlines(), 2 + len(METHODS) * len(SETTINGS))


class MslWeightsTest(absltest.TestCase):

  def test_schedule(self):
    s = 5
    np.testing.assert_allclose(steps.msl_weights(0.0, s, 0.1),
                               np.full(s, 0.2), rtol=1e-6)
    half = np.asarray(steps.msl_weights(0.05, s, 0.1))
    np.testing.assert_allclose(half[:-1], 0.1, rtol=1e-6)
    np.testing.assert_allclose(half[-1], 1 - 4 * 0.1, rtol=1e-6)
    end = np.asarray(steps.msl_weights(0.0999, s, 0.1))
    np.testing.assert_allclose(end[:-1], 0.03 / s, rtol=1e-5)
    np.testing.assert_allclose(steps.msl_weights(0.1, s, 0.1),
                               [0, 0, 0, 0, 1])
    np.testing.assert_allclose(steps.msl_weights(1.0, s, 0.1),
                               [0, 0, 0, 0, 1])
    for p in np.linspace(0, 1, 11):
      w = np.asarray(steps.msl_weights(p, s, 0.1))
      self.assertAlmostEqual(float(w.sum()), 1.0, places=5)
      self.assertTrue(np.all(w >= 0))

  def test_traced_progress_no_retrace(self):
    fn = jax.jit(lambda p: steps.msl_weights(p, 3, 0.5))
    a = fn(jnp.float32(0.0))
    b = fn(jnp.float32(0.25))
    np.testing.assert_allclose(a, np.full(3, 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(b[:2], 1 / 6, rtol=1e-6)
    self.assertEqual(fn._cache_size(), 1)


class ConvStepBNTest(absltest.TestCase):

  def test_step_selects_its_batchnorm_row(self):
    steps_, c = 2, 3
    model = steps.ConvStepBN(num_classes=4, num_inner_steps=steps_,
                             features=c, num_layers=1)
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 1))
    params = model.init(jax.random.key(1), x, 0)['params']
    self.assertEqual(params['bn0_scale'].shape, (steps_ + 1, c))
    self.assertEqual(params['bn0_bias'].shape, (steps_ + 1, c))
    scale = jax.random.uniform(jax.random.key(2), (steps_ + 1, c),
                               minval=0.5, maxval=2.0)
    bias = jax.random.normal(jax.random.key(3), (steps_ + 1, c))
    params = {**params, 'bn0_scale': scale, 'bn0_bias': bias}

    def reference(step):  # Hand-written: conv, BN with row `step`, ReLU...
      k = params['conv0']['kernel']
      h = jax.lax.conv_general_dilated(
          x, k, (1, 1), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      h = h + params['conv0']['bias'].reshape(1, 1, 1, c)
      mean = h.mean((0, 1, 2), keepdims=True)
      var = ((h - mean) ** 2).mean((0, 1, 2), keepdims=True)
      h = ((h - mean) / jnp.sqrt(var + 1e-5) * scale[step].reshape(1, 1, 1, c)
           + bias[step].reshape(1, 1, 1, c))
      h = jnp.maximum(h, 0.0)
      h = h.reshape(6, 2, 2, 2, 2, c).max((2, 4))
      return (h.reshape(6, -1) @ params['head']['kernel']
              + params['head']['bias'][None])

    outs = []
    for step in range(steps_ + 1):
      out = model.apply({'params': params}, x, step)
      np.testing.assert_allclose(out, reference(step), rtol=1e-4, atol=1e-4)
      traced = jax.jit(lambda p, s: model.apply({'params': p}, x, s))(
          params, jnp.int32(step))
      np.testing.assert_allclose(traced, out, rtol=1e-5, atol=1e-5)
      outs.append(out)
    self.assertFalse(np.allclose(outs[0], outs[1]))


class ConfigTest(absltest.TestCase):

  def test_default_is_equal_budget_and_paper_on_gpu(self):
    config = configs.get_config('default')
    self.assertEqual(tuple(m.name for m in config.methods), METHODS)
    cpu = configs.resolve(config, 'cpu')
    self.assertEqual(cpu.protocol, 'cpu')
    self.assertIsNotNone(cpu.time_budget_s)
    # 14 runs x (budget + compile + test) must fit 45 minutes.
    self.assertLessEqual(14 * cpu.time_budget_s, 30 * 60)
    gpu = configs.resolve(config, 'gpu')
    self.assertEqual(gpu.protocol, 'paper')
    self.assertIsNone(gpu.time_budget_s)
    by_name = {m.name: m for m in gpu.methods}
    self.assertEqual(by_name['maml'].meta_batch_size, 32)
    self.assertEqual(by_name['maml'].num_iterations, 60_000)
    self.assertEqual(by_name['reptile'].num_eval_steps, 50)
    self.assertEqual(by_name['protonets'].train_ways, 60)
    self.assertEqual(config.num_test_tasks, 600)

  def test_bad_config_raises(self):
    with self.assertRaisesRegex(ValueError, 'protocol'):
      configs.Config(protocol='fast')
    with self.assertRaisesRegex(ValueError, 'methods'):
      configs.Config(methods=(configs.Method('sgd', 1, 1),))


if __name__ == '__main__':
  absltest.main()
