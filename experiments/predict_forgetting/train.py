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

The code: ``_tasks.py`` builds the tasks' data, ``steps.py`` the network and
the jitted protocol (train, predict, measure), ``report.py`` the
correlations, summaries and tables, ``_plots.py`` the figures; this file
runs the pairs and the sweep and writes the results.
"""

from collections.abc import Mapping
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import loop
from experiments.common import utils
from experiments.predict_forgetting import _plots
from experiments.predict_forgetting import _tasks
from experiments.predict_forgetting import report
from experiments.predict_forgetting import steps
from experiments.predict_forgetting.configs import Config
from experiments.predict_forgetting.configs import Pair
from experiments.predict_forgetting.report import format_table  # For main.py.
from metacf import jacobian as jac

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'

Params = steps.Params


# ------------------------------------------------------------- experiment


def check_config(config: Config) -> None:
  """Raises ValueError on sizes that do not fit together."""
  if not config.pairs:
    raise ValueError('check_config: pairs must not be empty.')
  rows = config.num_train * steps.NUM_CLASSES
  params = (_tasks.NUM_PIXELS + 1) * config.width + (
      config.width + 1) * steps.NUM_CLASSES
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
      model = steps.make_model(width, config.bias_scale)
      data = self.data(pair, 'a', num_train=num_train)
      # One initial network for every A: only the task differs.
      params = model.init(utils.name_key(self.key, 'init'))
      params = steps.train_fn(model.apply, num_steps=config.num_steps_a,
                              loss=config.loss)(
                                  params, data.x_train, data.y_train,
                                  config.lr_a)
      evaluate = steps.evaluate_fn(model.apply, loss=config.loss)
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
    model = steps.make_model(config.width, config.bias_scale)
    svd = steps.svd_fn(model.apply, k=config.overlap_k,
                       method=config.svd_method)(
                           params, x, utils.name_key(self.key, 'svd', name))
    if role == 'a':
      self._svds[name] = svd
    return svd


def evaluate_pair(run: _Run, pair: Pair) -> dict[str, Any]:
  """The record of one pair of the main sweep (see the module docstring)."""
  config = run.config
  start = time.perf_counter()
  model = steps.make_model(config.width, config.bias_scale)
  data_a, data_b = run.data(pair, 'a'), run.data(pair, 'b')
  params_a, stats_a = run.network_a(pair, config.width, config.num_train)
  out = _floats(steps.forgetting_fn(
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
    predicted = float(steps.low_rank_fn(
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
  model = steps.make_model(width, config.bias_scale)
  n, n_eval = config.regime_num_train, config.regime_num_eval
  data_a = run.data(pair, 'a', num_train=n, num_eval=n_eval)
  data_b = run.data(pair, 'b', num_train=n, num_eval=n_eval)
  params_a, stats_a = run.network_a(pair, width, n)
  out = _floats(steps.forgetting_fn(
      model.apply, num_steps=config.num_steps_b, loss=config.loss,
      chunk_size=config.ntk_chunk_size, over_lrs=True)(
          params_a, data_a.x_eval, data_a.y_eval, data_b.x_train,
          data_b.y_train, jnp.asarray(config.regime_lrs, jnp.float32)))
  return {'name': pair.name, 'width': width,
          'lrs': list(config.regime_lrs), **stats_a, **out,
          'time_s': time.perf_counter() - start}


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
  run = _Run(config, _tasks.load_splits(config, raw_dir=raw_dir,
                                        data_dir=data_dir))

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
      'goal_spearman': report.GOAL_SPEARMAN,
      'summary': report.summarize(records),
      'overlap_vs_angle': report.overlap_vs_angle(records),
      'regime': report.summarize_regime(regime_records, config),
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
