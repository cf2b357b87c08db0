"""The dashboard's panels, rendered from fixed metrics into a fixed-size console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import termios
import types

import pytest
from rich.cells import cell_len
from rich.console import Console, RenderableType
from watch_util import NOW, batch_record, status_record, val_record

from trainerd.daemon import dashboard as dash
from trainerd.daemon.cmd_watch import KeyReader, Watcher, read_records
from trainerd.daemon.dashboard import (
    DashboardState,
    GpuProbe,
    GpuReading,
    Thresholds,
    render_dashboard,
)


def text_of(renderable: RenderableType, *, width: int = 80, height: int = 24) -> str:
    """What a terminal of this size shows, without colour."""
    console = Console(
        width=width,
        height=height,
        record=True,
        no_color=True,
        color_system=None,
        file=open(os.devnull, "w"),  # noqa: SIM115
        legacy_windows=False,
    )
    console.print(renderable)
    console.file.close()
    return console.export_text()


def screen(st: DashboardState, *, width: int = 80, height: int = 24) -> str:
    return text_of(render_dashboard(st, now=NOW), width=width, height=height)


def running_state(**status: object) -> DashboardState:
    """Mid-epoch 2 of 5: 400 of 500 batches at one step a second, epoch 1 validated."""
    st = DashboardState(run="demo", state_dir="/s")
    for i in range(400):
        st.add_batch(
            batch_record(step=500 + i + 1, batch=i, time=NOW - 399 + i),
            received_at=NOW - 399 + i,
        )
    st.add_validation(val_record(1, 1.2, 0.41, 0.39))
    st.apply("status", status_record(**status), now=NOW)
    st.disk_free = 50 << 30
    return st


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


@pytest.mark.parametrize("width", [80, 120])
def test_progress_shows_epoch_step_rate_and_etas(width: int) -> None:
    text = screen(running_state(), width=width, height=30)

    epoch = line_with(text, "epoch 2/5")
    assert "36%" in epoch  # (1 + 400/500) of 5 epochs
    assert "run ETA 26:40" in epoch  # 100 + 3 * 500 steps at 1 step/s
    step = line_with(text, "step 400/500")
    assert "80%" in step
    assert "812 samples/s" in step
    assert "ETA 1:40" in step


def test_header_names_run_state_device_and_config() -> None:
    header = screen(running_state()).splitlines()[0]

    assert "run demo" in header
    assert "training" in header
    assert "device cuda:0" in header
    assert "config demo" in header


def test_train_panel_shows_smoothed_figures_and_curves() -> None:
    text = screen(running_state(), width=120, height=30)

    assert "0.500" in line_with(text, "loss ")
    assert "0.750" in line_with(text, "accuracy ")
    assert "0.410" in line_with(text, "val acc")
    assert "step 900  lr 0.01" in text
    # A constant curve is drawn at half height, not left blank.
    lines = text.splitlines()
    chart = lines[
        lines.index(line_with(text, "loss ")) : lines.index(
            line_with(text, "accuracy ")
        )
    ]
    assert sum("█" * 20 in line for line in chart) == len(chart) // 2


def test_validation_table_marks_the_best_epoch() -> None:
    st = running_state()
    for epoch, acc in ((1, 0.41), (2, 0.63), (3, 0.58)):
        st.add_validation(val_record(epoch, 1.5 - acc, acc, acc - 0.02))
    text = screen(st)

    assert "◀ best" in line_with(text, "0.630")
    assert "◀ best" not in line_with(text, "0.580")
    assert "0.610" in line_with(text, "0.630")  # macro-F1 of epoch 2
    assert "best       0.630 accuracy @ epoch 2" in text


def test_best_by_loss_is_the_lowest() -> None:
    st = running_state()
    st.best_metric = "loss"
    for epoch, loss in ((1, 0.9), (2, 0.7), (3, 0.8)):
        st.add_validation(val_record(epoch, loss, 0.5, 0.5))
    text = screen(st)

    assert "◀ best" in line_with(text, "0.700")
    assert "val loss" in text


def test_long_validation_history_keeps_the_best_and_newest_rows() -> None:
    st = running_state(epoch=30, epochs=40)
    for epoch in range(1, 30):
        acc = 0.9 if epoch == 4 else 0.5 + epoch / 100
        st.add_validation(val_record(epoch, 1.0, acc, 0.5))
    text = screen(st)

    assert "◀ best" in line_with(text, "0.900")
    assert "0.790" in text  # epoch 29, the newest
    assert "0.510" not in text  # epoch 1 made room


def test_producer_table_shows_state_fill_and_restarts() -> None:
    st = running_state()
    st.producers[1]["restarts"] = 2
    st.producers[3]["state"] = "restarting"
    text = screen(st)

    rows = [line_with(text, f"│  {i}  ") for i in range(4)]
    assert all("3/4" in row for row in rows)
    assert rows[1].split("│")[1].split()[-1] == "2"
    assert "restarting" in rows[3]


def test_job_panel_shows_wait_share_checkpoint_age_and_disk() -> None:
    text = screen(running_state())

    assert "data wait  1.2% of step time" in text
    assert "checkpoint last.pt (1m ago)" in text
    assert "disk free  50.0 GiB" in text


def test_no_alerts_while_healthy() -> None:
    assert "no alerts" in screen(running_state())


def test_alert_for_non_finite_loss() -> None:
    st = running_state()
    for i in range(3):
        st.add_batch(batch_record(step=901 + i, batch=400 + i, loss=None, time=NOW))

    assert "⚠ non-finite loss at step 903 (3 in a row)" in screen(st)


def test_alert_when_no_step_comes() -> None:
    st = running_state()
    st.last_step_at = NOW - 95

    assert "⚠ no step for 95 s" in screen(st)
    st.state = "validating"  # a long validation is not a stall
    assert "no step" not in screen(st)


def test_alert_when_data_wait_is_over_the_threshold() -> None:
    st = running_state()
    st.data_wait_share = 0.3

    assert "⚠ data wait 30% of step time (over 10%)" in screen(st)


def test_data_wait_share_from_batches_without_a_status() -> None:
    st = DashboardState()
    for i in range(60):
        record = batch_record(
            step=i + 1, batch=i, time=NOW, data_wait_ms=40, step_ms=60
        )
        st.apply("batch", record, now=NOW)  # live: a stopped run raises no alert

    assert st.wait_share() == pytest.approx(0.4)
    assert any(
        "data wait 40%" in a for a in st.alerts(now=NOW, thresholds=Thresholds())
    )


def test_alert_for_low_disk() -> None:
    st = running_state()
    st.disk_free = 100 << 20

    assert "⚠ low disk: 100.0 MiB free on /s" in screen(st)


def test_finished_job_says_so() -> None:
    st = running_state()
    st.apply("state", {"run": "demo", "state": "finished"}, now=NOW)

    assert "■ job finished: run demo" in screen(st)


def test_failed_job_gives_the_reason() -> None:
    st = running_state()
    st.apply("state", {"run": "demo", "state": "failed", "reason": "5 NaN"}, now=NOW)

    assert "■ job failed: run demo: 5 NaN" in screen(st)


def test_silence_says_the_trainer_may_not_run() -> None:
    st = running_state()
    st.last_message_at = NOW - 12

    assert "■ no messages for 12 s: trainer not running?" in screen(st)


def stopped_from_files() -> DashboardState:
    """Run demo read from its files, then said by the daemon to run no trainer."""
    st = running_state()
    st.live = False
    st.last_message_at = None
    st.watch_started_at = NOW - 4
    st.state, st.reason = "stopped", "no trainer running"
    return st


def test_a_stopped_run_says_where_it_stopped_without_rates() -> None:
    text = screen(stopped_from_files())

    notice = "■ job stopped: run demo at epoch 2/5, step 400/500; no trainer running"
    assert notice in text
    step = line_with(text, "step 400/500")
    assert "- samples/s ETA -" in step
    assert "812" not in text
    assert "run ETA -" in line_with(text, "epoch 2/5")
    assert "data wait  -" in text


def test_a_silent_trainer_shows_no_rates() -> None:
    st = running_state()
    st.last_message_at = NOW - 12

    assert "- samples/s ETA -" in line_with(screen(st), "step 400/500")
    line = dash.status_line(st, now=NOW)
    assert "samples/s" not in line
    assert "ETA" not in line
    assert "[no messages for 12 s: trainer not running?]" in line


def test_status_line_of_a_stopped_run_has_no_rates() -> None:
    line = dash.status_line(stopped_from_files(), now=NOW)

    assert "run demo  stopped  epoch 2/5  step 400/500  loss 0.500" in line
    assert "samples/s" not in line
    assert "ETA" not in line
    assert "wait " not in line
    assert line.endswith(
        "[job stopped: run demo at epoch 2/5, step 400/500; no trainer running]"
    )


def test_a_stopped_run_raises_no_data_wait_alert() -> None:
    st = stopped_from_files()
    st.data_wait_share = 0.3

    assert st.alerts(now=NOW, thresholds=Thresholds()) == []


def resumed_metrics(path) -> None:
    """Steps 1-30, a crash, a resume at the checkpoint of step 20, steps 21-25."""
    rows = [batch_record(step=s, batch=s - 1, loss=1.0, time=NOW) for s in range(1, 31)]
    rows.append({"event": "resumed", "run": "demo", "step": 20, "time": NOW})
    rows += [
        batch_record(step=s, batch=s - 1, loss=0.25, time=NOW) for s in range(21, 26)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_history_keeps_the_replayed_steps_after_a_resume(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    resumed_metrics(path)
    st = DashboardState()
    st.load_history(read_records(path, max_bytes=1 << 20), [])

    assert st.global_step == 25
    assert st.done == 25
    assert len(st.loss_curve) == 25  # 1-20 once, then the replayed 21-25
    assert st.last_loss == 0.25
    assert st.nonfinite_in_row == 0  # the marker is no batch without a loss
    kept = dash.latest_batches(read_records(path, max_bytes=1 << 20))
    assert [r["step"] for r in kept] == list(range(1, 26))
    assert {r["loss"] for r in kept[20:]} == {0.25}


def test_history_without_a_marker_keeps_the_latest_of_each_step() -> None:
    rows = [batch_record(step=s, batch=s - 1, loss=1.0, time=NOW) for s in (1, 2, 3)]
    rows += [batch_record(step=s, batch=s - 1, loss=0.5, time=NOW) for s in (2, 3, 4)]
    rows.append({"step": 9, "note": "not a batch"})

    kept = dash.latest_batches(rows)

    assert [(r["step"], r["loss"]) for r in kept] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.5),
        (4, 0.5),
    ]
    assert [r["step"] for r in dash.latest_batches(rows, resumed_at=2)] == [1, 2]


def test_watcher_replaces_replayed_steps_when_the_trainer_resumes(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "s"
    run = state / "runs" / "demo"
    run.mkdir(parents=True)
    resumed_metrics(run / "metrics.jsonl")
    # The daemon is not asked: no control socket under this runtime directory.
    watcher = Watcher(
        state_dir=state,
        runtime_dir=tmp_path / "r",
        run_id=None,
        thresholds=Thresholds(),
        gpus=False,
    )
    try:
        watcher.attach()
        assert watcher.st.run == "demo" and watcher.st.global_step == 25
        for step in (24, 25, 26, 27):  # the files already hold 24 and 25
            watcher._take("batch", batch_record(step=step, batch=step - 1, time=NOW))
        assert watcher.st.global_step == 27
        assert len(watcher.st.loss_curve) == 27

        # The trainer died and came back at its checkpoint of step 25: its status
        # says so before its first batch, and the steps after it are dropped.
        status = status_record(step=25, global_step=25, n_batches=500)
        watcher._take("status", status)
        assert watcher.st.global_step == 25
        assert len(watcher.st.loss_curve) == 25
        watcher._take("batch", batch_record(step=26, batch=25, time=NOW))
        assert (watcher.st.global_step, len(watcher.st.loss_curve)) == (26, 26)
        assert watcher.st.live
    finally:
        watcher.close()


def test_gpu_panel_hidden_without_a_gpu() -> None:
    for width in (80, 120):
        text = screen(running_state(), width=width)
        assert "GPU" not in text
        assert "gpu 0" not in text


def test_gpu_panel_with_a_gpu() -> None:
    st = running_state()
    st.gpus = [GpuReading(0, "H200", 87.0, 12 << 30, 141 << 30, 64.0)]
    wide = screen(st, width=120)

    assert "GPU" in wide
    assert "87%" in wide
    assert "12.0/141" in wide
    assert "64°C" in wide
    # Narrow terminals show the same figures inside the job panel.
    assert "gpu 0      87%  12.0/141 GiB  64°C" in screen(st)


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 30), (120, 40)])
def test_fits_the_terminal(width: int, height: int) -> None:
    st = running_state()
    st.gpus = [GpuReading(0, "H200", 87.0, 12 << 30, 141 << 30, 64.0)]
    st.data_wait_share = 0.3
    text = screen(st, width=width, height=height)
    lines = text.rstrip("\n").split("\n")

    assert len(lines) == height
    assert max(cell_len(line) for line in lines) <= width
    # Every panel is whole: as many bottom corners as top ones.
    assert text.count("╭") == text.count("╰") == 5 if width >= 110 else 4
    for needle in ("run demo", "step 400/500", "◀ best", "producers", "⚠ data wait"):
        assert needle in text


def test_status_line_for_plain_output() -> None:
    line = dash.status_line(running_state(), now=NOW)

    assert "run demo" in line
    assert "training" in line
    assert "epoch 2/5" in line
    assert "step 400/500" in line
    assert "loss 0.500" in line
    assert "val accuracy 0.410 (best 0.410 @ 1)" in line
    assert "812 samples/s" in line
    assert "ETA 26:40" in line
    assert "\n" not in line


def test_history_lines_mark_the_best_epoch() -> None:
    st = DashboardState(run="old", epochs=3)
    for epoch, acc in ((1, 0.41), (2, 0.63), (3, 0.58)):
        st.add_validation(val_record(epoch, 1.5 - acc, acc, acc - 0.02))
    lines = list(dash.history_lines(st))

    assert lines[0].startswith("run old")
    assert "epochs 3/3" in lines[0]
    assert lines[2] == "epoch   2  loss 0.870  acc 0.630  F1 0.610  <- best"
    assert "best" not in lines[1] + lines[3]


def test_live_messages_follow_history() -> None:
    st = DashboardState()
    st.load_history(
        [batch_record(step=1, batch=0, time=NOW - 10)],
        [val_record(1, 1.0, 0.5, 0.5)],
        config={"name": "demo", "train": {"epochs": 4}, "checkpoint": {}},
    )
    st.apply("batch", batch_record(step=2, batch=1, time=NOW), now=NOW)
    st.apply("val", val_record(2, 0.9, 0.6, 0.55), now=NOW)

    assert (st.global_step, st.done, st.epochs, st.config_name) == (2, 2, 4, "demo")
    assert sorted(st.validation) == [1, 2]
    assert st.best_val is not None and st.best_val["epoch"] == 2
    assert st.live


def test_sparkline_scales_and_buckets() -> None:
    assert dash.sparkline(list(range(8)), 8) == "▁▂▃▄▅▆▇█"
    assert dash.sparkline(list(range(16)), 8) == "▁▂▃▄▅▆▇█"  # pairs averaged
    assert dash.sparkline([3.0, 3.0], 8) == "▄▄"
    assert dash.sparkline([], 8) == ""
    assert dash.block_chart([0.0, 1.0], 2, rows=2) == [" █", "▁█"]


def test_durations_and_ages() -> None:
    assert dash.format_duration(100) == "1:40"
    assert dash.format_duration(3723) == "1:02:03"
    assert dash.format_duration(None) == "-"
    assert dash.format_age(75) == "1m"
    assert dash.format_age(7200) == "2h"


def test_gpu_probe_without_nvidia_ml_py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    probe = GpuProbe()

    assert probe.read() == []
    probe.close()


def test_gpu_probe_reads_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            used=2 << 30, total=8 << 30
        ),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=55),
        nvmlDeviceGetTemperature=lambda h, kind: 61,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()

    assert probe.read() == [GpuReading(0, "NVIDIA H200", 55.0, 2 << 30, 8 << 30, 61.0)]
    probe.close()


def test_key_reader_reads_keys_and_restores_the_terminal() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "rb", buffering=0) as stream:
        before = termios.tcgetattr(follower)
        with KeyReader(stream) as keys:
            assert not termios.tcgetattr(follower)[3] & termios.ICANON
            assert keys.read() == ""
            os.write(leader, b"q")
            assert keys.read() == "q"
        assert termios.tcgetattr(follower) == before
    os.close(leader)


def test_read_records_skips_a_cut_line_and_reads_the_tail(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i}) for i in range(100)]
    path.write_text("\n".join(lines) + '\n{"step": 10')

    assert [r["step"] for r in read_records(path, max_bytes=1 << 20)] == list(
        range(100)
    )
    tail = read_records(path, max_bytes=60)
    assert tail and tail[-1]["step"] == 99 and len(tail) < 10
    assert read_records(tmp_path / "absent.jsonl", max_bytes=10) == []


def test_watch_modules_keep_torch_out() -> None:
    code = (
        "import sys, trainerd.daemon.cmd_watch as w, trainerd.daemon.dashboard; "
        "w.Watcher; print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr
