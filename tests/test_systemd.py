"""The systemd unit, sysusers and tmpfiles files, checked with systemd's own tools.

`systemd-analyze verify` exits 0 even for unknown keys, so any line it prints fails
the test. `systemd-analyze security --offline=yes` scores the unit's exposure; the
threshold below is today's score, so hardening can only be loosened on purpose.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "trainerd.service"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)


@pytest.fixture
def installed_unit():
    """The unit with ExecStart pointing at this environment's trainerd.

    verify checks that ExecStart's program exists; the shipped path is where the
    install notes put it, which a development machine does not have.
    """
    root = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    trainerd = Path(sys.executable).parent / "trainerd"
    text = UNIT.read_text()
    assert "ExecStart=/opt/trainerd/bin/trainerd\n" in text
    unit = root / "trainerd.service"
    unit.write_text(text.replace("/opt/trainerd/bin/trainerd", str(trainerd)))
    yield unit
    shutil.rmtree(root, ignore_errors=True)


def settings(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_unit_settings_the_service_relies_on():
    unit = settings(UNIT)
    assert unit["Type"] == "notify"
    assert unit["KillMode"] == "mixed"
    assert unit["Restart"] == "on-failure"
    assert int(unit["RestartSec"]) >= 10
    assert unit["User"] == "trainerd"
    assert unit["StateDirectory"] == "trainerd"
    assert unit["RuntimeDirectory"] == "trainerd"
    assert unit["RuntimeDirectoryMode"] == "0700"
    assert int(unit["WatchdogSec"]) > 0
    # The daemon cuts a graceful stop short after STOP_GRACE_S; systemd must wait
    # longer than that before it sends SIGKILL.
    from trainerd.daemon.supervisor import STOP_GRACE_S

    assert int(unit["TimeoutStopSec"]) >= STOP_GRACE_S + 30
    # /dev/nvidia* must stay reachable.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow"):
        assert key not in unit


@needs_analyze
def test_verify_prints_nothing(installed_unit):
    out = subprocess.run(
        ["systemd-analyze", "verify", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.stdout + out.stderr).strip() == ""
    assert out.returncode == 0


@needs_analyze
def test_security_exposure_does_not_grow(installed_unit):
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None
    or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers or systemd-tmpfiles is not installed",
)
def test_sysusers_and_tmpfiles_make_the_user_and_its_directories():
    root = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    try:
        (root / "etc").mkdir()
        users = subprocess.run(
            ["systemd-sysusers", f"--root={root}", str(SYSTEMD / "trainerd.sysusers")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert users.returncode == 0, users.stderr
        passwd = (root / "etc" / "passwd").read_text().splitlines()
        (entry,) = [line for line in passwd if line.startswith("trainerd:")]
        uid = int(entry.split(":")[2])
        assert entry.split(":")[5] == "/var/lib/trainerd"
        files = subprocess.run(
            [
                "systemd-tmpfiles",
                f"--root={root}",
                "--create",
                str(SYSTEMD / "trainerd.tmpfiles"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert files.returncode == 0, files.stderr
        for name in ("", "corpora", "runs"):
            path = root / "var/lib/trainerd" / name
            assert path.is_dir()
            assert path.stat().st_mode & 0o777 == 0o750
            assert path.stat().st_uid == uid
    finally:
        shutil.rmtree(root, ignore_errors=True)
