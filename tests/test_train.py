"""The training step, the schedule, validation figures, metrics and a tiny run."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zmq
from trainer_util import tiny_corpus, tiny_job

from trainerd.daemon import trainer_main
from trainerd.daemon.trainer_main import config_differences, run_job
from trainerd.model import checkpoint as ckpt
from trainerd.model.config import TrainConfig
from trainerd.model.inprocess import local_stream
from trainerd.model.metrics import Confusion, JsonlWriter, Publisher, summarise
from trainerd.model.net import build_model
from trainerd.model.schedule import learning_rate
from trainerd.model.train import (
    Feeder,
    NonFiniteGuard,
    StepOutcome,
    evaluate,
    make_optimizer,
    train_step,
)
from trainerd.producers.corpus import Corpus
from trainerd.producers.errors import TrainingFailed
from trainerd.producers.plans import val_plan

LOSSES = Path(__file__).parent / "data" / "losses_tiny.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("tiny") / "corpus")


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() else child.rmdir()
    path.rmdir()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- schedule ---------------------------------------------------------------------


def test_step_schedule_halves_every_three_epochs():
    train = TrainConfig(lr=0.01, schedule="step", halve_every_epochs=3)
    rates = [learning_rate(train, epoch=e, step=0, total_steps=1) for e in range(1, 8)]
    assert rates == [0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.0025]


def test_cosine_warms_up_then_decays_to_zero():
    train = TrainConfig(lr=0.1, schedule="cosine", warmup_steps=10)
    rate = [learning_rate(train, epoch=1, step=s, total_steps=110) for s in range(111)]
    assert rate[0] == pytest.approx(0.01) and rate[9] == pytest.approx(0.1)
    assert rate[10] == pytest.approx(0.1) and rate[60] == pytest.approx(0.05)
    assert rate[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(rate[10:]))


# -- validation figures --------------------------------------------------------------


def test_summarise_by_hand():
    # true 0: 2 right, 1 as class 1; true 1: 1 right; true 2: 1 as class 0
    matrix = np.array([[2, 1, 0], [0, 1, 0], [1, 0, 0]])
    got = summarise(matrix, 2.5, label_names=["a", "b", "c"])
    assert got["samples"] == 5 and got["loss"] == 0.5
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["precision"] == [pytest.approx(2 / 3), 0.5, 0.0]
    assert got["recall"] == [pytest.approx(2 / 3), 1.0, 0.0]
    f1 = [2 / 3, 2 * 0.5 / 1.5, 0.0]
    assert got["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert got["confusion"] == matrix.tolist()


def test_confusion_accumulates_batches():
    c = Confusion(2)
    c.add(np.array([0, 1]), np.array([0, 0]), 1.0)
    c.add(np.array([1]), np.array([1]), 0.5)
    assert c.matrix.tolist() == [[1, 0], [1, 1]] and c.count == 3
    assert c.summary()["loss"] == pytest.approx(0.5)


# -- feeding and the step -----------------------------------------------------------


def test_codes_and_onehot_wires_give_the_same_input(corpus: Path):
    c = Corpus.open(corpus)
    job = tiny_job(corpus)
    plan = val_plan(c, job.data, run_id="t", seed=1, epoch=1, seq=0)
    feeder = Feeder(torch.device("cpu"), c.alphabet.size)
    got = {}
    for wire in ("onehot", "codes"):
        data = job.data.model_copy(update={"wire": wire})
        batch = next(local_stream(c, data, [plan]))
        got[wire] = feeder(batch)
    assert torch.equal(got["onehot"][0], got["codes"][0])
    assert torch.equal(got["onehot"][1], got["codes"][1])
    x = got["onehot"][0]
    assert x.shape == (8, c.alphabet.size, 64) and x.dtype == torch.float32
    assert set(x.sum(dim=1).unique().tolist()) <= {0.0, 1.0}


def test_non_finite_loss_is_not_stepped_on():
    torch.manual_seed(0)
    model = build_model(
        preset="default", n_classes=3, alphabet_size=5, length=16, features=8, hidden=8
    )
    optimizer = make_optimizer(model, TrainConfig(lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.full((4, 5, 16), math.nan)
    y = torch.zeros(4, dtype=torch.long)
    outcome = train_step(model, optimizer, x, y, lr=0.1, grad_clip=0, seed=1)
    assert outcome.skipped and math.isnan(outcome.loss)
    for name, tensor in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(tensor, before[name]), name


def test_guard_fails_after_n_in_a_row():
    guard = NonFiniteGuard(3)
    bad = StepOutcome(math.nan, 0, 4, 0.1, math.nan, skipped=True)
    good = StepOutcome(1.0, 2, 4, 0.1, 1.0, skipped=False)
    guard.check(bad, epoch=1, batch=0)
    guard.check(bad, epoch=1, batch=1)
    guard.check(good, epoch=1, batch=2)
    guard.check(bad, epoch=1, batch=3)
    guard.check(bad, epoch=1, batch=4)
    with pytest.raises(TrainingFailed, match="3 non-finite losses in a row"):
        guard.check(bad, epoch=1, batch=5)


def test_a_run_of_non_finite_losses_fails_without_a_checkpoint(
    corpus: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_step = trainer_main.train_step

    def poisoned(model, optimizer, x, y, **kw):
        return real_step(model, optimizer, x * math.nan, y, **kw)

    monkeypatch.setattr(trainer_main, "train_step", poisoned)
    job = tiny_job(corpus, train={"max_nonfinite": 3})
    with pytest.raises(TrainingFailed):
        run_job(job, run_dir=short_dir / "run", runtime_dir=short_dir, in_process=True)
    assert not list((short_dir / "run" / "checkpoints").glob("*.pt"))
    assert [r["skipped"] for r in _records(short_dir / "run" / "metrics.jsonl")] == [
        True
    ] * 3


# -- a tiny deterministic run --------------------------------------------------------


def test_tiny_run_losses_match_the_committed_file(corpus: Path, short_dir: Path):
    job = tiny_job(corpus)
    run_job(job, run_dir=short_dir / "run", runtime_dir=short_dir, in_process=True)
    losses = [r["loss"] for r in _records(short_dir / "run" / "metrics.jsonl")]
    if os.environ.get("TRAINERD_WRITE_LOSSES"):
        LOSSES.write_text(json.dumps({"losses": losses}, indent=0) + "\n")
    expected = json.loads(LOSSES.read_text())["losses"]
    assert len(losses) == len(expected) == 16
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-5)


def test_run_dir_holds_config_metrics_validation_and_checkpoints(
    corpus: Path, short_dir: Path
):
    job = tiny_job(corpus, train={"epochs": 3}, checkpoint={"keep_best": 2})
    run = short_dir / "run"
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.pt" in names and "best.pt" in names
    assert len([n for n in names if n.startswith("epoch-")]) == 2
    metrics = _records(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 25))
    for key in (
        "epoch", "loss", "accuracy", "lr", "samples_per_s", "data_wait_ms",
        "step_ms", "grad_norm", "ids", "batch", "n_batches",
    ):  # fmt: skip
        assert key in metrics[0]
    val = _records(run / "validation.jsonl")
    assert [r["epoch"] for r in val] == [1, 2, 3]
    assert val[0]["samples"] == 24 and len(val[0]["confusion"]) == 3
    best = ckpt.read_checkpoint(run / "checkpoints" / "best.pt")
    assert best["val"]["accuracy"] == max(r["accuracy"] for r in val)
    last = ckpt.read_checkpoint(run / "checkpoints" / "last.pt")
    assert last["cursor"] == {"epoch": 3, "batch": 8, "validated": True}
    assert (run / "config.yaml").read_text().startswith("name: tiny")
    # A finished run started again appends nothing and trains nothing.
    run_job(job, run_dir=run, runtime_dir=short_dir, in_process=True)
    assert len(_records(run / "metrics.jsonl")) == 24


@pytest.mark.slow
def test_validation_equals_a_single_process_evaluation(corpus: Path, short_dir: Path):
    job = tiny_job(corpus, train={"epochs": 2})
    run = short_dir / "run"
    run_job(job, run_dir=run, runtime_dir=short_dir)  # producers and rings
    record = _records(run / "validation.jsonl")[-1]

    payload = ckpt.read_checkpoint(run / "checkpoints" / "last.pt")
    model = ckpt.model_from_checkpoint(payload)
    c = Corpus.open(corpus)
    plan = val_plan(c, job.data, run_id="x", seed=job.train.seed, epoch=9, seq=0)
    feeder = Feeder(torch.device("cpu"), c.alphabet.size)
    confusion = evaluate(model, local_stream(c, job.data, [plan]), feeder, 3)
    figures = confusion.summary()
    assert figures["confusion"] == record["confusion"]
    assert figures["accuracy"] == record["accuracy"]
    assert figures["macro_f1"] == pytest.approx(record["macro_f1"], abs=1e-12)
    assert figures["loss"] == pytest.approx(record["loss"], abs=1e-6)


# -- resume refusal -----------------------------------------------------------------


def test_config_differences_ignore_what_may_change():
    old = {"train": {"lr": 0.01, "epochs": 2, "device": "cpu"}, "data": {"length": 64}}
    new = {"train": {"lr": 0.02, "epochs": 9, "device": "cuda"}, "data": {"length": 64}}
    assert config_differences(old, new) == [
        "train.lr: 0.01 in the checkpoint, 0.02 now"
    ]


# -- metrics file and socket --------------------------------------------------------


def test_jsonl_writer_appends_and_flushes_within_the_interval(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"old":1}\n')
    writer = JsonlWriter(path, flush_s=0.05)
    writer.write({"a": 1})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and path.read_text().count("\n") < 2:
        writer.tick()
    assert _records(path) == [{"old": 1}, {"a": 1}]
    writer.close()


def test_publisher_delivers_topics_and_never_blocks_on_a_slow_viewer(short_dir: Path):
    pub = Publisher(short_dir)
    ctx = zmq.Context()
    fast = ctx.socket(zmq.SUB)
    slow = ctx.socket(zmq.SUB)
    try:
        for sock in (fast, slow):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 10)
            sock.subscribe(b"")
            sock.connect(pub.address)
        # A SUB joins asynchronously: publish until the first message arrives.
        deadline = time.monotonic() + 10
        while not fast.poll(20):
            assert time.monotonic() < deadline, "subscriber never joined"
            pub.send(b"state", {"state": "starting"})
        topic, body = fast.recv_multipart()
        assert topic == b"state" and json.loads(body) == {"state": "starting"}
        started = time.monotonic()
        for i in range(20000):  # the slow viewer reads none of these
            pub.send(b"batch", {"step": i})
        assert time.monotonic() - started < 5
    finally:
        fast.close(0)
        slow.close(0)
        ctx.term()
        pub.close()
    assert not (short_dir / "metrics.sock").exists()


@pytest.mark.slow
def test_demo_trains_and_reports_accuracy_and_checkpoint(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from trainerd.daemon import demo

    monkeypatch.setenv("TRAINERD_STATE_DIR", str(short_dir / "state"))
    monkeypatch.setenv("TRAINERD_RUNTIME_DIR", str(short_dir / "rt"))
    monkeypatch.setattr(demo, "DEMO_POSTS", 600)
    assert demo.main(["--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "demo: final validation accuracy" in out
    best = short_dir / "state" / "runs" / "demo" / "checkpoints" / "best.pt"
    assert f"demo: checkpoints: {best} (best)" in out
    assert ckpt.read_checkpoint(best)["cursor"]["epoch"] == 1


def test_out_of_memory_ends_the_run_with_one_clear_line(corpus: Path, short_dir: Path):
    # A fully connected layer of 2**40 units asks the host for about 70 TB: a real
    # allocation failure from torch's CPU allocator, at model build.
    job = tiny_job(corpus, model={"hidden": 2**40})
    config = short_dir / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    run = short_dir / "run"
    done = subprocess.run(
        [
            sys.executable, "-m", "trainerd.daemon.trainer_main", "--config",
            str(config), "--run-dir", str(run), "--runtime-dir", str(short_dir),
            "--in-process",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == TrainingFailed.exit_code, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "error:" in x]
    assert "out of memory on cpu at epoch 1 batch 0" in line
    assert "data.batch_size 8, data.length 64, model.preset default" in line
    assert f"model.hidden {2**40}" in line and "lower the batch size" in line
    assert "DefaultCPUAllocator: can't allocate memory" in line
    assert "enforce fail" not in line
    assert not list((run / "checkpoints").glob("*.pt"))


def test_the_last_status_before_the_end_carries_the_last_validation(
    corpus: Path, short_dir: Path
):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RECONNECT_IVL, 10)
    sub.subscribe(b"")
    # Connected before the trainer binds: zmq keeps trying until it does.
    sub.connect(f"ipc://{short_dir / 'metrics.sock'}")
    try:
        job = tiny_job(corpus)
        run_job(job, run_dir=short_dir / "run", runtime_dir=short_dir, in_process=True)
        messages = []
        while sub.poll(1000):
            topic, body = sub.recv_multipart()
            messages.append((topic, json.loads(body)))
    finally:
        sub.close(0)
        ctx.term()
    end = next(
        i for i, (t, m) in enumerate(messages)
        if t == b"state" and m["state"] == "finished"
    )  # fmt: skip
    last = [m for t, m in messages[:end] if t == b"status"][-1]
    steps = [r["step"] for r in _records(short_dir / "run" / "metrics.jsonl")]
    assert last["last_val"]["epoch"] == job.train.epochs
    assert last["global_step"] == steps[-1]
    assert last["last_checkpoint"]["path"].endswith("last.pt")
