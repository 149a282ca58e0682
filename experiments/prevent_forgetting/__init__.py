"""Preventing forgetting on Permuted and Rotated MNIST with metacf.protect."""
