"""trainerctl watch from outside: plain lines, a finished run's history, and the
full-screen view inside a tmux pane, fed by a stand-in publisher and by a real job."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from watch_util import (
    FakeDaemon,
    batch_record,
    daemon_job,
    status_record,
    val_record,
    write_run,
)

from trainerd.daemon import cli, cmd_watch
from trainerd.model.metrics import Publisher

BIN = Path(sys.executable).parent
TRAINERCTL = str(BIN / "trainerctl")
TRAINERD = str(BIN / "trainerd")
DEADLINE_S = 30.0
JOB_DEADLINE_S = 120.0
VAL_ROW = re.compile(r"│\s+1\s+\d\.\d{3}\s+\d\.\d{3}\s+\d\.\d{3}")


def wait_for(
    check: Callable[[], Any], *, timeout_s: float = DEADLINE_S, what: str, poll_s=0.05
) -> Any:
    """Polls `check` until it returns something true; fails after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """A state and a runtime directory with short paths (ipc paths are limited)."""
    root = Path(tempfile.mkdtemp(prefix="tdw", dir="/tmp"))
    state, runtime = root / "s", root / "r"
    state.mkdir()
    runtime.mkdir(mode=0o700)
    yield state, runtime
    shutil.rmtree(root, ignore_errors=True)


def watch_args(state: Path, runtime: Path, *extra: str) -> list[str]:
    return ["watch", "--state-dir", str(state), "--runtime-dir", str(runtime), *extra]


class FakeTrainer:
    """Publishes trainer-format messages on a real PUB socket, one step a call."""

    def __init__(self, runtime: Path, run: str = "fake") -> None:
        self.pub = Publisher(runtime)
        self.run = run
        self.step = 0

    def tick(self, *, state: str = "training") -> None:
        self.step += 1
        now = time.time()
        batch = (self.step - 1) % 100
        epoch = 1 + (self.step - 1) // 100
        self.pub.send(
            b"batch",
            batch_record(
                run=self.run,
                epoch=epoch,
                step=self.step,
                batch=batch,
                n_batches=100,
                time=now,
            ),
        )
        status = status_record(
            run=self.run,
            state=state,
            epoch=epoch,
            epochs=3,
            step=batch + 1,
            n_batches=100,
            global_step=self.step,
            time=now,
            checkpoint_time=now - 5,
        )
        self.pub.send(b"status", status)

    def close(self) -> None:
        self.pub.close()


class LineReader:
    """Collects a process's stdout lines on a thread, so reads never block."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def join(self) -> None:
        """Waits for the end of the output (the process has exited)."""
        self._thread.join(timeout=DEADLINE_S)

    def find(self, needle: str) -> str | None:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return next((line for line in self.seen if needle in line), None)


def test_plain_lines_from_a_live_publisher_in_two_viewers(dirs) -> None:
    state, runtime = dirs
    fake = FakeTrainer(runtime)
    command = [TRAINERCTL, *watch_args(state, runtime, "--plain", "--interval", "0.2")]
    # stdout is a pipe, not a terminal: plain lines without --plain too.
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in (command, [c for c in command if c != "--plain"])
    ]
    try:
        outs = [LineReader(proc) for proc in procs]

        def live_lines() -> list[str] | None:
            fake.tick()
            found = [out.find("run fake  training  epoch 1/3") for out in outs]
            return found if all(found) else None

        for line in wait_for(live_lines, what="a status line of the live run"):
            assert re.search(r"step \d+/100", line)
            assert "812 samples/s" in line

        fake.pub.send(b"val", val_record(1, 0.9, 0.625, 0.6, run="fake"))
        wait_for(
            lambda: fake.tick() or all(o.find("val accuracy 0.625") for o in outs),
            what="the validation figure in both viewers",
        )

        fake.pub.send(b"state", {"run": "fake", "state": "finished"})
        for proc, out in zip(procs, outs, strict=True):
            assert proc.wait(timeout=DEADLINE_S) == 0
            out.join()
            assert out.find("[job finished: run fake]")
    finally:
        fake.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def test_run_prints_a_finished_runs_history(dirs, capsys) -> None:
    state, runtime = dirs
    validations = [
        val_record(e, 1.5 - a, a, a - 0.02)
        for e, a in enumerate((0.41, 0.63, 0.58), start=1)
    ]
    write_run(state, "old", epochs=3, validations=validations)

    assert cli.main(watch_args(state, runtime, "--run", "old")) == 0
    lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "run old  config old  steps 60  epochs 3/3"
    assert lines[1] == "epoch   1  loss 1.090  acc 0.410  F1 0.390"
    assert lines[2] == "epoch   2  loss 0.870  acc 0.630  F1 0.610  <- best"
    assert lines[3] == "epoch   3  loss 0.920  acc 0.580  F1 0.560"


def test_unknown_run_is_a_one_line_error(dirs, capsys) -> None:
    state, runtime = dirs
    write_run(state, "old", epochs=1, validations=[])

    assert cli.main(watch_args(state, runtime, "--run", "nope")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainerctl watch: error: run 'nope': no such run under")
    assert "runs there: old" in err
    assert "\n" not in err


def test_bad_interval_is_refused(dirs, capsys) -> None:
    state, runtime = dirs
    assert cli.main(watch_args(state, runtime, "--interval", "0")) == 2
    assert "--interval: must be > 0, got 0" in capsys.readouterr().err


# -- no live trainer: the daemon's word ------------------------------------------------


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short quiet times, so the daemon is asked within a fraction of a second."""
    monkeypatch.setattr(cmd_watch, "QUIET_CHECK_S", 0.3)
    monkeypatch.setattr(cmd_watch, "DAEMON_EVERY_S", 0.2)
    monkeypatch.setattr(cmd_watch, "SETTLE_S", 2.0)


def stopped_run(state: Path) -> None:
    """Run nb2: 3 of 25 epochs done, 20 steps each, then nothing."""
    validations = [val_record(e, 1.0, 0.5 + e / 100, 0.5) for e in (1, 2, 3)]
    write_run(state, "nb2", epochs=25, validations=validations)


def plain(state: Path, runtime: Path, capsys) -> tuple[int, list[str], str]:
    code = cli.main(watch_args(state, runtime, "--plain", "--interval", "0.1"))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def assert_no_rates(line: str) -> None:
    assert "samples/s" not in line
    assert "ETA" not in line
    assert "wait " not in line


def test_plain_says_the_daemon_is_down_and_exits(dirs, quick, capsys) -> None:
    state, runtime = dirs
    stopped_run(state)

    code, lines, _ = plain(state, runtime, capsys)

    assert code == 0
    assert len(lines) == 1, lines  # not the files' figures as if live, then the end
    assert "run nb2  stopped  epoch 3/25  step 20/20" in lines[0]
    assert (
        "[job stopped: run nb2 at epoch 3/25, step 20/20; trainerd is not "
        in (lines[0])
    )
    assert "start it with" in lines[0]
    assert_no_rates(lines[0])


def test_plain_says_no_trainer_runs_when_the_daemon_is_idle(
    dirs, quick, capsys
) -> None:
    state, runtime = dirs
    stopped_run(state)
    daemon = FakeDaemon(runtime, None)
    try:
        code, lines, _ = plain(state, runtime, capsys)
    finally:
        daemon.close()

    assert code == 0
    assert lines[-1].endswith(
        "[job stopped: run nb2 at epoch 3/25, step 20/20; no trainer running]"
    )
    assert_no_rates(lines[-1])


def test_plain_follows_a_starting_job_until_the_daemon_says_it_stopped(
    dirs, quick, capsys
) -> None:
    state, runtime = dirs
    stopped_run(state)
    starting = daemon_job("nb2", "starting")
    stopped = daemon_job("nb2", "idle", outcome="stopped", reason="stop requested")
    # Asked at attach, then at each quiet check: starting twice, then stopped.
    daemon = FakeDaemon(runtime, starting, starting, starting, stopped)
    try:
        code, lines, _ = plain(state, runtime, capsys)
    finally:
        daemon.close()

    assert code == 0
    assert daemon.asked == 4
    assert any("run nb2  starting" in line for line in lines), lines
    assert (
        "[job stopped: run nb2 at epoch 3/25, step 20/20; stop requested]"
        in (lines[-1])
    )
    for line in lines:
        assert_no_rates(line)


def test_plain_keeps_the_exit_code_of_a_failed_job(dirs, quick, capsys) -> None:
    state, runtime = dirs
    stopped_run(state)
    daemon = FakeDaemon(runtime, daemon_job("nb2", "failed", reason="loss is NaN"))
    try:
        code, lines, err = plain(state, runtime, capsys)
    finally:
        daemon.close()

    assert code == 7
    assert "[job failed: run nb2: loss is NaN]" in lines[-1]
    assert err.strip() == "trainerctl watch: error: run nb2 failed: loss is NaN"


def test_plain_without_runs_or_daemon_is_a_one_line_error(dirs, quick, capsys) -> None:
    state, runtime = dirs

    code, lines, err = plain(state, runtime, capsys)

    assert code == 4
    assert lines == []
    assert err.startswith(
        "trainerctl watch: error: no run to watch; trainerd is not running"
    )
    assert "\n" not in err.strip()


def test_plain_without_runs_and_an_idle_daemon_says_so(dirs, quick, capsys) -> None:
    state, runtime = dirs
    daemon = FakeDaemon(runtime, None)
    try:
        code, lines, _ = plain(state, runtime, capsys)
    finally:
        daemon.close()

    assert code == 0
    assert lines[-1].endswith(
        "[no job running and no run yet; start one with 'trainerctl start -c CONFIG']"
    )


# -- the full-screen view in tmux ------------------------------------------------------


class Pane:
    """One tmux pane of 80x24 on a private tmux server."""

    def __init__(self) -> None:
        self.server = f"tdw{os.getpid()}"

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.server, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def start(self, command: str) -> None:
        # A shell around the command keeps the pane, and says how the command ended.
        # It then prints the terminal's line mode: watch must leave "icanon" set.
        script = (
            f"{command}; echo watch exited $?; stty -a | tr ' ' '\\n' | "
            f"grep -x -- '-\\?icanon'; exec sleep {DEADLINE_S * 10:.0f}"
        )
        self.tmux("new-session", "-d", "-s", "w", "-x", "80", "-y", "24", script)

    def capture(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "w")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


@pytest.fixture
def pane() -> Iterator[Pane]:
    if shutil.which("tmux") is None:
        pytest.skip(
            "tmux is not installed (apt-get install -y tmux): the full-screen view "
            "is tested inside a tmux pane"
        )
    pane = Pane()
    yield pane
    pane.close()


def watch_command(state: Path, runtime: Path) -> str:
    args = " ".join(watch_args(state, runtime))
    return f"env TERM=xterm-256color {TRAINERCTL} {args}"


def step_shown(screen: str) -> str | None:
    found = re.search(r"step (\d+)  lr", screen)
    return found.group(1) if found else None


def check_screen(
    pane: Pane, run: str, tick: Callable[[], None], *, timeout_s: float = DEADLINE_S
) -> str:
    """Waits for the run id, a validation row and a step count that moves."""

    def ready() -> str | None:
        tick()
        screen = pane.capture()
        ok = f"run {run}" in screen and VAL_ROW.search(screen) and step_shown(screen)
        return screen if ok else None

    first = wait_for(
        ready, what="the run, a validation row and a step count", timeout_s=timeout_s
    )
    assert max(len(line) for line in first.splitlines()) <= 80

    def moved() -> str | None:
        tick()
        screen = pane.capture()
        shown = step_shown(screen)
        return screen if shown and shown != step_shown(first) else None

    return wait_for(moved, what="the step count to move", timeout_s=timeout_s)


def detach(pane: Pane, key: str) -> str:
    """Sends `key`, waits for watch to exit 0, checks the terminal's mode is back."""
    pane.tmux("send-keys", "-t", "w", key)
    screen = wait_for(
        lambda: (lambda s: s if "icanon" in s else None)(pane.capture()),
        what="watch to exit",
    )
    assert "watch exited 0" in screen
    assert "icanon" in screen.splitlines()
    return screen


@pytest.mark.slow
def test_screen_view_in_tmux_follows_a_publisher(dirs, pane) -> None:
    state, runtime = dirs
    fake = FakeTrainer(runtime)
    try:
        fake.pub.send(b"val", val_record(1, 0.9, 0.625, 0.6, run="fake"))
        pane.start(watch_command(state, runtime))

        def tick() -> None:
            fake.tick()
            if fake.step % 20 == 0:  # the viewer may attach after the first val
                fake.pub.send(b"val", val_record(1, 0.9, 0.625, 0.6, run="fake"))

        screen = check_screen(pane, "fake", tick)
        assert "◀ best" in screen
        assert "producers" in screen

        screen = detach(pane, "q")
        assert "detached from run fake; the job keeps running" in screen
    finally:
        fake.close()


@pytest.mark.slow
def test_ctrl_c_detaches_and_restores_the_terminal(dirs, pane) -> None:
    state, runtime = dirs
    fake = FakeTrainer(runtime)
    try:
        pane.start(watch_command(state, runtime))
        wait_for(
            lambda: fake.tick() or "run fake" in pane.capture(),
            what="the live run on screen",
        )

        detach(pane, "C-c")
    finally:
        fake.close()


# -- a real job under the daemon -------------------------------------------------------


def trainerctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TRAINERCTL, *args], env=env, capture_output=True, text=True, timeout=60
    )


def job_status(env: dict[str, str]) -> dict[str, Any]:
    done = trainerctl(env, "status", "--json")
    try:
        return json.loads(done.stdout).get("job") or {}
    except ValueError:
        return {}


@pytest.fixture
def daemon(dirs) -> Iterator[dict[str, str]]:
    """A real trainerd on the temporary directories; stopped and reaped after."""
    state, runtime = dirs
    env = {
        **os.environ,
        "TRAINERD_STATE_DIR": str(state),
        "TRAINERD_RUNTIME_DIR": str(runtime),
    }
    log = open(state / "trainerd.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [TRAINERD],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (
                proc.poll() is not None or trainerctl(env, "status").returncode != 4
            ),
            what="trainerd to answer",
        )
        assert proc.poll() is None, (state / "trainerd.log").read_text()
        yield env
    finally:
        trainerctl(env, "stop", "--timeout", "30")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_screen_view_of_a_real_job_in_tmux(dirs, daemon, demo_corpus, pane) -> None:
    state, runtime = dirs
    config = {
        "name": "e2e",
        "corpus": str(demo_corpus),
        "data": {"length": 128, "batch_size": 64, "producers": 2, "ring_slots": 4},
        "model": {"preset": "default", "features": 32, "hidden": 32},
        "train": {
            "epochs": 200,
            "optimizer": "adamw",
            "lr": 0.003,
            "schedule": "constant",
            "device": "cpu",
            "threads": 1,
        },
        "checkpoint": {"every_minutes": 0},
        "metrics": {"flush_s": 0.5},
    }
    config_path = state / "e2e.yaml"
    config_path.write_text(yaml.safe_dump(config))
    started = trainerctl(daemon, "start", "-c", str(config_path))
    assert started.returncode == 0, started.stderr

    pane.start(watch_command(state, runtime))
    # Two cores shared with other work: epochs are short, the deadlines are not.
    screen = check_screen(pane, "e2e", lambda: None, timeout_s=JOB_DEADLINE_S)
    print(screen)  # the captured pane, for the record (pytest -s shows it)

    screen = detach(pane, "q")
    assert "detached from run e2e; the job keeps running" in screen
    job = job_status(daemon)
    assert job.get("running"), job
    step = job.get("global_step") or 0
    wait_for(
        lambda: (job_status(daemon).get("global_step") or 0) > step,
        what="the job to keep training after the viewer left",
        timeout_s=JOB_DEADLINE_S,
        poll_s=0.3,
    )
