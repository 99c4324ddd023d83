"""Training: stages, the loop, checkpoints, distributed strategies, feature cache."""
