"""The `data` section of a job config: frames, batches, producers and rings."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def default_producers() -> int:
    """Four producers, or one per CPU this process may use where there are fewer.

    More producers than CPUs only take turns on them, and each rewrites a ring of
    its own: on 2 CPUs, 4 producers deliver fewer batches than 2 (bench.pipeline).
    """
    return min(4, len(os.sched_getaffinity(0)))


class DataConfig(BaseModel):
    """How posts become batches and how batches reach the trainer."""

    # strict: YAML's `true` is no count and "32" no number; ints still pass as floats.
    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True
    )

    length: int = Field(1014, ge=8, le=65536)
    """Frame length in characters: the title, a newline, then a window of the body."""
    batch_size: int = Field(128, ge=1, le=65536)
    """Posts per batch."""
    drop_last: bool = False
    """Drop the last short training batch instead of training on it."""
    wire: Literal["onehot", "codes"] = "onehot"
    """Slot format: one-hot uint8, or codes expanded to one-hot on the trainer's device."""
    producers: int = Field(default_factory=default_producers, ge=1, le=64)
    """Producer processes, each with its own ring: 4, or one per CPU where fewer."""
    ring_slots: int = Field(4, ge=2, le=1024)
    """Slots per ring: how many batches a producer may run ahead."""
    shm_dir: str = "/dev/shm"
    """Where ring segments live; must be a tmpfs."""
    wait_timeout_s: float = Field(60.0, gt=0)
    """Longest wait for one batch before the trainer reports its producer as stuck."""
    verify: Literal["codes", "full"] = "codes"
    """Slot checksums: codes (labels, ids and codes, cheap) or full (also the one-hot
    data, a pass over it on both sides: about 3 ms a 9 MB batch each)."""
    max_producer_restarts: int = Field(5, ge=0)
    """Restarts of one producer within 10 minutes before the run fails."""
