"""Delivery end to end: a real mtad, real SMTP peers, a real DNS server on loopback.

Mail goes in with smtplib on the mx listener, out through the scheduler and the SMTP client to
the scripted peer (tests/peer.py), routed by a static [[route]] or by MX records that aiodns
reads from tests/dnsserver.py. What a user checks: the peer got the message (byte for byte,
below our Received header), the mail log says delivered/deferred/bounced with the relay and
the status, the queue holds what is still to do, DSNs come back to the sender, and mtactl
flush/bounce/summary do what they say.
"""

from __future__ import annotations

import json
import smtplib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnsserver import DnsServer
from harness import MtadProcess, fast_delivery, wait_for, write_config
from peer import Peer, closed_port

from mtad.dsn.parse import parse as parse_dsn

pytestmark = pytest.mark.slow

BODY = (
    b"From: Sender <sender@sender.test>\r\n"
    b"To: someone@example.test\r\n"
    b"Subject: delivery test\r\n"
    b"Message-ID: <delivery-test@sender.test>\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".leading dot line\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
)

FAST = fast_delivery()


def send(proc: MtadProcess, recipients: list[str], *, sender: str = "sender@sender.test", body: bytes = BODY) -> None:
    host, port = proc.mx
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.sendmail(sender, recipients, body)


def events(proc: MtadProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in proc.mail_log() if e.get("type") == kind]


def start(tmp_path: Path, *, domains: tuple[str, ...], extra: str, name: str = "a") -> MtadProcess:
    directory = tmp_path / name
    directory.mkdir()
    return MtadProcess(write_config(directory, domains=domains, extra=extra)).start()


@pytest.fixture
def peer() -> Iterator[Peer]:
    with Peer() as p:
        yield p


def route_to(peer: Peer, domain: str = "*") -> str:
    host, port = peer.address
    return f'\n[[route]]\ndomain = "{domain}"\nnexthop = "{host}:{port}"\n'


def below_received(data: bytes) -> bytes:
    """The delivered message without the Received header mtad put on top."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n", 0)
    while data[end + 2:end + 3] in (b" ", b"\t"):
        end = data.index(b"\r\n", end + 2)
    return data[end + 2:]


def test_static_route_delivers_byte_exact_and_logs(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, domains=("example.test",), extra=route_to(peer) + FAST)
    try:
        send(proc, ["one@example.test", "two@example.test"])
        [txn] = peer.wait_transactions(1)
        assert txn.sender == "sender@sender.test"
        assert sorted(txn.recipients) == ["one@example.test", "two@example.test"]
        assert below_received(txn.data) == BODY
        delivered = wait_for(lambda: len(events(proc, "delivered")) == 2 and events(proc, "delivered"))
        for event in delivered:
            assert event["status"].startswith("2.")
            assert str(peer.address[1]) in event["relay"]
            assert event["attempts"] == 1
        wait_for(lambda: proc.queue_json() == [])
    finally:
        proc.stop()


def test_mixed_results_defer_bounce_and_return_a_dsn(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, domains=("example.test", "sender.test"), extra=route_to(peer) + FAST)
    try:
        send(proc, ["ok@example.test", "tempfail-x@example.test", "550-y@example.test"])
        # The DSN for 550-y goes back to the sender, through the same route, from <>.
        dsn = wait_for(lambda: next((t for t in peer.transactions if t.sender == ""), None))
        assert dsn.recipients == ["sender@sender.test"]
        [record] = [r for r in parse_dsn(dsn.data)]
        assert (record.recipient, record.action, record.status) == ("550-y@example.test", "failed", "5.1.1")
        assert record.reason == "userunknown"
        original = [t for t in peer.transactions if t.sender == "sender@sender.test"]
        assert original and original[0].recipients == ["ok@example.test"]
        bounced = wait_for(lambda: events(proc, "bounced"))
        assert bounced[0]["recipients"] == ["550-y@example.test"] and bounced[0]["status"] == "5.1.1"
        # tempfail-x waits in the queue, deferred, with the remote reply.
        entries = wait_for(lambda: [e for e in proc.queue_json() if e["sender"] == "sender@sender.test"])
        [waiting] = entries[0]["recipients"]
        assert waiting["address"] == "tempfail-x@example.test"
        assert waiting["state"] == "deferred" and waiting["attempts"] >= 1
        assert waiting["last_reply"].startswith("450 4.2.0")
        # queue show has the attempt history
        show = proc.mtactl("queue", "show", entries[0]["id"]).stdout.decode()
        assert "attempt" in show and "450 4.2.0" in show
    finally:
        proc.stop()


def test_mx_routing_through_dns(tmp_path: Path, peer: Peer) -> None:
    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"]},
        "mx2.example.test": {"A": ["127.0.0.1"]},
        "implicit.test": {"A": ["127.0.0.1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": {"RCODE": "SERVFAIL"},
        "sender.test": {"MX": [(10, "mx1.example.test")]},
    }
    with DnsServer(zone) as dns:
        extra = FAST + f'mx_port = {peer.address[1]}\n\n[dns]\nnameservers = ["{dns.address}"]\ntimeout = "1s"\n'
        domains = ("example.test", "implicit.test", "nullmx.test", "nowhere.test", "broken.test", "sender.test")
        proc = start(tmp_path, domains=domains, extra=extra)
        try:
            send(proc, ["a@example.test", "b@implicit.test"])
            peer.wait_transactions(2)
            assert dns.count("example.test", "MX") >= 1
            send(proc, ["c@nullmx.test"])
            send(proc, ["d@nowhere.test"])
            send(proc, ["e@broken.test"])
            bounced = wait_for(lambda: len(events(proc, "bounced")) >= 2 and events(proc, "bounced"))
            statuses = {e["recipients"][0]: e["status"] for e in bounced}
            assert statuses["c@nullmx.test"] == "5.1.10"
            assert statuses["d@nowhere.test"].startswith("5.1.2")
            deferred = wait_for(lambda: [e for e in events(proc, "deferred") if e["recipients"] == ["e@broken.test"]])
            assert deferred[0]["status"].startswith("4.4.3")
            # Both bounces came back to the sender as DSNs, through the sender domain's MX.
            wait_for(lambda: sum(t.sender == "" for t in peer.transactions) == 2)
        finally:
            proc.stop()


def test_two_mtads_relay_to_each_other(tmp_path: Path, peer: Peer) -> None:
    b = start(tmp_path, domains=("example.net",), extra=route_to(peer, "example.net") + FAST, name="b")
    try:
        host, port = b.mx
        a_extra = f'\n[[route]]\ndomain = "example.net"\nnexthop = "{host}:{port}"\n' + FAST
        a = start(tmp_path, domains=("example.test", "example.net"), extra=a_extra, name="a")
        try:
            send(a, ["someone@example.net"])
            [txn] = peer.wait_transactions(1)
            assert txn.recipients == ["someone@example.net"]
            # Two Received headers: A's, then B's on top.
            assert txn.data.count(b"Received: ") == 2
            assert txn.data.endswith(BODY[BODY.index(b"\r\n\r\n"):])
            wait_for(lambda: a.queue_json() == [] and b.queue_json() == [])
        finally:
            a.stop()
    finally:
        b.stop()


def test_dead_destination_suspends_then_flush_delivers(tmp_path: Path) -> None:
    port = closed_port()
    route = f'\n[[route]]\ndomain = "*"\nnexthop = "127.0.0.1:{port}"\n'
    proc = start(tmp_path, domains=("example.test",), extra=route + fast_delivery(suspend_time="1h"))
    try:
        for i in range(6):
            send(proc, [f"r{i}@example.test"])
        rows = wait_for(lambda: [r for r in _summary(proc) if r["suspended_until"]])
        assert rows[0]["destination"].endswith(str(port)) and rows[0]["deferred"] + rows[0]["queued"] == 6
        assert "refused" in rows[0]["last_error"].lower()
        text = proc.mtactl("queue", "summary").stdout.decode()
        assert "suspended until" in text
        entries = proc.queue_json()
        assert len(entries) == 6 and all(e["recipients"][0]["state"] == "deferred" for e in entries)
        # The destination comes back: a peer on that very port; a flush wakes it at once.
        with Peer(port=port) as peer:
            out = proc.mtactl("queue", "flush", "--domain", "example.test").stdout.decode()
            assert out.startswith("flushed 6")
            peer.wait_transactions(6, timeout=15)
        wait_for(lambda: proc.queue_json() == [])
    finally:
        proc.stop()


def test_queue_bounce_returns_a_dsn_and_removes(tmp_path: Path, peer: Peer) -> None:
    port = closed_port()
    extra = (f'\n[[route]]\ndomain = "example.test"\nnexthop = "127.0.0.1:{port}"\n'
             + route_to(peer, "sender.test") + fast_delivery(suspend_time="1h"))
    proc = start(tmp_path, domains=("example.test", "sender.test"), extra=extra)
    try:
        send(proc, ["stuck@example.test"])
        entry = wait_for(lambda: [e for e in proc.queue_json() if e["recipients"][0]["attempts"] >= 1])[0]
        out = proc.mtactl("queue", "bounce", entry["id"]).stdout.decode()
        assert entry["id"] in out
        dsn = peer.wait_transactions(1)[0]
        assert dsn.sender == "" and dsn.recipients == ["sender@sender.test"]
        [record] = parse_dsn(dsn.data)
        assert record.recipient == "stuck@example.test" and record.action == "failed"
        wait_for(lambda: not [e for e in proc.queue_json() if e["id"] == entry["id"]])
        missing = proc.mtactl("queue", "bounce", entry["id"], check=False)
        assert missing.returncode == 1
    finally:
        proc.stop()


def test_restart_keeps_deferred_mail(tmp_path: Path) -> None:
    port = closed_port()
    route = f'\n[[route]]\ndomain = "*"\nnexthop = "127.0.0.1:{port}"\n'
    proc = start(tmp_path, domains=("example.test",), extra=route + FAST)
    try:
        send(proc, ["later@example.test"])
        wait_for(lambda: events(proc, "deferred"))
        proc.stop()
        with Peer(port=port) as peer:
            proc.start()
            [txn] = peer.wait_transactions(1, timeout=15)
            assert txn.recipients == ["later@example.test"]
            wait_for(lambda: proc.queue_json() == [])
    finally:
        proc.stop()


def _summary(proc: MtadProcess) -> list[dict[str, Any]]:
    out = proc.mtactl("queue", "summary", "--json").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]



def test_notify_success_to_a_server_without_dsn_gets_a_relayed_notice(tmp_path: Path) -> None:
    with Peer(dsn=False) as peer:
        proc = start(tmp_path, domains=("example.test", "sender.test"), extra=route_to(peer) + FAST)
        try:
            host, port = proc.mx
            with smtplib.SMTP(host, port, timeout=10) as client:
                client.ehlo()
                client.sendmail("sender@sender.test", ["asked@example.test"], BODY,
                                rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
                client.sendmail("sender@sender.test", ["silent@example.test"], BODY)
            notice = wait_for(lambda: next((t for t in peer.transactions if t.sender == ""), None))
            [record] = parse_dsn(notice.data)
            assert (record.recipient, record.action) == ("asked@example.test", "relayed")
            assert record.status.startswith("2.")
            wait_for(lambda: len(events(proc, "delivered")) == 3)  # two messages and the notice
            assert sum(t.sender == "" for t in peer.transactions) == 1  # none for silent@
        finally:
            proc.stop()


def test_metrics_count_what_happened(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, domains=("example.test",), extra=route_to(peer) + fast_delivery())
    try:
        send(proc, ["one@example.test", "tempfail-two@example.test"])
        wait_for(lambda: events(proc, "delivered") and events(proc, "deferred"))

        def scrape() -> tuple[str, dict[str, float]]:
            with urllib.request.urlopen(f"http://{proc.http}/metrics", timeout=10) as response:
                assert response.status == 200
                text = response.read().decode()
                return response.headers["Content-Type"], {
                    line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
                    for line in text.splitlines() if line and not line.startswith("#")}

        content_type, samples = scrape()
        assert content_type.startswith("text/plain; version=0.0.4")
        assert samples['mtad_events_total{type="received"}'] == 1
        assert samples['mtad_events_total{type="delivered"}'] == 1
        assert samples['mtad_events_total{type="deferred"}'] >= 1
        assert samples["mtad_queue_messages"] == 1  # tempfail-two waits
        # The message, then its recipient state (written just after the events are published).
        wait_for(lambda: scrape()[1]["mtad_spool_writes_total"] >= 2)
        assert samples["mtad_delivery_destinations"] == 1
    finally:
        proc.stop()
