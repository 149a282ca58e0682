r"""Part (a): does meta-training make task subspaces orthogonal?

The claim under test: MAML's natural strategy is to make tasks as orthogonal
as possible in the sense of the singular vectors of the locally linearised
model, and forgetting is largest when two tasks' top singular vectors are
parallel. For held-out MNIST task pairs (A, B) and five initialisations
:math:`\theta_0` of one MLP,

* ``random``: the model's initialisation (flax's LeCun-normal kernels);
* ``joint``: pre-trained by Adam on the union of the meta-training tasks
  (one shared head, plain multi-task training);
* ``maml``: second-order MAML (``metacf.maml.maml_loss``, Finn et al. 2017);
* ``reptile``: ``metacf.maml.reptile_grad`` (Nichol et al. 2018);
* ``imaml``: ``metacf.maml.imaml_grad`` (Rajeswaran et al. 2019),

all meta-/pre-trained from that same random initialisation with the same
number of outer steps, tasks per step, images per task and outer optimizer,
we record, per (pair, init, seed):

1. at :math:`\theta_0`: the top-k right singular subspaces of A's and B's
   Jacobians (``metacf.jacobian.jacobian_svd``) and their
   ``subspace_overlap``, ``weighted_subspace_overlap`` and the cosine of the
   two top singular vectors;
2. :math:`\theta_A`: ``num_steps_a`` steps of full-batch gradient descent on
   A from :math:`\theta_0` (a few-step fine-tuning, as a meta-learned
   initialisation is meant for), then the same overlaps at
   :math:`\theta_A`, and ``metacf.jacobian.predicted_forgetting`` (the
   empirical NTK's prediction of the change of A's loss on held-out images
   that ``num_steps_b`` steps of gradient descent on B will cause);
3. those steps on B, then the measured forgetting :math:`L_A(\theta_B) -
   L_A(\theta_A)` and accuracy drop on A's held-out images.

The statistics (:func:`summarize`): per init, means with bootstrap 95%
intervals; effect sizes, the paired differences (same pair, same seed) of
each init minus ``random`` and minus ``joint``, with bootstrap intervals
and Cohen's :math:`d_z`; Spearman correlations (overlap vs measured,
predicted vs measured) over all records and within each init.

Held out: meta-training sees rotation angles ``train_rotations`` and
permutations ``0 .. num_train_permutations - 1`` on the first
``meta_image_pool`` training images; the pairs use other angles, other
permutations and other images. Records are written one per (pair, init,
seed) by ``experiments.common.loop.resumable_records`` and the trained
initialisations are checkpointed by ``loop.resumable_loop``: a run started
again in the same workdir reads back what is done and, since every draw
comes from keys folded from the seeds and names, recomputes the rest as a
fresh run would.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats as scipy_stats

from experiments.common import loop
from experiments.common import models
from experiments.common import utils
from experiments.meta_continual.configs import Config
from experiments.meta_continual.configs import OrthogonalityConfig
from experiments.meta_continual.configs import Pair
from experiments.meta_continual.configs import TaskSpec
from experiments.predict_forgetting import _tasks
from experiments.predict_forgetting import steps as pf_steps
from metacf import jacobian as jac
from metacf import maml

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
SUBDIR = 'orthogonality'
NUM_CLASSES = 10
NUM_PIXELS = _tasks.NUM_PIXELS
LOSS = 'cross_entropy'
BASELINES = ('random', 'joint')
# Per-record numbers summarised per init and compared between inits.
METRICS = ('overlap_init', 'weighted_overlap_init', 'top1_cosine_init',
           'overlap', 'weighted_overlap', 'top1_cosine', 'predicted',
           'measured', 'accuracy_drop', 'accuracy_a_before',
           'accuracy_b_after')
# (x, y) pairs whose Spearman correlation is reported.
CORRELATIONS = (('overlap', 'measured'), ('weighted_overlap', 'measured'),
                ('top1_cosine', 'measured'), ('overlap_init', 'measured'),
                ('predicted', 'measured'), ('overlap', 'predicted'))

Params = Any
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ model


@functools.cache
def make_model(hidden: tuple[int, ...]) -> pf_steps.Model:
  """The ReLU MLP ``784 -> hidden -> 10`` (``models.MLP``, flax defaults).

  Cached, so that jitted functions built on ``apply`` compile once.
  """
  module = models.MLP(widths=hidden, num_classes=NUM_CLASSES)

  def init(key: jax.Array) -> Params:
    return module.init(key, jnp.zeros([1, NUM_PIXELS]))['params']

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return module.apply({'params': params}, x)

  return pf_steps.Model(init, apply)


def loss_fn_of(apply_fn: pf_steps.ApplyFn) -> Callable[..., jax.Array]:
  """``loss_fn(params, x, labels)``: mean cross-entropy (the inner loss)."""
  def loss_fn(params, x, labels):
    return pf_steps.task_loss(apply_fn(params, x), labels, LOSS)
  return loss_fn


# ------------------------------------------------------------------- data


class MetaPool(NamedTuple):
  """The meta-training tasks' images."""
  x: jax.Array  # [num_tasks, meta_images_per_task, 784], float32
  y: jax.Array  # [num_tasks, meta_images_per_task], int32


def train_specs(ocfg: OrthogonalityConfig) -> tuple[TaskSpec, ...]:
  """The meta-training tasks: rotations, then permutations."""
  return (tuple(TaskSpec(rotation=a) for a in ocfg.train_rotations)
          + tuple(TaskSpec(permutation=i)
                  for i in range(ocfg.num_train_permutations)))


def permutation(key: jax.Array, permutation_id: int) -> np.ndarray:
  """Task ``permutation_id``'s fixed permutation of the 784 pixels."""
  return utils.numpy_rng(utils.name_key(key, 'permutation', permutation_id)
                         ).permutation(NUM_PIXELS)


def task_images(spec: TaskSpec, images: np.ndarray,
                key: jax.Array) -> np.ndarray:
  """uint8 ``[N, 28, 28, 1]`` -> standardised float32 ``[N, 784]``.

  Rotated (``predict_forgetting._tasks.rotate``: bilinear, zero fill) or
  permuted, then standardised with MNIST's pixel mean and std, the same
  constants for every task (``_tasks.to_vectors``).
  """
  if spec.permutation is not None:
    return _tasks.to_vectors(images,
                             permutation=permutation(key, spec.permutation))
  return _tasks.to_vectors(images, spec.rotation)


def make_meta_pool(ocfg: OrthogonalityConfig, train: Mapping[str, np.ndarray],
                   key: jax.Array) -> MetaPool:
  """``meta_images_per_task`` images per meta-training task, drawn per task
  from the first ``meta_image_pool`` training images."""
  xs, ys = [], []
  for spec in train_specs(ocfg):
    rng = utils.numpy_rng(utils.name_key(key, 'meta_images', spec.name))
    idx = rng.choice(ocfg.meta_image_pool, ocfg.meta_images_per_task,
                     replace=False)
    xs.append(task_images(spec, train['image'][idx], key))
    ys.append(train['label'][idx].astype(np.int32))
  return MetaPool(jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)))


def make_eval_task(spec: TaskSpec, role: str, ocfg: OrthogonalityConfig,
                   splits: tuple[Mapping[str, np.ndarray],
                                 Mapping[str, np.ndarray]],
                   key: jax.Array) -> _tasks.TaskData:
  """A held-out task's images in one role (``'a'``: learnt first).

  Training images from the training images after ``meta_image_pool`` (A
  from the first half of them, B from the second: A and B never share an
  image); ``num_eval`` held-out images from the test split. They depend
  only on the data key, the task and the role.
  """
  train, test = splits
  rest = np.arange(ocfg.meta_image_pool, len(train['label']))
  half = len(rest) // 2
  candidates = rest[:half] if role == 'a' else rest[half:]
  rng = utils.numpy_rng(utils.name_key(key, 'eval_images', role, spec.name))
  idx = np.sort(rng.choice(candidates, ocfg.num_train, replace=False))
  eval_idx = np.sort(rng.choice(len(test['label']), ocfg.num_eval,
                                replace=False))
  return _tasks.TaskData(
      jnp.asarray(task_images(spec, train['image'][idx], key)),
      jnp.asarray(train['label'][idx].astype(np.int32)),
      jnp.asarray(task_images(spec, test['image'][eval_idx], key)),
      jnp.asarray(test['label'][eval_idx].astype(np.int32)))


# ---------------------------------------------------------- meta-training


def sample_tasks(key: jax.Array, pool: MetaPool,
                 ocfg: OrthogonalityConfig) -> maml.Task:
  """``meta_batch_tasks`` tasks (with replacement), each with distinct
  support and query images drawn from its pool."""
  num_tasks, num_images = pool.y.shape
  size = ocfg.num_support + ocfg.num_query
  key_tasks, key_images = jax.random.split(key)
  ids = jax.random.randint(key_tasks, [ocfg.meta_batch_tasks], 0, num_tasks)

  def one(k, t):
    idx = jax.random.permutation(k, num_images)[:size]
    return pool.x[t][idx], pool.y[t][idx]

  x, y = jax.vmap(one)(jax.random.split(key_images, ocfg.meta_batch_tasks),
                       ids)
  s = ocfg.num_support
  return maml.Task(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


def meta_loss_and_grad(kind: str, loss_fn: Callable[..., jax.Array],
                       params: Params, tasks: maml.Task,
                       ocfg: OrthogonalityConfig) -> tuple[jax.Array, Params]:
  """One outer step's loss and (meta-)gradient of ``kind``.

  ``joint``: the plain loss on all images of the batch; ``maml``: the
  second-order MAML gradient; ``reptile``: Reptile's gradient, adapting on
  support and query together (Reptile has no query set), loss before
  adaptation; ``imaml``: iMAML's implicit gradient and query loss.
  """
  everything = maml.Task(
      jnp.concatenate([tasks.support_x, tasks.query_x], axis=1),
      jnp.concatenate([tasks.support_y, tasks.query_y], axis=1),
      tasks.query_x, tasks.query_y)
  flat_x = everything.support_x.reshape(-1, NUM_PIXELS)
  flat_y = everything.support_y.reshape(-1)
  if kind == 'joint':
    return jax.value_and_grad(loss_fn)(params, flat_x, flat_y)
  if kind == 'maml':
    return jax.value_and_grad(
        lambda p: maml.maml_loss(loss_fn, p, tasks, inner_lr=ocfg.inner_lr,
                                 num_inner_steps=ocfg.num_inner_steps))(params)
  if kind == 'reptile':
    grads = maml.reptile_grad(loss_fn, params, everything,
                              inner_lr=ocfg.inner_lr,
                              num_inner_steps=ocfg.num_inner_steps)
    return loss_fn(params, flat_x, flat_y), grads
  if kind == 'imaml':
    return maml.imaml_grad(loss_fn, params, tasks, reg=ocfg.imaml_reg,
                           inner_lr=ocfg.inner_lr,
                           num_inner_steps=ocfg.num_inner_steps,
                           cg_steps=ocfg.imaml_cg_steps)
  raise ValueError(f'meta_loss_and_grad: unknown kind {kind!r}.')


@functools.cache
def train_chunk_fn(kind: str, ocfg: OrthogonalityConfig):
  """Jitted ``chunk(state, pool, key, start) -> (state, losses
  [steps_per_call])``: ``steps_per_call`` Adam steps of ``kind``; step
  ``start + i`` samples its tasks with ``fold_in(key, start + i)``."""
  model = make_model(ocfg.hidden)
  loss_fn = loss_fn_of(model.apply)
  optimizer = optax.adam(ocfg.outer_lr)

  def chunk(state, pool, key, start):
    def step(carry, i):
      params, opt_state = carry
      tasks = sample_tasks(jax.random.fold_in(key, start + i), pool, ocfg)
      loss, grads = meta_loss_and_grad(kind, loss_fn, params, tasks, ocfg)
      updates, opt_state = utils.optimizer_update(optimizer, grads,
                                                  opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
        step, (state['params'], state['opt_state']),
        jnp.arange(ocfg.steps_per_call))
    return {'params': params, 'opt_state': opt_state}, losses

  return jax.jit(chunk)


# ------------------------------------------------------------------- run


def _recipe(ocfg: OrthogonalityConfig, **extra: Any) -> Any:
  """Everything that changes a record's numbers (not seeds lists, pairs
  lists, inits lists or bootstrap sizes, which only select records)."""
  skip = {'seeds', 'pairs', 'inits', 'num_bootstrap'}
  fields = {f.name: getattr(ocfg, f.name) for f in dataclasses.fields(ocfg)
            if f.name not in skip}
  return utils.jsonable({**fields, **extra, 'jax_version': jax.__version__})


def _floats(values: Mapping[str, jax.Array]) -> dict[str, Any]:
  # float32 -> Python float is exact and JSON round-trips it: a resumed
  # run's numbers are bitwise a fresh run's.
  return {k: np.asarray(v).tolist() for k, v in values.items()}


class _Run:
  """What the records of one run share: data, initialisations, jitted fns."""

  def __init__(self, config: Config, workdir: str, splits):
    self.config = config
    self.ocfg = config.orthogonality
    self.workdir = workdir
    self.splits = splits
    self.data_key = jax.random.key(self.ocfg.data_seed)
    self.model = make_model(self.ocfg.hidden)
    self._pool: MetaPool | None = None
    self._data: dict[tuple[str, str], _tasks.TaskData] = {}
    self._inits: dict[tuple[str, int], Params] = {}
    self.training: dict[str, Any] = {}

  @property
  def pool(self) -> MetaPool:
    if self._pool is None:
      self._pool = make_meta_pool(self.ocfg, self.splits[0], self.data_key)
    return self._pool

  def data(self, spec: TaskSpec, role: str) -> _tasks.TaskData:
    if (spec.name, role) not in self._data:
      self._data[spec.name, role] = make_eval_task(
          spec, role, self.ocfg, self.splits, self.data_key)
    return self._data[spec.name, role]

  def random_init(self, seed: int) -> Params:
    return self.model.init(utils.name_key(jax.random.key(seed), 'init'))

  def init_params(self, kind: str, seed: int) -> Params:
    """The initialisation ``kind`` of ``seed`` (trained once, checkpointed)."""
    if (kind, seed) in self._inits:
      return self._inits[kind, seed]
    self._inits = {k: v for k, v in self._inits.items() if k[1] == seed}
    params0 = self.random_init(seed)
    if kind == 'random':
      self._inits[kind, seed] = params0
      return params0
    ocfg = self.ocfg
    name = f'{kind}_seed{seed}'
    key = utils.name_key(jax.random.key(seed), 'meta_train', kind)
    meta = {'history': [], 'train_time_s': 0.0}
    optimizer = optax.adam(ocfg.outer_lr)

    def step(state, done):
      start = time.perf_counter()
      state, losses = train_chunk_fn(kind, ocfg)(state, self.pool, key,
                                                 np.int32(done))
      loss = float(np.mean(np.asarray(losses)))
      meta['train_time_s'] += time.perf_counter() - start
      meta['history'].append({'step': done + ocfg.steps_per_call,
                              'loss': loss})
      return state, f'loss {loss:.4f} ({meta["train_time_s"]:.1f}s)'

    result = loop.resumable_loop(
        os.path.join(self.workdir, 'checkpoints', name), name=name,
        unit='step', total=ocfg.outer_steps, stride=ocfg.steps_per_call,
        checkpoint_every=ocfg.outer_steps,
        init=lambda: {'params': params0,
                      'opt_state': optimizer.init(params0)},
        step=step, recipe=_recipe(ocfg, kind=kind, seed=seed), meta=meta,
        max_to_keep=1, progress_bar=self.config.progress_bar)
    self.training[name] = result.meta
    self._inits[kind, seed] = result.state['params']
    return self._inits[kind, seed]


def _svd_stats(svd_a: jac.JacobianSVD, svd_b: jac.JacobianSVD,
               suffix: str) -> dict[str, Any]:
  return _floats({
      f'overlap{suffix}': jac.subspace_overlap(svd_a, svd_b),
      f'weighted_overlap{suffix}': jac.weighted_subspace_overlap(svd_a,
                                                                 svd_b),
      f'top1_cosine{suffix}': jnp.abs(jnp.dot(svd_a.vt[0], svd_b.vt[0])),
      f'principal_cosines{suffix}': jac.principal_angle_cosines(svd_a,
                                                                svd_b)})


def evaluate(run: _Run, pair: Pair, kind: str, seed: int) -> dict[str, Any]:
  """The record of one (pair, init, seed) (see the module docstring)."""
  ocfg = run.ocfg
  start = time.perf_counter()
  apply_fn = run.model.apply
  params0 = run.init_params(kind, seed)
  data_a, data_b = run.data(pair.task_a, 'a'), run.data(pair.task_b, 'b')
  svd = pf_steps.svd_fn(apply_fn, k=ocfg.overlap_k, method=ocfg.svd_method)
  x_svd_a, x_svd_b = (d.x_train[:ocfg.num_svd] for d in (data_a, data_b))

  def svd_key(role, where):
    return utils.name_key(run.data_key, 'svd', pair.name, kind, seed, role,
                          where)

  init_stats = _svd_stats(svd(params0, x_svd_a, svd_key('a', 'init')),
                          svd(params0, x_svd_b, svd_key('b', 'init')),
                          '_init')
  evaluate_fn = pf_steps.evaluate_fn(apply_fn, loss=LOSS)
  loss_init, acc_init = evaluate_fn(params0, data_a.x_eval, data_a.y_eval)
  params_a = pf_steps.train_fn(apply_fn, num_steps=ocfg.num_steps_a,
                               loss=LOSS)(params0, data_a.x_train,
                                          data_a.y_train, ocfg.lr_a)
  loss_train, acc_train = evaluate_fn(params_a, data_a.x_train,
                                      data_a.y_train)
  svd_a = svd(params_a, x_svd_a, svd_key('a', 'after_a'))
  svd_b = svd(params_a, x_svd_b, svd_key('b', 'after_a'))
  out = _floats(pf_steps.forgetting_fn(
      apply_fn, num_steps=ocfg.num_steps_b, loss=LOSS,
      chunk_size=ocfg.ntk_chunk_size)(
          params_a, data_a.x_eval, data_a.y_eval, data_b.x_train,
          data_b.y_train, ocfg.lr_b))
  return {
      'name': pair.name, 'family': pair.family, 'init': kind, 'seed': seed,
      'task_a': dataclasses.asdict(pair.task_a),
      'task_b': dataclasses.asdict(pair.task_b),
      **init_stats,
      'loss_a_init': float(loss_init), 'accuracy_a_init': float(acc_init),
      'loss_a_train': float(loss_train),
      'accuracy_a_train': float(acc_train),
      **_svd_stats(svd_a, svd_b, ''),
      'top_singular_values_a': np.asarray(svd_a.s).tolist(),
      'top_singular_values_b': np.asarray(svd_b.s).tolist(),
      **out,
      'time_s': time.perf_counter() - start,
  }


def items(ocfg: OrthogonalityConfig) -> list[tuple[Pair, str, int]]:
  """Every (pair, init, seed), grouped by seed and init (each init is
  trained once, when its first record is computed)."""
  return [(pair, kind, seed) for seed in ocfg.seeds for kind in ocfg.inits
          for pair in ocfg.pairs]


def record_path(workdir: str, pair: Pair, kind: str, seed: int) -> str:
  return os.path.join(workdir, 'records', f'{kind}_seed{seed}',
                      f'{pair.name}.json')


def check_config(ocfg: OrthogonalityConfig) -> None:
  if not ocfg.pairs:
    raise ValueError('check_config: orthogonality.pairs must not be empty.')


def train_and_evaluate(config: Config, workdir: str, *,
                       raw_dir: str | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Runs part (a); skips what ``workdir/orthogonality`` already holds.

  Args:
    config: Study config (``config.orthogonality`` is used).
    workdir: The study's output directory; part (a) writes under
      ``workdir/orthogonality/``: ``results.json``, ``results.md``, the
      figures, ``records/<init>_seed<s>/<pair>.json`` and
      ``checkpoints/<init>_seed<s>/``.
    raw_dir: Raw MNIST files (``metacf.data`` default: ``$METACF_RAW_DIR``).
    data_dir: tensorflow-datasets data dir (``metacf.data`` default).

  Returns:
    The results written to ``results.json``: run info, config, one record
    per (pair, init, seed) (``results['records']``), the meta-training
    histories and the statistics (``results['summary']``, see
    :func:`summarize`).
  """
  ocfg = config.orthogonality
  check_config(ocfg)
  wall_start = time.perf_counter()
  out_dir = os.path.join(workdir, SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  splits = utils.load_image_splits('mnist', raw_dir=raw_dir,
                                   data_dir=data_dir)
  run = _Run(config, out_dir, splits)
  records = loop.resumable_records(
      items(ocfg),
      path=lambda item: record_path(out_dir, *item),
      recipe=lambda item: _recipe(ocfg, pair=dataclasses.asdict(item[0]),
                                  kind=item[1], seed=item[2]),
      compute=lambda item: evaluate(run, *item),
      summary=lambda r: (
          f'{r["init"]} seed {r["seed"]} {r["name"]}: overlap init '
          f'{r["overlap_init"]:.3f} -> {r["overlap"]:.3f}, predicted '
          f'{r["predicted"]:.4f}, measured {r["measured"]:.4f}, acc. drop '
          f'{r["accuracy_drop"]:.3f} ({r["time_s"]:.1f}s)'),
      desc='orthogonality', progress_bar=config.progress_bar)
  for kind, seed in ((k, s) for s in ocfg.seeds for k in ocfg.inits):
    if kind != 'random' and f'{kind}_seed{seed}' not in run.training:
      run.init_params(kind, seed)  # Read back: its training history.
  results = {
      'experiment': 'meta_continual/orthogonality',
      **utils.run_info(),
      'wall_time_s': time.perf_counter() - wall_start,
      'config': utils.jsonable(dataclasses.asdict(ocfg)),
      'num_records': len(records),
      'summary': summarize(records, ocfg),
      'meta_training': run.training,
      'records': records,
  }
  results['records_time_s'] = sum(r['time_s'] for r in records)
  utils.write_json(os.path.join(out_dir, RESULTS_JSON), results)
  with open(os.path.join(out_dir, RESULTS_MD), 'w') as f:
    f.write(format_table(results) + '\n')
  plot_all(results, out_dir)
  return results


# ------------------------------------------------------ picking iMAML's lambda


def select_imaml_reg(config: Config, regs: Sequence[float], *,
                     seed: int = 100, raw_dir: str | None = None,
                     data_dir: str | None = None) -> dict[str, float]:
  """Accuracy after fine-tuning from iMAML's init, for each lambda in ``regs``.

  How ``imaml_reg`` was picked, on meta-training tasks only: train iMAML
  (as the run does, ``outer_steps`` steps) at ``seed`` (outside the
  reported seeds), then on every third meta-training task fine-tune as the
  evaluation does (``num_steps_a`` steps at ``lr_a``) on its first 100
  pool images (half the pool if that is smaller) and measure the accuracy on the rest of its pool. Also
  reports ``'random'`` (no training) for reference. No held-out pair is
  read. ``python -c "from experiments.meta_continual import configs,
  orthogonality as o; print(o.select_imaml_reg(configs.get_config(
  'default'), (0.1, 0.3, 1, 3, 10, 30, 100)))"``
  """
  ocfg = config.orthogonality
  splits = utils.load_image_splits('mnist', raw_dir=raw_dir,
                                   data_dir=data_dir)
  pool = make_meta_pool(ocfg, splits[0], jax.random.key(ocfg.data_seed))
  model = make_model(ocfg.hidden)
  params0 = model.init(utils.name_key(jax.random.key(seed), 'init'))
  train = pf_steps.train_fn(model.apply, num_steps=ocfg.num_steps_a,
                            loss=LOSS)
  evaluate_fn = pf_steps.evaluate_fn(model.apply, loss=LOSS)

  n = min(100, pool.y.shape[1] // 2)

  def accuracy(params):
    accs = []
    for t in range(0, pool.y.shape[0], 3):
      adapted = train(params, pool.x[t, :n], pool.y[t, :n], ocfg.lr_a)
      accs.append(float(evaluate_fn(adapted, pool.x[t, n:],
                                    pool.y[t, n:])[1]))
    return float(np.mean(accs))

  out = {'random': accuracy(params0)}
  key = utils.name_key(jax.random.key(seed), 'meta_train', 'imaml')
  for reg in regs:
    cfg = dataclasses.replace(ocfg, imaml_reg=float(reg))
    optimizer = optax.adam(cfg.outer_lr)
    state = {'params': params0, 'opt_state': optimizer.init(params0)}
    for done in range(0, cfg.outer_steps, cfg.steps_per_call):
      state, _ = train_chunk_fn('imaml', cfg)(state, pool, key,
                                              np.int32(done))
    out[f'{reg:g}'] = accuracy(state['params'])
  return out


# ------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], *, num: int, rng: np.random.Generator,
                 statistic: Callable[[np.ndarray], float] = np.mean
                 ) -> list[float] | None:
  """Percentile bootstrap 95% interval of ``statistic`` over ``values``
  (``num`` resamples with replacement); None for fewer than 2 values."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return None
  idx = rng.integers(0, len(values), size=(num, len(values)))
  boot = np.array([statistic(values[i]) for i in idx])
  boot = boot[np.isfinite(boot)]
  if not len(boot):
    return None
  return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def spearman(x: Sequence[float], y: Sequence[float], *, num: int,
             rng: np.random.Generator) -> dict[str, Any]:
  """Spearman's rho (``scipy.stats.spearmanr``), its p-value and a
  bootstrap 95% interval over the (x, y) pairs; None where x or y is
  constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

  def rho(idx):
    xs, ys = x[idx], y[idx]
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
      return np.nan
    return scipy_stats.spearmanr(xs, ys).statistic

  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return {'rho': None, 'p': None, 'ci': None, 'n': int(len(x))}
  result = scipy_stats.spearmanr(x, y)
  ci = bootstrap_ci(np.arange(len(x)), num=num, rng=rng,
                    statistic=lambda i: rho(i.astype(int)))
  return {'rho': float(result.statistic), 'p': float(result.pvalue),
          'ci': ci, 'n': int(len(x))}


def _mean_ci(values: Sequence[float], num: int,
             rng: np.random.Generator) -> dict[str, Any]:
  return {'mean': float(np.mean(values)),
          'ci': bootstrap_ci(values, num=num, rng=rng), 'n': len(values)}


def summarize(records: Sequence[Mapping[str, Any]],
              ocfg: OrthogonalityConfig) -> dict[str, Any]:
  """Per-init means, paired effect sizes and Spearman correlations.

  Returns:
    ``per_init[init][metric]``: ``{'mean', 'ci', 'n'}`` over the (pair,
    seed) records of ``init``; ``effects[init][baseline][metric]``: the
    paired difference ``init - baseline`` over (pair, seed) units,
    ``{'mean', 'ci', 'd_z', 'n'}`` (``d_z``: mean / standard deviation of
    the differences, Cohen's paired effect size); ``spearman['all']`` and
    ``spearman[init]`` and ``spearman['family:<family>']``:
    ``'<x>_vs_<y>'`` -> ``{'rho', 'p', 'ci', 'n'}``;
    ``families[family]``: ``per_init`` and ``effects`` of that family's
    records alone. Intervals: percentile bootstrap, ``num_bootstrap``
    resamples of the units, from a generator seeded by ``data_seed``.
  """
  rng = np.random.default_rng(ocfg.data_seed)
  num = ocfg.num_bootstrap
  summary = _group_summary(records, num, rng)
  by_init: dict[str, list[Mapping[str, Any]]] = {}
  for r in records:
    by_init.setdefault(r['init'], []).append(r)

  def correlations(rs):
    return {f'{x}_vs_{y}': spearman([r[x] for r in rs], [r[y] for r in rs],
                                    num=num, rng=rng)
            for x, y in CORRELATIONS}

  families = sorted({r['family'] for r in records})
  by_family = {f: [r for r in records if r['family'] == f] for f in families}
  summary['spearman'] = {'all': correlations(records),
                         **{init: correlations(rs)
                            for init, rs in by_init.items()},
                         **{f'family:{f}': correlations(rs)
                            for f, rs in by_family.items()}}
  summary['families'] = {f: _group_summary(rs, num, rng)
                         for f, rs in by_family.items()}
  return summary


def _group_summary(records: Sequence[Mapping[str, Any]], num: int,
                   rng: np.random.Generator) -> dict[str, Any]:
  """``per_init`` and ``effects`` of :func:`summarize` for ``records``."""
  by_init: dict[str, list[Mapping[str, Any]]] = {}
  for r in records:
    by_init.setdefault(r['init'], []).append(r)
  per_init = {
      init: {m: _mean_ci([r[m] for r in rs], num, rng) for m in METRICS}
      for init, rs in by_init.items()}
  unit = {(r['init'], r['name'], r['seed']): r for r in records}
  effects: dict[str, Any] = {}
  for init in by_init:
    for base in BASELINES:
      # joint - random, not random - joint: each comparison once.
      if init == 'random' or base == init or base not in by_init:
        continue
      keys = [(r['name'], r['seed']) for r in by_init[init]
              if (base, r['name'], r['seed']) in unit]
      cell = {}
      for m in METRICS:
        diffs = np.array([unit[init, *k][m] - unit[base, *k][m]
                          for k in keys])
        sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
        cell[m] = {'mean': float(np.mean(diffs)),
                   'ci': bootstrap_ci(diffs, num=num, rng=rng),
                   'd_z': float(np.mean(diffs) / sd) if sd > 0 else None,
                   'n': len(diffs)}
      effects.setdefault(init, {})[base] = cell
  return {'per_init': per_init, 'effects': effects}


# ------------------------------------------------------------------ tables


def _num(value: float | None, digits: int = 3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def _cell(c: Mapping[str, Any], digits: int = 3) -> str:
  ci = c.get('ci')
  if ci is None:
    return _num(c['mean'], digits)
  return (f'{_num(c["mean"], digits)} [{_num(ci[0], digits)}, '
          f'{_num(ci[1], digits)}]')


def _rho(c: Mapping[str, Any]) -> str:
  if c['rho'] is None:
    return '-'
  return (f'{c["rho"]:.2f} [{_num(c["ci"][0], 2)}, {_num(c["ci"][1], 2)}]'
          f' (p={c["p"]:.2g})')


TABLE_METRICS = ('overlap_init', 'overlap', 'weighted_overlap',
                 'top1_cosine', 'accuracy_a_before', 'predicted', 'measured',
                 'accuracy_drop')


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: per-init means, effect sizes, Spearman correlations."""
  s = results['summary']
  inits = list(s['per_init'])
  lines = [f'{results["num_records"]} records (pairs x inits x seeds). '
           'Means with bootstrap 95% intervals over (pair, seed):', '',
           '| init | ' + ' | '.join(TABLE_METRICS) + ' |',
           '|---|' + '---:|' * len(TABLE_METRICS)]
  for init in inits:
    lines.append(f'| {init} | ' + ' | '.join(
        _cell(s['per_init'][init][m]) for m in TABLE_METRICS) + ' |')
  effect_metrics = ('overlap_init', 'overlap', 'top1_cosine', 'predicted',
                    'measured', 'accuracy_drop')
  lines += ['', 'Paired differences (init minus baseline, same pair and '
            'seed): mean [bootstrap 95% CI] (d_z):', '',
            '| init - baseline | ' + ' | '.join(effect_metrics) + ' |',
            '|---|' + '---:|' * len(effect_metrics)]
  for init, bases in s['effects'].items():
    for base, cell in bases.items():
      lines.append(f'| {init} - {base} | ' + ' | '.join(
          f'{_cell(cell[m])} ({_num(cell[m]["d_z"], 2)})'
          for m in effect_metrics) + ' |')
  family_metrics = ('overlap_init', 'overlap', 'top1_cosine', 'measured')
  lines += ['', 'Per family: mean per init; paired difference vs random '
            '[bootstrap 95% CI]:', '',
            '| family | init | ' + ' | '.join(family_metrics) + ' | '
            + ' | '.join(f'{m} - random' for m in family_metrics) + ' |',
            '|---|---|' + '---:|' * (2 * len(family_metrics))]
  for family, cell in s['families'].items():
    for init in cell['per_init']:
      diff = cell['effects'].get(init, {}).get('random')
      lines.append(
          f'| {family} (n={cell["per_init"][init]["overlap"]["n"]}) | '
          f'{init} | ' + ' | '.join(
              _num(cell['per_init'][init][m]['mean']) for m in family_metrics)
          + ' | ' + ' | '.join(
              '-' if diff is None else _cell(diff[m])
              for m in family_metrics) + ' |')
  lines += ['', 'Per pair, mean over seeds: top-k overlap after A / |cos| '
            'of the top singular vectors / measured forgetting:', '',
            '| pair | ' + ' | '.join(inits) + ' |',
            '|---|' + '---:|' * len(inits)]
  pairs = list(dict.fromkeys(r['name'] for r in results['records']))
  for name in pairs:
    cells = []
    for init in inits:
      rs = [r for r in results['records']
            if r['name'] == name and r['init'] == init]
      cells.append(' / '.join(
          f'{np.mean([r[m] for r in rs]):.{d}f}'
          for m, d in (('overlap', 2), ('top1_cosine', 2), ('measured', 3))))
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  names = [f'{x}_vs_{y}' for x, y in CORRELATIONS]
  lines += ['', 'Spearman rho [bootstrap 95% CI] (p):', '',
            '| records | ' + ' | '.join(names) + ' |',
            '|---|' + '---:|' * len(names)]
  for group, cell in s['spearman'].items():
    lines.append(f'| {group} (n={cell[names[0]]["n"]}) | ' + ' | '.join(
        _rho(cell[n]) for n in names) + ' |')
  return '\n'.join(lines)


# ----------------------------------------------------------------- figures

FIGURES = ('overlap_by_init.png', 'scatter.png')


def plot_all(results: Mapping[str, Any], out_dir: str) -> list[str]:
  """Writes ``FIGURES`` into ``out_dir``; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  s = results['summary']
  inits = list(s['per_init'])
  paths = []
  panels = (('overlap_init', 'top-k overlap at init'),
            ('overlap', 'top-k overlap after A'),
            ('top1_cosine', '|cos| of top singular vectors after A'),
            ('measured', 'measured forgetting (loss)'),
            ('predicted', 'NTK-predicted forgetting (loss)'),
            ('accuracy_drop', 'accuracy drop on A'))
  fig, axes = plt.subplots(2, 3, figsize=(10, 6.4))
  for ax, (metric, title) in zip(axes.flat, panels):
    means = [s['per_init'][i][metric]['mean'] for i in inits]
    cis = [s['per_init'][i][metric]['ci'] or [m, m]
           for i, m in zip(inits, means)]
    err = np.array([[m - c[0] for m, c in zip(means, cis)],
                    [c[1] - m for m, c in zip(means, cis)]])
    ax.bar(range(len(inits)), means, yerr=err, capsize=3,
           color=[f'C{k}' for k in range(len(inits))])
    ax.set_xticks(range(len(inits)), inits, rotation=45)
    ax.set_title(title, fontsize=9)
  fig.suptitle('Per init: mean over (pair, seed), bootstrap 95% CI',
               fontsize=10)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, FIGURES[0]))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  records = results['records']
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
  markers = {'rotation': 'o', 'permutation': 's', 'mixed': '^'}
  for k, init in enumerate(inits):
    for family, marker in markers.items():
      rs = [r for r in records if r['init'] == init and r['family'] == family]
      for ax, x in zip(axes, ('overlap', 'top1_cosine', 'predicted')):
        ax.scatter([r[x] for r in rs], [r['measured'] for r in rs], s=14,
                   color=f'C{k}', marker=marker, alpha=0.8,
                   label=(init if family == 'rotation' and ax is axes[0]
                          else None))
  for family, marker in markers.items():
    axes[1].scatter([], [], color='gray', marker=marker, label=family)
  all_rho = s['spearman']['all']
  for ax, x, label in zip(
      axes, ('overlap', 'top1_cosine', 'predicted'),
      ('top-k subspace overlap after A', '|cos| top singular vectors',
       'NTK-predicted forgetting')):
    c = all_rho[f'{x}_vs_measured']
    ax.set_xlabel(label)
    ax.set_ylabel('measured forgetting')
    ax.set_title(f'Spearman {_num(c["rho"], 2)}', fontsize=9)
  lo = min(min(r['predicted'], r['measured']) for r in records)
  hi = max(max(r['predicted'], r['measured']) for r in records)
  axes[2].plot([lo, hi], [lo, hi], 'k:', lw=1)
  axes[0].legend(fontsize=7, title='init (colour)', title_fontsize=7)
  axes[1].legend(fontsize=7, title='family (marker)', title_fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, FIGURES[1]))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths
