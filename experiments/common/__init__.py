"""Code shared by the experiments: models, training utilities, the resumable loop."""
