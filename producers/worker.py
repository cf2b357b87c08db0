"""The producer process: makes batch b of every plan where b % P == id, into its ring.

Started by the trainer as `python -m trainerd.producers.worker ...` (fork+exec, so it
is safe after the trainer initialised CUDA). It never imports torch. It attaches to
its ring, resumes after the newest committed slot (so a restarted producer owes
exactly what the dead one owed), and exits by itself when its parent dies.

States: attaching -> waiting for a plan -> waiting for a free slot -> writing ->
(committed) waiting for a free slot ... ; SIGTERM or the parent's death ends any wait.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import zmq

from trainerd.producers.corpus import Corpus
from trainerd.producers.errors import TrainerdError
from trainerd.producers.plans import Plan, make_batch
from trainerd.producers.ring import (
    PHASE_CODES,
    SLOT_HEADER,
    Ring,
    ring_doorbell,
    run_hash,
    wait_until,
)
from trainerd.producers.sampling import Sampler

log = logging.getLogger("trainerd.producers.worker")

PR_SET_PDEATHSIG = 1
REQUEST_TIMEOUT_MS = 500
PLAN_WAIT_S = 0.5


_stop_requested = False


class Stopped(Exception):
    """SIGTERM arrived or the parent died: leave quietly."""


class Producer:
    """One producer's loop around its ring and its plan sockets."""

    def __init__(self, args: argparse.Namespace, ctx: zmq.Context) -> None:
        self.args = args
        self.k = args.id
        self.p = args.producers
        self.parent = args.parent_pid
        self.ring = Ring.attach(Path(args.ring))
        g = self.ring.geometry
        self.corpus = Corpus.open(args.corpus)
        self.sampler = Sampler(self.corpus, g.length, g.batch_size)
        self.run_hash = run_hash(args.run_id)
        self.verify_data = args.verify == "full" and g.wire == "onehot"
        self.plans: dict[int, tuple[Plan, int]] = {}  # prev seq -> (plan, its prev)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"plan")
        self.sub.connect(args.pub)
        self.req = ctx.socket(zmq.DEALER)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.connect(args.req)
        self.request_id = 0
        self.pid = os.getpid()
        # Tells the trainer this producer is up; its batch deadlines start now.
        self.ring.control["producer_pid"] = self.pid

    def close(self) -> None:
        self.sub.close(0)
        self.req.close(0)
        self.ring.close()

    def alive(self) -> bool:
        """False once asked to stop or orphaned (then the loop unwinds)."""
        return not _stop_requested and os.getppid() == self.parent

    # Plans

    def plan_at_least(self, min_seq: int) -> Plan:
        """The first plan the trainer published with seq >= min_seq; waits for it."""
        while True:
            for plan, prev in self.plans.values():
                if prev < min_seq <= plan.seq:
                    return plan
            plan = self._ask(min_seq)
            if plan is not None:
                return plan
            self._listen(PLAN_WAIT_S)

    def _ask(self, min_seq: int) -> Plan | None:
        self.request_id += 1
        request = {"id": self.request_id, "min_seq": min_seq, "producer": self.k}
        self.req.send_multipart([b"", json.dumps(request).encode()])
        deadline = time.monotonic() + REQUEST_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            if not self.alive():
                raise Stopped
            if not self.req.poll(100):
                continue
            frames = self.req.recv_multipart()
            meta = json.loads(frames[1])
            if meta.get("id") != self.request_id:
                continue  # the answer to an earlier, timed-out request
            if meta.get("none"):
                return None
            plan, head = Plan.from_frames(frames[1], frames[2])
            self.plans[head["prev"]] = (plan, head["prev"])
            return plan
        return None

    def _listen(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise Stopped
            if self.sub.poll(100):
                _, head, ids = self.sub.recv_multipart()
                plan, meta = Plan.from_frames(head, ids)
                self.plans[meta["prev"]] = (plan, meta["prev"])
                return

    def _forget_before(self, seq: int) -> None:
        for prev in [p for p, (plan, _) in self.plans.items() if plan.seq < seq]:
            del self.plans[prev]

    # The loop

    def first_batch(self, plan: Plan) -> int:
        """This producer's first batch of `plan`: b >= start_batch, b % P == id."""
        return plan.start_batch + (self.k - plan.start_batch) % self.p

    def resume_point(self) -> tuple[Plan, int]:
        """Where to go on: after the newest committed slot, else the trainer's plan."""
        last = self.ring.last_committed()
        if last is not None and int(last["plan_seq"]) >= self.args.from_seq:
            plan = self.plan_at_least(int(last["plan_seq"]))
            if plan.seq == int(last["plan_seq"]):
                return plan, int(last["batch"]) + self.p
        plan = self.plan_at_least(self.args.from_seq)
        return plan, self.first_batch(plan)

    def run(self) -> None:
        plan, b = self.resume_point()
        n = self.ring.head
        log.info("started: pid %d, plan %d, batch %d", os.getpid(), plan.seq, b)
        while True:
            while b >= plan.n_batches:
                plan = self.plan_at_least(plan.seq + 1)
                self._forget_before(plan.seq)
                b = self.first_batch(plan)
            self.wait_free(n)
            self.write(n, plan, b)
            self.ring.commit(n)
            ring_doorbell(self.args.filled_fd)
            n += 1
            b += self.p

    def wait_free(self, n: int) -> None:
        """Waits until slot n is released; only the parent's death or SIGTERM end it,
        because a trainer may legitimately hold the ring full for minutes
        (validation, a checkpoint), and it is the one that enforces deadlines."""
        slots = self.ring.geometry.slots
        while not wait_until(
            lambda: n - self.ring.tail < slots,
            self.args.freed_fd,
            deadline=time.monotonic() + 3600,
            alive=self.alive,
        ):
            if not self.alive():
                raise Stopped

    def write(self, n: int, plan: Plan, b: int) -> None:
        ring = self.ring
        s = ring.slot_of(n)
        onehot = ring.onehot[s] if ring.onehot else None
        rows = make_batch(
            self.sampler,
            plan,
            b,
            ring.codes[s],
            onehot,
            labels_out=ring.labels[s],
            ids_out=ring.ids[s],
        )
        header = {
            "seq": n,
            "plan_seq": plan.seq,
            "epoch": plan.epoch,
            "phase": PHASE_CODES[plan.phase],
            "batch": b,
            "rows": rows,
            "checksum": ring.checksum(s, rows),
            "data_checksum": ring.data_checksum(s, rows) if self.verify_data else 0,
            "run_hash": self.run_hash,
            "producer_pid": self.pid,
        }
        # The header goes in as one assignment, after the data it describes.
        ring.headers[s][()] = tuple(header[name] for name in SLOT_HEADER.names)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainerd.producers.worker")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--producers", type=int, required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--ring", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--pub", required=True)
    parser.add_argument("--req", required=True)
    parser.add_argument("--filled-fd", type=int, required=True)
    parser.add_argument("--freed-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--from-seq", type=int, default=-1)
    parser.add_argument("--verify", choices=("codes", "full"), default="codes")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(
        level=args.log_level,
        format=f"producer {args.id}: %(message)s",
        stream=sys.stderr,
    )
    producer: Producer | None = None

    def on_term(signum: int, frame: object) -> None:
        global _stop_requested
        _stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides on Ctrl-C
    ctx = zmq.Context()
    try:
        producer = Producer(args, ctx)
        producer.run()
    except Stopped:
        return 0
    except TrainerdError as err:
        log.error("failed: %s", err)
        return err.exit_code
    finally:
        if producer is not None:
            producer.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
