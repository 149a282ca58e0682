"""Catastrophic forgetting on Split MNIST: naive, joint, ER, DER++, LwF."""
