"""Supervision of the daemon's one job: its trainer process and what it reports.

The trainer runs as `trainerd trainer ...` in a session of its own, so that a
terminal's Ctrl-C reaches only the daemon and the daemon can kill the trainer's whole
process group (its producers included). The trainer spawns and restarts its own
producers; the supervisor follows the trainer's `state` and `status` messages on the
metrics socket, and restarts a dead trainer from its last good checkpoint, at most
`checkpoint.max_restarts` times within `checkpoint.restart_window_min`.

The accepted job is recorded in the state directory (daemon/record.py) until it ends
for good, so that a daemon that died or was stopped by SIGTERM resumes it when it
starts again (`resume_recorded()`).

The daemon's main loop drives everything: it polls `sockets()` and `fds()`, calls
`on_metrics()` and `on_output()` when they are readable, and `tick()` every turn.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import zmq

from trainerd.daemon import output, record, runlock
from trainerd.daemon.config import JobConfig, parse_config
from trainerd.daemon.states import JobState, can_move
from trainerd.producers.durable import atomic_file
from trainerd.producers.errors import (
    CheckpointError,
    ConfigError,
    DaemonError,
    ShmSpaceError,
    TrainerdError,
    TrainingFailed,
)

log = logging.getLogger(__name__)

# Trainer exit codes that a restart cannot cure: a bad config or corpus, no room in
# /dev/shm, another trainer holding the run, a checkpoint that does not match,
# training that diverged.
FINAL_EXIT_CODES = frozenset(
    {
        ConfigError.exit_code,
        ShmSpaceError.exit_code,
        DaemonError.exit_code,
        CheckpointError.exit_code,
        TrainingFailed.exit_code,
    }
)
STOP_GRACE_S = 240.0
"""A graceful stop longer than this (a step plus a checkpoint) is cut short."""
GROUP_EXIT_S = 5.0
"""How long a killed trainer's process group may take to vanish."""
SILENCE_S = 300.0
"""A running trainer that publishes nothing for this long is taken for hung."""
ORPHAN_WAIT_S = 15.0
"""How long a resumed job waits for the trainer a killed daemon left behind: it
checkpoints and exits within 10 s of losing its daemon (service.ORPHAN_GRACE_S)."""
TRAINER_STATES = {
    "starting": JobState.STARTING,
    "training": JobState.TRAINING,
    "validating": JobState.VALIDATING,
    "checkpointing": JobState.CHECKPOINTING,
    "stopping": JobState.STOPPING,
}


@dataclass
class Job:
    """One job: its config, its run directory and what is known of its trainer."""

    run: str
    config: JobConfig
    run_dir: Path
    config_file: Path
    resume: str
    state: JobState = JobState.IDLE
    started: float = field(default_factory=time.time)
    trainer: subprocess.Popen | None = None
    restarts: int = 0
    restart_times: collections.deque = field(default_factory=collections.deque)
    status: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, Any] | None = None
    trainer_state: str = ""
    outcome: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    stop_requested: float | None = None
    shutdown: bool = False
    """The stop is the daemon's shutdown, not the user's: the job stays recorded."""
    killed: bool = False
    orphan: int | None = None
    """A resumed job's previous trainer, still alive; the job starts when it is gone."""
    orphan_deadline: float = 0.0
    heard: float = 0.0
    output: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=20)
    )
    partial: bytes = b""
    rate: tuple[float, int] | None = None
    steps_per_s: float | None = None


class Supervisor:
    """Starts, watches, restarts and stops the trainer of one job at a time."""

    def __init__(
        self,
        context: zmq.Context,
        *,
        runtime_dir: Path,
        state_dir: Path,
        keep_record: bool = True,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.keep_record = keep_record
        """Record the job for a restarted daemon; a foreground daemon does not."""
        self.job: Job | None = None
        self.metrics = context.socket(zmq.SUB)
        self.metrics.setsockopt(zmq.LINGER, 0)
        for topic in (b"state", b"status", b"val"):
            self.metrics.setsockopt(zmq.SUBSCRIBE, topic)
        # Connecting before the trainer binds is fine: ZeroMQ reconnects by itself,
        # also to each restarted trainer.
        self.metrics.connect(f"ipc://{runtime_dir / 'metrics.sock'}")

    # Requests from the control socket.

    def start(
        self, config: dict[str, Any], *, resume: str = "auto", source: str = "config"
    ) -> dict[str, Any]:
        """Validates a job and starts its trainer; refuses while another job runs."""
        if self.job is not None and self.job.state.running:
            job = self.job
            raise DaemonError(
                f"run {job.run} is already {job.state.value} ({_progress(job)}); "
                "stop it first with 'trainerctl stop'"
            )
        parsed = parse_config(config, source=source)
        _check_corpus(parsed.corpus)
        if resume not in ("auto", "none") and not Path(resume).is_file():
            raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        run_dir = self.state_dir / "runs" / parsed.name
        # A trainer of another daemon may train this run: refuse before its job
        # file is overwritten. The trainer takes the lock itself; this is early.
        runlock.check_free(run_dir, parsed.name)
        config_file = _write_job_file(run_dir, parsed)
        self.job = Job(parsed.name, parsed, run_dir, config_file, resume)
        log.info(
            "job submitted: run %s from %s (resume %s)", parsed.name, source, resume
        )
        self._spawn(self.job, resume)
        return self.snapshot()["job"]

    def stop(self, *, now: bool = False, why: str = "stop") -> dict[str, Any]:
        """Asks the trainer to stop: after its step and a checkpoint, or at once."""
        job = self.job
        if job is None or not job.state.running:
            return {"stopping": False, "job": self.snapshot()["job"]}
        if job.stop_requested is None:
            job.stop_requested = time.monotonic()
            job.shutdown = why == "shutdown"
            self._move(job, JobState.STOPPING, f"{why} requested")
        elif why == "stop":
            # The user's stop ends the job for good, even during a shutdown.
            job.shutdown = False
        if job.trainer is None:
            # A resumed job still waiting for its old trainer: nothing to stop.
            job.orphan = None
            job.outcome = "stopped"
            self._move(job, JobState.IDLE, "stopped before its trainer started")
        elif now:
            self._kill(job, f"{why} at once")
        elif job.trainer.poll() is None:
            # SIGTERM to the trainer alone: it finishes its step, checkpoints and
            # stops its producers itself.
            _signal(job.trainer.pid, signal.SIGTERM)
        return {"stopping": True, "job": self.snapshot()["job"]}

    def snapshot(self) -> dict[str, Any]:
        """The job as status shows it; None when there never was one."""
        job = self.job
        if job is None:
            return {"job": None}
        now = time.time()
        info: dict[str, Any] = dict(job.status)
        info.update(
            run=job.run,
            state=job.state.value,
            running=job.state.running,
            outcome=job.outcome,
            reason=job.reason,
            exit_code=job.exit_code,
            run_dir=str(job.run_dir),
            corpus=job.config.corpus,
            started=job.started,
            restarts=job.restarts,
            max_restarts=job.config.checkpoint.max_restarts,
            trainer_pid=job.trainer.pid if _alive(job.trainer) else None,
            eta_s=_eta_s(job),
        )
        info.setdefault("epochs", job.config.train.epochs)
        if job.last_val is not None and not info.get("last_val"):
            info["last_val"] = job.last_val
        checkpoint = info.get("last_checkpoint") or _newest_checkpoint(job.run_dir)
        if checkpoint:
            info["last_checkpoint"] = checkpoint
            info["checkpoint_age_s"] = max(0.0, now - float(checkpoint["time"]))
        return {"job": info}

    # The main loop's hooks.

    def sockets(self) -> list[zmq.Socket]:
        """ZeroMQ sockets for the main loop's poller."""
        return [self.metrics]

    def fds(self) -> list[int]:
        """File descriptors for the poller: the trainer's output pipe."""
        job = self.job
        if job is None or job.trainer is None or job.trainer.stdout is None:
            return []
        if job.trainer.stdout.closed:
            return []
        return [job.trainer.stdout.fileno()]

    def on_metrics(self) -> None:
        """Drains the metrics socket; the trainer's states drive the job's."""
        while True:
            try:
                topic, raw = self.metrics.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            self._on_message(topic, message)

    def on_output(self) -> None:
        """Passes the trainer's output lines on to the daemon's stderr."""
        job = self.job
        if job is None or job.trainer is None:
            return
        pipe = job.trainer.stdout
        if pipe is None or pipe.closed:
            return
        try:
            chunk = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            pipe.close()
            self._flush_output(job)
            return
        lines = (job.partial + chunk).split(b"\n")
        job.partial = lines.pop()
        for line in lines:
            self._emit(job, line)

    def tick(self) -> None:
        """Notices a trainer that exited, stalled or overran its stop."""
        job = self.job
        if job is None or not job.state.running:
            return
        if job.trainer is None:
            self._await_orphan(job)
            return
        now = time.monotonic()
        code = job.trainer.poll()
        if code is None:
            if job.stop_requested and now - job.stop_requested > STOP_GRACE_S:
                self._kill(job, f"stop took longer than {STOP_GRACE_S:g} s")
            elif job.heard and now - job.heard > SILENCE_S:
                self._kill(job, f"trainer silent for {SILENCE_S:g} s")
            return
        self._on_exit(job, code)

    def status_line(self) -> str:
        """One line for systemd's STATUS: `training run 3f2a: epoch 4/20, ...`."""
        job = self.job
        if job is None:
            return "idle: no job"
        head = f"{job.state.value} run {job.run}"
        if job.state == JobState.FAILED:
            return f"{head}: {job.reason}"
        if job.state == JobState.IDLE:
            return f"idle: run {job.run} {job.outcome or 'stopped'}"
        return f"{head}: {_progress(job)}"

    def shutdown(self, *, now: bool) -> None:
        """Stops the job for a daemon that exits; the job stays recorded."""
        self.stop(now=now, why="shutdown")

    def resume_recorded(self) -> None:
        """Starts the job a previous daemon left running again, from its last
        checkpoint; a broken record is set aside with a warning."""
        try:
            found = record.read_record(self.state_dir)
        except record.RecordError as err:
            self._set_aside(str(err))
            return
        if found is None:
            return
        job_file = Path(found.job_file)
        try:
            raw = yaml.safe_load(job_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            self._set_aside(f"run {found.run}: job file {job_file} unreadable ({err})")
            return
        log.info(
            "resuming: run %s from its last checkpoint (interrupted by a daemon "
            "restart)",
            found.run,
        )
        try:
            parsed = parse_config(raw, source=str(job_file))
        except TrainerdError as err:
            log.error("resume failed: run %s: %s", found.run, err)
            self._forget()
            return
        job = Job(
            parsed.name,
            parsed,
            job_file.parent,
            job_file,
            found.resume,
            started=found.accepted,
        )
        self.job = job
        self._move(job, JobState.STARTING, "resumed after a daemon restart")
        try:
            _check_corpus(parsed.corpus)
        except TrainerdError as err:
            log.error("resume failed: run %s: %s", job.run, err)
            self._fail(job, str(err))
            return
        if found.trainer_pid is not None and _runs(found.trainer_pid, job_file):
            # Two trainers must never write one run directory at once.
            job.orphan = found.trainer_pid
            job.orphan_deadline = time.monotonic() + ORPHAN_WAIT_S
            log.info(
                "resume waits: the previous trainer of run %s (pid %d) is still "
                "checkpointing",
                job.run,
                job.orphan,
            )
            return
        self._spawn(job, _resume_policy(job))

    def close(self) -> None:
        """Kills what is left of the trainer and closes the metrics socket."""
        job = self.job
        if job is not None and _alive(job.trainer):
            # The daemon is going down with its job; the next daemon resumes it.
            if job.stop_requested is None:
                job.stop_requested = time.monotonic()
                job.shutdown = True
            self._kill(job, "daemon exits")
            job.trainer.wait(timeout=GROUP_EXIT_S)
            self._on_exit(job, job.trainer.returncode)
        self.metrics.close(linger=0)

    # Internals.

    def command(self, job: Job, resume: str) -> list[str]:
        """The trainer's command line."""
        return [
            sys.executable,
            "-m",
            "trainerd.daemon.service",
            "trainer",
            "--config",
            str(job.config_file),
            "--run-dir",
            str(job.run_dir),
            "--runtime-dir",
            str(self.runtime_dir),
            "--resume",
            resume,
        ]

    def _spawn(self, job: Job, resume: str) -> None:
        self._move(job, JobState.STARTING, f"resume {resume}")
        command = self.command(job, resume)
        env = dict(os.environ, TRAINERD_PARENT_PID=str(os.getpid()))
        job.trainer = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        os.set_blocking(job.trainer.stdout.fileno(), False)
        job.heard = time.monotonic()
        job.partial = b""
        job.killed = False
        job.trainer_state = ""
        log.info("trainer spawned: run %s, pid %d", job.run, job.trainer.pid)
        self._record(job)

    def _on_message(self, topic: bytes, message: dict[str, Any]) -> None:
        job = self.job
        if job is None or message.get("run") not in (None, job.run):
            return
        job.heard = time.monotonic()
        if topic == b"status":
            job.status = {k: v for k, v in message.items() if k != "state"}
            self._follow(job, message.get("state"), None)
            self._measure(job)
        elif topic == b"state":
            self._follow(job, message.get("state"), message.get("reason"))
        elif topic == b"val":
            job.last_val = message

    def _follow(self, job: Job, state: str | None, reason: str | None) -> None:
        job.trainer_state = state or job.trainer_state
        new = TRAINER_STATES.get(state or "")
        if new is None or not job.state.running or new == job.state:
            return
        # Once stopping, the trainer's own later states do not undo it.
        if job.state == JobState.STOPPING:
            return
        self._move(job, new, reason or "reported by the trainer")

    def _measure(self, job: Job) -> None:
        step = job.status.get("global_step")
        if not isinstance(step, int):
            return
        now = time.monotonic()
        if job.rate is not None and step > job.rate[1] and now > job.rate[0]:
            rate = (step - job.rate[1]) / (now - job.rate[0])
            old = job.steps_per_s
            job.steps_per_s = rate if old is None else 0.8 * old + 0.2 * rate
        job.rate = (now, step)

    def _on_exit(self, job: Job, code: int) -> None:
        self._clean_group(job)
        self._drain(job)
        job.status.update(_last_batch(job.run_dir / "metrics.jsonl"))
        for producer in job.status.get("producers") or []:
            producer["state"] = "exited"
        how = _describe_exit(code)
        log.info("trainer exited: run %s, %s", job.run, how)
        job.exit_code = code
        if code == 0 and job.trainer_state == "finished":
            job.outcome = "finished"
            self._move(job, JobState.FINISHED, "all epochs done")
        # A trainer stopped by a signal from elsewhere also says `stopping` first.
        elif job.stop_requested is not None or (
            code == 0 and job.trainer_state == "stopping"
        ):
            job.outcome = "stopped"
            job.reason = None if code == 0 else f"trainer {how} while stopping"
            self._move(job, JobState.IDLE, "stopped")
        elif code == 0:
            job.outcome = "finished"
            self._move(job, JobState.FINISHED, "all epochs done")
        elif code in FINAL_EXIT_CODES:
            self._fail(job, f"trainer {how}: {self._last_error(job)}")
        else:
            self._restart(job, how)

    def _restart(self, job: Job, how: str) -> None:
        now = time.monotonic()
        window_s = job.config.checkpoint.restart_window_min * 60
        while job.restart_times and now - job.restart_times[0] > window_s:
            job.restart_times.popleft()
        limit = job.config.checkpoint.max_restarts
        if len(job.restart_times) >= limit:
            window = f"{job.config.checkpoint.restart_window_min:g} min"
            self._fail(
                job,
                f"trainer died {len(job.restart_times) + 1} times within {window} "
                f"(checkpoint.max_restarts is {limit}); last: {how}: "
                f"{self._last_error(job)}",
            )
            return
        job.restart_times.append(now)
        job.restarts += 1
        resume = _resume_policy(job)
        log.warning(
            "trainer restarting: run %s, %s; restart %d of %d allowed in %g min",
            job.run,
            how,
            len(job.restart_times),
            limit,
            job.config.checkpoint.restart_window_min,
        )
        self._spawn(job, resume)

    def _fail(self, job: Job, reason: str) -> None:
        job.outcome = "failed"
        job.reason = reason
        self._move(job, JobState.FAILED, reason)

    def _kill(self, job: Job, why: str) -> None:
        # SIGKILL to the whole group: the trainer and its producers at once.
        if not _alive(job.trainer) or job.killed:
            return
        job.killed = True
        log.warning("trainer killed: run %s, %s", job.run, why)
        _signal_group(job.trainer.pid, signal.SIGKILL)

    def _clean_group(self, job: Job) -> None:
        # Producers exit by themselves when the trainer dies; killing the group
        # makes sure of it before their rings are reclaimed.
        pgid = job.trainer.pid
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + GROUP_EXIT_S
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _group_members(pgid)
        if left:
            log.error("trainer group lingers: pids %s", left)
        reclaim_segments(job.config.data.shm_dir)
        # The trainer's metrics and plan sockets; a killed trainer leaves them.
        remove_sockets(self.runtime_dir, keep=("control.sock",))

    def _move(self, job: Job, new: JobState, why: str) -> None:
        old = job.state
        if old == new:
            return
        if not can_move(old, new):
            log.warning("transition refused: run %s, %s -> %s", job.run, old, new)
            return
        job.state = new
        # Each transition is one plain line in the journal.
        log.info("run %s: %s -> %s (%s)", job.run, old.value, new.value, why)
        # Finished, failed or stopped by the user, the job is over: a restarted
        # daemon must not start it again. A shutdown's stop leaves it recorded.
        if new in (JobState.FINISHED, JobState.FAILED) or (
            new == JobState.IDLE and not job.shutdown
        ):
            self._forget()

    # The job's record, for a restarted daemon.

    def _record(self, job: Job) -> None:
        if not self.keep_record:
            return
        entry = record.JobRecord(
            run=job.run,
            job_file=str(job.config_file.resolve()),
            resume=job.resume,
            accepted=job.started,
            trainer_pid=job.trainer.pid if job.trainer is not None else None,
        )
        try:
            record.write_record(self.state_dir, entry)
        except OSError as err:
            log.warning(
                "record not written: %s (%s); a restarted daemon will not resume "
                "run %s",
                record.record_path(self.state_dir),
                err.strerror,
                job.run,
            )

    def _forget(self) -> None:
        if not self.keep_record:
            return
        try:
            record.remove_record(self.state_dir)
        except OSError as err:
            log.warning(
                "record not removed: %s (%s)",
                record.record_path(self.state_dir),
                err.strerror,
            )

    def _set_aside(self, why: str) -> None:
        try:
            aside = record.set_aside(self.state_dir)
        except OSError as err:
            log.warning("resume skipped: %s; not set aside (%s)", why, err.strerror)
            return
        log.warning("resume skipped: %s; record set aside as %s", why, aside)

    def _await_orphan(self, job: Job) -> None:
        """Starts a resumed job's trainer once the previous one is gone."""
        if job.orphan is None:
            return
        if _runs(job.orphan, job.config_file):
            if time.monotonic() < job.orphan_deadline:
                return
            log.warning(
                "trainer killed: run %s, previous trainer pid %d still running after "
                "%g s",
                job.run,
                job.orphan,
                ORPHAN_WAIT_S,
            )
            _signal_group(job.orphan, signal.SIGKILL)
        job.orphan = None
        self._spawn(job, _resume_policy(job))

    def _emit(self, job: Job, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            job.output.append(text)
            # A closed terminal or pipe must not end the job: trainer.log has it all.
            output.say(text)

    def _drain(self, job: Job) -> None:
        """Reads the rest of the output: the trainer's last line names its error."""
        pipe = job.trainer.stdout
        while pipe is not None and not pipe.closed:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except BlockingIOError:
                # A writer outlived the group kill; what it may still say is lost.
                pipe.close()
                break
            if not chunk:
                pipe.close()
                break
            lines = (job.partial + chunk).split(b"\n")
            job.partial = lines.pop()
            for line in lines:
                self._emit(job, line)
        self._flush_output(job)

    def _flush_output(self, job: Job) -> None:
        if job.partial:
            self._emit(job, job.partial)
            job.partial = b""

    def _last_error(self, job: Job) -> str:
        for line in reversed(job.output):
            if "error:" in line:
                return line.split("error:", 1)[1].strip()
        return job.output[-1] if job.output else "no output"


def reclaim_segments(shm_dir: str) -> list[str]:
    """Unlinks the ring segments of dead trainers in `shm_dir`."""
    from trainerd.producers.ring import reclaim_stale_segments

    return reclaim_stale_segments(shm_dir)


def remove_sockets(runtime_dir: Path, *, keep: tuple[str, ...] = ()) -> list[Path]:
    """Unlinks the socket files in the runtime directory, but those in `keep`."""
    removed = []
    for path in sorted(runtime_dir.iterdir()):
        if path.name not in keep and path.is_socket():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _resume_policy(job: Job) -> str:
    """What a restarted trainer resumes from.

    The run's newest checkpoint once this job has written one; until then the
    policy the job was submitted with, so that `--resume PATH` still starts from
    PATH and `--resume none` still sets older checkpoints aside.
    """
    if job.resume == "auto":
        return "auto"
    for path in (job.run_dir / "checkpoints").glob("*.pt"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= job.started:
                return "auto"
    return job.resume


def _runs(pid: int, job_file: Path) -> bool:
    """Whether `pid` is a live trainer of the job whose config is `job_file`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat[stat.rindex(")") + 2] in "ZX":
        return False
    return b"trainer" in cmdline and str(job_file).encode() in cmdline


def _check_corpus(path: str) -> None:
    from trainerd.producers.corpus import Corpus

    Corpus.open(path)


def _write_job_file(run_dir: Path, config: JobConfig) -> Path:
    """The resolved config the trainer reads; beside the trainer's own config.yaml."""
    path = run_dir / "job.yaml"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w") as f:
            yaml.safe_dump(config.model_dump(mode="json"), f, sort_keys=False)
    except OSError as err:
        raise DaemonError(
            f"run directory {run_dir}: not writable ({err.strerror}); check the owner "
            "of the state directory or set TRAINERD_STATE_DIR"
        ) from err
    # Absolute: the job's record names it, and a restarted daemon finds the old
    # trainer by it.
    return path.resolve()


def _last_batch(metrics: Path) -> dict[str, Any]:
    """Where the last trained batch left the run, from the tail of metrics.jsonl.

    The trainer's status comes once a second; after it exits, its last metrics
    record is the exact position. A `resumed` marker (an `event` record, see
    trainer_main) is not a batch.
    """
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().splitlines()
    except OSError:
        return {}
    for line in reversed(tail):
        try:
            record = json.loads(line)
            if "event" in record:
                continue
            return {
                "epoch": record["epoch"],
                "step": record["batch"] + 1,
                "global_step": record["step"],
            }
        except (ValueError, KeyError, TypeError):
            continue
    return {}


def _progress(job: Job) -> str:
    status = job.status
    epoch, epochs = status.get("epoch"), status.get("epochs", job.config.train.epochs)
    if epoch is None:
        return "starting"
    parts = [f"epoch {epoch}/{epochs}"]
    if status.get("n_batches") is not None:
        parts.append(f"step {status.get('step', 0)}/{status['n_batches']}")
    val = status.get("last_val") or job.last_val
    if isinstance(val, dict) and val.get("accuracy") is not None:
        parts.append(f"val acc {float(val['accuracy']):.3f}")
    return ", ".join(parts)


def _eta_s(job: Job) -> float | None:
    status = job.status
    if not job.state.running or not job.steps_per_s:
        return None
    try:
        total = int(status["epochs"]) * int(status["n_batches"])
        left = total - int(status["global_step"])
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, left / job.steps_per_s)


def _newest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / "last.pt"
    try:
        return {"path": str(path), "time": path.stat().st_mtime}
    except OSError:
        return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


def _alive(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry))
    return members
