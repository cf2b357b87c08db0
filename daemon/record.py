"""The record of the daemon's job, kept so that a restarted daemon resumes it.

`<state>/job.json` names the accepted job: its run, the resolved job file the daemon
wrote (runs/<run>/job.yaml), the resume policy it was submitted with, when it was
accepted and its newest trainer's pid. The supervisor writes it when it accepts a
job and removes it when the job ends for good: finished, failed, or stopped by
`trainerctl stop`. A daemon that dies, or stops on SIGTERM, keeps it: the user did
not stop the job, so the next daemon starts it again from its last checkpoint.

Standard library only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainerd.producers.durable import atomic_file, fsync_path

RECORD_NAME = "job.json"
FORMAT = "trainerd-job"


class RecordError(ValueError):
    """A record that cannot be read back; the daemon sets it aside."""


@dataclass(frozen=True)
class JobRecord:
    """What a restarted daemon needs to start the job again."""

    run: str
    job_file: str
    """The resolved config the trainer reads (absolute path)."""
    resume: str
    """The policy the job was submitted with: auto, none or a checkpoint path."""
    accepted: float
    """When the daemon accepted the job (seconds since the epoch)."""
    trainer_pid: int | None = None
    """The newest trainer's pid: a trainer orphaned by a killed daemon may still be
    writing its checkpoint when the next daemon starts."""


def record_path(state_dir: Path) -> Path:
    """Where the record lives."""
    return Path(state_dir) / RECORD_NAME


def write_record(state_dir: Path, record: JobRecord) -> None:
    """Writes the record atomically: temporary file, fsync, rename, fsync the dir."""
    data = json.dumps({"format": FORMAT, **asdict(record)}, indent=1) + "\n"
    with atomic_file(record_path(state_dir), "w") as f:
        f.write(data)


def read_record(state_dir: Path) -> JobRecord | None:
    """The record, or None when there is none; RecordError when it is broken."""
    path = record_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"job record {path}: unreadable ({err})") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise RecordError(f"job record {path}: not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RecordError(f"job record {path}: not a trainerd job record")
    fields = {
        "run": str,
        "job_file": str,
        "resume": str,
        "accepted": (int, float),
        "trainer_pid": (int, type(None)),
    }
    for name, kind in fields.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RecordError(f"job record {path}: {name}: bad value {value!r}")
    return JobRecord(**{name: data[name] for name in fields})


def remove_record(state_dir: Path) -> None:
    """Removes the record; a missing one is fine."""
    path = record_path(state_dir)
    path.unlink(missing_ok=True)
    fsync_path(path.parent)


def set_aside(state_dir: Path) -> Path:
    """Renames a broken record out of the way, keeping it to look at; returns it."""
    path = record_path(state_dir)
    aside = path.with_name(f"{RECORD_NAME}.broken-{int(time.time())}")
    path.replace(aside)
    return aside
