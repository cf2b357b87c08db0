"""One trainer per run: the run directory's lock.

A trainer holds runs/<run>/.lock for its whole life. A second trainer of the same
run (another daemon, another runtime directory) waits a little, then exits with a
one-line error naming the holder; a daemon refuses such a job before it writes
anything into the run directory. The first trainer never notices. Every wait has a
deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from trainer_util import tiny_corpus, tiny_job

from trainerd.daemon import runlock
from trainerd.daemon.supervisor import FINAL_EXIT_CODES
from trainerd.producers.errors import DaemonError

DEADLINE_S = 60.0


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S:g} s"
        time.sleep(0.05)


def busy(run: str, pid: int, run_dir: Path) -> str:
    return (
        f"run {run} is being trained by pid {pid} (lock {run_dir / '.lock'}); stop "
        "that job first"
    )


# The lock itself.


def test_a_held_lock_names_its_holder(root: Path):
    fd = runlock.acquire(root, "r1", wait=0)
    try:
        assert (root / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(DaemonError) as err:
            runlock.acquire(root, "r1", wait=0)
        assert str(err.value) == busy("r1", os.getpid(), root)
        assert err.value.exit_code in FINAL_EXIT_CODES
        with pytest.raises(DaemonError):
            runlock.check_free(root, "r1")
    finally:
        runlock.release(fd)
    runlock.check_free(root, "r1")
    runlock.release(runlock.acquire(root, "r1", wait=0))


def test_a_waiting_trainer_gets_the_lock_once_it_is_given_up(
    root: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="trainerd.daemon.runlock")
    held = runlock.acquire(root, "r1", wait=0)
    got: list[int] = []
    waiter = threading.Thread(
        target=lambda: got.append(runlock.acquire(root, "r1", wait=DEADLINE_S))
    )
    waiter.start()
    try:
        wait_until(lambda: "run lock busy" in caplog.text, "wait for the lock")
    finally:
        runlock.release(held)
        waiter.join(DEADLINE_S)
    assert len(got) == 1
    runlock.release(got[0])


# Real trainers.


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line)["step"])
    return steps


def trainer(
    config: Path, run_dir: Path, runtime: Path, log: Path, **env: str
) -> subprocess.Popen:
    runtime.mkdir(exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainerd.daemon.trainer_main",
                "--config",
                str(config),
                "--run-dir",
                str(run_dir),
                "--runtime-dir",
                str(runtime),
                "--in-process",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )


@pytest.mark.slow
def test_a_second_trainer_of_a_training_run_is_refused(root: Path):
    corpus = tiny_corpus(root / "corpus", n_train=80)
    job = tiny_job(corpus, name="nb2", train={"epochs": 500})
    config = root / "same.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    state = root / "state"
    run_dir = state / "runs" / "nb2"
    first = trainer(config, run_dir, root / "r1", root / "first.log")
    try:
        wait_until(lambda: len(metrics_steps(run_dir)) >= 3, "steps of the first")

        # Another trainer of the same run: it waits briefly, then gives up.
        second = trainer(
            config,
            run_dir,
            root / "r2",
            root / "second.log",
            TRAINERD_LOCK_WAIT_S="0.5",
        )
        assert second.wait(DEADLINE_S) == DaemonError.exit_code
        lines = (root / "second.log").read_text().splitlines()
        assert lines[-1] == "trainerd trainer: error: " + busy(
            "nb2", first.pid, run_dir
        )
        assert "Traceback" not in "\n".join(lines)

        # A foreground daemon on another runtime directory refuses the job.
        job_file = run_dir / "job.yaml"
        env = dict(
            os.environ,
            TRAINERD_STATE_DIR=str(state),
            TRAINERD_RUNTIME_DIR=str(root / "r3"),
        )
        for key in ("NOTIFY_SOCKET", "TRAINERD_CONTROL", "WATCHDOG_USEC"):
            env.pop(key, None)
        started = time.monotonic()
        command = ["start", "--foreground", "-c", str(config)]
        done = subprocess.run(
            [sys.executable, "-m", "trainerd.daemon.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        assert done.returncode == DaemonError.exit_code, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            "trainerctl start: error: " + busy("nb2", first.pid, run_dir)
        )
        assert time.monotonic() - started < 30
        assert not job_file.exists()

        # The first trainer never noticed.
        seen = len(metrics_steps(run_dir))
        wait_until(lambda: len(metrics_steps(run_dir)) >= seen + 3, "more steps")
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(DEADLINE_S) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    steps = metrics_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))
    assert "stop requested: SIGTERM" in (root / "first.log").read_text()
