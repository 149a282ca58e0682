r"""Does LwF protect task A only where task B's inputs observe it?

A ReLU MLP body with one linear head per task is trained on task A, real
MNIST (ten digits). Then, for each task B of ``config.tasks`` (Fashion-MNIST,
MNIST rotated by 30/90/180 degrees, permuted MNIST, Omniglot alphabets,
uniform-noise images with random labels), B is learnt from A's model in two
ways, from the same warm-up, the same new head and the same batches:

* ``finetune``: naive fine-tuning: B's head and the shared body trained with
  B's cross-entropy, A's head untouched, no distillation;
* ``lwf``: Learning without Forgetting (Li & Hoiem 2017): the body and both
  heads trained with B's cross-entropy plus the distillation of A's head's
  outputs on B's inputs towards the outputs the A model gave on those inputs
  before B (``metacf.distill.lwf_loss``, T = 2, weight 1); no A data.

Measured: A's test accuracy after each (retention = after / before), B's
accuracy, and how far A's outputs on B's inputs moved. Before training B, the
*observability of A by B* compares A's Jacobian on A's inputs with A's
Jacobian on B's inputs, both of A's centred head outputs with respect to the
shared body (``metacf.jacobian.jacobian_svd``):

* ``observability``: the fraction of the energy of A's top-``k_a`` Jacobian
  subspace that lies in B's top-``k_b`` subspace,
  :math:`\sum_i s_{a,i}^2 \lVert V_b v_{a,i} \rVert^2 / \sum_i s_{a,i}^2`;
* ``weighted_overlap``: ``metacf.jacobian.weighted_subspace_overlap``;
* ``excitation_share``: how strongly B's inputs excite A's top directions
  relative to A's own inputs, per example, :math:`\sum_i w_i
  \rho_i / (1 + \rho_i)` with :math:`\rho_i = (\lVert J_b v_{a,i} \rVert^2 /
  N_b) / (\lVert J_a v_{a,i} \rVert^2 / N_a)` (no truncation of B).

The A model is an orbax checkpoint per epoch (``workdir/checkpoints/a``);
each task's observability (``workdir/observability/<task>.json``) and each
(task, seed) run (``workdir/runs/<task>/seed<s>.json``) is one JSON record,
through ``experiments.common.loop``: a run started again resumes and, every
draw coming from keys folded from the seed and names, gives bitwise the same
numbers.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from experiments.common import loop
from experiments.common import models
from experiments.common import utils
from experiments.lwf_observability import _plots
from experiments.lwf_observability.configs import Config
from experiments.lwf_observability.configs import TaskB
from experiments.predict_forgetting import _tasks
import metacf.distill
import metacf.jacobian
import metacf.metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
NUM_CLASSES = 10
IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
METHODS = ('finetune', 'lwf')
MEASURES = ('observability', 'weighted_overlap', 'excitation_share')
# MNIST's training split: A draws from the first half, MNIST-based Bs from
# the second, so A and B never share an image.
MNIST_HALF = 30000
OMNIGLOT_DRAWERS = 20
OMNIGLOT_TRAIN_DRAWERS = 16
# Omniglot's 105x105 images are zero-padded to 112 = 4 * 28 and averaged
# over 4x4 blocks (area downsampling keeps the thin strokes).
OMNIGLOT_PAD = (3, 4)

Params = Any


class TaskData(NamedTuple):
  """One task's images (standardised, flattened) and labels, on device."""
  x_train: jax.Array  # [num_train, 784], float32.
  y_train: jax.Array  # [num_train], int32.
  x_test: jax.Array   # [num_test, 784], float32.
  y_test: jax.Array   # [num_test], int32.


# --------------------------------------------------------------------- data


def standardise(images: np.ndarray) -> np.ndarray:
  """Pixels in [0, 1], ``[N, 28, 28]`` -> float32 ``[N, 784]``, MNIST's
  mean and std.

  The same constants for every task, so that no task is told apart by its
  input statistics (as ``experiments.predict_forgetting``). NumPy on the
  host: no compilation per shape.
  """
  x = np.asarray(images, np.float32).reshape(-1, NUM_PIXELS)
  return ((x - np.float32(_tasks.PIXEL_MEAN))
          / np.float32(_tasks.PIXEL_STD)).astype(np.float32)


def _draw(rng_key: jax.Array, pool: np.ndarray, count: int,
          what: str) -> np.ndarray:
  """``count`` indices from ``pool`` in a random order (prefix-stable)."""
  if count > len(pool):
    raise ValueError(f'_draw: asked for {count} {what}, there are '
                     f'{len(pool)}.')
  return pool[utils.numpy_rng(rng_key).permutation(len(pool))[:count]]


def _to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 ``[N, 28, 28, 1]`` -> float32 ``[N, 28, 28]`` in [0, 1]."""
  return images[..., 0].astype(np.float32) / 255.0


def omniglot_alphabets(num_alphabets: int, *, raw_dir: str | None,
                       data_dir: str | None) -> dict[str, np.ndarray]:
  """Omniglot's background split as a ten-class alphabet task, 28x28.

  The first ``num_alphabets`` alphabets (by index) of the split; strokes
  white (1) on black (0) like MNIST; 105x105 zero-padded to 112x112 and
  averaged over 4x4 blocks. Drawers ``0..15`` of every character are the
  training images, ``16..19`` the test images (unseen drawers). Cached per
  process (read-only arrays).

  Returns:
    ``{'train_image', 'train_label', 'test_image', 'test_label'}``: float32
    ``[N, 28, 28]`` in [0, 1] and int32 alphabet ranks.

  Raises:
    ValueError: if the split is not ordered by character, 20 drawers each.
  """
  return _omniglot_alphabets(num_alphabets, raw_dir, data_dir)


@functools.cache
def _omniglot_alphabets(num_alphabets: int, raw_dir: str | None,
                        data_dir: str | None) -> dict[str, np.ndarray]:
  import metacf.data  # pylint: disable=g-import-not-at-top  # needs tfds
  arrays = metacf.data.load_arrays('omniglot', 'background', raw_dir=raw_dir,
                                   data_dir=data_dir)
  labels = np.asarray(arrays.labels)
  num_chars = len(labels) // OMNIGLOT_DRAWERS
  if not np.array_equal(labels, np.repeat(np.arange(num_chars),
                                          OMNIGLOT_DRAWERS)):
    raise ValueError('omniglot_alphabets: the background split must be '
                     'ordered by character, 20 drawers each.')
  alphabets = np.asarray(arrays.alphabets)
  kept = np.unique(alphabets)[:num_alphabets]
  rank = np.full(alphabets.max() + 1, -1, np.int32)
  rank[kept] = np.arange(len(kept), dtype=np.int32)
  member = rank[alphabets] >= 0
  drawer = np.arange(len(labels)) % OMNIGLOT_DRAWERS
  lo, hi = OMNIGLOT_PAD
  out = {}
  for split, where in (('train', drawer < OMNIGLOT_TRAIN_DRAWERS),
                       ('test', drawer >= OMNIGLOT_TRAIN_DRAWERS)):
    idx = np.flatnonzero(member & where)
    strokes = 1.0 - arrays.images[idx, ..., 0].astype(np.float32) / 255.0
    padded = np.pad(strokes, ((0, 0), (lo, hi), (lo, hi)))
    block = padded.shape[1] // IMAGE_SIDE
    small = padded.reshape(-1, IMAGE_SIDE, block, IMAGE_SIDE, block).mean(
        axis=(2, 4))
    out[f'{split}_image'] = small
    out[f'{split}_label'] = rank[alphabets[idx]]
  for value in out.values():
    value.flags.writeable = False  # Shared by the callers.
  return out


@functools.cache
def _image_splits(dataset: str, raw_dir: str | None, data_dir: str | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``utils.load_image_splits``, cached per process (read-only arrays)."""
  splits = utils.load_image_splits(dataset, raw_dir=raw_dir,
                                   data_dir=data_dir)
  for split in splits:
    for value in split.values():
      value.flags.writeable = False
  return splits


def load_data(config: Config, *, raw_dir: str | None = None,
              data_dir: str | None = None
              ) -> tuple[TaskData, dict[str, TaskData]]:
  """Task A (MNIST) and every task B, from real data (noise: synthetic).

  Every draw depends only on ``config.seed`` and the task's name.

  Returns:
    ``(a, {task name: b})``.
  """
  root = jax.random.key(config.seed)
  mnist = _image_splits('mnist', raw_dir, data_dir)
  kinds = {t.kind for t in config.tasks}
  fashion = (_image_splits('fashion_mnist', raw_dir, data_dir)
             if 'fashion_mnist' in kinds else None)
  omniglot = (omniglot_alphabets(NUM_CLASSES, raw_dir=raw_dir,
                                 data_dir=data_dir)
              if 'omniglot' in kinds else None)
  device = jax.devices()[0]

  def task_data(x_train, y_train, x_test, y_test):
    return TaskData(*(jax.device_put(jnp.asarray(a), device) for a in (
        standardise(x_train), np.asarray(y_train, np.int32),
        standardise(x_test), np.asarray(y_test, np.int32))))

  train, test = mnist
  idx = _draw(utils.name_key(root, 'data', 'a', 'train'),
              np.arange(MNIST_HALF), config.num_train_a, 'MNIST images')
  num_test_a = len(test['label']) if config.num_test_a is None else (
      config.num_test_a)
  a = task_data(_to_unit(train['image'][idx]), train['label'][idx],
                _to_unit(test['image'][:num_test_a]),
                test['label'][:num_test_a])

  tasks = {}
  for task in config.tasks:
    key_train = utils.name_key(root, 'data', task.name, 'train')
    key_test = utils.name_key(root, 'data', task.name, 'test')
    n_train, n_test = config.num_train_b, config.num_test_b
    if task.kind in ('rotation', 'permutation'):
      i_tr = _draw(key_train, np.arange(MNIST_HALF, len(train['label'])),
                   n_train, 'MNIST images')
      i_te = _draw(key_test, np.arange(len(test['label'])), n_test,
                   'MNIST test images')
      images = [_to_unit(train['image'][i_tr]), _to_unit(test['image'][i_te])]
      labels = [train['label'][i_tr], test['label'][i_te]]
      if task.kind == 'rotation':
        # One call for both splits: one compilation per angle.
        both = np.asarray(_tasks.rotate(np.concatenate(images),
                                        task.rotation))
        images = [both[:n_train], both[n_train:]]
      else:
        perm = utils.numpy_rng(utils.name_key(
            root, 'permutation', task.name)).permutation(NUM_PIXELS)
        images = [x.reshape(-1, NUM_PIXELS)[:, perm] for x in images]
    elif task.kind == 'fashion_mnist':
      f_train, f_test = fashion
      i_tr = _draw(key_train, np.arange(len(f_train['label'])), n_train,
                   'Fashion-MNIST images')
      i_te = _draw(key_test, np.arange(len(f_test['label'])), n_test,
                   'Fashion-MNIST test images')
      images = [_to_unit(f_train['image'][i_tr]),
                _to_unit(f_test['image'][i_te])]
      labels = [f_train['label'][i_tr], f_test['label'][i_te]]
    elif task.kind == 'omniglot':
      i_tr = _draw(key_train, np.arange(len(omniglot['train_label'])),
                   n_train, 'Omniglot training images')
      i_te = _draw(key_test, np.arange(len(omniglot['test_label'])), n_test,
                   'Omniglot test images')
      images = [omniglot['train_image'][i_tr], omniglot['test_image'][i_te]]
      labels = [omniglot['train_label'][i_tr], omniglot['test_label'][i_te]]
    else:  # 'noise': declared synthetic, random labels.
      images, labels = [], []
      for key, n in ((key_train, n_train), (key_test, n_test)):
        key_x, key_y = jax.random.split(key)
        images.append(np.asarray(jax.random.uniform(
            key_x, (n, IMAGE_SIDE, IMAGE_SIDE), jnp.float32)))
        labels.append(np.asarray(jax.random.randint(
            key_y, (n,), 0, NUM_CLASSES, jnp.int32)))
    tasks[task.name] = task_data(images[0], labels[0], images[1], labels[1])
  return a, tasks


# -------------------------------------------------------------------- model


def make_model(config: Config) -> models.MLP:
  """A's network: the shared body and A's head (``Dense_{len(widths)}``)."""
  return models.MLP(widths=tuple(config.widths), num_classes=NUM_CLASSES)


def split_mlp(params: Params, num_hidden: int) -> tuple[Params, Params]:
  """``models.MLP`` params -> ``(body {'Dense_0', ...}, head)``."""
  body = {f'Dense_{i}': params[f'Dense_{i}'] for i in range(num_hidden)}
  return body, params[f'Dense_{num_hidden}']


def features(body: Params, x: jax.Array) -> jax.Array:
  """The body: ``[Dense -> ReLU] * len(body)`` on ``[N, 784]``.

  The hidden layers of ``models.MLP`` (checked against it in the tests).
  """
  for i in range(len(body)):
    layer = body[f'Dense_{i}']
    x = jax.nn.relu(jnp.matmul(x, layer['kernel']) + layer['bias'][None])
  return x


def head_logits(head: Params, feats: jax.Array) -> jax.Array:
  """A linear head ``{'kernel', 'bias'}`` on features ``[N, width]``."""
  return jnp.matmul(feats, head['kernel']) + head['bias'][None]


def centred_logits(head: Params, feats: jax.Array) -> jax.Array:
  """Logits minus their mean over classes.

  Softmax, cross-entropy and the distillation loss do not see a shift of
  all logits; the Jacobians are taken of this softmax-invariant part.
  """
  logits = head_logits(head, feats)
  return logits - jnp.mean(logits, axis=-1, keepdims=True)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits,
                                                                labels)


# ------------------------------------------------------------------- task A


@functools.cache
def _a_fns(widths: tuple[int, ...], lr: float, total_steps: int):
  """Jitted ``init(key) -> state`` and ``epoch(state, x, y, idx)`` on A.

  Cached per process: a second run (a resumed or repeated one) compiles
  nothing again.
  """
  model = models.MLP(widths=widths, num_classes=NUM_CLASSES)
  tx = optax.adam(optax.cosine_decay_schedule(lr, total_steps))

  @jax.jit
  def init(key):
    params = model.init(key, jnp.zeros([1, NUM_PIXELS], jnp.float32))[
        'params']
    return {'params': params, 'opt_state': tx.init(params)}

  @jax.jit
  def epoch(state, x, y, idx):
    def step(state, batch_idx):
      def loss_fn(params):
        logits = model.apply({'params': params}, x[batch_idx])
        return jnp.mean(_cross_entropy(logits, y[batch_idx]))
      loss, grads = jax.value_and_grad(loss_fn)(state['params'])
      updates, opt_state = utils.optimizer_update(tx, grads,
                                                  state['opt_state'],
                                                  state['params'])
      return {'params': optax.apply_updates(state['params'], updates),
              'opt_state': opt_state}, loss
    state, losses = jax.lax.scan(step, state, idx)
    return state, jnp.mean(losses)

  return init, epoch


def train_a(config: Config, a: TaskData,
            workdir: str) -> tuple[Params, dict[str, Any]]:
  """A's MLP trained with Adam on MNIST; orbax checkpoint per epoch."""
  num = int(a.y_train.shape[0])
  steps_per_epoch = utils.num_batches(num, config.a_batch_size)
  init_fn, epoch_fn = _a_fns(tuple(config.widths), config.a_lr,
                             steps_per_epoch * config.a_epochs)
  key = utils.name_key(jax.random.key(config.seed), 'a')
  device = jax.devices()[0]

  def init():
    return jax.device_put(init_fn(utils.name_key(key, 'init')), device)

  meta: dict[str, Any] = {'history': [], 'train_time_s': 0.0}

  def step(state, epoch):
    start = time.perf_counter()
    rng = utils.numpy_rng(utils.name_key(key, 'epoch', epoch))
    order = rng.permutation(num)[:steps_per_epoch * config.a_batch_size]
    idx = jnp.asarray(order.reshape(steps_per_epoch, -1).astype(np.int32))
    state, loss = epoch_fn(state, a.x_train, a.y_train, idx)
    loss = float(loss)
    meta['history'].append({'epoch': epoch + 1, 'train_loss': loss})
    meta['train_time_s'] += time.perf_counter() - start
    return state, f'loss {loss:.4f}'

  state, meta, _ = loop.resumable_loop(
      os.path.join(workdir, 'checkpoints', 'a'), name='task A (MNIST)',
      unit='epoch', total=config.a_epochs, init=init, step=step,
      recipe=a_recipe(config), meta=meta, progress_bar=config.progress_bar)
  return jax.device_put(state['params'], device), meta


def a_recipe(config: Config) -> dict[str, Any]:
  """Everything that changes A's model."""
  return {'seed': config.seed, 'widths': list(config.widths),
          'num_train_a': config.num_train_a, 'epochs': config.a_epochs,
          'batch_size': config.a_batch_size, 'lr': config.a_lr}


# --------------------------------------------------------------- evaluation


@jax.jit
def _chunk_logits(body: Params, head: Params, x: jax.Array) -> jax.Array:
  return head_logits(head, features(body, x))


@jax.jit
def _chunk_correct(body: Params, head: Params, x: jax.Array, y: jax.Array,
                   mask: jax.Array) -> jax.Array:
  pred = jnp.argmax(head_logits(head, features(body, x)), axis=-1)
  return jnp.sum((pred == y) & mask, dtype=jnp.int32)


def predict_logits(body: Params, head: Params, x: jax.Array,
                   chunk: int) -> jax.Array:
  """Logits ``[N, 10]`` in jitted chunks of ``chunk`` (last one padded)."""
  out = []
  for batch, mask in utils.padded_batches({'x': np.asarray(x)}, chunk):
    out.append(np.asarray(_chunk_logits(body, head, batch['x']))[mask])
  return jax.device_put(np.concatenate(out), jax.devices()[0])


def accuracy(body: Params, head: Params, x: jax.Array, y: jax.Array,
             chunk: int) -> float:
  """Accuracy of ``head`` on ``(x, y)``, in jitted chunks (one compilation)."""
  arrays = {'x': np.asarray(x), 'y': np.asarray(y)}
  correct = sum(int(_chunk_correct(body, head, batch['x'], batch['y'], mask))
                for batch, mask in utils.padded_batches(arrays, chunk))
  return correct / len(arrays['y'])


# ------------------------------------------------------------ observability


def projected_energy(svd_a: metacf.jacobian.JacobianSVD,
                     svd_b: metacf.jacobian.JacobianSVD) -> jax.Array:
  r"""Energy of A's top subspace inside B's top subspace, in ``[0, 1]``.

  .. math::
    \frac{\sum_i s_{a,i}^2 \lVert V_b v_{a,i} \rVert^2}{\sum_i s_{a,i}^2}
    = \frac{\sum_{i \le k_a} s_{a,i}^2 \sum_{j \le k_b}
      (v_{a,i} \cdot v_{b,j})^2}{\sum_{i \le k_a} s_{a,i}^2}

  with ``V_b`` B's ``k_b`` orthonormal rows: 1 when every direction of A
  lies in B's span, 0 when A's directions are orthogonal to it. Not
  symmetric: it asks how much of A the span of B sees.
  """
  overlap = jnp.matmul(svd_a.vt, svd_b.vt.T,
                       precision=jax.lax.Precision.HIGHEST)
  w = svd_a.s**2
  seen = jnp.sum(overlap**2, axis=1)
  total = jnp.sum(w)
  ratio = jnp.sum(w * seen) / jnp.where(total > 0, total, 1)
  return jnp.clip(ratio, 0.0, 1.0)


def excitation_share(sens_a: jax.Array, sens_b: jax.Array, weights: jax.Array,
                     num_a: int, num_b: int) -> jax.Array:
  r"""Weighted :math:`\rho / (1 + \rho)` of A's directions, in ``[0, 1]``.

  ``sens_*[i]`` is :math:`\lVert J_* v_{a,i} \rVert^2` on the task's
  ``num_*`` inputs; :math:`\rho_i` is their ratio per example (B over A).
  0: B's inputs do not move A's outputs along :math:`v_{a,i}`; 1/2: as much
  as A's inputs; towards 1: more.
  """
  per_a = sens_a / num_a
  per_b = sens_b / num_b
  share = per_b / jnp.where(per_a + per_b > 0, per_a + per_b, 1)
  return jnp.clip(jnp.sum(weights * share) / jnp.sum(weights), 0.0, 1.0)


@functools.cache
def _svd_fn(k: int, method: str, oversampling: int, num_power_iters: int):
  """Jitted ``(body, head, x, key) -> JacobianSVD`` of A's centred head."""
  def svd(body, head, x, key):
    apply_fn = lambda b, xx: centred_logits(head, features(b, xx))
    return metacf.jacobian.jacobian_svd(
        apply_fn, body, x, k, method=method, key=key,
        oversampling=oversampling, num_power_iters=num_power_iters)
  return jax.jit(svd)


@functools.partial(jax.jit, static_argnames=('num_a', 'num_b', 'k'))
def _measures(svd_a: metacf.jacobian.JacobianSVD,
              svd_b: metacf.jacobian.JacobianSVD, sens_a: jax.Array,
              sens_b: jax.Array, *, num_a: int, num_b: int,
              k: int) -> dict[str, jax.Array]:
  """Every observability measure, in one compiled function."""
  return {
      'observability': projected_energy(svd_a, svd_b),
      'weighted_overlap': metacf.jacobian.weighted_subspace_overlap(
          svd_a, svd_b, k),
      'excitation_share': excitation_share(sens_a, sens_b, svd_a.s**2,
                                           num_a, num_b),
      'subspace_overlap': metacf.jacobian.subspace_overlap(svd_a, svd_b, k),
      'rho': (sens_b / num_b) / (sens_a / num_a),
  }


@jax.jit
def _sensitivities(body: Params, head: Params, x: jax.Array,
                   vt: jax.Array) -> jax.Array:
  r""":math:`\lVert J(x) v \rVert^2` for each row ``v`` of ``vt [k, P]``."""
  flat, unravel = flatten_util.ravel_pytree(body)
  f = lambda p: centred_logits(head, features(unravel(p), x)).reshape(-1)
  _, f_jvp = jax.linearize(f, flat)
  return jnp.sum(jax.vmap(f_jvp)(vt)**2, axis=1)


class Observer:
  """A's SVD (computed once) and each task's observability record."""

  def __init__(self, config: Config, body: Params, head_a: Params,
               a: TaskData):
    self.config = config
    self.body, self.head_a = body, head_a
    self.x_a = a.x_test[:config.num_jac_a]
    self._svd_a = None

  def _svd(self, x: jax.Array, k: int, name: str):
    c = self.config
    fn = _svd_fn(k, c.svd_method, c.oversampling, c.num_power_iters)
    key = utils.name_key(jax.random.key(c.seed), 'svd', name)
    return fn(self.body, self.head_a, x, key)

  def svd_a(self) -> tuple[metacf.jacobian.JacobianSVD, float]:
    if self._svd_a is None:
      start = time.perf_counter()
      svd = jax.block_until_ready(self._svd(self.x_a, self.config.k_a, 'a'))
      self._svd_a = svd, time.perf_counter() - start
    return self._svd_a

  def observe(self, task: TaskB, b: TaskData) -> dict[str, Any]:
    """Observability of A by ``task`` (before B is trained)."""
    c = self.config
    svd_a, svd_a_s = self.svd_a()
    start = time.perf_counter()
    x_b = b.x_train[:c.num_jac_b]
    svd_b = jax.block_until_ready(self._svd(x_b, c.k_b, task.name))
    k = min(c.k_a, c.k_b)
    sens_a = _sensitivities(self.body, self.head_a, self.x_a, svd_a.vt)
    sens_b = _sensitivities(self.body, self.head_a, x_b, svd_a.vt)
    measures = _measures(svd_a, svd_b, sens_a, sens_b, num_a=c.num_jac_a,
                         num_b=c.num_jac_b, k=k)
    record = {name: float(measures[name]) for name in (
        'observability', 'weighted_overlap', 'excitation_share',
        'subspace_overlap')}
    record.update({
        's_a': np.asarray(svd_a.s).tolist(),
        's_b': np.asarray(svd_b.s).tolist(),
        'rho': np.asarray(measures['rho']).tolist(),
        'svd_a_time_s': svd_a_s,
        'time_s': time.perf_counter() - start,
    })
    return record


# ------------------------------------------------------------------- task B


@functools.cache
def _adapt_fn(kind: str, trainable_names: tuple[str, ...], lr: float,
              momentum: float, temperature: float, old_weight: float):
  """Jitted SGD on B: ``(params, recorded, x, y, idx) -> (params, losses)``.

  ``kind``: ``'ce'`` (B's cross-entropy) or ``'lwf'`` (``lwf_loss``);
  only the leaves ``trainable_names`` of ``params`` are trained, the others
  are passed through bitwise.
  """
  tx = optax.sgd(lr, momentum=momentum)

  def loss_fn(trainable, frozen, recorded, x, y):
    params = {**frozen, **trainable}
    feats = features(params['body'], x)
    new = head_logits(params['head_b'], feats)
    if kind == 'lwf':
      return jnp.mean(metacf.distill.lwf_loss(
          new, y, head_logits(params['head_a'], feats), recorded,
          temperature=temperature, old_weight=old_weight))
    return jnp.mean(_cross_entropy(new, y))

  def adapt(params, recorded, x, y, idx):
    trainable = {n: params[n] for n in trainable_names}
    frozen = {n: v for n, v in params.items() if n not in trainable_names}

    def step(carry, batch_idx):
      trainable, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(
          trainable, frozen, recorded[batch_idx], x[batch_idx], y[batch_idx])
      updates, opt_state = utils.optimizer_update(tx, grads, opt_state,
                                                  trainable)
      return (optax.apply_updates(trainable, updates), opt_state), loss

    (trainable, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)),
                                          idx)
    return {**frozen, **trainable}, losses

  return jax.jit(adapt)


@functools.cache
def _head_init_fn(widths: tuple[int, ...]):
  """Jitted ``key -> head``: a new head, as ``models.MLP`` initialises it."""
  model = models.MLP(widths=widths, num_classes=NUM_CLASSES)

  def init(key):
    params = model.init(key, jnp.zeros([1, NUM_PIXELS], jnp.float32))[
        'params']
    return split_mlp(params, len(widths))[1]

  return jax.jit(init)


# Leaves trained by each phase.
TRAINABLE = {
    'warmup': ('head_b',),
    'finetune': ('body', 'head_b'),
    'lwf': ('body', 'head_a', 'head_b'),
}


@jax.jit
def _kl_a_on_b(recorded: jax.Array, current: jax.Array) -> jax.Array:
  """Mean KL(recorded || current) of A's head on B's inputs, T = 1."""
  return jnp.mean(metacf.distill.tempered_distillation_loss(
      current, recorded, 1.0))


def batch_indices(num: int, steps: int, batch_size: int,
                  key: jax.Array) -> jax.Array:
  """``[steps, batch_size]`` int32: epochs of permutations of ``range(num)``."""
  rng = utils.numpy_rng(key)
  needed = steps * batch_size
  orders = [rng.permutation(num) for _ in range(-(-needed // num))]
  return jnp.asarray(np.concatenate(orders)[:needed].reshape(
      steps, batch_size).astype(np.int32))


class Runner:
  """Learns each task B from A's model, by fine-tuning and by LwF."""

  def __init__(self, config: Config, body: Params, head_a: Params,
               a: TaskData):
    self.config = config
    self.body, self.head_a, self.a = body, head_a, a
    self.a_before = accuracy(body, head_a, a.x_test, a.y_test,
                             config.eval_batch_size)

  def _adapt(self, phase: str, params: Params, recorded: jax.Array,
             b: TaskData, idx: jax.Array) -> tuple[Params, np.ndarray]:
    c = self.config
    fn = _adapt_fn('lwf' if phase == 'lwf' else 'ce', TRAINABLE[phase],
                   c.b_lr, c.momentum, c.temperature, c.old_weight)
    params, losses = fn(params, recorded, b.x_train, b.y_train, idx)
    return params, np.asarray(jax.block_until_ready(losses))

  def run(self, task: TaskB, b: TaskData, seed: int) -> dict[str, Any]:
    """One (task, seed): warm-up, then fine-tuning and LwF; its record."""
    c = self.config
    key = utils.name_key(jax.random.key(c.seed), 'b_run', task.name, seed)
    head_b = _head_init_fn(tuple(c.widths))(utils.name_key(key, 'head_b'))
    params = jax.device_put({'body': self.body, 'head_a': self.head_a,
                             'head_b': head_b}, jax.devices()[0])
    num = int(b.y_train.shape[0])
    chunk = c.eval_batch_size
    # A's head on B's inputs before any training on B: the recorded
    # outputs of LwF (the warm-up changes neither the body nor A's head).
    recorded = predict_logits(self.body, self.head_a, b.x_train, chunk)
    record: dict[str, Any] = {'a_before': self.a_before}
    start = time.perf_counter()
    if c.warmup_steps:
      idx = batch_indices(num, c.warmup_steps, c.b_batch_size,
                          utils.name_key(key, 'warmup_batches'))
      params, losses = self._adapt('warmup', params, recorded, b, idx)
      record['warmup_final_loss'] = float(losses[-1])
    record['b_warmup_accuracy'] = accuracy(
        params['body'], params['head_b'], b.x_test, b.y_test, chunk)
    record['warmup_time_s'] = time.perf_counter() - start
    idx = batch_indices(num, c.b_steps, c.b_batch_size,
                        utils.name_key(key, 'batches'))
    for method in METHODS:
      start = time.perf_counter()
      adapted, losses = self._adapt(method, params, recorded, b, idx)
      train_s = time.perf_counter() - start
      a_after = accuracy(adapted['body'], adapted['head_a'], self.a.x_test,
                         self.a.y_test, chunk)
      b_after = accuracy(adapted['body'], adapted['head_b'], b.x_test,
                         b.y_test, chunk)
      matrix = jnp.asarray([[self.a_before, record['b_warmup_accuracy']],
                            [a_after, b_after]], jnp.float32)
      current = predict_logits(adapted['body'], adapted['head_a'], b.x_train,
                               chunk)
      record[method] = {
          'a_accuracy': a_after,
          'retention': a_after / self.a_before,
          'backward_transfer': float(metacf.metrics.backward_transfer(
              matrix)),
          'b_test_accuracy': b_after,
          'b_train_accuracy': accuracy(adapted['body'], adapted['head_b'],
                                       b.x_train, b.y_train, chunk),
          'a_on_b_kl': float(_kl_a_on_b(recorded, current)),
          'first_loss': float(losses[0]),
          'final_loss': float(np.mean(losses[-max(1, c.b_steps // 10):])),
          'head_a_unchanged': all(jax.tree.leaves(jax.tree.map(
              lambda u, v: bool(np.array_equal(u, v)), adapted['head_a'],
              self.head_a))),
          'train_time_s': train_s,
      }
    return record


# ------------------------------------------------------------------ driver


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
  return {'mean': float(np.mean(values)), 'std': float(np.std(values)),
          'per_seed': [float(v) for v in values]}


SUMMARY_KEYS = ('a_accuracy', 'retention', 'b_test_accuracy',
                'b_train_accuracy', 'a_on_b_kl')


def summarize(config: Config, task: TaskB, observed: Mapping[str, Any],
              runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One task's row: observability and the per-seed means and stds."""
  out: dict[str, Any] = {'task': dataclasses.asdict(task),
                         'observability': dict(observed),
                         'b_warmup_accuracy': _mean_std(
                             [r['b_warmup_accuracy'] for r in runs])}
  for method in METHODS:
    out[method] = {k: _mean_std([r[method][k] for r in runs])
                   for k in SUMMARY_KEYS}
  out['lwf_gain'] = _mean_std([r['lwf']['retention']
                               - r['finetune']['retention'] for r in runs])
  del config
  return out


def correlation(tasks: Mapping[str, Any]) -> dict[str, Any]:
  """Spearman of each observability measure vs retention, over the tasks."""
  targets = {
      'lwf_retention': [t['lwf']['retention']['mean'] for t in tasks.values()],
      'finetune_retention': [t['finetune']['retention']['mean']
                             for t in tasks.values()],
      'lwf_gain': [t['lwf_gain']['mean'] for t in tasks.values()],
  }
  out: dict[str, Any] = {'num_tasks': len(tasks)}
  for measure in MEASURES:
    x = np.asarray([t['observability'][measure] for t in tasks.values()])
    for name, values in targets.items():
      y = np.asarray(values)
      key = f'{measure}__{name}'
      if len(x) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        rho, pval = stats.spearmanr(x, y)
        out[key] = {'spearman': float(rho), 'p': float(pval)}
      else:
        out[key] = {'spearman': None, 'p': None}
  return out


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Trains A (cached), measures observability, learns every B; resumable.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the figure
      (``_plots.FIGURE``), ``checkpoints/a/``, ``observability/`` and
      ``runs/`` (one JSON record each).
    raw_dir: Raw dataset files (default ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir.

  Returns:
    The results written to ``results.json``.
  """
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  a, tasks = load_data(config, raw_dir=raw_dir, data_dir=data_dir)
  params, a_meta = train_a(config, a, workdir)
  body, head_a = split_mlp(params, len(config.widths))
  observer = Observer(config, body, head_a, a)
  runner = Runner(config, body, head_a, a)
  base = {'a': a_recipe(config), 'num_test_a': int(a.y_test.shape[0]),
          'num_train_b': config.num_train_b, 'num_test_b': config.num_test_b}

  observed = loop.resumable_records(
      config.tasks,
      path=lambda t: os.path.join(workdir, 'observability', f'{t.name}.json'),
      recipe=lambda t: {**base, 'task': dataclasses.asdict(t),
                        **{k: getattr(config, k) for k in (
                            'k_a', 'k_b', 'num_jac_a', 'num_jac_b',
                            'svd_method', 'oversampling',
                            'num_power_iters')}},
      compute=lambda t: observer.observe(t, tasks[t.name]),
      summary=lambda r: f'observability {r["observability"]:.3f}',
      desc='observability', progress_bar=config.progress_bar)

  items = [(t, s) for t in config.tasks for s in config.seeds]
  run_list = loop.resumable_records(
      items,
      path=lambda item: os.path.join(workdir, 'runs', item[0].name,
                                     f'seed{item[1]}.json'),
      recipe=lambda item: {**base, 'task': dataclasses.asdict(item[0]),
                           'seed': item[1], **{k: getattr(config, k) for k in (
                               'warmup_steps', 'b_steps', 'b_batch_size',
                               'b_lr', 'momentum', 'temperature',
                               'old_weight')}},
      compute=lambda item: runner.run(item[0], tasks[item[0].name], item[1]),
      summary=lambda r: (f'A retained: finetune '
                         f'{r["finetune"]["retention"]:.3f}, lwf '
                         f'{r["lwf"]["retention"]:.3f}'),
      desc='B runs', progress_bar=config.progress_bar)
  runs = {(t.name, s): r for (t, s), r in zip(items, run_list)}

  summary = {t.name: summarize(config, t, o,
                               [runs[t.name, s] for s in config.seeds])
             for t, o in zip(config.tasks, observed)}
  results = {
      'experiment': 'lwf_observability',
      **utils.run_info(),
      'config': utils.jsonable(dataclasses.asdict(config)),
      'a': {'history': a_meta['history'],
            'train_time_s': a_meta['train_time_s'],
            'test_accuracy': runner.a_before,
            'num_train': int(a.y_train.shape[0]),
            'num_test': int(a.y_test.shape[0]),
            'num_params_body': int(flatten_util.ravel_pytree(body)[0].size)},
      'tasks': summary,
      'runs': {f'{t}/seed{s}': r for (t, s), r in runs.items()},
      'correlation': correlation(summary),
  }
  results['wall_time_s'] = time.perf_counter() - wall_start
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_retention(results, os.path.join(workdir, _plots.FIGURE))
  return results


# ------------------------------------------------------------------- table


def _pct(cell: Mapping[str, Any]) -> str:
  return f'{100 * cell["mean"]:.1f} ± {100 * cell["std"]:.1f}'


def _num(x: float | None, digits: int = 3) -> str:
  return '-' if x is None else f'{x:.{digits}f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: one row per task B, then the Spearman correlations."""
  cfg = results['config']
  lines = [f'A = MNIST, test accuracy {100 * results["a"]["test_accuracy"]:.1f}'
           f'% before B. Mean ± std over {len(cfg["seeds"])} seeds, '
           'accuracies and retention in %; observability measures (k_a = '
           f'{cfg["k_a"]}, k_b = {cfg["k_b"]}) before B.', '',
           '| B | observability | w. overlap | excitation | A acc FT | '
           'A acc LwF | retention FT | retention LwF | LwF gain | B test FT '
           '| B test LwF | KL(A on B) FT | KL(A on B) LwF |',
           '|---|' + '---:|' * 12]
  for name, t in results['tasks'].items():
    o = t['observability']
    ft, lwf = t['finetune'], t['lwf']
    lines.append('| ' + ' | '.join([
        name, _num(o['observability']), _num(o['weighted_overlap']),
        _num(o['excitation_share']), _pct(ft['a_accuracy']),
        _pct(lwf['a_accuracy']), _pct(ft['retention']),
        _pct(lwf['retention']), _pct(t['lwf_gain']),
        _pct(ft['b_test_accuracy']), _pct(lwf['b_test_accuracy']),
        _num(ft['a_on_b_kl']['mean']), _num(lwf['a_on_b_kl']['mean'])]) +
                 ' |')
  corr = results['correlation']
  lines += ['', f'Spearman over the {corr["num_tasks"]} tasks B (p-value):',
            '', '| measure | vs LwF retention | vs FT retention | '
            'vs LwF gain |', '|---|---:|---:|---:|']
  for measure in MEASURES:
    cells = []
    for target in ('lwf_retention', 'finetune_retention', 'lwf_gain'):
      c = corr[f'{measure}__{target}']
      cells.append(f'{_num(c["spearman"])} ({_num(c["p"], 2)})')
    lines.append(f'| {measure} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
