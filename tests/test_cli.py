"""trainerctl from outside: its commands and flags, and what each says without a daemon."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trainerd.daemon.cli import build_parser

# Changing a command or a flag is a decision: update this list with it.
COMMANDS = {
    "evaluate": [
        "--batch-size",
        "--columns",
        "--device",
        "--format",
        "--frames",
        "--help",
        "--id-field",
        "--json",
        "--label-field",
        "--model",
        "--split",
        "--text-field",
        "--title-field",
        "--vote",
        "--windows",
        "-h",
        "-m",
        "input",
    ],
    "import": [
        "--alphabet",
        "--columns",
        "--force",
        "--format",
        "--help",
        "--keep-case",
        "--label-field",
        "--no-progress",
        "--out",
        "--seed",
        "--text-field",
        "--title-field",
        "--val",
        "--val-fraction",
        "-h",
        "source",
    ],
    "start": ["--config", "--foreground", "--help", "--resume", "-c", "-h"],
    "status": ["--help", "--json", "-h"],
    "stop": ["--help", "--now", "--timeout", "-h"],
    "vote": [
        "--batch-size",
        "--columns",
        "--device",
        "--format",
        "--help",
        "--id-field",
        "--label-field",
        "--model",
        "--output",
        "--text-field",
        "--title-field",
        "--top-k",
        "--vote",
        "--windows",
        "-h",
        "-m",
        "-o",
        "input",
    ],
    "watch": [
        "--help",
        "--interval",
        "--plain",
        "--run",
        "--runtime-dir",
        "--stall-after",
        "--state-dir",
        "-h",
    ],
}


def commands_and_flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sorted(
                    flag
                    for each in sub._actions
                    for flag in (each.option_strings or [each.dest])
                )
    return found


def test_the_commands_and_flags_are_pinned():
    assert commands_and_flags(build_parser()) == COMMANDS


@pytest.fixture
def env():
    root = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    values = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(root / "state"),
        TRAINERD_RUNTIME_DIR=str(root / "run"),
        COLUMNS="100",
    )
    for name in ("NOTIFY_SOCKET", "TRAINERD_CONTROL", "TRAINERD_CURVE_KEYS"):
        values.pop(name, None)
    values["_root"] = str(root)
    yield values
    shutil.rmtree(root, ignore_errors=True)


def trainerctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainerd.daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def not_running(env: dict[str, str]) -> str:
    return (
        f"trainerd is not running (no control socket at {env['_root']}/run/"
        "control.sock); start it with 'systemctl start trainerd', or run a job in "
        "this terminal with 'trainerctl start --foreground -c CONFIG'"
    )


@pytest.fixture
def corpus(env):
    from trainerd.producers.demo import write_demo_corpus

    return write_demo_corpus(Path(env["_root"]) / "corpus", n_posts=80)


def write_config(env: dict[str, str], text: str) -> Path:
    path = Path(env["_root"]) / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_on_every_command(env, command):
    out = trainerctl(env, command, "--help")
    assert out.returncode == 0
    assert out.stdout.startswith(f"usage: trainerctl {command} ")
    assert out.stderr == ""


def test_start_help_lists_every_job_setting_with_its_default(env):
    from trainerd.daemon.config import job_settings

    out = trainerctl(env, "start", "--help").stdout
    paths = [path for path, _ in job_settings()]
    assert len(paths) >= 40 and "data.producers" in paths and "corpus" in paths
    for path in paths:
        assert f"\n  {path} (" in out, path
    assert "\n  train.lr (0.01): Peak learning rate.\n" in out
    assert "\n  corpus (required): " in out
    assert "\n  data.producers (depends on the machine): " in out


def test_status_without_daemon(env):
    out = trainerctl(env, "status")
    assert (out.returncode, out.stderr) == (4, "")
    assert out.stdout == f"trainerd: down: {not_running(env)}\n"


def test_status_json_without_daemon(env):
    out = trainerctl(env, "status", "--json")
    assert (out.returncode, out.stderr) == (4, "")
    assert json.loads(out.stdout) == {
        "daemon": None,
        "job": None,
        "error": not_running(env),
    }


def test_stop_without_daemon(env):
    out = trainerctl(env, "stop")
    assert (out.returncode, out.stdout) == (4, "")
    assert out.stderr == f"trainerctl stop: error: {not_running(env)}\n"


def test_start_without_daemon(env, corpus):
    config = write_config(env, f"name: t\ncorpus: {corpus}\n")
    out = trainerctl(env, "start", "-c", str(config))
    assert (out.returncode, out.stdout) == (4, "")
    assert out.stderr == f"trainerctl start: error: {not_running(env)}\n"


def test_start_with_an_unknown_key(env, corpus):
    config = write_config(env, f"corpus: {corpus}\ndata:\n  batchsize: 3\n")
    out = trainerctl(env, "start", "-c", str(config))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (
        f"trainerctl start: error: {config}: data.batchsize: unknown setting; valid "
        "here: length, batch_size, drop_last, wire, producers, ring_slots, shm_dir, "
        "wait_timeout_s, verify, max_producer_restarts\n"
    )


def test_start_with_a_wrong_type(env, corpus):
    config = write_config(env, f"corpus: {corpus}\ntrain:\n  epochs: ten\n")
    out = trainerctl(env, "start", "-c", str(config))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith(f"trainerctl start: error: {config}: train.epochs: ")
    assert "'ten'" in out.stderr
    assert out.stderr.count("\n") == 1


def test_start_with_a_missing_corpus(env):
    missing = Path(env["_root"]) / "nowhere"
    config = write_config(env, f"corpus: {missing}\n")
    out = trainerctl(env, "start", "-c", str(config))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (
        f"trainerctl start: error: corpus {missing}: no meta.json there; create one "
        f"with 'trainerctl import SOURCE --out {missing}'\n"
    )


def test_start_with_a_missing_config(env):
    out = trainerctl(env, "start", "-c", "/nonexistent/job.yaml")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (
        "trainerctl start: error: /nonexistent/job.yaml: no such config file\n"
    )


def test_foreground_with_an_unwritable_state_dir(env, corpus):
    blocker = Path(env["_root"]) / "file"
    blocker.write_text("")
    env = dict(env, TRAINERD_STATE_DIR=str(blocker / "state"))
    config = write_config(env, f"name: t\ncorpus: {corpus}\n")
    out = trainerctl(env, "start", "--foreground", "-c", str(config))
    assert (out.returncode, out.stdout) == (4, "")
    assert out.stderr == (
        f"trainerctl start: error: state directory {blocker / 'state'}: not writable "
        "(Not a directory); fix its owner or set TRAINERD_STATE_DIR to a directory of "
        "your own\n"
    )


def test_foreground_with_a_missing_resume_checkpoint(env, corpus):
    config = write_config(env, f"name: t\ncorpus: {corpus}\n")
    missing = Path(env["_root"]) / "gone.pt"
    out = trainerctl(
        env, "start", "--foreground", "-c", str(config), "--resume", str(missing)
    )
    assert (out.returncode, out.stdout) == (6, "")
    assert out.stderr == (
        f"trainerctl start: error: --resume {missing}: no such checkpoint file\n"
    )
    # Nothing was left behind.
    assert sorted(os.listdir(Path(env["_root"]) / "run")) == []


def status_reply(**job):
    daemon = {"uptime_s": 75, "pid": 4242, "foreground": False, "runtime_dir": "/r"}
    base = {
        "run": "t",
        "state": "training",
        "running": True,
        "outcome": None,
        "reason": None,
        "epoch": 2,
        "epochs": 8,
        "step": 32,
        "n_batches": 128,
        "global_step": 160,
        "restarts": 0,
        "max_restarts": 3,
        "producers": [
            {"id": 0, "state": "running", "restarts": 0},
            {"id": 1, "state": "running", "restarts": 0},
        ],
    }
    return {"daemon": daemon, "job": {**base, **job}}


def status_field(reply, name):
    from trainerd.daemon.cmd_job import _render

    lines = _render(reply)
    return next(line for line in lines if line.startswith(f"{name}:")).split(":", 1)[1]


def test_status_names_each_producer_and_counts_restarts():
    reply = status_reply()
    assert status_field(reply, "producers").strip() == (
        "#0 running, #1 running (restarts 0)"
    )
    reply["job"]["producers"][1].update(state="restarting", restarts=2)
    assert status_field(reply, "producers").strip() == (
        "#0 running, #1 restarting (restarts 2: #1 2)"
    )


def test_status_progress_of_a_running_job():
    assert status_field(status_reply(), "progress").strip() == (
        "epoch 2/8, step 32/128 (25% of the epoch, 16% of the run)"
    )


def test_status_progress_without_the_epochs_length():
    # A trainer that failed before planning its epoch knows no batch count.
    reply = status_reply(
        state="failed", running=False, epoch=8, step=128, n_batches=0, reason="x"
    )
    assert status_field(reply, "progress").strip() == "epoch 8/8, step -"
    reply = status_reply(state="failed", running=False, epoch=None, reason="x")
    assert status_field(reply, "progress").strip() == "-"
