"""Training throughput on the rings, and the same step fed from memory.

    .venv/bin/python -m bench.train [--steps 60] [--producers 4] [--threads 0]

The default preset on the CPU, frame 1014, batch 64. Two figures from one run on the
same corpus (20 Newsgroups when ../shared/data holds it, else the demo corpus):

- pipeline: batches from four producers through the rings, converted to float and
  trained on; samples/s, and the share of wall time spent waiting for a batch;
- memory: the same step on one batch already held as a float tensor.

Their ratio is the pipeline's overhead: the one-hot to float conversion plus any
wait for data. Warm-up steps are left out of both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from trainerd.model.config import TrainConfig
from trainerd.model.net import build_model
from trainerd.model.train import Feeder, cpu_threads, make_optimizer, train_step
from trainerd.producers.config import DataConfig
from trainerd.producers.corpus import Corpus
from trainerd.producers.pipeline import Pipeline
from trainerd.producers.plans import train_plan

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "20newsgroups-bydate"
RUN = "bench-train"
WARMUP = 5


def bench_corpus(root: Path) -> tuple[Path, str]:
    """20 Newsgroups' training split when present, else the demo corpus."""
    train = DATA / "train.jsonl.gz"
    if train.is_file():
        from trainerd.producers.importer import import_corpus

        out = root / "20ng"
        import_corpus(train, out, val_source=DATA / "test.jsonl.gz", progress=False)
        return out, "20 Newsgroups"
    from trainerd.producers.demo import write_demo_corpus

    return write_demo_corpus(root / "demo", n_posts=8000), "demo"


def fresh_model(corpus: Corpus, data: DataConfig) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = build_model(
        preset="default",
        n_classes=len(corpus.label_names),
        alphabet_size=corpus.alphabet.size,
        length=data.length,
    )
    return model.train(), make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))


def run_pipeline(
    corpus_path: Path, data: DataConfig, steps: int, runtime: Path
) -> dict:
    """Trains `steps` batches from the rings; returns samples/s and the wait share."""
    corpus = Corpus.open(corpus_path)
    model, optimizer = fresh_model(corpus, data)
    feeder = Feeder(torch.device("cpu"), corpus.alphabet.size)
    plan = train_plan(corpus, data, run_id=RUN, seed=0, epoch=1, seq=0)
    assert plan.n_batches >= steps + WARMUP, "corpus too small for --steps"
    wait_s = rows = 0.0
    with Pipeline(str(corpus_path), data, run_id=RUN, runtime_dir=runtime) as pipeline:
        batches = iter(pipeline.stream([plan]))
        for i in range(steps + WARMUP):
            if i == WARMUP:
                started = time.perf_counter()
                wait_s = rows = 0.0
            waited = time.perf_counter()
            batch = next(batches)
            wait_s += time.perf_counter() - waited
            x, y = feeder(batch)
            train_step(model, optimizer, x, y, lr=1e-3, grad_clip=0, seed=i)
            rows += len(y)
        wall_s = time.perf_counter() - started
        batches.close()
    return {
        "samples_per_s": rows / wall_s,
        "wait_share": wait_s / wall_s,
        "wall": wall_s,
    }


def run_memory(corpus_path: Path, data: DataConfig, steps: int) -> dict:
    """The same steps on one float batch already in memory."""
    corpus = Corpus.open(corpus_path)
    model, optimizer = fresh_model(corpus, data)
    x = torch.zeros(data.batch_size, corpus.alphabet.size, data.length)
    x[:, 1, :] = 1.0
    y = torch.zeros(data.batch_size, dtype=torch.long)
    for i in range(steps + WARMUP):
        if i == WARMUP:
            started = time.perf_counter()
        train_step(model, optimizer, x, y, lr=1e-3, grad_clip=0, seed=i)
    wall_s = time.perf_counter() - started
    return {"samples_per_s": steps * data.batch_size / wall_s, "wall": wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="0: the trainer's rule")
    parser.add_argument("--length", type=int, default=1014)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--corpus", help="an existing corpus store to read")
    args = parser.parse_args()
    threads = cpu_threads(args.threads, producers=args.producers)
    torch.set_num_threads(threads)
    data = DataConfig(
        length=args.length, batch_size=args.batch_size, producers=args.producers
    )
    with tempfile.TemporaryDirectory(prefix="tdb", dir="/tmp") as tmp:
        root = Path(tmp)
        if args.corpus:
            corpus, name = Path(args.corpus), args.corpus
        else:
            corpus, name = bench_corpus(root)
        print(
            f"corpus {name}; default preset, frame {data.length}, batch "
            f"{data.batch_size}, {args.producers} producers, {threads} torch threads, "
            f"{args.steps} steps after {WARMUP} warm-up"
        )
        # Memory before and after the pipeline, so load from other processes on a
        # shared machine weighs on both figures alike.
        first = run_memory(corpus, data, args.steps // 2)
        ring = run_pipeline(corpus, data, args.steps, root)
        second = run_memory(corpus, data, args.steps - args.steps // 2)
    wall = first["wall"] + second["wall"]
    memory = {"samples_per_s": args.steps * data.batch_size / wall, "wall": wall}
    print(
        f"pipeline: {ring['samples_per_s']:8.1f} samples/s, waiting for data "
        f"{100 * ring['wait_share']:.2f}% of wall time ({ring['wall']:.1f} s)"
    )
    print(
        f"memory:   {memory['samples_per_s']:8.1f} samples/s ({memory['wall']:.1f} s)"
    )
    ratio = ring["samples_per_s"] / memory["samples_per_s"]
    print(f"pipeline / memory: {ratio:.3f}")


if __name__ == "__main__":
    main()
