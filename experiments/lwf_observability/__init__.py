"""Observability of task A by task B, and what LwF retains of A."""
