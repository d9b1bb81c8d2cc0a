"""Delivery under faults: a real mtad, real peers and a real DNS server on loopback misbehaving.

- A destination down for a while, then up: mail is deferred, the destination suspended
  (`mtactl queue summary --json` says until when and why), and once a server listens on that
  port again mail flows, through a window that starts small and grows.
- A tarpitting peer (accepts, never greets): the greeting timeout fires, mail is deferred
  4.4.2 naming the timeout, and while 20 such connections hang the daemon still answers
  /healthz and SMTP on its own listener at once.
- 421 storms: a server greeting 421 defers (connection scope) and sends the mail on to the
  next MX; a 421 in the middle of a transaction defers every recipient of it.
- DNS failures: SERVFAIL defers 4.4.3 and a fixed zone delivers on the next attempt; a name
  server that never answers defers without holding anything up.
- Postfix's smtp-sink as the destination: 200 messages over far fewer connections.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnsserver import DnsServer
from harness import MtadProcess, fast_delivery, wait_for, write_config
from peer import Peer, closed_port

pytestmark = pytest.mark.slow

BODY = (b"From: Sender <sender@sender.test>\r\nTo: someone@example.test\r\nSubject: faults\r\n"
        b"Message-ID: <faults@sender.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n\r\nHello.\r\n")

FAST = fast_delivery()


class CountingPeer(Peer):
    """The scripted peer, also counting the connections open at once: overall, and before the
    first transaction was recorded (the window a destination opens with)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.open_now = 0
        self.most_open = 0
        self.most_open_first = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1  # the peer's own loop thread: no lock needed
        self.most_open = max(self.most_open, self.open_now)
        if not self.transactions:
            self.most_open_first = max(self.most_open_first, self.open_now)
        try:
            await super()._session(reader, writer)
        finally:
            self.open_now -= 1


def start(tmp_path: Path, extra: str, *, domains: tuple[str, ...] = ("example.test",)) -> MtadProcess:
    return MtadProcess(write_config(tmp_path, domains=domains, extra=extra)).start()


def route(port: int, domain: str = "*", host: str = "127.0.0.1") -> str:
    return f'\n[[route]]\ndomain = "{domain}"\nnexthop = "{host}:{port}"\n'


def send(proc: MtadProcess, recipients: list[str], *, sender: str = "sender@sender.test") -> None:
    with smtplib.SMTP(*proc.mx, timeout=10) as client:
        client.sendmail(sender, recipients, BODY)


def events(proc: MtadProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in proc.mail_log() if e.get("type") == kind]


def summary(proc: MtadProcess) -> list[dict[str, Any]]:
    out = proc.mtactl("queue", "summary", "--json").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def queued_now(proc: MtadProcess) -> int:
    return int(json.loads(proc.mtactl("stats", "--json").stdout.decode())["queued_now"])


# --- a destination down, then up -----------------------------------------------------------

def test_destination_down_then_up_flows_through_a_small_window(tmp_path: Path) -> None:
    port = closed_port()
    initial = 3
    extra = route(port) + FAST + f"initial_concurrency = {initial}\ndestination_concurrency = 20\n"
    proc = start(tmp_path, extra)
    try:
        for i in range(10):
            send(proc, [f"slow-{i}@example.test"])
        row = wait_for(lambda: next((r for r in summary(proc) if r["suspended_until"]), None))
        destination = row["destination"]
        assert destination.endswith(f":{port}")
        assert row["deferred"] + row["queued"] == 10
        assert "refused" in row["last_error"].lower()
        assert row["suspended_until"] > time.time() - 1
        refused = wait_for(lambda: events(proc, "deferred"))
        assert refused[0]["status"] == "4.4.1"
        # The server comes back on the same port; the suspension (2 s) runs out by itself.
        with CountingPeer(port=port, slow=0.3) as peer:
            got = peer.wait_transactions(10, timeout=30)
            assert sorted(r for t in got for r in t.recipients) == sorted(f"slow-{i}@example.test" for i in range(10))
            # The first attempts went through the small window, not ten connections at once.
            assert 1 <= peer.most_open_first <= initial, peer.most_open_first
            # ... and each delivery opened it a little more.
            assert peer.most_open > peer.most_open_first, (peer.most_open, peer.most_open_first)
            print(f"\ndown then up: {peer.most_open_first} connection(s) at first, {peer.most_open} at most, "
                  f"{len(peer.connections)} in all")
            wait_for(lambda: queued_now(proc) == 0)
            after = next(r for r in summary(proc) if r["destination"] == destination)
            assert not after["suspended_until"]
            delivered = events(proc, "delivered")
            assert len(delivered) == 10
            # suspend_after = 3 refused attempts; the rest waited out the suspension untried.
            assert sum(e["attempts"] >= 2 for e in delivered) >= 3
    finally:
        proc.stop()


# --- a tarpit --------------------------------------------------------------------------------

def test_tarpit_greeting_timeout_fires_and_the_daemon_stays_responsive(tmp_path: Path) -> None:
    hanging = 20
    with CountingPeer(tarpit=True) as tarpit:
        extra = (route(tarpit.port) + fast_delivery(greeting_timeout="4s")
                 .replace("suspend_after = 3", "suspend_after = 100")
                 + f"initial_concurrency = {hanging}\ndestination_concurrency = {hanging}\n")
        proc = start(tmp_path, extra)
        try:
            with smtplib.SMTP(*proc.mx, timeout=10) as client:
                for i in range(hanging):
                    client.sendmail("sender@sender.test", [f"r{i}@example.test"], BODY)
            wait_for(lambda: tarpit.open_now >= hanging)
            worst_noop = worst_health = worst_banner = 0.0
            with smtplib.SMTP(*proc.mx, timeout=5) as client:
                for _ in range(5):
                    begin = time.monotonic()
                    assert client.noop()[0] == 250
                    worst_noop = max(worst_noop, time.monotonic() - begin)
                    begin = time.monotonic()
                    host, _, port = proc.http.rpartition(":")
                    conn = http.client.HTTPConnection(host, int(port), timeout=5)
                    conn.request("GET", "/healthz")
                    assert conn.getresponse().status == 200
                    conn.close()
                    worst_health = max(worst_health, time.monotonic() - begin)
                    begin = time.monotonic()
                    with smtplib.SMTP(*proc.mx, timeout=5) as other:
                        assert other.noop()[0] == 250
                    worst_banner = max(worst_banner, time.monotonic() - begin)
            still = tarpit.open_now
            print(f"\ntarpit: {still} connections hanging; worst NOOP {worst_noop * 1000:.1f} ms, "
                  f"/healthz {worst_health * 1000:.1f} ms, new SMTP session {worst_banner * 1000:.1f} ms")
            assert still >= hanging, "the measurement must happen while the connections hang"
            assert worst_noop < 0.2 and worst_health < 0.2 and worst_banner < 0.2
            # Then the greeting timeout fires for each of them: deferred, 4.4.2, saying so.
            deferred = wait_for(lambda: len(events(proc, "deferred")) >= hanging and events(proc, "deferred"),
                                timeout=20)
            for event in deferred[:hanging]:
                assert event["status"] == "4.4.2"
                assert "timed out" in event["reply"] and "greeting" in event["reply"]
            waiting = proc.queue_json()
            assert len(waiting) == hanging
            assert all(e["recipients"][0]["state"] == "deferred" for e in waiting)
        finally:
            proc.stop()


# --- 421 storms --------------------------------------------------------------------------------

def test_421_greeting_defers_and_falls_through_to_the_next_mx(tmp_path: Path) -> None:
    with Peer(greeting=421) as busy, Peer(host="127.0.0.2", port=busy.port) as good:
        zone: dict[str, dict[str, Any]] = {
            "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.1"]},
            "mx2.example.test": {"A": ["127.0.0.2"]},
            "storm.test": {"MX": [(10, "mx1.example.test")]},
        }
        with DnsServer(zone) as dns:
            extra = (fast_delivery(suspend_after=100) + f'mx_port = {busy.port}\n'
                     f'\n[dns]\nnameservers = ["{dns.address}"]\ntimeout = "1s"\n')
            proc = start(tmp_path, extra, domains=("example.test", "storm.test"))
            try:
                send(proc, ["a@example.test"])
                [txn] = good.wait_transactions(1)
                assert txn.recipients == ["a@example.test"]
                assert busy.connections, "the first MX was tried first"
                [delivered] = wait_for(lambda: events(proc, "delivered"))
                assert "mx2.example.test" in delivered["relay"] and "127.0.0.2" in delivered["relay"]
                # A destination whose only server greets 421, mail after mail: each deferred.
                for i in range(5):
                    send(proc, [f"s{i}@storm.test"])
                deferred = wait_for(lambda: len(events(proc, "deferred")) >= 5 and events(proc, "deferred"))
                for event in deferred:
                    assert event["reply"].startswith("421 ") and event["status"].startswith("4.")
                    assert event["recipients"][0].endswith("@storm.test")
                assert len(good.transactions) == 1
            finally:
                proc.stop()


def test_421_mid_transaction_defers_every_recipient_of_it(tmp_path: Path) -> None:
    with Peer() as peer:
        proc = start(tmp_path, route(peer.port) + FAST)
        try:
            send(proc, ["ok@example.test", "421-x@example.test"])
            deferred = wait_for(lambda: len(events(proc, "deferred")) >= 2 and events(proc, "deferred"))
            assert {e["recipients"][0] for e in deferred[:2]} == {"ok@example.test", "421-x@example.test"}
            for event in deferred[:2]:
                assert event["reply"].startswith("421 4.3.2") and event["status"] == "4.3.2"
            assert not peer.transactions  # the session ended before DATA
            # The broken connection is not reused: the next message goes through a new one.
            send(proc, ["next@example.test"])
            [txn] = peer.wait_transactions(1)
            assert txn.recipients == ["next@example.test"]
            assert txn.connection != peer.transactions[0].connection or len(peer.connections) >= 2
            waiting = proc.queue_json()
            assert len(waiting) == 1 and {r["state"] for r in waiting[0]["recipients"]} == {"deferred"}
        finally:
            proc.stop()


# --- DNS failures ---------------------------------------------------------------------------

def test_dns_servfail_defers_then_a_fixed_zone_delivers(tmp_path: Path) -> None:
    with Peer() as peer:
        zone: dict[str, dict[str, Any]] = {
            "broken.test": {"RCODE": "SERVFAIL"},
            "mx1.example.test": {"A": ["127.0.0.1"]},
        }
        with DnsServer(zone) as dns:
            extra = (fast_delivery(max_backoff="1s") + f"mx_port = {peer.port}\n"
                     f'\n[dns]\nnameservers = ["{dns.address}"]\ntimeout = "1s"\n')
            proc = start(tmp_path, extra, domains=("broken.test",))
            try:
                send(proc, ["x@broken.test"])
                [first] = wait_for(lambda: events(proc, "deferred"))
                assert first["status"] == "4.4.3" and first["recipients"] == ["x@broken.test"]
                assert "try again" in first["reply"] or "servfail" in first["reply"].lower()
                zone["broken.test"] = {"MX": [(10, "mx1.example.test")]}  # fixed while running
                fixed = time.monotonic()
                [txn] = peer.wait_transactions(1, timeout=15)
                took = time.monotonic() - fixed
                assert txn.recipients == ["x@broken.test"]
                [delivered] = wait_for(lambda: events(proc, "delivered"))
                assert delivered["attempts"] >= 2
                print(f"\nSERVFAIL fixed: delivered {took:.2f} s later (attempt {delivered['attempts']})")
            finally:
                proc.stop()


def test_dns_server_not_answering_defers_and_holds_nothing_up(tmp_path: Path) -> None:
    with Peer() as peer:
        zone: dict[str, dict[str, Any]] = {
            "silent.test": {"RCODE": "DROP"},
            "fine.test": {"MX": [(10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.1"]},
        }
        with DnsServer(zone) as dns:
            extra = (FAST + f"mx_port = {peer.port}\n"
                     f'\n[dns]\nnameservers = ["{dns.address}"]\ntimeout = "300ms"\n')
            proc = start(tmp_path, extra, domains=("silent.test", "fine.test"))
            try:
                begin = time.monotonic()
                send(proc, ["x@silent.test"])
                send(proc, ["y@fine.test"])
                # The silent domain's lookup does not hold up the other one.
                [txn] = peer.wait_transactions(1, timeout=10)
                assert txn.recipients == ["y@fine.test"]
                [deferred] = wait_for(lambda: events(proc, "deferred"), timeout=15)
                took = time.monotonic() - begin
                assert deferred["recipients"] == ["x@silent.test"] and deferred["status"] == "4.4.3"
                assert "try again" in deferred["reply"]
                assert dns.count("silent.test") >= 1
                print(f"\nDNS silent: deferred after {took:.2f} s")
                # The daemon still stops promptly: nothing waits on the silent name server.
                begin = time.monotonic()
                assert proc.stop() == 0
                assert time.monotonic() - begin < 5
            finally:
                proc.stop()


# --- Postfix's smtp-sink as the destination ----------------------------------------------------

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """smtp-sink on 127.0.0.1 with running counters (-c) written to a file."""
    if not (os.access(SMTP_SINK, os.X_OK) and os.access(SMTP_SOURCE, os.X_OK)):
        pytest.skip("Postfix's smtp-sink/smtp-source not installed")
    port = closed_port()
    counters = tmp_path / "smtp-sink.out"
    with open(counters, "wb") as out:
        argv = [SMTP_SINK, "-c"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"127.0.0.1:{port}", "100"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(port) or proc.poll() is not None)
        assert proc.poll() is None, counters.read_text()
        yield port, counters
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def sink_counters(path: Path) -> tuple[int, int, int]:
    """The last (sessions ended, QUITs, messages) smtp-sink printed."""
    found = _COUNTERS.findall(path.read_bytes())
    if not found:
        return 0, 0, 0
    sessions, quits, messages = found[-1]
    return int(sessions), int(quits), int(messages)


def test_smtp_sink_takes_200_messages_over_reused_connections(tmp_path: Path,
                                                              smtp_sink: tuple[int, Path]) -> None:
    port, counters = smtp_sink
    mtad_dir = tmp_path / "mtad"
    mtad_dir.mkdir()
    proc = MtadProcess(write_config(mtad_dir, extra=route(port) + FAST)).start()
    try:
        host, mx_port = proc.mx
        begin = time.monotonic()
        subprocess.run([SMTP_SOURCE, "-d", "-s", "4", "-m", "200", "-N", "-l", "1000", "-f", "sender@sender.test",
                        "-t", "rcpt@example.test", f"{host}:{mx_port}"], check=True, capture_output=True, timeout=60)
        wait_for(lambda: sink_counters(counters)[2] >= 200, timeout=30)
        took = time.monotonic() - begin
        wait_for(lambda: queued_now(proc) == 0)
        delivered = wait_for(lambda: len(events(proc, "delivered")) >= 200 and events(proc, "delivered"))
        assert len(delivered) == 200 and all(str(port) in e["relay"] for e in delivered)
        assert proc.stop() == 0  # closes the pooled connections with QUIT
        # Every session but the fixture's readiness probe (connect, close) was mtad's, ended by QUIT.
        _, quits, messages = wait_for(lambda: (c := sink_counters(counters))[0] == c[1] + 1 and c, timeout=5)
        print(f"\nsmtp-sink: {messages} messages over {quits} mtad sessions in {took:.2f} s")
        assert messages == 200
        assert 1 <= quits <= 50, "connections were not reused"
    finally:
        proc.stop()
