"""The PyTorch peer of ``bench_maml``: second-order MAML with ``torch.func``.

What a PyTorch user writes today without a meta-learning library (the
pattern of torchopt's ``examples/FuncTorch/maml_omniglot_vmap.py`` and of
PyTorch's functorch MAML tutorial): the model's parameters as a dict,
``torch.func.functional_call`` for the forward pass, ``torch.func.grad``
for the inner SGD steps (unrolled in Python), ``torch.func.vmap`` over the
tasks, and ``torch.func.grad_and_value`` of the mean query loss for the
exact second-order meta-gradient, applied with ``torch.optim.Adam``.

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


def make_meta_loss(model: nn.Sequential, *, inner_lr: float,
                   num_inner_steps: int) -> Callable[..., torch.Tensor]:
  """``meta_loss(params, sx, sy, qx, qy)``: mean query MSE after adaptation.

  Task tensors are ``[num_tasks, num_points, 1]``; ``grad`` of it is the
  exact second-order meta-gradient.
  """

  def loss_fn(p, x, y):
    return F.mse_loss(functional_call(model, p, (x,)), y)

  def task_loss(p, sx, sy, qx, qy):
    for _ in range(num_inner_steps):
      g = grad(loss_fn)(p, sx, sy)
      p = {k: p[k] - inner_lr * g[k] for k in p}
    return loss_fn(p, qx, qy)

  def meta_loss(p, sx, sy, qx, qy):
    return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx,
                                                         qy).mean()

  return meta_loss


def make_meta_train_step(model: nn.Sequential, params: dict[str, torch.Tensor],
                         *, inner_lr: float, num_inner_steps: int,
                         outer_lr: float) -> Callable[..., torch.Tensor]:
  """Returns ``step(sx, sy, qx, qy) -> loss``; updates ``params`` in place.

  ``params`` become leaf tensors owned by a ``torch.optim.Adam``.
  """
  for p in params.values():
    p.requires_grad_(True)
  optimizer = torch.optim.Adam(list(params.values()), lr=outer_lr)
  meta_grad = grad_and_value(make_meta_loss(
      model, inner_lr=inner_lr, num_inner_steps=num_inner_steps))

  def step(sx, sy, qx, qy):
    grads, loss = meta_grad(params, sx, sy, qx, qy)
    for name, p in params.items():
      p.grad = grads[name]
    optimizer.step()
    return loss.detach()

  return step
