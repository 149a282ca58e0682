"""Default config: the DER paper's Seq-MNIST protocol, five seeds.

Every strategy of ``configs.PAPER_STRATEGIES`` (ER-ACE and iCaRL included) on
Split MNIST (5 tasks of 2 digits), plus naive fine-tuning and joint training
on ten one-digit tasks. The whole run takes under 6 minutes on 2 CPU cores
(see README.md).
"""

from experiments.forgetting.configs import Config


def get_config() -> Config:
  return Config()
