"""The trainer process: one job's training loop, from resume to the last checkpoint.

Run as `trainerd trainer --config RESOLVED_YAML --run-dir DIR --runtime-dir DIR
--resume auto|PATH|none` (the daemon starts it so), or call `run_job` in-process.

The loop consumes the pipeline's batches strictly in order: the training batches of
an epoch, then its validation batches, then the next epoch. The cursor it checkpoints
is the next batch not yet trained, (epoch, batch, validated); everything else about a
batch (its posts, its windows, its dropout) is derived from that position, so a
resumed run repeats an uninterrupted one exactly.

The trainer holds the run directory's lock (daemon/runlock.py) for its whole life,
so two trainers never write one run. metrics.jsonl is append-only: where training
restarts, a `resumed` record names the step it restarts from, and later records of
a higher step replace the earlier ones. `--resume none` moves the old run's
checkpoints and records into checkpoints.replaced-<time>/.

SIGTERM or SIGINT sets a flag: the current step finishes, a checkpoint is written,
the producers are stopped and the process exits 0. A second signal exits at once,
without a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from trainerd.daemon import output, runlock
from trainerd.daemon.config import JobConfig, load_config
from trainerd.model import checkpoint as ckpt
from trainerd.model.metrics import Confusion, JsonlWriter, Publisher
from trainerd.model.net import build_model, count_parameters, model_spec
from trainerd.model.schedule import learning_rate
from trainerd.model.train import (
    Feeder,
    NonFiniteGuard,
    autocast_dtype,
    cpu_threads,
    eval_batch,
    ids_digest,
    make_optimizer,
    resolve_device,
    step_seed,
    train_step,
    weights_finite,
)
from trainerd.producers.corpus import Corpus
from trainerd.producers.durable import atomic_file
from trainerd.producers.errors import (
    CheckpointError,
    CorpusError,
    PeerDiedError,
    RingError,
    TrainerdError,
    TrainingFailed,
    WaitTimeout,
)
from trainerd.producers.plans import Plan, train_plan, val_plan

log = logging.getLogger(__name__)

# Settings a resumed run may change: they do not alter what is trained.
RESUMABLE_CHANGES = (
    "name",
    "corpus",
    "train.epochs",
    "train.device",
    "train.precision",
    "train.threads",
    "data.producers",
    "data.ring_slots",
    "data.shm_dir",
    "data.wait_timeout_s",
    "data.wire",
    "model.init_from",
    "model.reinit_head",
    "checkpoint.",
    "metrics.",
)
STATUS_INTERVAL_S = 1.0
METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"


@dataclass
class Cursor:
    """The next batch not yet trained; `validated` says epoch `epoch` is complete."""

    epoch: int = 1
    batch: int = 0
    validated: bool = False

    def next_batch(self) -> tuple[int, int]:
        """(epoch, batch) of the next training batch."""
        if self.validated:
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "validated": self.validated}


class StopFlag:
    """Set by SIGTERM or SIGINT; a second signal ends the process at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        """Installs the handlers (main thread only)."""
        self._previous = {
            sig: signal.signal(sig, self._handle)
            for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def restore(self) -> None:
        """Puts back the handlers `install` replaced."""
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # The exception unwinds through the pipeline's context manager, so
            # producers and rings are still cleaned up; no checkpoint is written.
            raise SystemExit(128 + signum)
        self.requested = True
        self.signal_name = name


class TrainerRun:
    """One trainer process's share of a job: set up, loop, checkpoint, report."""

    def __init__(
        self,
        config: JobConfig,
        *,
        run_dir: Path,
        runtime_dir: Path,
        stop: StopFlag,
        in_process: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.runtime_dir = Path(runtime_dir)
        self.stop = stop
        self.in_process = in_process
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.corpus = Corpus.open(config.corpus)
        self.label_names = self.corpus.label_names
        self.alphabet = self.corpus.alphabet
        self.n_classes = len(self.label_names)
        if self.corpus.val_ids.size == 0:
            raise CorpusError(
                f"corpus {config.corpus}: no validation posts; import it again with "
                f"--val-fraction or --val"
            )
        self.n_train_batches = self._plan("train", 1).n_batches
        self.total_steps = self.n_train_batches * config.train.epochs
        self.cursor = Cursor()
        self.step = 0
        self.resumed_from: Path | None = None
        self.val: dict[str, Any] | None = None
        self.best_val: dict[str, Any] | None = None
        self.kept: list[dict[str, Any]] = []
        self.last_checkpoint: dict[str, Any] | None = None
        self.state = "starting"
        self.pipeline: Any = None
        self.samples_per_s = 0.0
        self.wait_share = 0.0

    # -- set-up ------------------------------------------------------------------

    def _plan(self, phase: str, epoch: int, *, seq: int = 0, start: int = 0) -> Plan:
        make = train_plan if phase == "train" else val_plan
        return make(
            self.corpus,
            self.config.data,
            run_id=self.config.name,
            seed=self.config.train.seed,
            epoch=epoch,
            seq=seq,
            start_batch=start,
        )

    def set_up(self, resume: str) -> None:
        """Chooses the device, builds the model and optimizer, and resumes."""
        train = self.config.train
        self.device = resolve_device(train.device)
        threads = cpu_threads(train.threads, producers=self.config.data.producers)
        torch.set_num_threads(threads)
        self.amp_dtype = autocast_dtype(train.precision, self.device)
        self.spec = model_spec(
            preset=self.config.model.preset,
            n_classes=self.n_classes,
            alphabet_size=self.alphabet.size,
            length=self.config.data.length,
            features=self.config.model.features,
            hidden=self.config.model.hidden,
            dropout=self.config.model.dropout,
        )
        torch.manual_seed(train.seed)
        self.model = build_model(**self.spec)
        self.optimizer = make_optimizer(self.model, train)
        source = self._resume_source(resume)
        if source is not None:
            self._restore(*source)
        elif self.config.model.init_from:
            self._init_from(self.config.model.init_from)
        self.model.to(self.device)
        _optimizer_to(self.optimizer, self.device)
        self.feeder = Feeder(self.device, self.alphabet.size)
        self.guard = NonFiniteGuard(train.max_nonfinite)
        log.info(
            "model built: %s, %d parameters, %d classes, frame %d, device %s, "
            "%d threads, %s",
            self.spec["preset"],
            count_parameters(self.model),
            self.n_classes,
            self.config.data.length,
            self.device,
            threads,
            "bf16 autocast" if self.amp_dtype else "float32",
        )

    def _resume_source(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        if resume == "none":
            self._set_history_aside()
            return None
        if resume == "auto":
            return ckpt.newest_valid(self.ckpt_dir)
        path = Path(resume)
        return path, ckpt.read_checkpoint(path)

    def _set_history_aside(self) -> None:
        """Moves the old run's checkpoints, metrics and validation records into
        checkpoints.replaced-<time>/, so that the new run's files hold it alone."""
        old = [
            self.run_dir / name
            for name in (METRICS_FILE, VALIDATION_FILE)
            if (self.run_dir / name).is_file()
        ]
        has_checkpoints = bool(ckpt.candidates(self.ckpt_dir))
        if not old and not has_checkpoints:
            return
        stamp = int(time.time())
        aside = self.run_dir / f"checkpoints.replaced-{stamp}"
        n = 1
        while aside.exists():
            aside = self.run_dir / f"checkpoints.replaced-{stamp}.{n}"
            n += 1
        if has_checkpoints:
            self.ckpt_dir.rename(aside)
            self.ckpt_dir.mkdir()
        else:
            aside.mkdir()
        for path in old:
            path.rename(aside / path.name)
        log.info(
            "history set aside: --resume none, old checkpoints and records in %s",
            aside,
        )

    def _restore(self, path: Path, payload: dict[str, Any]) -> None:
        self._check_matches(path, payload)
        self._warn_changed_epochs(payload)
        self.model.load_state_dict(payload["model_state"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.cursor = Cursor(**payload["cursor"])
        self.step = int(payload["step"])
        self.val = payload.get("val")
        self.best_val = payload.get("best_val")
        self.kept = list(payload.get("kept") or [])
        self.resumed_from = path
        log.info(
            "resumed from %s: epoch %d, next batch %d%s, step %d",
            path,
            self.cursor.epoch,
            self.cursor.batch,
            " (validated)" if self.cursor.validated else "",
            self.step,
        )

    def _check_matches(self, path: Path, payload: dict[str, Any]) -> None:
        differences = config_differences(
            payload["config"], self.config.model_dump(mode="json")
        )
        if payload["corpus_fingerprint"] != self.corpus.fingerprint:
            differences.insert(
                0,
                f"corpus fingerprint: {payload['corpus_fingerprint']} in the "
                f"checkpoint, {self.corpus.fingerprint} now",
            )
        if differences:
            raise CheckpointError(
                f"checkpoint {path} does not match this job; differences: "
                + "; ".join(differences)
                + ". Change them back, or start afresh with --resume none"
            )

    def _warn_changed_epochs(self, payload: dict[str, Any]) -> None:
        before = (payload.get("config") or {}).get("train", {}).get("epochs")
        train = self.config.train
        if before is None or before == train.epochs:
            return
        if train.schedule == "cosine":
            # The cosine rate is a function of the planned total steps.
            log.warning(
                "resume: train.epochs %s -> %d; the cosine schedule is stretched "
                "from step %d on, so this run differs from one planned with %d "
                "epochs",
                before,
                train.epochs,
                int(payload["step"]),
                train.epochs,
            )
        else:
            log.info(
                "resume: train.epochs %s -> %d (the %s schedule does not depend on it)",
                before,
                train.epochs,
                train.schedule,
            )

    def _init_from(self, source: str) -> None:
        payload = ckpt.read_checkpoint(source)
        fresh = ckpt.load_weights(
            self.model,
            payload,
            source=source,
            reinit_head=self.config.model.reinit_head,
        )
        log.info(
            "weights loaded from %s%s",
            source,
            f", re-initialised {', '.join(fresh)}" if fresh else "",
        )

    # -- the loop ----------------------------------------------------------------

    def plans(self) -> Iterator[Plan]:
        """Every plan from the cursor to the last epoch, lazily, in order."""
        seq = 0
        first = self.cursor
        for epoch in range(first.epoch, self.config.train.epochs + 1):
            if epoch == first.epoch and first.validated:
                continue
            start = first.batch if epoch == first.epoch else 0
            if start < self.n_train_batches:
                yield self._plan("train", epoch, seq=seq, start=start)
                seq += 1
            yield self._plan("val", epoch, seq=seq)
            seq += 1

    def open_stream(self) -> Any:
        """The pipeline (producers and rings), or in-process batches."""
        if self.in_process:
            from contextlib import nullcontext

            from trainerd.model.inprocess import local_stream

            stream = local_stream(self.corpus, self.config.data, self.plans())
            return nullcontext(), stream
        from trainerd.producers.pipeline import Pipeline

        self.pipeline = Pipeline(
            self.config.corpus,
            self.config.data,
            run_id=self.config.name,
            runtime_dir=self.runtime_dir,
        )
        # Status goes on while the trainer waits for data (a producer restarting).
        self.pipeline.on_wait = self._publish_status
        return self.pipeline, None

    def loop(
        self, metrics: JsonlWriter, validation: JsonlWriter, pub: Publisher
    ) -> str:
        """Trains until done or stopped; returns the end state."""
        self.metrics, self.validation, self.pub = metrics, validation, pub
        if self._done():
            log.info("run finished already: all %d epochs", self.config.train.epochs)
            return "finished"
        self._mark_resume()
        context, stream = self.open_stream()
        with context as pipeline:
            if stream is None:
                stream = pipeline.stream(self.plans())
            self._set_state("training")
            self.confusion: Confusion | None = None
            self._last_save = time.monotonic()
            self._last_status = 0.0
            self._tick = time.perf_counter()
            self._window = [0.0, 0.0, 0]  # wait s, total s, rows, for samples_per_s
            batches = iter(stream)
            while not self.stop.requested:
                waited = time.perf_counter()
                batch = next(batches, None)
                wait_s = time.perf_counter() - waited
                if batch is None:
                    break
                if batch.plan.phase == "train":
                    self._train_batch(batch, wait_s)
                else:
                    self._val_batch(batch)
                self._publish_status()
            if self.stop.requested:
                log.info("stop requested: %s", self.stop.signal_name)
                self._set_state("stopping")
                self.save("last")
                return "stopped"
        return "finished" if self._done() else "stopped"

    def _mark_resume(self) -> None:
        """Appends a `resumed` record to metrics.jsonl where training restarts.

        The file is append-only, so steps replayed after a crash appear twice; the
        marker tells readers that later records with a step above its `step`
        replace the earlier ones. A fresh start on an empty file needs none.
        """
        if self.resumed_from is None and not _has_records(self.metrics.path):
            return
        marker = {
            "event": "resumed",
            "run": self.config.name,
            "step": self.step,
            "epoch": self.cursor.epoch,
            "cursor": self.cursor.to_dict(),
            "checkpoint": None if self.resumed_from is None else str(self.resumed_from),
            "time": time.time(),
        }
        self.metrics.write(marker)
        # Live viewers drop the steps they showed beyond it, as file readers do.
        self.pub.send(b"batch", marker)

    def _done(self) -> bool:
        c = self.cursor
        return c.epoch >= self.config.train.epochs and c.validated

    def _train_batch(self, batch: Any, wait_s: float) -> None:
        plan, b = batch.plan, batch.index
        assert (plan.epoch, b) == self.cursor.next_batch(), (
            f"batch out of order: epoch {plan.epoch} batch {b}, cursor {self.cursor}"
        )
        if self.state != "training":
            self._set_state("training")
        self.model.train()
        started = time.perf_counter()
        digest, first_id = ids_digest(batch.ids[: batch.rows]), int(batch.ids[0])
        x, y = self.feeder(batch)
        lr = learning_rate(
            self.config.train,
            epoch=plan.epoch,
            step=self.step,
            total_steps=self.total_steps,
        )
        outcome = train_step(
            self.model,
            self.optimizer,
            x,
            y,
            lr=lr,
            grad_clip=self.config.train.grad_clip,
            seed=step_seed(self.config.train.seed, plan.epoch, b),
            amp_dtype=self.amp_dtype,
        )
        step_s = time.perf_counter() - started
        self.step += 1
        self.cursor = Cursor(plan.epoch, b + 1, False)
        self._record_batch(batch, outcome, wait_s, step_s, digest, first_id)
        self.guard.check(outcome, epoch=plan.epoch, batch=b)
        if self._checkpoint_due():
            self.save("last")

    def _record_batch(
        self,
        batch: Any,
        outcome: Any,
        wait_s: float,
        step_s: float,
        digest: str,
        first: int,
    ) -> None:
        now = time.perf_counter()
        window = self._window
        window[0] += wait_s
        window[1] += now - self._tick
        window[2] += outcome.rows
        self._tick = now
        if window[1] >= 1.0:
            self.samples_per_s = window[2] / window[1]
            self.wait_share = window[0] / window[1]
            window[:] = [0.0, 0.0, 0]
        elif not self.samples_per_s:
            self.samples_per_s = window[2] / max(window[1], 1e-9)
            self.wait_share = window[0] / max(window[1], 1e-9)
        record = {
            "run": self.config.name,
            "epoch": batch.plan.epoch,
            "step": self.step,
            "batch": batch.index,
            "n_batches": batch.plan.n_batches,
            "rows": outcome.rows,
            "loss": _finite_or_none(outcome.loss),
            "accuracy": outcome.correct / outcome.rows,
            "lr": outcome.lr,
            "samples_per_s": round(self.samples_per_s, 2),
            "data_wait_ms": round(wait_s * 1000, 3),
            "step_ms": round(step_s * 1000, 3),
            "grad_norm": _finite_or_none(outcome.grad_norm),
            "skipped": outcome.skipped,
            "ids": digest,
            "first_id": first,
            "time": time.time(),
        }
        self.metrics.write(record)
        self.pub.send(b"batch", record)
        if self.step % self.config.metrics.log_every_steps == 0:
            log.info(
                "epoch %d/%d batch %d/%d: loss %.4f acc %.3f lr %.3g, %.0f samples/s, "
                "data wait %.1f%%",
                batch.plan.epoch,
                self.config.train.epochs,
                batch.index + 1,
                batch.plan.n_batches,
                outcome.loss,
                record["accuracy"],
                outcome.lr,
                self.samples_per_s,
                100 * self.wait_share,
            )

    def _checkpoint_due(self) -> bool:
        policy = self.config.checkpoint
        if policy.every_steps and self.step % policy.every_steps == 0:
            return True
        minutes = (time.monotonic() - self._last_save) / 60
        return bool(policy.every_minutes) and minutes >= policy.every_minutes

    def _val_batch(self, batch: Any) -> None:
        plan = batch.plan
        if batch.index == 0 or self.confusion is None:
            self._set_state("validating")
            self.confusion = Confusion(self.n_classes)
            self._val_started = time.perf_counter()
        self.model.eval()
        x, y = self.feeder(batch)
        eval_batch(self.model, x, y, self.confusion, amp_dtype=self.amp_dtype)
        self.metrics.tick()
        if batch.index == plan.n_batches - 1:
            self._end_epoch(plan.epoch)

    def _end_epoch(self, epoch: int) -> None:
        assert self.confusion is not None
        seconds = time.perf_counter() - self._val_started
        figures = self.confusion.summary(self.label_names)
        self.confusion = None
        record = {
            "run": self.config.name,
            "epoch": epoch,
            "step": self.step,
            "time": time.time(),
            "seconds": round(seconds, 3),
            **figures,
        }
        self.validation.write(record)
        self.validation.flush(sync=True)
        self.pub.send(b"val", record)
        self.val = {k: record[k] for k in ("epoch", "loss", "accuracy", "macro_f1")}
        log.info(
            "epoch %d validated: loss %.4f accuracy %.4f macro-F1 %.4f (%d posts, %.1f s)",
            epoch,
            record["loss"],
            record["accuracy"],
            record["macro_f1"],
            record["samples"],
            seconds,
        )
        self.cursor = Cursor(epoch, self.n_train_batches, True)
        self._save_epoch(epoch)

    # -- checkpoints -------------------------------------------------------------

    def _score(self, val: dict[str, Any]) -> float:
        metric = self.config.checkpoint.best_metric
        value = val[metric]
        return -value if metric == "loss" else value

    def _save_epoch(self, epoch: int) -> None:
        assert self.val is not None
        score = self._score(self.val)
        is_best = self.best_val is None or score > self._score(self.best_val)
        if is_best:
            self.best_val = dict(self.val)
        keep = self.config.checkpoint.keep_best
        ranked = sorted([*self.kept, {"epoch": epoch, "score": score}], key=_rank)
        self.kept = ranked[:keep]
        kept_now = any(k["epoch"] == epoch for k in self.kept)
        last = self.save("last")
        if kept_now:
            ckpt.link_checkpoint(last, self.ckpt_dir / f"epoch-{epoch:04d}.pt")
        if is_best:
            ckpt.link_checkpoint(last, self.ckpt_dir / ckpt.BEST)
        for stale in ranked[keep:]:
            (self.ckpt_dir / f"epoch-{stale['epoch']:04d}.pt").unlink(missing_ok=True)

    def save(self, name: str) -> Path:
        """Writes checkpoints/<name>.pt with the current cursor; never non-finite ones."""
        if not weights_finite(self.model):
            raise TrainingFailed(
                f"training failed: non-finite weights at epoch {self.cursor.epoch} "
                f"batch {self.cursor.batch}; checkpoint not written, the last good "
                f"one is kept"
            )
        previous = self.state
        self._set_state("checkpointing")
        started = time.perf_counter()
        path = ckpt.write_checkpoint(self.ckpt_dir / f"{name}.pt", self.payload())
        self.metrics.flush()
        self._last_save = time.monotonic()
        self.last_checkpoint = {"path": str(path), "time": time.time()}
        log.info(
            "checkpoint written: %s at epoch %d batch %d (%.2f s)",
            path,
            self.cursor.epoch,
            self.cursor.batch,
            time.perf_counter() - started,
        )
        self._set_state(previous)
        return path

    def payload(self) -> dict[str, Any]:
        """Everything a checkpoint holds (see model.checkpoint)."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {
            "model": self.spec,
            "model_state": state,
            "alphabet": self.alphabet.to_dict(),
            "label_names": self.label_names,
            "length": self.config.data.length,
            "corpus_fingerprint": self.corpus.fingerprint,
            "config": self.config.model_dump(mode="json"),
            "optimizer": _optimizer_state_cpu(self.optimizer),
            "scheduler": {
                "schedule": self.config.train.schedule,
                "total_steps": self.total_steps,
            },
            "cursor": self.cursor.to_dict(),
            "step": self.step,
            "seed": self.config.train.seed,
            "val": self.val,
            "best_val": self.best_val,
            "kept": self.kept,
            "time": time.time(),
            "torch": str(torch.__version__),
        }

    # -- reporting ---------------------------------------------------------------

    def _set_state(self, state: str, reason: str | None = None) -> None:
        if state == self.state and reason is None:
            return
        self.state = state
        message: dict[str, Any] = {"run": self.config.name, "state": state}
        if reason:
            message["reason"] = reason
        if getattr(self, "pub", None) is not None:
            self.pub.send(b"state", message)

    def _publish_status(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_INTERVAL_S:
            return
        self._last_status = now
        self.metrics.tick()
        self.pub.send(b"status", self.status())

    def status(self) -> dict[str, Any]:
        """The once-a-second snapshot for the daemon and the dashboard."""
        producers = []
        if self.pipeline is not None:
            try:
                producers = self.pipeline.status()
            except Exception as err:  # a status query must never stop training
                log.debug("pipeline status unavailable: %s", err)
        return {
            "run": self.config.name,
            "state": self.state,
            "epoch": self.cursor.epoch,
            "epochs": self.config.train.epochs,
            "step": self.cursor.batch,
            "n_batches": self.n_train_batches,
            "global_step": self.step,
            "samples_per_s": round(self.samples_per_s, 2),
            "data_wait_share": round(self.wait_share, 5),
            "device": str(self.device),
            "config_name": self.config.name,
            "last_val": self.val,
            "best_val": self.best_val,
            "last_checkpoint": self.last_checkpoint,
            "producers": producers,
            "time": time.time(),
        }


def _has_records(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _rank(entry: dict[str, Any]) -> tuple[float, int]:
    # Higher score first; among equals the earlier epoch stays.
    return (-entry["score"], entry["epoch"])


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def _optimizer_state_cpu(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    state["state"] = {
        k: {
            n: t.detach().cpu() if isinstance(t, torch.Tensor) else t
            for n, t in v.items()
        }
        for k, v in state["state"].items()
    }
    return state


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's config and this one, as lines.

    Settings in RESUMABLE_CHANGES are ignored: they do not change what is trained.
    """
    before, after = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(before) | set(after)):
        if any(
            key == s or (s.endswith(".") and key.startswith(s))
            for s in RESUMABLE_CHANGES
        ):
            continue
        if before.get(key) != after.get(key):
            lines.append(
                f"{key}: {before.get(key)!r} in the checkpoint, {after.get(key)!r} now"
            )
    return lines


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "trainer.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def write_resolved_config(config: JobConfig, run_dir: Path) -> Path:
    """Writes the resolved config to runs/<run-id>/config.yaml."""
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    with atomic_file(path, "w") as f:
        f.write(text)
    return path


def run_job(
    config: JobConfig,
    *,
    run_dir: Path,
    runtime_dir: Path,
    resume: str = "auto",
    in_process: bool = False,
    stop: StopFlag | None = None,
) -> int:
    """Runs one job's training to its end or to a stop; returns 0.

    Raises a TrainerdError (after publishing the `failed` state) when the run cannot
    go on. `in_process` makes batches in this process instead of starting producers.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Before any checkpoint is read or record written: two trainers of one run
    # would interleave its metrics and overwrite each other's checkpoints.
    lock = runlock.acquire(run_dir, config.name)
    try:
        return _run_locked(
            config,
            run_dir=run_dir,
            runtime_dir=runtime_dir,
            resume=resume,
            in_process=in_process,
            stop=stop or StopFlag(),
        )
    finally:
        runlock.release(lock)


def _run_locked(
    config: JobConfig,
    *,
    run_dir: Path,
    runtime_dir: Path,
    resume: str,
    in_process: bool,
    stop: StopFlag,
) -> int:
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    handler = _attach_log(run_dir)
    pub = Publisher(Path(runtime_dir))
    metrics: JsonlWriter | None = None
    validation: JsonlWriter | None = None
    run: TrainerRun | None = None
    try:
        pub.send(b"state", {"run": config.name, "state": "starting"})
        run = TrainerRun(
            config,
            run_dir=run_dir,
            runtime_dir=runtime_dir,
            stop=stop,
            in_process=in_process,
        )
        run.pub = pub
        # Set up first: --resume none moves the old records aside, and a job its
        # checkpoint refuses leaves the run's config.yaml as it was.
        run.set_up(resume)
        write_resolved_config(config, run_dir)
        flush_s = config.metrics.flush_s
        metrics = JsonlWriter(run_dir / METRICS_FILE, flush_s=flush_s)
        validation = JsonlWriter(run_dir / VALIDATION_FILE, flush_s=flush_s)
        end = run.loop(metrics, validation, pub)
        # The last word on validation and checkpoints, before the final state.
        run._publish_status(force=True)
        final = "finished" if end == "finished" else "stopping"
        run._set_state(final)
        if end == "finished":
            metric = config.checkpoint.best_metric
            best = "none" if run.best_val is None else f"{run.best_val[metric]:.4f}"
            log.info(
                "run finished: %s, best %s %s (epoch %s), checkpoints in %s",
                config.name,
                metric,
                best,
                None if run.best_val is None else run.best_val["epoch"],
                run.ckpt_dir,
            )
        else:
            log.info(
                "run stopped: %s at epoch %d batch %d",
                config.name,
                run.cursor.epoch,
                run.cursor.batch,
            )
        return 0
    except (PeerDiedError, WaitTimeout, RingError) as err:
        # The model and cursor are still consistent: keep the work done so far.
        if run is not None and getattr(run, "metrics", None) is not None:
            with contextlib.suppress(TrainerdError):
                run.save("last")
        log.error("run failed: %s", err)
        pub.send(b"state", {"run": config.name, "state": "failed", "reason": str(err)})
        raise
    except TrainerdError as err:
        log.error("run failed: %s", err)
        pub.send(b"state", {"run": config.name, "state": "failed", "reason": str(err)})
        raise
    except (MemoryError, RuntimeError) as err:
        if run is None or not is_out_of_memory(err):
            raise
        failure = TrainingFailed(out_of_memory_message(err, config, run))
        log.error("run failed: %s", failure)
        pub.send(
            b"state", {"run": config.name, "state": "failed", "reason": str(failure)}
        )
        raise failure from err
    finally:
        for writer in (metrics, validation):
            if writer is not None:
                writer.close()
        pub.close()
        logging.getLogger().removeHandler(handler)
        handler.close()


def is_out_of_memory(err: BaseException) -> bool:
    """True for an allocation that failed on the device or the host."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text


def out_of_memory_message(
    err: BaseException, config: JobConfig, run: TrainerRun
) -> str:
    """One line: where memory ran out, with what frame, and what to change."""
    where = getattr(run, "device", "the host")  # set_up chooses the device
    at = f" at epoch {run.cursor.epoch} batch {run.cursor.batch}"
    data, model = config.data, config.model
    size = f"model.preset {model.preset}"
    for name in ("features", "hidden"):
        if getattr(model, name) is not None:
            size += f", model.{name} {getattr(model, name)}"
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    # torch's CPU allocator prefixes "[enforce fail at alloc_cpu.cpp:127] err == 0. "
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", first)
    return (
        f"out of memory on {where}{at} (data.batch_size {data.batch_size}, "
        f"data.length {data.length}, {size}): lower the batch size, the frame "
        f"length or the model's size; checkpoints already written are kept "
        f"({first})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The `trainerd trainer` role's flags."""
    parser = argparse.ArgumentParser(
        prog="trainerd trainer", description="Run one job's trainer in the foreground."
    )
    parser.add_argument("--config", required=True, help="resolved job config (YAML)")
    parser.add_argument("--run-dir", required=True, help="runs/<run-id>/ directory")
    parser.add_argument("--runtime-dir", required=True, help="where metrics.sock lives")
    parser.add_argument(
        "--resume", default="auto", help="auto (newest valid checkpoint), PATH or none"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="make batches in this process instead of starting producers",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the trainer role; a TrainerdError becomes one line and its code."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        # The output is a pipe to the daemon: losing it must not stop training.
        output.log_to_stderr(logging.INFO)
    stop = StopFlag()
    stop.install()
    try:
        config = load_config(args.config)
        return run_job(
            config,
            run_dir=Path(args.run_dir),
            runtime_dir=Path(args.runtime_dir),
            resume=args.resume,
            in_process=args.in_process,
            stop=stop,
        )
    except TrainerdError as err:
        output.say(f"trainerd trainer: error: {err}")
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
