"""The supervisor's decisions, with small stand-in trainers instead of the real one.

A stand-in is a few lines of Python that publish what a trainer would and exit the
way a trainer might: killed, with an error line and its exit code, or cleanly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from trainerd.daemon.states import ALLOWED, JobState, can_move
from trainerd.daemon.supervisor import Job, Supervisor
from trainerd.producers.errors import DaemonError


class StandIn(Supervisor):
    """A supervisor whose trainer is a script; each start runs the next one."""

    def __init__(self, scripts: list[str], **kw: Any) -> None:
        super().__init__(**kw)
        self.scripts = scripts
        self.starts = 0

    def command(self, job: Job, resume: str) -> list[str]:
        import sys

        script = self.scripts[min(self.starts, len(self.scripts) - 1)]
        self.starts += 1
        return [sys.executable, "-c", textwrap.dedent(script)]


KILLED = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
CHECKPOINTED_THEN_KILLED = """
    import os, pathlib, signal
    checkpoints = pathlib.Path("{run_dir}") / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "last.pt").write_bytes(b"")
    os.kill(os.getpid(), signal.SIGKILL)
"""
BAD_CHECKPOINT = """
    import sys
    print("trainerd trainer: error: checkpoint x.pt does not match this job")
    sys.exit(6)
"""
PUBLISHES = """
    import json, sys, time, zmq
    sock = zmq.Context().socket(zmq.PUB)
    sock.bind("ipc://{runtime}/metrics.sock")
    deadline = time.monotonic() + 20
    status = {{"run": "t", "state": "training", "epoch": 2, "epochs": 5, "step": 7,
              "n_batches": 10, "global_step": 17,
              "last_val": {{"epoch": 1, "accuracy": 0.5, "loss": 1.0}}}}
    while time.monotonic() < deadline:
        sock.send_multipart([b"status", json.dumps(status).encode()])
        time.sleep(0.05)
"""


@pytest.fixture
def dirs():
    root = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    (root / "run").mkdir(mode=0o700)
    from trainerd.producers.demo import write_demo_corpus

    write_demo_corpus(root / "corpus", n_posts=40)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def config(root: Path, **checkpoint: Any) -> dict[str, Any]:
    return {"name": "t", "corpus": str(root / "corpus"), "checkpoint": checkpoint}


def supervise(sup: Supervisor, until: JobState, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while sup.job.state != until:
        assert time.monotonic() < deadline, f"still {sup.job.state}"
        if sup.metrics.poll(20):
            sup.on_metrics()
        sup.on_output()
        sup.tick()


def make(scripts: list[str], root: Path, context: zmq.Context) -> StandIn:
    return StandIn(
        scripts, context=context, runtime_dir=root / "run", state_dir=root / "state"
    )


def test_restarts_are_bounded_then_the_job_fails_with_the_reason(dirs, context):
    sup = make([KILLED], dirs, context)
    try:
        sup.start(config(dirs, max_restarts=2, restart_window_min=5))
        supervise(sup, JobState.FAILED)
        assert sup.starts == 3
        assert sup.job.restarts == 2
        assert sup.job.reason == (
            "trainer died 3 times within 5 min (checkpoint.max_restarts is 2); "
            "last: killed by signal 9 (SIGKILL): no output"
        )
        assert sup.status_line() == f"failed run t: {sup.job.reason}"
        snapshot = sup.snapshot()["job"]
        assert (snapshot["state"], snapshot["running"]) == ("failed", False)
    finally:
        sup.close()


def test_a_final_error_fails_at_once(dirs, context):
    sup = make([BAD_CHECKPOINT], dirs, context)
    try:
        sup.start(config(dirs))
        supervise(sup, JobState.FAILED)
        assert sup.starts == 1
        assert sup.job.exit_code == 6
        assert sup.job.reason == (
            "trainer exit code 6: checkpoint x.pt does not match this job"
        )
    finally:
        sup.close()


def recording(sup: Supervisor) -> list[str]:
    """The resume policy of each trainer the supervisor starts, in order."""
    resumes = []
    command = sup.command

    def record(job: Job, resume: str) -> list[str]:
        resumes.append(resume)
        return command(job, resume)

    sup.command = record
    return resumes


def test_a_restarted_trainer_resumes_automatically(dirs, context):
    run_dir = dirs / "state" / "runs" / "t"
    sup = make(
        [CHECKPOINTED_THEN_KILLED.format(run_dir=run_dir), "pass"], dirs, context
    )
    resumes = recording(sup)
    try:
        sup.start(config(dirs), resume="none")
        supervise(sup, JobState.FINISHED)
        assert resumes == ["none", "auto"]
        assert sup.job.restarts == 1
    finally:
        sup.close()


def test_a_trainer_dead_before_its_first_checkpoint_keeps_the_policy(dirs, context):
    # --resume PATH must not turn into a fresh start because no checkpoint of the
    # run exists yet.
    init = dirs / "init.pt"
    init.write_bytes(b"")
    sup = make([KILLED, "pass"], dirs, context)
    resumes = recording(sup)
    try:
        sup.start(config(dirs), resume=str(init))
        supervise(sup, JobState.FINISHED)
        assert resumes == [str(init), str(init)]
    finally:
        sup.close()


def test_status_follows_the_trainer_and_one_job_at_a_time(dirs, context):
    sup = make([PUBLISHES.format(runtime=dirs / "run")], dirs, context)
    try:
        sup.start(config(dirs))
        supervise(sup, JobState.TRAINING)
        deadline = time.monotonic() + 10
        while sup.status_line() != (
            "training run t: epoch 2/5, step 7/10, val acc 0.500"
        ):
            assert time.monotonic() < deadline, sup.status_line()
            if sup.metrics.poll(20):
                sup.on_metrics()
        with pytest.raises(DaemonError, match="run t is already training"):
            sup.start(config(dirs))
        sup.stop(now=True)
        supervise(sup, JobState.IDLE)
        assert sup.job.outcome == "stopped"
        assert not (dirs / "run" / "metrics.sock").exists()
        assert json.dumps(sup.snapshot())  # status stays plain JSON
    finally:
        sup.close()


def test_every_state_has_its_moves():
    assert set(ALLOWED) == set(JobState)
    assert can_move(JobState.TRAINING, JobState.STARTING)
    assert not can_move(JobState.IDLE, JobState.TRAINING)
    assert not can_move(JobState.STOPPING, JobState.TRAINING)
    assert {s for s in JobState if s.running} == {
        JobState.STARTING,
        JobState.TRAINING,
        JobState.VALIDATING,
        JobState.CHECKPOINTING,
        JobState.STOPPING,
    }
