"""Tests of ``experiments/lwf_observability`` (LwF vs observability of A).

``train_and_evaluate(smoke_config, workdir)`` runs once on real MNIST,
Fashion-MNIST and Omniglot (tiny subsets, a 16-16 body, every kind of task
B); the tests check that every task and seed has finite records in range,
the files written, that a run resumed from a partly deleted workdir and a
fresh run with the same seed give bitwise the same numbers. The
observability measures are checked on closed forms and on a task observed
by itself.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.common import models
from experiments.lwf_observability import _plots
from experiments.lwf_observability import configs
from experiments.lwf_observability import data as lwf_data
from experiments.lwf_observability import main as lwf_main
from experiments.lwf_observability import observability
from experiments.lwf_observability import steps
from experiments.lwf_observability import train
import metacf.jacobian


KINDS = ('fashion_mnist', 'rotation', 'permutation', 'omniglot', 'noise')


def _run(workdir, config=None):
  config = configs.get_config('smoke') if config is None else config
  return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR)


def _without_timings(tree):
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items()
            if not k.endswith('time_s')}
  if isinstance(tree, list):
    return [_without_timings(v) for v in tree]
  return tree


def _numbers(results):
  """What a resumed or repeated run must reproduce exactly."""
  return _without_timings({k: results[k] for k in ('a', 'tasks', 'runs',
                                                   'correlation')})


def _floats(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _floats(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _floats(v)
  elif isinstance(tree, float):
    yield tree


class LwfObservabilityTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return _run(workdir, cls.config)

  def test_every_task_and_seed_has_records_in_range(self):
    results = self.results
    names = [t.name for t in self.config.tasks]
    self.assertEqual(list(results['tasks']), names)
    self.assertEqual(sorted({t.kind for t in self.config.tasks}),
                     sorted(KINDS))
    self.assertEqual(sorted(results['runs']),
                     sorted(f'{n}/seed{s}' for n in names
                            for s in self.config.seeds))
    numbers = list(_floats(_without_timings(results)))
    self.assertNotEmpty(numbers)
    self.assertTrue(all(math.isfinite(x) for x in numbers))
    before = results['a']['test_accuracy']
    self.assertGreater(before, 0.2)  # A was learnt (chance: 0.1).
    for name, task in results['tasks'].items():
      with self.subTest(name):
        for measure in ('observability', 'weighted_overlap',
                        'excitation_share', 'subspace_overlap'):
          self.assertBetween(task['observability'][measure], 0.0, 1.0)
        self.assertLen(task['observability']['s_a'], self.config.k_a)
        self.assertLen(task['observability']['s_b'], self.config.k_b)
        for method in steps.METHODS:
          cell = task[method]
          self.assertLen(cell['retention']['per_seed'], len(self.config.seeds))
          for acc, ret in zip(cell['a_accuracy']['per_seed'],
                              cell['retention']['per_seed']):
            self.assertBetween(acc, 0.0, 1.0)
            self.assertEqual(ret, acc / before)
            self.assertBetween(ret, 0.0, 1.0 / before)
          for key in ('b_test_accuracy', 'b_train_accuracy'):
            self.assertBetween(cell[key]['mean'], 0.0, 1.0)
          self.assertGreaterEqual(cell['a_on_b_kl']['mean'], 0.0)
    for run in results['runs'].values():
      for method in steps.METHODS:
        self.assertAlmostEqual(run[method]['backward_transfer'],
                               run[method]['a_accuracy'] - before, places=6)

  def test_finetune_keeps_a_head_lwf_trains_it_and_keeps_a_outputs(self):
    kl = {m: [] for m in steps.METHODS}
    for key, run in self.results['runs'].items():
      self.assertTrue(run['finetune']['head_a_unchanged'], key)
      self.assertFalse(run['lwf']['head_a_unchanged'], key)
      for m in steps.METHODS:
        kl[m].append(run[m]['a_on_b_kl'])
    # Distillation keeps A's outputs on B's inputs closer to the recorded
    # ones than fine-tuning does (on average over tasks and seeds).
    self.assertLess(np.mean(kl['lwf']), np.mean(kl['finetune']))

  def test_correlation_is_spearman_of_the_table(self):
    corr = self.results['correlation']
    tasks = self.results['tasks'].values()
    self.assertEqual(corr['num_tasks'], len(self.config.tasks))
    for measure in observability.MEASURES:
      x = [t['observability'][measure] for t in tasks]
      for target, y in (
          ('lwf_retention', [t['lwf']['retention']['mean'] for t in tasks]),
          ('finetune_retention',
           [t['finetune']['retention']['mean'] for t in tasks]),
          ('lwf_gain', [t['lwf_gain']['mean'] for t in tasks])):
        got = corr[f'{measure}__{target}']['spearman']
        if np.ptp(x) > 0 and np.ptp(y) > 0:
          self.assertAlmostEqual(got, stats.spearmanr(x, y)[0], places=12)
          self.assertBetween(got, -1.0, 1.0)
        else:
          self.assertIsNone(got)

  def test_files(self):
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(self.results)))
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, written)
    with open(os.path.join(self.workdir, train.RESULTS_MD)) as f:
      self.assertEqual(f.read().strip(), train.format_table(self.results))
    with open(os.path.join(self.workdir, _plots.FIGURE), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
    steps = sorted(int(s) for s in os.listdir(
        os.path.join(self.workdir, 'checkpoints', 'a')) if s.isdigit())
    self.assertEqual(steps, [self.config.a_epochs - 1, self.config.a_epochs])
    for task in self.config.tasks:
      self.assertTrue(os.path.exists(os.path.join(
          self.workdir, 'observability', f'{task.name}.json')))
      for seed in self.config.seeds:
        self.assertTrue(os.path.exists(os.path.join(
            self.workdir, 'runs', task.name, f'seed{seed}.json')))

  def test_resume_gives_identical_results(self):
    # Killed after some records: A's last checkpoint, one observability
    # record and two runs are gone.
    workdir = self._copy_of_run()
    shutil.rmtree(os.path.join(workdir, 'checkpoints', 'a',
                               str(self.config.a_epochs)))
    for rel in ('observability/omniglot.json', 'runs/noise/seed1.json',
                'runs/rotate_90/seed0.json'):
      os.remove(os.path.join(workdir, rel))
    resumed = _run(workdir, self.config)
    self.assertEqual(_numbers(resumed), _numbers(self.results))

  def test_main_in_fresh_workdir_gives_the_same_numbers(self):
    workdir = os.path.join(self._tempdir(), 'fresh')
    argv = ['--config=smoke', f'--workdir={workdir}']
    if RAW_DIR is not None:
      argv.append(f'--raw_dir={RAW_DIR}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      lwf_main.main(argv)
    self.assertIn('| B | observability | w. overlap |', out.getvalue())
    self.assertIn('| omniglot |', out.getvalue())
    with open(os.path.join(workdir, train.RESULTS_JSON)) as f:
      fresh = json.load(f)
    self.assertEqual(_numbers(fresh),
                     _numbers(json.loads(json.dumps(self.results))))

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(self.config, b_steps=7)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(self._copy_of_run(), config)


class DataTest(parameterized.TestCase):

  def test_tasks_are_ten_class_images_of_the_right_shapes(self):
    config = configs.get_config('smoke')
    a, tasks = lwf_data.load_data(config, raw_dir=RAW_DIR)
    self.assertEqual(a.x_train.shape, (config.num_train_a, 784))
    self.assertEqual(a.x_test.shape, (config.num_test_a, 784))
    lo = -lwf_data._tasks.PIXEL_MEAN / lwf_data._tasks.PIXEL_STD
    hi = (1 - lwf_data._tasks.PIXEL_MEAN) / lwf_data._tasks.PIXEL_STD
    for name, b in tasks.items():
      with self.subTest(name):
        self.assertEqual(b.x_train.shape, (config.num_train_b, 784))
        self.assertEqual(b.x_test.shape, (config.num_test_b, 784))
        self.assertEqual(b.x_train.dtype, jnp.float32)
        self.assertEqual(b.y_train.dtype, jnp.int32)
        for x in (b.x_train, b.x_test):
          self.assertGreaterEqual(float(jnp.min(x)), lo - 1e-5)
          self.assertLessEqual(float(jnp.max(x)), hi + 1e-5)
        for y in (b.y_train, b.y_test):
          self.assertTrue(bool(jnp.all((y >= 0) & (y < 10))))
    # rotate_180's images are MNIST training images of the second half
    # (never A's pool), turned by 180 degrees; A's are of the first half.
    train_split, _ = lwf_data._image_splits('mnist', RAW_DIR, None)
    mnist = lwf_data.standardise(lwf_data._to_unit(train_split['image']))
    index = {row.tobytes(): i for i, row in enumerate(mnist)}
    turned = np.rot90(np.asarray(tasks['rotate_180'].x_train).reshape(
        -1, 28, 28), 2, axes=(1, 2)).reshape(-1, 784)
    found = [index.get(row.tobytes()) for row in turned]
    self.assertNotIn(None, found)
    self.assertTrue(all(i >= lwf_data.MNIST_HALF for i in found))
    found_a = [index.get(row.tobytes()) for row in np.asarray(a.x_train)]
    self.assertTrue(all(i is not None and i < lwf_data.MNIST_HALF
                        for i in found_a))

  def test_omniglot_alphabets(self):
    data = lwf_data.omniglot_alphabets(10, raw_dir=RAW_DIR, data_dir=None)
    # Ten alphabets; drawers 0-15 train, 16-19 test: 4 train per test.
    self.assertEqual(sorted(np.unique(data['train_label'])), list(range(10)))
    self.assertEqual(len(data['train_label']), 4 * len(data['test_label']))
    self.assertEqual(data['train_image'].shape[1:], (28, 28))
    for split in ('train', 'test'):
      images = data[f'{split}_image']
      self.assertGreaterEqual(images.min(), 0.0)
      self.assertLessEqual(images.max(), 1.0)
      # Strokes on a black background, like MNIST: mostly zeros.
      self.assertLess(float(images.mean()), 0.3)


class MeasuresTest(parameterized.TestCase):

  def test_features_are_the_hidden_layers_of_models_mlp(self):
    config = configs.get_config('smoke')
    model = steps.make_model(config)
    x = jax.random.normal(jax.random.key(0), (5, 784))
    params = model.init(jax.random.key(1), x)['params']
    body, head = steps.split_mlp(params, len(config.widths))
    np.testing.assert_allclose(
        steps.head_logits(head, steps.features(body, x)),
        model.apply({'params': params}, x), rtol=1e-6, atol=1e-6)
    centred = steps.centred_logits(head, steps.features(body, x))
    np.testing.assert_allclose(jnp.sum(centred, axis=-1), 0.0, atol=1e-5)

  def test_projected_energy_closed_form(self):
    eye = jnp.eye(6)
    svd = lambda s, rows: metacf.jacobian.JacobianSVD(
        s=jnp.asarray(s), vt=eye[jnp.asarray(rows)], u=jnp.zeros((4, len(s))))
    a = svd([2.0, 1.0], [0, 1])
    energy = observability.projected_energy
    self.assertAlmostEqual(float(energy(a, svd([3.0, 1.0], [0, 2]))),
                           4.0 / 5.0, places=6)
    self.assertAlmostEqual(float(energy(a, svd([1.0, 1.0], [1, 0]))),
                           1.0, places=6)
    self.assertEqual(float(energy(a, svd([1.0, 1.0], [2, 3]))), 0.0)
    # A direction half in B's span: cos^2 = 1/2.
    b = metacf.jacobian.JacobianSVD(
        s=jnp.ones(1), vt=(eye[0:1] + eye[2:3]) / jnp.sqrt(2.0),
        u=jnp.zeros((4, 1)))
    self.assertAlmostEqual(float(energy(a, b)), 0.4, places=6)

  def test_excitation_share_closed_form(self):
    w = jnp.asarray([3.0, 1.0])
    # Same sensitivity per example (B has twice the examples): 1/2.
    self.assertAlmostEqual(float(observability.excitation_share(
        jnp.asarray([1.0, 2.0]), jnp.asarray([2.0, 4.0]), w, 10, 20)), 0.5,
                           places=6)
    # First direction unseen by B, second seen as much as by A.
    self.assertAlmostEqual(float(observability.excitation_share(
        jnp.asarray([1.0, 1.0]), jnp.asarray([0.0, 1.0]), w, 1, 1)),
                           0.125, places=6)

  def test_a_observed_by_its_own_inputs(self):
    # The smoke config's shapes: the compiled functions of the smoke run.
    config = configs.get_config('smoke')
    model = steps.make_model(config)
    x = jax.random.normal(jax.random.key(0), (config.num_jac_a, 784))
    params = model.init(jax.random.key(1), x)['params']
    # Committed like the run's arrays, so the run's compilations are reused.
    params, x = jax.device_put((params, x), jax.devices()[0])
    body, head = steps.split_mlp(params, len(config.widths))
    svd_fn = observability._svd_fn(config.k_a, config.svd_method,
                                   config.oversampling,
                                   config.num_power_iters)
    svd_a = svd_fn(body, head, x, jax.random.key(2))
    # The same examples in another order: the same Jacobian row space.
    svd_b = svd_fn(body, head, x[::-1], jax.random.key(3))
    self.assertAlmostEqual(
        float(observability.projected_energy(svd_a, svd_b)), 1.0, places=4)
    # ||J v_i||^2 = s_i^2 for A's singular vectors: the two computations of
    # the Jacobian agree.
    sens = observability._sensitivities(body, head, x, svd_a.vt)
    np.testing.assert_allclose(sens, svd_a.s**2, rtol=1e-3)
    self.assertAlmostEqual(float(observability.excitation_share(
        sens, sens, svd_a.s**2, 8, 8)), 0.5, places=6)
