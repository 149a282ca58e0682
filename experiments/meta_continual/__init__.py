"""Meta-learning and continual learning: orthogonal task subspaces (part a), online continual learning (part b)."""
