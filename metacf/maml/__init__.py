"""MAML (Finn et al. 2017) and its family, vmapped over tasks in one jit.

Second-order by default; FOMAML (``first_order=True``), Meta-SGD (pytree
``inner_lr``), ANIL (``adapt_mask``), MAML++ (``per_step_inner_lr``,
``step_weights``, ``pass_step``), Reptile (:func:`reptile_grad`), iMAML
(:func:`imaml_grad`), prototypical networks (:func:`prototype_logits`),
rematerialised inner loops
(``remat=True``), optax inner optimizers, and a jitted, optionally sharded
meta-training step. Loss functions may return aux outputs (``has_aux=True``,
e.g. query accuracy) and take per-task keys (``key=``, dropout/augmentation).

Examples:
  Five inner steps of SGD on a batch of four linear-regression tasks:

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import optax
  >>> import metacf
  >>> def loss_fn(params, x, y):                   # linear regression
  ...   return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)
  >>> params = {'w': jnp.zeros((1, 1)), 'b': jnp.zeros(1)}
  >>> kx, kq = jax.random.split(jax.random.key(0))
  >>> support_x = jax.random.normal(kx, (4, 5, 1))   # [tasks, examples, ...]
  >>> query_x = jax.random.normal(kq, (4, 5, 1))
  >>> slopes = jnp.arange(1.0, 5.0)[:, None, None]   # task t: y = (t + 1) x
  >>> tasks = metacf.maml.Task(support_x, slopes * support_x,
  ...                          query_x, slopes * query_x)
  >>> meta_loss = metacf.maml.maml_loss(loss_fn, params, tasks, inner_lr=0.1,
  ...                                   num_inner_steps=5)
  >>> meta_grad = jax.grad(metacf.maml.maml_loss, argnums=1)(
  ...     loss_fn, params, tasks, inner_lr=0.1, num_inner_steps=5)
  >>> jax.tree.map(jnp.shape, meta_grad)
  {'b': (1,), 'w': (1, 1)}
  >>> outer = optax.adam(1e-2)
  >>> step = metacf.maml.make_meta_train_step(loss_fn, outer, inner_lr=0.1,
  ...                                         num_inner_steps=5)
  >>> opt_state = outer.init(params)
  >>> params, opt_state, metrics = step(params, opt_state, tasks)
  >>> bool(jnp.allclose(metrics.loss, meta_loss))  # the loss before the update
  True

flax nnx, linen and equinox models (tested in ``tests/test_interop.py``); leaf
paths for ``adapt_mask`` are ``'/'``-joined (:mod:`metacf.masks`), so
``adapt_mask='^layers/2/'`` adapts this model's last layer only (ANIL):

>>> import jax
>>> import jax.numpy as jnp
>>> import optax
>>> from flax import nnx
>>> import metacf
>>> model = nnx.Sequential(nnx.Linear(1, 16, rngs=nnx.Rngs(0)), nnx.relu,
...                        nnx.Linear(16, 1, rngs=nnx.Rngs(1)))
>>> graphdef, params = nnx.split(model, nnx.Param)    # params: an nnx.State
>>> apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
>>> loss_fn = lambda p, x, y: jnp.mean((apply_fn(p, x) - y) ** 2)
>>> outer = optax.adam(1e-3)
>>> step = metacf.maml.make_meta_train_step(loss_fn, outer, inner_lr=0.01,
...                                         adapt_mask='^layers/2/')  # ANIL
>>> xs = jnp.linspace(-1.0, 1.0, 4 * 10).reshape(4, 10, 1)  # 4 tasks
>>> tasks = metacf.maml.Task(xs[:, :5], jnp.sin(xs[:, :5]),
...                          xs[:, 5:], jnp.sin(xs[:, 5:]))
>>> params, opt_state, metrics = step(params, outer.init(params), tasks)
>>> model = nnx.merge(graphdef, params)               # back to a Module
>>> for path in metacf.masks.leaf_paths(params):
...   print(path)
layers/0/bias/value
layers/0/kernel/value
layers/2/bias/value
layers/2/kernel/value

nnx with BatchNorm: ``graphdef, params, rest = nnx.split(model, nnx.Param,
...)`` and ``apply_fn = lambda p, x: nnx.merge(graphdef, p,
nnx.clone(rest))(x)``. linen: ``apply_fn = lambda p, x: model.apply({'params':
p}, x)``. equinox: ``params, static = eqx.partition(model, eqx.is_array)``
and ``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``.

Model state. ``loss_fn`` is a pure function of ``(params, x, y)``: layers that
keep state must be used in a stateless mode inside it. BatchNorm, in
particular, is used as in the MAML paper ("transductive"): normalise with the
statistics of the batch at hand (the support set in the inner loop, the query
set in the outer loss) and keep no running averages — e.g. flax linen
``nn.BatchNorm(use_running_average=False)`` applied with
``mutable=['batch_stats']`` and the updated statistics discarded, or a
functional batch norm on ``x.mean(0)``/``x.var(0)``. Its scale and offset are
ordinary parameters and are adapted like any other.

Modules: ``_inner`` (:func:`inner_adapt` and the checks it shares), ``_loss``
(:class:`Task`, :func:`maml_loss`), ``_train`` (:func:`make_meta_train_step`,
:class:`MetaTrainMetrics`), ``_reptile``, ``_imaml``, ``_protonet`` and ``_continual``
(:func:`mer_update`, :func:`lamaml_update`).
"""

from metacf.maml._continual import lamaml_update
from metacf.maml._continual import LaMamlUpdate
from metacf.maml._continual import mer_update
from metacf.maml._imaml import imaml_grad
from metacf.maml._inner import inner_adapt
from metacf.maml._loss import maml_loss
from metacf.maml._loss import Task
from metacf.maml._protonet import prototype_logits
from metacf.maml._reptile import reptile_grad
from metacf.maml._train import make_meta_train_step
from metacf.maml._train import MetaTrainMetrics

__all__ = [
    'LaMamlUpdate',
    'MetaTrainMetrics',
    'Task',
    'imaml_grad',
    'inner_adapt',
    'lamaml_update',
    'make_meta_train_step',
    'maml_loss',
    'mer_update',
    'prototype_logits',
    'reptile_grad',
]
