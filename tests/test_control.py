"""The control protocol: versioned requests, timeouts, errors, and CurveZMQ over TCP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from trainerd.daemon import control
from trainerd.daemon.control import ControlServer, CurveKeys, make_keys, request
from trainerd.producers.errors import ConfigError, DaemonError, TrainingFailed


@pytest.fixture
def tmp_short():
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def handler(op: str, args: dict[str, Any]) -> dict[str, Any]:
    if op == "echo":
        return {"args": args}
    if op == "fail":
        raise TrainingFailed("the run diverged")
    if op == "crash":
        raise RuntimeError("a bug")
    raise DaemonError(f"unknown control operation {op!r}")


class Served:
    """A ControlServer answering from a thread of its own until closed."""

    def __init__(self, runtime_dir: Path, **kw: Any) -> None:
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(runtime_dir, kw))
        self.thread.start()
        assert self.ready.wait(10)
        if self.error is not None:
            self.close()
            raise self.error

    def _run(self, runtime_dir: Path, kw: dict[str, Any]) -> None:
        context = zmq.Context()
        server = None
        try:
            server = ControlServer(context, runtime_dir, **kw)
            self.ready.set()
            poller = zmq.Poller()
            for sock in server.sockets:
                poller.register(sock, zmq.POLLIN)
            while not self.done.is_set():
                for sock, _ in poller.poll(50):
                    server.serve(sock, handler)
        except BaseException as err:
            self.error = err
            self.ready.set()
        finally:
            if server is not None:
                server.close()
            context.term()

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


@pytest.fixture
def served(tmp_short):
    server = Served(tmp_short)
    yield tmp_short
    server.close()


def test_request_and_reply(served):
    endpoint = control.ipc_endpoint(served)
    assert request("echo", {"x": 1}, endpoint=endpoint) == {"args": {"x": 1}}
    assert (served / "control.sock").stat().st_mode & 0o777 == 0o600


def test_errors_keep_their_exit_code(served):
    endpoint = control.ipc_endpoint(served)
    with pytest.raises(DaemonError) as err:
        request("fail", endpoint=endpoint)
    assert str(err.value) == "the run diverged"
    assert err.value.exit_code == TrainingFailed.exit_code
    with pytest.raises(DaemonError, match="unknown control operation 'nope'"):
        request("nope", endpoint=endpoint)
    # A bug in one request is one line to the client; the server goes on.
    with pytest.raises(DaemonError, match="internal error: a bug"):
        request("crash", endpoint=endpoint)
    assert request("echo", endpoint=endpoint) == {"args": {}}


def test_other_protocol_version_is_refused(served):
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control.ipc_endpoint(served))
    try:
        sock.send(json.dumps({"v": 99, "op": "echo"}).encode())
        assert sock.poll(5000)
        reply = json.loads(sock.recv())
    finally:
        sock.close()
    assert reply["ok"] is False
    assert "version 99 is not served" in reply["error"]
    assert "speaks version 1" in reply["error"]


def test_no_daemon_says_how_to_start_one(tmp_short):
    with pytest.raises(DaemonError) as err:
        request("status", endpoint=control.ipc_endpoint(tmp_short))
    message = str(err.value)
    assert message.startswith("trainerd is not running (no control socket at")
    assert "systemctl start trainerd" in message
    assert "trainerctl start --foreground" in message
    assert err.value.exit_code == 4


def test_a_silent_socket_times_out(tmp_short):
    """A bound socket that never answers (a wedged daemon) costs one timeout."""
    context = zmq.Context()
    mute = context.socket(zmq.REP)
    mute.bind(control.ipc_endpoint(tmp_short))
    try:
        with pytest.raises(DaemonError, match=r"did not answer .* within 0.3 s"):
            request("status", endpoint=control.ipc_endpoint(tmp_short), timeout_s=0.3)
    finally:
        mute.close(linger=0)
        context.term()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_needs_curve_keys(tmp_short):
    with pytest.raises(ConfigError, match="TCP is served only with CurveZMQ keys"):
        Served(tmp_short, tcp=f"tcp://127.0.0.1:{_free_port()}")
    assert not (tmp_short / "control.sock").exists()


def test_curve_admits_the_key_holder_and_refuses_others(tmp_short):
    keys = make_keys(tmp_short / "keys")
    strangers = make_keys(tmp_short / "strangers")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    (tmp_short / "run").mkdir()
    server = Served(tmp_short / "run", tcp=endpoint, keys=CurveKeys.for_server(keys))
    try:
        client = CurveKeys.for_client(keys)
        assert request("echo", endpoint=endpoint, keys=client) == {"args": {}}
        # No key at all: the CURVE handshake never completes.
        with pytest.raises(DaemonError, match="refused this client's CurveZMQ key"):
            request("echo", endpoint=endpoint, timeout_s=0.5)
        # A key pair the daemon does not list: the authenticator refuses it.
        other = CurveKeys.for_client(strangers)
        stranger = CurveKeys(
            other.public, other.secret, server_public=client.server_public
        )
        with pytest.raises(DaemonError, match="did not answer"):
            request("echo", endpoint=endpoint, keys=stranger, timeout_s=0.5)
        # The key holder still gets through afterwards.
        assert request("echo", endpoint=endpoint, keys=client) == {"args": {}}
    finally:
        server.close()


def test_trainerd_keys_role_writes_a_key_set(tmp_short):
    out = subprocess.run(
        [sys.executable, "-m", "trainerd.daemon.service", "keys", str(tmp_short / "k")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_short / "k").iterdir())
    assert names == [
        "client.key",
        "client.key_secret",
        "clients",
        "server.key",
        "server.key_secret",
    ]
    assert (tmp_short / "k").stat().st_mode & 0o777 == 0o700
    assert CurveKeys.for_server(tmp_short / "k").authorized_dir.is_dir()


def _daemon(env: dict[str, str], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainerd.daemon.service"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL if the daemon overstays; returns its exit status."""
    proc.terminate()
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _wait_ready(path: Path, proc: subprocess.Popen) -> None:
    """Waits for the daemon's first answer, with a deadline."""
    endpoint = f"ipc://{path / 'control.sock'}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            request("ping", endpoint=endpoint, timeout_s=0.2)
            return
        except DaemonError:
            time.sleep(0.05)
    raise AssertionError("daemon never answered")


def test_second_daemon_on_the_same_runtime_dir_is_refused(tmp_short):
    env = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(tmp_short / "state"),
        TRAINERD_RUNTIME_DIR=str(tmp_short / "run"),
    )
    env.pop("NOTIFY_SOCKET", None)
    first = _daemon(env)
    try:
        _wait_ready(tmp_short / "run", first)
        second = subprocess.run(
            [sys.executable, "-m", "trainerd.daemon.service"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 4
        assert second.stderr.strip().splitlines() == [
            f"trainerd: error: another trainerd (pid {first.pid}) already serves "
            f"{tmp_short / 'run'}; stop it first ('systemctl stop trainerd', or "
            f"'kill {first.pid}' where you started it), or set TRAINERD_RUNTIME_DIR"
        ]
        # The first daemon still answers.
        reply = request("ping", endpoint=control.ipc_endpoint(tmp_short / "run"))
        assert reply["pid"] == first.pid
    finally:
        assert stop(first) == 0
        first.stderr.close()
    assert sorted(os.listdir(tmp_short / "run")) == []


def test_a_killed_daemons_socket_is_reclaimed(tmp_short):
    env = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(tmp_short / "state"),
        TRAINERD_RUNTIME_DIR=str(tmp_short / "run"),
    )
    env.pop("NOTIFY_SOCKET", None)
    first = _daemon(env)
    _wait_ready(tmp_short / "run", first)
    first.kill()
    first.wait()
    first.stderr.close()
    assert (tmp_short / "run" / "control.sock").exists()
    with pytest.raises(DaemonError, match="busy or dead"):
        request("ping", endpoint=control.ipc_endpoint(tmp_short / "run"), timeout_s=0.3)
    second = _daemon(env)
    try:
        _wait_ready(tmp_short / "run", second)
    finally:
        assert stop(second) == 0
        log = second.stderr.read()
        second.stderr.close()
    assert f"reclaimed: stale socket {tmp_short / 'run' / 'control.sock'}" in log


def _nobody_can_run_python() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import trainerd.daemon.cli"],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            timeout=60,
        )
    except OSError:
        return False
    return probe.returncode == 0


@pytest.mark.skipif(
    not _nobody_can_run_python(),
    reason="needs root, and a Python that user nobody may run, to act as another user",
)
def test_another_users_daemon_is_one_line(tmp_short):
    """The runtime directory of root's daemon, seen by `nobody`."""
    env = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(tmp_short / "state"),
        TRAINERD_RUNTIME_DIR=str(tmp_short / "run"),
    )
    env.pop("NOTIFY_SOCKET", None)
    os.chmod(tmp_short, 0o755)
    daemon = _daemon(env)
    try:
        _wait_ready(tmp_short / "run", daemon)
        as_nobody = {"user": 65534, "group": 65534, "extra_groups": []}
        nobody_env = dict(env, TRAINERD_STATE_DIR=str(tmp_short / "nobody"))
        os.mkdir(tmp_short / "nobody")
        os.chown(tmp_short / "nobody", 65534, 65534)
        status = subprocess.run(
            [sys.executable, "-m", "trainerd.daemon.cli", "status"],
            env=nobody_env,
            capture_output=True,
            text=True,
            timeout=60,
            **as_nobody,
        )
        assert status.returncode == 4
        assert status.stdout.strip().splitlines() == [
            f"trainerd: down: control socket {tmp_short / 'run' / 'control.sock'}: "
            "permission denied; its runtime directory belongs to another user: run "
            "trainerctl as that user, or set TRAINERD_RUNTIME_DIR"
        ]
        second = subprocess.run(
            [sys.executable, "-m", "trainerd.daemon.service"],
            env=nobody_env,
            capture_output=True,
            text=True,
            timeout=60,
            **as_nobody,
        )
        assert second.returncode == 4
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(
            f"trainerd: error: runtime directory {tmp_short / 'run'}: belongs to "
            "another user"
        )
    finally:
        assert stop(daemon) == 0
        daemon.stderr.close()


def test_daemon_refuses_tcp_without_keys_in_one_line(tmp_short):
    env = dict(
        os.environ,
        TRAINERD_STATE_DIR=str(tmp_short / "state"),
        TRAINERD_RUNTIME_DIR=str(tmp_short / "run"),
    )
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    out = subprocess.run(
        [sys.executable, "-m", "trainerd.daemon.service", "--control-tcp", endpoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr == (
        f"trainerd: error: control over {endpoint}: TCP is served only with CurveZMQ "
        "keys; set --curve-keys DIR (make one with 'trainerd keys DIR')\n"
    )
    assert os.listdir(tmp_short / "run") == []
