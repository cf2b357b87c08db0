"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams.

systemd passes the socket in NOTIFY_SOCKET (a path, or `@name` for the abstract
namespace) and the watchdog period in WATCHDOG_USEC. Each message is one datagram of
`KEY=value` lines; no libsystemd is needed. Without NOTIFY_SOCKET every call does
nothing, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_s(env)
        self._last_status = ""
        self._last_ping = 0.0
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._sock is not None

    def ready(self, status: str = "") -> None:
        """The control socket is up: systemd may consider the start done."""
        self._send("READY=1", f"MAINPID={os.getpid()}", *_status_line(status))

    def status(self, text: str) -> None:
        """A line a person reads in `systemctl status`; repeats are not sent."""
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self, *, now: float | None = None) -> None:
        """Pings the watchdog at half its period; call from the healthy main loop."""
        if self.watchdog_s is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_s / 2:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def stopping(self, status: str = "") -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1", *_status_line(status))

    def close(self) -> None:
        """Closes the datagram socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:
            # The manager going away must not take the daemon with it.
            log.warning("notify failed: %s: %s", self.address, err)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock addresses (vsock:CID:PORT) belong to VMs; trainerd does not run there.
    log.warning("notify skipped: unsupported NOTIFY_SOCKET %r", value)
    return None


def _watchdog_s(env: Mapping[str, str]) -> float | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process systemd expects the pings from.
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6


def _status_line(status: str) -> tuple[str, ...]:
    return (f"STATUS={status}",) if status else ()
