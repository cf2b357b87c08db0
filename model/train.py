"""The training step, validation, and moving batches from ring slots to the device.

The step is one straight sequence of phases: learning rate, forward, loss, backward,
clip, step, metrics. Batch content comes only from the data pipeline; dropout draws
from a generator seeded by (seed, epoch, batch), so a resumed run repeats the exact
computation of an uninterrupted one without saving any random state.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainerd.model.config import TrainConfig
from trainerd.model.metrics import Confusion
from trainerd.producers.errors import ConfigError, TrainingFailed

log = logging.getLogger(__name__)


class BatchLike(Protocol):
    """What the trainer reads from a batch (producers.pipeline.Batch has it all)."""

    index: int
    rows: int
    wire: str
    data: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def release(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    """auto picks the first GPU when there is one; an absent GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device: {name!r} asked for, but no GPU is visible"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: {name!r}, but only {torch.cuda.device_count()} GPU(s)"
            )
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (auto or bf16); float32 everywhere else."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def cpu_threads(requested: int, *, producers: int) -> int:
    """Torch's CPU threads: the setting, or all cores but the producers' share.

    Producers spend a small fraction of a core each on sampling and one-hot
    encoding, so on a small machine the trainer keeps every core but one per four
    producers, and never fewer than one.
    """
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - producers // 4) if cores > 2 else cores


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or AdamW."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=train.lr,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=train.lr, weight_decay=train.weight_decay
    )


def step_seed(seed: int, epoch: int, batch: int) -> int:
    """The dropout seed of one training batch: a pure function of its position."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{batch}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def ids_digest(ids: np.ndarray) -> str:
    """A short hash of a batch's post ids, logged per batch to compare runs."""
    data = np.ascontiguousarray(ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Feeder:
    """Turns a batch's slot into device tensors and hands the slot back early.

    On the CPU the slot is converted into a float tensor and released at once. On
    CUDA the slot is copied into one of two pinned staging buffers, released, and
    sent to the GPU with a non-blocking copy that overlaps the previous step's
    compute; the staging buffer is reused only after its copy's event completed.
    """

    def __init__(self, device: torch.device, alphabet_size: int) -> None:
        self.device = device
        self.alphabet_size = alphabet_size
        # Row 0 is the all-zero column of code 0 (outside the alphabet, padding).
        table = torch.zeros(alphabet_size + 1, alphabet_size)
        table[1:] = torch.eye(alphabet_size)
        self.table = table.to(device)
        self._staging: list[torch.Tensor | None] = [None, None]
        self._events: list[Any] = [None, None]
        self._turn = 0

    def __call__(self, batch: BatchLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x, y): x float (rows, V, L) on the device, y int64 (rows,)."""
        rows = batch.rows
        y = torch.from_numpy(np.array(batch.labels[:rows], dtype=np.int64))
        if self.device.type != "cuda":
            x = self.expand(torch.from_numpy(batch.data[:rows]), batch.wire)
            batch.release()
            return x, y
        return self._to_cuda(batch, rows), y.to(self.device, non_blocking=True)

    def expand(self, slot: torch.Tensor, wire: str) -> torch.Tensor:
        """(rows, L, V) uint8 one-hot or (rows, L) codes -> float (rows, V, L)."""
        if wire == "codes":
            # (rows, L) -> (rows, L, V) by table lookup
            slot = self.table[slot.long()]
        # (rows, L, V) -> (rows, V, L) float, converted and made contiguous in one pass
        rows, length, width = slot.shape
        x = torch.empty((rows, width, length), dtype=torch.float32, device=slot.device)
        return x.copy_(slot.permute(0, 2, 1))

    def _to_cuda(self, batch: BatchLike, rows: int) -> torch.Tensor:
        turn = self._turn
        self._turn ^= 1
        if self._events[turn] is not None:
            self._events[turn].synchronize()
        source = torch.from_numpy(batch.data[:rows])
        staging = self._staging[turn]
        if (
            staging is None
            or staging.shape[1:] != source.shape[1:]
            or (staging.shape[0] < rows)
        ):
            staging = torch.empty(source.shape, dtype=torch.uint8).pin_memory()
            self._staging[turn] = staging
        staging[:rows].copy_(source)
        batch.release()
        on_device = staging[:rows].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[turn] = event
        return self.expand(on_device, batch.wire)


@dataclass
class StepOutcome:
    """What one training step did."""

    loss: float
    correct: int
    rows: int
    lr: float
    grad_norm: float
    skipped: bool


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    seed: int,
    amp_dtype: torch.dtype | None = None,
) -> StepOutcome:
    """One optimizer step on one batch; a non-finite loss or gradient is not stepped on.

    Args:
        model: the network, in training mode.
        optimizer: its optimizer.
        x: float (B, V, L) on the model's device.
        y: int64 (B,) labels on the model's device.
        lr: this step's learning rate.
        grad_clip: clip the gradient norm to this; 0 only measures it.
        seed: seeds dropout for this batch.
        amp_dtype: bf16 to run the forward pass under autocast, None for float32.
    """
    # lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed)

    # forward: (B, V, L) -> logits (B, classes)
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with amp:
        logits = model(x)

    # loss, in float32 whatever the autocast dtype
    loss = F.cross_entropy(logits.float(), y)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, 0, len(y), lr, math.nan, skipped=True)

    # backward
    optimizer.zero_grad(set_to_none=True)
    loss.backward()

    # clip (or only measure: the norm is a logged metric)
    limit = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), limit))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, 0, len(y), lr, grad_norm, skipped=True)

    # step
    optimizer.step()

    # metrics
    correct = int((logits.detach().argmax(dim=1) == y).sum())
    return StepOutcome(loss_value, correct, len(y), lr, grad_norm, skipped=False)


class NonFiniteGuard:
    """Counts non-finite steps in a row; fails the run after `limit` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def check(self, outcome: StepOutcome, *, epoch: int, batch: int) -> None:
        """Logs a skipped step; raises TrainingFailed at the limit."""
        if not outcome.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        log.warning(
            "step skipped: non-finite %s at epoch %d batch %d (%d in a row)",
            "loss" if not math.isfinite(outcome.loss) else "gradient",
            epoch,
            batch,
            self.in_a_row,
        )
        if self.in_a_row >= self.limit:
            raise TrainingFailed(
                f"training failed: {self.in_a_row} non-finite losses in a row, last at "
                f"epoch {epoch} batch {batch}; lower train.lr or set train.grad_clip"
            )


@torch.no_grad()
def eval_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    confusion: Confusion,
    *,
    amp_dtype: torch.dtype | None = None,
) -> None:
    """Scores one validation batch into `confusion` (model in eval mode)."""
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with amp:
        logits = model(x)
    # logits: (B, classes); summed loss so the epoch's mean weighs every post once
    loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
    confusion.add(
        y.cpu().numpy(), logits.argmax(dim=1).cpu().numpy(), float(loss_sum.cpu())
    )


def evaluate(
    model: nn.Module,
    batches: Iterable[BatchLike],
    feeder: Feeder,
    n_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
) -> Confusion:
    """Scores every batch in order; the caller restores training mode."""
    model.eval()
    confusion = Confusion(n_classes)
    for batch in batches:
        x, y = feeder(batch)
        eval_batch(model, x, y, confusion, amp_dtype=amp_dtype)
    return confusion


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter and buffer is finite (checked before checkpointing)."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
