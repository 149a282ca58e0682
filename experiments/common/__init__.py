"""Code shared by the experiments, one module per concept.

* ``cli``: the command line of every ``main.py`` (``cli.run``) and the
  ``--config.<field>=<value>`` overrides.
* ``loop``: the resumable training loop (checkpoints, recipe check,
  progress).
* ``models``: the networks (MLP, Conv-4, ViT).
* ``utils``: keys by name, batching, jitter, optimiser updates, orbax
  checkpoints, result files, data loading.
* ``batching``: index batches drawn on the host for jitted loops.
* ``losses``: losses the jitted steps share.
* ``stats``: mean and std over seeds, percentages for tables.
"""
