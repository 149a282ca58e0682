r"""Forgetting predicted by the empirical NTK against forgetting measured.

For each pair of tasks (A, B) of ``config.pairs`` (rotated, permuted and
split MNIST, MNIST and Fashion-MNIST):

1. An MLP is trained on A by full-batch gradient descent. That network,
   :math:`\theta_A`, is the linearisation point.
2. At :math:`\theta_A`, before any training on B:
   ``metacf.jacobian.predicted_forgetting`` predicts the change of A's loss
   (on A's held-out examples) that ``num_steps_b`` steps of full-batch
   gradient descent on B will cause, through the empirical NTK blocks
   :math:`\Theta_{AB}, \Theta_{BB}` of the linearised network;
   ``predicted_forgetting_low_rank`` does the same through B's top-k
   Jacobian directions; and the top-k right singular subspaces of A's and
   B's Jacobians (``jacobian_svd``) are compared (``subspace_overlap``,
   ``weighted_subspace_overlap``, ``principal_angle_cosines``).
3. The network is trained on B by exactly those dynamics,
   :math:`\theta \leftarrow \theta - \eta \nabla L_B(\theta)`, and A's
   loss and accuracy are measured again: measured forgetting
   :math:`L_A(\theta_B) - L_A(\theta_A)`, accuracy drop
   :math:`\mathrm{acc}_A(\theta_A) - \mathrm{acc}_A(\theta_B)`.

Across pairs: the Spearman and Pearson correlations of predicted and measured
forgetting (goal: Spearman >= 0.9), and the overlap against the rotation
angle. A second sweep over the width and B's learning rate shows where the
prediction is quantitatively right (ratio predicted / measured near 1) and
where it only ranks.

One head for all tasks: every task is a ten-way classification (digits or
Fashion-MNIST classes) through the same ten outputs, so split MNIST is
class-incremental and A's loss is the loss over all ten logits.

The network is the one-hidden-layer ReLU ``models.MLP`` in NTK
parameterisation (Jacot et al. 2018; Lee et al. 2019, eq. 1): gradient
descent runs on :math:`\omega` with weights :math:`W = \omega /
\sqrt{\text{fan\_in}}` and biases ``bias_scale * beta``. At initialisation
it is the same function as flax's standard parameterisation (``omega`` is the
LeCun-normal kernel times ``sqrt(fan_in)``), but its NTK does not grow with
the width, so one learning rate serves every width and wider networks move
less from their linearisation.

Each pair's record is written to ``workdir/pairs/<name>.json`` as soon as it
is done (and each sweep cell to ``workdir/regime/``); a run started again in
the same workdir skips them and, since every example, permutation,
initialisation and random probe comes from keys folded from the seed and
names, recomputes the rest bitwise as a fresh run would.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from experiments.common import loop
from experiments.common import models
from experiments.common import utils
from experiments.predict_forgetting import _plots
from experiments.predict_forgetting import _tasks
from experiments.predict_forgetting.configs import Config
from experiments.predict_forgetting.configs import Pair
from metacf import jacobian as jac

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
GOAL_SPEARMAN = 0.9
NUM_CLASSES = 10

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


# ------------------------------------------------------------------ model


class Model(NamedTuple):
  """``init(key) -> params`` and ``apply(params, x [N, 784]) -> [N, 10]``."""
  init: Callable[[jax.Array], Params]
  apply: ApplyFn


def _is_kernel(path) -> bool:
  return getattr(path[-1], 'key', None) == 'kernel'


@functools.cache
def make_model(width: int, bias_scale: float) -> Model:
  """The MLP ``784 -> width -> 10`` (ReLU) in NTK parameterisation.

  Cached, so that every call with the same arguments returns the same
  ``apply`` (and jitted functions built on it compile once).

  Args:
    width: Hidden units.
    bias_scale: Biases are ``bias_scale * beta``; ``beta`` starts at 0.
  """
  module = models.MLP(widths=(width,), num_classes=NUM_CLASSES)

  def init(key: jax.Array) -> Params:
    params = module.init(key, jnp.zeros([1, _tasks.NUM_PIXELS]))['params']
    # LeCun-normal kernels (variance 1 / fan_in) -> omega of variance 1.
    return jax.tree.map_with_path(
        lambda path, v: v * math.sqrt(v.shape[0]) if _is_kernel(path) else v,
        params)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    standard = jax.tree.map_with_path(
        lambda path, v: (v * (1 / math.sqrt(v.shape[0])) if _is_kernel(path)
                         else v * bias_scale), params)
    return module.apply({'params': standard}, x)

  return Model(init, apply)


# --------------------------------------------------------------- protocol
# Model-agnostic: any apply_fn(params, x) -> [N, C] (the tests run a model
# linear in its parameters through it, for which prediction is exact).


def targets(labels: jax.Array, loss: str, num_classes: int,
            dtype: Any) -> jax.Array:
  """What the loss compares outputs with: labels, or one-hot for ``'mse'``."""
  if loss == 'mse':
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return labels


def task_loss(outputs: jax.Array, target: jax.Array, loss: str) -> jax.Array:
  r"""Mean over examples of the per-example loss.

  ``'mse'``: :math:`\tfrac12 \sum_c (f_c - y_c)^2`; ``'cross_entropy'``:
  :math:`-\log \mathrm{softmax}(f)_y`. The definitions of
  ``metacf.jacobian.predicted_forgetting``, written out again here so that
  the measurement does not go through the code it checks.
  """
  if loss == 'mse':
    return jnp.mean(0.5 * jnp.sum((outputs - target)**2, axis=1))
  log_p = jax.nn.log_softmax(outputs, axis=1)
  return -jnp.mean(jnp.take_along_axis(log_p, target[:, None], axis=1))


def accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  hits = jnp.argmax(outputs, axis=1).astype(labels.dtype) == labels
  return jnp.mean(hits.astype(outputs.dtype))


def gradient_descent(apply_fn: ApplyFn, params: Params, x: jax.Array,
                     target: jax.Array, lr: jax.typing.ArrayLike, *,
                     num_steps: int, loss: str) -> Params:
  """``num_steps`` steps of full-batch GD, ``theta -= lr * grad L(theta)``.

  ``params`` are of one float dtype, to which ``lr`` is cast.
  """
  lr = jnp.asarray(lr, optax.tree.dtype(params))

  def step(p, _):
    grads = jax.grad(lambda q: task_loss(apply_fn(q, x), target, loss))(p)
    return optax.tree.sub(p, optax.tree.scale(lr, grads)), None

  params, _ = jax.lax.scan(step, params, None, length=num_steps)
  return params


def forgetting(apply_fn: ApplyFn, params_a: Params, x_a: jax.Array,
               labels_a: jax.Array, x_b: jax.Array, labels_b: jax.Array,
               lr: jax.typing.ArrayLike, *, num_steps: int, loss: str,
               num_classes: int,
               chunk_size: int | None = None) -> dict[str, jax.Array]:
  """Predicted and measured forgetting of A from training on B at ``params_a``.

  The prediction (``jac.predicted_forgetting`` at ``params_a``) and the
  measurement (``num_steps`` steps of ``gradient_descent`` on B, then A's
  loss again) run the same dynamics: for a model linear in its parameters
  they agree to rounding.

  Args:
    apply_fn: ``apply_fn(params, x) -> [N, num_classes]``.
    params_a: The network after task A (the linearisation point).
    x_a: A's examples on which forgetting is measured, ``[N_A, ...]``.
    labels_a: Their int labels ``[N_A]``.
    x_b: B's training examples ``[N_B, ...]``.
    labels_b: Their int labels ``[N_B]``.
    lr: Learning rate on B (may be traced; vmap over it for a sweep).
    num_steps: Gradient steps on B (static).
    loss: ``'cross_entropy'`` or ``'mse'`` (static).
    num_classes: Outputs ``C`` (static).
    chunk_size: Forwarded to ``predicted_forgetting`` (static).

  Returns:
    Scalars: ``predicted``; ``measured`` (``loss_a_after - loss_a_before``);
    ``loss_a_before``, ``loss_a_after``, ``accuracy_a_before``,
    ``accuracy_a_after``, ``accuracy_drop``; ``loss_b_before``,
    ``loss_b_after``, ``accuracy_b_after`` (B's training examples).
  """
  dtype = jnp.result_type(x_a)
  t_a = targets(labels_a, loss, num_classes, dtype)
  t_b = targets(labels_b, loss, num_classes, dtype)
  predicted = jac.predicted_forgetting(
      apply_fn, params_a, (x_a, t_a), (x_b, t_b), lr=lr,
      num_steps=num_steps, loss=loss, chunk_size=chunk_size)
  params_b = gradient_descent(apply_fn, params_a, x_b, t_b, lr,
                              num_steps=num_steps, loss=loss)
  f_a0, f_a1 = apply_fn(params_a, x_a), apply_fn(params_b, x_a)
  f_b0, f_b1 = apply_fn(params_a, x_b), apply_fn(params_b, x_b)
  loss_a0, loss_a1 = task_loss(f_a0, t_a, loss), task_loss(f_a1, t_a, loss)
  acc_a0, acc_a1 = accuracy(f_a0, labels_a), accuracy(f_a1, labels_a)
  return {
      'predicted': predicted,
      'measured': loss_a1 - loss_a0,
      'loss_a_before': loss_a0,
      'loss_a_after': loss_a1,
      'accuracy_a_before': acc_a0,
      'accuracy_a_after': acc_a1,
      'accuracy_drop': acc_a0 - acc_a1,
      'loss_b_before': task_loss(f_b0, t_b, loss),
      'loss_b_after': task_loss(f_b1, t_b, loss),
      'accuracy_b_after': accuracy(f_b1, labels_b),
  }


@functools.cache
def forgetting_fn(apply_fn: ApplyFn, *, num_steps: int, loss: str,
                  num_classes: int = NUM_CLASSES,
                  chunk_size: int | None = None, over_lrs: bool = False):
  """Jitted ``forgetting(params_a, x_a, labels_a, x_b, labels_b, lr)``.

  With ``over_lrs`` it is vmapped over ``lr [L]`` (every output ``[L]``);
  the NTK does not depend on ``lr``, so it is computed once.
  """
  fn = functools.partial(forgetting, apply_fn, num_steps=num_steps,
                         loss=loss, num_classes=num_classes,
                         chunk_size=chunk_size)
  if over_lrs:
    fn = jax.vmap(fn, in_axes=(None, None, None, None, None, 0))
  return jax.jit(fn)


@functools.cache
def train_fn(apply_fn: ApplyFn, *, num_steps: int, loss: str,
             num_classes: int = NUM_CLASSES):
  """Jitted ``train(params, x, labels, lr) -> params`` (full-batch GD)."""

  def train(params, x, labels, lr):
    target = targets(labels, loss, num_classes, jnp.result_type(x))
    return gradient_descent(apply_fn, params, x, target, lr,
                            num_steps=num_steps, loss=loss)

  return jax.jit(train)


@functools.cache
def evaluate_fn(apply_fn: ApplyFn, *, loss: str,
                num_classes: int = NUM_CLASSES):
  """Jitted ``evaluate(params, x, labels) -> (loss, accuracy)``."""

  def evaluate(params, x, labels):
    outputs = apply_fn(params, x)
    target = targets(labels, loss, num_classes, outputs.dtype)
    return task_loss(outputs, target, loss), accuracy(outputs, labels)

  return jax.jit(evaluate)


@functools.cache
def svd_fn(apply_fn: ApplyFn, *, k: int, method: str):
  """Jitted ``svd(params, x, key) -> jac.JacobianSVD`` (top ``k``)."""
  return jax.jit(lambda params, x, key: jac.jacobian_svd(
      apply_fn, params, x, k, method=method, key=key))


@functools.cache
def low_rank_fn(apply_fn: ApplyFn, *, k: int, method: str, num_steps: int,
                loss: str, num_classes: int = NUM_CLASSES):
  """Jitted rank-``k`` prediction ``(params, x_a, labels_a, x_b, labels_b,
  lr, key) -> scalar`` (``jac.predicted_forgetting_low_rank``)."""

  def predict(params, x_a, labels_a, x_b, labels_b, lr, key):
    dtype = jnp.result_type(x_a)
    return jac.predicted_forgetting_low_rank(
        apply_fn, params, (x_a, targets(labels_a, loss, num_classes, dtype)),
        (x_b, targets(labels_b, loss, num_classes, dtype)), k=k, lr=lr,
        num_steps=num_steps, loss=loss, method=method, key=key)

  return jax.jit(predict)


# ----------------------------------------------------------- correlations


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Pearson's r (``scipy.stats.pearsonr``); None if there are fewer than 2
  values or one of ``x``, ``y`` is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if _degenerate(x, y):
    return None
  return float(stats.pearsonr(x, y).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Spearman's rho (``scipy.stats.spearmanr``: Pearson's r of the ranks,
  ties averaged); None where :func:`pearson` is."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if _degenerate(x, y):
    return None
  return float(stats.spearmanr(x, y).statistic)


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
  # No correlation to speak of (scipy would warn and return nan).
  return len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0


def agreement(predicted: Sequence[float],
              measured: Sequence[float]) -> dict[str, float | None]:
  r"""How well ``predicted`` matches ``measured``, by rank and by value.

  Returns:
    ``spearman``, ``pearson``; ``slope``, the least-squares ratio through
    the origin :math:`\sum p m / \sum m^2` (1: right on average);
    ``relative_error`` :math:`\lVert p - m \rVert / \lVert m \rVert`;
    ``median_ratio`` of ``p / m``.
  """
  p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  norm = float(np.dot(m, m))
  return {
      'spearman': spearman(p, m),
      'pearson': pearson(p, m),
      'slope': float(np.dot(p, m) / norm) if norm else None,
      'relative_error': (float(np.linalg.norm(p - m) / np.sqrt(norm))
                         if norm else None),
      'median_ratio': (float(np.median(p[m != 0] / m[m != 0]))
                       if np.any(m != 0) else None),
  }


# ------------------------------------------------------------- experiment


def check_config(config: Config) -> None:
  """Raises ValueError on sizes that do not fit together."""
  if not config.pairs:
    raise ValueError('check_config: pairs must not be empty.')
  rows = config.num_train * NUM_CLASSES
  params = (_tasks.NUM_PIXELS + 1) * config.width + (
      config.width + 1) * NUM_CLASSES
  bound = min(rows, params)
  ranks = [('overlap_k', config.overlap_k)]
  ranks += [('low_rank_ks', k) for k in config.low_rank_ks]
  for name, k in ranks:
    if not 1 <= k <= bound:
      raise ValueError(
          f'check_config: {name} must be in [1, min(10 * num_train, '
          f'params)] = [1, {bound}], got {k}.')


def _recipe(config: Config, **extra: Any) -> Any:
  """Everything that changes a record's numbers (not progress bars)."""
  fields = ('seed', 'num_train', 'num_eval', 'width', 'bias_scale', 'loss',
            'lr_a', 'num_steps_a', 'lr_b', 'num_steps_b', 'overlap_k',
            'low_rank_ks', 'svd_method', 'ntk_chunk_size')
  return utils.jsonable({**{f: getattr(config, f) for f in fields}, **extra,
                         'jax_version': jax.__version__})


def _floats(values: Mapping[str, jax.Array]) -> dict[str, Any]:
  # float32 -> Python float is exact, and JSON round-trips Python floats
  # exactly, so a resumed run's numbers are bitwise those of a fresh run.
  return {k: np.asarray(v).tolist() for k, v in values.items()}


class _Run:
  """The state shared by the pairs of one run: data, trained A networks."""

  def __init__(self, config: Config, splits: _tasks.Splits):
    self.config = config
    self.splits = splits
    self.key = jax.random.key(config.seed)
    self._data: dict[tuple[str, str], _tasks.TaskData] = {}
    self._nets: dict[tuple[int, int, str], tuple[Params, dict]] = {}
    self._svds: dict[str, jac.JacobianSVD] = {}

  def data(self, pair: Pair, role: str, *, num_train: int | None = None,
           num_eval: int | None = None) -> _tasks.TaskData:
    task = pair.task_a if role == 'a' else pair.task_b
    if (task.name, role) not in self._data:
      self._data[task.name, role] = _tasks.make_task_data(
          task, role, self.splits, num_train=self.config.num_train,
          num_eval=self.config.num_eval, key=self.key)
    data = self._data[task.name, role]
    return _tasks.take(data, num_train or self.config.num_train,
                       num_eval or self.config.num_eval)

  def network_a(self, pair: Pair, width: int,
                num_train: int) -> tuple[Params, dict[str, float]]:
    """The network after task A (trained once per A, width and size)."""
    cache_key = (width, num_train, pair.task_a.name)
    if cache_key not in self._nets:
      config = self.config
      model = make_model(width, config.bias_scale)
      data = self.data(pair, 'a', num_train=num_train)
      # One initial network for every A: only the task differs.
      params = model.init(utils.name_key(self.key, 'init'))
      params = train_fn(model.apply, num_steps=config.num_steps_a,
                        loss=config.loss)(params, data.x_train, data.y_train,
                                          config.lr_a)
      evaluate = evaluate_fn(model.apply, loss=config.loss)
      train_loss, train_acc = evaluate(params, data.x_train, data.y_train)
      self._nets[cache_key] = (params, {
          'loss_a_train': float(train_loss),
          'accuracy_a_train': float(train_acc)})
    return self._nets[cache_key]

  def svd(self, pair: Pair, role: str, params: Params,
          x: jax.Array) -> jac.JacobianSVD:
    """Top-``overlap_k`` SVD of the Jacobian at ``params`` (A's: cached)."""
    task = pair.task_a if role == 'a' else pair.task_b
    name = f'{pair.task_a.name}/{role}/{task.name}'
    if role == 'a' and name in self._svds:
      return self._svds[name]
    config = self.config
    model = make_model(config.width, config.bias_scale)
    svd = svd_fn(model.apply, k=config.overlap_k, method=config.svd_method)(
        params, x, utils.name_key(self.key, 'svd', name))
    if role == 'a':
      self._svds[name] = svd
    return svd


def evaluate_pair(run: _Run, pair: Pair) -> dict[str, Any]:
  """The record of one pair of the main sweep (see the module docstring)."""
  config = run.config
  start = time.perf_counter()
  model = make_model(config.width, config.bias_scale)
  data_a, data_b = run.data(pair, 'a'), run.data(pair, 'b')
  params_a, stats_a = run.network_a(pair, config.width, config.num_train)
  out = _floats(forgetting_fn(
      model.apply, num_steps=config.num_steps_b, loss=config.loss,
      chunk_size=config.ntk_chunk_size)(
          params_a, data_a.x_eval, data_a.y_eval, data_b.x_train,
          data_b.y_train, config.lr_b))
  svd_a = run.svd(pair, 'a', params_a, data_a.x_train)
  svd_b = run.svd(pair, 'b', params_a, data_b.x_train)
  overlaps = _floats({
      'overlap': jac.subspace_overlap(svd_a, svd_b),
      'weighted_overlap': jac.weighted_subspace_overlap(svd_a, svd_b),
      'principal_cosines': jac.principal_angle_cosines(svd_a, svd_b)})
  low_rank = {}
  for k in config.low_rank_ks:
    predicted = float(low_rank_fn(
        model.apply, k=k, method=config.svd_method,
        num_steps=config.num_steps_b, loss=config.loss)(
            params_a, data_a.x_eval, data_a.y_eval, data_b.x_train,
            data_b.y_train, config.lr_b,
            utils.name_key(run.key, 'low_rank', pair.name, str(k))))
    full = out['predicted']
    low_rank[str(k)] = {
        'predicted': predicted,
        'relative_error_vs_full': (abs(predicted - full) / abs(full)
                                   if full else None)}
  return {
      'name': pair.name,
      'family': pair.family,
      'task_a': dataclasses.asdict(pair.task_a),
      'task_b': dataclasses.asdict(pair.task_b),
      **stats_a,
      **out,
      'ratio': (out['predicted'] / out['measured'] if out['measured']
                else None),
      **overlaps,
      'top_singular_values_a': np.asarray(svd_a.s).tolist(),
      'top_singular_values_b': np.asarray(svd_b.s).tolist(),
      'low_rank': low_rank,
      'time_s': time.perf_counter() - start,
  }


def evaluate_regime(run: _Run, pair: Pair, width: int) -> dict[str, Any]:
  """Predicted and measured forgetting of one pair at one width, every lr."""
  config = run.config
  start = time.perf_counter()
  model = make_model(width, config.bias_scale)
  n, n_eval = config.regime_num_train, config.regime_num_eval
  data_a = run.data(pair, 'a', num_train=n, num_eval=n_eval)
  data_b = run.data(pair, 'b', num_train=n, num_eval=n_eval)
  params_a, stats_a = run.network_a(pair, width, n)
  out = _floats(forgetting_fn(
      model.apply, num_steps=config.num_steps_b, loss=config.loss,
      chunk_size=config.ntk_chunk_size, over_lrs=True)(
          params_a, data_a.x_eval, data_a.y_eval, data_b.x_train,
          data_b.y_train, jnp.asarray(config.regime_lrs, jnp.float32)))
  return {'name': pair.name, 'width': width,
          'lrs': list(config.regime_lrs), **stats_a, **out,
          'time_s': time.perf_counter() - start}


def load_splits(config: Config, *, raw_dir: str | None = None,
                data_dir: str | None = None) -> _tasks.Splits:
  """``{dataset: (train, test)}`` for every dataset the pairs use."""
  datasets = sorted({t.dataset for p in config.pairs
                     for t in (p.task_a, p.task_b)})
  return {d: utils.load_image_splits(d, raw_dir=raw_dir, data_dir=data_dir)
          for d in datasets}


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Runs every pair and the sweep; skips what ``workdir`` already holds.

  Args:
    config: Experiment config.
    workdir: Output directory: ``results.json``, ``results.md``, the
      figures (``_plots.FIGURES``), ``pairs/<name>.json`` and
      ``regime/<name>_width<w>.json``.
    raw_dir: Raw MNIST / Fashion-MNIST files (``metacf.data`` default:
      ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir (``metacf.data`` default).

  Returns:
    The results written to ``results.json``: run info, config, one record
    per pair (``results['pairs']``), the correlations of predicted and
    measured forgetting (``results['summary']``), the overlap against the
    rotation angle, and the width / learning-rate sweep
    (``results['regime']``).

  Raises:
    ValueError: on a bad config, or records in ``workdir`` written by
      another recipe.
  """
  check_config(config)
  wall_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  run = _Run(config, load_splits(config, raw_dir=raw_dir, data_dir=data_dir))

  records = loop.resumable_records(
      config.pairs,
      path=lambda pair: os.path.join(workdir, 'pairs', f'{pair.name}.json'),
      recipe=lambda pair: _recipe(config, pair=dataclasses.asdict(pair)),
      compute=lambda pair: evaluate_pair(run, pair),
      summary=lambda r: (
          f'{r["name"]}: predicted {r["predicted"]:.4f}, measured '
          f'{r["measured"]:.4f}, accuracy drop {r["accuracy_drop"]:.3f}, '
          f'overlap {r["overlap"]:.3f} ({r["time_s"]:.1f}s)'),
      desc='pairs', progress_bar=config.progress_bar)

  def regime_path(cell):
    pair, width = cell
    return os.path.join(workdir, 'regime', f'{pair.name}_width{width}.json')

  def regime_recipe(cell):
    pair, width = cell
    return _recipe(config, pair=dataclasses.asdict(pair), regime_width=width,
                   regime_lrs=config.regime_lrs,
                   regime_num_train=config.regime_num_train,
                   regime_num_eval=config.regime_num_eval)

  regime_pairs = [p for p in config.pairs if p.name in config.regime_pairs]
  regime_records = loop.resumable_records(
      [(pair, width) for width in config.regime_widths
       for pair in regime_pairs],
      path=regime_path, recipe=regime_recipe,
      compute=lambda cell: evaluate_regime(run, *cell),
      summary=lambda r: (
          f'regime {r["name"]} width {r["width"]}: predicted '
          f'{[f"{v:.4f}" for v in r["predicted"]]}, measured '
          f'{[f"{v:.4f}" for v in r["measured"]]} ({r["time_s"]:.1f}s)'),
      desc='regime', progress_bar=config.progress_bar)

  results = {
      'experiment': 'predict_forgetting',
      **utils.run_info(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(config)),
      'num_pairs': len(records),
      'goal_spearman': GOAL_SPEARMAN,
      'summary': summarize(records),
      'overlap_vs_angle': overlap_vs_angle(records),
      'regime': summarize_regime(regime_records, config),
      'pairs': records,
      'regime_records': regime_records,
  }
  # Pairs restored from an earlier session report the time they took then.
  results['pairs_time_s'] = sum(r['time_s'] for r in records)
  results['regime_time_s'] = sum(r['time_s'] for r in regime_records)
  utils.write_json(os.path.join(workdir, RESULTS_JSON), results)
  with open(os.path.join(workdir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  _plots.plot_all(results, workdir)
  return results


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Correlations over the pairs of the main sweep."""
  predicted = [r['predicted'] for r in records]
  measured = [r['measured'] for r in records]
  summary = {
      'loss': agreement(predicted, measured),
      'accuracy_drop': {
          'spearman': spearman(predicted, [r['accuracy_drop']
                                           for r in records]),
          'pearson': pearson(predicted, [r['accuracy_drop']
                                         for r in records])},
      # The overlap alone, without the NTK dynamics, as a predictor.
      'overlap': {
          name: {'spearman': spearman([r[name] for r in records], measured)}
          for name in ('overlap', 'weighted_overlap')},
      'low_rank': {},
  }
  for k in records[0]['low_rank']:
    low = [r['low_rank'][k]['predicted'] for r in records]
    errors = [r['low_rank'][k]['relative_error_vs_full'] for r in records]
    errors = [e for e in errors if e is not None]
    summary['low_rank'][k] = {
        **agreement(low, measured),
        'median_relative_error_vs_full': (float(np.median(errors))
                                          if errors else None),
        'max_relative_error_vs_full': (float(np.max(errors))
                                       if errors else None)}
  spearman_loss = summary['loss']['spearman']
  summary['meets_goal'] = (spearman_loss is not None
                           and spearman_loss >= GOAL_SPEARMAN)
  return summary


def overlap_vs_angle(records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
  """The rotation pairs, by angle: overlaps and forgetting."""
  rotations = sorted((r for r in records if r['family'] == 'rotation'),
                     key=lambda r: r['task_b']['rotation'])
  return {
      'angle': [r['task_b']['rotation'] for r in rotations],
      **{name: [r[name] for r in rotations]
         for name in ('overlap', 'weighted_overlap', 'predicted',
                      'measured', 'accuracy_drop')}}


def summarize_regime(records: Sequence[Mapping[str, Any]],
                     config: Config) -> list[dict[str, Any]]:
  """One row per (width, lr): agreement over the sweep's pairs."""
  rows = []
  for width in config.regime_widths:
    cell = [r for r in records if r['width'] == width]
    for i, lr in enumerate(config.regime_lrs):
      predicted = [r['predicted'][i] for r in cell]
      measured = [r['measured'][i] for r in cell]
      rows.append({
          'width': width, 'lr': lr, **agreement(predicted, measured),
          'predicted': dict(zip((r['name'] for r in cell), predicted)),
          'measured': dict(zip((r['name'] for r in cell), measured)),
          'accuracy_b_after': float(np.mean([r['accuracy_b_after'][i]
                                             for r in cell]))})
  return rows


# ------------------------------------------------------------------ tables


def _num(value: float | None, digits: int = 3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: the correlations, one row per pair, the regime sweep."""
  s = results['summary']
  config = results['config']
  lines = [
      f'Predicted vs measured forgetting of A (change of its '
      f'{config["loss"]} loss on {config["num_eval"]} held-out examples) '
      f'over {results["num_pairs"]} pairs: **Spearman '
      f'{_num(s["loss"]["spearman"])}** (goal >= {results["goal_spearman"]}'
      f': {"met" if s["meets_goal"] else "NOT met"}), Pearson '
      f'{_num(s["loss"]["pearson"])}; least-squares ratio predicted / '
      f'measured {_num(s["loss"]["slope"])}, relative error '
      f'{_num(s["loss"]["relative_error"])}. Predicted forgetting vs '
      f'accuracy drop: Spearman {_num(s["accuracy_drop"]["spearman"])}. '
      f'Overlap alone vs measured: Spearman '
      f'{_num(s["overlap"]["overlap"]["spearman"])} (top-'
      f'{config["overlap_k"]}), '
      f'{_num(s["overlap"]["weighted_overlap"]["spearman"])} (weighted).',
      '']
  low = s['low_rank']
  header = ['pair', 'family', 'predicted', 'measured', 'ratio',
            'acc. A before', 'acc. drop', 'acc. B after', 'overlap',
            'w. overlap'] + [f'rank-{k} rel. err.' for k in low]
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|---|---|' + '---:|' * (len(header) - 2))
  for r in results['pairs']:
    row = [r['name'], r['family'], _num(r['predicted'], 4),
           _num(r['measured'], 4), _num(r['ratio'], 2),
           _num(r['accuracy_a_before']), _num(r['accuracy_drop']),
           _num(r['accuracy_b_after']), _num(r['overlap']),
           _num(r['weighted_overlap'])]
    row += [_num(r['low_rank'][k]['relative_error_vs_full'])
            for k in low]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  lines.append('| rank k | Spearman vs measured | median rel. error vs '
               'full | max rel. error vs full |')
  lines.append('|---:|---:|---:|---:|')
  for k, v in low.items():
    lines.append(f'| {k} | {_num(v["spearman"])} | '
                 f'{_num(v["median_relative_error_vs_full"])} | '
                 f'{_num(v["max_relative_error_vs_full"])} |')
  if results['regime']:
    names = list(results['regime'][0]['predicted'])
    lines += ['', f'Regime sweep ({", ".join(names)}; '
              f'{config["regime_num_train"]} examples per task, '
              f'{config["num_steps_b"]} steps on B):', '',
              '| width | lr on B | ratio pred./meas. (LS) | median ratio | '
              'relative error | Spearman | mean acc. B after |',
              '|---:|---:|---:|---:|---:|---:|---:|']
    for row in results['regime']:
      lines.append(
          f'| {row["width"]} | {row["lr"]:g} | {_num(row["slope"])} | '
          f'{_num(row["median_ratio"])} | {_num(row["relative_error"])} | '
          f'{_num(row["spearman"], 2)} | {_num(row["accuracy_b_after"])} |')
  return '\n'.join(lines)
