"""trainerctl: the command line of trainerd.

Each command lives in its own module with `register(subparsers)`; this module only
builds the parser and turns trainerd's errors into one line and an exit status.
Command modules import heavy packages (torch) inside their handlers, so `--help`
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from trainerd.daemon.output import detach_output, log_to_stderr, say
from trainerd.producers.errors import TrainerdError

COMMAND_MODULES = (
    "trainerd.daemon.cmd_import",
    "trainerd.daemon.cmd_job",
    "trainerd.daemon.cmd_watch",
    "trainerd.daemon.cmd_vote",
)


def build_parser() -> argparse.ArgumentParser:
    """The whole trainerctl parser; a test pins its commands and flags."""
    parser = argparse.ArgumentParser(
        prog="trainerctl",
        description="Drive trainerd: import corpora, start and stop training jobs, "
        "watch them, and classify posts with trained checkpoints.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug lines to stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trainerctl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `start --foreground` runs the daemon here: its log must outlive a closed pipe.
    log_to_stderr(logging.DEBUG if args.verbose else logging.INFO)
    try:
        code = int(args.func(args) or 0)
        # Flushed here, so that a reader that left early is noticed below rather
        # than at interpreter exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `trainerctl status | head`: the reader has what it wanted. Python's
        # advice: send the rest of the output to /dev/null and exit quietly.
        _quiet_stdout()
        return 0
    except TrainerdError as err:
        say(f"trainerctl {args.command}: error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        say(f"trainerctl {args.command}: interrupted")
        return 130


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        detach_output()


if __name__ == "__main__":
    sys.exit(main())
