"""Training: the loop, evaluation, precision policy, checkpoints."""
