"""Default config: every method under the same wall-clock budget on a CPU.

5-way 1- and 5-shot Omniglot (28x28, 1200 training characters, rotations),
Conv-4 with 64 channels; each of the 7 methods x 2 settings trains for
``time_budget_s`` seconds (compilation and curve evaluations not counted),
then is tested on 600 tasks of the test characters (5 queries per class).
Hyperparameters are the papers' (see :func:`configs.paper_methods`) except
the meta-batch sizes, chosen so that every method gets a meaningful number of
updates in the budget, Reptile's test-time steps (5 instead of 50) and
training shots (the setting's instead of 10), iMAML's inner steps (8 instead
of 16), and 5 test queries per class: on 2 CPU cores the 600-task tests
would otherwise take longer than the training (see the README). With ``protocol='auto'`` the same command runs the papers' full
protocols when JAX sees a GPU.
"""

import dataclasses

from experiments.meta_baselines.configs import Config
from experiments.meta_baselines.configs import paper_methods

# Meta-batch sizes on 2 CPU cores (the papers': MAML/FOMAML/ANIL/iMAML 32,
# Reptile 5, ProtoNets 1 episode, MAML++ 16).
CPU_META_BATCH = {'maml': 4, 'fomaml': 4, 'reptile': 5, 'imaml': 4,
                  'protonets': 1, 'anil': 4, 'maml++': 2}
# Inner steps that differ from the paper's on the CPU: the 600-task test of
# Reptile's 50 and iMAML's 16 steps would take longer than their training
# (a 50-task test of MAML's 3 steps on 5-shot measured 11.5 s of CPU).
CPU_EVAL_STEPS = {'reptile': 5, 'imaml': 8}
CPU_INNER_STEPS = {'imaml': 8}
# Reptile's inner steps on the CPU use the setting's shots (Nichol et al.:
# 10 shots per class, seen in inner mini-batches of 10 images, which
# `metacf.maml.reptile_grad` does not do: full-batch steps on 50 images
# measured 3 s of CPU per meta-update).
CPU_TRAIN_SHOTS = {'reptile': None}


def get_config() -> Config:
  methods = tuple(
      dataclasses.replace(
          m, meta_batch_size=CPU_META_BATCH[m.name],
          num_eval_steps=CPU_EVAL_STEPS.get(m.name, m.num_eval_steps),
          train_shots=CPU_TRAIN_SHOTS.get(m.name, m.train_shots),
          num_inner_steps=CPU_INNER_STEPS.get(m.name, m.num_inner_steps))
      for m in paper_methods())
  return Config(methods=methods, time_budget_s=45.0, protocol='auto',
                test_query=5, num_curve_tasks=50, num_curve_points=3,
                eval_batch_size=50)
