"""The run directory's lock: one trainer per run at a time.

A trainer holds an exclusive flock on runs/<run>/.lock, with its pid written in it,
for its whole life: from before it reads a checkpoint until its files are closed.
Another trainer of the same run, from another daemon or another runtime directory,
waits a little (a trainer whose daemon was killed is still writing its last
checkpoint) and then gives up with an error naming the holder. The kernel drops the
lock when the holder dies, SIGKILL included, so a stale lock cannot exist.

Standard library only: the daemon probes the lock before it accepts a job.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from trainerd.producers.errors import DaemonError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
WAIT_S = 15.0
"""How long a trainer waits for the lock: longer than an orphaned trainer takes to
checkpoint and exit (service.ORPHAN_GRACE_S)."""
POLL_S = 0.1


def lock_path(run_dir: Path) -> Path:
    """Where the run's lock lives."""
    return Path(run_dir) / LOCK_NAME


def wait_s() -> float:
    """The lock wait: WAIT_S, or TRAINERD_LOCK_WAIT_S when set (tests)."""
    try:
        return max(0.0, float(os.environ.get("TRAINERD_LOCK_WAIT_S", WAIT_S)))
    except ValueError:
        return WAIT_S


def acquire(run_dir: Path, run: str, *, wait: float | None = None) -> int:
    """Takes the run's lock, waiting up to `wait` seconds; returns its descriptor.

    Raises DaemonError naming the holder's pid when the lock stays held.
    """
    path = lock_path(run_dir)
    wait = wait_s() if wait is None else wait
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _pid_in(fd)
                os.close(fd)
                raise DaemonError(_busy(run, holder, path)) from None
            if not waited:
                waited = True
                log.info(
                    "run lock busy: %s held by pid %s, waiting up to %g s",
                    path,
                    _pid_in(fd),
                    wait,
                )
            time.sleep(POLL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Gives the lock up. The file stays: unlinking it would race a waiter."""
    os.close(fd)


def check_free(run_dir: Path, run: str) -> None:
    """Raises DaemonError when a trainer holds the run's lock now (no waiting)."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DaemonError(_busy(run, _pid_in(fd), path)) from None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


def _busy(run: str, holder: str, path: Path) -> str:
    return (
        f"run {run} is being trained by pid {holder} (lock {path}); stop that job first"
    )
