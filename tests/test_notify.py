"""systemd notification: the datagrams trainerd sends, and when it sends them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trainerd.daemon.notify import Notifier


@pytest.fixture
def tmp_short():
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listener(tmp_short):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_short / "notify"
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().split("\n")
    return dict(line.split("=", 1) for line in lines)


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def test_without_notify_socket_every_call_is_skipped():
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("up")
    notifier.status("training")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_ready_status_stopping(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("idle: no job")
    assert received(sock) == {
        "READY": "1",
        "MAINPID": str(os.getpid()),
        "STATUS": "idle: no job",
    }
    notifier.status("training run a1: epoch 1/2, step 3/10")
    notifier.status("training run a1: epoch 1/2, step 3/10")
    notifier.status("training run a1: epoch 1/2, step 4/10")
    assert received(sock) == {"STATUS": "training run a1: epoch 1/2, step 3/10"}
    # The repeated line was not sent again.
    assert received(sock) == {"STATUS": "training run a1: epoch 1/2, step 4/10"}
    notifier.stopping("stopping")
    assert received(sock) == {"STOPPING": "1", "STATUS": "stopping"}
    notifier.close()


def test_watchdog_pings_at_half_the_period(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_s == 2.0
    notifier.watchdog(now=100.0)
    assert received(sock) == {"WATCHDOG": "1"}
    notifier.watchdog(now=100.9)
    assert nothing_waiting(sock)
    notifier.watchdog(now=101.0)
    assert received(sock) == {"WATCHDOG": "1"}
    notifier.close()


def test_watchdog_meant_for_another_process_is_left_alone(listener):
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    notifier = Notifier(env)
    assert notifier.watchdog_s is None
    notifier.watchdog(now=50.0)
    assert nothing_waiting(sock)
    notifier.close()


def test_abstract_namespace_socket():
    name = f"trainerd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        notifier.status("idle")
        assert received(sock) == {"STATUS": "idle"}
        notifier.close()
    finally:
        sock.close()


def test_daemon_is_ready_after_its_control_socket_and_says_stopping(
    tmp_short, listener
):
    """The real daemon: READY once control.sock exists, pings, STOPPING on SIGTERM."""
    sock, path = listener
    env = dict(
        os.environ,
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="400000",
        TRAINERD_STATE_DIR=str(tmp_short / "state"),
        TRAINERD_RUNTIME_DIR=str(tmp_short / "run"),
    )
    env.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "trainerd.daemon.service"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = received(sock)
        assert first["READY"] == "1"
        assert first["MAINPID"] == str(daemon.pid)
        assert first["STATUS"] == "idle: no job"
        assert (tmp_short / "run" / "control.sock").exists()
        assert (tmp_short / "run").stat().st_mode & 0o777 == 0o700
        # Two pings: the main loop keeps pinging while healthy.
        pings = 0
        while pings < 2:
            pings += received(sock).get("WATCHDOG") == "1"
        daemon.send_signal(signal.SIGTERM)
        messages = [received(sock)]
        while "STOPPING" not in messages[-1]:
            messages.append(received(sock))
        assert daemon.wait(timeout=10) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()
    assert not (tmp_short / "run" / "control.sock").exists()
