"""Smoke config: every objective and every kind of variant, tiny, for the
tests (one variant per kind: the ranks and prompt lengths of the default
share their code)."""

from experiments.text_paradigms.configs import Config
from experiments.text_paradigms.configs import default_variants


def get_config() -> Config:
  return Config(seeds=(0,), shots=(2, None), b_test_per_speaker=3,
                b_length=24, seq_length=32, d_model=16, num_heads=2,
                mlp_dim=32, num_layers=1, pretrain_steps=4,
                pretrain_batch_size=4, checkpoint_every=2, steps=3,
                batch_size=4, replay_capacity=8, replay_batch=2,
                context_length=48, query_chars=12, demo_chars=8,
                num_valid=4, num_ntk_a=1, ntk_b_per_speaker=1,
                eval_batch_size=16, progress_bar=False,
                variants=tuple(v for v in default_variants()
                               if v.name not in ('lora_r8', 'prompt_p20',
                                                 'zero_shot')))
