"""PyTorch peers of ``bench_maml`` workload B: Conv-4 + BatchNorm MAML.

Two implementations a PyTorch user would pick, both exact second-order MAML
with one inner SGD step and ``torch.optim.Adam`` as the outer optimizer:

* ``torchopt``: TorchOpt's own MAML recipe (its
  ``examples/MAML-omniglot/maml-omniglot.py``): an ``nn.Module``,
  ``torchopt.MetaSGD`` inner steps, a Python loop over tasks with one
  ``backward`` per task (gradients accumulate), state restored with
  ``extract_state_dict``/``recover_state_dict``.
* ``torch_func``: ``torch.func``: ``functional_call`` + ``grad`` inner step +
  ``vmap`` over tasks + ``grad_and_value`` of the mean query loss.

``bench_meta_family``'s iMAML peer is in ``_torch_imaml`` (any model and
loss).

BatchNorm is transductive (batch statistics, no running averages), as in the
MAML paper and in ``bench_maml``'s JAX model. Tensors are NCHW (PyTorch's
default layout). Imported only when torch is installed.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
import torch.nn.functional as F


class _BatchNorm(nn.Module):
  """Batch statistics only, scale and offset learned (MAML's BatchNorm)."""

  def __init__(self, channels: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):
    return F.batch_norm(x, None, None, self.weight, self.bias, training=True,
                        eps=1e-5)


def make_conv4(ways: int, channels: int = 64) -> nn.Sequential:
  layers: list[nn.Module] = []
  cin = 1
  for _ in range(4):
    layers += [nn.Conv2d(cin, channels, 3, padding=1), _BatchNorm(channels),
               nn.ReLU(), nn.MaxPool2d(2)]
    cin = channels
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, ways))


def load_jax_params(model: nn.Sequential, params: dict) -> None:
  """Copies ``bench_maml``'s JAX Conv-4 params (HWIO kernels) into ``model``."""
  convs = [m for m in model if isinstance(m, nn.Conv2d)]
  norms = [m for m in model if isinstance(m, _BatchNorm)]
  with torch.no_grad():
    for i, (conv, norm) in enumerate(zip(convs, norms)):
      conv.weight.copy_(torch.tensor(
          np.asarray(params[f'conv{i}']['kernel']).transpose(3, 2, 0, 1).copy()))
      conv.bias.copy_(torch.tensor(np.asarray(params[f'conv{i}']['bias'])))
      norm.weight.copy_(torch.tensor(np.asarray(params[f'bn{i}']['scale'])))
      norm.bias.copy_(torch.tensor(np.asarray(params[f'bn{i}']['bias'])))
    model[-1].weight.copy_(torch.tensor(
        np.asarray(params['head']['kernel']).T.copy()))
    model[-1].bias.copy_(torch.tensor(np.asarray(params['head']['bias'])))


def to_nchw(x: np.ndarray) -> torch.Tensor:
  """``[..., H, W, C]`` JAX images as contiguous ``[..., C, H, W]``."""
  x = np.asarray(x)
  return torch.tensor(np.moveaxis(x, -1, -3).copy())


def make_torchopt_step(model: nn.Sequential, *, inner_lr: float,
                       outer_lr: float) -> Callable[..., torch.Tensor]:
  """TorchOpt MAML: ``step(sx, sy, qx, qy) -> mean query loss``."""
  from benchmarks import _torch_maml  # pylint: disable=g-import-not-at-top
  return _torch_maml.make_torchopt_step(
      model, inner_lr=inner_lr, num_inner_steps=1, outer_lr=outer_lr,
      loss=F.cross_entropy)


def make_func_meta_loss(model: nn.Sequential, *, inner_lr: float
                        ) -> Callable[..., torch.Tensor]:
  """``meta_loss(params, sx, sy, qx, qy)``: torch.func, vmapped over tasks."""

  def loss_fn(p, x, y):
    return F.cross_entropy(functional_call(model, p, (x,)), y)

  def task_loss(p, sx, sy, qx, qy):
    g = grad(loss_fn)(p, sx, sy)
    p = {k: p[k] - inner_lr * g[k] for k in p}
    return loss_fn(p, qx, qy)

  def meta_loss(p, sx, sy, qx, qy):
    return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx,
                                                         qy).mean()

  return meta_loss


def make_func_step(model: nn.Sequential, *, inner_lr: float,
                   outer_lr: float) -> Callable[..., torch.Tensor]:
  """torch.func MAML: ``step(sx, sy, qx, qy) -> mean query loss``."""
  params = dict(model.named_parameters())
  optimizer = torch.optim.Adam(list(params.values()), lr=outer_lr)
  meta_grad = grad_and_value(make_func_meta_loss(model, inner_lr=inner_lr))

  def step(sx, sy, qx, qy):
    grads, loss = meta_grad({k: v.detach() for k, v in params.items()}, sx,
                            sy, qx, qy)
    for name, p in params.items():
      p.grad = grads[name]
    optimizer.step()
    return float(loss)

  return step


def func_meta_gradient(model: nn.Sequential, inner_lr: float, sx, sy, qx,
                       qy) -> dict[str, np.ndarray]:
  """The torch.func (vmap) meta-gradient at the model's parameters."""
  params = {k: v.detach() for k, v in model.named_parameters()}
  g = grad(make_func_meta_loss(model, inner_lr=inner_lr))(params, sx, sy, qx,
                                                          qy)
  return {k: v.numpy() for k, v in g.items()}


def torchopt_meta_gradient(model: nn.Sequential, inner_lr: float, sx, sy, qx,
                           qy) -> dict[str, np.ndarray]:
  """The TorchOpt recipe's accumulated meta-gradient (no outer update)."""
  import torchopt  # pylint: disable=g-import-not-at-top

  model.zero_grad()
  inner_opt = torchopt.MetaSGD(model, lr=inner_lr)
  for i in range(sx.shape[0]):
    net_state = torchopt.extract_state_dict(model)
    opt_state = torchopt.extract_state_dict(inner_opt)
    inner_opt.step(F.cross_entropy(model(sx[i]), sy[i]))
    (F.cross_entropy(model(qx[i]), qy[i]) / sx.shape[0]).backward()
    torchopt.recover_state_dict(model, net_state)
    torchopt.recover_state_dict(inner_opt, opt_state)
  return {k: v.grad.numpy().copy() for k, v in model.named_parameters()}
