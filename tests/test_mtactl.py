"""mtactl as operators run it: a subprocess against a live admin API with a real spool.

The admin app runs in a thread with its own event loop (as in the daemon, minus SMTP), on
127.0.0.1:0 or a unix socket; each test writes an mtad.toml pointing at it and runs
`python -m mtad.mtactl.main --config ...`, checking stdout, stderr and the exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_admin import BODY, store

from mtad.events import Counters, Event
from mtad.http.admin import build_admin_app
from mtad.http.server import HttpServer
from mtad.http.token import ensure_admin_token
from mtad.spool import Spool

T = TypeVar("T")
CONTRACT_FIELDS = {"id", "message_id", "sender", "size", "arrival_time", "recipients"}
RECIPIENT_FIELDS = {"address", "state", "attempts", "next_attempt", "last_reply"}


class Daemon:
    """The admin API of a stand-in mtad, served from a thread with its own loop."""

    def __init__(self, spool_dir: Path, address: str) -> None:
        self.spool_dir = spool_dir
        self.counters = Counters()
        self.loop = asyncio.new_event_loop()
        self.server = HttpServer()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.spool = Spool.open(str(spool_dir), map_size=64 * 1024**2, commit_linger=0.0, commit_max_batch=64)
        token = ensure_admin_token(str(spool_dir))
        app = build_admin_app(spool=self.spool, counters=self.counters, token=token, started=time.time())
        self.run(self.server.start(app, address))
        self.address = self.server.bound()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def store(self, *recipients: str, sender: str = "alice@example.test") -> str:
        return self.run(store(self.spool, *recipients, sender=sender))

    def close(self) -> None:
        self.run(self.server.stop())
        self.run(self.spool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def write_config(directory: Path, spool_dir: Path, admin_address: str) -> Path:
    path = directory / "mtad.toml"
    path.write_text(
        f'[server]\nspool_dir = "{spool_dir}"\n\n[http]\naddress = "127.0.0.1:0"\nadmin_address = "{admin_address}"\n'
    )
    return path


class Ctl:
    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "mtad.mtactl.main", "--config", str(config or self.config), *args]
        return subprocess.run(command, capture_output=True, timeout=60, check=False)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert (result.returncode, result.stderr) == (0, b""), result.stderr
        return result.stdout.decode()

    def failed(self, *args: str, config: Path | None = None) -> str:
        result = self(*args, config=config)
        assert result.returncode == 1 and result.stdout == b"", result
        return result.stderr.decode()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(tmp_path / "spool", "127.0.0.1:0")
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def ctl(daemon: Daemon, tmp_path: Path) -> Ctl:
    return Ctl(write_config(tmp_path, daemon.spool_dir, daemon.address))


def test_list_text_mailq_style(daemon: Daemon, ctl: Ctl) -> None:
    assert ctl.ok("queue", "list") == "Mail queue is empty\n"
    first = daemon.store("bob@example.net", "carol@example.org")
    second = daemon.store("dave@example.net", sender="")
    ctl.ok("queue", "hold", second)
    lines = ctl.ok("queue", "list").splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].startswith(first + " ") and lines[1].endswith(" alice@example.test")
    assert lines[2].split() == ["bob@example.net", "[queued]"]
    assert lines[3].split() == ["carol@example.org", "[queued]"]
    assert lines[5].startswith(second + "!") and lines[5].endswith(" MAILER-DAEMON")
    assert lines[6].split() == ["dave@example.net", "[held]"]
    assert lines[-1] == f"-- {(2 * len(BODY) + 1023) // 1024} Kbytes in 2 Requests."
    # indentation: recipients line up under the sender column
    assert lines[2].index("bob") == lines[1].index("alice@")


def test_list_json_before_or_after_the_command(daemon: Daemon, ctl: Ctl) -> None:
    queue_id = daemon.store("bob@example.net")
    after = ctl.ok("queue", "list", "--json")
    before = ctl.ok("--json", "queue", "list")
    assert after == before
    (line,) = after.splitlines()
    entry = json.loads(line)
    assert CONTRACT_FIELDS <= set(entry)
    assert entry["id"] == queue_id and entry["message_id"] == f"<{queue_id}@example.test>"
    assert entry["sender"] == "alice@example.test" and entry["size"] == len(BODY)
    assert isinstance(entry["arrival_time"], float)
    (recipient,) = entry["recipients"]
    assert set(recipient) == RECIPIENT_FIELDS and recipient["state"] == "queued"


def test_show_and_cat(daemon: Daemon, ctl: Ctl) -> None:
    queue_id = daemon.store("bob@example.net")
    shown = ctl.ok("queue", "show", queue_id)
    assert f"queue id:   {queue_id}" in shown
    assert "sender:     <alice@example.test>" in shown
    assert "client:     192.0.2.1 helo=client.example.test" in shown
    assert "  bob@example.net  [queued]" in shown
    assert "  Subject: a folded subject line" in shown
    assert "not a header" not in shown
    assert json.loads(ctl.ok("queue", "show", queue_id, "--json"))["headers"][0] == ["From", "Alice <alice@example.test>"]
    result = ctl("queue", "cat", queue_id)
    assert (result.returncode, result.stdout) == (0, BODY)


def test_hold_release_delete(daemon: Daemon, ctl: Ctl) -> None:
    one, two, three = (daemon.store() for _ in range(3))

    def states() -> dict[str, bool]:
        return {e["id"]: e["held"] for e in map(json.loads, ctl.ok("queue", "list", "--json").splitlines())}

    assert ctl.ok("queue", "hold", one) == f"held {one}\n"
    assert states() == {one: True, two: False, three: False}
    assert ctl.ok("queue", "release", one) == f"released {one}\n"
    assert ctl.ok("queue", "hold", "--all") == "held 3 messages\n"
    assert states() == {one: True, two: True, three: True}
    assert json.loads(ctl.ok("--json", "queue", "release", "--all")) == {"action": "release", "count": 3}
    assert states() == {one: False, two: False, three: False}
    assert ctl.ok("queue", "delete", two) == f"deleted {two}\n"
    assert set(states()) == {one, three}
    assert ctl.ok("queue", "delete", "--all") == "deleted 2 messages\n"
    assert ctl.ok("queue", "list") == "Mail queue is empty\n"
    for command in ("hold", "release", "delete", "show", "cat"):
        assert ctl.failed("queue", command, one) == f"mtactl: no such message: {one}\n"
    assert ctl.failed("queue", "show", "not-an-id") == "mtactl: no such message: not-an-id\n"


def test_stats(daemon: Daemon, ctl: Ctl) -> None:
    daemon.store()
    for kind in ("received", "received", "deferred", "rejected"):
        daemon.counters(Event(type=kind, time=time.time()))
    stats = json.loads(ctl.ok("stats", "--json"))
    assert stats.pop("uptime") >= 0
    assert stats == {"received": 2, "delivered": 0, "deferred": 1, "bounced": 0, "expired": 0, "rejected": 1, "queued_now": 1}
    text = ctl.ok("stats").splitlines()
    assert "received    2" in text and "queued_now  1" in text
    assert text[-1].startswith("uptime      ") and text[-1].endswith("s")


def test_bad_usage_exits_2(ctl: Ctl) -> None:
    for args in ((), ("queue",), ("queue", "frob"), ("queue", "hold"), ("queue", "hold", "abc", "--all"), ("frob",)):
        result = ctl(*args)
        assert result.returncode == 2, args
        assert b"usage: mtactl" in result.stderr


def test_daemon_down_exits_1(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    ensure_admin_token(str(spool_dir))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctl = Ctl(write_config(tmp_path, spool_dir, f"127.0.0.1:{port}"))
    assert ctl.failed("queue", "list") == f"mtactl: cannot reach mtad at 127.0.0.1:{port}: connection refused\n"
    assert ctl.failed("stats") == f"mtactl: cannot reach mtad at 127.0.0.1:{port}: connection refused\n"


def test_wrong_or_missing_token_exits_1(daemon: Daemon, tmp_path: Path) -> None:
    other = tmp_path / "other"
    ensure_admin_token(str(other))  # a different spool: a different token
    ctl = Ctl(write_config(tmp_path, other, daemon.address))
    assert ctl.failed("queue", "list") == "mtactl: admin token rejected\n"
    (other / "admin.token").unlink()
    assert "mtactl: cannot read admin token" in ctl.failed("stats")
    assert "mtactl: " in ctl.failed("stats", config=tmp_path / "missing.toml")


def test_unix_socket_admin_address(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mtad") as directory:
        path = os.path.join(directory, "admin.sock")
        daemon = Daemon(tmp_path / "spool", path)
        try:
            queue_id = daemon.store("bob@example.net")
            ctl = Ctl(write_config(tmp_path, daemon.spool_dir, path))
            assert json.loads(ctl.ok("queue", "list", "--json"))["id"] == queue_id
            assert ctl("queue", "cat", queue_id).stdout == BODY
            assert ctl.ok("queue", "delete", "--all") == "deleted 1 message\n"
        finally:
            daemon.close()
        ctl = Ctl(write_config(tmp_path, tmp_path / "spool", path))
        assert ctl.failed("stats") == f"mtactl: cannot reach mtad at {path}: no such socket\n"


def test_show_prints_the_same_arrival_second_twice() -> None:
    # 12:00:40.6 is shown as 12:00:40 (strftime truncates): the unix seconds beside it must not
    # round up to the next second.
    from mtad.http.adminapi import MessageDetail
    from mtad.mtactl.output import message_details

    detail = MessageDetail(id="0" * 22, message_id="<m@x>", sender="a@b.test", size=1,
                           arrival_time=1_795_000_000.6, recipients=[])
    [line] = [line for line in message_details(detail) if line.startswith("arrival")]
    assert line.endswith(":40 " + time.strftime("%z", time.localtime(1_795_000_000)) + " (1795000000)"), line


def test_text_output_never_sends_control_characters_to_the_terminal() -> None:
    # A stranger's Subject with ANSI escapes, a bell and backspaces: shown, not obeyed.
    from mtad.http.adminapi import Header, MessageDetail, RecipientView
    from mtad.mtactl.output import message_details, queue_listing

    recipient = RecipientView(address="u@example.test", state="deferred", attempts=1, next_attempt=0.0,
                              last_reply="451 \x1b]0;owned\x07 try later")
    detail = MessageDetail(id="0" * 22, message_id="<m\x1b[2J@x>", sender="a@b.test", size=1, arrival_time=0.0,
                           recipients=[recipient], headers=[Header("Subject", "\x1b[31mRED\x1b[0m a\x08\x08b\tc\x9b")])
    shown = "\n".join([*message_details(detail), *queue_listing([detail])])
    assert not any(ord(c) < 0x20 and c not in "\t\n" or 0x7F <= ord(c) < 0xA0 for c in shown), repr(shown)
    assert "Subject: \\x1b[31mRED\\x1b[0m a\\x08\\x08b\tc\\x9b" in shown
    assert "<m\\x1b[2J@x>" in shown and "451 \\x1b]0;owned\\x07 try later" in shown


def test_dsn_table_never_sends_control_characters_to_the_terminal(tmp_path: Path) -> None:
    bounce = tmp_path / "esc.eml"
    bounce.write_bytes(
        b'From: MAILER-DAEMON@x.test\r\nTo: a@b.test\r\nSubject: Undelivered Mail\r\n'
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x.test\r\n\r\n"
        b"Final-Recipient: rfc822; u@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 \x1b[31muser unknown\x1b[0m\x07\r\n--B--\r\n")
    result = subprocess.run([sys.executable, "-m", "mtad.mtactl.main", "dsn", str(bounce)],
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in result.stdout and b"\x07" not in result.stdout
    assert b"550 5.1.1 \\x1b[31muser unknown\\x1b[0m\\x07" in result.stdout, result.stdout
