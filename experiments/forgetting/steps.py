"""Jitted training chunks and evaluation for the forgetting experiment.

Everything here is vectorised over independent runs (seeds) with
``jax.vmap``: a state leaf has shape ``[num_seeds, ...]``. One training call
runs a whole chunk of steps of one task inside ``lax.fori_loop`` (the batch
indices of the chunk are an argument; the training images stay on the device
and batches are gathered from them), so Python dispatches once per chunk, not
once per step of 10 examples. Each strategy compiles its chunk once; the
state is donated.

Example::

  params = make_init_params(widths)(keys, example_image)  # keys: [S]
  state = make_init_state(strategy)(params, example_image)
  chunk = make_train_chunk(strategy, widths, batch_size)
  state, loss = chunk(state, images, labels, idx, first_step, num_steps,
                      keys, seen_classes, old_classes)
  acc_class_il, acc_task_il = make_evaluate(widths)(
      state['params'], test_images, test_labels, test_task, task_classes)

``Evaluator`` holds a scenario's test arrays on the device and evaluates
with ``make_evaluate`` (or, for iCaRL, ``make_evaluate_nme``: the nearest
mean of exemplars). iCaRL's exemplar memory is rebuilt at the end of each
task by ``update_memory`` (herding), outside the jitted chunks.
"""

from collections.abc import Callable, Mapping
import concurrent.futures
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import losses
from experiments.common import models
from experiments.forgetting import data
from experiments.forgetting.configs import Config
from experiments.forgetting.configs import Scenario
from experiments.forgetting.configs import Strategy
import metacf.distill
import metacf.maml
import metacf.replay

NUM_CLASSES = data.NUM_CLASSES
# Logit given to classes masked out of a softmax. Finite, so that masked
# entries of two logit vectors cancel in differences (a KL between two masked
# vectors ignores them); exp(-1e4 / T) is 0 in float32 for any T <= 50.
MASKED_LOGIT = -1e4


def preprocess(images: jax.typing.ArrayLike) -> jax.Array:
  """uint8 pixels ``[batch, 28, 28, 1]`` -> float32 in ``[0, 1]``."""
  return jnp.asarray(images).astype(jnp.float32) / 255.0


@functools.cache
def _model(widths: tuple[int, ...]) -> models.MLP:
  return models.MLP(widths=widths, num_classes=NUM_CLASSES)


def make_optimizer(strategy: Strategy) -> optax.GradientTransformation:
  """SGD, with torch-style weight decay (added to the gradient) if any."""
  sgd = optax.sgd(strategy.learning_rate)
  if strategy.weight_decay:
    return optax.chain(optax.add_decayed_weights(strategy.weight_decay), sgd)
  return sgd


def make_buffer(strategy: Strategy):
  """The strategy's replay buffer, or None."""
  if strategy.kind in ('er', 'derpp', 'er_ace'):
    return metacf.replay.replay_buffer(strategy.buffer_size)
  if strategy.kind == 'class_balanced':
    return metacf.replay.class_balanced_buffer(strategy.buffer_size,
                                               NUM_CLASSES)
  return None


def example_item(strategy: Strategy, image: jax.typing.ArrayLike) -> dict:
  """One replay item: the uint8 image, its label and (DER++) its logits."""
  item = {'x': jnp.zeros(jnp.shape(image), jnp.uint8),
          'y': jnp.zeros([], jnp.int32)}
  if strategy.kind == 'derpp':
    item['logits'] = jnp.zeros([NUM_CLASSES], jnp.float32)
  return item


@functools.cache
def make_init_params(widths: tuple[int, ...]):
  """Returns ``init_params(keys [S], image) -> params``, leaves ``[S, ...]``.

  Separate from the strategies' state so that it compiles once and every
  strategy starts from the same networks. One jitted call per seed: the
  truncated-normal initialisers compile twice as slowly under ``vmap``.
  """
  model = _model(widths)

  @jax.jit
  def init_one(key, image):
    return model.init(key, preprocess(image[None]))['params']

  def init_params(keys, image):
    per_seed = [init_one(keys[i], image) for i in range(keys.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed)

  return init_params


@functools.cache
def make_init_state(strategy: Strategy):
  """Returns the jitted ``init_state(params, image [28, 28, 1]) -> state``.

  The state is a dict: ``'params'`` and ``'opt_state'``, plus ``'buffer'``
  for replay strategies (empty), ``'old_params'`` (the previous task's
  network) for LwF and iCaRL, and ``'memory'`` (iCaRL's exemplars, see
  ``empty_memory``). Every leaf has a leading axis of size ``S`` (one run per
  seed), like ``params``. The state may hold ``params`` themselves (jit
  forwards unchanged inputs), so pass fresh ones: the state is donated.
  """
  optimizer = make_optimizer(strategy)
  buffer = make_buffer(strategy)

  def init_one(params, image):
    state = {'params': params, 'opt_state': optimizer.init(params)}
    if buffer is not None:
      state['buffer'] = buffer.init(example_item(strategy, image))
    if strategy.kind in ('lwf', 'icarl'):
      # Unused during the first task (no old classes); train.py sets it to
      # a copy of params at the start of each later task.
      state['old_params'] = jax.tree.map(jnp.zeros_like, params)
    if strategy.kind == 'icarl':
      state['memory'] = empty_memory(strategy.buffer_size, image.shape)
    return state

  return jax.jit(jax.vmap(init_one, in_axes=(0, None)))


def empty_memory(capacity: int, image_shape: tuple[int, ...]) -> dict:
  """iCaRL's exemplar memory of one run, empty.

  ``{'x': uint8 [capacity, *image_shape], 'y': int32 [capacity], 'idx':
  int32 [capacity]}``: the exemplars, their labels and their indices in the
  training set; ``-1`` in ``y`` and ``idx`` marks an empty slot. With ``k``
  classes seen, class of rank ``r`` (by label) holds slots ``[r m, (r + 1)
  m)`` with ``m = capacity // k``, in herding order; slots from ``k m`` on
  are empty (``update_memory``).
  """
  return {'x': jnp.zeros((capacity, *image_shape), jnp.uint8),
          'y': jnp.full((capacity,), -1, jnp.int32),
          'idx': jnp.full((capacity,), -1, jnp.int32)}


@functools.cache
def _features_fn(widths: tuple[int, ...]):
  """``features(params, x) -> (logits [B, 10], features [B, D])``.

  The features are the last hidden layer's ReLU activations (the input of
  the classifier layer), L2-normalised as in iCaRL.
  """
  model = _model(widths)
  last_hidden = f'Dense_{len(widths) - 1}'

  def features(params, x):
    logits, captured = model.apply(
        {'params': params}, preprocess(x),
        capture_intermediates=lambda module, _: module.name == last_hidden,
        mutable=['intermediates'])
    h = jax.nn.relu(captured['intermediates'][last_hidden]['__call__'][0])
    norm = jnp.linalg.norm(h, axis=-1, keepdims=True)
    return logits, h / jnp.maximum(norm, 1e-12)

  return features


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _make_step(strategy: Strategy, widths: tuple[int, ...], batch_size: int):
  """Returns ``(draw, step)`` for one run of the strategy.

  ``draw(state, key) -> replay`` samples the replayed minibatch(es) that the
  step with key ``key`` trains on (``None`` without a buffer or memory), and
  ``step(state, replay, x, y, key, seen_classes, old_classes) -> (state,
  loss)`` is one SGD step on a batch ``x`` (uint8 ``[B, 28, 28, 1]``), ``y``
  (int32 ``[B]``) and ``replay``, after which the batch enters the buffer.
  ``seen_classes`` and ``old_classes`` are bool masks of shape ``[10]``: the
  classes of the tasks up to the current one, and of the tasks before it (LwF
  and iCaRL only).

  The replay for step ``n + 1`` is drawn at the end of step ``n``, right
  after the buffer update. That is the buffer step ``n + 1`` starts with, so
  the numbers are those of sampling at the start of each step; but inside a
  loop the buffer is then read after it is written, never before, which lets
  XLA update it in place (read-then-write in one iteration made XLA copy the
  whole buffer every step: O(capacity) per step).
  """
  model = _model(widths)
  optimizer = make_optimizer(strategy)
  buffer = make_buffer(strategy)
  kind = strategy.kind
  mb = strategy.minibatch_size

  def apply(params, x):
    return model.apply({'params': params}, preprocess(x))

  def draw(state, key):
    key_replay, _ = jax.random.split(key)
    if kind == 'icarl':
      # Uniformly, with replacement, among the stored exemplars (slots
      # [0, count), see empty_memory); all rows invalid while it is empty.
      memory = state['memory']
      count = jnp.sum(memory['y'] >= 0)
      rows = jax.random.randint(key_replay, [mb], 0, jnp.maximum(count, 1))
      return ({'x': memory['x'][rows], 'y': memory['y'][rows]},
              jnp.broadcast_to(count > 0, [mb]))
    if buffer is None:
      return None
    buffer_state = state['buffer']
    if kind == 'derpp':
      # Two independent minibatches, as in Buzzega et al. 2020, Algorithm 1:
      # one matches the stored logits (alpha), one the stored labels (beta).
      key_logits, key_labels = jax.random.split(key_replay)
      return (buffer.sample(key_logits, buffer_state, mb),
              buffer.sample(key_labels, buffer_state, mb))
    return buffer.sample(key_replay, buffer_state, mb)

  def loss_fn(params, state, replay, x, y, seen_classes, old_classes):
    """Returns ``(loss, logits of the current batch)``."""
    if kind in ('naive', 'joint'):
      logits = apply(params, x)
      return jnp.mean(losses.cross_entropy(logits, y)), logits

    if kind in ('er', 'class_balanced'):
      # Mammoth's ER: the replayed minibatch is concatenated to the batch
      # and one cross-entropy is averaged over both. Rows drawn from an
      # empty buffer (the first step) get weight 0.
      rows, valid = replay
      logits = apply(params, jnp.concatenate([x, rows['x']]))
      labels = jnp.concatenate([y, rows['y']])
      weights = jnp.concatenate([jnp.ones([batch_size], jnp.float32),
                                 valid.astype(jnp.float32)])
      loss = _masked_mean(losses.cross_entropy(logits, labels), weights)
      return loss, logits[:batch_size]

    if kind == 'er_ace':
      # Caccia et al. 2022: the incoming batch's softmax covers only the
      # classes present in it (so that new classes do not push the old
      # classes' logits down); the replayed minibatch takes the plain
      # cross-entropy over all classes.
      rows, valid = replay
      logits = apply(params, jnp.concatenate([x, rows['x']]))
      new, replayed = logits[:batch_size], logits[batch_size:]
      present = jnp.zeros([NUM_CLASSES], bool).at[y].set(True)
      loss = (jnp.mean(metacf.replay.ace_cross_entropy(new, y, present))
              + _masked_mean(losses.cross_entropy(replayed, rows['y']),
                             valid.astype(jnp.float32)))
      return loss, new

    if kind == 'icarl':
      # Rebuffi et al. 2017, Algorithm 3, on the batch and a minibatch of
      # exemplars: sigmoid binary cross-entropy over the classes seen so
      # far, with one-hot targets for the current task's classes and the
      # previous network's sigmoid outputs for the old ones (distillation;
      # the exemplars' own labels only enter through the new classes'
      # zeros). Summed over classes, averaged over examples.
      rows, valid = replay
      xs = jnp.concatenate([x, rows['x']])
      logits = apply(params, xs)
      old_probs = jax.nn.sigmoid(
          jax.lax.stop_gradient(apply(state['old_params'], xs)))
      labels = jnp.concatenate([y, rows['y']])
      targets = jnp.where(old_classes, old_probs,
                          jax.nn.one_hot(labels, NUM_CLASSES))
      bce = optax.losses.sigmoid_binary_cross_entropy(logits, targets)
      per_example = jnp.sum(jnp.where(seen_classes, bce, 0.0), axis=-1)
      weights = jnp.concatenate([jnp.ones([batch_size], jnp.float32),
                                 valid.astype(jnp.float32)])
      return _masked_mean(per_example, weights), logits[:batch_size]

    if kind == 'derpp':
      (r1, valid1), (r2, valid2) = replay
      # One forward pass over the batch and both replayed minibatches.
      logits = apply(params, jnp.concatenate([x, r1['x'], r2['x']]))
      new, out1, out2 = (logits[:batch_size],
                         logits[batch_size:batch_size + mb],
                         logits[batch_size + mb:])
      mse = metacf.distill.logit_mse_loss(out1, r1['logits'])
      ce_replay = losses.cross_entropy(out2, r2['y'])
      loss = (jnp.mean(losses.cross_entropy(new, y))
              + strategy.alpha * _masked_mean(mse, valid1.astype(jnp.float32))
              + strategy.beta * _masked_mean(ce_replay,
                                             valid2.astype(jnp.float32)))
      return loss, new

    if kind == 'lwf':
      # Single head: the cross-entropy is over the classes seen so far (as
      # mammoth's LwF), and the previous network's logits on the current
      # inputs are distilled into the logits of the previous tasks' classes.
      # lwf_loss has Hinton's T^2 factor; mammoth's (and Li & Hoiem's)
      # distillation term has none, hence alpha / T^2.
      logits = apply(params, x)
      old_logits = jax.lax.stop_gradient(apply(state['old_params'], x))
      loss = metacf.distill.lwf_loss(
          jnp.where(seen_classes, logits, MASKED_LOGIT), y,
          jnp.where(old_classes, logits, MASKED_LOGIT),
          jnp.where(old_classes, old_logits, MASKED_LOGIT),
          temperature=strategy.temperature,
          old_weight=strategy.alpha / strategy.temperature**2)
      return jnp.mean(loss), logits

    raise ValueError(f'_make_step: unknown strategy kind {kind!r}.')

  def step(state, replay, x, y, key, seen_classes, old_classes):
    _, key_add = jax.random.split(key)
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state, replay, x, y, seen_classes, old_classes)
    updates, opt_state = optimizer.update(grads, state['opt_state'],
                                          state['params'])
    new_state = dict(state, params=optax.apply_updates(state['params'],
                                                       updates),
                     opt_state=opt_state)
    # The batch enters the buffer after the update, with the logits the
    # network gave it before the update (mammoth's order).
    if kind in ('er', 'derpp', 'er_ace'):
      item = {'x': x, 'y': y}
      if kind == 'derpp':
        item['logits'] = jax.lax.stop_gradient(logits)
      new_state['buffer'] = buffer.add(key_add, state['buffer'], item)
    elif kind == 'class_balanced':
      new_state['buffer'] = buffer.add(key_add, state['buffer'],
                                       {'x': x, 'y': y}, y)
    return new_state, loss

  return draw, step


@functools.cache
def make_train_chunk(strategy: Strategy, widths: tuple[int, ...],
                     batch_size: int):
  """Returns the jitted, seed-vectorised chunk of training steps.

  ``chunk(state, images, labels, idx, first_step, num_steps, keys,
  seen_classes, old_classes) -> (state, mean_loss)``:

  * ``state``: as from ``make_init_state``, leaves ``[S, ...]``; donated.
  * ``images``, ``labels``: the whole training set on the device, uint8
    ``[N, 28, 28, 1]`` and int32 ``[N]`` (shared by the runs).
  * ``idx``: int32 ``[S, chunk_len, B]``, the batches of each run; only the
    first ``num_steps`` rows are used (chunks share one shape, one compile).
  * ``first_step``, ``num_steps``: int32 scalars; row ``i`` of ``idx`` is
    step ``first_step + i`` of the task, ``num_steps <= chunk_len``.
  * ``keys``: ``[S]`` PRNG keys of the task; step ``n`` of the task uses
    ``fold_in(key, n)``, so the numbers do not depend on how a task is cut
    into chunks.
  * ``seen_classes``, ``old_classes``: bool ``[10]`` (see ``_make_step``).

  ``mean_loss`` is float32 ``[S]``, the mean training loss over the chunk.
  """
  draw, step = _make_step(strategy, widths, batch_size)

  def chunk_one(state, images, labels, idx, first_step, num_steps, key,
                seen_classes, old_classes):
    def step_key(i):
      return jax.random.fold_in(key, first_step + i)

    def body(i, carry):
      state, replay, loss_sum = carry
      batch = idx[i]
      state, loss = step(state, replay, images[batch], labels[batch],
                         step_key(i), seen_classes, old_classes)
      replay = draw(state, step_key(i + 1))
      return state, replay, loss_sum + loss

    replay = draw(state, step_key(0))
    state, _, loss_sum = jax.lax.fori_loop(
        0, num_steps, body, (state, replay, jnp.zeros([], jnp.float32)))
    return state, loss_sum / jnp.maximum(num_steps, 1).astype(jnp.float32)

  vmapped = jax.vmap(chunk_one, in_axes=(0, None, None, 0, None, None, 0,
                                         None, None))
  return jax.jit(vmapped, donate_argnums=0)


@functools.cache
def make_evaluate(widths: tuple[int, ...]):
  """Returns the jitted ``evaluate(params, images, labels, task_of,
  task_classes) -> (class_il, task_il)``.

  * ``params``: leaves ``[S, ...]``.
  * ``images``: uint8 ``[N, 28, 28, 1]``; ``labels``: int32 ``[N]``;
    ``task_of``: int32 ``[N]``, the task of each example's class.
  * ``task_classes``: bool ``[T, 10]``, the classes of each task (pad ``T``
    to a fixed size to share one compiled function; padded tasks have no
    examples and accuracy 0).

  Returns float32 accuracies of shape ``[S, T]`` on each task's examples:
  class-incremental (argmax over all ten logits) and task-incremental (argmax
  over the logits of the example's task, i.e. logits masked to the task's
  classes as in mammoth).
  """
  model = _model(widths)

  def evaluate_one(params, images, labels, task_of, task_classes):
    logits = model.apply({'params': params}, preprocess(images))
    return _accuracies(logits, labels, task_of, task_classes)

  return jax.jit(jax.vmap(evaluate_one, in_axes=(0, None, None, None, None)))


@functools.cache
def make_evaluate_nme(widths: tuple[int, ...]):
  """iCaRL's ``make_evaluate``: the nearest mean of exemplars classifies.

  ``evaluate(params, memory, images, labels, task_of, task_classes) ->
  (class_il, task_il)``, with ``memory`` as ``empty_memory``'s (leaves
  ``[S, ...]``) and the rest as ``make_evaluate``'s. The logits are
  ``metacf.maml.prototype_logits`` of the normalised features: minus the
  squared distance to the mean of each class's exemplars (not re-normalised,
  see README.md); a class without exemplars is never predicted. Task-IL
  masks them to the example's task, as ``make_evaluate``.
  """
  features = _features_fn(widths)

  def evaluate_one(params, memory, images, labels, task_of, task_classes):
    _, support = features(params, memory['x'])
    _, query = features(params, images)
    # Empty slots get an extra class, NUM_CLASSES, whose column is dropped.
    support_labels = jnp.where(memory['y'] >= 0, memory['y'], NUM_CLASSES)
    logits = metacf.maml.prototype_logits(support, support_labels, query,
                                          NUM_CLASSES + 1)[:, :NUM_CLASSES]
    return _accuracies(logits, labels, task_of, task_classes)

  return jax.jit(jax.vmap(evaluate_one,
                          in_axes=(0, 0, None, None, None, None)))


def _accuracies(logits, labels, task_of, task_classes):
  """Class- and task-IL accuracies ``([T], [T])`` from ``logits [N, 10]``."""
  num_tasks = task_classes.shape[0]
  class_il = jnp.argmax(logits, axis=-1) == labels
  masked = jnp.where(task_classes[task_of], logits, -jnp.inf)
  task_il = jnp.argmax(masked, axis=-1) == labels
  count = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), task_of,
                              num_segments=num_tasks)
  count = jnp.maximum(count, 1.0)

  def per_task(correct):
    return jax.ops.segment_sum(correct.astype(jnp.float32), task_of,
                               num_segments=num_tasks) / count

  return per_task(class_il), per_task(task_il)


@functools.cache
def _features_of_runs(widths: tuple[int, ...]):
  """Jitted ``features(params, images, idx [N]) -> [S, N, D]``.

  Every run's normalised features of ``images[idx]``.
  """
  features = _features_fn(widths)
  return jax.jit(jax.vmap(lambda p, images, idx: features(p, images[idx])[1],
                          in_axes=(0, None, None)))


_compiled: dict[Any, concurrent.futures.Future] = {}
_compiled_lock = threading.Lock()


def _compile_once(key: Any, compile_fn: Callable[[], Any]) -> Any:
  """``compile_fn()``, once per ``key`` even when threads ask together.

  ``train.py`` compiles the next strategies' functions in a background
  thread; a thread that asks for one being compiled waits for it.
  """
  with _compiled_lock:
    future = _compiled.get(key)
    owner = future is None
    if owner:
      future = _compiled[key] = concurrent.futures.Future()
  if owner:
    try:
      future.set_result(compile_fn())
    except BaseException as e:
      with _compiled_lock:
        del _compiled[key]
      future.set_exception(e)
      raise
  return future.result()


def herding_executable(num_runs: int, padded_size: int, dim: int,
                       num_examples: int, num_exemplars: int):
  """``_herding_fn``, compiled for features ``[num_runs, padded_size, dim]``
  committed to the first device (``update_memory``'s); compiled once."""
  spec = jax.ShapeDtypeStruct(
      (num_runs, padded_size, dim), jnp.float32,
      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return _compile_once(
      ('herding', num_runs, padded_size, dim, num_examples, num_exemplars),
      lambda: _herding_fn(num_examples, num_exemplars).lower(spec).compile())


def precompile_update_memory(labels: np.ndarray, capacity: int,
                             task_classes: np.ndarray, num_runs: int,
                             widths: tuple[int, ...]) -> None:
  """Compiles every herding that ``update_memory`` will run on a scenario
  with tasks ``task_classes`` (bool ``[T, 10]``), in order."""
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  for t in range(task_classes.shape[0]):
    m = capacity // int(task_classes[:t + 1].any(axis=0).sum())
    for c in np.flatnonzero(task_classes[t]):
      if counts[c] >= m:  # Else update_memory raises.
        herding_executable(num_runs, int(counts.max()), widths[-1],
                           int(counts[c]), m)


@functools.cache
def _herding_fn(num_examples: int, num_exemplars: int):
  """Jitted herding of every run among the first ``num_examples`` rows.

  ``herd(features [S, N, D]) -> int32 [S, num_exemplars]``.
  """
  def herd_one(features):
    return metacf.replay.herding_selection(features[:num_examples],
                                           num_exemplars)

  return jax.jit(jax.vmap(herd_one))


@jax.jit
def _gather_memory(images, idx, y):
  """``empty_memory``'s dict of the training examples ``idx [S, K]``."""
  x = jnp.where((idx >= 0)[:, :, None, None, None],
                images[jnp.maximum(idx, 0)], jnp.zeros([], jnp.uint8))
  return {'x': x, 'y': y, 'idx': idx}


def update_memory(memory: dict, params, images: jax.Array,
                  labels: np.ndarray, old_classes: np.ndarray,
                  new_classes: np.ndarray, widths: tuple[int, ...]) -> dict:
  """iCaRL's exemplar update at the end of a task (Algorithms 4 and 5).

  With ``k`` classes seen (old and new) and ``K`` slots, every class keeps
  ``m = K // k`` exemplars: an old class its first ``m`` (they are in
  herding order, so this is Algorithm 5's reduction), a new class the ``m``
  chosen by ``metacf.replay.herding_selection`` among all its training
  examples, on the normalised penultimate features of the current network
  (each run its own). The layout is ``empty_memory``'s.

  Args:
    memory: ``empty_memory`` leaves with a leading axis ``[S]``, holding the
      exemplars of ``old_classes``.
    params: The runs' networks, leaves ``[S, ...]``.
    images: The training images on the device, uint8 ``[N, 28, 28, 1]``.
    labels: Their labels, numpy int ``[N]``.
    old_classes, new_classes: bool ``[10]``, the classes seen before this
      task and the task's own.
    widths: The MLP's hidden widths.

  Returns:
    The new memory, leaves ``[S, ...]``.

  Raises:
    ValueError: if a new class has fewer training examples than ``m``.
  """
  capacity = memory['y'].shape[1]
  old = np.flatnonzero(old_classes)
  new = np.flatnonzero(new_classes)
  m = capacity // (len(old) + len(new))
  m_old = capacity // max(len(old), 1)
  # Old class of rank r: the first m of its slots [r m_old, (r + 1) m_old).
  keep = (np.arange(len(old))[:, None] * m_old + np.arange(m)).reshape(-1)
  num_runs = memory['y'].shape[0]
  idx = np.full((num_runs, capacity), -1, np.int32)
  y = np.full((num_runs, capacity), -1, np.int32)
  idx[:, :len(keep)] = np.asarray(memory['idx'])[:, keep]
  y[:, :len(keep)] = np.asarray(memory['y'])[:, keep]
  # Features are computed on a fixed number of rows (the largest class,
  # padded with index 0), so that they compile once; herding, whose result
  # depends on every row, gets the class's own rows (it compiles per class
  # size and m).
  padded_size = int(np.bincount(labels).max())
  for r, c in enumerate(new, start=len(old)):
    members = np.flatnonzero(labels == c).astype(np.int32)
    if len(members) < m:
      raise ValueError(
          f'update_memory: class {c} has {len(members)} training examples, '
          f'fewer than the {m} exemplars per class of a memory of '
          f'{capacity}.')
    padded = np.zeros(padded_size, np.int32)
    padded[:len(members)] = members
    feats = jax.device_put(
        _features_of_runs(widths)(params, images, jnp.asarray(padded)),
        jax.devices()[0])
    chosen = herding_executable(num_runs, padded_size, feats.shape[-1],
                                len(members), m)(feats)
    idx[:, r * m:(r + 1) * m] = members[np.asarray(chosen)]
    y[:, r * m:(r + 1) * m] = c
  return _gather_memory(images, jnp.asarray(idx), jnp.asarray(y))


def memory_prefix(memory: dict, per_class: int | None) -> dict:
  """The first ``per_class`` exemplars of each class of ``memory``.

  Herding orders each class's exemplars so that every prefix's mean tracks
  the class mean, so the prefixes give a cheaper nearest-mean classifier
  (the accuracy curves use it). The rows are padded with empty slots to
  ``min(capacity, 10 per_class)``, one shape for every task. ``None``: all
  of ``memory``. Always a copy (the training state, ``memory`` included, is
  donated to the training chunks).
  """
  capacity = memory['y'].shape[1]
  if per_class is None or NUM_CLASSES * per_class >= capacity:
    return jax.tree.map(jnp.copy, memory)
  y = np.asarray(memory['y'])
  rows = np.full(NUM_CLASSES * per_class, -1, np.int32)
  kept = np.concatenate([np.flatnonzero(y[0] == c)[:per_class]
                         for c in range(NUM_CLASSES)])
  rows[:len(kept)] = kept
  if not np.array_equal(y[:, kept], np.broadcast_to(y[0, kept],
                                                    y[:, kept].shape)):
    raise ValueError('memory_prefix: the runs\' memories have different '
                     'layouts.')
  return _take_rows(memory, jnp.asarray(rows))


@jax.jit
def _take_rows(memory, rows):
  valid = rows >= 0
  taken = jax.tree.map(lambda a: a[:, jnp.maximum(rows, 0)], memory)
  return dict(taken, y=jnp.where(valid, taken['y'], -1),
              idx=jnp.where(valid, taken['idx'], -1))


class Evaluator:
  """Test arrays of one scenario on the device, and the jitted evaluation."""

  def __init__(self, config: Config, scenario: Scenario,
               test: Mapping[str, np.ndarray]):
    classes = data.task_classes(scenario)
    self.num_tasks = classes.shape[0]
    # Padded to 10 tasks, so that every scenario shares one compiled
    # evaluation per test-set size.
    padded = np.zeros((NUM_CLASSES, NUM_CLASSES), bool)
    padded[:self.num_tasks] = classes
    self.task_classes = jnp.asarray(padded)
    labels = test['label']
    task_of = (labels // scenario.classes_per_task).astype(np.int32)
    self.full = (jnp.asarray(test['image']), jnp.asarray(labels),
                 jnp.asarray(task_of))
    n = config.curve_test_size
    self.curve = self.full if n is None else tuple(a[:n] for a in self.full)
    self._evaluate = make_evaluate(config.widths)
    self._evaluate_nme = make_evaluate_nme(config.widths)

  def _run(self, params, memory, arrays):
    if memory is None:
      return self._evaluate(params, *arrays, self.task_classes)
    return self._evaluate_nme(params, memory, *arrays, self.task_classes)

  def matrix_rows(self, params, memory=None) -> tuple[jax.Array, jax.Array]:
    """``(class_il, task_il)`` accuracies on the whole test set, ``[S, T]``.

    With iCaRL's ``memory``, by the nearest mean of exemplars.
    """
    class_il, task_il = self._run(params, memory, self.full)
    return class_il[:, :self.num_tasks], task_il[:, :self.num_tasks]

  def curve_point(self, params, memory=None) -> jax.Array:
    """Class-IL accuracies ``[S, T]`` on the curve subset of the test set."""
    class_il, _ = self._run(params, memory, self.curve)
    return class_il[:, :self.num_tasks]
