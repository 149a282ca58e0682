"""Default config. Part (a): 11 held-out MNIST pairs, 5 inits, 3 seeds.
Part (b): ``configs.OnlineConfig``'s defaults (La-MAML's protocol, 5 seeds).

Meta-training tasks: MNIST rotated by 0, 20, ..., 340 degrees and 18 random
pixel permutations (ids 0-17), 500 images each from the first 50k training
images. Held-out pairs (A -> B), angles that are odd multiples of 10
degrees and permutation ids >= 100, images from the last 10k training images
(fine-tuning) and the test split (A's forgetting):

* rotation: 170 -> 170 (same task, other images), 10 -> 30, 50 -> 110,
  130 -> 230, 210 -> 350, 270 -> 90 (angle differences 0 to 180 degrees);
* permutation: 100 -> 101, 102 -> 103, 104 -> 105;
* mixed: rotation 330 -> permutation 106, permutation 107 -> rotation 190.

784-100-100-10 ReLU MLP; every meta-learner and the joint pre-training run
400 Adam steps (lr 1e-3) on batches of 8 tasks x 40 images (MAML / iMAML:
20 support + 20 query, 5 inner SGD steps at lr 0.1; iMAML: lambda 10).
See the README for the measured wall time.
"""

from experiments.meta_continual.configs import Config
from experiments.meta_continual.configs import make_pairs
from experiments.meta_continual.configs import OrthogonalityConfig
from experiments.meta_continual.configs import TaskSpec


def get_config() -> Config:
  return Config(orthogonality=OrthogonalityConfig(
      pairs=make_pairs(
          rotations=((170, 170), (10, 30), (50, 110), (130, 230),
                     (210, 350), (270, 90)),
          permutations=((100, 101), (102, 103), (104, 105)),
          mixed=((TaskSpec(rotation=330), TaskSpec(permutation=106)),
                 (TaskSpec(permutation=107), TaskSpec(rotation=190)))),
  ))
