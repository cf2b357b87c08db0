"""trainerctl watch: follow the running job in a live terminal dashboard.

Attaching reads the run's history from its files (metrics.jsonl, validation.jsonl,
config.yaml), then follows the trainer's live messages on its metrics socket. The
viewer is a ZeroMQ SUB socket, so any number of viewers can watch at once and none of
them can slow the trainer: the trainer's PUB drops what a slow viewer does not take.
ZMQ_CONFLATE (keep only the newest message) would suit a dashboard, but it does not
work with multipart messages, and the trainer sends [topic, json]; instead the viewer
drains everything queued at each tick and keeps a bounded receive queue, so it never
lags behind the trainer by more than one tick.

In a terminal the view is a full-screen rich Live redrawn from the main loop a few
times a second (at the terminal's current size, so a resize is picked up at the next
redraw); q or Ctrl-C detaches and leaves the job running. Elsewhere (`--plain`, or
stdout not a terminal) it prints one status line per interval and stops when the job
ends. `--run ID` shows a run's history from its files, and follows it if it is live.

When no live message comes, the daemon says whether a job is running. If none is
(the job ended, the daemon is idle or not running at all), the view says so and shows
no rates or ETAs from the files; the plain view prints one last line and exits. It
keeps following only while the daemon has a job under way (one starting, say).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDRAW_S = 0.25
PLAIN_INTERVAL_S = 5.0
RECEIVE_HWM = 2000
# At most this many messages are taken per tick, so a flood cannot starve the redraw.
DRAIN_MAX = 5000
# History read at attach: the tail of metrics.jsonl is enough for the curves.
HISTORY_BYTES = 8 << 20
VALIDATION_BYTES = 64 << 20
# --run: how long to listen for a live message before showing only the files.
LIVE_PROBE_S = 2.5
DISK_EVERY_S = 5.0
GPU_EVERY_S = 1.0
DAEMON_EVERY_S = 5.0
DAEMON_TIMEOUT_S = 1.0
METRICS_SOCKET = "metrics.sock"
# Silent this long (the trainer sends a status every second): ask whether it ended.
QUIET_CHECK_S = 3.0
# --plain: the first line waits this long at most for a live message or the daemon's
# word, so it does not show the files' figures as the job's.
SETTLE_S = QUIET_CHECK_S + DAEMON_TIMEOUT_S + 0.5
NO_TRAINER = "no trainer running"


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this module's commands to trainerctl."""
    parser = sub.add_parser(
        "watch",
        help="live dashboard of the running job (q or Ctrl-C detaches)",
        description="Show the running job's progress, curves, validation history, "
        "producers, checkpoints and GPUs, live. Attaching mid-run shows the history "
        "so far; q or Ctrl-C detaches and leaves the job running. When stdout is not "
        "a terminal, --plain is implied.",
    )
    parser.add_argument(
        "--run",
        metavar="ID",
        help="watch this run (default: the running job); a finished run's history "
        "is read from its files",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="print one status line per interval instead of drawing (for logs)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        metavar="S",
        help=f"seconds between status lines with --plain (default {PLAIN_INTERVAL_S:g})"
        f" or between redraws (default {REDRAW_S:g})",
    )
    parser.add_argument(
        "--stall-after",
        type=float,
        default=60.0,
        metavar="S",
        help="alert when no step comes for this long while training (default 60)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="trainerd's state directory (default: TRAINERD_STATE_DIR or the "
        "service's)",
    )
    parser.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="where the metrics socket is (default: TRAINERD_RUNTIME_DIR or the "
        "service's)",
    )
    parser.set_defaults(func=watch)


def watch(args: argparse.Namespace) -> int:
    """Runs the dashboard (or the plain status lines) until detached or done."""
    from trainerd.daemon import paths
    from trainerd.daemon.dashboard import Thresholds
    from trainerd.producers.errors import ConfigError

    plain = args.plain or not sys.stdout.isatty()
    interval_s = args.interval
    if interval_s is None:
        interval_s = PLAIN_INTERVAL_S if plain else REDRAW_S
    if interval_s <= 0:
        raise ConfigError(f"--interval: must be > 0, got {args.interval:g}")
    if args.stall_after <= 0:
        raise ConfigError(f"--stall-after: must be > 0, got {args.stall_after:g}")
    state_dir = Path(args.state_dir) if args.state_dir else paths.state_dir()
    runtime_dir = Path(args.runtime_dir) if args.runtime_dir else paths.runtime_dir()
    thresholds = Thresholds(stall_s=args.stall_after)
    watcher = Watcher(
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        run_id=args.run,
        thresholds=thresholds,
        gpus=not plain,
    )
    try:
        watcher.attach()
        if plain:
            return _run_plain(watcher, interval_s)
        return _run_screen(watcher, interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        watcher.close()


class Watcher:
    """The dashboard's feed: a run's files, then its live messages."""

    def __init__(
        self,
        *,
        state_dir: Path,
        runtime_dir: Path,
        run_id: str | None,
        thresholds: Any,
        gpus: bool = True,
    ) -> None:
        import zmq

        from trainerd.daemon.dashboard import DashboardState, GpuProbe

        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.wanted = run_id
        self.thresholds = thresholds
        self._new_state = lambda: DashboardState(state_dir=str(state_dir))
        self.st = self._new_state()
        self._floor: int | None = None
        self._next_disk = self._next_gpu = self._next_daemon = 0.0
        if run_id is not None:
            self._check_run(run_id)
        self.gpu = GpuProbe() if gpus else None
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")

    def attach(self) -> None:
        """Subscribes, then reads the run's history (the wanted, running or newest)."""
        # Subscribe before reading any file, so nothing falls between the two.
        # connect() to an ipc path that is not there yet is fine: ZeroMQ keeps
        # retrying, which also follows a restarted trainer.
        self.sub.connect(f"ipc://{self.runtime_dir / METRICS_SOCKET}")
        job, _ = self._daemon_status()
        first = self.wanted or (job or {}).get("run") or self._newest_run()
        if first is not None:
            self._load(first)
        else:
            self.st.watch_started_at = time.time()

    @property
    def idle(self) -> bool:
        """Nothing to follow: no run at all, and the daemon has no job."""
        return self.st.run is None and self.st.state == "idle"

    def settled(self) -> bool:
        """A live message, or the daemon's word, has said how the job stands."""
        st = self.st
        return st.live or st.state is not None or st.daemon_down is not None

    # -- runs and files ----------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        """runs/<run-id>/ under the state directory watched."""
        return self.state_dir / "runs" / run_id

    def _check_run(self, run_id: str) -> None:
        from trainerd.producers.errors import InputError

        if self.run_dir(run_id).is_dir():
            return
        runs = sorted(p.name for p in (self.state_dir / "runs").glob("*") if p.is_dir())
        known = f"runs there: {', '.join(runs)}" if runs else "there are no runs there"
        raise InputError(
            f"run {run_id!r}: no such run under {self.state_dir / 'runs'}; {known} "
            "(or pass --state-dir)"
        )

    def _newest_run(self) -> str | None:
        runs = list((self.state_dir / "runs").glob("*/metrics.jsonl"))
        if not runs:
            return None
        return max(runs, key=lambda p: p.stat().st_mtime).parent.name

    def _load(self, run_id: str, *, resumed_at: int | None = None) -> None:
        """Starts over from the run's files; live messages continue after them."""
        st = self._new_state()
        st.run = run_id
        st.watch_started_at = time.time()
        folder = self.run_dir(run_id)
        st.load_history(
            read_records(folder / "metrics.jsonl", max_bytes=HISTORY_BYTES),
            read_records(folder / "validation.jsonl", max_bytes=VALIDATION_BYTES),
            config=read_config(folder),
            resumed_at=resumed_at,
        )
        st.last_checkpoint = st.last_checkpoint or _newest_checkpoint(folder)
        # The files lag the socket by up to a flush: drop live batches they hold.
        self._floor = st.global_step
        self.st = st
        self._next_disk = self._next_gpu = 0.0

    def files_finished(self) -> bool:
        """The run's files show every epoch validated."""
        st = self.st
        return (
            bool(st.epochs) and bool(st.validation) and max(st.validation) >= st.epochs
        )

    # -- live messages -----------------------------------------------------------------

    def pump(self, timeout_s: float, *, extra_fd: int | None = None) -> bool:
        """Waits up to `timeout_s` for messages, applies them; True if `extra_fd` is
        readable."""
        import zmq

        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, zmq.POLLIN)
        ready = dict(poller.poll(max(int(timeout_s * 1000), 0)))
        if self.sub in ready:
            self._drain()
        self._refresh(time.time())
        return extra_fd is not None and extra_fd in ready

    def _drain(self) -> None:
        import zmq

        for _ in range(DRAIN_MAX):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            try:
                message = json.loads(frames[1])
            except ValueError:
                continue
            if isinstance(message, dict):
                self._take(frames[0].decode(errors="replace"), message)

    def _take(self, topic: str, message: dict[str, Any]) -> None:
        from trainerd.daemon.dashboard import RESUMED, is_batch

        run = message.get("run")
        if self.wanted is not None and run != self.wanted:
            return
        # The first live message of a run (or of a new job) reloads its history.
        if run is not None and (run != self.st.run or not self.st.live):
            self._load(run)
            self.st.live = True
        resumed = self._resumed_at(topic, message)
        if resumed is not None and run is not None:
            # The trainer went back to a checkpoint: the steps it replays replace
            # the ones shown, as they do in the files.
            self._load(run, resumed_at=resumed)
            self.st.live = True
        if message.get("event") == RESUMED:
            return
        if topic == "batch":
            if not is_batch(message):
                return
            if self._floor is not None:
                if message["step"] <= self._floor:
                    return
                self._floor = None
        self.st.apply(topic, message, now=time.time())

    def _resumed_at(self, topic: str, message: dict[str, Any]) -> int | None:
        """The step the trainer resumed at, when this message shows it went back."""
        from trainerd.daemon.dashboard import RESUMED

        if message.get("event") == RESUMED:
            step = message.get("step")
            return step if isinstance(step, int) else None
        shown = self.st.global_step
        # Until a live batch passes the files' last step, older steps are expected.
        if self._floor is not None or shown is None:
            return None
        if topic == "batch" and isinstance(message.get("step"), int):
            step = message["step"]
            return step - 1 if step <= shown else None
        if topic == "status" and isinstance(message.get("global_step"), int):
            step = message["global_step"]
            return step if step < shown else None
        return None

    # -- slow figures --------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        from trainerd.daemon.dashboard import ENDED, disk_free_bytes

        st = self.st
        if now >= self._next_disk:
            self._next_disk = now + DISK_EVERY_S
            st.disk_free = disk_free_bytes(self.state_dir)
        if self.gpu is not None and now >= self._next_gpu:
            self._next_gpu = now + GPU_EVERY_S
            st.gpus = self.gpu.read()
        quiet = st.quiet_s(now)
        quiet = 0.0 if quiet is None else quiet
        if st.state in ENDED or quiet < QUIET_CHECK_S:
            return
        # Silent: the final state message may have been lost with the trainer's
        # socket, so the files and the daemon say whether the job ended.
        if self.files_finished():
            st.state = "finished"
        elif st.state == "stopping":
            st.state = "stopped"  # the trainer said it was stopping, then went quiet
        elif now >= self._next_daemon:
            self._next_daemon = now + DAEMON_EVERY_S
            self._ask_daemon(st, quiet_s=quiet)

    def _ask_daemon(self, st: Any, *, quiet_s: float) -> None:
        """Takes the daemon's word on a silent run: running, ended or nobody there."""
        from trainerd.daemon.dashboard import ENDED

        job, down = self._daemon_status()
        st.daemon_down = down
        if down is not None:
            # A trainer outlives its daemon only for a moment: once it too is
            # quiet for a while, nothing runs the job.
            if st.run is not None and (
                not st.live or quiet_s >= self.thresholds.quiet_s
            ):
                st.state, st.reason = "stopped", down
            return
        if job is None or not job.get("running"):
            if job is not None and job.get("run") == st.run:
                ended = job.get("state")
                if ended == "idle":
                    ended = job.get("outcome") or "stopped"
                st.state = ended if ended in ENDED else "stopped"
                st.reason = job.get("reason") or (
                    NO_TRAINER if st.state == "stopped" else None
                )
            elif st.run is not None:
                st.state, st.reason = "stopped", NO_TRAINER
            else:
                st.state = "idle"
            return
        # The daemon has a job under way: following it is worth the wait.
        if job.get("run") == st.run:
            if not st.live:
                st.state = job.get("state")
        elif self.wanted is None:
            self._load(job["run"])
            self.st.state = job.get("state")
        else:
            st.state = "stopped"
            st.reason = f"{NO_TRAINER}; trainerd runs {job.get('run')}"

    def _daemon_status(self) -> tuple[dict[str, Any] | None, str | None]:
        """The daemon's job (None without one), or why the daemon cannot be asked."""
        from trainerd.daemon import control
        from trainerd.producers.errors import TrainerdError

        try:
            endpoint, keys = control.client_endpoint(self.runtime_dir)
            result = control.request(
                "status", endpoint=endpoint, keys=keys, timeout_s=DAEMON_TIMEOUT_S
            )
        except TrainerdError as err:
            log.debug("daemon status unavailable: %s", err)
            return None, str(err)
        job = result.get("job")
        return (job if isinstance(job, dict) else None), None

    def close(self) -> None:
        """Closes the socket, the context and NVML."""
        self.sub.close(linger=0)
        self.context.term()
        if self.gpu is not None:
            self.gpu.close()


def read_records(path: Path, *, max_bytes: int) -> list[dict[str, Any]]:
    """JSON-lines records from the last `max_bytes` of a file; [] when it is absent.

    A line cut short (by a crash, or by a write in progress) is skipped.
    """
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(size - max_bytes, 0))
            if size > max_bytes:
                file.readline()  # starts mid-line
            data = file.read()
    except FileNotFoundError:
        return []
    except OSError as err:
        from trainerd.producers.errors import InputError

        raise InputError(f"{path}: cannot read ({err.strerror})") from err
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved config (config.yaml, else the daemon's job.yaml)."""
    import yaml

    for name in ("config.yaml", "job.yaml"):
        try:
            data = yaml.safe_load((run_dir / name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return data
    return None


def _newest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / "last.pt"
    with contextlib.suppress(OSError):
        return {"path": str(path), "time": path.stat().st_mtime}
    return None


# -- the two views ---------------------------------------------------------------------


def _run_plain(watcher: Watcher, interval_s: float) -> int:
    from trainerd.daemon.dashboard import ENDED, history_lines, status_line

    if watcher.wanted is not None and not _goes_live(watcher):
        # A run that is not live: its history is all there is to show.
        for line in history_lines(watcher.st):
            print(line, flush=True)
        return 0
    next_line = time.time()
    settle_by = next_line + SETTLE_S
    while True:
        now = time.time()
        due = next_line
        if not watcher.settled() and now < settle_by:
            # Hold the first line until the job's state is known, polling so that
            # the daemon is asked as soon as the quiet time is up.
            due = max(next_line, min(now + REDRAW_S, settle_by))
        watcher.pump(max(due - now, 0.0))
        st, now = watcher.st, time.time()
        if st.run is None and st.daemon_down:
            from trainerd.producers.errors import DaemonError

            raise DaemonError(f"no run to watch; {st.daemon_down}")
        ended = st.state in ENDED or watcher.idle
        ready = watcher.settled() or now >= settle_by
        if ready and (now >= next_line or ended):
            print(status_line(st, now=now, thresholds=watcher.thresholds), flush=True)
            next_line = max(next_line + interval_s, now)
        if ended:
            return _end(st)


def _goes_live(watcher: Watcher) -> bool:
    if watcher.files_finished():
        return False
    deadline = time.time() + LIVE_PROBE_S
    while not watcher.st.live and time.time() < deadline:
        watcher.pump(deadline - time.time())
    return watcher.st.live


def _end(st: Any) -> int:
    from trainerd.producers.errors import TrainingFailed

    if st.state == "failed":
        raise TrainingFailed(f"run {st.run} failed: {st.reason or 'see its log'}")
    return 0


def _run_screen(watcher: Watcher, interval_s: float) -> int:
    from rich.console import Console
    from rich.live import Live

    from trainerd.daemon.dashboard import ENDED, render_dashboard

    console = Console()
    # The loop redraws (auto_refresh off): one thread owns the state and the screen.
    live = Live(console=console, screen=True, auto_refresh=False)
    with KeyReader(sys.stdin) as keys, live:
        while True:
            now = time.time()
            view = render_dashboard(watcher.st, now=now, thresholds=watcher.thresholds)
            live.update(view, refresh=True)
            if _quit_pressed(watcher, keys, until=now + interval_s):
                break
    st = watcher.st
    if st.live and st.state not in ENDED:
        print(f"trainerctl watch: detached from run {st.run}; the job keeps running")
    else:
        print(f"trainerctl watch: detached (run {st.run or '-'}: {st.state or 'idle'})")
    return 0


def _quit_pressed(watcher: Watcher, keys: KeyReader, *, until: float) -> bool:
    """Feeds the watcher until `until`; True as soon as q is typed."""
    while time.time() < until:
        typed = watcher.pump(until - time.time(), extra_fd=keys.fd)
        if typed and "q" in keys.read().lower():
            return True
    return False


class KeyReader:
    """Reads keys from a terminal in cbreak mode without blocking.

    cbreak keeps Ctrl-C a signal, so it still interrupts; the terminal's mode is
    restored on exit whatever happened.
    """

    def __init__(self, stream: Any) -> None:
        self.fd: int | None = stream.fileno() if stream.isatty() else None
        self._saved: Any = None

    def __enter__(self) -> KeyReader:
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def read(self) -> str:
        """The keys typed since the last call."""
        if self.fd is None:
            return ""
        chars = b""
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                break
            chars += data
        return chars.decode(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
