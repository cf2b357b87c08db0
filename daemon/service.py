"""`trainerd`: the one program behind every trainerd process, started with a role.

    trainerd [--control-tcp ENDPOINT --curve-keys DIR] [-v]
        the daemon, in the foreground (systemd runs it so; it never forks away)
    trainerd trainer --config FILE --run-dir DIR --runtime-dir DIR --resume WHAT
        a job's trainer process, as the daemon starts it
    trainerd keys DIR
        makes CurveZMQ keys for control over TCP

Imports stay light here: each role imports what it needs, so the trainer alone pays
for torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from trainerd.producers.errors import TrainerdError

log = logging.getLogger(__name__)

PARENT_POLL_S = 0.5
ORPHAN_GRACE_S = 10.0
"""How long an orphaned trainer may take to checkpoint before it exits anyway."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trainerd` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["trainer"]:
        return _trainer(args[1:])
    if args[:1] == ["keys"]:
        return _keys(args[1:])
    return _daemon(args)


def _daemon(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trainerd",
        description="The trainerd service: runs in the foreground, one job at a "
        "time, driven by trainerctl. Roles: 'trainerd trainer ...' (started by the "
        "daemon), 'trainerd keys DIR' (CurveZMQ keys for control over TCP).",
    )
    parser.add_argument(
        "--control-tcp",
        metavar="ENDPOINT",
        default=os.environ.get("TRAINERD_CONTROL_TCP"),
        help="also serve control on this TCP endpoint (tcp://HOST:PORT); needs "
        "--curve-keys (env TRAINERD_CONTROL_TCP)",
    )
    parser.add_argument(
        "--curve-keys",
        metavar="DIR",
        default=os.environ.get("TRAINERD_CURVE_KEYS"),
        help="CurveZMQ key set made by 'trainerd keys DIR' (env TRAINERD_CURVE_KEYS)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines")
    args = parser.parse_args(argv)
    _log_plainly(args.verbose)
    try:
        from trainerd.daemon.server import Daemon

        daemon = Daemon(control_tcp=args.control_tcp, curve_keys=args.curve_keys)
        return daemon.run()
    except TrainerdError as err:
        print(f"trainerd: error: {err}", file=sys.stderr)
        return err.exit_code


def _trainer(argv: list[str]) -> int:
    _watch_parent()
    from trainerd.daemon import trainer_main

    return int(trainer_main.main(argv) or 0)


def _keys(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trainerd keys",
        description="Make a CurveZMQ key set: server.key(_secret) for the daemon, "
        "client.key(_secret) for trainerctl, clients/ of accepted client keys.",
    )
    parser.add_argument("dir", help="directory to create the keys in")
    args = parser.parse_args(argv)
    from trainerd.daemon.control import make_keys

    root = make_keys(args.dir)
    print(f"keys written: {root}")
    return 0


def _log_plainly(verbose: bool) -> None:
    # Plain lines: journald (or the terminal) adds the time. A closed terminal
    # must not end the daemon or its job.
    from trainerd.daemon.output import log_to_stderr

    log_to_stderr(logging.DEBUG if verbose else logging.INFO)


def _watch_parent() -> None:
    """Makes a trainer whose daemon died stop by itself.

    The daemon passes its pid in TRAINERD_PARENT_PID. When the trainer's parent
    changes (the daemon was killed), the trainer gets SIGTERM, so it checkpoints and
    stops its producers; if that takes longer than ORPHAN_GRACE_S it exits at once.
    """
    expected = os.environ.get("TRAINERD_PARENT_PID")
    if not expected:
        return

    def watch() -> None:
        while os.getppid() == int(expected):
            stop.wait(PARENT_POLL_S)
        # The output pipe died with the daemon: writing there would fail, so the
        # rest goes nowhere (trainer.log still has every line).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        log.warning("daemon gone: parent %s exited, stopping after this step", expected)
        os.kill(os.getpid(), signal.SIGTERM)
        stop.wait(ORPHAN_GRACE_S)
        os._exit(1)

    stop = threading.Event()
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
