"""Continual-learning metrics: ACC, BWT, FWT and forgetting from an accuracy matrix."""

from metacf.metrics._metrics import average_accuracy
from metacf.metrics._metrics import backward_transfer
from metacf.metrics._metrics import forgetting
from metacf.metrics._metrics import forward_transfer

__all__ = [
    'average_accuracy',
    'backward_transfer',
    'forgetting',
    'forward_transfer',
]
