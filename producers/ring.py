"""A single-producer, single-consumer ring of batch slots in shared memory.

A segment is a plain file in a tmpfs (`data.shm_dir`), created and unlinked by the
trainer only; producers attach to it. multiprocessing.shared_memory is not used: its
resource tracker unlinks segments that a process merely attached to.

Segment layout:

    control block (4096 bytes)   magic, version, geometry, run hash, pids;
                                 head (committed count) and tail (released count)
                                 on cache lines of their own
    slot 0 .. S-1                each: header (128 bytes), labels int64 (B),
                                 post ids int64 (B), codes uint8 (B, L), and for the
                                 onehot wire one-hot uint8 (B, L, V); page aligned

The producer writes the whole slot, then its header, then advances head; the
consumer reads slots below head and advances tail when it releases them. Counters
are 8-byte aligned single stores. Two eventfds per ring ring the doorbells ("filled"
and "freed") so that neither side spins.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import select
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainerd.producers.errors import RingError, ShmSpaceError

log = logging.getLogger(__name__)

MAGIC = b"TRNDRING"
VERSION = 1
CONTROL_BYTES = 4096
HEADER_BYTES = 128
PAGE = 4096
PREFIX = "trainerd-"
WIRES = ("onehot", "codes")
PHASE_CODES = {"train": 0, "val": 1}
POLL_S = 0.2

CONTROL = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("slots", "<u4"),
        ("slot_bytes", "<u8"),
        ("batch_size", "<u4"),
        ("length", "<u4"),
        ("alphabet", "<u4"),
        ("wire", "<u4"),
        ("run_hash", "<u8"),
        ("owner_pid", "<i8"),
        ("owner_start", "<u8"),
        ("producer_pid", "<i8"),
    ]
)
HEAD_OFFSET = 128
TAIL_OFFSET = 192

SLOT_HEADER = np.dtype(
    [
        ("seq", "<u8"),  # ring sequence number: the slot's place in the whole stream
        ("plan_seq", "<i8"),
        ("epoch", "<i8"),
        ("phase", "<i8"),
        ("batch", "<i8"),
        ("rows", "<i8"),
        ("checksum", "<u8"),  # Fingerprint of labels, ids and codes of the rows
        ("data_checksum", "<u8"),  # adler32 of the one-hot rows, 0 when not computed
        ("run_hash", "<u8"),
        ("producer_pid", "<i8"),
    ]
)


def run_hash(run_id: str) -> int:
    """A short fingerprint of a run id, stored in segments and slot headers."""
    return zlib.crc32(run_id.encode()) or 1


def segment_name(run_id: str, owner_pid: int, k: int) -> str:
    """`trainerd-<run>-<owner pid>-r<k>`, the run id reduced to [A-Za-z0-9_.]."""
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", run_id)[:64] or "run"
    return f"{PREFIX}{safe}-{owner_pid}-r{k}"


_NAME = re.compile(r"^trainerd-([A-Za-z0-9_.]+)-(\d+)-r(\d+)$")


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Fingerprint:
    """A 64-bit checksum that finds torn reads at about a quarter of adler32's cost.

    Bytes are read as little-endian 64-bit words w_i and summed as w_i * k_i mod
    2**64 with odd weights k_i: a change in any one word always changes the sum (an
    odd k_i is invertible mod 2**64), a change in several leaves it equal with a
    chance of about 2**-64. Numpy runs it as one multiply and one sum, with no
    allocation once constructed.

    Args:
        max_words: the most words one call reads.
    """

    _MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: 2**64 over the golden ratio

    def __init__(self, max_words: int) -> None:
        positions = np.arange(max_words, dtype=np.uint64)
        self._weights = (positions * np.uint64(2) + np.uint64(1)) * self._MIX
        self._products = np.empty(max_words, np.uint64)

    def of(self, words: np.ndarray) -> int:
        """The checksum of `words`, a 1-d "<u8" array of at most max_words."""
        n = words.size
        products = self._products[:n]
        np.multiply(words, self._weights[:n], out=products)
        return int(np.add.reduce(products))


@dataclass(frozen=True)
class Geometry:
    """Sizes of one ring: slots, frame and the offsets inside a slot."""

    slots: int
    batch_size: int
    length: int
    alphabet: int
    wire: str

    @property
    def labels_offset(self) -> int:
        return HEADER_BYTES

    @property
    def ids_offset(self) -> int:
        return HEADER_BYTES + 8 * self.batch_size

    @property
    def codes_offset(self) -> int:
        return HEADER_BYTES + 16 * self.batch_size

    @property
    def onehot_offset(self) -> int:
        end = self.codes_offset + self.batch_size * self.length
        return -(-end // 64) * 64

    @property
    def slot_bytes(self) -> int:
        end = self.onehot_offset
        if self.wire == "onehot":
            end += self.batch_size * self.length * self.alphabet
        return -(-end // PAGE) * PAGE

    @property
    def ring_bytes(self) -> int:
        return CONTROL_BYTES + self.slots * self.slot_bytes


def check_space(shm_dir: str | os.PathLike, needed: int) -> None:
    """Raises ShmSpaceError when `shm_dir` has less than `needed` bytes free."""
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise ShmSpaceError(_space_message(shm_dir, needed, free))


def _space_message(shm_dir: str | os.PathLike, needed: int, free: int) -> str:
    return (
        f"rings need {human_bytes(needed)} ({needed} bytes) in {shm_dir}, "
        f"{human_bytes(free)} ({free} bytes) free: raise the container's --shm-size "
        f"or lower data.ring_slots / data.batch_size, or use data.wire: codes"
    )


def process_start(pid: int) -> int | None:
    """Start time of a live, non-zombie process in clock ticks; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def reclaim_stale_segments(shm_dir: str | os.PathLike = "/dev/shm") -> list[str]:
    """Unlinks trainerd segments whose owner is gone; returns their names.

    An owner counts as gone when its pid is dead or a zombie, or when the pid now
    belongs to a process started after the segment's owner (the pid was reused).
    """
    reclaimed = []
    try:
        names = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return []
    for name in names:
        match = _NAME.match(name)
        if not match:
            continue
        pid = int(match.group(2))
        if _owner_alive(Path(shm_dir) / name, pid):
            continue
        try:
            os.unlink(Path(shm_dir) / name)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("reclaim skipped: %s belongs to another user", name)
            continue
        reclaimed.append(name)
    if reclaimed:
        log.info("reclaimed: %s", ", ".join(reclaimed))
    return reclaimed


def _owner_alive(path: Path, pid: int) -> bool:
    start = process_start(pid)
    if start is None:
        return False
    try:
        with open(path, "rb") as f:
            raw = f.read(CONTROL.itemsize)
    except OSError:
        return True
    if len(raw) < CONTROL.itemsize:
        # Too young to hold a control block: its owner is creating it right now.
        return True
    ctrl = np.frombuffer(raw, dtype=CONTROL)[0]
    if ctrl["magic"] != MAGIC:
        return True
    return int(ctrl["owner_start"]) == start


class Ring:
    """One mapped segment; the trainer creates it, a producer attaches to it."""

    def __init__(self, path: Path, mm: mmap.mmap, geometry: Geometry, owner: bool):
        self.path = path
        self.geometry = geometry
        self.owner = owner
        self._mm = mm
        self.control = np.ndarray((), CONTROL, buffer=mm, offset=0)
        g = geometry
        # Labels, ids and codes lie back to back: one run of words per slot.
        words = -(-(g.codes_offset - g.labels_offset + g.batch_size * g.length) // 8)
        self._fingerprint = Fingerprint(words)
        self._head = np.ndarray((1,), "<u8", buffer=mm, offset=HEAD_OFFSET)
        self._tail = np.ndarray((1,), "<u8", buffer=mm, offset=TAIL_OFFSET)
        self.headers = []
        self._words = []
        self.labels = []
        self.ids = []
        self.codes = []
        self.onehot = []
        for s in range(g.slots):
            base = CONTROL_BYTES + s * g.slot_bytes
            b, length, v = g.batch_size, g.length, g.alphabet
            self.headers.append(np.ndarray((), SLOT_HEADER, buffer=mm, offset=base))
            self._words.append(
                np.ndarray((words,), "<u8", mm, offset=base + g.labels_offset)
            )
            self.labels.append(
                np.ndarray((b,), np.int64, buffer=mm, offset=base + g.labels_offset)
            )
            self.ids.append(
                np.ndarray((b,), np.int64, buffer=mm, offset=base + g.ids_offset)
            )
            self.codes.append(
                np.ndarray((b, length), np.uint8, mm, offset=base + g.codes_offset)
            )
            if g.wire == "onehot":
                self.onehot.append(
                    np.ndarray((b, length, v), np.uint8, mm, base + g.onehot_offset)
                )

    # Creation and attachment

    @classmethod
    def create(cls, path: Path, geometry: Geometry, *, run_id: str) -> Ring:
        """Creates, reserves and maps a new segment (O_EXCL, mode 0600)."""
        size = geometry.ring_bytes
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError as err:
            raise RingError(
                f"ring {path} exists: a pipeline of the same run is running in "
                f"this process; give each pipeline its own run id"
            ) from err
        try:
            try:
                # Reserve every page now: a full tmpfs fails here, not as SIGBUS later.
                os.posix_fallocate(fd, 0, size)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EFBIG):
                    st = os.statvfs(path.parent)
                    free = st.f_bavail * st.f_frsize
                    raise ShmSpaceError(
                        _space_message(path.parent, size, free)
                    ) from err
                raise
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        ring = cls(path, mm, geometry, owner=True)
        c = ring.control
        c["version"] = VERSION
        c["slots"] = geometry.slots
        c["slot_bytes"] = geometry.slot_bytes
        c["batch_size"] = geometry.batch_size
        c["length"] = geometry.length
        c["alphabet"] = geometry.alphabet
        c["wire"] = WIRES.index(geometry.wire)
        c["run_hash"] = run_hash(run_id)
        c["owner_pid"] = os.getpid()
        c["owner_start"] = process_start(os.getpid()) or 0
        c["magic"] = MAGIC
        return ring

    @classmethod
    def attach(cls, path: Path) -> Ring:
        """Maps an existing segment read-write without taking ownership."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < CONTROL_BYTES:
                raise RingError(f"ring {path}: {size} bytes, not a trainerd ring")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        c = np.ndarray((), CONTROL, buffer=mm, offset=0)
        if c["magic"] != MAGIC or int(c["version"]) != VERSION:
            mm.close()
            raise RingError(f"ring {path}: not a version {VERSION} trainerd ring")
        geometry = Geometry(
            slots=int(c["slots"]),
            batch_size=int(c["batch_size"]),
            length=int(c["length"]),
            alphabet=int(c["alphabet"]),
            wire=WIRES[int(c["wire"])],
        )
        if geometry.ring_bytes != size:
            mm.close()
            raise RingError(f"ring {path}: size {size} does not match its geometry")
        return cls(path, mm, geometry, owner=False)

    def close(self) -> None:
        """Unmaps; the owner also unlinks the file."""
        self.headers = self.labels = self.ids = self.codes = self.onehot = []
        self.control = self._head = self._tail = None
        # A caller may still hold a view (a Batch not yet dropped): the mapping then
        # goes with the last view, and the unlink below still frees the name.
        with contextlib.suppress(BufferError):
            self._mm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # Counters

    @property
    def head(self) -> int:
        """Slots committed since the ring was created."""
        return int(self._head[0])

    @property
    def tail(self) -> int:
        """Slots released since the ring was created."""
        return int(self._tail[0])

    def commit(self, n: int) -> None:
        """Producer: publishes slot n (all of it written)."""
        self._head[0] = n + 1

    def set_tail(self, n: int) -> None:
        """Consumer: every slot below n is released."""
        self._tail[0] = n

    def reset(self) -> None:
        """Owner: empties the ring (no producer attached)."""
        self._head[0] = 0
        self._tail[0] = 0

    def slot_of(self, n: int) -> int:
        """Slot index of ring sequence number n."""
        return n % self.geometry.slots

    def last_committed(self) -> np.void | None:
        """A copy of the newest committed slot header, None if none was committed."""
        head = self.head
        if head == 0:
            return None
        return self.headers[self.slot_of(head - 1)].copy()

    # Checksums

    def checksum(self, s: int, rows: int) -> int:
        """The fingerprint of slot s from its labels through its codes rows.

        It also covers the labels and ids past `rows` and up to 7 bytes past the
        codes rows: nobody writes those while the slot is committed, so both sides
        see them alike."""
        g = self.geometry
        end = g.codes_offset - g.labels_offset + rows * g.length
        return self._fingerprint.of(self._words[s][: -(-end // 8)])

    def data_checksum(self, s: int, rows: int) -> int:
        """adler32 of slot s's one-hot rows (the expensive, optional part)."""
        return zlib.adler32(memoryview(self.onehot[s][:rows]).cast("B")) or 1


def wait_until(
    ready: Callable[[], bool],
    fd: int,
    *,
    deadline: float,
    alive: Callable[[], bool],
    poll_s: float = POLL_S,
) -> bool:
    """Waits on eventfd `fd` until `ready()`; False when past the deadline or not
    `alive()`. The condition is always checked before sleeping, so a doorbell rung
    before the wait began is never needed."""
    while True:
        if ready():
            return True
        if not alive():
            return False
        now = time.monotonic()
        if now >= deadline:
            return False
        readable, _, _ = select.select([fd], [], [], min(poll_s, deadline - now))
        if readable:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)


def ring_doorbell(fd: int) -> None:
    """Wakes the peer waiting on eventfd `fd`."""
    os.eventfd_write(fd, 1)
