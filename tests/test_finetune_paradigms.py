"""Tests of ``experiments/finetune_paradigms`` (MNIST -> Fashion-MNIST ViT).

``train_and_evaluate(smoke_config, workdir)`` runs once on real data (tiny
subsets, a tiny ViT, every paradigm); the tests check that every paradigm
and K is in the results with finite numbers, the parameter counts against
formulas derived here from the ViT's shapes, the files written, and that a
run resumed from a partly deleted workdir gives bitwise the same numbers.
The ViT's prompt path and LoRA at ``b = 0`` are tested on their own.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.common import models
from experiments.finetune_paradigms import _plots
from experiments.finetune_paradigms import configs
from experiments.finetune_paradigms import data as paradigms_data
from experiments.finetune_paradigms import main as paradigms_main
from experiments.finetune_paradigms import steps
from experiments.finetune_paradigms import systems
from experiments.finetune_paradigms import train
import metacf.masks


PARADIGMS = ('linear_probe', 'full_finetune', 'partial_finetune', 'lora',
             'prompt_tuning', 'nearest_class_mean', 'lwf', 'replay')
TIMINGS = ('step_time_s', 'compile_time_s', 'fit_time_s', 'time_s')


def _run(workdir, config=None):
  config = configs.get_config('smoke') if config is None else config
  return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR)


def _without_timings(tree):
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items()
            if not any(k.startswith(t) for t in TIMINGS)}
  if isinstance(tree, list):
    return [_without_timings(v) for v in tree]
  return tree


def _numbers(results):
  """What a resumed run must reproduce exactly (not timings or dates)."""
  return _without_timings({'variants': results['variants'],
                           'pretrain': {k: v for k, v in
                                        results['pretrain'].items()
                                        if k != 'train_time_s'},
                           'correlation': results['correlation']})


def expected_counts(config: configs.Config, variant: configs.Variant
                    ) -> tuple[int, int]:
  """(trainable per task, added per extra task), from the ViT's shapes."""
  d, m, depth, p, c = (config.dim, config.mlp_dim, config.depth,
                       config.patch_size, paradigms_data.NUM_CLASSES)
  tokens = (28 // p) ** 2 + 1
  head = d * c + c
  layer_norm = 2 * d
  block = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * layer_norm
  body = (p * p * d + d) + d + tokens * d + depth * block + layer_norm
  kind = variant.kind
  if kind == 'linear_probe':
    return head, head
  if kind == 'full_finetune':
    return body + head, body + head
  if kind == 'partial_finetune':
    n = block + layer_norm + head
    return n, n
  if kind == 'lora':  # r (d_in + d_out) per target kernel.
    r = variant.rank
    per_block = 4 * r * (d + d) + r * (d + m) + r * (m + d)
    return depth * per_block + head, depth * per_block + head
  if kind == 'prompt_tuning':
    n = variant.prompt_tokens * d * (depth if variant.deep else 1) + head
    return n, n
  if kind == 'nearest_class_mean':
    return 0, c * d
  return body + 2 * head, head  # lwf, replay: both heads; shared body.


class FinetuneParadigmsTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    cls.config = configs.get_config('smoke')
    return _run(workdir, cls.config)

  def test_every_paradigm_and_k_has_finite_numbers(self):
    results = self.results
    self.assertEqual(sorted(results['paradigms']), sorted(PARADIGMS))
    self.assertEqual(list(results['variants']),
                     [v.name for v in self.config.variants])
    before = results['pretrain']['a_accuracy']
    for name, v in results['variants'].items():
      self.assertEqual(sorted(v['shots']), ['2', 'all'], name)
      for k, cell in v['shots'].items():
        with self.subTest(f'{name}/K={k}'):
          for key in ('b_accuracy', 'a_accuracy', 'forgetting',
                      'a_loss_change', 'step_time_s'):
            self.assertTrue(math.isfinite(cell[key]), key)
            self.assertLen(cell[f'{key}_per_seed'], len(self.config.seeds))
          self.assertBetween(cell['b_accuracy'], 0.0, 1.0)
          for a, f in zip(cell['a_accuracy_per_seed'],
                          cell['forgetting_per_seed']):
            self.assertEqual(f, before - a)
      if v['paradigm'] == 'nearest_class_mean':
        self.assertIsNone(v['predicted_forgetting'])
      else:
        self.assertTrue(math.isfinite(v['predicted_forgetting']), name)

  def test_frozen_paradigms_do_not_forget(self):
    before = self.results['pretrain']['a_accuracy']
    for name, v in self.results['variants'].items():
      if v['paradigm'] in ('linear_probe', 'prompt_tuning',
                           'nearest_class_mean'):
        for cell in v['shots'].values():
          self.assertEqual(cell['a_accuracy_per_seed'],
                           [before] * len(self.config.seeds), name)
      if v['paradigm'] == 'lora':
        for cell in v['shots'].values():  # Switched off: the A model.
          self.assertEqual(cell['a_accuracy_lora_off'], before)
          self.assertEqual(cell['forgetting_lora_off'], 0.0)
      if v['paradigm'] in ('linear_probe', 'prompt_tuning'):
        # A's outputs do not depend on the trainable leaves: 0 up to the
        # rounding of two evaluations of A's loss.
        self.assertLess(abs(v['predicted_forgetting']), 1e-6, name)

  def test_parameter_counts_match_formulas(self):
    for v in self.config.variants:
      with self.subTest(v.name):
        got = self.results['variants'][v.name]
        trainable, added = expected_counts(self.config, v)
        self.assertEqual(got['trainable_params'], trainable)
        self.assertEqual(got['params_added_per_task'], added)
    # And at the default sizes (no training needed). The counts depend on
    # shapes only: the pre-trained parameters are abstract (an eval_shape
    # trace), which initialises nothing and compiles nothing.
    config = configs.get_config('default')
    pretrained = jax.eval_shape(
        systems.make_model(config).init, jax.random.key(0),
        jnp.zeros([1, 28, 28, 1]))['params']
    counts = {}

    def count_all(pretrained):
      for v in config.variants:
        counts[v.name] = systems.param_counts(config, v, pretrained)
      return ()

    jax.eval_shape(count_all, pretrained)
    self.assertEqual(list(counts), [v.name for v in config.variants])
    for v in config.variants:
      with self.subTest(f'default/{v.name}'):
        got = counts[v.name]
        self.assertEqual(
            (got['trainable_params'], got['params_added_per_task']),
            expected_counts(config, v))
    self.assertEqual(expected_counts(config, config.variant('lora_r1'))[0]
                     - 650, 3584)

  def test_correlation_and_files(self):
    corr = self.results['correlation']
    gradient = [v for v in self.config.variants if v.gradient]
    self.assertEqual(corr['num_points'],
                     len(gradient) * len(self.config.shots))
    with open(os.path.join(self.workdir, train.RESULTS_JSON)) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(self.results)))
    for key in ('date', 'device', 'jax_version', 'config', 'wall_time_s'):
      self.assertIn(key, written)
    with open(os.path.join(self.workdir, train.RESULTS_MD)) as f:
      self.assertEqual(f.read().strip(), train.format_table(self.results))
    for name in _plots.figure_names(self.results):
      with open(os.path.join(self.workdir, name), 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n', name)
    steps = sorted(int(s) for s in os.listdir(
        os.path.join(self.workdir, 'checkpoints', 'pretrain')) if s.isdigit())
    self.assertEqual(steps, [1, 2])

  def test_resume_gives_identical_results(self):
    # A run killed in pre-training's second epoch and after some records:
    # the checkpoint of epoch 2 and a few records are gone.
    workdir = self._copy_of_run()
    shutil.rmtree(os.path.join(workdir, 'checkpoints', 'pretrain', '2'))
    for rel in ('runs/full_finetune/Kall_seed1.json',
                'runs/linear_probe/K2_seed0.json',
                'predictions/linear_probe.json'):
      os.remove(os.path.join(workdir, rel))
    resumed = _run(workdir, self.config)
    self.assertEqual(_numbers(resumed), _numbers(self.results))

  def test_other_recipe_in_same_workdir_raises(self):
    config = dataclasses.replace(self.config, steps=5)
    with self.assertRaisesRegex(ValueError, 'another recipe'):
      _run(self._copy_of_run(), config)

  def test_main_prints_table(self):
    argv = ['--config=smoke', f'--workdir={self._copy_of_run()}']
    if RAW_DIR is not None:
      argv.append(f'--raw_dir={RAW_DIR}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      paradigms_main.main(argv)
    self.assertIn('| variant | trainable | added/task |', out.getvalue())
    self.assertIn('| low-rank adapters | lora_r4 | Small |', out.getvalue())


class ViTTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Initialised once (eagerly: seconds): the tests only read them.
    cls.model = models.ViT(dim=16, depth=3, num_heads=2, mlp_dim=32)
    key = jax.random.key(0)
    cls.x = jax.random.uniform(key, [3, 28, 28, 1])
    cls.params = cls.model.init(key, cls.x)['params']

  def test_zero_token_prompt_is_the_plain_model(self):
    plain = self.model.apply({'params': self.params}, self.x)
    self.assertEqual(plain.shape, (3, 10))
    empty = jnp.zeros([0, 16])
    np.testing.assert_array_equal(
        self.model.apply({'params': self.params}, self.x, prompt=empty), plain)
    np.testing.assert_array_equal(
        self.model.apply({'params': self.params}, self.x,
                         deep_prompts=jnp.zeros([3, 0, 16])), plain)

  def test_prompts_change_the_output(self):
    apply = lambda **kw: self.model.apply({'params': self.params}, self.x,
                                          **kw)
    plain = apply()
    prompt = jax.random.uniform(jax.random.key(1), [2, 16])
    shallow = apply(prompt=prompt)
    self.assertFalse(np.allclose(shallow, plain))
    deep = jax.random.uniform(jax.random.key(2), [3, 2, 16])
    out = apply(deep_prompts=deep)
    self.assertFalse(np.allclose(out, plain))
    # Deep with the first layer's prompt only differs from shallow: the
    # later layers' prompts replace the previous outputs at those tokens.
    first_only = apply(deep_prompts=jnp.stack([prompt] * 3))
    self.assertFalse(np.allclose(first_only, shallow))
    # Changing a later layer's prompt changes the output.
    other = apply(deep_prompts=deep.at[2].set(0.0))
    self.assertFalse(np.allclose(other, out))
    with self.assertRaisesRegex(ValueError, 'deep_prompts must have shape'):
      apply(deep_prompts=deep[:2])
    with self.assertRaisesRegex(ValueError, 'not both'):
      apply(prompt=prompt, deep_prompts=deep)

  def test_lora_kernels_are_the_attention_and_mlp_kernels(self):
    paths = [p for p in metacf.masks.leaf_paths(self.params)
             if re.search(configs.Config.lora_targets, p)]
    self.assertLen(paths, 3 * 6)
    self.assertIn('block_0/attn/query/kernel', paths)
    self.assertIn('block_2/mlp/fc2/kernel', paths)


class LoraAtZeroTest(parameterized.TestCase):

  def test_lora_with_b_zero_leaves_a_accuracy_unchanged(self):
    config = dataclasses.replace(configs.get_config('smoke'),
                                 num_test_a=200)
    data = paradigms_data.load_data(config, raw_dir=RAW_DIR)
    pretrained = systems.make_model(config).init(
        jax.random.key(3), jnp.zeros([1, 28, 28, 1]))['params']
    evaluator = steps.Evaluator(config, data)
    probe = systems.System(config, config.variant('linear_probe'))
    lora = systems.System(config, config.variant('lora_r4'))
    base = probe.init(pretrained, jax.random.key(0))
    params = lora.init(pretrained, jax.random.key(0))
    for leaf in jax.tree.leaves(params['lora']):
      self.assertEqual(leaf.ndim, 2)
    b = [x['b'] for x in jax.tree.leaves(
        params['lora'], is_leaf=lambda x: isinstance(x, dict) and 'b' in x)]
    self.assertTrue(all(not np.any(np.asarray(x)) for x in b))
    images = jnp.asarray(data['a_test']['image'])
    np.testing.assert_array_equal(lora.logits(params, images, 'a'),
                                  probe.logits(base, images, 'a'))
    before = evaluator.accuracy(probe, base, 'a')
    self.assertEqual(evaluator.accuracy(lora, params, 'a'), before)
    self.assertEqual(evaluator.accuracy(lora, params, 'a', adapted=False),
                     before)
