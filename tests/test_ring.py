"""Ring segments: layout, ownership, space checks, stale segment reclaim, waits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from trainerd.producers.errors import RingError, ShmSpaceError
from trainerd.producers.ring import (
    CONTROL_BYTES,
    Fingerprint,
    Geometry,
    Ring,
    check_space,
    reclaim_stale_segments,
    ring_doorbell,
    segment_name,
    wait_until,
)

GEOMETRY = Geometry(slots=3, batch_size=4, length=16, alphabet=69, wire="onehot")


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    """A private segment directory on the same tmpfs the rings use."""
    path = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    return path


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return f"tr3{os.getpid()}{abs(hash(request.node.name)) % 10**6}"


@pytest.fixture(autouse=True)
def no_segments_left(shm: Path, name: str):
    yield
    left = [f for f in os.listdir(shm) if name in f]
    for f in left:
        os.unlink(shm / f)
    assert left == []


def test_geometry_packs_page_aligned_slots():
    g = GEOMETRY
    assert g.slot_bytes % 4096 == 0
    assert g.onehot_offset >= g.codes_offset + 4 * 16
    assert g.slot_bytes >= g.onehot_offset + 4 * 16 * 69
    codes = Geometry(3, 4, 16, 69, "codes")
    assert codes.slot_bytes < g.slot_bytes
    assert g.ring_bytes == CONTROL_BYTES + 3 * g.slot_bytes


def test_segment_names_carry_a_sanitised_run_id_and_the_owner():
    assert segment_name("job/1 x", 42, 3) == "trainerd-job_1_x-42-r3"


def test_attach_sees_what_the_owner_wrote_and_never_unlinks(shm: Path, name: str):
    path = shm / segment_name(name, os.getpid(), 0)
    owner = Ring.create(path, GEOMETRY, run_id=name)
    owner.codes[1][:] = 7
    owner.commit(0)

    peer = Ring.attach(path)
    assert peer.geometry == GEOMETRY
    assert peer.head == 1 and int(peer.codes[1].sum()) == 7 * 4 * 16
    peer.set_tail(1)
    peer.close()

    assert path.exists() and owner.tail == 1
    with pytest.raises(RingError, match="exists: a pipeline of the same run"):
        Ring.create(path, GEOMETRY, run_id=name)
    owner.close()
    assert not path.exists()


def test_attach_refuses_a_foreign_file(shm: Path, name: str):
    path = shm / segment_name(name, os.getpid(), 9)
    path.write_bytes(b"x" * CONTROL_BYTES)
    try:
        with pytest.raises(RingError, match="not a version 1 trainerd ring"):
            Ring.attach(path)
    finally:
        path.unlink()


def test_check_space_names_bytes_needed_and_free(shm: Path):
    st = os.statvfs(shm)
    free = st.f_bavail * st.f_frsize
    needed = free + 10**12

    with pytest.raises(ShmSpaceError) as err:
        check_space(shm, needed)

    message = str(err.value)
    assert f"({needed} bytes) in {shm}" in message
    assert "bytes) free: raise the container's --shm-size" in message
    reported_free = int(message.split("(")[2].split(" bytes")[0])
    assert abs(reported_free - free) < 10**9


def test_reclaim_removes_segments_of_dead_or_reused_owners_only(shm: Path, name: str):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = shm / segment_name(name, child.pid, 0)
    dead.write_bytes(b"\0" * 16)
    mine = Ring.create(shm / segment_name(name, os.getpid(), 1), GEOMETRY, run_id=name)
    reused = Ring.create(
        shm / segment_name(name, os.getpid(), 2), GEOMETRY, run_id=name
    )
    # A segment whose recorded owner started at another time: the pid was reused.
    reused.control["owner_start"] = 1

    try:
        reclaimed = reclaim_stale_segments(shm)
        assert dead.name in reclaimed and reused.path.name in reclaimed
        assert mine.path.name not in reclaimed and mine.path.exists()
    finally:
        mine.close()
        reused.close()


def test_wait_until_wakes_on_the_doorbell_and_honours_deadline_and_peer():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flag = threading.Event()
    try:
        t0 = time.monotonic()
        ok = wait_until(flag.is_set, fd, deadline=t0 + 0.3, alive=lambda: True)
        assert not ok and 0.29 <= time.monotonic() - t0 < 1.0

        def ring_later() -> None:
            flag.set()
            ring_doorbell(fd)

        timer = threading.Timer(0.05, ring_later)
        timer.start()
        t0 = time.monotonic()
        ok = wait_until(flag.is_set, fd, deadline=t0 + 10, alive=lambda: True, poll_s=5)
        timer.join()
        assert ok and time.monotonic() - t0 < 2

        flag.clear()
        t0 = time.monotonic()
        ok = wait_until(flag.is_set, fd, deadline=t0 + 10, alive=lambda: False)
        assert not ok and time.monotonic() - t0 < 0.1
    finally:
        os.close(fd)


def reference_fingerprint(data: bytes) -> int:
    """The fingerprint's definition in plain Python integers."""
    data += bytes(-len(data) % 8)
    total = 0
    for i in range(len(data) // 8):
        word = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        total += word * ((2 * i + 1) * 0x9E3779B97F4A7C15 % 2**64)
    return total % 2**64


def test_fingerprint_is_its_definition():
    words = np.random.default_rng(3).integers(0, 2**64, 40, dtype=np.uint64)
    fp = Fingerprint(64)
    assert fp.of(words) == reference_fingerprint(words.tobytes())
    assert fp.of(words[:7]) == reference_fingerprint(words[:7].tobytes())


def test_fingerprint_sees_every_single_changed_bit():
    words = np.random.default_rng(4).integers(0, 2**64, 9, dtype=np.uint64)
    fp = Fingerprint(16)
    before = fp.of(words)
    for bit in range(64 * words.size):
        changed = words.copy()
        changed[bit // 64] ^= np.uint64(1 << bit % 64)
        assert fp.of(changed) != before, bit


def test_checksum_covers_labels_ids_and_codes_rows_of_any_length(shm: Path, name: str):
    geometry = Geometry(slots=2, batch_size=5, length=13, alphabet=69, wire="codes")
    ring = Ring.create(shm / segment_name(name, os.getpid(), 0), geometry, run_id=name)
    try:
        rng = np.random.default_rng(5)
        ring.labels[1][:] = rng.integers(0, 20, 5)
        ring.ids[1][:] = rng.integers(0, 10**6, 5)
        ring.codes[1][:] = rng.integers(0, 70, (5, 13))
        whole = ring.labels[1].tobytes() + ring.ids[1].tobytes()
        whole += ring.codes[1].tobytes() + bytes(8)
        for rows in (1, 4, 5):  # 13, 52 and 65 code bytes: the last word is partial
            end = 80 + 13 * rows
            data = whole[: -(-end // 8) * 8]  # and read whole
            assert ring.checksum(1, rows) == reference_fingerprint(data), rows
            ring.codes[1][rows - 1, 0] ^= 1
            assert ring.checksum(1, rows) != reference_fingerprint(data), rows
            ring.codes[1][rows - 1, 0] ^= 1
    finally:
        ring.close()


def test_checksums_see_a_changed_byte(shm: Path, name: str):
    ring = Ring.create(shm / segment_name(name, os.getpid(), 0), GEOMETRY, run_id=name)
    try:
        ring.codes[0][:] = np.arange(16, dtype=np.uint8)
        ring.onehot[0][:] = 1
        before = ring.checksum(0, 4), ring.data_checksum(0, 4)
        ring.codes[0][3, 5] ^= 1
        ring.onehot[0][2, 2, 2] = 0
        assert ring.checksum(0, 4) != before[0]
        assert ring.data_checksum(0, 4) != before[1]
        assert ring.checksum(0, 2) != ring.checksum(0, 4)
    finally:
        ring.close()
