"""A job outlives its daemon: a killed or restarted trainerd resumes it.

The daemon records its accepted job in the state directory (job.json) and keeps the
record until the job finishes, fails or is stopped with `trainerctl stop`. The first
tests drive the supervisor with stand-in trainers (test_supervisor.py); the slow ones
start the real daemon on the demo corpus, kill or stop it mid-run, start it again
and follow the same run with `trainerctl status`. Every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import test_service_e2e as e2e
import test_supervisor as stand_in
from test_service_e2e import (
    CONFIG,
    check_planned_order,
    effective_batches,
    job_of,
    leftovers,
    mid_epoch,
    segments,
    start_daemon,
    trainerctl,
    wait_for,
    wait_gone,
)
from test_supervisor import PUBLISHES, config, make, recording, supervise

from trainerd.daemon.record import (
    RECORD_NAME,
    JobRecord,
    read_record,
    record_path,
    write_record,
)
from trainerd.daemon.states import JobState
from trainerd.model.checkpoint import read_checkpoint

# The fixtures of the end-to-end and the supervisor tests, shared here.
workdir, service = e2e.workdir, e2e.service
dirs, context = stand_in.dirs, stand_in.context
RESUMING = "resuming: run {} from its last checkpoint (interrupted by a daemon restart)"


# The supervisor and its record, with stand-in trainers.


def test_the_record_lives_until_the_user_stops_the_job(dirs, context):
    state = dirs / "state"
    sup = make([PUBLISHES.format(runtime=dirs / "run")], dirs, context)
    try:
        sup.start(config(dirs), resume="none")
        found = read_record(state)
        job_file = state / "runs" / "t" / "job.yaml"
        assert found == JobRecord(
            run="t",
            job_file=str(job_file),
            resume="none",
            accepted=sup.job.started,
            trainer_pid=sup.job.trainer.pid,
        )
        supervise(sup, JobState.TRAINING)
        # The daemon's shutdown stops the job but keeps it recorded.
        sup.shutdown(now=True)
        supervise(sup, JobState.IDLE)
        assert read_record(state) == found
    finally:
        sup.close()

    # The next daemon starts it again from its last checkpoint; the policy it was
    # submitted with holds while the run has no checkpoint of its own.
    again = make([PUBLISHES.format(runtime=dirs / "run")], dirs, context)
    resumes = recording(again)
    try:
        again.resume_recorded()
        assert (again.job.run, again.job.config_file) == ("t", job_file)
        assert resumes == ["none"]
        supervise(again, JobState.TRAINING)
        assert read_record(state).trainer_pid == again.job.trainer.pid
        # The user's stop ends it for good.
        again.stop(now=True)
        supervise(again, JobState.IDLE)
        assert not record_path(state).exists()
    finally:
        again.close()


def test_a_finished_job_is_forgotten_and_a_foreground_one_never_recorded(dirs, context):
    sup = make(["pass"], dirs, context)
    try:
        sup.start(config(dirs))
        assert record_path(dirs / "state").exists()
        supervise(sup, JobState.FINISHED)
        assert not record_path(dirs / "state").exists()
    finally:
        sup.close()
    foreground = make(["pass"], dirs, context)
    foreground.keep_record = False
    try:
        foreground.start(config(dirs))
        assert not record_path(dirs / "state").exists()
        supervise(foreground, JobState.FINISHED)
    finally:
        foreground.close()


@pytest.mark.parametrize(
    "text",
    ["{not json", '{"format": "trainerd-job", "run": 3}', "job_file"],
)
def test_a_broken_record_is_set_aside_with_one_warning(dirs, context, caplog, text):
    state = dirs / "state"
    state.mkdir()
    if text == "job_file":
        # Well formed, but its run directory is gone.
        write_record(state, JobRecord("t", str(dirs / "gone.yaml"), "auto", 1.0))
    else:
        record_path(state).write_text(text)
    sup = make(["pass"], dirs, context)
    try:
        with caplog.at_level(logging.INFO, logger="trainerd.daemon.supervisor"):
            sup.resume_recorded()
        assert sup.job is None and sup.starts == 0
        assert [(r.levelno, r.getMessage()[:15]) for r in caplog.records] == [
            (logging.WARNING, "resume skipped:")
        ]
        assert not record_path(state).exists()
        aside = [p.name for p in state.iterdir() if p.name.startswith(RECORD_NAME)]
        assert [n.startswith(f"{RECORD_NAME}.broken-") for n in aside] == [True]
    finally:
        sup.close()


def test_a_resumed_job_whose_corpus_is_gone_fails_and_is_forgotten(dirs, context):
    sup = make(["pass"], dirs, context)
    sup.start(config(dirs))
    supervise(sup, JobState.FINISHED)
    sup.close()
    job_file = dirs / "state" / "runs" / "t" / "job.yaml"
    write_record(dirs / "state", JobRecord("t", str(job_file), "auto", time.time()))
    (dirs / "corpus" / "meta.json").unlink()

    again = make(["pass"], dirs, context)
    try:
        again.resume_recorded()
        assert again.starts == 0
        assert again.job.state == JobState.FAILED
        assert "meta.json" in again.job.reason
        assert again.snapshot()["job"]["running"] is False
        assert not record_path(dirs / "state").exists()
    finally:
        again.close()


def test_a_resumed_job_waits_for_the_trainer_of_the_killed_daemon(dirs, context):
    sup = make(["pass"], dirs, context)
    sup.start(config(dirs))
    supervise(sup, JobState.FINISHED)
    sup.close()
    job_file = dirs / "state" / "runs" / "t" / "job.yaml"
    # A process that looks like the old trainer: `... trainer --config JOB_FILE`.
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    old = subprocess.Popen(
        [*sleeper, "trainer", "--config", str(job_file)],
        start_new_session=True,
    )
    again = make(["pass"], dirs, context)
    try:
        write_record(
            dirs / "state",
            JobRecord("t", str(job_file), "auto", time.time(), trainer_pid=old.pid),
        )
        again.resume_recorded()
        again.tick()
        assert again.job.state == JobState.STARTING
        assert (again.starts, again.job.orphan) == (0, old.pid)
        old.kill()
        old.wait()
        supervise(again, JobState.FINISHED)
        assert again.starts == 1
    finally:
        old.kill()
        old.wait()
        again.close()


# The real daemon, killed or stopped mid-run.


def job_config(home: Path, name: str, corpus: Path) -> Path:
    home.mkdir()
    path = home / "job.yaml"
    path.write_text(CONFIG.format(name=name, corpus=corpus))
    return path


def group_of(job: dict[str, Any]) -> list[int]:
    return [job["trainer_pid"], *(p["pid"] for p in job["producers"])]


def stop_daemon(daemon: subprocess.Popen, service: dict[str, Any]) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    assert wait_gone(service["pids"]) == []


def assert_clean(service: dict[str, Any]) -> None:
    home = service["home"]
    assert leftovers(home) == []
    assert os.listdir(home / "run") == []
    assert segments(service["name"]) == []


@pytest.mark.slow
def test_a_killed_daemon_resumes_the_job_where_it_was(demo_corpus, service):
    name, home, env = service["name"], service["home"], service["env"]
    config_file = job_config(home, name, demo_corpus)
    state = home / "state"
    run_dir = state / "runs" / name
    daemon = start_daemon(service)
    started = trainerctl(env, "start", "-c", str(config_file))
    assert started.returncode == 0, started.stderr
    reply = wait_for(
        service,
        lambda s: job_of(s).get("last_checkpoint") is not None and mid_epoch(job_of(s)),
        "a checkpoint, in the middle of an epoch",
    )
    before = job_of(reply)
    assert read_record(state).run == name
    service["pids"] += group_of(before)

    # SIGKILL: the trainer checkpoints by itself and goes, the record stays.
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    assert wait_gone(group_of(before)) == []
    payload = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert payload["step"] >= before["global_step"]

    daemon = start_daemon(service)
    reply = wait_for(
        service,
        lambda s: (
            job_of(s).get("state") == "training"
            and job_of(s).get("global_step", 0) > payload["step"] + 2
        ),
        "the run training again past its checkpoint",
    )
    service["pids"] += group_of(job_of(reply))
    assert RESUMING.format(name) in (home / "daemon.log").read_text()
    shown = trainerctl(env, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)["job"]
    # A moment later the trainer may be writing a checkpoint or validating an epoch.
    assert job["state"] in ("training", "checkpointing", "validating")
    assert (job["run"], job["running"], job["restarts"]) == (name, True, 0)
    assert job["trainer_pid"] not in group_of(before)
    assert job["global_step"] > payload["step"]

    stopped = trainerctl(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not record_path(state).exists()
    # Across the kill, every batch once and in the planned order.
    batches = effective_batches(run_dir / "metrics.jsonl")
    assert batches[-1]["step"] > payload["step"]
    check_planned_order(demo_corpus, run_dir / "config.yaml", batches)
    stop_daemon(daemon, service)
    assert_clean(service)


@pytest.mark.slow
def test_a_job_stopped_by_the_user_stays_stopped(demo_corpus, service):
    name, home, env = service["name"], service["home"], service["env"]
    config_file = job_config(home, name, demo_corpus)
    daemon = start_daemon(service)
    started = trainerctl(env, "start", "-c", str(config_file))
    assert started.returncode == 0, started.stderr
    service["pids"] += group_of(job_of(wait_for(service, is_training, "training")))
    stopped = trainerctl(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    stop_daemon(daemon, service)

    daemon = start_daemon(service)
    idle = trainerctl(env, "status", "--json")
    assert idle.returncode == 3, idle.stderr
    assert json.loads(idle.stdout)["job"] is None
    assert RESUMING.format(name) not in (home / "daemon.log").read_text()
    stop_daemon(daemon, service)
    assert_clean(service)


@pytest.mark.slow
def test_a_daemon_stopped_by_sigterm_resumes_the_job(demo_corpus, service):
    name, home, env = service["name"], service["home"], service["env"]
    config_file = job_config(home, name, demo_corpus)
    state = home / "state"
    daemon = start_daemon(service)
    started = trainerctl(env, "start", "-c", str(config_file))
    assert started.returncode == 0, started.stderr
    before = job_of(wait_for(service, lambda s: mid_epoch(job_of(s)), "mid-epoch"))
    service["pids"] += group_of(before)
    # systemctl restart: SIGTERM, a checkpoint, exit 0, and the job still recorded.
    stop_daemon(daemon, service)
    assert read_record(state).run == name
    step = read_checkpoint(state / "runs" / name / "checkpoints" / "last.pt")["step"]

    daemon = start_daemon(service)
    reply = wait_for(
        service,
        lambda s: is_training(s) and job_of(s)["global_step"] > step,
        "the run training again past its checkpoint",
    )
    service["pids"] += group_of(job_of(reply))
    assert job_of(reply)["run"] == name
    assert RESUMING.format(name) in (home / "daemon.log").read_text()
    stop_daemon(daemon, service)
    # Stopped by a shutdown again: still recorded for the next start.
    assert read_record(state).run == name
    assert_clean(service)


def is_training(reply: dict[str, Any] | None) -> bool:
    job = job_of(reply)
    return job.get("state") == "training" and len(job.get("producers") or []) == 2
