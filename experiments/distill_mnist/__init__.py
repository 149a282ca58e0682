"""Knowledge distillation on MNIST (Hinton, Vinyals & Dean 2015, section 3)."""
