"""Run a real mtad process for tests: write a config, start it, learn its ports, stop it.

The daemon logs one JSON line per listener it opened (`listener.open`) and `daemon.ready` once
everything is up; the harness reads those lines from the log file rather than guessing ports,
so every listener binds port 0 and no two tests race for a port. The control port is a unix
socket in the test's directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def write_config(directory: Path, *, domains: tuple[str, ...] = ("example.test",), extra: str = "",
                 listeners: tuple[str, ...] = ("mx",)) -> Path:
    spool = directory / "spool"
    listener_tables = "".join(f'[[listener]]\nrole = "{role}"\naddress = "127.0.0.1:0"\n\n' for role in listeners)
    text = f"""
[server]
hostname = "mx.test.local"
spool_dir = "{spool}"
shutdown_grace = "5s"

{listener_tables}
[http]
address = "127.0.0.1:0"
admin_address = "{directory / 'admin.sock'}"

[inbound]
domains = {json.dumps(list(domains))}

[log]
format = "json"
mail_log = "{directory / 'mail.log'}"
{extra}
"""
    # Tests that do not configure delivery keep their mail queued, and no test ever asks a
    # resolver off loopback (port 9 on 127.0.0.1: nothing answers, lookups fail fast).
    if "[delivery]" not in extra:
        text += '\n[delivery]\npaused = true\n'
    if "[dns]" not in extra:
        text += '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "200ms"\n'

    path = directory / "mtad.toml"
    path.write_text(text)
    return path


FAST_DELIVERY: dict[str, str | int] = {
    "min_backoff": "1s", "max_backoff": "2s", "connect_timeout": "2s", "greeting_timeout": "3s",
    "command_timeout": "3s", "suspend_after": 3, "suspend_time": "2s", "connection_idle_timeout": "2s"}
"""The short retry, timeout and suspension times the delivery tests run mtad on."""


def fast_delivery(**keys: str | int | bool | None) -> str:
    """A `[delivery]` table for write_config's `extra`: FAST_DELIVERY, `keys` changing or adding
    keys (None leaves one out). It ends in the table, so a test may append more of its keys."""
    values = {**FAST_DELIVERY, **keys}
    lines = "".join(f"{key} = {_toml(value)}\n" for key, value in values.items() if value is not None)
    return "\n[delivery]\n" + lines


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else json.dumps(value)


class MtadProcess:
    """One mtad daemon process, started on a config file."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.directory = config.parent
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "mtad.out"
        self.smtp: dict[str, tuple[str, int]] = {}
        self.http: str = ""
        self._log_offset = 0

    def start(self, timeout: float = 20.0) -> MtadProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.smtp, self.http = {}, ""
        env = dict(os.environ, **(self.env or {}))
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mtad.daemon", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if record.get("event") == "daemon.ready":
                    self._learn_addresses()
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mtad exited with {self.proc.returncode}:\n{self.new_output()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mtad not ready within {timeout}s:\n{self.new_output()}")

    def new_output(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.new_output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _learn_addresses(self) -> None:
        for record in self.records():
            if record.get("event") == "listener.open":
                host, _, port = record["address"].rpartition(":")
                self.smtp.setdefault(record["role"], (host.strip("[]"), int(port)))
            elif record.get("event") == "http.open":
                self.http = record["public"]

    @property
    def mx(self) -> tuple[str, int]:
        return self.smtp["mx"]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def mtactl(self, *args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([sys.executable, "-m", "mtad.mtactl.main", "--config", str(self.config), *args],
                                input=stdin, capture_output=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"mtactl {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
        return result

    def queue_json(self) -> list[dict[str, Any]]:
        out = self.mtactl("queue", "list", "--json").stdout.decode()
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def mail_log(self) -> list[dict[str, Any]]:
        path = self.directory / "mail.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class _UnixHTTPConnection:
    """Just enough of http.client over a unix socket for the tests' admin API reads."""

    def __init__(self, path: str) -> None:
        import http.client

        class Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                import socket as _socket

                self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                self.sock.settimeout(30)
                self.sock.connect(path)

        self.conn = Conn("localhost")

    def get(self, url: str, token: str) -> tuple[int, bytes]:
        self.conn.request("GET", url, headers={"Authorization": f"Bearer {token}"})
        response = self.conn.getresponse()
        return response.status, response.read()


def admin_get_body(proc: MtadProcess, queue_id: str) -> bytes:
    token = (proc.directory / "spool" / "admin.token").read_text().strip()
    conn = _UnixHTTPConnection(str(proc.directory / "admin.sock"))
    try:
        status, body = conn.get(f"/admin/v1/queue/{queue_id}/body", token)
    finally:
        conn.conn.close()
    assert status == 200, (status, body[:200])
    return body
