"""The networks, the training step, validation metrics, checkpoints and the voter."""
