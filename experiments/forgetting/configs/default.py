"""Default config: the DER paper's Seq-MNIST protocol, five seeds.

Every strategy of ``configs.PAPER_STRATEGIES`` on Split MNIST (5 tasks of 2
digits), plus naive fine-tuning and joint training on ten one-digit tasks.
The whole run takes a few minutes on 2 CPU cores.
"""

from experiments.forgetting.configs import Config


def get_config() -> Config:
  return Config()
