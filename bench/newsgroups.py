"""The real-data run: examples/newsgroups.yaml on 20 Newsgroups for a time budget.

    .venv/bin/python -m bench.newsgroups [--minutes 10] [--corpus DIR] [--epochs N]

Imports ../shared/data/20newsgroups-bydate (train, with test as validation) unless
--corpus names a store already made, then trains the example job with its producers
on this machine, stopping cleanly when the budget runs out (the stop checkpoints like
Ctrl-C would). Prints validation accuracy per epoch with the minutes it took, and
the best accuracy. Not part of `make test`: it uses the whole CPU for the budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from trainerd.daemon.config import parse_config
from trainerd.daemon.trainer_main import StopFlag, run_job

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "newsgroups.yaml"
DATA = ROOT.parent / "shared" / "data" / "20newsgroups-bydate"


def import_newsgroups(out: Path) -> Path:
    """Imports the bydate split: train for training, test for validation."""
    from trainerd.producers.importer import import_corpus

    started = time.perf_counter()
    import_corpus(
        DATA / "train.jsonl.gz", out, val_source=DATA / "test.jsonl.gz", progress=False
    )
    print(f"imported 20 Newsgroups in {time.perf_counter() - started:.1f} s")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.newsgroups")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--corpus", help="a 20 Newsgroups store made already")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--config", default=str(EXAMPLE))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="tdn", dir="/tmp") as tmp:
        root = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else import_newsgroups(root / "20ng")
        data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        data["corpus"] = str(corpus)
        if args.epochs:
            data["train"]["epochs"] = args.epochs
        config = parse_config(data, source=args.config)
        run_dir = root / "run"
        stop = StopFlag()
        stop.install()
        budget = threading.Timer(args.minutes * 60, _expire, args=(stop,))
        budget.daemon = True
        started = time.perf_counter()
        started_wall = time.time()
        budget.start()
        try:
            run_job(config, run_dir=run_dir, runtime_dir=root, resume="none", stop=stop)
        finally:
            budget.cancel()
        wall_min = (time.perf_counter() - started) / 60
        records = [
            json.loads(line)
            for line in (run_dir / "validation.jsonl").read_text().splitlines()
        ]
    print(f"\n20 Newsgroups, {config.model.preset} preset, frame {config.data.length}:")
    for r in records:
        print(
            f"epoch {r['epoch']:2d}  at {(r['time'] - started_wall) / 60:5.1f} min  "
            f"accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
            f"loss {r['loss']:.4f}"
        )
    best = max((r["accuracy"] for r in records), default=float("nan"))
    print(f"best validation accuracy {best:.4f} in {wall_min:.1f} min of wall time")
    return 0


def _expire(stop: StopFlag) -> None:
    stop.requested = True
    stop.signal_name = "time budget"


if __name__ == "__main__":
    sys.exit(main())
