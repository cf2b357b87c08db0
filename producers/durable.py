"""Durable files: a file is replaced whole or not at all, and the change reaches disk.

Checkpoints, the daemon's job record, corpus stores and resolved configs all write
the same way: a temporary file in the same directory, fsync, rename, fsync of the
directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file or a directory (a rename or unlink in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yields a file to write; on success it replaces `path` durably, on error
    the temporary is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
