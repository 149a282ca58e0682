"""Default config: the full protocol of Finn et al. 2017, section 5.1.

Sinusoid tasks (amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]), an MLP
1-40-40-1 with ReLU, one inner SGD step of size 0.01, meta-batches of 25
tasks, Adam 1e-3, 70,000 iterations, for K = 5, 10 and 20 (K support and K
query points per task), plus the pretrained baseline for each K. Evaluated
on 600 fresh tasks after 0-10 test-time steps of size 0.01. Reptile and
iMAML are trained and evaluated the same way (``methods``).

MAML and the baseline fit the budget of 15 minutes on 2 CPU cores (see the
README for the measured wall times); Reptile adds about 2 minutes per K,
iMAML about 8 (measured on a loaded machine), so the whole default takes
about 40 minutes; ``--config.methods="('maml',)"`` is the original run.
"""

from experiments.maml_sinusoid.configs import Config


def get_config() -> Config:
  return Config()
