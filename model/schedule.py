"""The learning rate as a pure function of where training stands.

Computing the rate from (epoch, global step) instead of keeping a scheduler object
makes resume exact by construction: the checkpoint cursor alone fixes the rate.
"""

from __future__ import annotations

import math

from trainerd.model.config import TrainConfig


def learning_rate(
    train: TrainConfig, *, epoch: int, step: int, total_steps: int
) -> float:
    """The rate for the step about to run.

    Args:
        train: the train section (lr, schedule, halve_every_epochs, warmup_steps).
        epoch: the current epoch, counted from 1.
        step: optimizer steps already taken in the run (0 for the first).
        total_steps: the run's planned steps (epochs times batches per epoch).
    """
    if train.schedule == "constant":
        return train.lr
    if train.schedule == "step":
        # The paper halves the rate every 3 epochs.
        return train.lr * 0.5 ** ((epoch - 1) // train.halve_every_epochs)
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(total_steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
