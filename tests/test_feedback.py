"""End to end: VERP return paths, bounces and complaints back to mtad, auto-suppression, mtactl.

A real mtad (mx + submission with TLS, tenant acme, [bounces] domain, [[route]] "*" to the
scripted peer) sends a tenant's message; the peer records the VERP MAIL FROM. Reports are then
sent to mtad's mx listener at that VERP address, as a remote MTA would: a DSN (one hard 5.1.1,
one soft 4.2.2) and an ARF complaint. mtad emits bounced/complained events, suppresses the hard
bounce and the complainer (not the single soft bounce), and the next message to them is dropped
while the other recipients go through. A forged token is refused at RCPT. Then `mtactl
suppression add/list/remove/import` against the same daemon.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
from harness import MtadProcess, wait_for, write_config
from peer import Peer, tls_files
from support import arf_report, dsn_report
from test_auth import PASSWORD, USER

from mtad.platform.tenants import TenantDirectory

BOUNCE_DOMAIN = "bounce.test"
VERP_SENDER = re.compile(r"bounces\+([0-9a-f]{22})-[a-z2-7]{16}@bounce\.test")
RECIPIENTS = ["Gone@peer.test", "full@peer.test", "angry@peer.test", "ok@peer.test", "550-refused@peer.test"]
MESSAGE = b"From: Alice <alice@acme.test>\r\nTo: list@peer.test\r\nSubject: news\r\n\r\nhello\r\n"

REPORTED = [("Gone@peer.test", "failed", "5.1.1", "550 5.1.1 user unknown"),
            ("full@peer.test", "failed", "4.2.2", "452 4.2.2 mailbox full")]
"""The recipients the DSN reports: one hard bounce, one soft."""


def prepare(tmp_path: Path, nexthop: tuple[str, int]) -> Path:
    files = tls_files()
    extra = (f'[tls]\ncert = "{files.cert}"\nkey = "{files.key}"\n'
             f'[[route]]\ndomain = "*"\nnexthop = "{nexthop[0]}:{nexthop[1]}"\n'
             f'[bounces]\ndomain = "{BOUNCE_DOMAIN}"\n'
             '[delivery]\nmin_backoff = "1s"\n')
    config = write_config(tmp_path, listeners=("mx", "submission"), extra=extra)
    (tmp_path / "spool").mkdir()

    async def tenants() -> None:
        store = await TenantDirectory.open(str(tmp_path / "spool" / "state.db"))
        try:
            await store.add_tenant("acme", ["acme.test"])
            await store.add_smtp_user("acme", USER, PASSWORD)
        finally:
            await store.close()
    asyncio.run(tenants())
    return config


def submit(proc: MtadProcess, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(*proc.smtp["submission"], timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login(USER, PASSWORD)
        return client.sendmail("alice@acme.test", recipients, MESSAGE)


def events(proc: MtadProcess, kind: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in proc.mail_log() if e.get("type") == kind and all(e.get(k) == v for k, v in match.items())]


def tenant_mail(peer: Peer) -> list[Any]:
    return [t for t in peer.transactions if t.sender]  # not the DSNs mtad sends to alice (null sender)


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    with Peer() as peer:
        proc = MtadProcess(prepare(tmp_path, peer.address)).start()
        try:
            yield proc, peer
        finally:
            proc.stop()


@pytest.mark.slow
def test_bounces_and_complaints_suppress(setup: Any, tmp_path: Path) -> None:
    proc, peer = setup
    assert submit(proc, RECIPIENTS) == {}
    first = wait_for(lambda: tenant_mail(peer) or None)[0]
    verp = VERP_SENDER.fullmatch(first.sender)
    assert verp is not None, first.sender
    (received,) = events(proc, "received", tenant="acme")
    assert verp.group(1) == received["queue_id"]
    assert sorted(first.recipients) == sorted(RECIPIENTS[:4])
    # our own delivery's 550 at RCPT is a hard bounce too
    wait_for(lambda: events(proc, "bounced", recipients=["550-refused@peer.test"]))

    with smtplib.SMTP(*proc.mx, timeout=10) as remote:
        remote.ehlo("mx.peer.test")
        forged = first.sender.replace(first.sender[-20:-12], "aaaaaaaa")
        remote.mail("<>")
        assert remote.rcpt(forged) == (550, b"5.1.1 No such recipient")
        assert remote.rcpt(f"postmaster@{BOUNCE_DOMAIN}")[0] == 550
        assert remote.rcpt(f"bounces+{received['queue_id']}@{BOUNCE_DOMAIN}")[0] == 550
        remote.rset()
        fields = {"to": first.sender, "message_id": received["message_id"], "original_from": "alice@acme.test"}
        assert remote.sendmail("", [first.sender], dsn_report(**fields, recipients=REPORTED)) == {}
        assert remote.sendmail("", [first.sender], arf_report(**fields)) == {}

    bounced = events(proc, "bounced", listener="mx")  # written before the 250: no wait needed
    assert sorted((e["recipients"][0], e["bounce_class"], e["status"], e["tenant"]) for e in bounced) == [
        ("Gone@peer.test", "hard", "5.1.1", "acme"), ("full@peer.test", "soft", "4.2.2", "acme")]
    assert all(e["queue_id"] == received["queue_id"] and e["message_id"] == received["message_id"] for e in bounced)
    (complained,) = events(proc, "complained")
    assert (complained["recipients"], complained["feedback_type"], complained["source_ip"], complained["tenant"]) == (
        ["angry@peer.test"], "abuse", "192.0.2.7", "acme")
    assert not events(proc, "received", listener="mx")  # reports are consumed, not queued

    listed = wait_for(lambda: _listing(proc) if len(_listing(proc)) == 3 else None)
    assert sorted((e["address"], e["tenant"], e["reason"]) for e in listed) == [
        ("550-refused@peer.test", "acme", "hard-bounce"), ("Gone@peer.test", "acme", "hard-bounce"),
        ("angry@peer.test", "acme", "complaint")]

    # the next send: suppressed recipients dropped, the others delivered
    assert submit(proc, RECIPIENTS) == {}
    second = wait_for(lambda: tenant_mail(peer)[1:] or None)[0]
    assert sorted(second.recipients) == ["full@peer.test", "ok@peer.test"]
    dropped = events(proc, "dropped", tenant="acme")
    assert sorted((e["recipients"][0], e["reason"]) for e in dropped) == [
        ("550-refused@peer.test", "suppressed: hard-bounce"), ("Gone@peer.test", "suppressed: hard-bounce"),
        ("angry@peer.test", "suppressed: complaint")]

    # mtactl: add (global), list, import, remove
    out = proc.mtactl("suppression", "add", "Manual@Peer.TEST", "--reason", "asked", "--expires", "30d").stdout
    assert b"Manual@peer.test globally (asked) until" in out
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("address,reason,expires\nx1@peer.test\nx2@peer.test,bounced elsewhere,7d\n"
                        "not-an-address,oops\n\nx3@peer.test,,never,extra\n")
    imported = proc.mtactl("suppression", "import", str(csv_file), "--tenant", "acme", check=False)
    assert imported.returncode == 1
    assert imported.stdout.decode().strip() == "imported 2, 2 bad lines"
    assert imported.stderr.decode().splitlines() == [
        f"{csv_file}:4: not a valid address", f"{csv_file}:6: too many columns (address[,reason[,expires]])"]
    mine = [json.loads(line) for line in proc.mtactl("suppression", "list", "--tenant", "acme", "--json").stdout.splitlines()]
    assert {e["address"] for e in mine} >= {"x1@peer.test", "x2@peer.test"} and len(mine) == 5
    table = proc.mtactl("suppression", "list").stdout.decode().splitlines()
    assert table[0].split() == ["ADDRESS", "LIST", "REASON", "SOURCE", "CREATED", "EXPIRES"]
    assert any(line.startswith("Manual@peer.test") and "(global)" in line for line in table)
    assert proc.mtactl("suppression", "remove", "gone@PEER.test", check=False).returncode == 1  # case of the local part
    removed = proc.mtactl("suppression", "remove", "Gone@peer.test", "--tenant", "acme")
    assert removed.stdout.decode().strip() == "removed Gone@peer.test from tenant acme"
    bad = proc.mtactl("suppression", "add", "nope", check=False)
    assert bad.returncode == 1 and b"not a valid address" in bad.stderr

    assert submit(proc, ["Gone@peer.test", "Manual@peer.test", "x1@peer.test"]) == {}
    third = wait_for(lambda: tenant_mail(peer)[2:] or None)[0]
    assert third.recipients == ["Gone@peer.test"]


def _listing(proc: MtadProcess) -> list[dict[str, Any]]:
    out = proc.mtactl("suppression", "list", "--json").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_mx_without_bounce_domain_refuses_it(tmp_path: Path) -> None:
    """VERP off ([bounces] domain empty): the bounce domain is just another relay attempt."""
    config = write_config(tmp_path)
    proc = MtadProcess(config).start()
    try:
        with smtplib.SMTP(*proc.mx, timeout=10) as remote:
            remote.ehlo("mx.peer.test")
            remote.mail("<>")
            assert remote.rcpt(f"bounces+{'0' * 22}-{'a' * 16}@{BOUNCE_DOMAIN}") == (550, b"5.7.1 Relay access denied")
    finally:
        assert proc.stop() == 0
