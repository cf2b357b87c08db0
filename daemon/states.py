"""The states of a job under trainerd, and which moves between them are allowed.

Standard library only, so trainerctl and tests can read it without the daemon.

    idle ─▶ starting ─▶ training ⇄ validating ⇄ checkpointing ─▶ finished
               ▲            │
               ├────────────┤ the trainer died: restart from its last checkpoint
               │            ├─▶ stopping ─▶ idle (stopped; resumable)
               │            └─▶ failed (restarts used up, or a final error)
               └── idle, finished or failed: the next job
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """Where the daemon's one job stands; the value is what status shows."""

    IDLE = "idle"
    STARTING = "starting"
    TRAINING = "training"
    VALIDATING = "validating"
    CHECKPOINTING = "checkpointing"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def running(self) -> bool:
        """A trainer process exists (or is being started) for this state."""
        return self in RUNNING


RUNNING = frozenset(
    {
        JobState.STARTING,
        JobState.TRAINING,
        JobState.VALIDATING,
        JobState.CHECKPOINTING,
        JobState.STOPPING,
    }
)
_WORKING = {JobState.TRAINING, JobState.VALIDATING, JobState.CHECKPOINTING}
_ENDS = {JobState.FINISHED, JobState.FAILED}

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.IDLE: frozenset({JobState.STARTING}),
    JobState.STARTING: frozenset(_WORKING | _ENDS | {JobState.STOPPING}),
    # Working states move freely among themselves; a dead trainer sends the job
    # back to starting.
    JobState.TRAINING: frozenset(
        _WORKING | _ENDS | {JobState.STARTING, JobState.STOPPING}
    ),
    JobState.VALIDATING: frozenset(
        _WORKING | _ENDS | {JobState.STARTING, JobState.STOPPING}
    ),
    JobState.CHECKPOINTING: frozenset(
        _WORKING | _ENDS | {JobState.STARTING, JobState.STOPPING}
    ),
    # A stop that ran to its checkpoint leaves the job resumable: idle.
    JobState.STOPPING: frozenset({JobState.IDLE, *_ENDS}),
    JobState.FINISHED: frozenset({JobState.STARTING}),
    JobState.FAILED: frozenset({JobState.STARTING}),
}


def can_move(old: JobState, new: JobState) -> bool:
    """Whether the supervisor may move a job from `old` to `new`."""
    return new == old or new in ALLOWED[old]
