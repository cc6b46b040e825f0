"""A run directory: storage, checkpoints, status, progress, tracking, the loss plot."""
