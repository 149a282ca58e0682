"""The meta-learning family on Omniglot at equal compute."""
