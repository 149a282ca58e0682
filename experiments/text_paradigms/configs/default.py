"""Default config: 3 objectives x 10 variants x K in {8, 32, all} x 3 seeds.

An encoder-decoder (d 128, 2 + 2 layers, 4 heads, MLP 256) pre-trained on
128-character windows for 800 Adam steps of 32 windows (BART and BERT; T5's
cheaper steps scaled to the same FLOPs), then adapted by 60 SGD steps
(momentum 0.9) of 16 speeches per run.
"""

from experiments.text_paradigms.configs import Config


def get_config() -> Config:
  return Config()
