"""Default config: the protocol of Finn et al. 2017, section 5.2.

Omniglot resized to 28x28, 1200 characters for meta-training and the other
423 for testing, rotations by multiples of 90 degrees as new classes; Conv-4
with 64 channels and BatchNorm on the batch at hand; Adam 1e-3 for 60,000
iterations; for 5-way 1- and 5-shot (one inner step of 0.4, 32 tasks per
meta-batch) and 20-way 1- and 5-shot (five inner steps of 0.1, 16 tasks).
Evaluated on 600 test tasks after 0-10 test-time steps.

On a GPU it runs as is. On a few CPU cores it cannot finish (seconds per
iteration): pass ``--time_budget_s`` (and ``--settings``) to train for a
while, checkpoint, evaluate, and continue in a later session.
"""

from experiments.maml_omniglot.configs import Config


def get_config() -> Config:
  return Config()
