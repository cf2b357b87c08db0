"""Where trainerd keeps its state and its sockets.

systemd hands the service STATE_DIRECTORY and RUNTIME_DIRECTORY; a user's trainerd
falls back to the XDG directories. TRAINERD_STATE_DIR and TRAINERD_RUNTIME_DIR
override both (tests use them).
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """corpora/ and runs/ live here."""
    for var in ("TRAINERD_STATE_DIR", "STATE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "trainerd"


def runtime_dir() -> Path:
    """The control and metrics sockets live here (mode 0700)."""
    for var in ("TRAINERD_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "trainerd"
    return Path(f"/tmp/trainerd-{os.getuid()}")


def ensure_runtime_dir() -> Path:
    """Creates the runtime directory with mode 0700 and returns it."""
    path = runtime_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def run_dir(run_id: str) -> Path:
    """runs/<run-id>/ under the state directory."""
    return state_dir() / "runs" / run_id
