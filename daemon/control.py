"""The control protocol between trainerctl and trainerd: ZeroMQ REQ/REP, JSON.

A request is one frame `{"v": 1, "op": OP, "args": {...}}`; the reply is
`{"v": 1, "ok": true, "result": {...}}` or `{"v": 1, "ok": false, "error": MESSAGE,
"exit_code": N}`. A request of another version is refused with a message that says
both versions. Operations: ping, status, start, stop.

The socket is `ipc://<runtime_dir>/control.sock`; the directory is mode 0700, so only
its owner reaches the daemon. TCP is off unless configured, and then it is served only
with CurveZMQ: the daemon's secret key plus a directory of the public keys of clients
it accepts (`trainerd keys DIR` makes a set). Every client call has a timeout.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from trainerd.producers.errors import ConfigError, DaemonError, TrainerdError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SOCKET_NAME = "control.sock"
DEFAULT_TIMEOUT_S = 5.0
HOW_TO_START = (
    "start it with 'systemctl start trainerd', or run a job in this terminal with "
    "'trainerctl start --foreground -c CONFIG'"
)

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys of one side of a TCP control connection."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    """A client's copy of the daemon's public key."""
    authorized_dir: Path | None = None
    """The daemon's directory of accepted client public keys."""

    @classmethod
    def for_server(cls, keys_dir: str | Path) -> CurveKeys:
        """Reads server.key_secret and the clients/ directory of a key set."""
        root = Path(keys_dir)
        public, secret = _load_secret(root / "server.key_secret")
        clients = root / "clients"
        if not clients.is_dir():
            raise ConfigError(
                f"{clients}: no directory of accepted client keys; "
                f"make a key set with 'trainerd keys {root}'"
            )
        return cls(public, secret, authorized_dir=clients)

    @classmethod
    def for_client(cls, keys_dir: str | Path) -> CurveKeys:
        """Reads client.key_secret and server.key of a key set."""
        root = Path(keys_dir)
        public, secret = _load_secret(root / "client.key_secret")
        server_public, _ = _load_public(root / "server.key")
        return cls(public, secret, server_public=server_public)


def make_keys(keys_dir: str | Path) -> Path:
    """Creates a server key pair and one client key pair, the client accepted."""
    import zmq.auth

    root = Path(keys_dir)
    clients = root / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    zmq.auth.create_certificates(root, "server")
    client_public, _ = zmq.auth.create_certificates(root, "client")
    (clients / "client.key").write_bytes(Path(client_public).read_bytes())
    return root


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read CurveZMQ key: {err}") from err
    if secret is None:
        raise ConfigError(f"{path}: holds no secret key")
    return public, secret


def _load_public(path: Path) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read CurveZMQ key: {err}") from err


def ipc_endpoint(runtime_dir: Path) -> str:
    """The control socket's address in a runtime directory."""
    return f"ipc://{runtime_dir / SOCKET_NAME}"


class ControlServer:
    """The daemon's end: a REP socket per endpoint, served from the main loop."""

    def __init__(
        self,
        context: zmq.Context,
        runtime_dir: Path,
        *,
        tcp: str | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        self.path = runtime_dir / SOCKET_NAME
        self.sockets: list[zmq.Socket] = []
        self._auth = None
        try:
            self._bind_ipc(context)
            if tcp:
                self._bind_tcp(context, tcp, keys)
        except BaseException:
            self.close()
            raise

    def _bind_ipc(self, context: zmq.Context) -> None:
        sock = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        self.sockets.append(sock)
        try:
            sock.bind(f"ipc://{self.path}")
        except zmq.ZMQError as err:
            raise DaemonError(
                f"control socket {self.path}: cannot bind: {err}"
            ) from err
        os.chmod(self.path, 0o600)

    def _bind_tcp(self, context: zmq.Context, tcp: str, keys: CurveKeys | None) -> None:
        if keys is None or keys.authorized_dir is None:
            raise ConfigError(
                f"control over {tcp}: TCP is served only with CurveZMQ keys; "
                "set --curve-keys DIR (make one with 'trainerd keys DIR')"
            )
        from zmq.auth.thread import ThreadAuthenticator

        # The authenticator refuses every client whose public key is not in the
        # accepted directory; without it CURVE would admit any key pair.
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(keys.authorized_dir))
        sock = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_server = True
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret
        self.sockets.append(sock)
        try:
            sock.bind(tcp)
        except zmq.ZMQError as err:
            raise DaemonError(f"control over {tcp}: cannot bind: {err}") from err
        log.info("control listening: %s (CurveZMQ)", tcp)

    def serve(self, sock: zmq.Socket, handler: Handler) -> None:
        """Answers the one request waiting on `sock` (the poller said it is readable)."""
        raw = sock.recv()
        try:
            reply = {"v": PROTOCOL_VERSION, "ok": True, "result": _call(handler, raw)}
        except TrainerdError as err:
            reply = _error(str(err), err.exit_code)
        except Exception as err:
            # A bug in one request must not take the daemon down; the client still
            # gets one line, and the journal the traceback.
            log.exception("control request failed: %r", raw[:200])
            reply = _error(f"internal error: {err}", 1)
        sock.send(json.dumps(reply).encode())

    def close(self) -> None:
        """Closes the sockets and removes the ipc socket file."""
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.path.unlink(missing_ok=True)


def _call(handler: Handler, raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(raw)
        version, op = request["v"], request["op"]
        args = request.get("args") or {}
    except (ValueError, TypeError, KeyError) as err:
        raise DaemonError(f"malformed control request: {err}") from err
    if version != PROTOCOL_VERSION:
        raise DaemonError(
            f"control protocol version {version!r} is not served; this trainerd "
            f"speaks version {PROTOCOL_VERSION}: use the trainerctl of the same release"
        )
    return handler(str(op), dict(args))


def _error(message: str, exit_code: int) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "ok": False,
        "error": message,
        "exit_code": exit_code,
    }


def client_endpoint(runtime_dir: Path) -> tuple[str, CurveKeys | None]:
    """Where trainerctl finds the daemon: TRAINERD_CONTROL, else the ipc socket."""
    endpoint = os.environ.get("TRAINERD_CONTROL", "")
    if not endpoint or endpoint.startswith("ipc://"):
        return endpoint or ipc_endpoint(runtime_dir), None
    keys_dir = os.environ.get("TRAINERD_CURVE_KEYS")
    if not keys_dir:
        raise ConfigError(
            f"TRAINERD_CONTROL={endpoint}: TCP control needs CurveZMQ keys; set "
            "TRAINERD_CURVE_KEYS to a directory with client.key_secret and server.key"
        )
    return endpoint, CurveKeys.for_client(keys_dir)


def check_reachable(endpoint: str) -> None:
    """Fails at once, saying how to start a daemon, when no ipc socket is there."""
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint.removeprefix("ipc://"))
    try:
        path.stat()
    except FileNotFoundError as err:
        raise DaemonError(
            f"trainerd is not running (no control socket at {path}); {HOW_TO_START}"
        ) from err
    except PermissionError as err:
        raise DaemonError(
            f"control socket {path}: permission denied; its runtime directory belongs "
            "to another user: run trainerctl as that user, or set TRAINERD_RUNTIME_DIR"
        ) from err
    if not os.access(path, os.R_OK | os.W_OK):
        raise DaemonError(
            f"control socket {path}: permission denied (owner uid {path.stat().st_uid})"
        )


def request(
    op: str,
    args: dict[str, Any] | None = None,
    *,
    endpoint: str,
    keys: CurveKeys | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Sends one request and returns the result; DaemonError when none comes in time."""
    check_reachable(endpoint)
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret
    try:
        sock.connect(endpoint)
        message = {"v": PROTOCOL_VERSION, "op": op, "args": args or {}}
        sock.send(json.dumps(message).encode())
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise DaemonError(_no_answer(endpoint, timeout_s))
        reply = json.loads(sock.recv())
    except zmq.ZMQError as err:
        if err.errno == errno.EACCES:
            raise DaemonError(f"{endpoint}: permission denied") from err
        raise DaemonError(f"{endpoint}: {err}") from err
    finally:
        sock.close(linger=0)
    if not reply.get("ok"):
        error = DaemonError(reply.get("error", "request refused"))
        error.exit_code = int(reply.get("exit_code", DaemonError.exit_code))
        raise error
    return reply["result"]


def _no_answer(endpoint: str, timeout_s: float) -> str:
    if endpoint.startswith("ipc://"):
        return (
            f"trainerd did not answer on {endpoint} within {timeout_s:g} s: it is "
            f"busy or dead (a stale socket); {HOW_TO_START}"
        )
    return (
        f"trainerd did not answer on {endpoint} within {timeout_s:g} s: it is down, "
        "unreachable, or refused this client's CurveZMQ key"
    )
