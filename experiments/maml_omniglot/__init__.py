"""MAML on few-shot Omniglot classification (Finn et al. 2017, section 5.2)."""
