"""Tests of ``experiments/meta_continual``: part (a) (subspace orthogonality
at meta-learned initialisations) and part (b) (online continual learning).

``orthogonality.train_and_evaluate(smoke_config, workdir)`` runs once on real
MNIST (three held-out pairs, five initialisations, two seeds, tiny sizes);
the tests check that every (pair, init, seed) has a complete, finite record,
that the statistics are what their definitions say, and that a run missing
records and a trained initialisation recomputes them bitwise.
"""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
from scipy import stats

import _smoke_run
from experiments.meta_continual import configs
from experiments.meta_continual import main as meta_main
from experiments.meta_continual import online
from experiments.meta_continual import orthogonality

RAW_DIR = _smoke_run.RAW_DIR


def _run(workdir, config):
  return orthogonality.train_and_evaluate(config, str(workdir),
                                          raw_dir=RAW_DIR)


def _numbers(results):
  """What a resumed run must reproduce exactly (not timings, dates)."""
  return ([{k: v for k, v in r.items() if k != 'time_s'}
           for r in results['records']], results['summary'])


class OrthogonalitySmokeTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return _run(workdir, cls.config)

  def test_every_pair_init_and_seed_has_a_finite_record(self):
    ocfg = self.config.orthogonality
    expected = {(p.name, i, s) for p in ocfg.pairs for i in ocfg.inits
                for s in ocfg.seeds}
    got = [(r['name'], r['init'], r['seed']) for r in self.results['records']]
    self.assertLen(got, len(expected))
    self.assertEqual(set(got), expected)
    self.assertEqual(set(configs.INITS), {r['init'] for r in
                                          self.results['records']})
    for pair, kind, seed in orthogonality.items(ocfg):
      self.assertTrue(os.path.exists(orthogonality.record_path(
          os.path.join(self.workdir, orthogonality.SUBDIR), pair, kind,
          seed)))
    for r in self.results['records']:
      with self.subTest(name=r['name'], init=r['init'], seed=r['seed']):
        for key in orthogonality.METRICS + ('loss_a_before', 'loss_a_after',
                                            'loss_a_init', 'loss_a_train'):
          self.assertTrue(math.isfinite(r[key]), key)
        for key in ('overlap', 'overlap_init', 'weighted_overlap',
                    'top1_cosine'):
          self.assertBetween(r[key], -1e-6, 1 + 1e-6)
        self.assertAlmostEqual(r['measured'],
                               r['loss_a_after'] - r['loss_a_before'],
                               places=5)
        self.assertAlmostEqual(
            r['accuracy_drop'], r['accuracy_a_before'] - r['accuracy_a_after'],
            places=6)
        self.assertLen(r['top_singular_values_a'], ocfg.overlap_k)

  def test_meta_learned_inits_differ_from_the_random_one(self):
    by_key = {(r['init'], r['name'], r['seed']): r
              for r in self.results['records']}
    for init in ('joint', 'maml', 'reptile', 'imaml'):
      for pair in self.config.orthogonality.pairs:
        with self.subTest(init=init, pair=pair.name):
          self.assertNotEqual(by_key[init, pair.name, 0]['loss_a_init'],
                              by_key['random', pair.name, 0]['loss_a_init'])
    self.assertEqual(
        set(self.results['meta_training']),
        {f'{i}_seed{s}' for i in ('joint', 'maml', 'reptile', 'imaml')
         for s in self.config.orthogonality.seeds})

  def test_statistics_follow_their_definitions(self):
    s = self.results['summary']
    records = self.results['records']
    for init, cell in s['per_init'].items():
      rs = [r for r in records if r['init'] == init]
      for m in orthogonality.METRICS:
        self.assertAlmostEqual(cell[m]['mean'], np.mean([r[m] for r in rs]),
                               places=10)
        self.assertLessEqual(cell[m]['ci'][0], cell[m]['ci'][1])
    # Every init has every (pair, seed): the paired mean difference is the
    # difference of the means.
    self.assertNotIn('random', s['effects'])
    for init, bases in s['effects'].items():
      for base, cell in bases.items():
        for m in orthogonality.METRICS:
          self.assertAlmostEqual(
              cell[m]['mean'],
              s['per_init'][init][m]['mean'] - s['per_init'][base][m]['mean'],
              places=6)
    self.assertEqual(set(s['families']), {r['family'] for r in records})
    for family, cell in s['families'].items():
      rs = [r for r in records if r['family'] == family]
      self.assertAlmostEqual(
          cell['per_init']['maml']['overlap']['mean'],
          np.mean([r['overlap'] for r in rs if r['init'] == 'maml']),
          places=10)
    for group, cells in s['spearman'].items():
      if group == 'all':
        rs = records
      elif group.startswith('family:'):
        rs = [r for r in records if r['family'] == group[len('family:'):]]
      else:
        rs = [r for r in records if r['init'] == group]
      for x, y in orthogonality.CORRELATIONS:
        c = cells[f'{x}_vs_{y}']
        self.assertEqual(c['n'], len(rs))
        if c['rho'] is None:
          continue
        self.assertBetween(c['rho'], -1.0, 1.0)
        self.assertBetween(c['p'], 0.0, 1.0)
        self.assertBetween(c['ci'][0], -1.0, 1.0)
        self.assertBetween(c['ci'][1], -1.0, 1.0)
        # Spearman = Pearson of the ranks.
        rx = stats.rankdata([r[x] for r in rs])
        ry = stats.rankdata([r[y] for r in rs])
        self.assertAlmostEqual(c['rho'], float(np.corrcoef(rx, ry)[0, 1]),
                               places=10)

  def test_results_and_figures_are_written(self):
    out = os.path.join(self.workdir, orthogonality.SUBDIR)
    with open(os.path.join(out, orthogonality.RESULTS_JSON)) as f:
      saved = json.load(f)
    self.assertEqual(saved['num_records'], len(self.results['records']))
    for name in orthogonality.FIGURES + (orthogonality.RESULTS_MD,):
      self.assertGreater(os.path.getsize(os.path.join(out, name)), 0)

  def test_resumed_run_recomputes_missing_records_bitwise(self):
    workdir = self._copy_of_run()
    out = os.path.join(workdir, orthogonality.SUBDIR)
    ocfg = self.config.orthogonality
    # A whole init (its checkpoint too: retrained) and one more record.
    shutil.rmtree(os.path.join(out, 'records', 'reptile_seed1'))
    shutil.rmtree(os.path.join(out, 'checkpoints', 'reptile_seed1'))
    os.remove(orthogonality.record_path(out, ocfg.pairs[0], 'maml', 0))
    resumed = _run(workdir, self.config)
    self.assertEqual(_numbers(resumed), _numbers(self.results))

  def test_other_recipe_in_the_workdir_raises(self):
    workdir = self._copy_of_run()
    config = dataclasses.replace(
        self.config, orthogonality=dataclasses.replace(
            self.config.orthogonality, lr_b=0.05))
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(workdir, config)

  def test_main_part_a_reads_the_run_back(self):
    workdir = self._copy_of_run()
    results = meta_main.main(['--config=smoke', f'--workdir={workdir}',
                              '--part=a'] +
                             ([f'--raw_dir={RAW_DIR}'] if RAW_DIR else []))
    self.assertEqual(_numbers(results['a']), _numbers(self.results))
    # Every initialisation was read back, so its history is reported.
    self.assertEqual(results['a']['meta_training'],
                     self.results['meta_training'])


class OrthogonalityConfigTest(_smoke_run.parameterized.TestCase):

  def test_default_pairs_are_held_out_and_cover_every_family(self):
    ocfg = configs.get_config('default').orthogonality
    self.assertEqual({p.family for p in ocfg.pairs}, set(configs.FAMILIES))
    self.assertGreaterEqual(len(ocfg.pairs), 8)

  def test_pair_on_a_meta_training_angle_raises(self):
    with self.assertRaisesRegex(ValueError, 'held out'):
      configs.OrthogonalityConfig(
          train_rotations=(0.0, 20.0),
          pairs=configs.make_pairs(rotations=((10, 20),)))
    with self.assertRaisesRegex(ValueError, 'held out'):
      configs.OrthogonalityConfig(
          num_train_permutations=5,
          pairs=configs.make_pairs(permutations=((3, 100),)))


class SelectImamlRegTest(_smoke_run.parameterized.TestCase):

  def test_reports_an_accuracy_per_lambda(self):
    out = orthogonality.select_imaml_reg(configs.get_config('smoke'),
                                         (1.0,), raw_dir=RAW_DIR)
    self.assertEqual(set(out), {'random', '1'})
    for acc in out.values():
      self.assertBetween(acc, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Part (b): online continual learning.


class OnlineSmokeTest(_smoke_run.SmokeRunTestCase):
  """``online.run`` on the smoke config: three tiny tasks, every method."""

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke').online
    return online.run(cls.config, str(workdir), raw_dir=RAW_DIR,
                      progress_bar=False)

  def _records(self, workdir=None):
    out = {}
    for b in self.config.benchmarks:
      for m in self.config.methods:
        for s in self.config.seeds:
          path = os.path.join(workdir or self.workdir, online.SUBDIR,
                              f'{b}_{m}_seed{s}.json')
          with open(path) as f:
            out[(b, m, s)] = json.load(f)['record']
    return out

  def test_every_run_has_a_finite_accuracy_matrix_and_its_metrics(self):
    records = self._records()
    self.assertLen(records, len(self.config.benchmarks) *
                   len(configs.ONLINE_METHODS) * len(self.config.seeds))
    t = self.config.num_tasks
    for key, r in records.items():
      with self.subTest(run=key):
        self.assertTrue(r['finite'])
        matrix = np.asarray(r['accuracy_matrix'])
        self.assertEqual(matrix.shape, (t, t))
        self.assertTrue(np.all((matrix >= 0) & (matrix <= 1)))
        # ACC, BWT and LA from their definitions.
        self.assertAlmostEqual(r['acc'], matrix[-1].mean(), places=6)
        self.assertAlmostEqual(
            r['bwt'], np.mean(matrix[-1, :-1] - np.diag(matrix)[:-1]),
            places=6)
        self.assertAlmostEqual(r['learning_accuracy'],
                               np.diag(matrix).mean(), places=6)
        self.assertGreater(r['train_time_s'], 0)

  def test_methods_learn_and_differ(self):
    records = self._records()
    for b in self.config.benchmarks:
      accs = {m: records[(b, m, 0)]['acc'] for m in self.config.methods}
      # Ten classes: after three tasks every method beats chance on the
      # mean diagonal of some method, and the methods do not all coincide.
      self.assertGreater(max(accs.values()), 0.15, accs)
      self.assertGreater(len({round(a, 6) for a in accs.values()}), 1, accs)
    rates = records[('permuted', 'lamaml', 0)]['lamaml_rates']
    self.assertNotAlmostEqual(rates['mean'],
                              self.config.lamaml_alpha_init, places=6)

  def test_table_summarises_the_records(self):
    records = self._records()
    cell = self.results['table']['rotated/er']
    self.assertAlmostEqual(
        cell['acc']['mean'],
        np.mean([records[('rotated', 'er', s)]['acc']
                 for s in self.config.seeds]), places=9)
    self.assertIn('| rotated | er |', self.results['report'])
    # Paired differences against ER: ER minus itself is exactly 0.
    self.assertEqual(cell['acc_minus_er']['mean'], 0.0)
    mer = self.results['table']['rotated/mer']['acc_minus_er']['mean']
    self.assertAlmostEqual(
        mer, records[('rotated', 'mer', 0)]['acc'] -
        records[('rotated', 'er', 0)]['acc'], places=9)
    with_ci = online.paired_difference(np.array([0.5, 0.7, 0.6]),
                                       np.array([0.4, 0.5, 0.6]))
    self.assertAlmostEqual(with_ci['mean'], 0.1, places=12)
    d = np.array([0.1, 0.2, 0.0])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(with_ci['ci'], [0.1 - half, 0.1 + half])
    self.assertTrue(os.path.exists(os.path.join(self.workdir, online.FIGURE)))
    with open(os.path.join(self.workdir, online.RESULTS_JSON)) as f:
      self.assertEqual(json.load(f)['table'], self.results['table'])

  def test_resumed_run_recomputes_a_missing_record_bitwise(self):
    workdir = self._copy_of_run()
    path = os.path.join(workdir, online.SUBDIR, 'permuted_mer_seed0.json')
    os.remove(path)
    online.run(self.config, workdir, raw_dir=RAW_DIR, progress_bar=False)
    old, new = self._records(), self._records(workdir)
    for key in old:
      self.assertEqual(old[key]['accuracy_matrix'],
                       new[key]['accuracy_matrix'], key)

  def test_stream_is_pixel_values_in_the_unit_interval(self):
    # GEM's, MER's and La-MAML's inputs (their learning rates assume them).
    data = online.make_stream(
        'rotated', 0, self.config,
        online.pf_data.load_mnist(RAW_DIR, None, self.config.num_test))
    self.assertEqual(data.x_train.shape,
                     (self.config.num_tasks, self.config.num_train, 784))
    self.assertBetween(float(data.x_train.min()), -1e-6, 1e-6)
    self.assertBetween(float(data.x_train.max()), 0.99, 1.0 + 1e-5)
