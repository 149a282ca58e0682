"""Default config: MNIST (A) then seven tasks B, LwF vs fine-tuning, 5 seeds.

A 784-256-256 ReLU body with a ten-way head per task, trained on 20k MNIST
images (8 epochs of Adam); for each B (4,000 training images): 100 warm-up
steps of B's head, then 2,000 SGD steps (lr 0.02, momentum 0.9, batch 64)
with and without LwF. Observability from top-30 Jacobian SVDs (``'gram'``)
on 200 images of each task. The B steps and learning rate were raised once
from 500 and 0.01 (in a first full run fine-tuning retained at least 94.5%
of A's accuracy, too little forgetting to tell protection from none);
nothing else was tuned. Fits 15 minutes on 2 CPU cores (see the README for
the measured wall time)."""

from experiments.lwf_observability.configs import Config


def get_config() -> Config:
  return Config()
