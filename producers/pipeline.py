"""The trainer's side of the data path: rings, the plan service and the producers.

`Pipeline` creates one ring per producer in shared memory, serves epoch plans over
ZeroMQ (PUB for the broadcast, ROUTER for producers that ask), spawns the producers
as child processes and supervises them. `Pipeline.stream` yields the batches of a
sequence of plans strictly in order, each one a view into a ring slot checked
against what the trainer expects.

    with Pipeline(corpus_path, data_cfg, run_id=run, runtime_dir=rt) as pipeline:
        for batch in pipeline.stream([train_plan(...), val_plan(...)]):
            ...  # batch.data, batch.labels, batch.rows
            batch.release()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import zmq

from trainerd.producers.config import DataConfig
from trainerd.producers.corpus import Corpus
from trainerd.producers.errors import (
    ConfigError,
    PeerDiedError,
    RingError,
    WaitTimeout,
)
from trainerd.producers.plans import Plan
from trainerd.producers.ring import (
    PHASE_CODES,
    Geometry,
    Ring,
    check_space,
    reclaim_stale_segments,
    ring_doorbell,
    run_hash,
    segment_name,
    wait_until,
)
from trainerd.producers.sampling import one_hot_table

log = logging.getLogger(__name__)

__all__ = ["Batch", "Pipeline", "reclaim_stale_segments"]

STOP_TIMEOUT_S = 2.0
# Producer restarts count against data.max_producer_restarts for this long.
RESTART_WINDOW_S = 600.0
# A wait for a batch calls Pipeline.on_wait this often (status goes on meanwhile).
WAIT_SLICE_S = 1.0
# A producer may take a while to start on a loaded machine (interpreter, numpy, zmq).
STARTUP_TIMEOUT_S = 30.0
IPC_PATH_MAX = 100
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class Batch:
    """One batch as the trainer sees it: views into a ring slot until `release()`."""

    __slots__ = (
        "_gen",
        "_k",
        "_n",
        "_pipeline",
        "codes",
        "data",
        "ids",
        "index",
        "labels",
        "plan",
        "released",
        "rows",
        "wire",
    )

    def __init__(
        self,
        pipeline: Pipeline,
        k: int,
        n: int,
        plan: Plan,
        index: int,
        ring: Ring,
    ) -> None:
        s = ring.slot_of(n)
        rows = plan.batch_rows(index)
        self._pipeline = pipeline
        self._gen = pipeline._generation
        self._k = k
        self._n = n
        self.plan = plan
        self.index = index
        self.rows = rows
        self.wire = ring.geometry.wire
        self.codes = ring.codes[s][:rows]  # (rows, L) uint8, both wires
        self.data = ring.onehot[s][:rows] if self.wire == "onehot" else self.codes
        self.labels = ring.labels[s][:rows]
        self.ids = ring.ids[s][:rows]
        self.released = False

    @property
    def epoch(self) -> int:
        """The plan's epoch."""
        return self.plan.epoch

    @property
    def phase(self) -> str:
        """train or val."""
        return self.plan.phase

    def onehot_into(self, out: np.ndarray) -> np.ndarray:
        """Expands the codes into out[:rows] ((>= rows, L, V) uint8); returns that view.

        For the codes wire on a host; on a device, index a (V + 1, V) table instead.
        """
        view = out[: self.rows]
        np.take(self._pipeline.one_hot_table, self.codes, axis=0, out=view, mode="clip")
        return view

    def release(self) -> None:
        """Hands the slot back to its producer; the views must not be used after."""
        if not self.released:
            self.released = True
            self._pipeline._release(self._k, self._n, self._gen)

    def __repr__(self) -> str:
        return (
            f"Batch({self.plan.phase} epoch {self.plan.epoch} batch {self.index}/"
            f"{self.plan.n_batches}, {self.rows} rows, {self.wire})"
        )


class PlanService:
    """A thread that owns the plan sockets: publishes plans and answers requests.

    ZeroMQ sockets are not thread-safe, so the trainer's thread hands plans over an
    inproc PAIR socket and this thread alone touches PUB and ROUTER.
    """

    def __init__(self, ctx: zmq.Context, pub: str, req: str) -> None:
        self.pub_addr = pub
        self.req_addr = req
        self._ctx = ctx
        self._lock = threading.Lock()
        self._inproc = f"inproc://trainerd-plans-{id(self)}"
        self._cmd = ctx.socket(zmq.PAIR)
        self._cmd.setsockopt(zmq.LINGER, 0)
        self._cmd.bind(self._inproc)
        # Owned by the service thread once it runs: seq -> (header with prev, ids).
        self._served: dict[int, tuple[dict, bytes]] = {}
        self._last = -1
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, name="trainerd-plans", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self._cmd.close(0)
            raise self._error

    def publish(self, plan: Plan) -> None:
        """Stores the plan for requests and broadcasts it."""
        self._send([b"publish", *plan.to_frames()])

    def prune(self, min_seq: int) -> None:
        """Forgets plans below min_seq: no producer can need them any more."""
        self._send([b"prune", str(min_seq).encode()])

    def clear(self) -> None:
        """Forgets every plan (the producers were all stopped)."""
        self._send([b"clear"])

    def close(self) -> None:
        if self._thread.is_alive():
            self._send([b"stop"])
            self._thread.join(5)
        self._cmd.close(0)

    def _send(self, frames: list[bytes]) -> None:
        with self._lock:
            self._cmd.send_multipart(frames)

    def _answer(self, router: zmq.Socket) -> None:
        """Replies to one request: the first plan with seq >= min_seq, or none yet."""
        frames = router.recv_multipart()
        try:
            ident, _, raw = frames
            request = json.loads(raw)
            min_seq, request_id = int(request["min_seq"]), request["id"]
        except (ValueError, KeyError, TypeError):
            log.warning("plan request ignored: malformed, %d frames", len(frames))
            return
        found = [s for s in self._served if s >= min_seq]
        if found:
            head, ids = self._served[min(found)]
            reply = [json.dumps({**head, "id": request_id}).encode(), ids]
        else:
            reply = [json.dumps({"id": request_id, "none": True}).encode()]
        router.send_multipart([ident, b"", *reply])

    def _serve(self) -> None:
        ctx = self._ctx
        cmd = ctx.socket(zmq.PAIR)
        pub = ctx.socket(zmq.PUB)
        router = ctx.socket(zmq.ROUTER)
        try:
            for sock in (cmd, pub, router):
                sock.setsockopt(zmq.LINGER, 0)
            cmd.connect(self._inproc)
            pub.bind(self.pub_addr)
            router.bind(self.req_addr)
        except zmq.ZMQError as err:
            self._error = ConfigError(f"plan sockets: cannot bind: {err}")
            self._ready.set()
            for sock in (cmd, pub, router):
                sock.close(0)
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(cmd, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(1000))
                if cmd in events and not self._command(cmd.recv_multipart(), pub):
                    return
                if router in events:
                    self._answer(router)
        finally:
            for sock in (cmd, pub, router):
                sock.close(0)

    def _command(self, frames: list[bytes], pub: zmq.Socket) -> bool:
        """Carries out one command from the trainer's thread; False on stop."""
        verb = frames[0]
        if verb == b"publish":
            head = json.loads(frames[1])
            # prev lets a subscriber tell whether it missed a plan in between.
            head["prev"] = self._last
            self._last = head["seq"]
            self._served[self._last] = (head, frames[2])
            pub.send_multipart([b"plan", json.dumps(head).encode(), frames[2]])
        elif verb == b"prune":
            for seq in [s for s in self._served if s < int(frames[1])]:
                del self._served[seq]
        elif verb == b"clear":
            self._served.clear()
            self._last = -1
        return verb != b"stop"


@dataclass
class _Producer:
    """The trainer's record of one producer and the consumer state of its ring."""

    k: int
    ring: Ring
    filled_fd: int
    freed_fd: int
    proc: subprocess.Popen | None = None
    restarts: int = 0  # over the pipeline's life
    recent: deque[float] = field(default_factory=deque)  # restart times in the window
    taken: int = 0  # ring sequence number of the next slot to read
    tail: int = 0  # every slot below this is released
    released: set[int] = field(default_factory=set)


def _how_exited(returncode: int) -> str:
    if returncode < 0:
        return f"signal {-returncode}"
    return f"exit code {returncode}"


class Pipeline:
    """Rings, the plan service and the producer processes of one trainer.

    Args:
        corpus_path: the corpus store the producers map.
        data: the data section of the job config.
        run_id: names the rings and is checked in every slot header.
        runtime_dir: where the plan sockets live (short path: ipc names are limited).
    `data.verify` chooses the slot checksums, and `data.max_producer_restarts` how
    often one producer may be restarted within RESTART_WINDOW_S before the stream
    gives up.
    """

    def __init__(
        self,
        corpus_path: str,
        data: DataConfig,
        *,
        run_id: str,
        runtime_dir: Path,
    ) -> None:
        self.corpus_path = str(corpus_path)
        self.data = data
        self.run_id = run_id
        self.runtime_dir = Path(runtime_dir)
        self.pub_addr = f"ipc://{self.runtime_dir}/plans.pub"
        self.req_addr = f"ipc://{self.runtime_dir}/plans.req"
        if len(self.pub_addr) > IPC_PATH_MAX:
            raise ConfigError(
                f"runtime dir {self.runtime_dir}: too long for a socket path "
                f"(at most {IPC_PATH_MAX - 16} characters); choose a shorter one"
            )
        self._run_hash = run_hash(run_id)
        self._producers: list[_Producer] = []
        self._service: PlanService | None = None
        self._last_seq: int | None = None
        self._plans: dict[int, Plan] = {}
        self._dirty = False
        self._generation = 0
        self.geometry: Geometry | None = None
        self.one_hot_table: np.ndarray | None = None
        # Called about every WAIT_SLICE_S while a batch is awaited.
        self.on_wait: Callable[[], None] | None = None

    # Lifetime

    def __enter__(self) -> Pipeline:
        corpus = Corpus.open(self.corpus_path)
        d = self.data
        self.geometry = Geometry(
            slots=d.ring_slots,
            batch_size=d.batch_size,
            length=d.length,
            alphabet=corpus.alphabet.size,
            wire=d.wire,
        )
        self.one_hot_table = one_hot_table(corpus.alphabet)
        shm_dir = Path(d.shm_dir)
        if not shm_dir.is_dir():
            raise ConfigError(f"data.shm_dir: {shm_dir} is not a directory")
        reclaim_stale_segments(shm_dir)
        check_space(shm_dir, d.producers * self.geometry.ring_bytes)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        try:
            for k in range(d.producers):
                path = shm_dir / segment_name(self.run_id, os.getpid(), k)
                ring = Ring.create(path, self.geometry, run_id=self.run_id)
                flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
                self._producers.append(
                    _Producer(k, ring, os.eventfd(0, flags), os.eventfd(0, flags))
                )
            for addr in (self.pub_addr, self.req_addr):
                Path(addr.removeprefix("ipc://")).unlink(missing_ok=True)
            self._service = PlanService(
                zmq.Context.instance(), self.pub_addr, self.req_addr
            )
            for p in self._producers:
                self._spawn(p, from_seq=-1)
        except BaseException:
            self.close()
            raise
        log.info(
            "pipeline started: %d producers, %d slots of %d bytes each, wire %s",
            d.producers,
            d.ring_slots,
            self.geometry.slot_bytes,
            d.wire,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the producers, the plan service, and unlinks the rings."""
        self._stop_producers()
        if self._service is not None:
            self._service.close()
            self._service = None
        for addr in (self.pub_addr, self.req_addr):
            Path(addr.removeprefix("ipc://")).unlink(missing_ok=True)
        for p in self._producers:
            p.ring.close()
            os.close(p.filled_fd)
            os.close(p.freed_fd)
        self._producers = []
        self._generation += 1

    # Producers

    def _spawn(self, p: _Producer, *, from_seq: int) -> None:
        env = dict(os.environ)
        env.update({name: "1" for name in THREAD_ENV})
        cmd = [
            sys.executable,
            "-m",
            "trainerd.producers.worker",
            f"--id={p.k}",
            f"--producers={len(self._producers)}",
            f"--corpus={self.corpus_path}",
            f"--ring={p.ring.path}",
            f"--run-id={self.run_id}",
            f"--pub={self.pub_addr}",
            f"--req={self.req_addr}",
            f"--filled-fd={p.filled_fd}",
            f"--freed-fd={p.freed_fd}",
            f"--parent-pid={os.getpid()}",
            f"--from-seq={from_seq}",
            f"--verify={self.data.verify}",
            f"--log-level={logging.getLevelName(max(log.getEffectiveLevel(), 20))}",
        ]
        p.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, pass_fds=(p.filled_fd, p.freed_fd)
        )
        log.debug("spawned: producer %d, pid %d", p.k, p.proc.pid)

    def _stop_producers(self) -> None:
        procs = [p.proc for p in self._producers if p.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("killed: producer pid %d ignored SIGTERM", proc.pid)
                proc.kill()
                proc.wait()

    def _restart(self, p: _Producer, plan: Plan, b: int) -> None:
        how = _how_exited(p.proc.returncode)
        now = time.monotonic()
        while p.recent and now - p.recent[0] > RESTART_WINDOW_S:
            p.recent.popleft()
        limit = self.data.max_producer_restarts
        if len(p.recent) >= limit:
            raise PeerDiedError(
                f"producer {p.k} exited: {how}; restarted {len(p.recent)} times in "
                f"the last {RESTART_WINDOW_S / 60:g} min (data.max_producer_restarts "
                f"is {limit}), giving up (see the producer's log lines "
                f"above)"
            )
        p.recent.append(now)
        p.restarts += 1
        log.warning(
            "producer %d exited: %s, restarting at %s", p.k, how, self._owed(p, plan, b)
        )
        self._spawn(p, from_seq=plan.seq)

    def _owed(self, p: _Producer, plan: Plan, b: int) -> str:
        """The first batch the producer had not committed, for the log line."""
        last = p.ring.last_committed()
        if p.ring.head > p.taken and last is not None:
            owner = self._plans.get(int(last["plan_seq"]), plan)
            nb = int(last["batch"]) + len(self._producers)
            if nb >= owner.n_batches:
                return f"its first batch after {owner.phase} epoch {owner.epoch}"
            plan, b = owner, nb
        return f"batch {b} of {plan.phase} epoch {plan.epoch}"

    def status(self) -> list[dict]:
        """Per producer: id, pid, state, restarts, fill (committed, unreleased), slots."""
        out = []
        for p in self._producers:
            running = p.proc is not None and p.proc.poll() is None
            out.append(
                {
                    "id": p.k,
                    "pid": p.proc.pid if p.proc is not None else None,
                    "state": "running" if running else "exited",
                    "restarts": p.restarts,
                    "fill": p.ring.head - p.ring.tail,
                    "slots": p.ring.geometry.slots,
                }
            )
        return out

    # The stream

    def stream(self, plans: Iterable[Plan]) -> Iterator[Batch]:
        """Yields every batch of each plan in order, publishing one plan ahead.

        Plans must carry this pipeline's run id and increasing seq numbers. Leaving
        the loop early is allowed: the next stream restarts the producers on empty
        rings, so batches of the abandoned plans never leak into it; so does a
        stream whose first plan does not follow the last one published.
        """
        if not self._producers:
            raise RuntimeError("Pipeline.stream needs an entered pipeline (use 'with')")
        it = iter(plans)
        current = next(it, None)
        if current is None:
            return
        if self._dirty or (
            self._last_seq is not None and current.seq <= self._last_seq
        ):
            self._reset(current.seq)
        self._publish(current)
        finished = False
        try:
            while current is not None:
                upcoming = next(it, None)
                if upcoming is not None:
                    self._publish(upcoming)
                self._service.prune(current.seq)
                for b in range(current.start_batch, current.n_batches):
                    yield self._take(current, b)
                current = upcoming
            finished = True
        finally:
            self._dirty = not finished

    def _publish(self, plan: Plan) -> None:
        if plan.run_id != self.run_id:
            raise ValueError(f"plan of run {plan.run_id!r} in run {self.run_id!r}")
        if plan.batch_size > self.geometry.batch_size:
            raise ValueError(
                f"plan batch size {plan.batch_size} exceeds the ring's "
                f"{self.geometry.batch_size}"
            )
        if self._last_seq is not None and plan.seq <= self._last_seq:
            raise ValueError(
                f"plan seq {plan.seq} after {self._last_seq}: seqs must increase"
            )
        self._last_seq = plan.seq
        self._plans = {s: q for s, q in self._plans.items() if s >= plan.seq - 2}
        self._plans[plan.seq] = plan
        self._service.publish(plan)

    def _reset(self, from_seq: int) -> None:
        """Empties every ring and restarts the producers at plan `from_seq`."""
        log.info("reset: restarting producers on empty rings at plan %d", from_seq)
        self._stop_producers()
        self._generation += 1
        self._service.clear()
        self._last_seq = None
        for p in self._producers:
            p.ring.reset()
            p.taken = p.tail = 0
            p.released.clear()
            for fd in (p.filled_fd, p.freed_fd):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
            self._spawn(p, from_seq=from_seq)
        self._dirty = False

    def _take(self, plan: Plan, b: int) -> Batch:
        p = self._producers[b % len(self._producers)]
        n = p.taken
        if n - p.tail >= p.ring.geometry.slots:
            raise RingError(
                f"ring {p.k}: all {p.ring.geometry.slots} slots are held; release "
                f"batches (Batch.release) before taking more"
            )
        # A dead producer is restarted at once, not when its ring runs dry.
        if p.ring.head <= n or p.proc.poll() is not None:
            self._wait_filled(p, n, plan, b)
        self._check(p, n, plan, b)
        p.taken = n + 1
        return Batch(self, p.k, n, plan, b, p.ring)

    def _wait_filled(self, p: _Producer, n: int, plan: Plan, b: int) -> None:
        """Waits until slot n is committed, restarting a dead producer on the way."""
        timeout_s = self.data.wait_timeout_s
        start, was_attached = time.monotonic(), self._attached(p)
        while True:
            if p.proc.poll() is not None:
                self._restart(p, plan, b)
                start, was_attached = time.monotonic(), False
            attached = self._attached(p)
            if attached and not was_attached:
                # The deadline for a batch counts from when its producer is up.
                start, was_attached = time.monotonic(), True
            limit = timeout_s if attached else max(timeout_s, STARTUP_TIMEOUT_S)
            deadline = start + limit
            slice_s = WAIT_SLICE_S if attached else min(WAIT_SLICE_S, 0.2)
            if wait_until(
                lambda: p.ring.head > n,
                p.filled_fd,
                deadline=min(deadline, time.monotonic() + slice_s),
                alive=lambda: p.proc.poll() is None,
            ):
                return
            if p.proc.poll() is None and time.monotonic() >= deadline:
                raise WaitTimeout(self._stuck(p, plan, b, limit, attached))
            if self.on_wait is not None:
                self.on_wait()

    @staticmethod
    def _attached(p: _Producer) -> bool:
        """True once the running producer has attached to its ring and its sockets."""
        return int(p.ring.control["producer_pid"]) == p.proc.pid

    @staticmethod
    def _stuck(p: _Producer, plan: Plan, b: int, limit: float, attached: bool) -> str:
        what = "made no batch" if attached else "did not start"
        return (
            f"producer {p.k} (pid {p.proc.pid}) {what} in {limit:g} s while the "
            f"trainer waited for batch {b} of {plan.phase} epoch {plan.epoch}; it is "
            f"alive but stuck"
        )

    def _check(self, p: _Producer, n: int, plan: Plan, b: int) -> None:
        """Fails loudly unless slot n holds exactly batch b of `plan`, untorn."""
        ring = p.ring
        s = ring.slot_of(n)
        (seq, plan_seq, epoch, phase, batch, found_rows, checksum, data_checksum,
         found_run, _) = ring.headers[s].item()  # fmt: skip
        rows = plan.batch_rows(b)
        expected = (n, self._run_hash, plan.seq, plan.epoch, PHASE_CODES[plan.phase], b)
        found = (seq, found_run, plan_seq, epoch, phase, batch)
        if found != expected or found_rows != rows:
            raise RingError(
                f"ring {p.k} slot {s}: expected (seq, run, plan, epoch, phase, batch) "
                f"{expected} with {rows} rows, found {found} with {found_rows} rows"
            )
        if ring.checksum(s, rows) != checksum:
            raise RingError(
                f"ring {p.k} slot {s}: checksum mismatch in batch {b} of {plan.phase} "
                f"epoch {plan.epoch}: the slot was read while being written"
            )
        full = self.data.verify == "full" and ring.onehot
        if full and ring.data_checksum(s, rows) != data_checksum:
            raise RingError(
                f"ring {p.k} slot {s}: one-hot checksum mismatch in batch {b} of "
                f"{plan.phase} epoch {plan.epoch}"
            )

    def _release(self, k: int, n: int, generation: int) -> None:
        if generation != self._generation or not self._producers:
            return  # a batch from before a reset or close: its slot is gone already
        p = self._producers[k]
        p.released.add(n)
        # Batches may be released out of order; the tail moves over the released prefix.
        while p.tail in p.released:
            p.released.discard(p.tail)
            p.tail += 1
        p.ring.set_tail(p.tail)
        ring_doorbell(p.freed_fd)
