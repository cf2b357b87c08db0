"""Shared pieces of the dashboard's tests: trainer-format records and a run's files.

The records have the fields and shapes daemon/trainer_main.py publishes and writes.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import yaml
import zmq

from trainerd.daemon.control import ControlServer

NOW = 1_800_000_000.0


def batch_record(
    *,
    run: str = "demo",
    epoch: int = 2,
    step: int,
    batch: int,
    n_batches: int = 500,
    loss: float | None = 0.5,
    accuracy: float = 0.75,
    time: float,
    data_wait_ms: float = 1.0,
    step_ms: float = 99.0,
) -> dict[str, Any]:
    """One line of metrics.jsonl / one `batch` message."""
    return {
        "run": run,
        "epoch": epoch,
        "step": step,
        "batch": batch,
        "n_batches": n_batches,
        "rows": 32,
        "loss": loss,
        "accuracy": accuracy,
        "lr": 0.01,
        "samples_per_s": 812.0,
        "data_wait_ms": data_wait_ms,
        "step_ms": step_ms,
        "grad_norm": 1.5,
        "skipped": loss is None,
        "ids": "0123abcd",
        "first_id": 7,
        "time": time,
    }


def val_record(
    epoch: int, loss: float, accuracy: float, macro_f1: float, *, run: str = "demo"
) -> dict[str, Any]:
    """One line of validation.jsonl / one `val` message."""
    return {
        "run": run,
        "epoch": epoch,
        "step": epoch * 500,
        "time": NOW - 1000 + epoch,
        "seconds": 4.2,
        "samples": 800,
        "loss": loss,
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "precision": [0.5, 0.5],
        "recall": [0.5, 0.5],
        "labels": ["a", "b"],
        "confusion": [[200, 200], [200, 200]],
    }


def producers(n: int = 4, *, restarted: int | None = None) -> list[dict[str, Any]]:
    """Pipeline.status() of `n` producers."""
    return [
        {
            "id": i,
            "pid": 4100 + i,
            "state": "running",
            "restarts": 2 if i == restarted else 0,
            "fill": 3,
            "slots": 4,
        }
        for i in range(n)
    ]


def status_record(
    *,
    run: str = "demo",
    state: str = "training",
    epoch: int = 2,
    epochs: int = 5,
    step: int = 400,
    n_batches: int = 500,
    global_step: int = 900,
    time: float = NOW,
    checkpoint_time: float | None = NOW - 75,
    n_producers: int = 4,
) -> dict[str, Any]:
    """One `status` message."""
    return {
        "run": run,
        "state": state,
        "epoch": epoch,
        "epochs": epochs,
        "step": step,
        "n_batches": n_batches,
        "global_step": global_step,
        "samples_per_s": 812.0,
        "data_wait_share": 0.012,
        "device": "cuda:0",
        "config_name": run,
        "last_val": None,
        "best_val": None,
        "last_checkpoint": None
        if checkpoint_time is None
        else {"path": f"/s/runs/{run}/checkpoints/last.pt", "time": checkpoint_time},
        "producers": producers(n_producers),
        "time": time,
    }


def write_run(
    state_dir: Path,
    run: str,
    *,
    epochs: int,
    validations: list[dict[str, Any]],
    n_batches: int = 20,
    best_metric: str = "accuracy",
) -> Path:
    """A run directory as the trainer leaves it: config, metrics, validation."""
    folder = state_dir / "runs" / run
    folder.mkdir(parents=True)
    config = {
        "name": run,
        "corpus": "/nowhere",
        "train": {"epochs": epochs, "device": "cpu"},
        "checkpoint": {"best_metric": best_metric},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with open(folder / "metrics.jsonl", "w") as file:
        step = 0
        for epoch in range(1, len(validations) + 1):
            for b in range(n_batches):
                step += 1
                record = batch_record(
                    run=run,
                    epoch=epoch,
                    step=step,
                    batch=b,
                    n_batches=n_batches,
                    loss=1.0 / step,
                    time=NOW - 5000 + step,
                )
                file.write(json.dumps(record) + "\n")
    with open(folder / "validation.jsonl", "w") as file:
        for record in validations:
            file.write(json.dumps({**record, "run": run}) + "\n")
    return folder


def daemon_job(
    run: str, state: str, *, outcome: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """The `job` of the daemon's status reply, with the fields watch reads."""
    from trainerd.daemon.states import JobState

    return {
        "run": run,
        "state": state,
        "running": JobState(state).running,
        "outcome": outcome,
        "reason": reason,
    }


class FakeDaemon:
    """Answers `status` on the control socket from a thread, as trainerd would.

    `jobs` are the replies' jobs in turn; the last one is repeated. `asked` counts
    the status requests.
    """

    def __init__(self, runtime: Path, *jobs: dict[str, Any] | None) -> None:
        self.jobs = list(jobs) or [None]
        self.asked = 0
        self.ready = threading.Event()
        self.done = threading.Event()
        self.runtime = runtime
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the fake daemon did not bind"

    def _handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs[min(self.asked, len(self.jobs) - 1)]
        self.asked += 1
        daemon = {"pid": os.getpid(), "uptime_s": 1.0, "runtime_dir": str(self.runtime)}
        return {"daemon": daemon, "job": job}

    def _serve(self) -> None:
        context = zmq.Context()
        server = ControlServer(context, self.runtime)
        try:
            self.ready.set()
            poller = zmq.Poller()
            for sock in server.sockets:
                poller.register(sock, zmq.POLLIN)
            while not self.done.is_set():
                for sock, _ in poller.poll(20):
                    server.serve(sock, self._handle)
        finally:
            server.close()
            context.term()

    def close(self) -> None:
        """Stops answering and removes the socket."""
        self.done.set()
        self.thread.join(10)
