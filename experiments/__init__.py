"""Experiments reproducing papers with metacf (not part of the library)."""
