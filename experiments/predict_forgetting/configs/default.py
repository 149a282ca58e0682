"""Default config: 21 task pairs on real MNIST / Fashion-MNIST, and a sweep.

Pairs (A -> B), all with a shared ten-way head:

* rotation: MNIST -> MNIST rotated by 0, 20, ..., 180 degrees (10 pairs);
* permutation: MNIST -> MNIST with 10, 25, 50, 75, 100% of its pixels
  permuted (5 pairs);
* split: digits {0,1} -> {2,3}, {2,3} -> {4,5}, {4,5} -> {6,7},
  {6,7} -> {8,9} (4 pairs, class-incremental: one head for all digits);
* dataset: MNIST -> Fashion-MNIST and back (2 pairs).

150 training examples per task, forgetting measured on 150 held-out test
examples of A, a 784-128-10 ReLU MLP in NTK parameterisation, 1000 steps of
full-batch gradient descent (lr 4) on A and 200 (lr 4) on B. The sweep
varies the width (64, 256, 1024) and B's learning rate (0.25, 1, 4) on three
pairs with 80 examples per task. Fits in 15 minutes on 2 CPU cores (see the
README for the measured wall time).
"""

from experiments.predict_forgetting.configs import Config
from experiments.predict_forgetting.configs import make_pairs


def get_config() -> Config:
  return Config(
      pairs=make_pairs(
          rotations=tuple(range(0, 181, 20)),
          permuted_fractions=(0.1, 0.25, 0.5, 0.75, 1.0),
          splits=(((0, 1), (2, 3)), ((2, 3), (4, 5)), ((4, 5), (6, 7)),
                  ((6, 7), (8, 9))),
          datasets=True),
      regime_pairs=('rotate_180', 'permute_100pct', 'mnist_to_fashion'),
      regime_widths=(64, 256, 1024),
      regime_lrs=(0.25, 1.0, 4.0),
  )
