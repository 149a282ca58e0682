"""MAML on few-shot sinusoid regression (Finn et al. 2017, section 5.1)."""
