"""trainerctl start, stop and status: one request each to the running daemon.

`start --foreground` runs the daemon itself in this terminal with the job, until the
job ends. `status` exits like `systemctl status` (LSB): 0 a job is running, 1 the
last job failed, 3 nothing is running (a finished or stopped job included), 4 no
daemon reachable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from trainerd.daemon.config import settings_reference
from trainerd.producers.errors import DaemonError, TrainerdError, WaitTimeout

STATUS_RUNNING = 0
STATUS_FAILED = 1
STATUS_NOT_RUNNING = 3
STATUS_UNKNOWN = 4
START_WAIT_S = 120.0
"""How long `start` waits for the trainer to report before leaving it to `status`."""
POLL_S = 0.25


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this module's commands to trainerctl."""
    start = sub.add_parser(
        "start",
        help="start a training job",
        description="Submit a job to the running trainerd, or run daemon and job "
        "in this terminal with --foreground (Ctrl-C stops it gracefully).",
        epilog=settings_reference()
        + "\n\nexamples/demo.yaml and examples/newsgroups.yaml show whole jobs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start.add_argument(
        "-c", "--config", required=True, metavar="CONFIG", help="job config (YAML)"
    )
    start.add_argument(
        "--resume",
        default="auto",
        metavar="auto|PATH|none",
        help="auto: the run's newest valid checkpoint (default); PATH: that "
        "checkpoint; none: start afresh, setting old checkpoints and metrics aside",
    )
    start.add_argument(
        "--foreground",
        action="store_true",
        help="run the daemon and the job in this terminal until the job ends",
    )
    start.set_defaults(func=_start)

    stop = sub.add_parser(
        "stop",
        help="stop the running job",
        description="Stop the job after its current step with a checkpoint, and wait "
        "until it has stopped.",
    )
    stop.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds to wait for the job to stop (default 300)",
    )
    stop.add_argument(
        "--now", action="store_true", help="stop at once, without a checkpoint"
    )
    stop.set_defaults(func=_stop)

    status = sub.add_parser(
        "status",
        help="show the daemon and its job",
        description="Show the daemon and its job. Exit status: 0 running, 1 the job "
        "failed, 3 not running, 4 no daemon reachable.",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)


# Talking to the daemon.


def _request(op: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    from trainerd.daemon import paths
    from trainerd.daemon.control import client_endpoint, request

    endpoint, keys = client_endpoint(paths.runtime_dir())
    return request(op, args, endpoint=endpoint, keys=keys, **kw)


def _job(op: str = "status") -> dict[str, Any] | None:
    return _request(op)["job"]


# start


def _start(args: argparse.Namespace) -> int:
    from trainerd.daemon.config import load_config
    from trainerd.producers.corpus import Corpus

    config = load_config(args.config)
    Corpus.open(config.corpus)
    resume = args.resume
    if resume not in ("auto", "none"):
        resume = str(Path(resume).expanduser().resolve())
    job = {
        "config": config.model_dump(mode="json"),
        "resume": resume,
        "source": str(args.config),
    }
    if args.foreground:
        from trainerd.daemon.server import Daemon

        daemon = Daemon(job=job)
        code = daemon.run()
        failure = daemon.failure()
        if failure is not None:
            error = TrainerdError(failure[0])
            error.exit_code = failure[1]
            raise error
        return code
    started = _request("start", job, timeout_s=30.0)
    print(f"started run {started['run']}: {started['run_dir']}")
    return _await_start(started["run"])


def _await_start(run: str) -> int:
    """Waits until the trainer reports, so a bad checkpoint is an error here."""
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        job = _job()
        if job is None or job["run"] != run:
            break
        if job["state"] == "failed":
            error = TrainerdError(f"run {run} failed: {job['reason']}")
            error.exit_code = job.get("exit_code") or 1
            raise error
        if job["state"] != "starting":
            where = f" ({_progress(job)})" if job.get("epoch") is not None else ""
            print(f"run {run}: {job['state']}{where}")
            return 0
        time.sleep(POLL_S)
    print(f"run {run}: still starting; follow it with 'trainerctl status'")
    return 0


# stop


def _stop(args: argparse.Namespace) -> int:
    reply = _request("stop", {"now": args.now})
    job = reply["job"]
    if not reply["stopping"]:
        if job is None:
            print("no job has run since trainerd started")
        else:
            print(f"no job is running; run {job['run']} is {_outcome(job)}")
        return 0
    run = job["run"]
    print(f"stopping run {run}{' at once' if args.now else ''}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            current = _job()
        except DaemonError:
            # A foreground daemon exits with its job; the job stopped with it.
            current = None
        if current is None or current["run"] != run or not current["running"]:
            final = current or {**job, "state": "idle", "outcome": "stopped"}
            _say_stopped(final)
            return 1 if final.get("outcome") == "failed" else 0
        time.sleep(POLL_S)
    raise WaitTimeout(
        f"run {run} is still stopping after {args.timeout:g} s; stop it at once "
        "with 'trainerctl stop --now'"
    )


def _say_stopped(job: dict[str, Any]) -> None:
    where = f"epoch {job.get('epoch', '?')}, step {job.get('step', '?')}"
    print(f"run {job['run']} {_outcome(job)} at {where}")
    checkpoint = _checkpoint_path(job)
    print(f"last checkpoint: {checkpoint or 'none written'}")


def _checkpoint_path(job: dict[str, Any]) -> str | None:
    last = job.get("last_checkpoint")
    if last:
        return last["path"]
    path = Path(job["run_dir"]) / "checkpoints" / "last.pt"
    return str(path) if path.exists() else None


# status


def _status(args: argparse.Namespace) -> int:
    try:
        reply = _request("status")
    except DaemonError as err:
        if args.json:
            print(json.dumps({"daemon": None, "job": None, "error": str(err)}))
        else:
            print(f"trainerd: down: {err}")
        return STATUS_UNKNOWN
    job = reply["job"]
    code = _status_code(job)
    if args.json:
        print(json.dumps({**reply, "exit_code": code}, sort_keys=True))
    else:
        print("\n".join(_render(reply)))
    return code


def _status_code(job: dict[str, Any] | None) -> int:
    if job is None:
        return STATUS_NOT_RUNNING
    if job["running"]:
        return STATUS_RUNNING
    return STATUS_FAILED if job["state"] == "failed" else STATUS_NOT_RUNNING


def _render(reply: dict[str, Any]) -> list[str]:
    daemon, job = reply["daemon"], reply["job"]
    mode = "foreground" if daemon.get("foreground") else "service"
    lines = [
        f"trainerd:   up {_duration(daemon['uptime_s'])} (pid {daemon['pid']}, "
        f"{mode}, {daemon['runtime_dir']})"
    ]
    if job is None:
        return [*lines, "job:        none since the daemon started"]
    lines.append(f"run:        {job['run']} ({_outcome(job)})")
    if job.get("reason"):
        lines.append(f"reason:     {job['reason']}")
    lines.append(f"progress:   {_progress(job, percent=True)}")
    if job.get("eta_s") is not None:
        lines.append(f"eta:        {_duration(job['eta_s'])}")
    if job["running"] and job.get("samples_per_s") is not None:
        share = job.get("data_wait_share") or 0.0
        lines.append(
            f"speed:      {job['samples_per_s']:.0f} samples/s, "
            f"data wait {100 * share:.1f}%"
        )
    lines.append(f"validation: {_validation(job)}")
    lines.append(f"checkpoint: {_checkpoint(job)}")
    lines.append(f"producers:  {_producers(job.get('producers') or [])}")
    if job.get("device"):
        lines.append(f"device:     {job['device']}")
    lines.append(f"restarts:   {job['restarts']} (of {job['max_restarts']} allowed)")
    return lines


def _outcome(job: dict[str, Any]) -> str:
    if job["state"] == "idle":
        return job.get("outcome") or "stopped"
    return job["state"]


def _progress(job: dict[str, Any], *, percent: bool = False) -> str:
    epoch, epochs = job.get("epoch"), job.get("epochs")
    if epoch is None:
        return "starting" if job.get("running", True) else "-"
    step, n_batches = job.get("step", 0), job.get("n_batches") or 0
    if not n_batches:
        # The epoch's length is known once the trainer has planned it; a trainer
        # that failed before that reports only the cursor it would resume at.
        return f"epoch {epoch}/{epochs or '-'}, step -"
    text = f"epoch {epoch}/{epochs}, step {step}/{n_batches}"
    if not percent or not epochs:
        return text
    done = job.get("global_step", 0) / (epochs * n_batches)
    return (
        f"epoch {epoch}/{epochs}, step {step}/{n_batches} "
        f"({100 * step / n_batches:.0f}% of the epoch, {100 * done:.0f}% of the run)"
    )


def _validation(job: dict[str, Any]) -> str:
    last, best = job.get("last_val"), job.get("best_val")
    if not last:
        return "none yet"
    text = (
        f"last acc {last['accuracy']:.3f}, loss {last['loss']:.3f} "
        f"(epoch {last['epoch']})"
    )
    if best:
        text += f"; best acc {best['accuracy']:.3f} (epoch {best['epoch']})"
    return text


def _checkpoint(job: dict[str, Any]) -> str:
    last = job.get("last_checkpoint")
    if not last:
        return "none yet"
    return f"{last['path']} ({_duration(job.get('checkpoint_age_s', 0))} ago)"


def _producers(producers: list[dict[str, Any]]) -> str:
    """`#0 running, #1 running (restarts 0)`; the restarts per producer when any."""
    if not producers:
        return "none"
    states = ", ".join(f"#{p.get('id')} {p.get('state')}" for p in producers)
    restarted = [p for p in producers if p.get("restarts")]
    total = sum(int(p["restarts"]) for p in restarted)
    each = ", ".join(f"#{p.get('id')} {p['restarts']}" for p in restarted)
    return f"{states} (restarts {total}{': ' + each if each else ''})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"
