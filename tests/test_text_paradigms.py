"""Tests of ``experiments/text_paradigms`` (Tiny Shakespeare encoder-decoder).

The corruptions' formats are checked against the ``metacf.noise`` kernels
they come from and against a NumPy re-implementation; the cloze prompt, the
vocabulary and B's split (no B test speech in the pre-training text) on their
own; then ``train_and_evaluate(smoke)`` runs once on the real file and every
objective x variant x K must be there with finite numbers, parameter counts
from formulas, and a resumed run gives the same numbers.
"""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _smoke_run
from _smoke_run import RAW_DIR
from experiments.text_paradigms import configs
from experiments.text_paradigms import corrupt
from experiments.text_paradigms import data as data_lib
from experiments.text_paradigms import systems
from experiments.text_paradigms import train

HAVE_TEXT = RAW_DIR is not None and os.path.exists(
    os.path.join(RAW_DIR, 'tiny_shakespeare', 'input.txt'))
needs_text = pytest.mark.skipif(
    not HAVE_TEXT, reason='tiny_shakespeare/input.txt not staged')

L, S = 48, 133   # sequence length, sentinel_start of a 134-token vocab


def _tokens(seed, length=L):
  return jax.random.randint(jax.random.key(seed), (length,), 5, 60,
                            dtype=jnp.int32)


def _runs(noise):
  """Maximal runs of True: list of (start, stop)."""
  out, i = [], 0
  while i < len(noise):
    if noise[i]:
      j = i
      while j < len(noise) and noise[j]:
        j += 1
      out.append((i, j))
      i = j
    else:
      i += 1
  return out


def _reference(tokens, noise, starts, fmt):
  """NumPy version of corrupt.build (unpadded)."""
  tokens = list(np.asarray(tokens))
  units = [i for i in range(len(tokens)) if starts[i]]
  inputs, targets = [], []
  u = -1
  for i, t in enumerate(tokens):
    if starts[i]:
      u += 1
    if not noise[i]:
      inputs.append(t)
    elif starts[i]:
      inputs.append(S - u if fmt == 't5' else data_lib.MASK)
      if fmt == 't5':
        targets.append(S - u)
    if noise[i] and fmt == 't5':
      targets.append(t)
  if fmt == 't5':
    inputs.append(data_lib.EOS)
    targets.append(data_lib.EOS)
  else:
    targets = tokens
  del units
  return inputs, targets


@pytest.mark.parametrize('corruption', corrupt.CORRUPTIONS)
@pytest.mark.parametrize('fmt', ('t5', 'full'))
def test_eval_example_matches_numpy_reference(corruption, fmt):
  for seed in range(5):
    tokens = _tokens(seed)
    key = jax.random.key(100 + seed)
    noise, starts = corrupt.noise_units(key, corruption, L, tokens)
    noise, starts = np.asarray(noise), np.asarray(starts)
    ex = corrupt.eval_example(key, tokens, corruption, fmt, S)
    inputs, targets = _reference(tokens, noise, starts, fmt)
    got_in = np.asarray(ex.inputs)
    if not (corruption == 'bart' and fmt == 'full'):
      np.testing.assert_array_equal(got_in[:len(inputs)], inputs)
      assert np.all(got_in[len(inputs):] == data_lib.PAD)
    got_tg = np.asarray(ex.targets)
    np.testing.assert_array_equal(got_tg[:len(targets)], targets)
    assert np.all(got_tg[len(targets):] == data_lib.PAD)
    # Each unit's tokens are exactly the hidden tokens of one run/unit.
    unit = np.asarray(ex.unit)
    assert (unit >= 0).sum() == noise.sum()
    hidden = got_tg[unit >= 0]
    np.testing.assert_array_equal(np.sort(hidden),
                                  np.sort(np.asarray(tokens)[noise]))


@pytest.mark.parametrize('objective', corrupt.CORRUPTIONS)
def test_matched_format_is_the_kernels_output(objective):
  fmt = corrupt.FORMAT[objective]
  for seed in range(8):
    tokens, key = _tokens(seed), jax.random.key(seed)
    ex = corrupt.eval_example(key, tokens, objective, fmt, S)
    inputs, targets = corrupt.train_example(key, tokens, objective, S)
    n_in, n_tg = inputs.shape[0], targets.shape[0]
    np.testing.assert_array_equal(ex.inputs[:n_in], inputs)
    assert np.all(np.asarray(ex.inputs[n_in:]) == data_lib.PAD)
    np.testing.assert_array_equal(ex.targets[:n_tg], targets)


def test_hidden_counts_follow_the_ratios():
  tokens = _tokens(0, 128)
  for corruption, count in (('t5', round(0.15 * 128)),
                            ('bart', math.ceil(0.3 * 128)),
                            ('bert', round(0.15 * 128))):
    noise, starts = corrupt.noise_units(jax.random.key(3), corruption, 128,
                                        tokens)
    assert int(noise.sum()) == count, corruption
    if corruption == 'bert':
      np.testing.assert_array_equal(noise, starts)   # one unit per token
    else:
      runs = _runs(np.asarray(noise))
      assert int(starts.sum()) == len(runs)


def test_eval_example_jits_and_vmaps_like_a_loop():
  keys = jax.random.split(jax.random.key(0), 4)
  tokens = jnp.stack([_tokens(i) for i in range(4)])
  for corruption in corrupt.CORRUPTIONS:
    fn = jax.jit(jax.vmap(lambda k, t: corrupt.eval_example(
        k, t, corruption, 't5', S)))
    batched = fn(keys, tokens)
    for i in range(4):
      one = corrupt.eval_example(keys[i], tokens[i], corruption, 't5', S)
      for a, b in zip(batched, one):
        np.testing.assert_array_equal(a[i], b)


def test_bad_names_raise():
  with pytest.raises(ValueError, match='corruption'):
    corrupt.noise_units(jax.random.key(0), 'span', L, _tokens(0))
  with pytest.raises(ValueError, match='fmt'):
    corrupt.build(_tokens(0), jnp.zeros(L, bool), jnp.zeros(L, bool), 'x',
                  S, L)
  with pytest.raises(ValueError, match='kind'):
    configs.Variant('x', 'distill', 0.1)
  with pytest.raises(ValueError, match='learning_rate'):
    configs.Variant('x', 'full')
  with pytest.raises(ValueError, match='objectives'):
    configs.Config(objectives=('gpt',))


def test_vocab_round_trip_and_layout():
  vocab = data_lib.Vocab('\n !:ABab')
  assert vocab.size == data_lib.NUM_SPECIAL + 8 + data_lib.NUM_SENTINELS
  assert vocab.sentinel_start == vocab.size - 1
  ids = vocab.encode('Ab!\n?')
  assert ids[-1] == data_lib.UNK
  assert vocab.decode(ids[:-1]) == 'Ab!\n'


def test_cloze_prompt_layout():
  vocab = data_lib.Vocab(''.join(sorted(set('ROMEO:JULIET\n hello world'))))
  rest, used = data_lib.cloze_prompts(
      vocab, 'hello world', [('ROMEO', 'hello'), ('JULIET', 'world')],
      length=30, query_chars=5, demo_chars=5)
  assert vocab.decode(rest) == ':\nhello\n\nROMEO:\nhello\n\n'
  assert used == 1          # JULIET's demo does not fit in 30 tokens


@needs_text
def test_b_split_is_held_out_of_pretraining():
  data = data_lib.load(b_test_per_speaker=5, b_length=32, raw_dir=RAW_DIR)
  assert len(data.speakers) == 10 and data.speakers[0] == 'GLOUCESTER'
  assert len(data.b_test['label']) == 50
  np.testing.assert_array_equal(np.bincount(data.b_test['label']), 5)
  text = data.vocab.decode(data.pretrain_tokens)
  for speech, label in zip(data.b_test['text'], data.b_test['label']):
    if len(speech) > 40:   # long enough to be unique in the corpus
      assert (f'{data.speakers[label]}:\n{speech}\n') not in text
  # Training speeches are in it.
  some = data.b_train['text'][np.argmax([len(t) for t in
                                         data.b_train['text']])]
  assert some in text
  assert not set(map(str, data.b_train['text'])) & set(
      map(str, data.b_test['text']))


def _run(workdir):
  config = configs.get_config('smoke')
  with jax.numpy_dtype_promotion('standard'):
    return train.train_and_evaluate(config, str(workdir), raw_dir=RAW_DIR)


def _numbers(results):
  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items()
              if not (k.endswith('time_s') or k == 'step_ms')}
    if isinstance(tree, list):
      return [strip(v) for v in tree]
    return tree
  return strip({'objectives': results['objectives'],
                'correlation': results['correlation']})


@needs_text
class SmokeTest(_smoke_run.SmokeRunTestCase):

  @classmethod
  def run_once(cls, workdir):
    return _run(workdir)

  def test_every_cell_is_present_and_finite(self):
    config = configs.get_config('smoke')
    for objective in config.objectives:
      per = self.results['objectives'][objective]
      for v in config.variants:
        for k in config.shots:
          runs = per['runs'][v.name]['all' if k is None else str(k)]
          self.assertLen(runs, len(config.seeds))
          for r in runs:
            self.assertBetween(r['b_accuracy'], 0.0, 1.0)
            self.assertTrue(np.isfinite(r['forgetting_loss']))
            if not v.gradient or v.kind in ('probe', 'prompt'):
              # The deployed model is the pre-trained one.
              self.assertEqual(r['forgetting_loss'], 0.0)
      for c, m in per['denoising'].items():
        self.assertIn(c, corrupt.CORRUPTIONS)
        self.assertTrue(np.isfinite(m['loss']) and np.isfinite(
            m['hidden_loss']))
        self.assertBetween(m['exact_match'], 0.0, 1.0)
      # Own corruption = the 'before' of every run.
      self.assertEqual(per['denoising'][objective], per['before'])
      for name, p in per['predictions'].items():
        self.assertTrue(np.isfinite(p['predicted_forgetting']), name)
        if name in ('probe', 'prompt_p5'):
          self.assertEqual(p['predicted_forgetting'], 0.0)

  def test_equal_compute_gives_t5_more_steps(self):
    per = self.results['objectives']
    t5, bart = per['t5']['pretrain'], per['bart']['pretrain']
    self.assertLess(t5['flops_per_step'], bart['flops_per_step'])
    self.assertGreater(t5['steps'], bart['steps'])

  def test_parameter_counts(self):
    config = configs.get_config('smoke')
    d, m, n = config.d_model, config.mlp_dim, config.num_layers
    cells = self.results['summary']['bert']
    count = lambda name: cells[name]['shots']['all']['trainable_params']
    self.assertEqual(count('probe'), d * 10 + 10)
    self.assertEqual(count('prompt_p5'), 5 * d)
    self.assertEqual(count('few_shot'), 0)
    # LoRA: q, k, v, out ([d, d] each as DenseGeneral) and fc1, fc2 per
    # block; encoder blocks have one attention, decoder blocks two.
    per_rank = (n * (4 * 2 * d + 2 * (d + m))
                + n * (2 * 4 * 2 * d + 2 * (d + m)))
    self.assertEqual(count('lora_r1'), per_rank)
    vocab = self.results['data']['vocab_size']
    attn = 4 * (d * d + d)
    mlp = d * m + m + m * d + d
    enc = n * (attn + mlp + 2 * 2 * d) + 2 * d
    dec = n * (2 * attn + mlp + 3 * 2 * d) + 2 * d
    self.assertEqual(count('full'), vocab * d + enc + dec)

  def test_spearman_over_gradient_cells(self):
    corr = self.results['correlation']
    config = configs.get_config('smoke')
    gradient = [v for v in config.variants if v.gradient]
    self.assertEqual(corr['n_all'], len(config.objectives) * len(gradient)
                     * len(config.shots))
    if corr['spearman_all'] is not None:
      self.assertBetween(corr['spearman_all'], -1.0, 1.0)

  def test_files_and_resume(self):
    for name in ('results.json', 'results.md', 'figures/accuracy_vs_k.png',
                 'figures/predicted_vs_measured.png'):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, name)), name)
    with open(os.path.join(self.workdir, 'results.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['correlation'], self.results['correlation'])
    copy = self._copy_of_run()
    shutil.rmtree(os.path.join(copy, 'runs', 'bart', 'lora_r1'))
    os.remove(os.path.join(copy, 'predictions', 't5', 'lwf.json'))
    again = _run(copy)
    self.assertEqual(_numbers(again), _numbers(self.results))
