"""The service end to end, on real posts: daemon, trainerctl, crashes, recovery.

The daemon runs as a process of its own on temporary state and runtime directories.
A short job trains on a subset of 20 Newsgroups (the demo corpus where the data is
absent). Mid-run a producer and then the trainer are killed with SIGKILL; the job
must carry on, and the batches trained over the whole run must be every training
post exactly once per epoch, in the planned order. Every wait polls a condition
with a deadline.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainerd.daemon.control import request
from trainerd.producers.errors import DaemonError

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "20newsgroups-bydate"
DEADLINE_S = 60.0
CONFIG = """\
name: {name}
corpus: {corpus}
data: {{length: 192, batch_size: 16, producers: 2, ring_slots: 3}}
model: {{preset: default, features: 16, hidden: 16}}
train: {{epochs: 200, seed: 7, optimizer: adamw, lr: 0.003, schedule: constant,
        threads: 1}}
checkpoint: {{every_steps: 4, max_restarts: 2, restart_window_min: 10}}
metrics: {{flush_s: 0.2, log_every_steps: 100}}
"""


def subset(source: Path, out: Path, *, every: int) -> None:
    """Every n-th record of a gzip JSON-lines file (they are sorted by label)."""
    with gzip.open(source, "rt", encoding="utf-8") as f, out.open("w") as g:
        for i, line in enumerate(f):
            if i % every == 0:
                g.write(line)


@pytest.fixture(scope="module")
def workdir():
    root = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    out = workdir / "corpus"
    if (DATA / "train.jsonl.gz").exists():
        subset(DATA / "train.jsonl.gz", workdir / "train.jsonl", every=36)
        subset(DATA / "test.jsonl.gz", workdir / "val.jsonl", every=60)
        done = trainerctl(
            {},
            "import",
            str(workdir / "train.jsonl"),
            "--val",
            str(workdir / "val.jsonl"),
            "--out",
            str(out),
            "--no-progress",
        )
        assert done.returncode == 0, done.stderr
    else:
        from trainerd.producers.demo import write_demo_corpus

        write_demo_corpus(out, n_posts=400)
    return out


@pytest.fixture
def service(workdir):
    """Environment of one daemon; whatever it leaves running is killed at the end."""
    name = f"e2e{os.getpid()}x{len(list(workdir.iterdir()))}"
    home = workdir / name
    env = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(home / "state"),
        TRAINERD_RUNTIME_DIR=str(home / "run"),
    )
    for key in ("NOTIFY_SOCKET", "TRAINERD_CONTROL", "WATCHDOG_USEC"):
        env.pop(key, None)
    seen: list[int] = []
    yield {"name": name, "home": home, "env": env, "pids": seen}
    for pid in seen:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def trainerctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainerd.daemon.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_daemon(service: dict[str, Any]) -> subprocess.Popen:
    service["home"].mkdir(exist_ok=True)
    log = (service["home"] / "daemon.log").open("ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "trainerd.daemon.service"],
        env=service["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    service["pids"].append(daemon.pid)
    wait_for(service, lambda s: s is not None, "the daemon to answer")
    return daemon


def status(service: dict[str, Any]) -> dict[str, Any] | None:
    """What `trainerctl status --json` prints, asked in this process (cheaper)."""
    endpoint = f"ipc://{service['home'] / 'run' / 'control.sock'}"
    try:
        return request("status", endpoint=endpoint, timeout_s=2.0)
    except DaemonError:
        return None


def wait_for(
    service: dict[str, Any],
    condition: Callable[[dict[str, Any] | None], bool],
    what: str,
    *,
    deadline_s: float = DEADLINE_S,
) -> dict[str, Any] | None:
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        last = status(service)
        if condition(last):
            return last
        job = (last or {}).get("job") or {}
        assert job.get("state") != "failed", job.get("reason")
        time.sleep(0.1)
    log = (service["home"] / "daemon.log").read_text()[-3000:]
    raise AssertionError(f"timed out waiting for {what}; last status {last}\n{log}")


def job_of(reply: dict[str, Any] | None) -> dict[str, Any]:
    return (reply or {}).get("job") or {}


def mid_epoch(job: dict[str, Any]) -> bool:
    """Training, with batches of this epoch both behind and ahead."""
    n_batches = job.get("n_batches") or 0
    return job.get("state") == "training" and 2 <= job.get("step", 0) <= n_batches - 6


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_gone(pids: list[int], deadline_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def leftovers(home: Path) -> list[str]:
    """Processes whose command line names this test's directories."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(home).encode() in cmdline:
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def segments(name: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if name in n)


def effective_batches(metrics: Path) -> list[dict[str, Any]]:
    """The batches behind the final weights: a restart resumes at its checkpoint's
    step, so records logged after that step by the dead trainer are dropped. The
    trainer's `resumed` markers say where; the batch records alone suffice here."""
    kept: list[dict[str, Any]] = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            continue
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
        kept.append(record)
    return kept


def check_planned_order(corpus: Path, config_file: Path, batches: list[dict]) -> int:
    """Each epoch trained batch 0..n-1 in order with the planned posts; returns the
    number of complete epochs."""
    from trainerd.daemon.config import load_config
    from trainerd.model.train import ids_digest
    from trainerd.producers.corpus import Corpus
    from trainerd.producers.plans import train_plan

    config = load_config(config_file)
    store = Corpus.open(corpus)
    steps = [b["step"] for b in batches]
    assert steps == list(range(1, len(batches) + 1))
    complete = 0
    for epoch in sorted({b["epoch"] for b in batches}):
        plan = train_plan(
            store,
            config.data,
            run_id=config.name,
            seed=config.train.seed,
            epoch=epoch,
            seq=0,
        )
        trained = [b for b in batches if b["epoch"] == epoch]
        assert [b["batch"] for b in trained] == list(range(len(trained)))
        for b in trained:
            ids = plan.batch_ids(b["batch"])
            assert b["ids"] == ids_digest(ids), (epoch, b["batch"])
            assert b["first_id"] == int(ids[0])
        if len(trained) == plan.n_batches:
            complete += 1
            posts = np.concatenate([plan.batch_ids(b) for b in range(plan.n_batches)])
            assert np.array_equal(np.sort(posts), np.sort(store.train_ids))
            assert np.unique(posts).size == store.train_ids.size
    return complete


def test_job_survives_a_producer_and_a_trainer_killed(corpus, service):
    name, home, env = service["name"], service["home"], service["env"]
    home.mkdir()
    config_file = home / "job.yaml"
    config_file.write_text(CONFIG.format(name=name, corpus=corpus))
    run_dir = home / "state" / "runs" / name
    daemon = start_daemon(service)

    # No job yet: status says so, exit 3.
    idle = trainerctl(env, "status", "--json")
    assert idle.returncode == 3, idle.stderr
    assert json.loads(idle.stdout)["job"] is None

    started = trainerctl(env, "start", "-c", str(config_file))
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith(f"started run {name}: {run_dir}\n")
    again = trainerctl(env, "start", "-c", str(config_file))
    assert again.returncode == 4
    assert again.stderr.startswith(f"trainerctl start: error: run {name} is already ")

    # Through epoch 1 and its validation, then a kill in the middle of an epoch.
    reply = wait_for(
        service,
        lambda s: (
            (job_of(s).get("last_val") or {}).get("epoch", 0) >= 1
            and mid_epoch(job_of(s))
        ),
        "epoch 1 validated and the middle of a later epoch",
    )
    running = trainerctl(env, "status", "--json")
    assert running.returncode == 0
    assert json.loads(running.stdout)["job"]["run"] == name
    job = job_of(reply)
    service["pids"] += [job["trainer_pid"], *(p["pid"] for p in job["producers"])]

    # A producer dies mid-epoch: the trainer restarts it at the batch it owed.
    victim = job["producers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    reply = wait_for(
        service,
        lambda s: (
            any(
                p["id"] == victim["id"]
                and p["restarts"] >= 1
                and p["state"] == "running"
                for p in job_of(s).get("producers") or []
            )
            and job_of(s).get("global_step", 0) > job["global_step"] + 2
        ),
        "the producer restarted and training on",
    )
    service["pids"] += [p["pid"] for p in job_of(reply)["producers"]]

    # The trainer dies mid-epoch after a checkpoint: the daemon restarts it from
    # there.
    reply = wait_for(
        service,
        lambda s: job_of(s).get("last_checkpoint") is not None and mid_epoch(job_of(s)),
        "a checkpoint, in the middle of an epoch",
    )
    before = job_of(reply)
    old_group = [before["trainer_pid"], *(p["pid"] for p in before["producers"])]
    killed_at = time.monotonic()
    os.kill(before["trainer_pid"], signal.SIGKILL)
    reply = wait_for(
        service,
        lambda s: (
            job_of(s).get("restarts") == 1
            and job_of(s).get("trainer_pid") not in (None, before["trainer_pid"])
            and job_of(s).get("state") == "training"
            and job_of(s).get("global_step", 0) > before["global_step"]
        ),
        "the trainer restarted and training past the point it died",
    )
    recovered_s = time.monotonic() - killed_at
    assert wait_gone(old_group, 5.0) == []
    print(f"recovery after SIGKILL of the trainer: {recovered_s:.1f} s")
    job = job_of(reply)
    service["pids"] += [job["trainer_pid"], *(p["pid"] for p in job["producers"])]
    assert segments(f"{name}-{before['trainer_pid']}-") == []

    # Stop in the middle of an epoch: exit 0 and a checkpoint that loads.
    reply = wait_for(service, lambda s: mid_epoch(job_of(s)), "the middle of an epoch")
    stopped = trainerctl(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    lines = stopped.stdout.splitlines()
    assert lines[0] == f"stopping run {name}"
    assert lines[1].startswith(f"run {name} stopped at epoch ")
    checkpoint = Path(lines[2].removeprefix("last checkpoint: "))
    assert checkpoint == run_dir / "checkpoints" / "last.pt"
    from trainerd.model.checkpoint import read_checkpoint

    payload = read_checkpoint(checkpoint)
    cursor = payload["cursor"]
    assert lines[1] == (
        f"run {name} stopped at epoch {cursor['epoch']}, step {cursor['batch']}"
    )
    after = trainerctl(env, "status", "--json")
    assert after.returncode == 3
    final = json.loads(after.stdout)["job"]
    assert final["outcome"] == "stopped"
    # Status ends on the stop's own checkpoint and step, not on an earlier one.
    assert final["last_checkpoint"]["path"] == str(checkpoint)
    assert final["last_checkpoint"]["time"] >= checkpoint.stat().st_mtime - 1
    assert final["global_step"] == payload["step"]

    # Every training post once per epoch, in the planned order, across both kills.
    batches = effective_batches(run_dir / "metrics.jsonl")
    assert batches[-1]["step"] == payload["step"]
    complete = check_planned_order(corpus, run_dir / "config.yaml", batches)
    assert complete >= 1
    validations = [
        json.loads(line)["epoch"]
        for line in (run_dir / "validation.jsonl").read_text().splitlines()
    ]
    # A stop right after an epoch's last batch leaves its validation to the resume.
    pending = cursor["epoch"] == complete and not cursor["validated"]
    assert sorted(set(validations)) == list(range(1, complete + 1 - pending))

    # SIGTERM: the daemon exits 0 and leaves nothing behind.
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert wait_gone(service["pids"]) == []
    assert leftovers(home) == []
    assert os.listdir(home / "run") == []
    assert segments(name) == []


def test_killed_daemon_leaves_nothing_and_the_next_start_reclaims(corpus, service):
    name, home, env = service["name"], service["home"], service["env"]
    home.mkdir()
    config_file = home / "job.yaml"
    config_file.write_text(CONFIG.format(name=name, corpus=corpus))
    daemon = start_daemon(service)
    started = trainerctl(env, "start", "-c", str(config_file))
    assert started.returncode == 0, started.stderr
    reply = wait_for(
        service,
        lambda s: (
            job_of(s).get("state") == "training"
            and len(job_of(s).get("producers") or []) == 2
        ),
        "training",
    )
    job = job_of(reply)
    children = [job["trainer_pid"], *(p["pid"] for p in job["producers"])]
    service["pids"] += children
    assert segments(name) != []

    killed_at = time.monotonic()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    # The trainer notices its parent is gone, checkpoints and stops its producers.
    assert wait_gone(children) == []
    print(
        f"children gone after SIGKILL of the daemon: {time.monotonic() - killed_at:.1f} s"
    )
    assert (home / "run" / "control.sock").exists()
    assert leftovers(home) == []

    # The next daemon reclaims the stale socket and any segment left behind (and
    # resumes the job: test_daemon_resume.py).
    daemon = start_daemon(service)
    assert segments(f"{name}-{job['trainer_pid']}-") == []
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    log = (home / "daemon.log").read_text()
    assert f"reclaimed: stale socket {home / 'run' / 'control.sock'}" in log
    assert os.listdir(home / "run") == []
    assert leftovers(home) == []


def test_sigterm_checkpoints_the_running_job_and_exits_0(corpus, service):
    name, home, env = service["name"], service["home"], service["env"]
    home.mkdir()
    config_file = home / "job.yaml"
    config_file.write_text(CONFIG.format(name=name, corpus=corpus))
    run_dir = home / "state" / "runs" / name
    daemon = start_daemon(service)
    started = trainerctl(env, "start", "-c", str(config_file))
    assert started.returncode == 0, started.stderr
    reply = wait_for(service, lambda s: mid_epoch(job_of(s)), "the middle of an epoch")
    job = job_of(reply)
    children = [job["trainer_pid"], *(p["pid"] for p in job["producers"])]
    service["pids"] += children

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    assert wait_gone(children) == []
    # The checkpoint holds the next batch after the last one trained.
    from trainerd.model.checkpoint import read_checkpoint

    payload = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    last = effective_batches(run_dir / "metrics.jsonl")[-1]
    assert payload["step"] == last["step"]
    cursor = payload["cursor"]
    assert (cursor["epoch"], cursor["batch"]) == (last["epoch"], last["batch"] + 1)
    log = (home / "daemon.log").read_text()
    assert "shutdown requested: stopping the job after its step" in log
    assert f"run {name}: stopping -> idle (stopped)" in log
    assert leftovers(home) == []
    assert os.listdir(home / "run") == []
    assert segments(name) == []


def test_a_checkpoint_of_another_alphabet_is_refused(corpus, workdir, service):
    """--foreground on a corpus whose alphabet differs from the checkpoint's."""
    source = workdir / "train.jsonl"
    if not source.exists():
        pytest.skip("needs the 20 Newsgroups subset to import with --keep-case")
    name, home, env = service["name"], service["home"], service["env"]
    home.mkdir()
    first = home / "first.yaml"
    first.write_text(
        CONFIG.format(name=name, corpus=corpus).replace("epochs: 200", "epochs: 1")
    )
    done = trainerctl(env, "start", "--foreground", "-c", str(first))
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = home / "state" / "runs" / name / "checkpoints" / "last.pt"
    assert checkpoint.is_file()

    # The same posts, case kept: the alphabet gains A-Z.
    cased = home / "cased"
    imported = trainerctl(
        env,
        *("import", str(source), "--val", str(workdir / "val.jsonl")),
        *("--keep-case", "--out", str(cased), "--no-progress"),
    )
    assert imported.returncode == 0, imported.stderr
    second = home / "second.yaml"
    second.write_text(CONFIG.format(name=f"{name}b", corpus=cased))
    refused = trainerctl(
        env, "start", "--foreground", "-c", str(second), "--resume", str(checkpoint)
    )
    assert refused.returncode == 6
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"trainerctl start: error: run {name}b failed: trainer exit code 6: "
        f"checkpoint {checkpoint} does not match this job; differences: "
    )
    assert "corpus fingerprint" in last
    assert os.listdir(home / "run") == []
    assert segments(name) == []
