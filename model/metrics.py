"""Validation figures, the per-batch metrics file, and the live metrics socket.

Validation figures come from one confusion matrix: accuracy, macro-F1, per-class
precision and recall. Per-batch records go to metrics.jsonl, appended, handed to the
OS as they are written and synced to disk at least every `flush_s`. Live viewers subscribe to
a ZeroMQ PUB socket; its send high-water mark drops messages for a slow viewer
instead of ever blocking training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq

log = logging.getLogger(__name__)

TOPICS = (b"batch", b"val", b"state", b"status")
SEND_HWM = 100


class Confusion:
    """Accumulates a confusion matrix (rows: true class, columns: predicted) and loss."""

    def __init__(self, n_classes: int) -> None:
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
        self.loss_sum = 0.0
        self.count = 0

    def add(self, labels: np.ndarray, predicted: np.ndarray, loss_sum: float) -> None:
        """Adds one batch: true labels, predicted labels, summed (not mean) loss."""
        n = self.matrix.shape[0]
        flat = labels.astype(np.int64) * n + predicted.astype(np.int64)
        self.matrix += np.bincount(flat, minlength=n * n).reshape(n, n)
        self.loss_sum += float(loss_sum)
        self.count += int(labels.size)

    def summary(self, label_names: list[str] | None = None) -> dict[str, Any]:
        """Loss, accuracy, macro-F1, per-class precision and recall, the matrix."""
        return summarise(self.matrix, self.loss_sum, label_names=label_names)


def summarise(
    matrix: np.ndarray, loss_sum: float, *, label_names: list[str] | None = None
) -> dict[str, Any]:
    """The validation figures of a confusion matrix and a summed loss.

    A class never predicted has precision 0; a class absent from the labels has
    recall 0 and is left out of macro-F1, so an empty class cannot lower it.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    count = int(matrix.sum())
    hits = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(
        2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0
    )
    present = actual > 0
    return {
        "samples": count,
        "loss": loss_sum / count if count else math.nan,
        "accuracy": float(hits.sum() / count) if count else math.nan,
        "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
        "precision": [round(float(p), 6) for p in precision],
        "recall": [round(float(r), 6) for r in recall],
        "labels": list(label_names) if label_names else None,
        "confusion": matrix.tolist(),
    }


class JsonlWriter:
    """Appends JSON records to a file; each record reaches the OS at once.

    Handing every record to the OS (one write call) means a killed trainer loses
    none; `flush_s` bounds how long one may wait for the disk (fsync). The file is
    opened for appending, so a restarted run adds to its history.
    """

    def __init__(self, path: Path, *, flush_s: float = 1.0) -> None:
        self.path = path
        self.flush_s = flush_s
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._synced = time.monotonic()
        self._dirty = False

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record."""
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        self._dirty = True
        self.tick()

    def tick(self) -> None:
        """Syncs to disk when the last sync is `flush_s` old and records wait."""
        if self._dirty and time.monotonic() - self._synced >= self.flush_s:
            self.flush(sync=True)

    def flush(self, *, sync: bool = False) -> None:
        """Hands buffered records to the OS (and to the disk with `sync`)."""
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()
            self._dirty = False

    def close(self) -> None:
        """Flushes, syncs and closes."""
        if not self._file.closed:
            self.flush(sync=True)
            self._file.close()


class Publisher:
    """The trainer's PUB socket at ipc://<runtime_dir>/metrics.sock.

    Messages are two frames, [topic, json]. Sending never blocks: past the high-water
    mark a PUB socket drops that viewer's messages instead of waiting for it.
    """

    def __init__(self, runtime_dir: Path, *, name: str = "metrics.sock") -> None:
        self.address = f"ipc://{runtime_dir / name}"
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)

    def send(self, topic: bytes, record: dict[str, Any]) -> None:
        """Publishes one record under `topic` without waiting."""
        assert topic in TOPICS, topic
        payload = json.dumps(record, separators=(",", ":")).encode()
        try:
            self.socket.send_multipart([topic, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("metrics message dropped: %s", topic.decode())

    def close(self) -> None:
        """Closes the socket and the context.

        A short linger lets the last state message (finished, failed) reach viewers
        that are connected; one that is not reading costs at most the linger.
        """
        self.socket.close(linger=500)
        self.context.term()
        path = Path(self.address.removeprefix("ipc://"))
        path.unlink(missing_ok=True)
