"""A run's history across restarts: resume markers, --resume none, changed epochs.

metrics.jsonl is append-only, so after a crash the steps between the checkpoint
and the crash appear twice; the trainer marks each resume with a `resumed` record
so that readers know later records with a higher step replace earlier ones.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_resume import StopAfter
from trainer_util import tiny_corpus, tiny_job

from trainerd.daemon.supervisor import _last_batch
from trainerd.daemon.trainer_main import run_job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 80 training posts in batches of 8: 10 steps an epoch.
    return tiny_corpus(tmp_path_factory.mktemp("tiny") / "corpus", n_train=80)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def replayed(rows: list[dict]) -> list[int]:
    """The steps behind the final weights, read as the marker says."""
    kept: list[int] = []
    for row in rows:
        if row.get("event") == "resumed":
            kept = [s for s in kept if s <= row["step"]]
        else:
            kept.append(row["step"])
    return kept


def test_each_resume_is_marked_where_training_restarts(corpus: Path, root: Path):
    run = root / "run"
    job = tiny_job(corpus)
    run_job(job, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(4))
    early = root / "early.pt"
    shutil.copy(run / "checkpoints" / "last.pt", early)
    run_job(job, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(3))
    # A crash that lost the newer checkpoint: steps 5..7 are trained again.
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    shutil.copy(early, run / "checkpoints" / "last.pt")
    run_job(job, run_dir=run, runtime_dir=root, in_process=True)

    rows = records(run / "metrics.jsonl")
    markers = [i for i, row in enumerate(rows) if "event" in row]
    assert markers == [4, 8]
    for i in markers:
        assert rows[i]["event"] == "resumed"
        assert rows[i]["run"] == "tiny"
        assert (rows[i]["step"], rows[i]["epoch"]) == (4, 1)
        assert rows[i]["cursor"] == {"epoch": 1, "batch": 4, "validated": False}
        assert rows[i]["checkpoint"] == str(run / "checkpoints" / "last.pt")
        assert rows[i + 1]["step"] == 5
    assert [row.get("step") for row in rows[:8]] == [1, 2, 3, 4, 4, 5, 6, 7]
    assert replayed(rows) == list(range(1, 21))
    # A finished run started again trains nothing and marks nothing.
    run_job(job, run_dir=run, runtime_dir=root, in_process=True)
    assert len(records(run / "metrics.jsonl")) == len(rows)


def test_a_fresh_start_over_old_records_is_marked_at_step_0(corpus: Path, root: Path):
    run = root / "run"
    job = tiny_job(corpus)
    run_job(job, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(3))
    # Died before its first checkpoint: the next trainer starts at step 1.
    shutil.rmtree(run / "checkpoints")
    run_job(job, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(2))
    rows = records(run / "metrics.jsonl")
    assert [row.get("event") for row in rows] == [None] * 3 + ["resumed"] + [None] * 2
    assert (rows[3]["step"], rows[3]["checkpoint"]) == (0, None)
    assert replayed(rows) == [1, 2]


def test_the_supervisor_reads_past_a_marker(root: Path):
    path = root / "metrics.jsonl"
    batch = {"epoch": 2, "batch": 3, "step": 13, "loss": 0.5}
    marker = {"event": "resumed", "step": 13, "epoch": 2, "checkpoint": "x"}
    path.write_text(json.dumps(batch) + "\n" + json.dumps(marker) + "\n")
    assert _last_batch(path) == {"epoch": 2, "step": 4, "global_step": 13}


def test_resume_none_sets_the_old_records_aside(corpus: Path, root: Path):
    run = root / "run"
    job = tiny_job(corpus)
    run_job(job, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(14))
    old_metrics = (run / "metrics.jsonl").read_text()
    old_val = (run / "validation.jsonl").read_text()
    assert [row["epoch"] for row in records(run / "validation.jsonl")] == [1]
    run_job(
        job,
        run_dir=run,
        runtime_dir=root,
        in_process=True,
        resume="none",
        stop=StopAfter(2),
    )
    (aside,) = run.glob("checkpoints.replaced-*")
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert (aside / "validation.jsonl").read_text() == old_val
    assert (aside / "last.pt").is_file()
    assert [row["step"] for row in records(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "validation.jsonl").read_text()
    # Set aside twice within one second: a second folder, nothing overwritten.
    run_job(
        job,
        run_dir=run,
        runtime_dir=root,
        in_process=True,
        resume="none",
        stop=StopAfter(1),
    )
    assert len(list(run.glob("checkpoints.replaced-*"))) == 2


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_more_epochs_on_resume_warns_when_the_schedule_depends_on_them(
    corpus: Path, root: Path, caplog: pytest.LogCaptureFixture, schedule: str
):
    caplog.set_level(logging.INFO, logger="trainerd.daemon.trainer_main")
    run = root / "run"
    job = tiny_job(corpus, train={"schedule": schedule})
    run_job(job, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(4))
    longer = tiny_job(corpus, train={"schedule": schedule, "epochs": 3})
    caplog.clear()
    run_job(longer, run_dir=run, runtime_dir=root, in_process=True, stop=StopAfter(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if schedule == "cosine":
        assert warnings == [
            "resume: train.epochs 2 -> 3; the cosine schedule is stretched from "
            "step 4 on, so this run differs from one planned with 3 epochs"
        ]
    else:
        assert warnings == []
        assert (
            "resume: train.epochs 2 -> 3 (the step schedule does not depend on it)"
            in caplog.text
        )
