r"""Text paradigms: a small encoder-decoder pre-trained three ways, adapted
every way, with forgetting measured and predicted.

Three copies of one encoder-decoder (``experiments.common.models``) are
pre-trained on Tiny Shakespeare, characters, for the same XLA FLOP count: T5
span corruption, BART text infilling and BERT-style token masking
(``metacf.noise``). Each is evaluated on the validation text under all three
corruptions (:mod:`corrupt`), then adapted to task B, speaker attribution of
the ten most frequent speakers from K speeches each, by every variant of
``config.variants``. Per run: B's test accuracy, trainable parameters and
parameters added per task, the pre-training objective's validation loss
before and after (forgetting), wall time. Before training,
``metacf.jacobian.predicted_forgetting`` predicts the change of the
objective's loss under each variant's parametrisation.

Every pre-training is an orbax checkpoint (``workdir/checkpoints/``), every
run and prediction a JSON record (``workdir/runs/``,
``workdir/predictions/``): a run started again resumes.
"""

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import loop
from experiments.common import stats
from experiments.common import utils
from experiments.text_paradigms import corrupt
from experiments.text_paradigms import data as data_lib
from experiments.text_paradigms import reference
from experiments.text_paradigms import report
from experiments.text_paradigms import systems
from experiments.text_paradigms.configs import Config
from experiments.text_paradigms.configs import Variant
from experiments.text_paradigms.report import format_table  # For main.py.
import metacf.distill
import metacf.jacobian
import metacf.replay

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'

Params = Any


# ------------------------------------------------------------ denoising


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def denoise_loss(system: systems.System, params: Params, inputs: jax.Array,
                 targets: jax.Array) -> jax.Array:
  """Mean token cross-entropy over the non-PAD targets."""
  logits = system.denoise_logits(params, inputs, targets)
  nll = -systems.token_log_probs(logits, targets)
  return masked_mean(nll, targets != data_lib.PAD)


def train_batch(key: jax.Array, windows: jax.Array, objective: str,
                sentinel_start: int) -> tuple[jax.Array, jax.Array]:
  keys = jax.random.split(key, windows.shape[0])
  return jax.vmap(lambda k, w: corrupt.train_example(
      k, w, objective, sentinel_start))(keys, windows)


def pretrain(config: Config, objective: str, data: data_lib.TextData,
             workdir: str) -> tuple[Params, dict[str, Any]]:
  """One pre-trained copy; T5 gets the FLOPs of the full-format objectives.

  Adam (warm-up, cosine decay, global-norm clipping at 1) on windows of
  ``seq_length`` characters at random offsets of the pre-training text,
  corrupted by ``objective``'s own kernel. ``pretrain_steps`` steps for
  BART and BERT; for T5, whose targets are shorter, the steps whose XLA
  FLOP count (``cost_analysis``) equals theirs.
  """
  vocab = data.vocab
  system = systems.System(config, vocab, data.speakers, None,
                          Variant('pretrain', 'full', 1.0))
  key = systems.key_for(config.pretrain_seed, 'pretrain')
  tokens = jnp.asarray(data.pretrain_tokens)
  length, batch = config.seq_length, config.pretrain_batch_size

  def make_step(objective, tx):
    @jax.jit
    def step(state, i):
      params, opt_state = state
      k = jax.random.fold_in(systems.key_for(config.pretrain_seed, 'batch',
                                             objective), i)
      kw, kc = jax.random.split(k)
      starts = jax.random.randint(kw, [batch], 0,
                                  tokens.shape[0] - length + 1)
      windows = jax.vmap(lambda s: jax.lax.dynamic_slice(
          tokens, [s], [length]))(starts)
      inputs, targets = train_batch(kc, windows, objective,
                                    vocab.sentinel_start)
      loss, grads = jax.value_and_grad(
          lambda p: denoise_loss(system, p, inputs, targets))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    return step

  def init_params():
    x = jnp.zeros([1, length], jnp.int32)
    return system.model.init(key, x, x)['params']

  # Equal compute: each objective's steps from its XLA FLOP count.
  probe_tx = optax.adam(1e-3)
  params0 = init_params()
  state0 = (params0, probe_tx.init(params0))
  flops = {o: _flops(make_step(o, probe_tx), state0, jnp.int32(0))
           for o in {'bart', objective}}
  total = config.pretrain_steps
  if flops[objective] and flops['bart']:
    total = max(1, int(round(config.pretrain_steps * flops['bart']
                             / flops[objective] / config.checkpoint_every))
                ) * config.checkpoint_every
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, max(1, total // 20), total)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  step = make_step(objective, tx)
  meta = {'history': [], 'train_time_s': 0.0, 'steps': total,
          'flops_per_step': flops[objective],
          'flops_per_step_bart': flops['bart']}

  def chunk(state, done):
    start = time.perf_counter()
    losses = []
    for i in range(done, done + config.checkpoint_every):
      state, loss = step(state, jnp.int32(i))
      losses.append(loss)
    mean = float(jnp.mean(jnp.stack(losses)))
    meta['train_time_s'] += time.perf_counter() - start
    meta['history'].append({'step': done + config.checkpoint_every,
                            'loss': mean})
    return state, f'loss {mean:.4f}'

  recipe = {'objective': objective, 'steps': total,
            **{f: getattr(config, f) for f in (
                'seq_length', 'd_model', 'num_heads', 'mlp_dim',
                'num_layers', 'pretrain_seed', 'pretrain_batch_size',
                'pretrain_lr', 'checkpoint_every')}}
  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', objective), name=objective,
      unit='step', total=total, stride=config.checkpoint_every,
      init=lambda: (init_params(), tx.init(init_params())), step=chunk,
      recipe=recipe, meta=meta, progress_bar=config.progress_bar)
  return state[0], meta


def _flops(fn, *args) -> float | None:
  """XLA's FLOP count of ``fn(*args)`` (None where the backend has none)."""
  try:
    cost = fn.lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


class DenoiseEval:
  """The validation windows under each corruption, in each format."""

  def __init__(self, config: Config, data: data_lib.TextData):
    self.config = config
    win = data_lib.windows(data.valid_tokens, config.seq_length,
                           config.num_valid,
                           systems.key_for(0, 'valid_windows'))
    self.windows = jnp.asarray(win)
    self.sentinel_start = data.vocab.sentinel_start
    self.examples = {}
    for c in corrupt.CORRUPTIONS:
      keys = jax.random.split(systems.key_for(0, 'valid_noise', c),
                              config.num_valid)
      for fmt in ('t5', 'full'):
        self.examples[c, fmt] = jax.vmap(
            lambda k, w: corrupt.eval_example(k, w, c, fmt,
                                              self.sentinel_start)
        )(keys, self.windows)
    self._metrics = {}

  def metrics(self, system: systems.System, params: Params,
              objective: str, corruption: str) -> dict[str, float]:
    """Loss (all targets), loss on the hidden tokens, unit exact match."""
    fmt = corrupt.FORMAT[objective]
    ex = self.examples[corruption, fmt]
    if fmt not in self._metrics:
      self._metrics[fmt] = jax.jit(lambda p, e: _denoise_metrics(
          system, p, e, self.config.seq_length))
    out = self._metrics[fmt](params, ex)
    return {k: float(v) for k, v in out.items()}


def _denoise_metrics(system, params, ex, length):
  logits = system.denoise_logits(params, ex.inputs, ex.targets)
  nll = -systems.token_log_probs(logits, ex.targets)
  hidden = ex.unit >= 0
  wrong = (jnp.argmax(logits, -1) != ex.targets) & hidden
  unit = jnp.where(hidden, ex.unit, length)
  per_unit_wrong = jax.vmap(lambda w, u: jax.ops.segment_max(
      w.astype(jnp.int32), u, num_segments=length + 1))(wrong, unit)
  exists = jax.vmap(lambda h, u: jax.ops.segment_max(
      h.astype(jnp.int32), u, num_segments=length + 1))(hidden, unit)
  exists = exists[:, :length] > 0
  exact = jnp.sum(exists & (per_unit_wrong[:, :length] <= 0)) / jnp.maximum(
      jnp.sum(exists), 1)
  return {'loss': masked_mean(nll, ex.targets != data_lib.PAD),
          'hidden_loss': masked_mean(nll, hidden),
          'exact_match': exact}


# ----------------------------------------------------------- adaptation


class Runner:
  """One pre-trained model's adaptations: jitted functions per variant,
  compiled once and reused across seeds and K."""

  def __init__(self, config: Config, data: data_lib.TextData,
               objective: str, pretrained: Params, evaluator: DenoiseEval):
    self.config, self.data, self.objective = config, data, objective
    self.pretrained = pretrained
    self.evaluator = evaluator
    self.sentinel_start = data.vocab.sentinel_start
    self.b_train = {k: jnp.asarray(data.b_train[k])
                    for k in ('tokens', 'mask', 'label')}
    self.b_test = {k: jnp.asarray(data.b_test[k])
                   for k in ('tokens', 'mask', 'label')}
    self._fns: dict[str, Any] = {}
    base = self.system(Variant('base', 'full', 1.0))
    self.before = evaluator.metrics(base, pretrained, objective, objective)
    self.replay = metacf.replay.replay_buffer(config.replay_capacity)

  def system(self, variant: Variant) -> systems.System:
    return systems.System(self.config, self.data.vocab, self.data.speakers,
                          self.pretrained, variant)

  def fns(self, variant: Variant) -> dict[str, Any]:
    if variant.name not in self._fns:
      self._fns[variant.name] = self._make_fns(variant)
    return self._fns[variant.name]

  def _make_fns(self, variant: Variant) -> dict[str, Any]:
    config, objective = self.config, self.objective
    system = self.system(variant)
    tx = optax.sgd(variant.learning_rate, momentum=config.momentum)

    def loss_fn(t, pre, batch, key, buffer_state):
      s = system.bind(pre)
      scores = s.b_scores(t, batch['tokens'], batch['mask'])
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          scores, batch['label']))
      if variant.kind == 'lwf':
        inputs, targets = train_batch(key, batch['tokens'], objective,
                                      self.sentinel_start)
        new = s.denoise_logits(s.a_params(t), inputs, targets)
        old = jax.lax.stop_gradient(s.denoise_logits(pre, inputs, targets))
        kd = metacf.distill.tempered_distillation_loss(
            new, old, config.lwf_temperature)
        loss += config.lwf_weight * masked_mean(kd, targets != data_lib.PAD)
      elif variant.kind == 'replay':
        k_sample, k_noise = jax.random.split(key)
        replayed = self.replay.sample(k_sample, buffer_state,
                                      config.replay_batch).items
        inputs, targets = train_batch(k_noise, replayed, objective,
                                      self.sentinel_start)
        loss += denoise_loss(s, s.a_params(t), inputs, targets)
      return loss

    @jax.jit
    def step(t, opt_state, pre, batch, key, buffer_state):
      loss, grads = jax.value_and_grad(loss_fn)(t, pre, batch, key,
                                                buffer_state)
      updates, opt_state = tx.update(grads, opt_state, t)
      return optax.apply_updates(t, updates), opt_state, loss

    @jax.jit
    def predict_b(t, pre, tokens, mask):
      return jnp.argmax(system.bind(pre).b_scores(t, tokens, mask), -1)

    return {'system': system, 'tx': tx, 'step': step,
            'predict_b': predict_b}

  def buffer(self, key: jax.Array) -> Any:
    """The replay buffer: pre-training windows through reservoir sampling."""
    config = self.config
    wins = jnp.asarray(data_lib.windows(
        self.data.pretrain_tokens, self.data.b_train['tokens'].shape[1],
        4 * config.replay_capacity, utils.name_key(key, 'windows')))
    state = self.replay.init(wins[0])
    return self.replay.add(utils.name_key(key, 'reservoir'), state, wins)

  def b_accuracy(self, predict, t) -> float:
    """B's test accuracy (chunks padded to one shape)."""
    return float(np.mean(self.b_predictions(predict, t)
                         == self.data.b_test['label']))

  def b_predictions(self, predict, t) -> np.ndarray:
    n, size = len(self.data.b_test['label']), self.config.eval_batch_size
    out = []
    for lo in range(0, n, size):
      idx = np.minimum(np.arange(lo, lo + size), n - 1)
      pred = predict(t, self.pretrained, self.b_test['tokens'][idx],
                     self.b_test['mask'][idx])
      out.append(np.asarray(pred)[:min(size, n - lo)])
    return np.concatenate(out)

  def adapt(self, variant: Variant, shots: int | None,
            seed: int) -> dict[str, Any]:
    """One gradient run: train on B's K-shot set, evaluate B and A."""
    config = self.config
    fns = self.fns(variant)
    system = fns['system']
    key = systems.key_for(seed, 'adapt', self.objective, variant.name)
    rows = data_lib.shot_indices(self.data.b_train['label'], shots,
                                 systems.key_for(seed, 'shots'))
    rng = utils.numpy_rng(utils.name_key(key, 'batches'))
    batches = rng.choice(rows, size=(config.steps, config.batch_size))
    t = system.init(utils.name_key(key, 'init'))
    opt_state = fns['tx'].init(t)
    buffer_state = (self.buffer(systems.key_for(seed, 'buffer'))
                    if variant.kind == 'replay' else None)
    batch_at = lambda i: {k: v[batches[i]] for k, v in self.b_train.items()}
    step_key = lambda i: jax.random.fold_in(utils.name_key(key, 'step'), i)
    # Compile (and warm) outside the timed loop; the result is discarded.
    jax.block_until_ready(fns['step'](t, opt_state, self.pretrained,
                                      batch_at(0), step_key(0), buffer_state))
    losses = []
    start = time.perf_counter()
    for i in range(config.steps):
      t, opt_state, loss = fns['step'](t, opt_state, self.pretrained,
                                       batch_at(i), step_key(i),
                                       buffer_state)
      losses.append(loss)
    jax.block_until_ready(t)
    train_time = time.perf_counter() - start
    losses = np.asarray(jnp.stack(losses))
    after = self.evaluator.metrics(system, system.a_params(t),
                                   self.objective, self.objective)
    return {
        'b_accuracy': self.b_accuracy(fns['predict_b'], t),
        'num_shots': int(len(rows)),
        **system.num_params(t),
        'a_before': self.before, 'a_after': after,
        'forgetting_loss': after['loss'] - self.before['loss'],
        'forgetting_exact_match': (self.before['exact_match']
                                   - after['exact_match']),
        'train_loss_first': float(losses[0]),
        'train_loss_last': float(losses[-1]),
        'train_time_s': train_time,
        'step_ms': 1e3 * train_time / config.steps,
    }

  # --------------------------------------------------------- few-shot

  def cloze(self, variant: Variant, shots: int | None, seed: int
            ) -> dict[str, Any]:
    """Zero-/few-shot: the masked speaker name scored by the decoder."""
    config, data, vocab = self.config, self.data, self.data.vocab
    key = systems.key_for(seed, 'cloze', variant.name)
    rows = data_lib.shot_indices(data.b_train['label'], shots,
                                 systems.key_for(seed, 'shots'))
    by_speaker = [rows[data.b_train['label'][rows] == c]
                  for c in range(data_lib.NUM_SPEAKERS)]
    rng = utils.numpy_rng(key)
    names = [vocab.encode(s) for s in data.speakers]
    width = max(len(n) for n in names)
    enc_len = config.context_length + width + 2
    dec_len = width + 2
    n = len(data.b_test['label'])
    enc = np.full([n, len(names), enc_len], data_lib.PAD, np.int32)
    dec = np.full([n, len(names), dec_len], data_lib.PAD, np.int32)
    scored = np.zeros([n, len(names), dec_len], bool)
    demos_used = []
    start = time.perf_counter()
    for i, query in enumerate(data.b_test['text']):
      demos = []
      for c in rng.permutation(data_lib.NUM_SPEAKERS)[:variant.max_demos]:
        r = rng.choice(by_speaker[c])
        demos.append((data.speakers[c], data.b_train['text'][r]))
      rest, used = data_lib.cloze_prompts(
          vocab, query, demos, length=config.context_length,
          query_chars=config.query_chars, demo_chars=config.demo_chars)
      demos_used.append(used)
      for c, name in enumerate(names):
        if self.objective == 't5':
          s = self.sentinel_start
          e = np.concatenate([[s], rest, [data_lib.EOS]])
          d = np.concatenate([[s], name, [data_lib.EOS]])
          m = np.arange(len(d)) >= 1
        else:
          holes = len(name) if self.objective == 'bert' else 1
          e = np.concatenate([np.full([holes], data_lib.MASK), rest])
          d = np.concatenate([name, rest[:1]])  # the name, then ':'
          m = np.ones([len(d)], bool)
        enc[i, c, :len(e)], dec[i, c, :len(d)] = e, d
        scored[i, c, :len(d)] = m
    if 'cloze' not in self._fns:
      system = self.system(variant)

      @jax.jit
      def scores(pre, e, d, m):
        flat = lambda a: a.reshape(-1, a.shape[-1])
        logits = system.denoise_logits(pre, flat(e), flat(d))
        logp = systems.token_log_probs(logits, flat(d)) * flat(m)
        return jnp.sum(logp, -1).reshape(e.shape[:2])
      self._fns['cloze'] = scores
    size = config.eval_batch_size // 10 or 1
    preds = []
    for lo in range(0, n, size):
      idx = np.minimum(np.arange(lo, lo + size), n - 1)
      s = self._fns['cloze'](self.pretrained, enc[idx], dec[idx],
                             scored[idx])
      preds.append(np.asarray(jnp.argmax(s, -1))[:min(size, n - lo)])
    preds = np.concatenate(preds)
    return {
        'b_accuracy': float(np.mean(preds == data.b_test['label'])),
        'num_shots': int(len(rows)),
        'trainable_params': 0, 'params_per_task': 0,
        'demos_mean': float(np.mean(demos_used)),
        'a_before': self.before, 'a_after': self.before,
        'forgetting_loss': 0.0, 'forgetting_exact_match': 0.0,
        'eval_time_s': time.perf_counter() - start,
    }

  # ------------------------------------------------------- prediction

  def predict(self, variant: Variant) -> dict[str, Any]:
    """``predicted_forgetting`` of the objective's loss under the variant.

    Task A: the first ``num_ntk_a`` validation windows under the objective's
    own corruption, one row per target token. Task B: the first
    ``ntk_b_per_speaker`` speeches per speaker of seed 0's order (in every
    K's set), B's ten logits (``System.b_scores``) padded to the
    vocabulary's width. For
    ``lwf`` and ``replay`` B's task also holds as many token rows of the
    second loss term (so both terms weigh as in training): the pre-trained
    model's argmax on the corrupted B speeches (a hard-label stand-in for
    the distillation), or replayed windows' own targets. Full-batch gradient descent, learning rate
    divided by ``1 - momentum``, ``config.steps`` steps.
    """
    config = self.config
    fns = self.fns(variant)
    system = fns['system']
    seed = config.seeds[0]
    key = systems.key_for(seed, 'predict', self.objective, variant.name)
    t = system.init(utils.name_key(key, 'init'))
    ex = self.evaluator.examples[self.objective,
                                 corrupt.FORMAT[self.objective]]
    na = config.num_ntk_a
    a_in, a_tg = ex.inputs[:na], ex.targets[:na]
    a_ex, a_pos = np.nonzero(np.asarray(a_tg) != data_lib.PAD)
    y_a = a_tg[a_ex, a_pos]
    rows = data_lib.shot_indices(self.data.b_train['label'],
                                 config.ntk_b_per_speaker,
                                 systems.key_for(seed, 'shots'))
    b_tokens, b_mask = self.b_train['tokens'][rows], self.b_train['mask'][rows]
    y_b = self.b_train['label'][rows]
    # One output row per example of predicted_forgetting: B's rows as its
    # training loss sees them (a speech's ten logits), or a denoising target
    # token. x names the rows; its key
    # says which (static): 'a' (A's tokens), 'b' (B's rows), 'mix' (B's rows
    # then the tokens of LwF's or replay's term).
    width = self.data.vocab.size
    nb = len(rows)
    b_keep = np.arange(nb)
    x_b = {'b': {'row': jnp.asarray(b_keep)}}
    extra = None
    if variant.kind in ('lwf', 'replay'):
      if variant.kind == 'lwf':
        source = b_tokens
      else:
        source = self.replay.sample(utils.name_key(key, 'sample'),
                                    self.buffer(systems.key_for(
                                        seed, 'buffer')),
                                    config.replay_batch).items
      inputs, targets = train_batch(utils.name_key(key, 'noise'), source,
                                    self.objective, self.sentinel_start)
      valid = np.argwhere(np.asarray(targets) != data_lib.PAD)
      pick = valid[np.sort(utils.numpy_rng(utils.name_key(key, 'rows'))
                           .choice(len(valid), size=min(nb, len(valid)),
                                   replace=False))]
      if variant.kind == 'lwf':
        old = system.denoise_logits(self.pretrained, inputs, targets)
        y_extra = jnp.argmax(old[pick[:, 0], pick[:, 1]], -1)
      else:
        y_extra = targets[pick[:, 0], pick[:, 1]]
      extra = (inputs, targets)
      n_extra = len(pick)
      x_b = {'mix': {
          'token': jnp.asarray(np.repeat([False, True], [nb, n_extra])),
          'row': jnp.asarray(np.concatenate([b_keep, np.zeros(n_extra,
                                                              int)])),
          'index': jnp.asarray(np.concatenate([np.zeros(nb, int),
                                               pick[:, 0]])),
          'pos': jnp.asarray(np.concatenate([np.zeros(nb, int),
                                             pick[:, 1]]))}}
      y_b = jnp.concatenate([y_b, y_extra.astype(y_b.dtype)])
    x_a = {'a': {'index': jnp.asarray(a_ex), 'pos': jnp.asarray(a_pos)}}

    def b_out(t, row):
      return systems.pad_columns(system.b_scores(t, b_tokens, b_mask),
                                 width)[row]

    def tokens(t, batch, index, pos):
      return system.denoise_logits(system.a_params(t), *batch)[index, pos]

    def apply_fn(t, x):
      if 'a' in x:
        return tokens(t, (a_in, a_tg), x['a']['index'], x['a']['pos'])
      if 'b' in x:
        return b_out(t, x['b']['row'])
      m = x['mix']
      return jnp.where(m['token'][:, None],
                       tokens(t, extra, m['index'], m['pos']),
                       b_out(t, m['row']))

    lr = variant.learning_rate / (1.0 - config.momentum)
    fn = jax.jit(lambda t, xa, ya, xb, yb: metacf.jacobian.predicted_forgetting(
        apply_fn, t, (xa, ya), (xb, yb), lr=lr, num_steps=config.steps,
        loss='cross_entropy'))
    start = time.perf_counter()
    value = float(fn(t, x_a, y_a, x_b, y_b))
    return {'predicted_forgetting': value, 'num_a_rows': int(len(y_a)),
            'num_b_rows': int(len(y_b)), 'lr': lr,
            'num_steps': config.steps,
            'time_s': time.perf_counter() - start}


# ---------------------------------------------------------------- driver


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Pre-trains, adapts, predicts; writes ``results.json`` and ``.md``.

  Args:
    config: The experiment's configuration.
    workdir: Checkpoints, ``runs/``, ``predictions/``, results, figures.
    raw_dir, data_dir: As ``metacf.data.load_speeches``.

  Returns:
    The results (also in ``workdir/results.json``).
  """
  start = time.perf_counter()
  log = logging.getLogger('experiments')
  data = data_lib.load(b_test_per_speaker=config.b_test_per_speaker,
                       b_length=config.b_length, raw_dir=raw_dir,
                       data_dir=data_dir)
  log.info('vocab %d; pre-training %d chars; B train %d, test %d',
           data.vocab.size, len(data.pretrain_tokens),
           len(data.b_train['label']), len(data.b_test['label']))
  evaluator = DenoiseEval(config, data)
  per_objective = {}
  for objective in config.objectives:
    pretrained, meta = pretrain(config, objective, data, workdir)
    runner = Runner(config, data, objective, pretrained, evaluator)
    base = runner.system(Variant('base', 'full', 1.0))
    cross = {c: evaluator.metrics(base, pretrained, objective, c)
             for c in corrupt.CORRUPTIONS}
    gradient = [v for v in config.variants if v.gradient]
    predictions = loop.resumable_records(
        gradient,
        path=lambda v: os.path.join(workdir, 'predictions', objective,
                                    f'{v.name}.json'),
        recipe=lambda v: {'config': _recipe(config),
                          'variant': dataclasses.asdict(v)},
        compute=runner.predict,
        summary=lambda r: f'predicted {r["predicted_forgetting"]:+.4f}',
        desc=f'{objective} predictions', progress_bar=config.progress_bar)
    items = [(v, k, s) for v in config.variants for k in config.shots
             for s in config.seeds]
    records = loop.resumable_records(
        items,
        path=lambda i: os.path.join(workdir, 'runs', objective, i[0].name,
                                    f'K{i[1] or "all"}_seed{i[2]}.json'),
        recipe=lambda i: {'config': _recipe(config),
                          'variant': dataclasses.asdict(i[0]),
                          'shots': i[1], 'seed': i[2]},
        compute=lambda i: (runner.adapt(*i) if i[0].gradient
                           else runner.cloze(*i)),
        summary=lambda r: f'B {r["b_accuracy"]:.3f} forgetting '
                          f'{r["forgetting_loss"]:+.4f}',
        desc=f'{objective} runs', progress_bar=config.progress_bar)
    runs = {}
    for (v, k, s), r in zip(items, records):
      runs.setdefault(v.name, {}).setdefault(report.shots_key(k), []).append(
          {'seed': s, **r})
    per_objective[objective] = {
        'pretrain': meta, 'denoising': cross, 'before': runner.before,
        'predictions': {v.name: p for v, p in zip(gradient, predictions)},
        'runs': runs}
  bow = {}
  for k in config.shots:
    accs = []
    for seed in config.seeds:
      rows = data_lib.shot_indices(data.b_train['label'], k,
                                   systems.key_for(seed, 'shots'))
      accs.append(reference.bag_of_words_accuracy(
          data.b_train['text'][rows], data.b_train['label'][rows],
          data.b_test['text'], data.b_test['label'],
          length=config.b_length))
    bow[report.shots_key(k)] = stats.mean_std(accs)
  results = {
      **utils.run_info(),
      'bag_of_words': bow,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'data': {'vocab_size': data.vocab.size,
               'pretrain_chars': len(data.pretrain_tokens),
               'valid_chars': len(data.valid_tokens),
               'speakers': data_lib.check_labels(data)},
      'objectives': per_objective,
      'wall_time_s': time.perf_counter() - start,
  }
  results['summary'] = report.summarize(config, results)
  results['correlation'] = report.correlation(config, results)
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(report.markdown(results))
  report.figures(results, os.path.join(workdir, 'figures'))
  return results


def _recipe(config: Config) -> dict[str, Any]:
  """The config fields a run's numbers depend on (not the lists of runs)."""
  skip = {'seeds', 'shots', 'variants', 'objectives', 'progress_bar',
          'eval_batch_size'}
  return {f.name: getattr(config, f.name)
          for f in dataclasses.fields(config) if f.name not in skip}

