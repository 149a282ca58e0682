"""Default config: 10-task Permuted and Rotated MNIST, 9 strategies, 3 seeds.

GPM's PMNIST protocol (784-100-100-10, no biases, SGD lr 0.01, batch 10, 5
epochs per task) on 1,000 training examples per task (the paper: 54,000),
tested on the first 5,000 test images of each task. Rotated MNIST rotates
task ``t`` by ``10 t`` degrees. Predicted vs measured forgetting under
protection on three pairs. Sized for 30 minutes on 2 CPU cores (see the
README for the measured wall time).
"""

from experiments.prevent_forgetting.configs import Config
from experiments.prevent_forgetting.configs import make_pairs


def get_config() -> Config:
  return Config(pairs=make_pairs((('permuted', 0, 1), ('rotated', 0, 9),
                                  ('rotated', 0, 3))))
