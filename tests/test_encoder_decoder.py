"""Tests for experiments.common.models.EncoderDecoder and metacf.adapters on it.

The model is built from ``flax.linen.MultiHeadDotProductAttention``, so these
tests are also the check that :mod:`metacf.adapters` (LoRA on 3-D
``DenseGeneral`` kernels with ``flax_fan_in_axes``, soft prompts, freezing by
a path regex) works on a flax model as a user would write it. The unmerged
LoRA reference runs the same model with every adapted ``Dense`` /
``DenseGeneral`` call replaced, through ``nn.intercept_methods``, by
``metacf.adapters.lora_dense`` on the frozen kernel.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import models
from metacf import adapters
from metacf import masks
from metacf._src import optim

_VOCAB = 13
_BOS = 1
_PAD = 0
# Small enough to compile in about a second; the default size is checked in
# test_default_size.
_SMALL = dict(vocab_size=_VOCAB, d_model=32, num_heads=4, mlp_dim=64,
              max_len=16)
# The paper's W_q, W_v and every MLP kernel (encoder, decoder self- and
# cross-attention).
_LORA_TARGETS = r'(query|value)/kernel$|mlp/fc[12]/kernel$'
_ALPHA = 4.0


def _tokens(seed, shape):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(2, _VOCAB, size=shape), jnp.int32)


@functools.cache
def _setup(tie_embeddings=True, positions='sinusoidal'):
  """The small model, its params (jitted init) and a batch; cached."""
  model = models.EncoderDecoder(**_SMALL, tie_embeddings=tie_embeddings,
                                positions=positions)
  inputs, targets = _tokens(0, (3, 9)), _tokens(1, (3, 7))
  decoder_inputs = models.shift_right(targets, _BOS)
  params = model.init(jax.random.key(0), inputs, decoder_inputs)['params']
  return model, params, inputs, targets, decoder_inputs


def _apply_fn(model, method='__call__'):
  def apply_fn(params, *args, **kwargs):
    return model.apply({'params': params}, *args, method=method, **kwargs)
  return apply_fn




def _loss(logits, targets):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, targets))


def _is_adapter(x):
  return x is None or (isinstance(x, dict) and set(x) == {'a', 'b'})


def _random_b(lora_params, seed=5):
  rng = np.random.default_rng(seed)
  def fill(adapter):
    if adapter is None:
      return None
    b = rng.normal(size=adapter['b'].shape).astype(np.float32) * 0.1
    return {'a': adapter['a'], 'b': jnp.asarray(b)}
  return jax.tree.map(fill, lora_params, is_leaf=_is_adapter)


def _unmerged_interceptor(lora_params, alpha):
  """Runs every adapted Dense/DenseGeneral as ``lora_dense`` (unmerged)."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__'
        or not isinstance(module, (nn.Dense, nn.DenseGeneral))):
      return next_fun(*args, **kwargs)
    node = lora_params
    for name in module.path:
      node = node[name]
    adapter = node['kernel']
    if adapter is None:
      return next_fun(*args, **kwargs)
    kernel = module.get_variable('params', 'kernel')
    bias = module.get_variable('params', 'bias')
    path = '/'.join(module.path) + '/kernel'
    f = adapters.flax_fan_in_axes(path, kernel)
    y = adapters.lora_dense(args[0], kernel, adapter['a'], adapter['b'],
                            alpha=alpha, fan_in_axes=f)
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return interceptor


class EncoderDecoderTest(parameterized.TestCase):

  def test_default_size(self):
    model = models.EncoderDecoder(vocab_size=68, max_len=64)
    inputs, decoder_inputs = _tokens(0, (2, 10)), _tokens(1, (2, 7))
    variables = jax.eval_shape(model.init, jax.random.key(0), inputs,
                               decoder_inputs)
    # Encoder layer: 4 (128^2 + 128) attention + 2 * 128 * 512 + 512 + 128
    # MLP + 2 * 256 LayerNorm; decoder: two attentions and three LayerNorms.
    attn = 4 * (128 * 128 + 128)
    mlp = 2 * 128 * 512 + 512 + 128
    encoder = 2 * (attn + mlp + 2 * 256) + 256
    decoder = 2 * (2 * attn + mlp + 3 * 256) + 256
    self.assertEqual(adapters.count_params(variables),
                     encoder + decoder + 68 * 128)
    self.assertEqual(adapters.count_params(variables), 934_912)
    q = variables['params']['encoder']['layers_0']['self_attn']['query']
    out = variables['params']['decoder']['layers_1']['cross_attn']['out']
    self.assertEqual(q['kernel'].shape, (128, 4, 32))
    self.assertEqual(out['kernel'].shape, (4, 32, 128))
    logits = jax.eval_shape(model.apply, variables, inputs, decoder_inputs)
    self.assertEqual(logits.shape, (2, 7, 68))
    self.assertEqual(logits.dtype, jnp.float32)

  @parameterized.named_parameters(
      ('tied_sinusoidal', True, 'sinusoidal'),
      ('separate_learnt', False, 'learnt'))
  def test_shapes(self, tie_embeddings, positions):
    model, params, inputs, _, decoder_inputs = _setup(
        tie_embeddings=tie_embeddings, positions=positions)
    self.assertEqual('logits' in params, not tie_embeddings)
    self.assertEqual('pos' in params['encoder'], positions == 'learnt')
    variables = {'params': params}
    shape = lambda *a, **k: jax.eval_shape(
        functools.partial(model.apply, **k), variables, *a).shape
    self.assertEqual(shape(inputs, decoder_inputs), (3, 7, _VOCAB))
    self.assertEqual(shape(inputs, method='encode'), (3, 9, 32))
    prompt = jnp.ones((5, 32))
    self.assertEqual(shape(inputs, prompt=prompt, method='encode'),
                     (3, 14, 32))
    mask = models.encoder_mask(inputs, prompt=prompt)
    self.assertEqual(mask.shape, (3, 14))
    self.assertEqual(mask.dtype, jnp.bool_)
    self.assertEqual(shape(jnp.ones((3, 14, 32)), mask, decoder_inputs,
                           method='decode'), (3, 7, _VOCAB))
    self.assertEqual(shape(inputs, method='pooled_features'), (3, 32))

  def test_shift_right(self):
    targets = jnp.asarray([[5, 6, 7], [8, 9, 10]], jnp.int32)
    np.testing.assert_array_equal(models.shift_right(targets, 1),
                                  [[1, 5, 6], [1, 8, 9]])

  def test_decoder_is_causal(self):
    model, params, inputs, _, decoder_inputs = _setup()
    apply_fn = _apply_fn(model)
    base = apply_fn(params, inputs, decoder_inputs)
    t = 4
    changed = decoder_inputs.at[:, t].set((decoder_inputs[:, t] + 1) % _VOCAB)
    logits = apply_fn(params, inputs, changed)
    np.testing.assert_allclose(logits[:, :t], base[:, :t], atol=1e-6)
    self.assertGreater(float(jnp.min(jnp.max(
        jnp.abs(logits[:, t:] - base[:, t:]), axis=(0, 2)))), 1e-4)

  def test_encoder_padding_is_ignored(self):
    model, params, inputs, _, decoder_inputs = _setup()
    mask = jnp.arange(9)[None, :] < jnp.asarray([[9], [6], [3]])
    garbage = jnp.where(mask, inputs, _tokens(7, inputs.shape))
    self.assertFalse(bool(jnp.all(garbage == inputs)))
    apply_fn, encode, pool = (_apply_fn(model, m) for m in (
        '__call__', 'encode', 'pooled_features'))
    logits = apply_fn(params, inputs, decoder_inputs, input_mask=mask)
    np.testing.assert_array_equal(
        apply_fn(params, garbage, decoder_inputs, input_mask=mask), logits)
    encoded = encode(params, inputs, input_mask=mask)
    np.testing.assert_array_equal(encode(params, garbage, input_mask=mask),
                                  encoded)
    np.testing.assert_array_equal(encoded[1, 6:], 0.0)  # padding: zeros
    feats = pool(params, inputs, input_mask=mask)
    np.testing.assert_array_equal(pool(params, garbage, input_mask=mask),
                                  feats)
    # A right-padded sequence gives the logits of the unpadded one.
    short = _apply_fn(model)(params, inputs[1:2, :6], decoder_inputs[1:2])
    np.testing.assert_allclose(logits[1:2], short, atol=2e-5)
    # Pooled features: the mean over the real positions.
    np.testing.assert_allclose(feats[2], jnp.mean(encoded[2, :3], axis=0),
                               atol=1e-6)

  def test_deterministic_and_jit_equals_eager(self):
    model, params, inputs, _, decoder_inputs = _setup()
    apply_fn = _apply_fn(model)
    mask = jnp.arange(9)[None, :] < jnp.asarray([[9], [6], [3]])
    eager = apply_fn(params, inputs, decoder_inputs, input_mask=mask)
    jitted = jax.jit(apply_fn)
    first = jitted(params, inputs, decoder_inputs, input_mask=mask)
    second = jitted(params, inputs, decoder_inputs, input_mask=mask)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-5)
    # The same key gives the same params.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_setup()[1])):
      np.testing.assert_array_equal(a, b)

  def test_bad_inputs(self):
    model, params, inputs, _, decoder_inputs = _setup()
    variables = {'params': params}
    with self.assertRaisesRegex(ValueError, 'max_len'):
      jax.eval_shape(model.apply, variables, _tokens(0, (3, 17)),
                     decoder_inputs)
    with self.assertRaisesRegex(ValueError, 'prompt must have shape'):
      jax.eval_shape(functools.partial(model.apply,
                                       prompt=jnp.ones((2, 5, 32))),
                     variables, inputs, decoder_inputs)
    with self.assertRaisesRegex(ValueError, 'positions must be'):
      jax.eval_shape(models.EncoderDecoder(vocab_size=5,
                                           positions='rotary').init,
                     jax.random.key(0), inputs, decoder_inputs)
    with self.assertRaisesRegex(ValueError, 'must divide d_model'):
      jax.eval_shape(models.EncoderDecoder(vocab_size=5, d_model=30).init,
                     jax.random.key(0), inputs, decoder_inputs)
    with self.assertRaisesRegex(ValueError, 'input_mask must have'):
      models.encoder_mask(inputs, jnp.ones((3, 8), bool))


class AdaptersOnEncoderDecoderTest(parameterized.TestCase):
  """metacf.adapters on the model, as the text paradigms experiment uses it."""

  def test_lora(self):
    model, params, inputs, targets, decoder_inputs = _setup()
    apply_fn = _apply_fn(model)
    lora = adapters.lora_init(jax.random.key(1), params, 4,
                              targets=_LORA_TARGETS,
                              fan_in_axes=adapters.flax_fan_in_axes)
    adapted = [p for p, leaf in zip(masks.leaf_paths(params),
                                    jax.tree.leaves(jax.tree.map(
                                        lambda a: a is not None, lora,
                                        is_leaf=_is_adapter)))
               if leaf]
    # query and value of 2 encoder self-, 2 decoder self- and 2 cross-
    # attentions, fc1 and fc2 of 4 MLPs.
    self.assertLen(adapted, 6 * 2 + 4 * 2)
    q = lora['encoder']['layers_0']['self_attn']['query']['kernel']
    self.assertEqual((q['a'].shape, q['b'].shape), ((32, 4), (4, 32)))
    self.assertIsNone(lora['encoder']['layers_0']['self_attn']['out']['kernel'])
    apply_lora = adapters.with_lora(apply_fn, alpha=_ALPHA)

    # b = 0: the adapted model is the pre-trained one, bit for bit.
    plain = apply_fn(params, inputs, decoder_inputs)
    np.testing.assert_array_equal(
        apply_lora(params, lora, inputs, decoder_inputs), plain)

    # The gradient reaches the adapters only (params are a constant of the
    # loss); b's gradient is non-zero at every target.
    def loss_fn(lora, params):
      return _loss(apply_lora(params, lora, inputs, decoder_inputs), targets)
    grads = jax.jit(jax.grad(loss_fn))(lora, params)
    self.assertEqual(jax.tree.structure(grads), jax.tree.structure(lora))
    grad_a, grad_b = (jax.tree.leaves(jax.tree.map(
        lambda g, k=k: g[k] if g is not None else None, grads,
        is_leaf=_is_adapter)) for k in 'ab')
    self.assertLen(grad_b, 20)
    for ga, gb in zip(grad_a, grad_b):
      self.assertGreater(float(jnp.max(jnp.abs(gb))), 0.0)
      # dL/da = dL/dW b^T (alpha / r) = 0 while b = 0.
      self.assertEqual(float(jnp.max(jnp.abs(ga))), 0.0)
    tx = optax.adam(1e-2)
    updates, _ = optim.update(tx, grads, tx.init(lora), lora)
    trained = optax.apply_updates(lora, updates)
    self.assertLess(float(loss_fn(trained, params)),
                    float(loss_fn(lora, params)))

    # Merged (lora_merge) = unmerged (lora_dense on every adapted kernel).
    lora = _random_b(lora)
    merged = adapters.lora_merge(params, lora, alpha=_ALPHA)
    with nn.intercept_methods(_unmerged_interceptor(lora, _ALPHA)):
      unmerged = apply_fn(params, inputs, decoder_inputs)
    merged_logits = apply_fn(merged, inputs, decoder_inputs)
    self.assertGreater(float(jnp.max(jnp.abs(merged_logits - plain))), 1e-3)
    np.testing.assert_allclose(unmerged, merged_logits, rtol=1e-4,
                               atol=1e-4)

  def test_lora_default_targets_cover_every_kernel(self):
    _, params, *_ = _setup(tie_embeddings=False, positions='learnt')
    lora = adapters.lora_init(jax.random.key(1), params, 1,
                              fan_in_axes=adapters.flax_fan_in_axes)
    adapted = {p for p, leaf in zip(masks.leaf_paths(params),
                                    jax.tree.leaves(jax.tree.map(
                                        lambda a: a is not None, lora,
                                        is_leaf=_is_adapter)))
               if leaf}
    kernels = {p for p in masks.leaf_paths(params) if p.endswith('kernel')}
    self.assertEqual(adapted, kernels)  # not embeddings, biases, scales
    # Without flax_fan_in_axes the 3-D attention kernels are refused.
    with self.assertRaisesRegex(ValueError, 'fan_in_axes must be given'):
      adapters.lora_init(jax.random.key(1), params, 1)

  def test_freeze_encoder(self):
    model, params, inputs, targets, decoder_inputs = _setup()
    apply_fn = _apply_fn(model)
    # The token table is shared with the encoder: freeze it too.
    trainable = r'^(?!encoder/|token_embed/)'
    tx = adapters.freeze(optax.adam(1e-2), params, trainable)
    opt_state = tx.init(params)
    labels = adapters.trainable_labels(params, trainable)
    num_trainable = sum(
        int(np.prod(p.shape)) for p, label in zip(
            jax.tree.leaves(params), jax.tree.leaves(labels))
        if label == 'trainable')
    self.assertEqual(adapters.count_params(opt_state), 2 * num_trainable + 1)

    def loss_fn(params):
      return _loss(apply_fn(params, inputs, decoder_inputs), targets)

    @jax.jit
    def step(params, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optim.update(tx, grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, updates, loss

    new_params, opt_state, updates, loss = step(params, opt_state)
    for path, update in zip(masks.leaf_paths(updates),
                            jax.tree.leaves(updates)):
      if path.startswith(('encoder/', 'token_embed/')):
        self.assertEqual(float(jnp.max(jnp.abs(update))), 0.0, path)
    self.assertGreater(float(jnp.max(jnp.abs(
        updates['decoder']['layers_0']['cross_attn']['query']['kernel']))), 0)
    encode = _apply_fn(model, 'encode')
    np.testing.assert_array_equal(encode(new_params, inputs),
                                  encode(params, inputs))
    new_loss = step(new_params, opt_state)[3]
    self.assertLess(float(new_loss), float(loss))

  def test_soft_prompt(self):
    model, params, inputs, targets, decoder_inputs = _setup()
    apply_fn = _apply_fn(model)
    prompt = adapters.soft_prompt_init(jax.random.key(2), 5, 32)
    plain = apply_fn(params, inputs, decoder_inputs)
    np.testing.assert_array_equal(
        apply_fn(params, inputs, decoder_inputs, prompt=None), plain)
    prompted = apply_fn(params, inputs, decoder_inputs, prompt=prompt)
    self.assertGreater(float(jnp.max(jnp.abs(prompted - plain))), 1e-3)
    # One prompt per example, all equal: the shared prompt's outputs.
    per_example = jnp.broadcast_to(prompt, (3, 5, 32))
    np.testing.assert_allclose(
        apply_fn(params, inputs, decoder_inputs, prompt=per_example),
        prompted, rtol=1e-6, atol=1e-6)

    # Trainable: a few Adam steps on the prompt alone lower the loss.
    def loss_fn(prompt):
      return _loss(apply_fn(params, inputs, decoder_inputs, prompt=prompt),
                   targets)
    tx = optax.adam(5e-2)

    @jax.jit
    def step(prompt, opt_state):
      loss, grad = jax.value_and_grad(loss_fn)(prompt)
      updates, opt_state = optim.update(tx, grad, opt_state, prompt)
      return optax.apply_updates(prompt, updates), opt_state, loss, grad

    opt_state = tx.init(prompt)
    losses = []
    for i in range(5):
      prompt, opt_state, loss, grad = step(prompt, opt_state)
      losses.append(float(loss))
      if i == 0:
        self.assertEqual(grad.shape, (5, 32))
        self.assertGreater(float(jnp.max(jnp.abs(grad))), 0.0)
    self.assertLess(float(loss_fn(prompt)), losses[0])

  def test_overfits_a_copy_task(self):
    model = models.EncoderDecoder(**_SMALL)
    inputs = _tokens(3, (16, 8))
    decoder_inputs = models.shift_right(inputs, _BOS)
    params = model.init(jax.random.key(0), inputs, decoder_inputs)['params']
    tx = optax.adam(3e-3)

    def loss_fn(params):
      logits = model.apply({'params': params}, inputs, decoder_inputs)
      return _loss(logits, inputs)

    @jax.jit
    def step(params, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optim.update(tx, grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    first = None
    for _ in range(60):
      params, opt_state, loss = step(params, opt_state)
      first = float(loss) if first is None else first
    final = float(loss_fn(params))
    self.assertLess(final, 0.2 * first)  # 3.2 -> 0.08 in 60 steps


if __name__ == '__main__':
  absltest.main()
