"""A reader that goes away: `trainerctl ... | head` must neither print a traceback
nor end a job. The closed pipe's read end is shut before (or while) the command
writes, so every write after it fails with EPIPE."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from trainer_util import tiny_corpus, tiny_job

from trainerd.model.checkpoint import read_checkpoint

DEADLINE_S = 120.0


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def environment(root: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(root / "state"),
        TRAINERD_RUNTIME_DIR=str(root / "run"),
    )
    for key in ("NOTIFY_SOCKET", "TRAINERD_CONTROL", "WATCHDOG_USEC"):
        env.pop(key, None)
    return env


def run_into_closed_pipe(
    command: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess:
    """Runs `command` with stdout a pipe nobody reads any more."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            command,
            env=env,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=DEADLINE_S,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_status_into_a_closed_pipe_exits_quietly(root: Path, flags: list[str]):
    done = run_into_closed_pipe(
        [sys.executable, "-m", "trainerd.daemon.cli", "status", *flags],
        environment(root),
    )
    assert done.stderr == ""
    assert done.returncode == 0


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir / "metrics.jsonl") if "event" not in r]


def test_a_trainer_whose_output_is_gone_trains_on(root: Path):
    corpus = tiny_corpus(root / "corpus", n_train=80)
    job = tiny_job(corpus, metrics={"log_every_steps": 1})
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    run_dir = root / "runs" / "tiny"
    (root / "rt").mkdir()
    args = ["--config", str(config), "--run-dir", str(run_dir)]
    args += ["--runtime-dir", str(root / "rt"), "--in-process"]
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trainerd.daemon.trainer_main", *args],
            stdout=write,
            stderr=write,
            timeout=DEADLINE_S,
        )
    finally:
        os.close(write)
    assert done.returncode == 0
    assert steps(run_dir) == list(range(1, 21))
    assert "run finished: tiny" in (run_dir / "trainer.log").read_text()


@pytest.mark.slow
def test_a_foreground_job_whose_reader_leaves_trains_to_the_end(root: Path):
    from trainerd.producers.demo import write_demo_corpus

    corpus = write_demo_corpus(root / "corpus", n_posts=200, val_fraction=0.2)
    config = root / "job.yaml"
    config.write_text(
        f"name: fg\ncorpus: {corpus}\n"
        "data: {length: 128, batch_size: 16, producers: 2, ring_slots: 3}\n"
        "model: {preset: default, features: 16, hidden: 16}\n"
        "train: {epochs: 3, seed: 7, optimizer: adamw, lr: 0.003, threads: 1}\n"
        "checkpoint: {every_steps: 4}\n"
        "metrics: {flush_s: 0.2, log_every_steps: 1}\n"
    )
    env = environment(root)
    # `trainerctl start --foreground -c job.yaml 2>&1 | head`: the reader leaves
    # after the first training line; the daemon relays a line per step after it.
    command = ["start", "--foreground", "-c", str(config)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainerd.daemon.cli", *command],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if b"epoch 1/3 batch" in line:
                break
        assert any(b"epoch 1/3 batch" in line for line in seen), seen
        proc.stdout.close()
        assert proc.wait(DEADLINE_S) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    run_dir = root / "state" / "runs" / "fg"
    n = len(steps(run_dir))
    assert n >= 3 * 8 and steps(run_dir) == list(range(1, n + 1))
    validated = [r["epoch"] for r in records(run_dir / "validation.jsonl")]
    assert validated == [1, 2, 3]
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["cursor"]["epoch"] == 3 and last["cursor"]["validated"]
    assert "run finished: fg" in (run_dir / "trainer.log").read_text()
