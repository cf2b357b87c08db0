"""`make demo`: train on the built-in demo corpus in the foreground, start to finish.

Builds the synthetic demo corpus under the state directory (once), then runs the job
of examples/demo.yaml with its producers and trainer in this terminal, printing
progress, and ends with the validation accuracy and where the checkpoints are.
Ctrl-C stops it cleanly with a checkpoint.

The state directory is trainerd's (TRAINERD_STATE_DIR, else the XDG one), and the
corpus path in examples/demo.yaml is replaced by the one built there. Every demo is a
short fresh run: it replaces the previous demo's run directory, and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from trainerd.daemon import paths
from trainerd.daemon.config import parse_config
from trainerd.producers.errors import TrainerdError

log = logging.getLogger(__name__)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"
DEMO_POSTS = 4000


def demo_config(example: Path, corpus: Path) -> dict:
    """examples/demo.yaml with its corpus pointed at the built store."""
    data = yaml.safe_load(example.read_text(encoding="utf-8"))
    data["corpus"] = str(corpus)
    return data


def ensure_corpus(state: Path) -> Path:
    """The demo corpus under the state directory, built on first use."""
    from trainerd.producers.corpus import Corpus
    from trainerd.producers.demo import write_demo_corpus

    out = state / "corpora" / "demo"
    try:
        Corpus.open(out)
        return out
    except TrainerdError:
        pass
    print(f"demo: building the demo corpus ({DEMO_POSTS} posts) at {out}", flush=True)
    return write_demo_corpus(out, n_posts=DEMO_POSTS, seed=0, force=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m trainerd.daemon.demo`."""
    parser = argparse.ArgumentParser(prog="python -m trainerd.daemon.demo")
    parser.add_argument("--config", default=str(EXAMPLE), help="the demo job config")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from trainerd.daemon.trainer_main import StopFlag, run_job

    try:
        state = paths.state_dir()
        corpus = ensure_corpus(state)
        data = demo_config(Path(args.config), corpus)
        if args.epochs:
            data.setdefault("train", {})["epochs"] = args.epochs
        config = parse_config(data, source=args.config)
        run_dir = paths.run_dir(config.name)
        replaced = run_dir.exists()
        if replaced:
            # The demo always trains from scratch, so that it always runs its few
            # epochs to the end; resuming a finished demo would train nothing.
            shutil.rmtree(run_dir)
        print(
            f"demo: training run {config.name!r} afresh in {run_dir}"
            + ("; the previous demo run there was replaced" if replaced else "")
            + " (TRAINERD_STATE_DIR puts it elsewhere)",
            flush=True,
        )
        stop = StopFlag()
        stop.install()
        try:
            run_job(
                config,
                run_dir=run_dir,
                runtime_dir=paths.ensure_runtime_dir(),
                resume="none",
                stop=stop,
            )
        finally:
            stop.restore()
    except TrainerdError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return err.exit_code
    return report(run_dir)


def report(run_dir: Path) -> int:
    """Prints the validation curve, the best accuracy and the checkpoint paths."""
    lines = (run_dir / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if not records:
        print("demo: stopped before the first validation", flush=True)
        return 0
    for r in records:
        print(
            f"demo: epoch {r['epoch']}: validation accuracy {r['accuracy']:.4f}, "
            f"macro-F1 {r['macro_f1']:.4f}, loss {r['loss']:.4f}"
        )
    final = records[-1]
    checkpoints = run_dir / "checkpoints"
    print(f"demo: final validation accuracy {final['accuracy']:.4f}")
    print(
        f"demo: checkpoints: {checkpoints / 'best.pt'} (best), {checkpoints / 'last.pt'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
