"""The pipeline end to end: real producer processes, rings in /dev/shm, plan sockets.

Every stream is compared with the pure definition of its batches (make_batch run in
this process), so each test checks content, order and completeness at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainerd.producers import pipeline as pipeline_module
from trainerd.producers.config import DataConfig
from trainerd.producers.corpus import Corpus, CorpusWriter
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import (
    PeerDiedError,
    RingError,
    ShmSpaceError,
    WaitTimeout,
)
from trainerd.producers.pipeline import Pipeline
from trainerd.producers.plans import Plan, make_batch, train_plan, val_plan
from trainerd.producers.ring import process_start, segment_name
from trainerd.producers.sampling import Sampler

SHM = Path("/dev/shm")
RUN_PREFIX = "tpipe3"
N_TRAIN, N_VAL = 231, 61
LENGTH, BATCH = 48, 8


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    alphabet = Alphabet()
    rng = np.random.default_rng(11)
    writer = CorpusWriter(tmp_path_factory.mktemp("pipe") / "corpus")
    words = ["orbit", "kernel", "simmer", "striker", "lunar", "packet", "basil"]
    for i in range(N_TRAIN + N_VAL):
        body = " ".join(rng.choice(words, size=int(rng.integers(0, 40))))
        writer.add(alphabet.encode(f"post {i}"), alphabet.encode(body), i % 5)
    path = writer.finish(
        train_ids=np.arange(N_TRAIN),
        val_ids=np.arange(N_TRAIN, N_TRAIN + N_VAL),
        meta={"alphabet": alphabet.to_dict(), "label_names": list("abcde")},
    )
    return str(path)


@pytest.fixture(scope="module")
def corpus(corpus_path: str) -> Corpus:
    return Corpus.open(corpus_path)


@pytest.fixture
def run_id() -> str:
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def runtime_dir():
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def our_segments() -> list[str]:
    return sorted(f for f in os.listdir(SHM) if f.startswith(f"trainerd-{RUN_PREFIX}"))


@pytest.fixture(autouse=True)
def nothing_left_in_shm():
    before = our_segments()
    yield
    assert set(our_segments()) <= set(before)


def config(producers: int, **kw: object) -> DataConfig:
    values = {
        "length": LENGTH,
        "batch_size": BATCH,
        "producers": producers,
        "ring_slots": 3,
        "wait_timeout_s": 30.0,
        **kw,
    }
    return DataConfig(**values)


def epoch_plans(
    corpus: Corpus, cfg: DataConfig, run_id: str, phases: str
) -> list[Plan]:
    """Plans for a phase string such as 'tvtv': train/val alternating by epoch."""
    plans, epoch = [], 0
    for seq, phase in enumerate(phases):
        make = train_plan if phase == "t" else val_plan
        plans.append(make(corpus, cfg, run_id=run_id, seed=3, epoch=epoch, seq=seq))
        epoch += phase == "v" or (phase == "t" and phases[seq + 1 : seq + 2] == "t")
    return plans


def digest(data: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(data).tobytes())
    h.update(labels.astype(np.int64).tobytes())
    h.update(ids.astype(np.int64).tobytes())
    return h.hexdigest()


def reference(corpus: Corpus, plans: list[Plan]) -> list[tuple]:
    """(phase, epoch, batch, digest) of every batch, computed in this process."""
    sampler = Sampler(corpus, LENGTH, BATCH)
    codes = np.zeros((BATCH, LENGTH), np.uint8)
    onehot = np.zeros((BATCH, LENGTH, corpus.alphabet.size), np.uint8)
    labels, ids = np.zeros(BATCH, np.int64), np.zeros(BATCH, np.int64)
    out = []
    for plan in plans:
        for b in range(plan.start_batch, plan.n_batches):
            rows = make_batch(
                sampler, plan, b, codes, onehot, labels_out=labels, ids_out=ids
            )
            key = digest(onehot[:rows], labels[:rows], ids[:rows])
            out.append((plan.phase, plan.epoch, b, key))
    return out


def record(batch) -> tuple:
    data = batch.data
    if batch.wire == "codes":
        data = batch.onehot_into(np.empty((BATCH, LENGTH, 69), np.uint8))
    return (
        batch.phase,
        batch.epoch,
        batch.index,
        digest(data, batch.labels, batch.ids),
    )


def consume(pipeline: Pipeline, plans: list[Plan]) -> list[tuple]:
    out = []
    for batch in pipeline.stream(plans):
        out.append(record(batch))
        batch.release()
    return out


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# Contracts


def test_every_post_exactly_once_per_epoch_over_three_epochs(
    corpus, corpus_path, run_id, runtime_dir
):
    cfg = config(4)
    plans = epoch_plans(corpus, cfg, run_id, "tvtvtv")
    seen: list[tuple[str, int, list[int], int]] = []

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        for batch in pipe.stream(plans):
            seen.append((batch.phase, batch.epoch, batch.ids.tolist(), batch.rows))
            batch.release()

    for epoch in range(3):
        train = [
            i for ph, e, ids, _ in seen if (ph, e) == ("train", epoch) for i in ids
        ]
        val = [i for ph, e, ids, _ in seen if (ph, e) == ("val", epoch) for i in ids]
        assert Counter(train) == Counter(range(N_TRAIN))
        assert val == list(range(N_TRAIN, N_TRAIN + N_VAL))
    last_rows = [rows for ph, e, _, rows in seen if (ph, e) == ("val", 0)][-1]
    assert last_rows == N_VAL % BATCH == 5


def test_streams_are_identical_for_one_two_and_four_producers(
    corpus, corpus_path, run_id, runtime_dir
):
    expected = reference(corpus, epoch_plans(corpus, config(1), run_id, "tt"))
    train_digests = [d for ph, e, b, d in expected]
    assert train_digests[: N_TRAIN // BATCH] != train_digests[N_TRAIN // BATCH + 1 :]

    for producers in (1, 2, 4):
        cfg = config(producers)
        plans = epoch_plans(corpus, cfg, run_id, "tvtv")
        with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
            got = consume(pipe, plans)
        # A validation pass between the epochs changes no training batch.
        assert [r for r in got if r[0] == "train"] == expected, producers
        val = [r[1:] for r in got if r[0] == "val"]
        half = len(val) // 2
        assert [(b, d) for _, b, d in val[:half]] == [(b, d) for _, b, d in val[half:]]


def test_codes_wire_expands_to_the_same_batches(
    corpus, corpus_path, run_id, runtime_dir
):
    cfg = config(2, wire="codes")
    plans = epoch_plans(corpus, cfg, run_id, "tv")

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        got = consume(pipe, plans)

    assert got == reference(corpus, plans)


@pytest.mark.parametrize(
    ("kill_after", "fill", "owed"),
    [
        # Batches 10, 14 and 18 are in its ring: the new producer starts at 22.
        (9, 3, "batch 22 of train epoch 0"),
        # It ran ahead into validation (batches 2 and 6) and waits for the next plan.
        (27, 2, "its first batch after val epoch 0"),
    ],
)
def test_a_killed_producer_is_restarted_where_it_stopped(
    corpus, corpus_path, run_id, runtime_dir, caplog, kill_after, fill, owed
):
    cfg = config(4)
    plans = epoch_plans(corpus, cfg, run_id, "tvt")
    caplog.set_level(logging.INFO, logger="trainerd.producers.pipeline")
    got = []

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        for batch in pipe.stream(plans):
            got.append(record(batch))
            batch.release()
            if len(got) == kill_after:
                ring = pipe._producers[2].ring
                wait_for(lambda r=ring: r.head - r.tail == fill, what="a filled ring")
                victim = pipe._producers[2].proc
                victim.kill()
                wait_for(lambda v=victim: v.poll() is not None, what="producer 2 dead")
        status = pipe.status()

    assert got == reference(corpus, plans)
    assert status[2]["restarts"] == 1 and status[2]["state"] == "running"
    restarts = [r.getMessage() for r in caplog.records if "exited" in r.getMessage()]
    assert restarts == [f"producer 2 exited: signal 9, restarting at {owed}"]


@pytest.mark.parametrize(("window_s", "fails"), [(0.0, False), (600.0, True)])
def test_producer_restarts_count_within_a_window(
    corpus, corpus_path, run_id, runtime_dir, monkeypatch, window_s, fails
):
    # A window of 0 s forgets each restart at once; one of 600 s remembers it.
    monkeypatch.setattr(pipeline_module, "RESTART_WINDOW_S", window_s)
    cfg = config(2, max_producer_restarts=1)
    plans = epoch_plans(corpus, cfg, run_id, "tt")
    got, error = [], None

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        try:
            for batch in pipe.stream(plans):
                got.append(record(batch))
                batch.release()
                if len(got) in (3, 9):  # producer 1 dies twice, 6 batches apart
                    victim = pipe._producers[1].proc
                    victim.kill()
                    wait_for(lambda v=victim: v.poll() is not None, what="dead")
        except PeerDiedError as err:
            error = err
        restarts = pipe.status()[1]["restarts"]

    if fails:
        assert "restarted 1 times in the last 10 min" in str(error)
        assert restarts == 1
    else:
        assert error is None and got == reference(corpus, plans)
        assert restarts == 2


def test_a_producer_that_misses_the_broadcast_asks_for_the_plan(
    corpus, corpus_path, run_id, runtime_dir, caplog
):
    cfg = config(2)
    plans = epoch_plans(corpus, cfg, run_id, "tv")
    caplog.set_level(logging.INFO, logger="trainerd.producers.pipeline")

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        late = pipe.status()[1]["pid"]
        os.kill(late, signal.SIGSTOP)  # frozen before it could subscribe
        stream = pipe.stream(plans)
        first = next(stream)  # the plans are out, producer 1 has not seen them
        got = [record(first)]
        first.release()
        os.kill(late, signal.SIGCONT)
        for batch in stream:
            got.append(record(batch))
            batch.release()

    assert got == reference(corpus, plans)
    assert not [r for r in caplog.records if "exited" in r.getMessage()]


def test_leaving_a_stream_early_does_not_leak_into_the_next(
    corpus, corpus_path, run_id, runtime_dir
):
    cfg = config(2)
    plans = epoch_plans(corpus, cfg, run_id, "tvt")

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        for i, batch in enumerate(pipe.stream(plans[:2])):
            batch.release()
            if i == 5:
                break
        resumed = train_plan(
            corpus, cfg, run_id=run_id, seed=3, epoch=0, seq=0, start_batch=6
        )
        got = consume(pipe, [resumed, *plans[1:]])

    assert got == reference(corpus, [resumed, *plans[1:]])


def test_checksums_hold_over_thousands_of_batches_fast_and_slow(
    corpus, corpus_path, run_id, runtime_dir
):
    cfg = config(3, length=24, batch_size=2, ring_slots=2)
    plans = epoch_plans(corpus, cfg, run_id, "t" * 10)
    n_batches = sum(p.n_batches for p in plans)
    assert n_batches >= 1000

    cfg = cfg.model_copy(update={"verify": "full"})
    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        fast = [
            digest(b.data, b.labels, b.ids)
            for b in pipe.stream(plans)
            if not b.release()
        ]
        # The slow consumer holds each batch while taking the next (an async copy).
        slow, held = [], None
        more = [
            train_plan(corpus, cfg, run_id=run_id, seed=3, epoch=e, seq=10 + e)
            for e in range(10)
        ]
        for batch in pipe.stream(more):
            for _ in range(3):
                key = digest(batch.data, batch.labels, batch.ids)
            slow.append(key)
            if held is not None:
                held.release()
            held = batch
        held.release()

    assert len(fast) == len(slow) == n_batches
    assert len(set(fast)) > n_batches * 0.9


def test_a_wrong_header_or_a_torn_slot_fails_loudly(
    corpus, corpus_path, run_id, runtime_dir
):
    cfg = config(1)
    plans = epoch_plans(corpus, cfg, run_id, "t")

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        ring = pipe._producers[0].ring
        stream = pipe.stream(plans)
        next(stream).release()
        wait_for(lambda: ring.head >= 3, what="committed slots")
        ring.headers[ring.slot_of(1)]["batch"] = 7
        with pytest.raises(RingError, match=r"expected .* \(1, \d+, 0, 0, 0, 1\) .*"):
            next(stream)

        stream = pipe.stream(plans)
        next(stream).release()
        wait_for(lambda: ring.head >= 3, what="committed slots")
        ring.codes[ring.slot_of(1)][0, 0] ^= 1
        with pytest.raises(RingError, match="checksum mismatch in batch 1 of train"):
            next(stream)


def test_a_stuck_producer_is_a_timeout_and_a_dead_one_is_named(
    corpus, corpus_path, run_id, runtime_dir, monkeypatch
):
    monkeypatch.setattr(pipeline_module, "WAIT_SLICE_S", 0.1)
    cfg = config(2, wait_timeout_s=0.5, max_producer_restarts=0)
    plans = epoch_plans(corpus, cfg, run_id, "t")
    waits = []

    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        pipe.on_wait = lambda: waits.append(time.monotonic())
        pid = pipe.status()[1]["pid"]
        control = pipe._producers[1].ring.control
        wait_for(lambda: control["producer_pid"] == pid, what="producer 1 up")
        os.kill(pid, signal.SIGSTOP)
        try:
            stream = pipe.stream(plans)
            next(stream).release()
            t0 = time.monotonic()
            with pytest.raises(
                WaitTimeout, match=f"producer 1 \\(pid {pid}\\) made no"
            ):
                next(stream)
            assert 0.5 <= time.monotonic() - t0 < 2
            # The waiting consumer was called back about every 0.1 s meanwhile.
            assert len(waits) >= 3 and waits[-1] - waits[0] >= 0.2
        finally:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)

        # The failed stream left the rings dirty: the next one starts afresh.
        stream = pipe.stream(plans)
        next(stream).release()
        os.kill(pipe.status()[1]["pid"], signal.SIGKILL)
        with pytest.raises(
            PeerDiedError,
            match=r"producer 1 exited: signal 9; restarted 0 times in the last 10 "
            r"min \(data.max_producer_restarts is 0\)",
        ):
            for batch in stream:
                batch.release()


def test_shm_too_small_is_an_error_before_anything_is_created(
    corpus_path, run_id, runtime_dir
):
    cfg = config(64, length=65536, batch_size=65536, ring_slots=1024)

    with pytest.raises(ShmSpaceError) as err:
        Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir).__enter__()

    needed = int(str(err.value).split("(")[1].split(" bytes")[0])
    assert needed > 64 * 1024 * 65536 * 65536 * 69
    assert "bytes) free: raise the container's --shm-size" in str(err.value)


CONSUMER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from trainerd.producers.config import DataConfig
    from trainerd.producers.corpus import Corpus
    from trainerd.producers.pipeline import Pipeline
    from trainerd.producers.plans import train_plan

    corpus_path, run_id, rt = sys.argv[1:4]
    cfg = DataConfig.model_validate_json(sys.argv[4])
    plan = train_plan(Corpus.open(corpus_path), cfg, run_id=run_id, seed=1, epoch=0, seq=0)
    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=Path(rt)) as pipe:
        stream = pipe.stream([plan])
        next(stream).release()
        pids = [p["pid"] for p in pipe.status()]
        print(json.dumps(pids), flush=True)
        sys.stdin.read()
    """
)


@pytest.mark.slow
def test_producers_die_with_their_consumer_and_the_next_start_reclaims(
    corpus_path, run_id, runtime_dir, caplog
):
    cfg = config(4)
    cfg_json = cfg.model_dump_json()
    before = our_segments()
    consumer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONSUMER,
            corpus_path,
            run_id,
            str(runtime_dir),
            cfg_json,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        pids = json.loads(consumer.stdout.readline())
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdin.close()
        consumer.stdout.close()
    killed_at = time.monotonic()

    wait_for(lambda: all(process_start(p) is None for p in pids), 2.0, "producers")
    assert time.monotonic() - killed_at < 2.0
    orphans = [segment_name(run_id, consumer.pid, k) for k in range(4)]
    # Another pipeline starting on this machine may reclaim them first: fine too.
    left = [f for f in orphans if (SHM / f).exists()]

    caplog.set_level(logging.INFO, logger="trainerd.producers.ring")
    with Pipeline(corpus_path, cfg, run_id=run_id, runtime_dir=runtime_dir):
        assert not [f for f in orphans if (SHM / f).exists()]
    assert set(our_segments()) <= set(before)
    reclaimed = [
        r.getMessage() for r in caplog.records if "reclaimed: " in r.getMessage()
    ]
    assert all(any(f in line for line in reclaimed) for f in left)


def test_the_producer_process_imports_no_torch():
    code = (
        "import sys, trainerd.producers.worker; "
        "print([m for m in ('torch', 'pydantic') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def private_memory_kb(pid: int) -> int:
    """Anonymous resident memory of a process: what it allocated, not mapped files."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError(f"no RssAnon for pid {pid}")


def test_a_producers_own_memory_stays_flat_over_epochs(corpus, run_id, runtime_dir):
    cfg = config(2)
    plans = epoch_plans(corpus, cfg, run_id, "tv" * 8)
    with Pipeline(corpus.path, cfg, run_id=run_id, runtime_dir=runtime_dir) as pipe:
        batches = 0
        for batch in pipe.stream(plans):
            batch.release()
            batches += 1
            if batches == plans[0].n_batches:
                # After one epoch every buffer a producer uses has been touched once.
                pids = [p["pid"] for p in pipe.status()]
                first = [private_memory_kb(pid) for pid in pids]
        last = [private_memory_kb(pid) for pid in pids]
    assert batches == sum(p.n_batches for p in plans)
    for pid, before, after in zip(pids, first, last, strict=True):
        print(f"producer {pid}: {before} kB -> {after} kB private memory")
        assert after - before < 2048, (pid, before, after)
