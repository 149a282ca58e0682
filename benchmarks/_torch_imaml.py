"""TorchOpt's implicit-gradient iMAML, the PyTorch peer of ``imaml_grad``.

TorchOpt's ``examples/iMAML`` recipe (``ImplicitMetaGradientModule``) for any
``nn.Module`` and loss: ``bench_meta_family`` runs it on the Conv-4 of
``_torch_conv4`` with cross-entropy, ``bench_maml --workloads family`` on the
sinusoid MLP of ``_torch_maml`` with MSE. Imported only when torch and
torchopt are installed.
"""

from collections.abc import Callable
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# TorchOpt 0.7.3 calls functorch.grad/vjp, deprecated in torch 2: one
# FutureWarning per call otherwise.
warnings.filterwarnings('ignore', category=FutureWarning, module='torchopt')

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _imaml_inner_class(loss: Loss, inner_lr: float, num_inner_steps: int,
                       reg: float, cg_steps: int):
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
      sq = sum(torch.sum(torch.square(p - meta_p)) for p, meta_p in
               zip(self.parameters(), self.meta_parameters()))
      return loss(self(x), y) + 0.5 * reg * sq

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


def _imaml_meta_loss(loss, inner_cls, model, sx, sy, qx, qy) -> torch.Tensor:
  losses = []
  for i in range(sx.shape[0]):
    inner = inner_cls(model)
    inner.solve(sx[i], sy[i])
    losses.append(loss(inner(qx[i]), qy[i]))
  return torch.stack(losses).mean()


def make_torchopt_imaml_step(model: nn.Sequential, *, inner_lr: float,
                             num_inner_steps: int, reg: float, cg_steps: int,
                             outer_lr: float, loss: Loss = F.cross_entropy
                             ) -> Callable[..., float]:
  """TorchOpt iMAML: ``step(sx, sy, qx, qy) -> mean query loss``."""
  meta_opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
  inner_cls = _imaml_inner_class(loss, inner_lr, num_inner_steps, reg,
                                 cg_steps)

  def step(sx, sy, qx, qy):
    meta_opt.zero_grad()
    meta_loss = _imaml_meta_loss(loss, inner_cls, model, sx, sy, qx, qy)
    meta_loss.backward()
    meta_opt.step()
    return float(meta_loss.detach())

  return step


def torchopt_imaml_meta_gradient(model: nn.Sequential, sx, sy, qx, qy, *,
                                 inner_lr: float, num_inner_steps: int,
                                 reg: float, cg_steps: int,
                                 loss: Loss = F.cross_entropy
                                 ) -> tuple[dict[str, np.ndarray], float]:
  """TorchOpt's iMAML meta-gradient (no outer update) and query loss."""
  model.zero_grad()
  inner_cls = _imaml_inner_class(loss, inner_lr, num_inner_steps, reg,
                                 cg_steps)
  meta_loss = _imaml_meta_loss(loss, inner_cls, model, sx, sy, qx, qy)
  meta_loss.backward()
  return ({k: v.grad.numpy().copy() for k, v in model.named_parameters()},
          float(meta_loss.detach()))
