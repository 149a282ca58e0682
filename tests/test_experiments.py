"""Smoke tests of the experiments: real data, tiny models, two steps an epoch.

Each experiment's ``train_and_evaluate(smoke_config, workdir)`` runs end to
end on real MNIST (flax's examples run theirs on mocked tfds data; ours reads
the staged raw files, see ``tests/conftest.py``), and a run interrupted at an
epoch boundary resumes to the same numbers.
"""

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import tempfile
import zlib

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.common import loop
from experiments.common import models
from experiments.common import utils
from experiments.distill_mnist import configs
from experiments.distill_mnist import main as distill_main
from experiments.distill_mnist import train as distill_train


DISTILL_MODELS = ('teacher', 'student_hard', 'student_kd_T1', 'student_kd_T4',
                  'student_kd_T20', 'born_again')


def _run_distill(workdir, config=None):
  config = configs.get_config('smoke') if config is None else config
  return distill_train.train_and_evaluate(config, str(workdir),
                                         raw_dir=RAW_DIR)


def _numbers(results):
  """What a resumed run must reproduce exactly (not timings or dates)."""
  return {name: (r['test_errors'],
                 [(h['epoch'], h['train_loss'], h['test_errors'])
                  for h in r['history']])
          for name, r in results['models'].items()}


class DistillMnistTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    return _run_distill(workdir)

  def test_results_have_every_model_and_valid_counts(self):
    results = self.results
    config = configs.get_config('smoke')
    self.assertEqual(tuple(results['models']), DISTILL_MODELS)
    self.assertEqual(results['num_test'], config.num_test)
    self.assertEqual(results['num_train'], config.num_train)
    for name, record in results['models'].items():
      with self.subTest(name):
        self.assertIsInstance(record['test_errors'], int)
        self.assertBetween(record['test_errors'], 0, results['num_test'])
        self.assertAlmostEqual(record['test_accuracy'],
                               1 - record['test_errors'] / results['num_test'])
        self.assertGreater(record['train_time_s'], 0)
        self.assertEqual(record['steps'],
                         record['epochs'] * config.max_steps_per_epoch)
        self.assertEqual([h['epoch'] for h in record['history']],
                         list(range(1, record['epochs'] + 1)))
        for h in record['history']:
          self.assertTrue(math.isfinite(h['train_loss']))
          self.assertGreaterEqual(h['train_loss'], 0)
          self.assertBetween(h['test_errors'], 0, results['num_test'])
        # The final evaluation is the last epoch's.
        self.assertEqual(record['history'][-1]['test_errors'],
                         record['test_errors'])
    self.assertEqual(results['models']['student_kd_T20']['temperature'], 20.0)
    self.assertIsNone(results['models']['student_hard']['temperature'])
    self.assertIsInstance(results['born_again_beats_teacher'], bool)

  def test_paper_numbers_are_attached(self):
    paper = {n: r['paper_test_errors']
             for n, r in self.results['models'].items()}
    self.assertEqual(paper['teacher'], 67)
    self.assertEqual(paper['student_hard'], 146)
    self.assertEqual(paper['student_kd_T20'], 74)
    self.assertIsNone(paper['born_again'])

  def test_writes_json_png_and_checkpoints(self):
    with open(os.path.join(self.workdir, distill_train.RESULTS_JSON)) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(self.results)))
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, written)
    self.assertEqual(written['jax_version'], jax.__version__)
    self.assertEqual(written['config']['teacher_widths'], [16, 16])
    with open(os.path.join(self.workdir, distill_train.RESULTS_PNG),
              'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
    for name in DISTILL_MODELS:
      steps = sorted(int(s) for s in os.listdir(
          os.path.join(self.workdir, 'checkpoints', name)) if s.isdigit())
      self.assertEqual(steps, [1, 2], name)

  @parameterized.named_parameters(
      ('killed_in_teacher', {'teacher': 1}),
      ('killed_in_third_student', {
          'teacher': 2, 'student_hard': 2, 'student_kd_T1': 2,
          'student_kd_T4': 1}),
  )
  def test_resume_gives_identical_results(self, keep):
    workdir = self._tempdir()
    for name, step in keep.items():  # The checkpoints a killed run leaves.
      shutil.copytree(
          os.path.join(self.workdir, 'checkpoints', name, str(step)),
          os.path.join(workdir, 'checkpoints', name, str(step)))
    resumed = _run_distill(workdir)
    self.assertEqual(_numbers(resumed), _numbers(self.results))

  def test_rerun_of_finished_run_restores_everything(self):
    again = _run_distill(self._copy_of_run())
    self.assertEqual(_numbers(again), _numbers(self.results))
    for name in DISTILL_MODELS:  # Nothing retrained: same recorded times.
      self.assertEqual(again['models'][name]['train_time_s'],
                       self.results['models'][name]['train_time_s'])

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(configs.get_config('smoke'),
                                 learning_rate=0.5)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run_distill(self._copy_of_run(), config)

  def test_main_prints_table(self):
    argv = ['--config=smoke', f'--workdir={self._copy_of_run()}']
    if RAW_DIR is not None:
      argv.append(f'--raw_dir={RAW_DIR}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      distill_main.main(argv)
    out = out.getvalue()
    self.assertIn('| model | test errors', out)
    errors = self.results['models']['student_kd_T20']['test_errors']
    self.assertIn(f'| student_kd_T20 | {errors} | 74 |', out)


class ConfigsTest(parameterized.TestCase):

  def test_default_follows_the_paper(self):
    config = configs.get_config('default')
    self.assertEqual(config.teacher_widths, (1200, 1200))
    self.assertEqual(config.student_widths, (800, 800))
    self.assertEqual(config.teacher_jitter, 2)
    self.assertIn(20.0, config.temperatures)
    self.assertBetween(config.alpha, 0.5, 1.0)  # The hard term weighs less.

  def test_unknown_name_raises(self):
    with self.assertRaisesRegex(ValueError, 'name must be one of'):
      configs.get_config('nope')

  def test_configs_are_frozen(self):
    config = configs.get_config('smoke')
    with self.assertRaises(dataclasses.FrozenInstanceError):
      config.seed = 1


class UtilsTest(parameterized.TestCase):

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path)
    return path

  def test_batches_cover_a_permutation_and_drop_remainder(self):
    arrays = {'x': np.arange(10), 'y': np.arange(10) * 2}
    got = list(utils.batches(arrays, 3, rng=np.random.default_rng(0)))
    self.assertLen(got, 3)
    xs = np.concatenate([b['x'] for b in got])
    self.assertLen(set(xs.tolist()), 9)
    for b in got:
      np.testing.assert_array_equal(b['y'], b['x'] * 2)
      self.assertEqual(b['x'].shape, (3,))

  def test_batches_same_key_same_order(self):
    arrays = {'x': np.arange(100)}

    def order(key):
      return np.concatenate([b['x'] for b in utils.batches(
          arrays, 10, rng=utils.numpy_rng(key))])

    np.testing.assert_array_equal(order(jax.random.key(3)),
                                  order(jax.random.key(3)))
    self.assertFalse(np.array_equal(order(jax.random.key(3)),
                                    order(jax.random.key(4))))

  def test_padded_batches_mask_padding(self):
    arrays = {'x': np.arange(7, dtype=np.float32)}
    got = list(utils.padded_batches(arrays, 4))
    self.assertEqual([b['x'].shape for b, _ in got], [(4,), (4,)])
    np.testing.assert_array_equal(got[1][1], [True, True, True, False])
    xs = np.concatenate([b['x'][m] for b, m in got])
    np.testing.assert_array_equal(xs, arrays['x'])

  def test_batches_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, 'one leading dimension'):
      list(utils.batches({'x': np.zeros(3), 'y': np.zeros(4)}, 2))
    with self.assertRaisesRegex(ValueError, 'batch_size must be >= 1'):
      list(utils.batches({'x': np.zeros(3)}, 0))

  def test_random_translate_moves_whole_images(self):
    images = np.zeros((512, 12, 12, 1), np.uint8)
    images[:, 4:8, 4:8] = 7  # A block at least 2 px from every edge.
    shifted = utils.random_translate(jax.random.key(0), images, 2)
    self.assertEqual(shifted.shape, images.shape)
    self.assertEqual(shifted.dtype, jnp.uint8)
    # Nothing falls off the image, so every pixel survives, just moved.
    np.testing.assert_array_equal(np.sum(np.asarray(shifted), axis=(1, 2, 3)),
                                  np.sum(images, axis=(1, 2, 3)))
    offsets = {tuple(np.argwhere(np.asarray(s)[..., 0])[0] - 4)
               for s in shifted}
    self.assertEqual(offsets, {(dy, dx) for dy in range(-2, 3)
                               for dx in range(-2, 3)})
    np.testing.assert_array_equal(
        utils.random_translate(jax.random.key(0), images, 0), images)

  def test_checkpointer_round_trip(self):
    directory = os.path.join(self._tempdir(), 'ckpt')
    state = {'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
             'count': jnp.zeros([], jnp.int32)}
    with utils.Checkpointer(directory, max_to_keep=2) as ckpt:
      self.assertIsNone(ckpt.latest_step)
      for step in (1, 2, 3):
        ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state),
                  {'step': step})
      self.assertEqual(ckpt.all_steps(), [2, 3])
    with utils.Checkpointer(directory) as ckpt:
      restored, meta = ckpt.restore(state)
    self.assertEqual(meta, {'step': 3})
    np.testing.assert_array_equal(restored['w'], state['w'] + 3)
    self.assertEqual(restored['count'].dtype, jnp.int32)

  def test_checkpointer_restore_without_checkpoint_raises(self):
    with utils.Checkpointer(self._tempdir()) as ckpt:
      with self.assertRaises(FileNotFoundError):
        ckpt.restore({'w': jnp.zeros(2)})

  def test_write_json_and_run_info(self):
    path = os.path.join(self._tempdir(), 'sub', 'r.json')
    utils.write_json(path, {'a': np.int32(3), 'b': (1.5, 2),
                            'c': np.arange(2)})
    with open(path) as f:
      self.assertEqual(json.load(f), {'a': 3, 'b': [1.5, 2], 'c': [0, 1]})
    info = utils.run_info()
    self.assertEqual(info['jax_version'], jax.__version__)
    self.assertTrue(info['device'].startswith(jax.default_backend()))

  def test_name_key_is_the_studies_derivations(self):
    key = jax.random.key(0)
    data = jax.random.key_data
    # 'student_hard' has a CRC32 >= 2**31: the two derivations differ there.
    self.assertGreaterEqual(zlib.crc32(b'student_hard'), 2**31)
    for name in ('test', 'student_hard'):
      crc = zlib.crc32(name.encode())
      np.testing.assert_array_equal(
          data(utils.name_key(key, name, full_crc32=True)),
          data(jax.random.fold_in(key, crc)))
      np.testing.assert_array_equal(
          data(utils.name_key(key, name)),
          data(jax.random.fold_in(key, crc & 0x7FFFFFFF)))
    # Parts in order; ints as themselves; every key of a batch alike.
    keys = jax.vmap(jax.random.key)(jnp.arange(3, dtype=jnp.uint32))
    expected = keys
    for value in (zlib.crc32(b'train') & 0x7FFFFFFF, 4):
      expected = jax.vmap(lambda k, v=value: jax.random.fold_in(k, v))(
          expected)
    got = utils.name_key(keys, 'train', 4)
    self.assertEqual(got.shape, (3,))
    np.testing.assert_array_equal(data(got), data(expected))
    self.assertIs(utils.name_key(key), key)
    with self.assertRaisesRegex(ValueError, r'int parts must be in'):
      utils.name_key(key, -1)

  def test_optimizer_update_runs_adam_under_strict_promotion(self):
    params = {'w': jnp.arange(3, dtype=jnp.float32)}
    grads = {'w': jnp.ones(3, jnp.float32)}
    adam = optax.adam(optax.cosine_decay_schedule(0.1, 10))
    state = adam.init(params)
    with jax.numpy_dtype_promotion('strict'):
      with self.assertRaises(jax.dtypes.TypePromotionError):
        jax.jit(adam.update)(grads, state, params)
      got = jax.jit(functools.partial(utils.optimizer_update, adam))(
          grads, state, params)
    with jax.numpy_dtype_promotion('standard'):
      expected = jax.jit(adam.update)(grads, state, params)
    chex.assert_trees_all_equal(got, expected)


class _Killed(Exception):
  pass


class LoopTest(parameterized.TestCase):
  """``loop.resumable_loop`` and ``loop.resumable_records`` on a toy run."""

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path)
    return path

  def _run(self, directory, *, total=6, recipe=None, **kwargs):
    meta = {'done': 0, 'history': []}

    def step(state, done):
      # Two units per step; each adds its number, so the order shows.
      state = {'w': state['w'] + jnp.float32(done) * jnp.ones(2)}
      meta['done'] = done + 2
      meta['history'].append(float(state['w'][0]))
      return state, f'w {float(state["w"][0]):g}'

    return loop.resumable_loop(
        directory, name='toy', unit='unit', total=total, stride=2,
        init=lambda: {'w': jnp.zeros(2, jnp.float32)}, step=step,
        recipe={'lr': 1.0} if recipe is None else recipe, meta=meta,
        progress_bar=False, **kwargs)

  def test_fresh_run_checkpoints_and_returns_its_record(self):
    directory = self._tempdir()
    state, meta, stopped = self._run(directory, checkpoint_every=4,
                                     max_to_keep=None)
    np.testing.assert_array_equal(state['w'], [6.0, 6.0])
    self.assertEqual(meta, {'done': 6, 'history': [0.0, 2.0, 6.0]})
    self.assertFalse(stopped)
    with utils.Checkpointer(directory) as ckpt:
      self.assertEqual(ckpt.all_steps(), [4, 6])  # Every 4, and the end.
      _, saved = ckpt.restore(state)
    self.assertEqual(saved, {**meta, 'recipe': {'lr': 1.0}})

  def test_killed_run_resumes_to_the_same_numbers(self):
    full = self._run(self._tempdir())
    directory = self._tempdir()

    def kill(done):
      if done == 2:
        raise _Killed()

    with self.assertRaises(_Killed):
      self._run(directory, on_checkpoint=kill)
    started = []
    resumed = self._run(directory, start=started.append)
    self.assertLen(started, 1)
    np.testing.assert_array_equal(resumed.state['w'], full.state['w'])
    self.assertEqual(resumed.meta, full.meta)
    # A finished run restores everything and runs nothing.
    again = self._run(directory, start=started.append)
    self.assertLen(started, 1)
    self.assertEqual(again.meta, full.meta)

  def test_time_budget_stops_after_one_step_and_checkpoints(self):
    directory = self._tempdir()
    _, meta, stopped = self._run(directory, time_budget_s=1e-9,
                                 checkpoint_every=6)
    self.assertTrue(stopped)
    self.assertEqual(meta['done'], 2)
    with utils.Checkpointer(directory) as ckpt:
      self.assertEqual(ckpt.all_steps(), [2])
    self.assertEqual(self._run(directory).meta, self._run(
        self._tempdir()).meta)

  def test_other_recipe_and_bad_stride_raise(self):
    directory = self._tempdir()
    self._run(directory)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      self._run(directory, recipe={'lr': 2.0})
    with self.assertRaisesRegex(ValueError, 'multiples of stride'):
      self._run(self._tempdir(), total=5)

  def test_records_are_computed_once_and_checked(self):
    directory = self._tempdir()
    computed = []

    def records(recipe):
      return loop.resumable_records(
          ['a', 'b'], path=lambda n: os.path.join(directory, f'{n}.json'),
          recipe=lambda n: {'item': n, 'v': recipe},
          compute=lambda n: computed.append(n) or {'name': n, 'x': (1, 2)},
          summary=lambda r: r['name'], desc='toy', progress_bar=False)

    first = records(1)
    self.assertEqual(first, [{'name': 'a', 'x': [1, 2]},
                             {'name': 'b', 'x': [1, 2]}])
    os.remove(os.path.join(directory, 'b.json'))
    self.assertEqual(records(1), first)
    self.assertEqual(computed, ['a', 'b', 'b'])
    with open(os.path.join(directory, 'a.json')) as f:
      self.assertEqual(json.load(f), {'recipe': {'item': 'a', 'v': 1},
                                      'record': first[0]})
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      records(2)

  def test_parallel_records_match_sequential_in_item_order(self):
    items = [f'i{k}' for k in range(7)]
    f = jax.jit(lambda v: jnp.cumsum(jnp.arange(1000.0) * v)[-1])
    out = {}
    for workers in (1, 3):
      directory = self._tempdir()
      out[workers] = loop.resumable_records(
          items, path=lambda n, d=directory: os.path.join(d, f'{n}.json'),
          recipe=lambda n: {'item': n},
          compute=lambda n: {'name': n, 'v': float(f(float(n[1:])))},
          summary=lambda r: r['name'], desc='toy', progress_bar=False,
          workers=workers)
      self.assertLen(os.listdir(directory), len(items))
    self.assertEqual([r['name'] for r in out[3]], items)
    self.assertEqual(out[3], out[1])

  def test_parallel_records_raise_the_first_error(self):
    def compute(n):
      if n == 'bad':
        raise FloatingPointError('diverged')
      return {'name': n}
    with self.assertRaisesRegex(FloatingPointError, 'diverged'):
      loop.resumable_records(
          ['a', 'bad', 'c'],
          path=lambda n: os.path.join(self._tempdir(), f'{n}.json'),
          recipe=lambda n: {}, compute=compute, summary=lambda r: r['name'],
          desc='toy', progress_bar=False, workers=2)


class ModelsTest(parameterized.TestCase):

  def test_mlp_shapes_and_dropout(self):
    model = models.MLP(widths=(32, 16), dropout_rate=0.5)
    x = jnp.ones((4, 28, 28, 1))
    params = jax.jit(model.init)(jax.random.key(0), x)['params']
    self.assertEqual(params['Dense_0']['kernel'].shape, (784, 32))
    out = model.apply({'params': params}, x)
    self.assertEqual(out.shape, (4, 10))
    self.assertEqual(out.dtype, jnp.float32)
    # Deterministic without train=True; dropout keyed with it.
    np.testing.assert_array_equal(out, model.apply({'params': params}, x))
    a, b = (model.apply({'params': params}, x, train=True,
                        rngs={'dropout': jax.random.key(k)}) for k in (1, 2))
    self.assertFalse(np.allclose(a, b))
