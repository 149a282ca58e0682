"""The PyTorch peer of ``bench_maml``: second-order MAML with ``torch.func``.

What a PyTorch user writes today without a meta-learning library (the
pattern of torchopt's ``examples/FuncTorch/maml_omniglot_vmap.py`` and of
PyTorch's functorch MAML tutorial): the model's parameters as a dict,
``torch.func.functional_call`` for the forward pass, ``torch.func.grad``
for the inner SGD steps (unrolled in Python), ``torch.func.vmap`` over the
tasks, and ``torch.func.grad_and_value`` of the mean query loss for the
exact second-order meta-gradient, applied with ``torch.optim.Adam``.

For ``bench_maml --workloads family``: the same with a sequential support
set (step ``s`` adapts on support slice ``s``), TorchOpt's MAML recipe
(``torchopt.MetaSGD`` inner steps, a loop over tasks) for it, and Reptile in
``torch.func`` (``vmap`` over tasks of the unrolled SGD loop). TorchOpt's
iMAML is in ``_torch_imaml``.

Imported only when torch is installed.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
import torch.nn.functional as F


def make_mlp(widths: tuple[int, ...]) -> nn.Sequential:
  sizes = (1, *widths, 1)
  layers: list[nn.Module] = []
  for m, n in zip(sizes[:-1], sizes[1:]):
    layers += [nn.Linear(m, n), nn.ReLU()]
  return nn.Sequential(*layers[:-1])


def params_from_jax(model: nn.Sequential,
                    jax_params: list[dict[str, np.ndarray]]
                    ) -> dict[str, torch.Tensor]:
  """The JAX MLP's ``[{'w': [m, n], 'b': [n]}, ...]`` as the torch dict."""
  linears = [name for name, m in model.named_children()
             if isinstance(m, nn.Linear)]
  out = {}
  for name, layer in zip(linears, jax_params):
    out[f'{name}.weight'] = torch.tensor(np.asarray(layer['w']).T.copy())
    out[f'{name}.bias'] = torch.tensor(np.asarray(layer['b']).copy())
  return out


def _support(sx, sy, step, sequential):
  return (sx[step], sy[step]) if sequential else (sx, sy)


def make_meta_loss(model: nn.Sequential, *, inner_lr: float,
                   num_inner_steps: int, sequential_support: bool = False
                   ) -> Callable[..., torch.Tensor]:
  """``meta_loss(params, sx, sy, qx, qy)``: mean query MSE after adaptation.

  Task tensors are ``[num_tasks, num_points, 1]`` (support ones
  ``[num_tasks, num_inner_steps, num_points, 1]`` with
  ``sequential_support``); ``grad`` of it is the exact second-order
  meta-gradient.
  """

  def loss_fn(p, x, y):
    return F.mse_loss(functional_call(model, p, (x,)), y)

  def task_loss(p, sx, sy, qx, qy):
    for s in range(num_inner_steps):
      g = grad(loss_fn)(p, *_support(sx, sy, s, sequential_support))
      p = {k: p[k] - inner_lr * g[k] for k in p}
    return loss_fn(p, qx, qy)

  def meta_loss(p, sx, sy, qx, qy):
    return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx,
                                                         qy).mean()

  return meta_loss


def make_meta_train_step(model: nn.Sequential, params: dict[str, torch.Tensor],
                         *, inner_lr: float, num_inner_steps: int,
                         outer_lr: float, sequential_support: bool = False
                         ) -> Callable[..., torch.Tensor]:
  """Returns ``step(sx, sy, qx, qy) -> loss``; updates ``params`` in place.

  ``params`` become leaf tensors owned by a ``torch.optim.Adam``.
  """
  for p in params.values():
    p.requires_grad_(True)
  optimizer = torch.optim.Adam(list(params.values()), lr=outer_lr)
  meta_grad = grad_and_value(make_meta_loss(
      model, inner_lr=inner_lr, num_inner_steps=num_inner_steps,
      sequential_support=sequential_support))

  def step(sx, sy, qx, qy):
    grads, loss = meta_grad(params, sx, sy, qx, qy)
    for name, p in params.items():
      p.grad = grads[name]
    optimizer.step()
    return loss.detach()

  return step


def make_torchopt_step(model: nn.Module, *, inner_lr: float,
                       num_inner_steps: int, outer_lr: float,
                       sequential_support: bool = False,
                       loss: Callable[..., torch.Tensor] = F.mse_loss
                       ) -> Callable[..., float]:
  """TorchOpt's MAML recipe: ``step(sx, sy, qx, qy) -> mean query loss``.

  As its ``examples/MAML-omniglot/maml-omniglot.py``: ``torchopt.MetaSGD``
  inner steps (differentiable, second order), a Python loop over tasks with
  one ``backward`` each (gradients accumulate), state restored with
  ``extract_state_dict``/``recover_state_dict``; ``torch.optim.Adam``
  outside. Updates ``model``'s parameters in place. Any model and
  ``loss(outputs, targets)`` (``_torch_conv4``'s peer is this with
  cross-entropy and one inner step).
  """
  import torchopt  # pylint: disable=g-import-not-at-top

  meta_opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
  inner_opt = torchopt.MetaSGD(model, lr=inner_lr)

  def step(sx, sy, qx, qy):
    num_tasks = sx.shape[0]
    meta_opt.zero_grad()
    total = 0.0
    for i in range(num_tasks):
      net_state = torchopt.extract_state_dict(model)
      opt_state = torchopt.extract_state_dict(inner_opt)
      for s in range(num_inner_steps):
        x, y = _support(sx[i], sy[i], s, sequential_support)
        inner_opt.step(loss(model(x), y))
      query_loss = loss(model(qx[i]), qy[i]) / num_tasks
      query_loss.backward()
      total += float(query_loss.detach())
      torchopt.recover_state_dict(model, net_state)
      torchopt.recover_state_dict(inner_opt, opt_state)
    meta_opt.step()
    return total

  return step


def make_reptile_step(model: nn.Sequential, params: dict[str, torch.Tensor],
                      *, inner_lr: float, num_inner_steps: int,
                      outer_lr: float) -> Callable[..., float]:
  """Reptile in ``torch.func``: ``step(sx, sy, qx, qy) -> 0.0``.

  The meta-gradient is ``params`` minus the adapted parameters, averaged
  over tasks (``vmap`` of ``num_inner_steps`` unrolled SGD steps on the
  support set; nothing is differentiated through), applied by
  ``torch.optim.Adam``; as ``metacf.maml.reptile_grad``. The query set is
  not read. Updates ``params`` in place.
  """
  for p in params.values():
    p.requires_grad_(True)
  optimizer = torch.optim.Adam(list(params.values()), lr=outer_lr)

  def loss_fn(p, x, y):
    return F.mse_loss(functional_call(model, p, (x,)), y)

  def adapt(p, sx, sy):
    for _ in range(num_inner_steps):
      g = grad(loss_fn)(p, sx, sy)
      p = {k: p[k] - inner_lr * g[k] for k in p}
    return p

  def step(sx, sy, qx, qy):
    del qx, qy
    theta = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
      adapted = vmap(adapt, in_dims=(None, 0, 0))(theta, sx, sy)
    for name, p in params.items():
      p.grad = (theta[name] - adapted[name]).mean(0)
    optimizer.step()
    return 0.0

  return step
