"""Writing to a terminal or pipe that may go away.

`trainerctl start --foreground ... | head` closes the daemon's output while the job
trains, and a trainer's output pipe dies with its daemon. Neither may end the job:
the first failed write points stdout and stderr at /dev/null and the process carries
on; the run's trainer.log (and journald, for the service) keeps every line.

Standard library only: the daemon and trainerctl import it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

log = logging.getLogger(__name__)

_detached = False


def detach_output() -> None:
    """Points file descriptors 1 and 2 at /dev/null; later writes go nowhere."""
    global _detached
    if _detached:
        return
    _detached = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            os.dup2(devnull, fd)
        except OSError:
            continue
    os.close(devnull)


def say(text: str, *, file: TextIO | None = None) -> None:
    """Prints one line; a closed terminal or pipe detaches the output instead."""
    stream = sys.stderr if file is None else file
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        detach_output()


class QuietStreamHandler(logging.StreamHandler):
    """A log handler to stderr that detaches the output when it is gone.

    The stock handler reports a failed write with a traceback to the same broken
    stream, once per record.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(sys.stderr if stream is None else stream)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            detach_output()
            return
        super().handleError(record)


def log_to_stderr(level: int) -> None:
    """Plain lines to stderr at `level` that survive a closed stderr."""
    handler = QuietStreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
