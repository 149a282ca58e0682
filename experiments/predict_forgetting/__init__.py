"""Forgetting predicted by the empirical NTK against forgetting measured."""
