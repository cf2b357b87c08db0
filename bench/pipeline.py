"""Delivered samples/s of the rings, of a PyTorch DataLoader and of one process.

    .venv/bin/python -m bench.pipeline [--seconds 2] [--rounds 5] [--producers 4] [--slots 4]

Frame of the paper: batch 128, length 1014, alphabet 69, one-hot uint8. Every
consumer touches each batch the same way (it sums one byte per row), so the figures
compare how fast batches arrive, not what is done with them. All figures and ratios
come from one run on the same corpus: 20 Newsgroups when ../shared/data holds it,
else the demo corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trainerd.producers.config import DataConfig
from trainerd.producers.corpus import Corpus, CorpusWriter
from trainerd.producers.encoding import Alphabet
from trainerd.producers.pipeline import Pipeline
from trainerd.producers.plans import Plan, make_batch, train_plan
from trainerd.producers.sampling import Sampler

BATCH, LENGTH = 128, 1014
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "20newsgroups-bydate"
RUN = "bench"


# The corpus


def newsgroups_corpus(out: Path) -> Path:
    """20 Newsgroups bydate: train as the training split, test as validation."""
    alphabet = Alphabet()
    writer = CorpusWriter(out, force=True)
    labels: dict[str, int] = {}
    split = []
    for name in ("train", "test"):
        with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                post = json.loads(line)
                label = labels.setdefault(post["label"], len(labels))
                title, body = (
                    alphabet.encode(post["title"]),
                    alphabet.encode(post["text"]),
                )
                split.append(name == "train")
                writer.add(title, body, label)
    ids = np.arange(len(split))
    return writer.finish(
        train_ids=ids[np.array(split)],
        val_ids=ids[~np.array(split)],
        meta={"alphabet": alphabet.to_dict(), "label_names": list(labels)},
    )


def bench_corpus(tmp: Path) -> tuple[Path, str]:
    if (DATA / "train.jsonl.gz").is_file():
        return newsgroups_corpus(tmp / "20ng"), "20 Newsgroups (bydate)"
    from trainerd.producers.demo import write_demo_corpus

    return write_demo_corpus(tmp / "demo", n_posts=20000, seed=0), "demo corpus"


def plans_forever(corpus: Corpus, cfg: DataConfig, run_id: str) -> Iterator[Plan]:
    """Training plans of epoch 0, 1, 2, ... (the bench stops consuming first)."""
    epoch = 0
    while True:
        yield train_plan(corpus, cfg, run_id=run_id, seed=1, epoch=epoch, seq=epoch)
        epoch += 1


# Measurements


def touch(data: np.ndarray) -> int:
    """What every consumer does with a batch: sums one byte per row."""
    return int(data[:, 0, 0].sum())


def descendants() -> list[int]:
    """Pids of this process's children and their children (producers, workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [os.getpid()]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants, user plus system."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in descendants():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Method:
    """One way of delivering batches, measured in rounds interleaved with the others,
    so that load from other processes on a shared machine hits all of them alike."""

    def __init__(self, name: str, batches: Iterator[int]) -> None:
        self.name = name
        self.batches = batches
        self.rate = 0.0  # best samples/s over the rounds
        self.cpu_ms = float("inf")  # least CPU per batch over the rounds, all processes

    def round(self, seconds: float, warmup_s: float = 0.5) -> None:
        # The warm-up also drains batches prefetched while other methods ran.
        end_warmup = time.perf_counter() + warmup_s
        for _ in self.batches:
            if time.perf_counter() >= end_warmup:
                break
        rows, n = 0, 0
        c0, t0 = cpu_seconds(), time.perf_counter()
        for r in self.batches:
            rows, n = rows + r, n + 1
            if time.perf_counter() - t0 >= seconds:
                break
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        self.rate = max(self.rate, rows / wall)
        self.cpu_ms = min(self.cpu_ms, cpu / n * 1e3)


def encoder_batches(
    corpus: Corpus, cfg: DataConfig, onehot: bool, buffers: int = 1
) -> Iterator[int]:
    """make_batch in this process into reused buffers, taken in turn: the encoder
    alone. One buffer stays in the CPU's cache; as many as the rings hold do not."""
    sampler = Sampler(corpus, LENGTH, BATCH)
    codes = np.zeros((BATCH, LENGTH), np.uint8)
    shape = (BATCH, LENGTH, corpus.alphabet.size)
    outs = [np.zeros(shape, np.uint8) if onehot else None for _ in range(buffers)]
    labels, ids = np.zeros(BATCH, np.int64), np.zeros(BATCH, np.int64)
    n = 0
    for plan in plans_forever(corpus, cfg, RUN):
        for b in range(plan.n_batches):
            out = outs[n % buffers]
            rows = make_batch(
                sampler, plan, b, codes, out, labels_out=labels, ids_out=ids
            )
            if out is not None:
                touch(out[:rows])
            n += 1
            yield rows


def _encode_while_wanted(
    corpus_path: str, cfg: DataConfig, wanted_until: Any, rows_done: Any
) -> None:
    """A worker of parallel_encoder_batches: encodes while the bench pulls batches."""
    corpus = Corpus.open(corpus_path)
    batches = encoder_batches(corpus, cfg, True)
    while True:
        if time.monotonic() > wanted_until.value:
            time.sleep(0.002)  # paused while other methods have their round
            continue
        rows = next(batches)
        with rows_done.get_lock():
            rows_done.value += rows


def parallel_encoder_batches(
    stack: contextlib.ExitStack, corpus_path: Path, cfg: DataConfig, processes: int
) -> Iterator[int]:
    """The encoder alone in `processes` processes at once, each into its own buffer:
    what the cores deliver together when nothing but encoding runs."""
    ctx = mp.get_context("fork")
    wanted_until, rows_done = ctx.Value("d", 0.0), ctx.Value("q", 0)
    workers = [
        ctx.Process(
            target=_encode_while_wanted,
            args=(str(corpus_path), cfg, wanted_until, rows_done),
            daemon=True,
        )
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
        stack.callback(w.kill)
    seen = 0
    while True:
        wanted_until.value = time.monotonic() + 0.05
        time.sleep(0.001)
        done = rows_done.value
        if done > seen:
            # One yield per BATCH rows keeps the CPU-per-batch figure comparable.
            for _ in range((done - seen) // BATCH):
                yield BATCH
            seen += (done - seen) // BATCH * BATCH


def copy_batches(nbytes: int) -> Iterator[int]:
    """Memory bandwidth for the same bytes: a numpy copy of one batch's size."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    while True:
        np.copyto(dst, src)
        yield BATCH


def ring_batches(pipe: Pipeline, corpus: Corpus, cfg: DataConfig) -> Iterator[int]:
    expand = np.empty((BATCH, LENGTH, corpus.alphabet.size), np.uint8)
    for batch in pipe.stream(plans_forever(corpus, cfg, pipe.run_id)):
        data = batch.data if batch.wire == "onehot" else batch.onehot_into(expand)
        touch(data)
        rows = batch.rows
        batch.release()
        yield rows


def dataloader_batches(
    corpus_path: Path, cfg: DataConfig, workers: int
) -> Iterator[int]:
    """The setup a user would otherwise write: a batch-level Dataset, 4 workers."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset):
        def __init__(self) -> None:
            self.corpus = Corpus.open(corpus_path)
            self.plan = train_plan(self.corpus, cfg, run_id=RUN, seed=1, epoch=0, seq=0)
            self.sampler: Sampler | None = None

        def __len__(self) -> int:
            return self.plan.n_batches

        def __getitem__(self, b: int) -> tuple:
            if self.sampler is None:
                self.sampler = Sampler(self.corpus, LENGTH, BATCH)
            v = self.corpus.alphabet.size
            codes = np.empty((BATCH, LENGTH), np.uint8)
            onehot = np.empty((BATCH, LENGTH, v), np.uint8)
            labels = np.empty(BATCH, np.int64)
            rows = make_batch(
                self.sampler, self.plan, b, codes, onehot, labels_out=labels
            )
            return torch.from_numpy(onehot[:rows]), torch.from_numpy(labels[:rows])

    torch.set_num_threads(1)
    # The point is a like-for-like comparison with 4 producers, whatever the cores.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    loader = DataLoader(
        Batches(), batch_size=None, shuffle=False, num_workers=workers,
        persistent_workers=True, prefetch_factor=2,
    )  # fmt: skip
    try:
        while True:
            for data, _ in loader:
                touch(data.numpy())
                yield data.shape[0]
    finally:
        del loader


# The report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.pipeline", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="ring slots")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))

    tmp = Path(tempfile.mkdtemp(prefix="tdb", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            corpus_path, corpus_name = bench_corpus(tmp)
            corpus = Corpus.open(corpus_path)
            v = corpus.alphabet.size
            print(f"corpus: {corpus_name}, {corpus.meta['n_train']} training posts")
            print(f"frame: batch {BATCH}, length {LENGTH}, alphabet {v}, one-hot uint8 "
                  f"= {BATCH * LENGTH * v / 1e6:.2f} MB per batch; {cores} cores; "
                  f"best of {args.rounds} interleaved rounds of {args.seconds:g} s "
                  f"({args.seconds / 2:g} s in one process)\n")  # fmt: skip
            methods = build_methods(stack, args, tmp, corpus_path, corpus)
            for _ in range(args.rounds):
                for key, m in methods.items():
                    # One process settles fast; several need longer to average out.
                    in_process = not key.startswith(("rings", "loader", "parallel"))
                    m.round(args.seconds / 2 if in_process else args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"  {'':<44} {'samples/s':>10} {'CPU ms/batch':>13} {'MB/s':>8}")
    for m in methods.values():
        mb = m.rate * LENGTH * (1 if m.name.startswith("encoder, codes") else v) / 1e6
        print(f"  {m.name:<44} {m.rate:>10,.0f} {m.cpu_ms:>13.2f} {mb:>8,.0f}")
    report(methods, cores)
    return 0


def build_methods(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    tmp: Path,
    corpus_path: Path,
    corpus: Corpus,
) -> dict[str, Method]:
    onehot = DataConfig(
        length=LENGTH,
        batch_size=BATCH,
        producers=args.producers,
        ring_slots=args.slots,
    )
    codes = onehot.model_copy(update={"wire": "codes"})
    cores = len(os.sched_getaffinity(0))
    # As many producers as cores: none waits for a core while another encodes.
    per_core = onehot.model_copy(update={"producers": cores})
    v = corpus.alphabet.size
    ring, ring_codes, ring_per_core = (
        stack.enter_context(
            Pipeline(
                str(corpus_path),
                cfg,
                run_id=f"{RUN}-{cfg.wire}-{cfg.producers}",
                runtime_dir=tmp / f"{cfg.wire}{cfg.producers}",
            )
        )
        for cfg in (onehot, codes, per_core)
    )
    p = args.producers
    slots = args.producers * args.slots
    # The copy goes first in a round: it soaks up what the DataLoader's workers
    # still do after their turn.
    methods = [
        ("copy", "numpy copy of the same bytes, 1 core",
         copy_batches(BATCH * LENGTH * v)),
        ("encoder", "encoder alone, 1 core (codes + one-hot)",
         encoder_batches(corpus, onehot, True)),
        ("encoder_slots", f"  same, into {slots} buffers in turn",
         encoder_batches(corpus, onehot, True, slots)),
        ("encoder_codes", "encoder, codes only, 1 core",
         encoder_batches(corpus, onehot, False)),
        ("single", "single process: encode + touch loop",
         encoder_batches(corpus, onehot, True)),
        ("parallel", f"encoder alone, {cores} processes at once",
         parallel_encoder_batches(stack, corpus_path, onehot, cores)),
        ("rings", f"trainerd rings, {p} producers, one-hot",
         ring_batches(ring, corpus, onehot)),
        ("rings_codes", f"trainerd rings, {p} producers, wire codes",
         ring_batches(ring_codes, corpus, codes)),
        ("rings_per_core", f"trainerd rings, {cores} producers, one-hot",
         ring_batches(ring_per_core, corpus, per_core)),
        ("loader", "PyTorch DataLoader, 4 workers, persistent",
         dataloader_batches(corpus_path, onehot, 4)),
    ]  # fmt: skip
    return {key: Method(name, batches) for key, name, batches in methods}


def report(m: dict[str, Method], cores: int) -> None:
    enc, rings, loader = m["encoder"], m["rings"], m["loader"]
    # The encode loop runs twice a round (alone, and with the touch); the ceiling
    # takes the faster, so load from elsewhere cannot make it look low.
    single_core = max(enc.rate, m["single"].rate)
    ceiling = single_core * cores
    print(f"\nencoder ceiling, {single_core:,.0f} samples/s x {cores} cores: "
          f"{ceiling:,.0f} samples/s")  # fmt: skip
    print(f"rings / DataLoader, samples/s:        {rings.rate / loader.rate:6.1f}x"
          "  (target >= 8x)")  # fmt: skip
    print(f"rings / encoder ceiling, samples/s:   {rings.rate / ceiling:6.0%}"
          "   (target >= 60%)")  # fmt: skip
    per_core = m["rings_per_core"].rate
    print(f"  the same, {cores} producers:          {per_core / ceiling:6.0%}")
    together = m["parallel"].rate
    print(f"rings / encoder in {cores} processes:   {rings.rate / together:6.0%}"
          "   (what the cores give together)")  # fmt: skip
    like = m["encoder_slots"].rate * cores
    print(f"rings / ceiling with as many buffers: {rings.rate / like:6.0%}"
          f"   ({like:,.0f} samples/s)")  # fmt: skip
    print(
        f"rings / single process, samples/s:    {rings.rate / m['single'].rate:6.1f}x"
    )
    print(f"codes wire / one-hot wire, samples/s: "
          f"{m['rings_codes'].rate / rings.rate:6.2f}x (the consumer expands)")  # fmt: skip
    print("CPU per batch, all processes (robust to other load on the machine):")
    print(f"  DataLoader / rings:                 {loader.cpu_ms / rings.cpu_ms:6.1f}x")
    print(f"  encoder alone / rings:              {enc.cpu_ms / rings.cpu_ms:6.0%}")


if __name__ == "__main__":
    raise SystemExit(main())
