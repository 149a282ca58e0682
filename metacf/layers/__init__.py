"""Layers for per-task weights under ``vmap`` (MAML): fast on CPU and GPU.

``conv_general_dilated`` (im2col + one matmul, a drop-in for flax's
``nn.Conv(conv_general_dilated=...)``), a select-based ``max_pool`` and a
transductive ``batch_norm`` with a closed-form, float32-accurate derivative.
See the module docstring of ``metacf.layers._layers`` for why, and the
benchmarks page for the measurements behind them.
"""

from metacf.layers._layers import batch_norm
from metacf.layers._layers import conv_general_dilated
from metacf.layers._layers import max_pool

__all__ = ['batch_norm', 'conv_general_dilated', 'max_pool']
