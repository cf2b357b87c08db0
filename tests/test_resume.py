"""Exact resume: a stopped or killed run, resumed, equals an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from trainer_util import tiny_corpus, tiny_job

from trainerd.daemon.trainer_main import StopFlag, run_job
from trainerd.model import checkpoint as ckpt
from trainerd.producers.errors import CheckpointError

WAIT_S = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("tiny") / "corpus", n_train=80)


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class StopAfter(StopFlag):
    """Requests a stop once the loop has checked the flag `n` times."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.signal_name = "test"

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _trained(run: Path) -> list[tuple]:
    """(step, epoch, batch, ids) per step; a replayed step keeps its latest record.
    `resumed` markers are not steps."""
    by_step = {}
    for r in _records(run / "metrics.jsonl"):
        if "event" in r:
            continue
        by_step[r["step"]] = (r["step"], r["epoch"], r["batch"], r["ids"])
    return [by_step[s] for s in sorted(by_step)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_checkpoint(run / "checkpoints" / "last.pt")["model_state"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _reference(corpus: Path, root: Path, **overrides) -> Path:
    run = root / "reference"
    run_job(
        tiny_job(corpus, **overrides), run_dir=run, runtime_dir=root, in_process=True
    )
    return run


def test_stop_mid_epoch_then_resume_equals_an_uninterrupted_run(
    corpus: Path, short_dir: Path
):
    reference = _reference(corpus, short_dir)
    run = short_dir / "run"
    job = tiny_job(corpus)
    # The loop checks the flag once per batch: stop after 4 batches of epoch 1.
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True, stop=StopAfter(4))
    last = ckpt.read_checkpoint(run / "checkpoints" / "last.pt")
    assert last["cursor"] == {"epoch": 1, "batch": 4, "validated": False}
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True)
    assert _trained(run) == _trained(reference)
    _assert_same_weights(_weights(run), _weights(reference))
    assert [r["epoch"] for r in _records(run / "validation.jsonl")] == [1, 2]


def test_stop_during_validation_reruns_that_validation(corpus: Path, short_dir: Path):
    reference = _reference(corpus, short_dir)
    run = short_dir / "run"
    job = tiny_job(corpus)
    # 10 training batches, then stop after the first of 3 validation batches.
    run_job(
        job, run_dir=run, runtime_dir=short_dir, in_process=True, stop=StopAfter(12)
    )
    last = ckpt.read_checkpoint(run / "checkpoints" / "last.pt")
    assert last["cursor"] == {"epoch": 1, "batch": 10, "validated": False}
    assert _records(run / "validation.jsonl") == []
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True)
    ours = _records(run / "validation.jsonl")
    theirs = _records(reference / "validation.jsonl")
    assert [r["epoch"] for r in ours] == [1, 2]
    for a, b in zip(ours, theirs, strict=True):
        assert (a["accuracy"], a["confusion"]) == (b["accuracy"], b["confusion"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
    _assert_same_weights(_weights(run), _weights(reference))


def test_resume_refuses_a_changed_config_and_names_the_differences(
    corpus: Path, short_dir: Path
):
    run = short_dir / "run"
    job = tiny_job(corpus)
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True, stop=StopAfter(3))
    recorded = (run / "config.yaml").read_text()
    changed = tiny_job(corpus, train={"lr": 0.5}, data={"length": 80})
    with pytest.raises(CheckpointError) as err:
        run_job(changed, run_dir=run, runtime_dir=short_dir, in_process=True)
    message = str(err.value)
    assert "train.lr: 0.05 in the checkpoint, 0.5 now" in message
    assert "data.length: 64 in the checkpoint, 80 now" in message
    # The refused job leaves the run's recorded config as it was.
    assert (run / "config.yaml").read_text() == recorded
    # More epochs and other checkpoint settings are allowed.
    longer = tiny_job(corpus, train={"epochs": 3}, checkpoint={"keep_best": 1})
    run_job(longer, run_dir=run, runtime_dir=short_dir, in_process=True)
    assert [r["epoch"] for r in _records(run / "validation.jsonl")] == [1, 2, 3]


def test_resume_from_a_path_and_none(corpus: Path, short_dir: Path):
    run = short_dir / "run"
    job = tiny_job(corpus)
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True)
    saved = short_dir / "epoch1.pt"
    shutil.copy(run / "checkpoints" / "epoch-0001.pt", saved)
    other = short_dir / "other"
    run_job(
        job, run_dir=other, runtime_dir=short_dir, in_process=True, resume=str(saved)
    )
    assert [r["epoch"] for r in _records(other / "validation.jsonl")] == [2]
    _assert_same_weights(_weights(other), _weights(run))
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True, resume="none")
    # The new run's records alone; the old run's are kept beside its checkpoints.
    assert [r["epoch"] for r in _records(run / "validation.jsonl")] == [1, 2]
    steps = [r["step"] for r in _records(run / "metrics.jsonl")]
    assert steps == list(range(1, 21))  # 2 epochs of 10 batches
    (aside,) = run.glob("checkpoints.replaced-*")
    assert [r["epoch"] for r in _records(aside / "validation.jsonl")] == [1, 2]
    assert [r["step"] for r in _records(aside / "metrics.jsonl")] == steps
    assert (aside / "last.pt").is_file()


def _start_trainer(config: Path, run: Path, runtime: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "trainerd.daemon.trainer_main",
        "--config",
        str(config),
        "--run-dir",
        str(run),
        "--runtime-dir",
        str(runtime),
    ]
    # A file, not a pipe: nothing reads a pipe while the trainer runs, and a full
    # one would stall it.
    with open(runtime / "trainer.err", "ab") as log:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )


def _stderr(runtime: Path) -> str:
    return (runtime / "trainer.err").read_text(errors="replace")


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.05)


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _finish(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
def test_sigkill_after_batch_k_then_resume_trains_the_same_batches(
    corpus: Path, short_dir: Path
):
    overrides = {"checkpoint": {"every_steps": 2}, "train": {"epochs": 2}}
    reference = _reference(corpus, short_dir, **overrides)
    job = tiny_job(corpus, **overrides)
    config = short_dir / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    run = short_dir / "run"
    runtime = short_dir / "rt"
    runtime.mkdir()

    proc = _start_trainer(config, run, runtime)
    try:
        _wait_for(lambda: _steps_logged(run) >= 5, proc, "batch 5 of epoch 1")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        _finish(proc)
    cursor = ckpt.read_checkpoint(run / "checkpoints" / "last.pt")["cursor"]
    assert cursor["epoch"] == 1 and cursor["batch"] >= 4

    proc = _start_trainer(config, run, runtime)
    try:
        assert proc.wait(WAIT_S) == 0, _stderr(runtime)[-2000:]
    finally:
        _finish(proc)
    assert _trained(run) == _trained(reference)
    _assert_same_weights(_weights(run), _weights(reference))


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_0(
    corpus: Path, short_dir: Path
):
    job = tiny_job(corpus, train={"epochs": 50})
    config = short_dir / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    run = short_dir / "run"
    proc = _start_trainer(config, run, short_dir)
    try:
        _wait_for(lambda: _steps_logged(run) >= 3, proc, "batch 3")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        stderr = _stderr(short_dir)
    finally:
        _finish(proc)
    assert "stop requested: SIGTERM" in stderr
    last = ckpt.read_checkpoint(run / "checkpoints" / "last.pt")
    logged = _records(run / "metrics.jsonl")[-1]
    assert last["step"] == logged["step"]
    expected = (logged["epoch"], logged["batch"] + 1)
    assert (last["cursor"]["epoch"], last["cursor"]["batch"]) == expected
