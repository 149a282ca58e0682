"""Code shared by the experiments: models and training utilities."""
