"""Tests of ``experiments/prevent_forgetting`` (metacf.protect on P/R-MNIST).

``train_and_evaluate(smoke_config, workdir)`` runs once on real MNIST (three
tasks per benchmark, every strategy, two predicted-vs-measured pairs); the
tests check the records, the metrics and the memory accounting, the files,
and that a run missing a record recomputes it bitwise while reading the
others back. The mechanics are checked directly on small synthetic tasks:
GPM and OGD keep what task 0 stored nearly unchanged while naive SGD moves
it; zero-padded bases project like unpadded ones; and on a model linear in
its parameters the forgetting predicted under a protected basis equals the
forgetting measured by training, to rounding in float64.
"""

import contextlib
import dataclasses
import io
import json
import math
import os

from absl.testing import absltest
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.common import batching
from experiments.prevent_forgetting import _plots
from experiments.prevent_forgetting import configs
from experiments.prevent_forgetting import data
from experiments.prevent_forgetting import main as prevent_main
from experiments.prevent_forgetting import memories
from experiments.prevent_forgetting import steps
from experiments.prevent_forgetting import train
import metacf.jacobian
import metacf.metrics
import metacf.protect



def _run(workdir, config=None):
  config = configs.get_config('smoke') if config is None else config
  return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR)


def _strip(record):
  return {k: v for k, v in record.items()
          if k not in ('time_s', 'train_time_s')}


def _numbers(results):
  """Everything a resumed run must reproduce exactly (not timings, dates)."""
  runs = {k: _strip(r) for k, r in results['runs'].items()}
  summary = {b: {s: {k: v for k, v in row.items()
                     if k not in ('time_s', 'us_per_step')}
                 for s, row in rows.items()}
             for b, rows in results['summary'].items()}
  return runs, [_strip(p) for p in results['pairs']], summary


class PreventForgettingSmokeTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return _run(workdir, cls.config)

  def test_every_run_has_a_complete_finite_record(self):
    config, t = self.config, self.config.num_tasks
    self.assertEqual(sorted(self.results['runs']), sorted(
        f'{b}/{s}/seed{seed}' for b in config.benchmarks
        for s in config.strategies for seed in config.seeds))
    for name, r in self.results['runs'].items():
      with self.subTest(name):
        self.assertTrue(r['params_finite'])
        self.assertBetween(r['acc'], 0.0, 1.0)
        final = np.asarray(r['final_accuracies'])
        self.assertEqual(final.shape, (t,))
        self.assertTrue(np.all((final >= 0) & (final <= 1)))
        if name.split('/')[1] == 'joint':
          self.assertIsNone(r['accuracy_matrix'])
          self.assertAlmostEqual(r['acc'], float(np.mean(final)), places=12)
          continue
        matrix = np.asarray(r['accuracy_matrix'])
        self.assertEqual(matrix.shape, (t, t))
        self.assertTrue(np.all((matrix >= 0) & (matrix <= 1)))
        np.testing.assert_array_equal(matrix[-1], final)
        self.assertAlmostEqual(
            r['acc'], float(metacf.metrics.average_accuracy(matrix)), 6)
        self.assertAlmostEqual(
            r['bwt'], float(metacf.metrics.backward_transfer(matrix)), 6)
        self.assertAlmostEqual(
            r['forgetting'], float(metacf.metrics.forgetting(matrix)), 6)
        self.assertAlmostEqual(
            r['bwt'], float(np.mean(matrix[-1, :-1] - np.diag(matrix)[:-1])),
            6)

  def test_learns_above_chance(self):
    # Every strategy learns each task it has just seen (10 classes: 10%).
    for name, r in self.results['runs'].items():
      if r['accuracy_matrix'] is not None:
        with self.subTest(name):
          self.assertGreater(float(np.min(np.diag(r['accuracy_matrix']))),
                             0.2)

  def test_memory_accounting(self):
    config, t = self.config, self.config.num_tasks
    widths = [data.NUM_PIXELS, *config.hidden]
    for bench in config.benchmarks:
      runs = {s: self.results['runs'][f'{bench}/{s}/seed0']
              for s in config.strategies}
      p = runs['naive']['num_params']
      self.assertEqual(p, sum(a * b for a, b in zip(
          widths, widths[1:] + [data.NUM_CLASSES])))
      self.assertEqual(runs['naive']['memory']['floats'], 0)
      self.assertEqual(runs['ewc']['memory']['floats'], 2 * p * (t - 1))
      for s in ('online_ewc', 'si', 'mas'):
        self.assertEqual(runs[s]['memory']['floats'], 2 * p)
      for s in ('agem', 'er', 'gem'):
        self.assertEqual(runs[s]['memory']['floats'],
                         config.memory_per_task * (t - 1) * 785)
      for s, per_task in (('ogd', config.ogd_examples),
                          ('pca_ogd', config.pca_k)):
        rows = runs[s]['memory']['rows']
        self.assertBetween(rows, 1, per_task * (t - 1))
        self.assertEqual(runs[s]['memory']['floats'], rows * p)
      bases = runs['gpm']['memory']['bases']
      self.assertEqual([d for d, _ in bases.values()], widths)
      for d, r in bases.values():
        self.assertBetween(r, 1, d)
      self.assertEqual(runs['gpm']['memory']['floats'],
                       sum(d * r for d, r in bases.values()))
      self.assertEqual(runs['joint']['memory']['floats'],
                       t * config.train_size(bench) * 785)

  def test_pairs_are_finite_for_every_k(self):
    ks = [str(k) for k in self.config.protect_ks]
    self.assertEqual([p['name'] for p in self.results['pairs']],
                     [p.name for p in self.config.pairs])
    for pair in self.results['pairs']:
      with self.subTest(pair['name']):
        self.assertEqual(list(pair['per_k']), ks)
        self.assertBetween(pair['accuracy_a_test'], 0.0, 1.0)
        s = np.asarray(pair['singular_values'])
        self.assertEqual(s.shape, (max(self.config.protect_ks),))
        self.assertTrue(np.all(np.diff(s) <= 1e-5 * s[0]))
        for k in ks:
          cell = pair['per_k'][k]
          # Training on B lowers B's loss, protected or not.
          self.assertLess(cell['loss_b_after'], cell['loss_b_before'])
          for which in ('jac', 'heldout'):
            for key in ('predicted', 'measured', 'loss_before'):
              self.assertTrue(math.isfinite(cell[which][key]), (k, which))

  def test_writes_json_markdown_png_and_records(self):
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(self.results)))
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, written)
    with open(os.path.join(self.workdir, train.RESULTS_MD)) as f:
      self.assertEqual(f.read().strip(), train.format_table(self.results))
    names = _plots.figures(self.results)
    self.assertLen(names, len(self.config.benchmarks) + 1)
    for name in names:
      with open(os.path.join(self.workdir, name), 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n', name)
    self.assertEqual(
        sorted(os.listdir(os.path.join(self.workdir, 'runs', 'permuted'))),
        sorted(self.config.strategies))
    self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, 'pairs'))),
                     sorted(f'{p.name}.json' for p in self.config.pairs))

  def test_missing_records_are_recomputed_bitwise_others_read_back(self):
    # Determinism (same seed, same record) and resumability: what a run
    # killed during permuted/gpm and the second pair leaves behind.
    workdir = self._copy_of_run()
    os.remove(os.path.join(workdir, 'runs', 'permuted', 'gpm', 'seed0.json'))
    os.remove(os.path.join(workdir, 'pairs',
                           f'{self.config.pairs[-1].name}.json'))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      prevent_main.main(['--config=smoke', f'--workdir={workdir}',
                         f'--raw_dir={RAW_DIR}'])
    with open(os.path.join(workdir, train.RESULTS_JSON)) as f:
      resumed = json.load(f)
    self.assertEqual(_numbers(resumed),
                     _numbers(json.loads(json.dumps(self.results))))
    for name, before in self.results['runs'].items():
      after = resumed['runs'][name]
      if name == 'permuted/gpm/seed0':
        self.assertNotEqual(before['time_s'], after['time_s'])
      else:  # Read back, not recomputed.
        self.assertEqual(before['time_s'], after['time_s'], name)
    self.assertIn(train.format_table(resumed), out.getvalue())

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(self.config, lr=0.02)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(self._copy_of_run(), config)


# ------------------------------------------------- protection, synthetic tasks


def _low_rank_task(key, n, rank):
  """``n`` inputs in a random ``rank``-dim subspace, labels from a teacher."""
  k1, k2, k3 = jax.random.split(key, 3)
  x = (jax.random.normal(k1, (n, rank)) @
       jax.random.normal(k2, (rank, data.NUM_PIXELS)) / np.sqrt(rank))
  y = jnp.argmax(x @ jax.random.normal(k3, (data.NUM_PIXELS, 10)),
                 axis=1).astype(jnp.int32)
  return np.asarray(x, np.float32), np.asarray(y)


class ProtectionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The smoke config's model and optimiser (its compiled trainers).
    cls.config = dataclasses.replace(
        configs.get_config('smoke'), ogd_examples=20, gpm_examples=100,
        gpm_thresholds=(0.9999, 0.99, 0.99), num_epochs=2)
    cls.task0 = _low_rank_task(jax.random.key(0), 100, 10)
    cls.task1 = _low_rank_task(jax.random.key(1), 100, 10)
    params = steps.init_params(jax.random.key(2), cls.config.hidden)
    cls.params0 = cls._train(params, 'naive', None, cls.task0)

  @classmethod
  def _train(cls, params, strategy, memory, task):
    order = batching.epoch_indices(jax.random.key(3), len(task[1]),
                                   cls.config.num_epochs,
                                   cls.config.batch_size)
    memory = memory or memories.Memory(strategy, cls.config, params)
    return memory.train(params, jnp.asarray(task[0]), jnp.asarray(task[1]),
                        jnp.asarray(order), jax.random.key(4))

  def test_gpm_keeps_task0_layer_outputs(self):
    memory = memories.Memory('gpm', self.config, self.params0)
    memory.remember(self.params0, *self.task0, 0, jax.random.key(5))
    x0 = jnp.asarray(self.task0[0])

    def layer_outputs(p):
      return [h @ p[n]['kernel'] for h, n in zip(
          steps.layer_inputs(p, x0), steps.layer_names(self.config.hidden))]

    before = layer_outputs(self.params0)
    changes = {}
    for strategy, mem in (('naive', None), ('gpm', memory)):
      after = layer_outputs(self._train(self.params0, strategy, mem,
                                        self.task1))
      changes[strategy] = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                           for a, b in zip(after, before)]
    # Inputs in a 10-dim subspace: with a threshold of 0.9999 the first
    # layer's basis holds 9 of its 10 directions (the first-task count stops
    # below the threshold); later layers keep 99% of their energy.
    for layer, (gpm, naive) in enumerate(zip(changes['gpm'],
                                             changes['naive'])):
      self.assertGreater(naive, 0.05, layer)
      self.assertLess(gpm, 0.25 * naive, layer)

  def test_ogd_keeps_stored_logits(self):
    memory = memories.Memory('ogd', self.config, self.params0)
    memory.remember(self.params0, *self.task0, 0, jax.random.key(5))
    n = self.config.ogd_examples
    x0, y0 = jnp.asarray(self.task0[0][:n]), jnp.asarray(self.task0[1][:n])
    gtl = lambda p: jnp.take_along_axis(steps.apply_fn(p, x0), y0[:, None],
                                        axis=1)
    moved = {}
    for strategy, mem in (('naive', None), ('ogd', memory)):
      after = self._train(self.params0, strategy, mem, self.task1)
      moved[strategy] = float(jnp.max(jnp.abs(gtl(after) -
                                               gtl(self.params0))))
    self.assertGreater(moved['naive'], 0.1)
    self.assertLess(moved['ogd'], 0.3 * moved['naive'])

  def test_ogd_trainer_follows_the_basis_size(self):
    # OGD's basis is not padded: one trainer per basis size, each compiled
    # once, with the basis in its state.
    memory = memories.Memory('ogd', self.config, self.params0)
    self.assertIsNone(optax.tree.get_all_with_path(memory.opt_state, 'basis')
                      or None)  # Task 0: plain SGD.
    sizes = []
    for task, data_t in enumerate((self.task0, self.task1)):
      memory.remember(self.params0, *data_t, task, jax.random.key(5 + task))
      rows = memory.floats()['rows']
      sizes.append(rows)
      np.testing.assert_array_equal(
          optax.tree.get(memory.opt_state, 'basis'), memory.basis)
      trainer = steps.trainer(self.config, 'ogd', rows)
      self._train(self.params0, 'ogd', memory, self.task1)
      size = trainer.train._cache_size()
      self._train(self.params0, 'ogd', memory, self.task0)
      self.assertEqual(trainer.train._cache_size(), size)
    self.assertBetween(sizes[0], 1, self.config.ogd_examples)
    self.assertGreater(sizes[1], sizes[0])

  def test_gem_memory_grads_are_the_tasks_gradients_zero_when_unseen(self):
    memory = memories.Memory('gem', self.config, self.params0)
    memory.remember(self.params0, *self.task0, 0, jax.random.key(5))
    key, n = jax.random.key(6), self.config.gem_sample_size
    got = steps.gem_memory_grads(self.params0, memory.buffer, key, n)
    t, m = memory.buffer['y'].shape
    idx = jax.random.randint(key, (t, n), 0, m)
    for task in range(t):
      want = jax.grad(lambda p, i=idx[task]: steps.cross_entropy(
          steps.apply_fn, p, memory.buffer['x'][0][i],
          memory.buffer['y'][0][i]))(self.params0)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if task == 0:
          np.testing.assert_allclose(g[0], w, rtol=1e-5, atol=1e-7)
          self.assertGreater(float(jnp.max(jnp.abs(g[0]))), 0.0)
        else:
          np.testing.assert_array_equal(g[task], 0.0)

  def test_state_swaps_reuse_one_compiled_trainer(self):
    # Each strategy's chain is built once; remember() swaps the arrays in
    # its state (optax.tree.set) and the same compiled loop runs again.
    for strategy, field in (('gpm', 'bases'), ('online_ewc', 'anchor'),
                            ('ewc', 'anchor'), ('si', 'anchor'),
                            ('mas', 'anchor')):
      with self.subTest(strategy):
        memory = memories.Memory(strategy, self.config, self.params0)
        trainer = steps.trainer(self.config, strategy)
        before = optax.tree.get_all_with_path(memory.opt_state, field)
        self._train(self.params0, strategy, memory, self.task0)
        size = trainer.train._cache_size()
        memory.remember(self.params0, *self.task0, 0, jax.random.key(5))
        after = optax.tree.get_all_with_path(memory.opt_state, field)
        self.assertEqual(len(before), len(after))
        changed = [not all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(x), jax.tree.leaves(y)))
                   for (_, x), (_, y) in zip(before, after)]
        self.assertTrue(changed[0])  # Task 0's slot is filled ...
        self.assertFalse(any(changed[1:]))  # ... and only it (offline EWC).
        self._train(self.params0, strategy, memory, self.task1)
        self.assertEqual(trainer.train._cache_size(), size)


# ------------------------------------------- predicted vs measured forgetting


def _linear_apply(params, x):
  return x @ params['w']


class PredictedVsMeasuredTest(absltest.TestCase):

  def test_exact_for_a_model_linear_in_its_parameters(self):
    with jax.enable_x64(True):
      key = jax.random.split(jax.random.key(0), 5)
      d, c, n_a, n_b = 8, 3, 3, 4
      params = {'w': 0.3 * jax.random.normal(key[0], (d, c), jnp.float64)}
      task_a = (jax.random.normal(key[1], (n_a, d), jnp.float64),
                jax.random.randint(key[2], (n_a,), 0, c, jnp.int32))
      task_b = (jax.random.normal(key[3], (n_b, d), jnp.float64),
                jax.random.randint(key[4], (n_b,), 0, c, jnp.int32))
      # All n_a * c Jacobian rows of A.
      vt = metacf.jacobian.jacobian_svd(_linear_apply, params, task_a[0],
                                        n_a * c, method='dense').vt
      out = {k: steps.forgetting_under_protection(
          _linear_apply, params, {'a': task_a}, task_b, vt, k=k, lr=0.5,
          num_steps=20)['a'] for k in (0, 2, 5, n_a * c)}
      plain = float(metacf.jacobian.predicted_forgetting(
          _linear_apply, params, task_a, task_b, lr=0.5, num_steps=20,
          loss='cross_entropy'))
      zero_rows = float(metacf.jacobian.predicted_forgetting(
          _linear_apply, params, task_a, task_b, lr=0.5, num_steps=20,
          loss='cross_entropy', protect_basis=jnp.zeros_like(vt)))
    # k = 0 is predicted_forgetting without a basis; zero rows protect
    # nothing.
    self.assertAlmostEqual(out[0]['predicted'], plain, delta=1e-12)
    self.assertAlmostEqual(zero_rows, plain, delta=1e-12)
    for k, cell in out.items():
      self.assertAlmostEqual(cell['predicted'], cell['measured'], delta=1e-10
                             * max(1.0, abs(cell['measured'])), msg=k)
    self.assertGreater(out[0]['measured'], 1e-3)  # It forgets ...
    # ... unless the whole row space of A's Jacobian is protected.
    self.assertLess(abs(out[n_a * c]['measured']), 1e-12)


if __name__ == '__main__':
  absltest.main()
