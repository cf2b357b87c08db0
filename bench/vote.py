"""Voter throughput: posts per second on the CPU for the default preset.

Reads real posts (20 Newsgroups' test split under ../shared/data when present, else
demo posts), writes a checkpoint of an untrained default model (the weights do not
change the cost), and times Voter.predict end to end: encoding, frames, the network.
Encoding and frames are also timed alone, so the network's share shows.

    .venv/bin/python -m bench.vote [--posts N] [--length L] [--threads T]

With `--study CHECKPOINT CORPUS` it instead scores a trained checkpoint on a corpus
store's validation split: the trainer's validation frames, then voter frames with
1, 2, 4 and 8 windows, to show whether more windows help.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from trainerd.model.checkpoint import write_checkpoint
from trainerd.model.net import build_model, count_parameters, model_spec
from trainerd.model.voter import Voter
from trainerd.producers.demo import demo_records
from trainerd.producers.encoding import Alphabet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEWSGROUPS_TEST = DATA / "20newsgroups-bydate" / "test.jsonl.gz"


def load_posts(n: int) -> tuple[list[dict], list[str], str]:
    """n posts, the label names of their source, and where they came from."""
    if NEWSGROUPS_TEST.is_file():
        posts = []
        with gzip.open(NEWSGROUPS_TEST, "rt", encoding="utf-8") as f:
            for line in f:
                posts.append(json.loads(line))
        labels = sorted({p["label"] for p in posts})
        # The file is sorted by label: take posts spread over all of it.
        step = max(len(posts) // n, 1)
        return posts[::step][:n], labels, "20 Newsgroups test"
    posts = demo_records(n, seed=0)
    return posts, sorted({p["label"] for p in posts}), "demo posts"


def write_bench_checkpoint(path: Path, labels: list[str], length: int) -> int:
    """An untrained default-preset checkpoint; returns its parameter count."""
    alphabet = Alphabet()
    spec = model_spec(
        preset="default",
        n_classes=len(labels),
        alphabet_size=alphabet.size,
        length=length,
        features=None,
        hidden=None,
        dropout=0.5,
    )
    model = build_model(**spec)
    write_checkpoint(
        path,
        {
            "model": spec,
            "model_state": model.state_dict(),
            "alphabet": alphabet.to_dict(),
            "label_names": labels,
            "length": length,
            "corpus_fingerprint": "bench",
            "config": {},
            "optimizer": None,
            "scheduler": None,
            "cursor": {"epoch": 0, "batch": 0, "validated": False},
            "step": 0,
            "val": None,
        },
    )
    return count_parameters(model)


def timed(fn, repeats: int = 2) -> float:
    """Best wall time of `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def study(checkpoint: str, corpus_dir: str, *, windows: tuple[int, ...]) -> None:
    """Validation accuracy of one checkpoint on trainer frames and voter windows."""
    from trainerd.model.evaluation import (
        corpus_labels,
        figures,
        trainer_frame_probs,
    )
    from trainerd.model.voter import combine
    from trainerd.producers.corpus import Corpus

    voter = Voter.from_checkpoints([checkpoint], device="cpu")
    corpus = Corpus.open(corpus_dir)
    ids = corpus.val_ids
    true = corpus_labels(corpus, ids, voter)
    stored = voter.members[0].val or {}
    print(
        f"windows study: {checkpoint} on {len(ids):,} validation posts of {corpus_dir}"
        f"; stored validation accuracy {stored.get('accuracy')}"
    )
    started = time.perf_counter()
    result = figures(
        true,
        combine(trainer_frame_probs(voter, corpus), vote="soft"),
        voter.label_names,
    )
    print(
        f"  trainer frames: accuracy {result['accuracy']:.4f} macro-F1 "
        f"{result['macro_f1']:.4f} ({time.perf_counter() - started:.0f} s)"
    )
    encoded = [corpus.post_codes(int(i)) for i in ids]
    for n in windows:
        started = time.perf_counter()
        probs = voter.member_probs(encoded, windows=n)
        result = figures(true, combine(probs, vote="soft"), voter.label_names)
        print(
            f"  voter, {n} window(s): accuracy {result['accuracy']:.4f} macro-F1 "
            f"{result['macro_f1']:.4f} ({time.perf_counter() - started:.0f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=512)
    parser.add_argument("--length", type=int, default=1014)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--study", nargs=2, metavar=("CHECKPOINT", "CORPUS"))
    parser.add_argument("--windows", default="1,2,4,8", help="for --study")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.study:
        windows = tuple(int(w) for w in args.windows.split(","))
        study(*args.study, windows=windows)
        return

    posts, labels, source = load_posts(args.posts)
    with tempfile.TemporaryDirectory(prefix="tdbench") as tmp:
        path = Path(tmp) / "bench.pt"
        params = write_bench_checkpoint(path, labels, args.length)
        voter = Voter.from_checkpoints([path], device="cpu")

    print(
        f"voter bench: {len(posts)} posts ({source}), default preset "
        f"({params / 1e6:.2f} M parameters, {len(labels)} classes), frame "
        f"{args.length}, CPU, {args.threads} thread(s), torch {torch.__version__}"
    )
    encode_s = timed(lambda: voter.frames(voter.encode(posts), length=args.length))
    print(
        f"  encode + frames alone: {len(posts) / encode_s:,.0f} posts/s "
        f"({1e6 * encode_s / len(posts):.0f} us/post)"
    )
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for windows in (1, 4):
            seconds = timed(
                lambda b=batch_size, w=windows: voter.predict(
                    posts, windows=w, batch_size=b
                ),
                repeats=1,
            )
            print(
                f"  predict, batch {batch_size:>4}, windows {windows}: "
                f"{len(posts) / seconds:,.0f} posts/s"
            )


if __name__ == "__main__":
    main()
