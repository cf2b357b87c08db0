"""The `model`, `train` and `checkpoint` sections of a job config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    # strict: YAML's `true` is no count and "32" no number; ints still pass as floats.
    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True
    )


class ModelConfig(_Section):
    """Which network to build; sizes left out take the preset's values."""

    preset: Literal["default", "zhang-small", "zhang-large"] = "default"
    """default: length-independent (global max pooling, batch norm); zhang-*: the paper's."""
    features: int | None = Field(None, ge=1)
    """Convolution channels (default preset 256, zhang-small 256, zhang-large 1024)."""
    hidden: int | None = Field(None, ge=1)
    """Units of the fully connected layers (1024 small, 2048 large, 512 default)."""
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    """Dropout between fully connected layers."""
    init_from: str | None = None
    """Weights to load before training (a checkpoint path), or none."""
    reinit_head: bool = False
    """With init_from: re-initialise a classifier head whose class count differs."""


class TrainConfig(_Section):
    """The optimisation: epochs, optimizer, schedule, device and precision."""

    epochs: int = Field(10, ge=1)
    """Training epochs; each ends with a validation pass."""
    seed: int = Field(0, ge=0)
    """Seeds the epoch permutations, the windows and the model's initialisation."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd with momentum (the paper), or adamw."""
    lr: float = Field(0.01, gt=0)
    """Peak learning rate."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 penalty (sgd) or decoupled weight decay (adamw)."""
    schedule: Literal["step", "cosine", "constant"] = "step"
    """step: halve every `halve_every_epochs` (the paper); cosine: warm-up then cosine."""
    halve_every_epochs: int = Field(3, ge=1)
    """For the step schedule."""
    warmup_steps: int = Field(100, ge=0)
    """For the cosine schedule: linear warm-up steps."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the gradient norm to this value; 0 turns clipping off."""
    max_nonfinite: int = Field(5, ge=1)
    """Non-finite losses in a row after which the run stops as failed."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 leaves the producers their cores."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda"):
            return value
        head, _, index = value.partition(":")
        if head == "cuda" and index.isdigit():
            return value
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")


class CheckpointConfig(_Section):
    """When checkpoints are written and which are kept."""

    every_steps: int = Field(0, ge=0)
    """Also write `last` every N steps; 0 turns this off."""
    every_minutes: float = Field(10.0, ge=0)
    """Also write `last` every M minutes; 0 turns this off."""
    keep_best: int = Field(3, ge=1)
    """How many of the best epochs to keep beside `last` and `best`."""
    best_metric: Literal["accuracy", "macro_f1", "loss"] = "accuracy"
    """The validation figure that ranks checkpoints (loss: lower is better)."""
    max_restarts: int = Field(3, ge=0)
    """Trainer restarts from the last checkpoint allowed within `restart_window_min`."""
    restart_window_min: float = Field(10.0, gt=0)
    """The window for `max_restarts`."""


class MetricsConfig(_Section):
    """Per-batch metrics."""

    flush_s: float = Field(1.0, gt=0, le=60)
    """metrics.jsonl is flushed at least this often."""
    log_every_steps: int = Field(50, ge=1)
    """A plain log line every N steps."""
