"""The Omniglot MAML experiment: smoke run, files, resume, budget, pieces.

``train_and_evaluate(smoke_config, workdir)`` runs once for the class on real
Omniglot (5-way 1-shot, 20 iterations of 4 tasks, Conv-4 with 8 channels);
most of its time is compiling, which happens once per process. A run
interrupted after a checkpoint, or stopped by its time budget, resumes to
bitwise the same numbers; a fresh run with the same seed gives them too.
20 iterations are far too few to learn anything, so accuracies are only
checked to be valid.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import zipfile

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.maml_omniglot import configs
from experiments.maml_omniglot import data
from experiments.maml_omniglot import main as omniglot_main
from experiments.maml_omniglot import report
from experiments.maml_omniglot import train

NAME = '5way1shot'


def _run(workdir, config=None):
  config = configs.get_config('smoke') if config is None else config
  return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR)


def _numbers(results):
  """What a resumed run must reproduce exactly (not timings or dates)."""
  return {name: (r['history'], r['curve'], r['final'], r['iterations'])
          for name, r in results['settings'].items()}


class MamlOmniglotSmokeTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return _run(workdir, cls.config)

  def test_results_are_complete_and_valid(self):
    config, results = self.config, self.results
    self.assertEqual(list(results['settings']), [NAME])
    self.assertEqual(results['data'], {
        'num_characters': 1623, 'num_train_characters': 1200,
        'num_test_characters': 423, 'image_size': 28})
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, results)
    r = results['settings'][NAME]
    self.assertEqual((r['ways'], r['shots'], r['num_query']), (5, 1, 1))
    self.assertEqual((r['paper_accuracy'], r['paper_ci95'],
                      r['paper_eval_steps']), (0.987, 0.004, 3))
    self.assertEqual(r['iterations'], config.num_iterations)
    self.assertTrue(r['complete'])
    self.assertFalse(r['stopped_by_time_budget'])
    self.assertEqual(r['sessions'], 1)
    self.assertEqual(r['devices'], [results['device']])
    self.assertEqual([h['iteration'] for h in r['history']], [5, 10, 15, 20])
    self.assertTrue(all(math.isfinite(h['loss']) and h['loss'] > 0
                        for h in r['history']))
    self.assertEqual([p['iteration'] for p in r['curve']], [0, 10, 20])
    self.assertEqual(r['final']['iteration'], 20)
    self.assertEqual(r['final']['num_tasks'], config.num_test_tasks)
    for point in r['curve'] + [r['final']]:
      self.assertLen(point['accuracy'], config.max_eval_steps + 1)
      self.assertLen(point['ci95'], config.max_eval_steps + 1)
      for acc, ci in zip(point['accuracy'], point['ci95']):
        self.assertTrue(math.isfinite(acc) and 0.0 <= acc <= 1.0, acc)
        self.assertTrue(math.isfinite(ci) and 0.0 <= ci <= 1.0, ci)
    self.assertEqual(r['curve'][0]['num_tasks'], config.num_curve_tasks)
    self.assertEqual(r['accuracy'], r['final']['accuracy'][3])
    self.assertEqual(r['ci95'], r['final']['ci95'][3])
    for key in ('train_time_s', 'compile_s', 'eval_time_s', 'wall_time_s'):
      self.assertGreater(r[key], 0, key)

  def test_files_written(self):
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(self.results)))
    with open(os.path.join(self.workdir, train.RESULTS_PNG), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
    steps = sorted(os.listdir(os.path.join(self.workdir, 'checkpoints',
                                           NAME)), key=int)
    self.assertEqual(steps, ['10', '20'])

  def test_fresh_run_with_same_seed_gives_identical_results(self):
    self.assertEqual(_numbers(_run(self._tempdir())), _numbers(self.results))

  def test_resume_gives_identical_results(self):
    workdir = self._tempdir()  # The checkpoint a run killed after 10 leaves.
    shutil.copytree(os.path.join(self.workdir, 'checkpoints', NAME, '10'),
                    os.path.join(workdir, 'checkpoints', NAME, '10'))
    resumed = _run(workdir)
    self.assertEqual(_numbers(resumed), _numbers(self.results))
    self.assertEqual(resumed['settings'][NAME]['sessions'], 2)

  def test_time_budget_stops_checkpoints_and_resumes_identically(self):
    workdir = self._tempdir()
    # Already spent before the second chunk: exactly one chunk runs.
    config = dataclasses.replace(self.config, time_budget_s=1e-9)
    partial = _run(workdir, config)['settings'][NAME]
    self.assertTrue(partial['stopped_by_time_budget'])
    self.assertFalse(partial['complete'])
    self.assertEqual(partial['iterations'], config.chunk_size)
    self.assertEqual(partial['final']['iteration'], config.chunk_size)
    self.assertEqual(os.listdir(os.path.join(workdir, 'checkpoints', NAME)),
                     [str(config.chunk_size)])
    full = self.results['settings'][NAME]
    self.assertEqual(partial['history'], full['history'][:1])
    self.assertEqual(partial['curve'], full['curve'][:1])
    resumed = _run(workdir)
    self.assertEqual(_numbers(resumed), _numbers(self.results))

  def test_rerun_of_finished_run_restores_everything(self):
    again = _run(self._copy_of_run())
    self.assertEqual(_numbers(again), _numbers(self.results))
    for key in ('train_time_s', 'compile_s', 'eval_time_s', 'sessions'):
      self.assertEqual(again['settings'][NAME][key],
                       self.results['settings'][NAME][key], key)

  def test_other_seed_gives_other_numbers(self):
    config = dataclasses.replace(self.config, seed=1, num_iterations=5,
                                 checkpoint_every=5, eval_schedule=((5, 5),))
    other = _run(self._tempdir(), config)['settings'][NAME]
    self.assertNotEqual(other['history'][0],
                        self.results['settings'][NAME]['history'][0])

  def test_session_of_another_setting_keeps_earlier_results(self):
    # `--settings=...` sessions of different settings share a workdir: the
    # results of the settings not trained now are carried over unchanged.
    # Training a setting other than NAME would compile its own functions
    # (most of a minute), so the earlier session is the class's run relabelled
    # as one of another setting (its record under that name, its checkpoints
    # in that setting's folder), and this session trains NAME (compiled
    # already) for 5 iterations beside it.
    earlier = dataclasses.replace(self.config.settings[0], shots=2)
    workdir = self._copy_of_run()
    checkpoints = os.path.join(workdir, 'checkpoints')
    os.rename(os.path.join(checkpoints, NAME),
              os.path.join(checkpoints, earlier.name))
    path = os.path.join(workdir, train.RESULTS_JSON)
    with open(path) as f:
      written = json.load(f)
    record = {**written['settings'].pop(NAME), 'shots': earlier.shots,
              'name': earlier.name}
    written['settings'][earlier.name] = record
    with open(path, 'w') as f:
      json.dump(written, f)
    config = dataclasses.replace(self.config, num_iterations=5,
                                 checkpoint_every=5, eval_schedule=((5, 5),))
    results = _run(workdir, config)
    self.assertEqual(list(results['settings']), [NAME, earlier.name])
    self.assertEqual(results['settings_from_earlier_sessions'],
                     [earlier.name])
    self.assertEqual(results['settings'][earlier.name], record)
    self.assertEqual(results['settings'][NAME]['iterations'], 5)
    self.assertEqual(sorted(os.listdir(checkpoints)), [NAME, earlier.name])
    with open(path) as f:
      self.assertEqual(json.load(f)['settings'][earlier.name], record)

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(self.config, outer_lr=0.5)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(self._copy_of_run(), config)

  def test_main_prints_table(self):
    argv = ['--config=smoke', f'--workdir={self._copy_of_run()}',
            f'--settings={NAME}', '--time_budget_s=600']
    if RAW_DIR is not None:
      argv.append(f'--raw_dir={RAW_DIR}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      omniglot_main.main(argv)
    out = out.getvalue()
    self.assertIn('| setting | paper | ours | test steps | iterations |', out)
    ours = report.format_accuracy(self.results['settings'][NAME])
    self.assertIn(f'| {NAME} | 98.7 ± 0.4% | {ours} | 3 | 20 |', out)


class PiecesTest(parameterized.TestCase):

  def test_resize_is_what_pillow_gives_the_authors_script(self):
    # Their resize_images.py asks Pillow for LANCZOS on the 1-bit PNGs, for
    # which Pillow uses nearest neighbour.
    path = os.path.join(RAW_DIR, 'omniglot', 'images_evaluation.zip')
    with zipfile.ZipFile(path) as zf:
      names = [n for n in zf.namelist() if n.endswith('.png')][::1000]
      for name in names:
        with Image.open(io.BytesIO(zf.read(name))) as img:
          self.assertEqual(img.mode, '1')
          pillow = np.asarray(img.resize((28, 28), Image.Resampling.LANCZOS)
                              .convert('L'))
          ours = data.resize_nearest(np.asarray(img.convert('L')), 28)
        np.testing.assert_array_equal(ours, pillow, err_msg=name)

  def test_load_omniglot_all_characters_inverted(self):
    images = data.load_omniglot(28, RAW_DIR)
    self.assertEqual(images.shape, (1623, 20, 28 * 28))
    self.assertEqual(images.dtype, np.uint8)
    counts = np.bincount(images.ravel(), minlength=256)
    self.assertEqual(counts[0] + counts[255], images.size)  # Binary.
    self.assertBetween(counts[255] / images.size, 0.05, 0.3)  # Strokes.

  def test_rotation_tables_rotate(self):
    image = np.arange(16).reshape(4, 4)
    for r, table in enumerate(data.rotation_tables(4)):
      np.testing.assert_array_equal(image.ravel()[table],
                                    np.rot90(image, r).ravel())

  def test_sample_task_takes_rotated_drawings_of_distinct_characters(self):
    images = data.load_omniglot(28, RAW_DIR)[1200:]
    # Every drawing at every rotation, to find the sampled images among.
    where = {}
    for rotation, table in enumerate(data.rotation_tables(28)):
      for index, pixels in enumerate(images.reshape(-1, 28 * 28)[:, table]):
        where.setdefault(pixels.tobytes(), (index // 20, index % 20, rotation))
    ways, shots, queries = 5, 2, 3
    sample = jax.jit(lambda k: data.sample_task(
        k, jnp.asarray(images), ways=ways, shots=shots, num_query=queries,
        rotations=True))
    task = sample(jax.random.key(0))
    self.assertEqual(task.support_x.shape, (ways * shots, 28, 28, 1))
    self.assertEqual(task.query_x.shape, (ways * queries, 28, 28, 1))
    self.assertEqual(task.support_x.dtype, jnp.float32)
    np.testing.assert_array_equal(task.support_y,
                                  np.repeat(np.arange(ways), shots))
    np.testing.assert_array_equal(task.query_y,
                                  np.repeat(np.arange(ways), queries))
    found = {}  # class -> [(character, drawer, rotation)]
    for x, y in [*zip(task.support_x, task.support_y),
                 *zip(task.query_x, task.query_y)]:
      pixels = np.round(np.asarray(x).ravel() * 255).astype(np.uint8)
      self.assertIn(pixels.tobytes(), where)
      found.setdefault(int(y), []).append(where[pixels.tobytes()])
    for drawings in found.values():
      self.assertLen({(c, r) for c, _, r in drawings}, 1)  # One class.
      self.assertLen({d for _, d, _ in drawings}, shots + queries)
    self.assertLen({drawings[0][0] for drawings in found.values()}, ways)
    self.assertNotEqual({drawings[0][2] for drawings in found.values()}, {0})
    other = sample(jax.random.key(1))
    self.assertFalse(np.array_equal(other.support_x, task.support_x))

  def test_curve_iterations_of_default_config(self):
    its = train.curve_iterations(configs.get_config('default'))
    self.assertEqual(its[:12], [0, 100, 200, 300, 400, 500, 600, 700, 800,
                                900, 1000, 1500])
    self.assertEqual(its[-2:], [58_000, 60_000])
    self.assertIn(10_000, its)
    self.assertNotIn(10_500, its)

  def test_default_config_is_the_papers(self):
    config = configs.get_config('default')
    self.assertEqual(config.num_iterations, 60_000)
    self.assertEqual(config.outer_lr, 1e-3)
    self.assertEqual(
        [(s.name, s.meta_batch_size, s.inner_lr, s.num_inner_steps,
          s.paper_eval_steps, s.paper_accuracy) for s in config.settings],
        [('5way1shot', 32, 0.4, 1, 3, 0.987),
         ('5way5shot', 32, 0.4, 1, 3, 0.999),
         ('20way1shot', 16, 0.1, 5, 5, 0.958),
         ('20way5shot', 16, 0.1, 5, 5, 0.989)])
    train.check_config(config)

  @parameterized.named_parameters(
      ('iterations', {'num_iterations': 12}, 'num_iterations'),
      ('checkpoints', {'checkpoint_every': 7}, 'checkpoint_every'),
      ('schedule', {'eval_schedule': ((20, 10), (10, 5))}, 'eval_schedule'),
      ('test_tasks', {'num_test_tasks': 15}, 'num_test_tasks'),
      ('curve_tasks', {'num_curve_tasks': 30}, 'num_curve_tasks'),
      ('eval_steps', {'max_eval_steps': 2}, 'max_eval_steps'),
      ('query', {'num_query': 20}, 'num_query'),
      ('characters', {'num_train_characters': 1623}, 'num_train_characters'),
      ('budget', {'time_budget_s': 0.0}, 'time_budget_s'),
      ('no_settings', {'settings': ()}, 'settings'))
  def test_bad_config_raises(self, changes, message):
    config = dataclasses.replace(configs.get_config('smoke'), **changes)
    with self.assertRaisesRegex(ValueError, message):
      train.check_config(config)

  def test_main_selects_settings_and_budget(self):
    config = omniglot_main.select(configs.get_config('default'),
                                  '20way1shot,5way1shot', 1500.0)
    self.assertEqual([s.name for s in config.settings],
                     ['20way1shot', '5way1shot'])
    self.assertEqual(config.time_budget_s, 1500.0)
    with self.assertRaisesRegex(ValueError, '--settings must name'):
      omniglot_main.select(config, '3way1shot', None)
