"""Epoch plans: which posts go into which batch, and the one function that fills a batch.

A plan covers one phase (train or val) of one epoch: the post ids in batch order and
the seed of every batch's windows. The content of batch b is a pure function of
(corpus, length, plan, b), so it does not matter which producer makes it, or when.
On the wire a plan is a JSON header frame plus the raw int64 ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from trainerd.producers.sampling import Sampler, Window

if TYPE_CHECKING:
    from trainerd.producers.config import DataConfig
    from trainerd.producers.corpus import Corpus

Phase = Literal["train", "val"]
PHASES = ("train", "val")

# Stream tags keep the permutation, the training windows and the validation windows
# on independent random streams of the same seed.
_PERMUTATION = 0
_TRAIN_WINDOWS = 1
_VAL_WINDOWS = 2
# Validation windows ignore the epoch, so every epoch scores identical frames.
_VAL_EPOCH = 0x7A1


@dataclass(frozen=True)
class Plan:
    """One phase of one epoch: post ids in batch order, and how to draw windows."""

    run_id: str
    seq: int
    epoch: int
    phase: str
    seed: int
    batch_size: int
    n_batches: int
    start_batch: int
    ids: np.ndarray

    @property
    def window(self) -> Window:
        """Where body windows start: uniformly at random in both phases."""
        return Window.UNIFORM

    def batch_ids(self, b: int) -> np.ndarray:
        """Post ids of batch b (a view; the last batch may be short)."""
        return self.ids[b * self.batch_size : (b + 1) * self.batch_size]

    def batch_rows(self, b: int) -> int:
        """Rows in batch b."""
        return min(self.batch_size, self.ids.size - b * self.batch_size)

    def batch_rng(self, b: int) -> np.random.Generator:
        """The generator of batch b's windows, the same whoever makes the batch."""
        if self.phase == "train":
            key = [self.seed, _TRAIN_WINDOWS, self.epoch, b]
        else:
            key = [self.seed, _VAL_WINDOWS, _VAL_EPOCH, b]
        return np.random.default_rng(key)

    def header(self) -> dict:
        """Everything but the ids, as JSON-ready values."""
        return {
            "run_id": self.run_id,
            "seq": self.seq,
            "epoch": self.epoch,
            "phase": self.phase,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
            "start_batch": self.start_batch,
        }

    def to_frames(self, **extra: object) -> list[bytes]:
        """The wire form: a JSON header (plus `extra` keys) and the ids' bytes."""
        head = json.dumps({**self.header(), **extra}).encode()
        return [head, np.ascontiguousarray(self.ids, dtype="<i8").tobytes()]

    @classmethod
    def from_frames(cls, head: bytes, ids: bytes) -> tuple[Plan, dict]:
        """Parses `to_frames`' form; returns the plan and the header dict."""
        meta = json.loads(head)
        fields = {k: meta[k] for k in cls.__dataclass_fields__ if k != "ids"}
        ids_array = np.frombuffer(ids, dtype="<i8").astype(np.int64)
        return cls(**fields, ids=ids_array), meta


def _check_start(start_batch: int, n_batches: int) -> None:
    if not 0 <= start_batch <= n_batches:
        raise ValueError(f"start_batch must be in 0..{n_batches}, got {start_batch}")


def train_plan(
    corpus: Corpus,
    data_cfg: DataConfig,
    *,
    run_id: str,
    seed: int,
    epoch: int,
    seq: int,
    start_batch: int = 0,
) -> Plan:
    """A seeded permutation of the training split; the short last batch is kept
    unless `data_cfg.drop_last`."""
    bs = data_cfg.batch_size
    rng = np.random.default_rng([seed, _PERMUTATION, epoch])
    ids = rng.permutation(np.asarray(corpus.train_ids, dtype=np.int64))
    if data_cfg.drop_last:
        ids = ids[: ids.size // bs * bs]
    n_batches = -(-ids.size // bs)
    _check_start(start_batch, n_batches)
    return Plan(run_id, seq, epoch, "train", seed, bs, n_batches, start_batch, ids)


def val_plan(
    corpus: Corpus,
    data_cfg: DataConfig,
    *,
    run_id: str,
    seed: int,
    epoch: int,
    seq: int,
    start_batch: int = 0,
) -> Plan:
    """The validation split in its stored order, never dropped or padded."""
    bs = data_cfg.batch_size
    ids = np.array(corpus.val_ids, dtype=np.int64)
    n_batches = -(-ids.size // bs)
    _check_start(start_batch, n_batches)
    return Plan(run_id, seq, epoch, "val", seed, bs, n_batches, start_batch, ids)


def make_batch(
    sampler: Sampler,
    plan: Plan,
    b: int,
    codes_out: np.ndarray,
    onehot_out: np.ndarray | None = None,
    *,
    labels_out: np.ndarray | None = None,
    ids_out: np.ndarray | None = None,
) -> int:
    """Fills batch b of `plan` and returns its row count.

    Args:
        sampler: a Sampler over the plan's corpus, batch_size >= plan.batch_size.
        plan: the plan.
        b: batch index, 0 <= b < plan.n_batches.
        codes_out: (batch_size, length) uint8; rows past the count are zeroed.
        onehot_out: (batch_size, length, V) uint8, or None for codes only; rows past
            the count are left as they were.
        labels_out: (batch_size,) int64 label ids, or None.
        ids_out: (batch_size,) int64 post ids, or None.
    """
    ids = plan.batch_ids(b)
    rows = ids.size
    sampler.codes_into(ids, codes_out, window=plan.window, rng=plan.batch_rng(b))
    if onehot_out is not None:
        sampler.one_hot_into(codes_out[:rows], onehot_out[:rows])
    if labels_out is not None:
        labels_out[:rows] = sampler.corpus.labels[ids]
    if ids_out is not None:
        ids_out[:rows] = ids
    return rows
