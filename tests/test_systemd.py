"""systemd integration: the sd_notify client against real datagram sockets, and the unit files.

`systemd-analyze verify` and `systemd-sysusers --dry-run` run when they are installed; the
directives the unit must carry are checked by parsing it either way.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtad import sdnotify
from mtad.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "mtad.service"
SYSUSERS = ROOT / "systemd" / "mtad.sysusers"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A notify socket like systemd's: AF_UNIX datagrams on a path."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, str(path)
    sock.close()


def test_notify_sends_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert sdnotify.notify("READY=1\nSTATUS=up", environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_abstract_socket() -> None:
    name = f"mtad-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "@", "vsock:2:1234"])
def test_notify_without_usable_socket_is_a_no_op(value: str) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False


def test_notify_without_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False


def test_notify_to_missing_socket_returns_false(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_helpers_use_the_environment(receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("accepting\nmail")
    assert sock.recv(4096) == b"READY=1\nSTATUS=accepting mail"
    assert sdnotify.status("3 queued")
    assert sock.recv(4096) == b"STATUS=3 queued"
    assert sdnotify.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert sdnotify.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", sock.recv(4096))


def _daemon_importable() -> bool:
    try:
        return hasattr(importlib.import_module("mtad.daemon"), "main")
    except ImportError:
        return False


@pytest.mark.skipif(not _daemon_importable(), reason="mtad.daemon not importable yet")
def test_daemon_says_ready_then_stopping(tmp_path: Path, receiver: tuple[socket.socket, str]) -> None:
    from harness import MtadProcess, write_config

    sock, path = receiver
    proc = MtadProcess(write_config(tmp_path), env={"NOTIFY_SOCKET": path})
    try:
        proc.start()
        first = sock.recv(4096).decode()
        assert "READY=1" in first.splitlines()
        assert proc.stop() == 0
        assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
    finally:
        proc.kill()


# --- the unit ------------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat, so no configparser."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_unit_has_the_required_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    one = {key: values(service, key) for key, _ in service}
    expected = {
        "Type": ["notify"],
        "ExecStart": ["/usr/local/bin/mtad --config /etc/mtad/mtad.toml"],
        "User": ["mtad"],
        "Group": ["mtad"],
        "StateDirectory": ["mtad"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "PrivateDevices": ["yes"],
        "ProtectKernelTunables": ["yes"],
        "ProtectKernelModules": ["yes"],
        "ProtectKernelLogs": ["yes"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "LimitNOFILE": ["65536"],
        "Restart": ["on-failure"],
        "KillMode": ["mixed"],
    }
    for key, value in expected.items():
        assert one.get(key) == value, key
    assert "@system-service" in values(service, "SystemCallFilter")
    assert re.fullmatch(r"(/usr)?/bin/kill -HUP \$MAINPID", one["ExecReload"][0])
    assert "DynamicUser" not in one
    assert values(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_stop_timeout_outlasts_the_grace_period() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    [timeout] = values(service, "TimeoutStopSec")
    match = re.fullmatch(r"(\d+)(s|min)?", timeout)
    assert match, timeout
    seconds = int(match[1]) * (60 if match[2] == "min" else 1)
    example = load_config_without_tls(ROOT / "systemd" / "mtad.toml.example")
    # room for the grace period and then for in-flight delivery attempts to finish
    assert seconds >= 2 * example.server.shutdown_grace
    assert seconds >= 2 * load_config(ROOT / "conf" / "mtad.toml").server.shutdown_grace


def load_config_without_tls(path: Path):
    from mtad.config import loads_config

    return loads_config(path.read_text(), base_dir=path.parent)


def test_example_config_matches_the_unit() -> None:
    example = load_config_without_tls(ROOT / "systemd" / "mtad.toml.example")
    service = parse_unit(UNIT.read_text())["Service"]
    assert example.server.spool_dir == "/var/lib/" + values(service, "StateDirectory")[0]
    assert example.http.admin_address.startswith("/run/" + values(service, "RuntimeDirectory")[0] + "/")
    assert example.log.mail_log.startswith("/var/log/" + values(service, "LogsDirectory")[0] + "/")
    assert sorted({int(li.address.rpartition(":")[2]) for li in example.listener}) == [25, 465, 587]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at one that does, change nothing else.
    text = UNIT.read_text()
    assert text.count("/usr/local/bin/mtad") == 2
    copy = tmp_path / "mtad.service"
    copy.write_text(text.replace("/usr/local/bin/mtad", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], check=False, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mtad.service" not in result.stderr, result.stderr


@pytest.mark.skipif(not shutil.which("systemd-sysusers"), reason="systemd-sysusers not installed")
def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(SYSUSERS)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Creating group 'mtad'" in output
    assert "Creating user 'mtad'" in output
