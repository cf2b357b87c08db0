"""What `trainerctl watch` draws: the dashboard's state and its panels.

This module only renders. `DashboardState` is fed the run's history (records of
metrics.jsonl and validation.jsonl) and the trainer's live messages (`batch`, `val`,
`state`, `status`); the `render_*` functions turn it into rich renderables. Some of
them read the state when drawn (to fit the height they are given), so draw from the
thread that feeds the state. Time is passed in (`now`, seconds since the epoch), so
every panel is a pure function of its input. The daemon never draws; only trainerctl
imports this module. No torch here.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

log = logging.getLogger(__name__)

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
# Smoothing of the train curves: an exponential moving average over about 1/alpha steps.
EMA_ALPHA = 0.05
# Points kept for the curves and for the rate that gives the ETA.
CURVE_POINTS = 600
RATE_WINDOW = 50
# No data-wait alert before this many steps: the producers are still starting.
WARMUP_STEPS = 50
# Below this width the GPU figures join the job panel instead of a panel of their own.
GPU_PANEL_MIN_WIDTH = 110
GPU_ROWS_IN_JOB = 2
PRODUCERS_WIDTH = 34
BEST_LOWER = ("loss",)
ENDED = ("finished", "failed", "stopped")
RESUMED = "resumed"
"""The `event` of the marker metrics.jsonl gets when a trainer resumes at its `step`."""


@dataclass
class Thresholds:
    """When the dashboard raises an alert."""

    stall_s: float = 60.0
    """No new step for this long while training."""
    quiet_s: float = 10.0
    """No message at all for this long: the trainer is probably not running."""
    data_wait_share: float = 0.10
    """Share of step time spent waiting for batches."""
    disk_free_bytes: int = 2 << 30
    """Free space on the state directory's file system."""


@dataclass
class GpuReading:
    """One GPU's figures, as NVML reports them."""

    index: int
    name: str
    util_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    temp_c: float


class GpuProbe:
    """Reads GPU figures through nvidia-ml-py when it and an NVIDIA driver are present.

    The package is optional (`pip install trainerd[gpu]`); without it, or without a
    GPU, `read()` returns an empty list and the dashboard hides its GPU panel.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._count = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self._count = int(pynvml.nvmlDeviceGetCount())
            self._nvml = pynvml
        except Exception as err:  # ImportError, or NVMLError without a driver
            log.debug("gpu probe off: %s", err)

    def read(self) -> list[GpuReading]:
        """Current figures of every GPU, or [] without NVML."""
        if self._nvml is None:
            return []
        nvml = self._nvml
        readings = []
        try:
            for index in range(self._count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                readings.append(
                    GpuReading(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        util_pct=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        mem_used_bytes=int(memory.used),
                        mem_total_bytes=int(memory.total),
                        temp_c=float(
                            nvml.nvmlDeviceGetTemperature(
                                handle, nvml.NVML_TEMPERATURE_GPU
                            )
                        ),
                    )
                )
        except Exception as err:  # a GPU fell off the bus: show nothing, not a crash
            log.debug("gpu probe failed: %s", err)
            return []
        return readings

    def close(self) -> None:
        """Releases NVML."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            finally:
                self._nvml = None


def disk_free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class DashboardState:
    """Everything the dashboard shows, fed by history records and live messages."""

    run: str | None = None
    state: str | None = None
    reason: str | None = None
    device: str | None = None
    config_name: str | None = None
    best_metric: str = "accuracy"
    epoch: int | None = None
    epochs: int | None = None
    done: int | None = None
    """Training batches done in this epoch (the trainer's cursor)."""
    n_batches: int | None = None
    global_step: int | None = None
    samples_per_s: float | None = None
    data_wait_share: float | None = None
    lr: float | None = None
    last_loss: float | None = None
    last_accuracy: float | None = None
    loss_ema: float | None = None
    accuracy_ema: float | None = None
    loss_curve: deque[float] = field(default_factory=lambda: deque(maxlen=CURVE_POINTS))
    accuracy_curve: deque[float] = field(
        default_factory=lambda: deque(maxlen=CURVE_POINTS)
    )
    validation: dict[int, dict[str, Any]] = field(default_factory=dict)
    best_val: dict[str, Any] | None = None
    last_checkpoint: dict[str, Any] | None = None
    producers: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_in_row: int = 0
    last_nonfinite_step: int | None = None
    last_step_at: float | None = None
    last_message_at: float | None = None
    live: bool = False
    watch_started_at: float | None = None
    """When the viewer attached: the quiet time before any message counts from it."""
    disk_free: int | None = None
    state_dir: str | None = None
    daemon_down: str | None = None
    """Why trainerd could not be asked about the job, when it could not."""
    gpus: list[GpuReading] = field(default_factory=list)
    # (time, global step) of recent batches: the measured step rate behind the ETA.
    _rate: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=RATE_WINDOW)
    )
    _waits: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=RATE_WINDOW)
    )

    # -- feeding -------------------------------------------------------------------

    def load_history(
        self,
        batches: Iterable[dict[str, Any]],
        validations: Iterable[dict[str, Any]],
        *,
        config: dict[str, Any] | None = None,
        resumed_at: int | None = None,
    ) -> None:
        """Replays a run's files: metrics.jsonl, validation.jsonl and config.yaml.

        `resumed_at`: the trainer has since resumed at this step, so rows after it
        are about to be replayed and are left out.
        """
        if config:
            self.config_name = self.config_name or config.get("name")
            checkpoint = config.get("checkpoint") or {}
            self.best_metric = checkpoint.get("best_metric", self.best_metric)
            train = config.get("train") or {}
            self.epochs = self.epochs or train.get("epochs")
            self.device = self.device or train.get("device")
        for record in latest_batches(batches, resumed_at=resumed_at):
            self.add_batch(record)
        for record in validations:
            self.add_validation(record)

    def apply(self, topic: str, message: dict[str, Any], *, now: float) -> None:
        """Applies one live message (`batch`, `val`, `state` or `status`)."""
        self.live = True
        self.last_message_at = now
        if topic == "batch":
            self.add_batch(message, received_at=now)
        elif topic == "val":
            self.add_validation(message)
        elif topic == "state":
            self._take_state(message)
        elif topic == "status":
            self._take_status(message)

    def add_batch(
        self, record: dict[str, Any], *, received_at: float | None = None
    ) -> None:
        """One per-batch record, from metrics.jsonl or a `batch` message."""
        self.run = record.get("run", self.run)
        self.epoch = record.get("epoch", self.epoch)
        if isinstance(record.get("batch"), int):
            self.done = record["batch"] + 1
        self.n_batches = record.get("n_batches", self.n_batches)
        step = record.get("step")
        self.global_step = step if isinstance(step, int) else self.global_step
        self.lr = _number(record.get("lr")) if "lr" in record else self.lr
        sps = _number(record.get("samples_per_s"))
        self.samples_per_s = sps if sps is not None else self.samples_per_s
        at = received_at if received_at is not None else _number(record.get("time"))
        if at is not None:
            self.last_step_at = at
            if self.global_step is not None:
                self._rate.append((at, self.global_step))
        wait_ms, step_ms = record.get("data_wait_ms"), record.get("step_ms")
        if _finite(wait_ms) and _finite(step_ms):
            self._waits.append((float(wait_ms), float(step_ms)))

        # The curves are smoothed; a non-finite loss is never averaged in.
        loss, accuracy = record.get("loss"), record.get("accuracy")
        if _finite(loss) and not record.get("skipped"):
            self.nonfinite_in_row = 0
            self.last_loss = float(loss)
            self.loss_ema = _ema(self.loss_ema, float(loss))
            self.loss_curve.append(self.loss_ema)
        elif "loss" in record:
            self.nonfinite_in_row += 1
            self.last_nonfinite_step = self.global_step
        if _finite(accuracy):
            self.last_accuracy = float(accuracy)
            self.accuracy_ema = _ema(self.accuracy_ema, float(accuracy))
            self.accuracy_curve.append(self.accuracy_ema)

    def add_validation(self, record: dict[str, Any]) -> None:
        """One per-epoch validation record; a repeated epoch replaces the earlier one."""
        epoch = record.get("epoch")
        if not isinstance(epoch, int):
            return
        self.validation[epoch] = dict(record)
        self.best_val = self.best_validation()

    def _take_state(self, message: dict[str, Any]) -> None:
        self.run = message.get("run", self.run)
        self.state = message.get("state", self.state)
        self.reason = message.get("reason")

    def _take_status(self, message: dict[str, Any]) -> None:
        for key in (
            "run",
            "state",
            "epoch",
            "epochs",
            "n_batches",
            "device",
            "config_name",
            "samples_per_s",
            "data_wait_share",
        ):
            if message.get(key) is not None:
                setattr(self, key, message[key])
        if message.get("step") is not None:
            self.done = message["step"]
        if message.get("global_step") is not None:
            self.global_step = message["global_step"]
        if message.get("last_checkpoint"):
            self.last_checkpoint = dict(message["last_checkpoint"])
        if isinstance(message.get("producers"), list):
            self.producers = [dict(p) for p in message["producers"]]
        for record in (message.get("last_val"), message.get("best_val")):
            if isinstance(record, dict) and record.get("epoch") not in self.validation:
                self.add_validation(record)

    # -- figures -------------------------------------------------------------------

    def best_validation(self) -> dict[str, Any] | None:
        """The best epoch by the run's `best_metric` (loss: lower is better)."""
        scored = [
            r for r in self.validation.values() if _finite(r.get(self.best_metric))
        ]
        if not scored:
            return None
        sign = -1.0 if self.best_metric in BEST_LOWER else 1.0
        return max(scored, key=lambda r: (sign * r[self.best_metric], -r["epoch"]))

    def wait_share(self) -> float | None:
        """Share of step time spent waiting for data: the trainer's figure, else ours."""
        if self.data_wait_share is not None:
            return float(self.data_wait_share)
        if not self._waits:
            return None
        # step_ms is the training step alone; the wait comes before it.
        wait = sum(w for w, _ in self._waits)
        total = wait + sum(s for _, s in self._waits)
        return wait / total if total > 0 else None

    def steps_per_s(self) -> float | None:
        """Measured over the last few dozen batches."""
        if len(self._rate) < 2:
            return None
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta_s(self) -> tuple[float | None, float | None]:
        """Seconds to the end of this epoch and of the run (training steps only)."""
        rate = self.steps_per_s()
        if rate is None or self.n_batches is None or self.done is None:
            return None, None
        left_epoch = max(self.n_batches - self.done, 0)
        if self.epochs is None or self.epoch is None:
            return left_epoch / rate, None
        later = max(self.epochs - self.epoch, 0) * self.n_batches
        return left_epoch / rate, (left_epoch + later) / rate

    def position(self) -> str:
        """`epoch 23/25, step 512/800`: where the run is (or stopped)."""
        return (
            f"epoch {epoch_shown(self.epoch)}/{self.epochs or '-'}, "
            f"step {'-' if self.done is None else self.done}/{self.n_batches or '-'}"
        )

    def quiet_s(self, now: float) -> float | None:
        """Seconds since the last live message (or since attaching, before any)."""
        heard = self.last_message_at or self.watch_started_at
        return None if heard is None else now - heard

    def current(self, *, now: float, thresholds: Thresholds) -> bool:
        """The trainer is heard from now: its rates and ETAs mean something."""
        quiet = self.quiet_s(now)
        silent = quiet is not None and quiet >= thresholds.quiet_s
        return self.live and self.state not in ENDED and not silent

    def notice(self, *, now: float, thresholds: Thresholds) -> str | None:
        """The one line that says the view is not live: ended, idle or silent."""
        run = self.run or "?"
        if self.state == "finished":
            return f"job finished: run {run}"
        if self.state == "failed":
            return f"job failed: run {run}" + (
                f": {self.reason}" if self.reason else ""
            )
        if self.state == "stopped":
            why = f"; {self.reason}" if self.reason else ""
            return f"job stopped: run {run} at {self.position()}{why}"
        if self.run is None:
            if self.daemon_down:
                return f"no run yet; {self.daemon_down}"
            if self.state == "idle":
                return (
                    "no job running and no run yet; start one with "
                    "'trainerctl start -c CONFIG'"
                )
            return "waiting for a job: no run yet"
        quiet = self.quiet_s(now)
        if quiet is not None and quiet >= thresholds.quiet_s:
            where = "" if self.live else f"; run {run} from files"
            return f"no messages for {quiet:.0f} s: trainer not running?{where}"
        if not self.live:
            return f"run {run} from files; waiting for live messages"
        return None

    def alerts(self, *, now: float, thresholds: Thresholds) -> list[str]:
        """Problems a person should look at, most serious first."""
        found = []
        if self.nonfinite_in_row:
            found.append(
                f"non-finite loss at step {self.last_nonfinite_step} "
                f"({self.nonfinite_in_row} in a row)"
            )
        idle = None if self.last_step_at is None else now - self.last_step_at
        if (
            self.live
            and self.state == "training"
            and idle is not None
            and idle >= thresholds.stall_s
        ):
            found.append(f"no step for {idle:.0f} s")
        share = self.wait_share()
        # The first steps wait for the producers to start; that is not a slow pipeline.
        # A run that is not heard from has no pipeline to speak of.
        warm = (self.global_step or 0) >= WARMUP_STEPS
        current = self.current(now=now, thresholds=thresholds)
        if (
            current
            and warm
            and share is not None
            and share > thresholds.data_wait_share
        ):
            found.append(
                f"data wait {share:.0%} of step time "
                f"(over {thresholds.data_wait_share:.0%}): producers too slow"
            )
        if self.disk_free is not None and self.disk_free < thresholds.disk_free_bytes:
            where = f" on {self.state_dir}" if self.state_dir else ""
            found.append(f"low disk: {_bytes(self.disk_free)} free{where}")
        return found


def latest_batches(
    records: Iterable[dict[str, Any]], *, resumed_at: int | None = None
) -> list[dict[str, Any]]:
    """The per-batch records of metrics.jsonl as the run stands now: each step once.

    metrics.jsonl is append-only. A trainer resumed from a checkpoint at step N writes
    a `resumed` marker and then steps N+1, N+2... again, so those rows replace the
    earlier ones. A step that comes again without a marker (a file written before
    there were markers) is taken the same way. Other records, the marker among them,
    are not batches and are left out.
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        step = record.get("step")
        if record.get("event") == RESUMED:
            if isinstance(step, int):
                _drop_after(kept, step)
            continue
        if not is_batch(record):
            continue
        if kept and step <= kept[-1]["step"]:
            _drop_after(kept, step - 1)
        kept.append(record)
    if resumed_at is not None:
        _drop_after(kept, resumed_at)
    return kept


def is_batch(record: dict[str, Any]) -> bool:
    """A per-batch record: it has a step, a batch index and a loss (maybe null)."""
    return (
        isinstance(record.get("step"), int)
        and isinstance(record.get("batch"), int)
        and "loss" in record
    )


def _drop_after(kept: list[dict[str, Any]], step: int) -> None:
    # `kept` rises step by step, so what comes after `step` is at its end.
    while kept and kept[-1]["step"] > step:
        kept.pop()


def _ema(previous: float | None, value: float) -> float:
    return value if previous is None else previous + EMA_ALPHA * (value - previous)


# -- formatting ------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """`1:02:03`, `4:05`, or `-` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = round(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_age(seconds: float | None) -> str:
    """`12s`, `4m`, `3h`, `2d` ago."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _fig(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"


def _buckets(values: Sequence[float], width: int) -> list[float]:
    values = [v for v in values if math.isfinite(v)]
    if width <= 0 or len(values) <= width:
        return values if width > 0 else []
    # Average into `width` buckets so the whole window is shown, not only its tail.
    edges = [round(i * len(values) / width) for i in range(width + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in itertools.pairwise(edges) if b > a]


def sparkline(values: Sequence[float], width: int) -> str:
    """The values as one line of block characters, one bucket per column."""
    return block_chart(values, width, rows=1)[0]


def block_chart(values: Sequence[float], width: int, *, rows: int) -> list[str]:
    """The values as a chart `rows` lines high, top line first."""
    points = _buckets(values, width)
    if not points:
        return [""] * rows
    low, high = min(points), max(points)
    steps = rows * len(SPARK_LEVELS)
    # The lowest point still shows one eighth of a block, so a flat curve is visible.
    heights = [
        1 + round((v - low) / (high - low) * (steps - 1)) if high > low else steps // 2
        for v in points
    ]
    lines = []
    for row in range(rows - 1, -1, -1):
        cells = []
        for height in heights:
            part = min(max(height - row * len(SPARK_LEVELS), 0), len(SPARK_LEVELS))
            cells.append(SPARK_LEVELS[part - 1] if part else " ")
        lines.append("".join(cells))
    return lines


def epoch_shown(epoch: int | None) -> str:
    """An epoch as shown; the trainer counts them from 1."""
    return "-" if epoch is None else str(epoch)


# -- renderables -----------------------------------------------------------------------


class _Bar:
    """A progress bar that takes the width it is given; readable without colour."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = None if fraction is None else min(max(fraction, 0.0), 1.0)

    def __rich_console__(
        self, console: Console, options: ConsoleOptions
    ) -> RenderResult:
        width = max(options.max_width, 1)
        done = 0 if self.fraction is None else int(self.fraction * width)
        yield Text.assemble(("━" * done, "green"), ("─" * (width - done), "grey37"))


class _Curve:
    """`label value` followed by a chart `rows` high that fills the rest of the width."""

    def __init__(
        self, label: str, value: str, values: Sequence[float], *, rows: int = 1
    ) -> None:
        self.head = f"{label:<9}{value:>7} "
        self.values = list(values)
        self.rows = max(rows, 1)

    def __rich_console__(
        self, console: Console, options: ConsoleOptions
    ) -> RenderResult:
        room = options.max_width - len(self.head)
        chart = block_chart(self.values, room, rows=self.rows)
        for row, line in enumerate(chart):
            head = self.head if row == 0 else " " * len(self.head)
            yield Text.assemble(head, (line, "cyan"), no_wrap=True, overflow="crop")


class _Fit:
    """Builds its content for the width and height it is given when drawn."""

    def __init__(self, build: Any) -> None:
        self.build = build

    def __rich_console__(
        self, console: Console, options: ConsoleOptions
    ) -> RenderResult:
        height = options.height or console.height
        # Render here: rich drops the height for renderables yielded from this method.
        lines = console.render_lines(self.build(options.max_width, height), options)
        for line in lines:
            yield from line
            yield Segment.line()


def render_header(st: DashboardState, *, now: float) -> Text:
    """One line: run, state, device, config name and the clock."""
    state_style = {"failed": "bold red", "finished": "bold green"}.get(
        st.state or "", "bold yellow"
    )
    text = Text.assemble(
        ("trainerd ", "bold"),
        ("run ", "dim"),
        (st.run or "-", "bold cyan"),
        "  ",
        (st.state or "unknown", state_style),
        ("  device ", "dim"),
        st.device or "-",
        ("  config ", "dim"),
        st.config_name or "-",
    )
    text.append(f"  {time.strftime('%H:%M:%S', time.localtime(now))}", style="dim")
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def render_progress(st: DashboardState, *, current: bool = True) -> Table:
    """Epoch and step bars with samples/s and the ETAs (only while `current`)."""
    eta_epoch, eta_run = st.eta_s() if current else (None, None)
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(no_wrap=True, min_width=14)
    grid.add_column(ratio=1)
    grid.add_column(no_wrap=True, justify="right")
    step_done = None
    if st.done is not None and st.n_batches:
        step_done = min(st.done / st.n_batches, 1.0)
    epochs_done = None
    if st.epoch is not None and st.epochs:
        epochs_done = min((st.epoch - 1 + (step_done or 0.0)) / st.epochs, 1.0)
    grid.add_row(
        f"epoch {epoch_shown(st.epoch)}/{st.epochs or '-'}",
        _Bar(epochs_done),
        f"{_pct(epochs_done)} run ETA {format_duration(eta_run)}",
    )
    shown_batch = "-" if st.done is None else str(st.done)
    sps = "-"
    if current and st.samples_per_s is not None:
        sps = f"{st.samples_per_s:,.0f}"
    grid.add_row(
        f"step {shown_batch}/{st.n_batches or '-'}",
        _Bar(step_done),
        f"{_pct(step_done)} {sps} samples/s ETA {format_duration(eta_epoch)}",
    )
    return grid


def _pct(fraction: float | None) -> str:
    return "  -%" if fraction is None else f"{fraction:4.0%}"


def render_train(st: DashboardState, *, height: int | None = None) -> Panel:
    """Smoothed train loss and accuracy, and the validation history, as charts."""
    metric = st.best_metric
    val_values = [
        float(r[metric])
        for _, r in sorted(st.validation.items())
        if _finite(r.get(metric))
    ]
    latest_val = val_values[-1] if val_values else None
    # Rows inside the border, less the step line, shared out among the three charts.
    chart_rows = max((height or 6) - 3, 3)
    val_rows = max(chart_rows // 5, 1)
    loss_rows = max((chart_rows - val_rows) // 2, 1)
    accuracy_rows = max(chart_rows - val_rows - loss_rows, 1)
    lines: list[RenderableType] = [
        _Curve("loss", _fig(st.loss_ema), st.loss_curve, rows=loss_rows),
        _Curve(
            "accuracy", _fig(st.accuracy_ema), st.accuracy_curve, rows=accuracy_rows
        ),
        _Curve(
            f"val {_SHORT.get(metric, metric)}",
            _fig(latest_val),
            val_values,
            rows=val_rows,
        ),
        Text(
            f"step {'-' if st.global_step is None else st.global_step}"
            f"  lr {'-' if st.lr is None else format(st.lr, '.3g')}",
            no_wrap=True,
            overflow="ellipsis",
        ),
    ]
    title = f"train (smoothed, last {len(st.loss_curve)} steps)"
    return Panel(Group(*lines), title=title, title_align="left", height=height)


_SHORT = {"accuracy": "acc", "macro_f1": "F1", "loss": "loss"}


def render_validation(st: DashboardState, *, height: int | None = None) -> Panel:
    """Validation figures per epoch, the best marked; the newest rows that fit."""
    best = st.best_val.get("epoch") if st.best_val else None
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    table.add_column("epoch", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("acc", justify="right", no_wrap=True)
    table.add_column("F1", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    epochs = sorted(st.validation)
    room = max((height or len(epochs) + 3) - 3, 1)  # panel border and table header
    if len(epochs) > room:
        # Keep the best row in view: the newest rows, with the best one in front.
        newest = epochs[-(room - 1) :] if room > 1 else []
        epochs = ([best] if best is not None and best not in newest else []) + newest
        epochs = epochs[-room:] if best in newest else epochs
    for epoch in epochs:
        record = st.validation[epoch]
        is_best = epoch == best
        table.add_row(
            epoch_shown(epoch),
            _fig(record.get("loss")),
            _fig(record.get("accuracy")),
            _fig(record.get("macro_f1")),
            "◀ best" if is_best else "",
            style="bold green" if is_best else None,
        )
    if not st.validation:
        table.add_row("-", "-", "-", "-", "no epoch validated yet")
    return Panel(table, title="validation", title_align="left", height=height)


def render_producers(st: DashboardState) -> Panel:
    """Each producer's state, ring fill and restarts."""
    table = Table(
        expand=True, box=None, padding=(0, 1), pad_edge=False, header_style="bold"
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True, overflow="ellipsis")
    table.add_column("ring", justify="right", no_wrap=True)
    table.add_column("restarts", justify="right", no_wrap=True)
    for producer in st.producers:
        fill, slots = producer.get("fill"), producer.get("slots")
        ring = f"{fill}/{slots}" if fill is not None and slots else "-"
        restarts = producer.get("restarts", 0)
        table.add_row(
            str(producer.get("id", "?")),
            str(producer.get("state", "?")),
            ring,
            str(restarts),
            style="yellow" if restarts else None,
        )
    if not st.producers:
        table.add_row("-", "no producer status yet", "", "")
    return Panel(table, title="producers", title_align="left")


def render_job(
    st: DashboardState,
    *,
    now: float,
    gpus: Sequence[GpuReading] = (),
    current: bool = True,
) -> Panel:
    """Data-wait share (only while `current`), last checkpoint and its age, free
    disk (and GPUs if given)."""
    share = st.wait_share() if current else None
    checkpoint = st.last_checkpoint or {}
    age = None
    if _finite(checkpoint.get("time")):
        age = now - float(checkpoint["time"])
    name = Path(str(checkpoint["path"])).name if checkpoint.get("path") else "none yet"
    best = st.best_val
    best_line = "-"
    if best:
        best_line = (
            f"{_fig(best.get(st.best_metric))} {st.best_metric} "
            f"@ epoch {epoch_shown(best.get('epoch'))}"
        )
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_row("data wait", "-" if share is None else f"{share:.1%} of step time")
    grid.add_row(
        "checkpoint", f"{name} ({format_age(age)} ago)" if age is not None else name
    )
    grid.add_row("best", best_line)
    grid.add_row("disk free", "-" if st.disk_free is None else _bytes(st.disk_free))
    for gpu in gpus[:GPU_ROWS_IN_JOB]:
        grid.add_row(f"gpu {gpu.index}", _gpu_figures(gpu))
    if len(gpus) > GPU_ROWS_IN_JOB:
        grid.add_row("", f"{len(gpus) - GPU_ROWS_IN_JOB} more GPUs: widen the terminal")
    return Panel(grid, title="job", title_align="left")


def _gpu_figures(gpu: GpuReading) -> str:
    return (
        f"{gpu.util_pct:.0f}%  {gpu.mem_used_bytes / 2**30:.1f}/"
        f"{gpu.mem_total_bytes / 2**30:.0f} GiB  {gpu.temp_c:.0f}°C"
    )


def render_gpu(gpus: Sequence[GpuReading]) -> Panel | None:
    """Utilisation, memory and temperature per GPU; None without one."""
    if not gpus:
        return None
    table = Table(
        expand=True, box=None, padding=(0, 1), pad_edge=False, header_style="bold"
    )
    table.add_column("gpu", no_wrap=True)
    table.add_column("util", justify="right", no_wrap=True)
    table.add_column("mem GiB", justify="right", no_wrap=True)
    table.add_column("temp", justify="right", no_wrap=True)
    for gpu in gpus:
        table.add_row(
            str(gpu.index),
            f"{gpu.util_pct:.0f}%",
            f"{gpu.mem_used_bytes / 2**30:.1f}/{gpu.mem_total_bytes / 2**30:.0f}",
            f"{gpu.temp_c:.0f}°C",
        )
    return Panel(table, title="GPU", title_align="left")


def render_alerts(notice: str | None, alerts: Sequence[str]) -> Text:
    """The notice line (not live, finished) and the alerts, one a line."""
    text = Text(no_wrap=True, overflow="ellipsis")
    if notice:
        text.append(f"■ {notice}", style="bold reverse")
    for alert in alerts:
        if text:
            text.append("\n")
        text.append(f"⚠ {alert}", style="bold red")
    if not text:
        text.append("no alerts  (q: detach)", style="dim")
    return text


def render_dashboard(
    st: DashboardState, *, now: float, thresholds: Thresholds | None = None
) -> Layout:
    """The whole screen; fits 80x24 and grows with the terminal."""
    thresholds = thresholds or Thresholds()
    notice = st.notice(now=now, thresholds=thresholds)
    alerts = st.alerts(now=now, thresholds=thresholds)
    current = st.current(now=now, thresholds=thresholds)
    gpus = list(st.gpus)
    job_rows = 4 + min(len(gpus), GPU_ROWS_IN_JOB + 1)
    bottom_rows = max(len(st.producers) + 1, len(gpus) + 1, job_rows) + 2
    layout = Layout()
    layout.split_column(
        Layout(render_header(st, now=now), size=1),
        Layout(render_progress(st, current=current), size=2),
        Layout(name="middle", minimum_size=7),
        Layout(
            _Fit(lambda w, h: _bottom(st, now, gpus, w, current=current)),
            size=bottom_rows,
        ),
        Layout(
            render_alerts(notice, alerts),
            size=min(max(len(alerts) + bool(notice), 1), 4),
        ),
    )
    layout["middle"].split_row(
        Layout(_Fit(lambda w, h: render_train(st, height=h)), ratio=1),
        Layout(_Fit(lambda w, h: render_validation(st, height=h)), ratio=1),
    )
    return layout


def _bottom(
    st: DashboardState,
    now: float,
    gpus: list[GpuReading],
    width: int,
    *,
    current: bool,
) -> Layout:
    row = Layout()
    gpu = render_gpu(gpus) if width >= GPU_PANEL_MIN_WIDTH else None
    panels = [
        Layout(render_producers(st), size=PRODUCERS_WIDTH),
        Layout(
            render_job(st, now=now, gpus=() if gpu else gpus, current=current),
            ratio=1,
        ),
    ]
    if gpu is not None:
        panels.append(Layout(gpu, ratio=1))
    row.split_row(*panels)
    return row


# -- plain text ------------------------------------------------------------------------


def status_line(
    st: DashboardState, *, now: float, thresholds: Thresholds | None = None
) -> str:
    """One line per interval for `--plain` (logs, non-terminals)."""
    thresholds = thresholds or Thresholds()
    current = st.current(now=now, thresholds=thresholds)
    parts = [
        time.strftime("%H:%M:%S", time.localtime(now)),
        f"run {st.run or '-'}",
        st.state or "unknown",
        f"epoch {epoch_shown(st.epoch)}/{st.epochs or '-'}",
        f"step {'-' if st.done is None else st.done}/{st.n_batches or '-'}",
        f"loss {_fig(st.loss_ema)}",
        f"acc {_fig(st.accuracy_ema)}",
    ]
    if st.best_val:
        last = st.validation[max(st.validation)]
        parts.append(
            f"val {st.best_metric} {_fig(last.get(st.best_metric))}"
            f" (best {_fig(st.best_val.get(st.best_metric))}"
            f" @ {epoch_shown(st.best_val.get('epoch'))})"
        )
    # Rates from the files, or from a trainer gone quiet, would read as current.
    if current:
        if st.samples_per_s is not None:
            parts.append(f"{st.samples_per_s:,.0f} samples/s")
        share = st.wait_share()
        if share is not None:
            parts.append(f"wait {share:.1%}")
        parts.append(f"ETA {format_duration(st.eta_s()[1])}")
    notice = st.notice(now=now, thresholds=thresholds)
    extra = ([notice] if notice else []) + st.alerts(now=now, thresholds=thresholds)
    return "  ".join(parts) + "".join(f"  [{e}]" for e in extra)


def history_lines(st: DashboardState) -> Iterator[str]:
    """A finished run's story: one line per validated epoch, best marked."""
    yield (
        f"run {st.run or '-'}  config {st.config_name or '-'}  "
        f"steps {st.global_step if st.global_step is not None else '-'}  "
        f"epochs {len(st.validation)}/{st.epochs or '-'}"
    )
    best = st.best_val.get("epoch") if st.best_val else None
    for epoch in sorted(st.validation):
        record = st.validation[epoch]
        yield (
            f"epoch {epoch_shown(epoch):>3}  loss {_fig(record.get('loss'))}  "
            f"acc {_fig(record.get('accuracy'))}  "
            f"F1 {_fig(record.get('macro_f1'))}"
            + ("  <- best" if epoch == best else "")
        )
    yield (
        f"last train loss {_fig(st.loss_ema)} (smoothed)  acc {_fig(st.accuracy_ema)}"
    )
