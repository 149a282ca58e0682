"""Tests of ``experiments/forgetting`` (Split MNIST, class-incremental).

``train_and_evaluate(smoke_config, workdir)`` runs once on real MNIST (a
small subset, two seeds) for a subset of the strategies that covers every
code path; the tests check the accuracy matrices, the files written, that naive
fine-tuning forgets, and that a run killed after a task resumes to bitwise
the same numbers. The default protocol's ranking (replay beats naive
fine-tuning) is a ``slow`` test.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.forgetting import _plots
from experiments.forgetting import configs
from experiments.forgetting import main as forgetting_main
from experiments.forgetting import steps
from experiments.forgetting import train
import metacf


# Each strategy compiles its own training chunk (seconds each on CPU), so the
# smoke run takes one strategy per code path: 'class_balanced' shares ER's
# loss (and 'derpp' and 'er_ace' its reservoir buffer); plain ER runs in the
# slow test.
STRATEGIES = ('naive', 'joint', 'derpp_200', 'lwf', 'class_balanced_200',
              'er_ace_200', 'icarl_200')


def _smoke_config() -> configs.Config:
  return train.select_strategies(configs.get_config('smoke'), STRATEGIES)


def _run(workdir, config=None, **kwargs):
  config = _smoke_config() if config is None else config
  return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR,
                                  **kwargs)


def _numbers(results):
  """What a resumed or repeated run must reproduce exactly."""
  out = {}
  for scenario_name, scenario in results['scenarios'].items():
    for name, s in scenario['strategies'].items():
      out[scenario_name, name] = (
          s['class_il']['accuracy_matrix_per_seed'],
          s['task_il']['accuracy_matrix_per_seed'],
          s['curve'], s['mean_loss_per_chunk'])
  return out


class _Killed(Exception):
  """Raised from on_task_end to stop a run as a kill would."""


class ForgettingExperimentTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = _smoke_config()
    return _run(workdir, cls.config)

  def _strategies(self):
    for scenario_name, scenario in self.results['scenarios'].items():
      for name, s in scenario['strategies'].items():
        yield scenario_name, scenario, name, s

  def test_runs_every_scenario_and_strategy(self):
    scenarios = self.results['scenarios']
    self.assertEqual(list(scenarios), ['one_class_at_a_time', 'split_mnist'])
    self.assertEqual(list(scenarios['one_class_at_a_time']['strategies']),
                     ['naive', 'joint'])
    self.assertEqual(list(scenarios['split_mnist']['strategies']),
                     list(STRATEGIES))
    self.assertEqual(scenarios['one_class_at_a_time']['num_tasks'], 10)
    self.assertEqual(scenarios['split_mnist']['num_tasks'], 5)

  def test_accuracy_matrices_are_square_accuracies(self):
    num_seeds = len(self.config.seeds)
    for scenario_name, scenario, name, s in self._strategies():
      t = scenario['num_tasks']
      for setting in ('class_il', 'task_il'):
        with self.subTest(f'{scenario_name}/{name}/{setting}'):
          m = s[setting]
          r = np.asarray(m['accuracy_matrix'])
          per_seed = np.asarray(m['accuracy_matrix_per_seed'])
          self.assertEqual(r.shape, (t, t))
          self.assertEqual(per_seed.shape, (num_seeds, t, t))
          self.assertTrue(np.all((per_seed >= 0) & (per_seed <= 1)))
          np.testing.assert_allclose(r, per_seed.mean(axis=0), rtol=1e-6)
          for key in ('acc', 'bwt', 'forgetting_max', 'forgetting_diagonal'):
            self.assertTrue(math.isfinite(m[key]), key)
            self.assertLen(m[f'{key}_per_seed'], num_seeds)
          np.testing.assert_allclose(m['acc'], r[-1].mean(), rtol=1e-5)
          # The max reference is never below the diagonal one.
          self.assertGreaterEqual(m['forgetting_max'] + 1e-6,
                                  m['forgetting_diagonal'])
      self.assertTrue(np.all(np.isfinite(s['mean_loss_per_chunk'])))

  def test_task_il_is_at_least_class_il(self):
    # Masking the logits to the example's task can only fix mistakes.
    for scenario_name, _, name, s in self._strategies():
      with self.subTest(f'{scenario_name}/{name}'):
        class_il = np.asarray(s['class_il']['accuracy_matrix_per_seed'])
        task_il = np.asarray(s['task_il']['accuracy_matrix_per_seed'])
        self.assertTrue(np.all(task_il >= class_il))
    one_class = self.results['scenarios']['one_class_at_a_time']
    for s in one_class['strategies'].values():  # One class: trivially 1.
      np.testing.assert_allclose(s['task_il']['accuracy_matrix'], 1.0,
                                 rtol=1e-6)

  def test_curves_cover_training(self):
    for scenario_name, scenario, name, s in self._strategies():
      with self.subTest(f'{scenario_name}/{name}'):
        curve = s['curve']
        self.assertEqual(curve['step'][0], 0)
        self.assertEqual(curve['step'][-1], s['task_boundaries'][-1])
        self.assertTrue(np.all(np.diff(curve['step']) > 0))
        self.assertEqual(np.asarray(curve['class_il']).shape,
                         (len(curve['step']), scenario['num_tasks']))
        self.assertEqual(sorted(set(curve['task'])),
                         list(range(scenario['num_tasks'])))

  def test_naive_fine_tuning_forgets_and_joint_does_not(self):
    one_class = self.results['scenarios']['one_class_at_a_time']['strategies']
    naive = np.asarray(one_class['naive']['class_il']['accuracy_matrix'])
    # After the last one-digit task only the last digit is recognised...
    self.assertGreater(naive[-1, -1], 0.9)
    self.assertLess(naive[-1, :-1].max(), 0.05)
    # ... though each digit was learnt when it was the current task.
    self.assertGreater(np.diagonal(naive).min(), 0.9)
    self.assertGreater(one_class['naive']['class_il']['forgetting_max'], 0.9)
    # The same examples, shuffled, are learnt together.
    self.assertGreater(one_class['joint']['class_il']['acc'],
                       one_class['naive']['class_il']['acc'] + 0.3)
    split = self.results['scenarios']['split_mnist']['strategies']
    self.assertGreater(split['naive']['class_il']['forgetting_max'], 0.5)
    self.assertLess(split['naive']['class_il']['bwt'], -0.5)
    self.assertGreater(split['joint']['class_il']['acc'],
                       split['naive']['class_il']['acc'] + 0.2)

  def test_icarl_keeps_k_over_classes_seen_exemplars_per_class(self):
    # Rebuffi et al. 2017, Algorithm 5: m = K // classes seen, per class.
    icarl = self.results['scenarios']['split_mnist']['strategies'][
        'icarl_200']
    capacity = self.config.strategy('icarl_200').buffer_size
    counts = np.asarray(icarl['exemplars_per_class'])     # [T, S, 10]
    self.assertEqual(counts.shape, (5, len(self.config.seeds), 10))
    for t in range(5):
      seen = 2 * (t + 1)
      expected = [capacity // seen] * seen + [0] * (10 - seen)
      for s in range(len(self.config.seeds)):
        self.assertEqual(counts[t, s].tolist(), expected, (t, s))
    for name, s in self.results['scenarios']['split_mnist'][
        'strategies'].items():
      if name != 'icarl_200':
        self.assertIsNone(s['exemplars_per_class'], name)

  def test_class_incremental_baselines_learn(self):
    split = self.results['scenarios']['split_mnist']['strategies']
    for name in ('er_ace_200', 'icarl_200'):
      with self.subTest(name):
        self.assertGreater(split[name]['class_il']['acc'],
                           split['naive']['class_il']['acc'] + 0.1)
        self.assertGreater(split[name]['task_il']['acc'], 0.8)

  def test_seeds_are_different_runs(self):
    split = self.results['scenarios']['split_mnist']['strategies']
    per_seed = np.asarray(split['derpp_200']['class_il'][
        'accuracy_matrix_per_seed'])
    self.assertFalse(np.array_equal(per_seed[0], per_seed[1]))

  def test_writes_json_markdown_png_and_checkpoints(self):
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(self.results)))
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, written)
    self.assertEqual(written['jax_version'], jax.__version__)
    self.assertEqual(written['config']['batch_size'], 10)
    with open(os.path.join(self.workdir, train.RESULTS_MD)) as f:
      self.assertEqual(f.read().strip(), train.format_table(self.results))
    names = _plots.figure_names(self.results)
    self.assertLen(names, 5)
    for name in names:
      with open(os.path.join(self.workdir, name), 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n', name)
    for scenario_name, scenario, name, _ in self._strategies():
      directory = os.path.join(self.workdir, 'checkpoints', scenario_name,
                               name)
      steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
      t = scenario['num_tasks']
      self.assertEqual(steps, [t - 1, t], f'{scenario_name}/{name}')

  def test_resume_after_kill_gives_identical_results(self):
    # Two strategies suffice (and keep the test short): the numbers of a
    # strategy depend on (seed, scenario, strategy name), not on which other
    # strategies run.
    config = train.select_strategies(self.config, ['derpp_200', 'lwf'])
    workdir = self._tempdir()

    def kill(scenario, strategy, task):
      if (scenario, strategy, task) == ('split_mnist', 'derpp_200', 1):
        raise _Killed()

    with self.assertRaises(_Killed):
      _run(workdir, config, on_task_end=kill)
    ckpt = os.path.join(workdir, 'checkpoints', 'split_mnist')
    self.assertEqual(os.listdir(ckpt), ['derpp_200'])
    self.assertEqual(sorted(os.listdir(os.path.join(ckpt, 'derpp_200'))),
                     ['1', '2'])
    resumed = _run(workdir, config)
    # Bitwise equal to the uninterrupted run: derpp_200 resumed after its
    # second task, lwf ran fresh (so this also checks determinism).
    expected = _numbers(self.results)
    got = _numbers(resumed)
    self.assertEqual(sorted(got), [('split_mnist', 'derpp_200'),
                                   ('split_mnist', 'lwf')])
    for key, numbers in got.items():
      self.assertEqual(numbers, expected[key], key)

  def test_icarl_resumes_with_its_exemplars(self):
    # The exemplar memory and the old network are in the checkpointed state,
    # the exemplar counts in the record.
    config = train.select_strategies(self.config, ['icarl_200'])
    workdir = self._tempdir()

    def kill(scenario, strategy, task):
      if task == 2:
        raise _Killed()

    with self.assertRaises(_Killed):
      _run(workdir, config, on_task_end=kill)
    resumed = _run(workdir, config)
    key = ('split_mnist', 'icarl_200')
    self.assertEqual(_numbers(resumed)[key], _numbers(self.results)[key])
    split = 'split_mnist'
    self.assertEqual(
        resumed['scenarios'][split]['strategies']['icarl_200'][
            'exemplars_per_class'],
        self.results['scenarios'][split]['strategies']['icarl_200'][
            'exemplars_per_class'])

  def test_rerun_of_finished_run_restores_everything(self):
    again = _run(self._copy_of_run())
    self.assertEqual(_numbers(again), _numbers(self.results))
    for scenario_name, _, name, s in self._strategies():
      self.assertEqual(
          again['scenarios'][scenario_name]['strategies'][name][
              'train_time_s'], s['train_time_s'])

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(self.config, eval_every=7)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(self._copy_of_run(), config)

  def test_main_prints_table(self):
    argv = ['--config=smoke', f'--workdir={self._copy_of_run()}',
            '--strategies', *STRATEGIES]
    if RAW_DIR is not None:
      argv.append(f'--raw_dir={RAW_DIR}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      forgetting_main.main(argv)
    out = out.getvalue()
    self.assertIn('| strategy | class-IL ACC | BWT | forgetting (max) |', out)
    acc = self.results['scenarios']['split_mnist']['strategies']['naive'][
        'class_il']['acc']
    self.assertIn(f'| naive | {100 * acc:.2f} ± ', out)


class ConfigsTest(parameterized.TestCase):

  def test_default_follows_the_der_paper(self):
    config = configs.get_config('default')
    self.assertEqual(config.widths, (100, 100))
    self.assertEqual(config.batch_size, 10)
    self.assertEqual(config.epochs_per_task, 1)
    split = {s.name: s for s in config.scenarios}['split_mnist']
    self.assertEqual(split.classes_per_task, 2)
    for size in (200, 500, 5120):
      for kind in ('er', 'derpp', 'class_balanced'):
        strategy = config.strategy(f'{kind}_{size}')
        self.assertEqual(strategy.buffer_size, size)
        self.assertIn(strategy.name, split.strategies)
    self.assertEqual(config.strategy('derpp_500').alpha, 1.0)
    self.assertEqual(config.strategy('lwf').temperature, 2.0)

  def test_unknown_names_raise(self):
    with self.assertRaisesRegex(ValueError, 'name must be one of'):
      configs.get_config('nope')
    with self.assertRaisesRegex(ValueError, 'unknown strategies'):
      train.select_strategies(configs.get_config('smoke'), ['nope'])
    with self.assertRaisesRegex(ValueError, 'kind must be one of'):
      configs.Strategy('x', 'ewc', learning_rate=0.1)
    with self.assertRaisesRegex(ValueError, 'buffer_size >= 1'):
      configs.Strategy('x', 'er', learning_rate=0.1)

  def test_select_strategies_drops_empty_scenarios(self):
    config = train.select_strategies(configs.get_config('smoke'),
                                     ['er_500'])
    self.assertEqual([(s.name, s.strategies) for s in config.scenarios],
                     [('split_mnist', ('er_500',))])

  def test_configs_are_frozen(self):
    config = configs.get_config('smoke')
    with self.assertRaises(dataclasses.FrozenInstanceError):
      config.seeds = (1,)


class ICaRLMemoryTest(parameterized.TestCase):
  """``steps.update_memory`` on synthetic images: herding, then Alg. 5."""

  def test_herds_new_classes_and_keeps_prefixes_of_old_ones(self):
    widths, capacity = (8,), 12
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 15).astype(np.int32)
    rng.shuffle(labels)
    params = steps.make_init_params(widths)(
        train.root_keys((0, 1)), jnp.asarray(images[0]))
    memory = jax.tree.map(
        lambda a: jnp.stack([a, a]),
        steps.empty_memory(capacity, images.shape[1:]))
    classes = np.arange(10)

    def herded(c, m):
      # Independent features: the hidden ReLU layer by hand, normalised.
      members = np.flatnonzero(labels == c)
      out = []
      for s in range(2):
        dense = params['Dense_0']
        x = images[members].reshape(len(members), -1) / 255.0
        h = np.maximum(x @ np.asarray(dense['kernel'][s])
                       + np.asarray(dense['bias'][s]), 0.0)
        h = h / np.linalg.norm(h, axis=-1, keepdims=True)
        out.append(members[np.asarray(metacf.replay.herding_selection(
            jnp.asarray(h, jnp.float32), m))])
      return np.stack(out)

    first = steps.update_memory(memory, params, jnp.asarray(images), labels,
                                classes < 0, classes < 2, widths)
    m = capacity // 2
    np.testing.assert_array_equal(first['y'][:, :m], 0)
    np.testing.assert_array_equal(first['y'][:, m:], 1)
    idx = np.asarray(first['idx'])
    np.testing.assert_array_equal(idx[:, :m], herded(0, m))
    np.testing.assert_array_equal(idx[:, m:], herded(1, m))
    np.testing.assert_array_equal(first['x'], images[idx])

    second = steps.update_memory(first, params, jnp.asarray(images), labels,
                                 classes < 2, (classes >= 2) & (classes < 4),
                                 widths)
    m = capacity // 4
    idx2 = np.asarray(second['idx'])
    np.testing.assert_array_equal(second['y'][0],
                                  np.repeat(np.arange(4), m))
    # Old classes keep the first m of their exemplars, in herding order.
    np.testing.assert_array_equal(idx2[:, :m], idx[:, :m])
    np.testing.assert_array_equal(idx2[:, m:2 * m], idx[:, 6:6 + m])
    np.testing.assert_array_equal(idx2[:, 2 * m:3 * m], herded(2, m))
    np.testing.assert_array_equal(second['x'], images[idx2])
    # The curves' prefix: the first exemplar of each class, padded.
    prefix = steps.memory_prefix(second, 1)
    np.testing.assert_array_equal(prefix['idx'][:, :4], idx2[:, ::m])
    np.testing.assert_array_equal(prefix['y'][0], [0, 1, 2, 3] + [-1] * 6)


@pytest.mark.slow
class DefaultProtocolTest(parameterized.TestCase):
  """The DER paper's protocol on all of MNIST, one seed, three strategies.

  Split MNIST only: naive and joint would also run one class at a time,
  which nothing here checks (the smoke run covers that scenario).
  """

  def test_replay_beats_naive_fine_tuning(self):
    config = train.select_strategies(configs.get_config('default'),
                                     ['naive', 'joint', 'er_500'])
    config = dataclasses.replace(
        config, seeds=(0,), progress_bar=False,
        scenarios=tuple(s for s in config.scenarios
                        if s.name == 'split_mnist'))
    with tempfile.TemporaryDirectory() as workdir:
      results = _run(workdir, config)
    self.assertEqual(list(results['scenarios']), ['split_mnist'])
    split = results['scenarios']['split_mnist']['strategies']
    acc = {name: s['class_il']['acc'] for name, s in split.items()}
    self.assertLess(acc['naive'], 0.25)      # Only the last task's digits.
    self.assertGreater(acc['er_500'], 0.75)
    self.assertGreater(acc['joint'], 0.9)
    self.assertGreater(split['naive']['class_il']['forgetting_max'], 0.9)
    self.assertGreater(split['naive']['task_il']['acc'], 0.9)
