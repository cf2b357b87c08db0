"""The trainerd daemon: one process, one main loop, one job at a time.

The loop polls the control socket, the trainer's metrics and its output with a short
timeout; signal handlers only count signals. Each turn the loop acts on them, lets
the supervisor notice exits, and tells systemd how things stand (STATUS, and
WATCHDOG while the loop is healthy).

Start-up claims the runtime directory with a lock (a second daemon gets a one-line
error naming the first), then reclaims what a killed daemon left: stale sockets and
the ring segments of dead trainers. Once the control socket is up, it resumes the job
a previous daemon left recorded: one that died, or stopped on SIGTERM while the job
ran (systemctl restart, a reboot). A foreground daemon runs its own job only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from trainerd.daemon import paths
from trainerd.daemon.control import ControlServer, CurveKeys
from trainerd.daemon.notify import Notifier
from trainerd.daemon.supervisor import Supervisor, reclaim_segments, remove_sockets
from trainerd.producers.errors import DaemonError

log = logging.getLogger(__name__)

POLL_MS = 200
LOCK_NAME = "trainerd.lock"
VERSION = "0.1.0"


class Daemon:
    """The service; `run()` returns the process's exit status."""

    def __init__(
        self,
        *,
        control_tcp: str | None = None,
        curve_keys: str | None = None,
        job: dict[str, Any] | None = None,
    ) -> None:
        self.control_tcp = control_tcp
        self.curve_keys = curve_keys
        self.first_job = job
        """A job to start at once (`trainerctl start --foreground`); the daemon
        then exits when it ends."""
        self.started = time.time()
        self.signals = 0
        self._acted_on = 0
        self._lock_fd: int | None = None
        self.notify = Notifier()

    def run(self) -> int:
        """Serves until a signal (or, with a first job, its end); returns 0 if clean."""
        state_dir = _writable_state_dir()
        self.runtime_dir = _claim_runtime_dir()
        self._lock()
        context = zmq.Context()
        control = supervisor = None
        ready = False
        try:
            _reclaim_sockets(self.runtime_dir)
            reclaim_segments("/dev/shm")
            keys = CurveKeys.for_server(self.curve_keys) if self.curve_keys else None
            control = ControlServer(
                context, self.runtime_dir, tcp=self.control_tcp, keys=keys
            )
            supervisor = Supervisor(
                context,
                runtime_dir=self.runtime_dir,
                state_dir=state_dir,
                keep_record=self.first_job is None,
            )
            self.control, self.supervisor = control, supervisor
            self._install_signals()
            if self.first_job is not None:
                supervisor.start(**self.first_job)
            else:
                supervisor.resume_recorded()
            log.info(
                "trainerd ready: pid %d, control %s, state %s",
                os.getpid(),
                control.path,
                state_dir,
            )
            self.notify.ready(supervisor.status_line())
            ready = True
            self._loop()
            return self._exit_status()
        finally:
            if supervisor is not None:
                self.notify.stopping("stopping: trainerd exits")
                supervisor.close()
            if control is not None:
                control.close()
            _reclaim_sockets(self.runtime_dir, quiet=True)
            context.term()
            self._unlock()
            self.notify.close()
            if ready:
                log.info("trainerd stopped")

    # The main loop.

    def _loop(self) -> None:
        control, supervisor = self.control, self.supervisor
        while True:
            poller = zmq.Poller()
            for sock in [*control.sockets, *supervisor.sockets()]:
                poller.register(sock, zmq.POLLIN)
            fds = supervisor.fds()
            for fd in fds:
                poller.register(fd, zmq.POLLIN)
            events = dict(poller.poll(POLL_MS))

            for sock in control.sockets:
                if sock in events:
                    control.serve(sock, self._handle)
            if supervisor.metrics in events:
                supervisor.on_metrics()
            if any(fd in events for fd in fds):
                supervisor.on_output()
            self._act_on_signals()
            supervisor.tick()

            self.notify.status(supervisor.status_line())
            # The watchdog hears from this loop only, so a wedged loop gets restarted.
            self.notify.watchdog()
            if self._done():
                return

    def _done(self) -> bool:
        job = self.supervisor.job
        running = job is not None and job.state.running
        if self.signals:
            return not running
        return self.first_job is not None and not running

    def _exit_status(self) -> int:
        failure = self.failure()
        return 0 if failure is None else failure[1]

    def failure(self) -> tuple[str, int] | None:
        """The first job's failure, (reason, exit status), when it failed."""
        supervisor = getattr(self, "supervisor", None)
        job = None if supervisor is None else supervisor.job
        if self.first_job is None or job is None or job.outcome != "failed":
            return None
        code = job.exit_code if job.exit_code and job.exit_code > 0 else 1
        return f"run {job.run} failed: {job.reason}", code

    # Control requests.

    def _handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "ping":
            return self._about()
        if op == "status":
            return {"daemon": self._about(), **self.supervisor.snapshot()}
        if op == "start":
            if self.signals:
                raise DaemonError("trainerd is shutting down; start the job later")
            return self.supervisor.start(
                args["config"],
                resume=str(args.get("resume", "auto")),
                source=str(args.get("source", "config")),
            )
        if op == "stop":
            return self.supervisor.stop(now=bool(args.get("now")))
        raise DaemonError(f"unknown control operation {op!r}")

    def _about(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": VERSION,
            "started": self.started,
            "uptime_s": time.time() - self.started,
            "runtime_dir": str(self.runtime_dir),
            "foreground": self.first_job is not None,
            "stopping": bool(self.signals),
        }

    # Signals: the handler counts, the loop acts.

    def _install_signals(self) -> None:
        def count(signum: int, frame: object) -> None:
            self.signals += 1

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, count)

    def _act_on_signals(self) -> None:
        if self.signals == self._acted_on:
            return
        self._acted_on = self.signals
        self.notify.stopping("stopping: trainerd shuts down")
        if self.signals == 1:
            log.info("shutdown requested: stopping the job after its step")
            self.supervisor.shutdown(now=False)
        else:
            log.warning("shutdown forced: stopping the job at once, no checkpoint")
            self.supervisor.shutdown(now=True)

    # The runtime directory's lock.

    def _lock(self) -> None:
        path = self.runtime_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonError(
                f"another trainerd (pid {other}) already serves {self.runtime_dir}; "
                f"stop it first ('systemctl stop trainerd', or 'kill {other}' where "
                "you started it), or set TRAINERD_RUNTIME_DIR"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            (self.runtime_dir / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None


def _writable_state_dir() -> Path:
    path = paths.state_dir()
    runs = path / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        probe = runs / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DaemonError(
            f"state directory {path}: not writable ({err.strerror}); fix its owner "
            "or set TRAINERD_STATE_DIR to a directory of your own"
        ) from err
    return path


def _claim_runtime_dir() -> Path:
    path = paths.runtime_dir()
    try:
        return paths.ensure_runtime_dir()
    except PermissionError as err:
        raise DaemonError(
            f"runtime directory {path}: belongs to another user ({err.strerror}); "
            "run as its owner or set TRAINERD_RUNTIME_DIR to a directory of your own"
        ) from err
    except OSError as err:
        raise DaemonError(f"runtime directory {path}: {err.strerror}") from err


def _reclaim_sockets(runtime_dir: Path, *, quiet: bool = False) -> None:
    # Called with the lock held: any socket file here is a dead daemon's or its
    # trainer's.
    for path in remove_sockets(runtime_dir):
        if not quiet:
            log.info("reclaimed: stale socket %s", path)
