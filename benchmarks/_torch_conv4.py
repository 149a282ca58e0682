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

``bench_meta_family``'s iMAML peer, ``make_torchopt_imaml_step``, is
TorchOpt's implicit-gradient recipe (``ImplicitMetaGradientModule``).

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
      inner_opt.step(F.cross_entropy(model(sx[i]), sy[i]))
      loss = F.cross_entropy(model(qx[i]), qy[i]) / num_tasks
      loss.backward()
      total += float(loss.detach())
      torchopt.recover_state_dict(model, net_state)
      torchopt.recover_state_dict(inner_opt, opt_state)
    meta_opt.step()
    return total

  return step


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


def _imaml_inner_class(inner_lr: float, num_inner_steps: int, reg: float,
                       cg_steps: int):
  """TorchOpt's iMAML inner module (its ``examples/iMAML`` recipe).

  ``solve`` runs ``num_inner_steps`` of SGD on the proximally regularised
  support loss from the meta-parameters; the implicit meta-gradient solves
  the optimality system by ``cg_steps`` of plain CG (``solve_cg``, started
  from 0, no early stop), as ``metacf.maml.imaml_grad``. (TorchOpt's example
  uses ``solve_normal_cg``, CG on the normal equations: other iterates.)
  """
  import copy  # pylint: disable=g-import-not-at-top
  import torchopt  # pylint: disable=g-import-not-at-top

  solver = torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0,
                                          atol=0.0)

  class InnerNet(torchopt.nn.ImplicitMetaGradientModule,
                 linear_solve=solver):

    def __init__(self, meta_net: nn.Module):
      super().__init__()
      self.meta_net = meta_net
      self.net = copy.deepcopy(meta_net)
      with torch.no_grad():
        for p, meta_p in zip(self.parameters(), self.meta_parameters()):
          p.data.copy_(meta_p.data)
          p.detach_().requires_grad_()

    def forward(self, x):
      return self.net(x)

    def objective(self, x, y):
      loss = F.cross_entropy(self(x), y)
      sq = sum(torch.sum(torch.square(p - meta_p)) for p, meta_p in
               zip(self.parameters(), self.meta_parameters()))
      return loss + 0.5 * reg * sq

    def solve(self, x, y):
      params = tuple(self.parameters())
      inner_opt = torch.optim.SGD(params, lr=inner_lr)
      with torch.enable_grad():
        for _ in range(num_inner_steps):
          inner_opt.zero_grad()
          self.objective(x, y).backward(inputs=params)
          inner_opt.step()
      return self

  return InnerNet


def _imaml_meta_loss(inner_cls, model, sx, sy, qx, qy) -> torch.Tensor:
  losses = []
  for i in range(sx.shape[0]):
    inner = inner_cls(model)
    inner.solve(sx[i], sy[i])
    losses.append(F.cross_entropy(inner(qx[i]), qy[i]))
  return torch.stack(losses).mean()


def make_torchopt_imaml_step(model: nn.Sequential, *, inner_lr: float,
                             num_inner_steps: int, reg: float, cg_steps: int,
                             outer_lr: float) -> Callable[..., float]:
  """TorchOpt iMAML: ``step(sx, sy, qx, qy) -> mean query loss``."""
  meta_opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
  inner_cls = _imaml_inner_class(inner_lr, num_inner_steps, reg, cg_steps)

  def step(sx, sy, qx, qy):
    meta_opt.zero_grad()
    loss = _imaml_meta_loss(inner_cls, model, sx, sy, qx, qy)
    loss.backward()
    meta_opt.step()
    return float(loss.detach())

  return step


def torchopt_imaml_meta_gradient(model: nn.Sequential, sx, sy, qx, qy, *,
                                 inner_lr: float, num_inner_steps: int,
                                 reg: float, cg_steps: int
                                 ) -> tuple[dict[str, np.ndarray], float]:
  """TorchOpt's iMAML meta-gradient (no outer update) and query loss."""
  model.zero_grad()
  inner_cls = _imaml_inner_class(inner_lr, num_inner_steps, reg, cg_steps)
  loss = _imaml_meta_loss(inner_cls, model, sx, sy, qx, qy)
  loss.backward()
  return ({k: v.grad.numpy().copy() for k, v in model.named_parameters()},
          float(loss.detach()))
