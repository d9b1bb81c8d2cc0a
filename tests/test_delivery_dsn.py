"""RFC 3461 DSN options end to end: a real mtad, the scripted peer, DSNs read as a sender would.

Mail goes in on the mx listener with smtplib and its ESMTP options (RET, ENVID on MAIL;
NOTIFY, ORCPT on RCPT); everything, the DSNs mtad returns to sender@sender.test included,
goes out through a static route "*" to the scripted peer, which records the MAIL and RCPT
parameters of every transaction. Checked: NOTIFY=NEVER silences a bounce, the options are
passed on to a peer that offers DSN (one that does not gets none, and a sender who asked for
NOTIFY=SUCCESS gets a "relayed" DSN), RET=HDRS returns headers only, ENVID and ORCPT come
back in the report, a delay warning goes out once, a message from the null sender never
bounces back, and a message past its queue lifetime expires with a DSN. For the expiry
case (the lifetime's minimum is 60 s) the message is stored with an old arrival time
through the spool API while the daemon is stopped.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from harness import MtadProcess, fast_delivery, wait_for, write_config
from peer import Peer, Transaction

from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool

pytestmark = pytest.mark.slow

SENDER = "sender@sender.test"
BODY = (b"From: Sender <sender@sender.test>\r\nTo: someone@example.test\r\nSubject: dsn options\r\n"
        b"Message-ID: <dsn-options@sender.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n\r\n"
        b"The body text that only RET=FULL returns.\r\n")
FAST = fast_delivery(max_backoff="1s", suspend_after=None, suspend_time=None)


@pytest.fixture
def peer() -> Iterator[Peer]:
    with Peer() as p:
        yield p


def start(tmp_path: Path, peer: Peer, extra: str = "") -> MtadProcess:
    route = f'\n[[route]]\ndomain = "*"\nnexthop = "127.0.0.1:{peer.port}"\n'
    return MtadProcess(write_config(tmp_path, extra=route + FAST + extra)).start()


def send(proc: MtadProcess, recipients: list[str], *, sender: str = SENDER, mail: tuple[str, ...] = (),
         rcpt: tuple[str, ...] = ()) -> None:
    with smtplib.SMTP(*proc.mx, timeout=10) as client:
        client.sendmail(sender, recipients, BODY, mail_options=list(mail), rcpt_options=list(rcpt))


def events(proc: MtadProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in proc.mail_log() if e.get("type") == kind]


def dsns(peer: Peer) -> list[Transaction]:
    return [t for t in list(peer.transactions) if t.sender == ""]


def queued_dsns(proc: MtadProcess) -> list[dict[str, Any]]:
    """Queued DSNs of ours (from <>, not a test message that was itself sent from <>)."""
    return [e for e in proc.queue_json() if e["sender"] == "" and e["message_id"] != "<dsn-options@sender.test>"]


def gone(proc: MtadProcess, recipient: str) -> bool:
    """No queued message has this recipient any more (its last write has committed)."""
    return not any(r["address"] == recipient for e in proc.queue_json() for r in e["recipients"])


def parse(data: bytes) -> tuple[Message, list[str], list[Message]]:
    """A DSN as (top, content types of its parts, the delivery-status field blocks)."""
    message = email.message_from_bytes(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = [part for part in message.get_payload() if isinstance(part, Message)]
    types = [part.get_content_type() for part in parts]
    report = [block for block in parts[1].get_payload() if isinstance(block, Message)]
    return message, types, report


def test_notify_never_means_no_dsn_on_a_550(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, peer)
    try:
        send(proc, ["550-quiet@example.test"], rcpt=("NOTIFY=NEVER",))
        [bounced] = wait_for(lambda: events(proc, "bounced"))
        assert bounced["recipients"] == ["550-quiet@example.test"] and bounced["status"] == "5.1.1"
        # The DSN, had there been one, would be queued before the bounced message left the queue.
        wait_for(lambda: gone(proc, "550-quiet@example.test"))
        assert not queued_dsns(proc) and not dsns(peer)
        assert not any(r.get("event") == "deliver.dsn_queued" for r in proc.records())
        # The same failure without NOTIFY does bounce back: the silence above was NOTIFY's doing.
        send(proc, ["550-loud@example.test"])
        [dsn] = wait_for(lambda: dsns(peer))
        assert dsn.recipients == [SENDER]
        assert b"550-loud@example.test" in dsn.data and b"550-quiet@example.test" not in dsn.data
    finally:
        proc.stop()


def test_dsn_parameters_are_passed_on_to_a_peer_offering_dsn(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, peer)
    try:
        send(proc, ["ok@example.test"], mail=("RET=HDRS", "ENVID=env+2D7"),
             rcpt=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;first+2Bok@example.test"))
        [txn] = peer.wait_transactions(1)
        assert txn.sender == SENDER and txn.recipients == ["ok@example.test"]
        assert "RET=HDRS" in txn.mail_params and "ENVID=env+2D7" in txn.mail_params
        params = txn.rcpt_params["ok@example.test"]
        assert "NOTIFY=SUCCESS,FAILURE" in params and "ORCPT=rfc822;first+2Bok@example.test" in params
        # Without the options nothing is invented.
        send(proc, ["plain@example.test"])
        plain = peer.wait_transactions(2)[1]
        assert not any(p.startswith(("RET=", "ENVID=")) for p in plain.mail_params)
        assert not any(p.startswith(("NOTIFY=", "ORCPT=")) for p in plain.rcpt_params["plain@example.test"])
    finally:
        proc.stop()


def test_notify_success_to_a_peer_without_dsn_returns_a_relayed_dsn(tmp_path: Path) -> None:
    with Peer(dsn=False) as plain_peer:
        proc = start(tmp_path, plain_peer)
        try:
            # Without NOTIFY=SUCCESS a delivery is silent ...
            send(proc, ["quiet@example.test"])
            plain_peer.wait_transactions(1)
            wait_for(lambda: gone(proc, "quiet@example.test"))
            assert not queued_dsns(proc) and not dsns(plain_peer)
            # ... with it, the server cannot carry the request on, so mtad reports "relayed".
            send(proc, ["asked@example.test"], mail=("ENVID=ask+2D1",),
                 rcpt=("NOTIFY=SUCCESS", "ORCPT=rfc822;asked@example.test"))
            [dsn] = wait_for(lambda: dsns(plain_peer))
            original = next(t for t in plain_peer.transactions if t.recipients == ["asked@example.test"])
            assert not original.rcpt_params["asked@example.test"]
            assert not any(p.startswith(("RET=", "ENVID=")) for p in original.mail_params)
            assert dsn.recipients == [SENDER]
            _, types, report = parse(dsn.data)
            assert types[:2] == ["text/plain", "message/delivery-status"]
            assert report[0]["Original-Envelope-Id"] == "ask-1"
            assert report[1]["Final-Recipient"] == "rfc822; asked@example.test"
            assert report[1]["Action"] == "relayed" and report[1]["Status"].startswith("2.")
            wait_for(lambda: proc.queue_json() == [])
            assert len(dsns(plain_peer)) == 1
        finally:
            proc.stop()


def test_ret_hdrs_envid_and_orcpt_in_the_dsn(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, peer)
    try:
        send(proc, ["550-hdrs@example.test"], mail=("RET=HDRS", "ENVID=batch+2D42"),
             rcpt=("NOTIFY=FAILURE", "ORCPT=rfc822;orig+2Bhdrs@example.test"))
        [dsn] = wait_for(lambda: dsns(peer))
        top, types, report = parse(dsn.data)
        assert top["Subject"] == "Undelivered Mail Returned to Sender"
        assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        assert b"Subject: dsn options" in dsn.data and b"only RET=FULL returns" not in dsn.data
        per_message, per_recipient = report[0], report[1]
        assert per_message["Original-Envelope-Id"] == "batch-42"  # xtext decoded
        assert per_recipient["Original-Recipient"] == "rfc822;orig+hdrs@example.test"
        assert per_recipient["Final-Recipient"] == "rfc822; 550-hdrs@example.test"
        assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
        assert per_recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
        # RET=FULL (the default) returns the whole message.
        send(proc, ["550-full@example.test"])
        full = wait_for(lambda: len(dsns(peer)) >= 2 and dsns(peer)[1])
        _, types, report = parse(full.data)
        assert types == ["text/plain", "message/delivery-status", "message/rfc822"]
        assert b"only RET=FULL returns" in full.data
        assert report[0]["Original-Envelope-Id"] is None and report[1]["Original-Recipient"] is None
    finally:
        proc.stop()


def test_delay_warning_goes_out_once_and_never_to_the_null_sender(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, peer, 'delay_warning = "1s"\n')
    try:
        send(proc, ["tempfail-late@example.test"])
        send(proc, ["tempfail-nobody@example.test"], sender="")
        [warning] = wait_for(lambda: dsns(peer), timeout=15)
        assert warning.recipients == [SENDER]
        top, types, report = parse(warning.data)
        assert top["Subject"].startswith("Delayed Mail")
        assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        recipient = report[1]
        assert recipient["Final-Recipient"] == "rfc822; tempfail-late@example.test"
        assert (recipient["Action"], recipient["Status"]) == ("delayed", "4.2.0")
        assert recipient["Will-Retry-Until"]
        # Several more attempts of both recipients: still that one warning.
        def attempts(address: str) -> int:
            return sum(1 for e in events(proc, "deferred") if e["recipients"] == [address])
        wait_for(lambda: attempts("tempfail-late@example.test") >= 4 and attempts("tempfail-nobody@example.test") >= 4,
                 timeout=20)
        assert len(dsns(peer)) == 1 and not queued_dsns(proc)
        listing = {r["address"]: r for e in proc.queue_json() for r in e["recipients"]}
        assert listing["tempfail-late@example.test"]["attempts"] >= 4
    finally:
        proc.stop()


def test_null_sender_bounce_sends_no_dsn(tmp_path: Path, peer: Peer) -> None:
    proc = start(tmp_path, peer)
    try:
        send(proc, ["550-nobody@example.test"], sender="")
        [bounced] = wait_for(lambda: events(proc, "bounced"))
        assert bounced["sender"] == "" and bounced["status"] == "5.1.1"
        wait_for(lambda: gone(proc, "550-nobody@example.test"))
        assert proc.queue_json() == [] and not peer.transactions
        assert not any(r.get("event") in ("deliver.dsn_queued", "deliver.dsn_failed") for r in proc.records())
    finally:
        proc.stop()


async def _store_old(spool_dir: Path, age: float, recipients: list[str]) -> list[str]:
    """Messages that arrived `age` seconds ago, one per recipient, written while no daemon runs."""
    spool = Spool.open(str(spool_dir))
    ids = []
    try:
        for address in recipients:
            arrival = time.time() - age
            envelope = Envelope(id=new_queue_id(arrival), sender=SENDER, arrival_time=arrival, size=len(BODY),
                                message_id="<dsn-options@sender.test>", listener="mx", client_address="127.0.0.1",
                                envid="old+2D1")
            await spool.store(envelope, [Recipient(address=address)], BODY)
            ids.append(envelope.id)
    finally:
        await spool.close()
    return ids


def test_expiry_bounces_with_a_dsn_and_an_expired_event(tmp_path: Path, peer: Peer) -> None:
    ids = asyncio.run(_store_old(tmp_path / "spool", 2 * 3600, ["tempfail-old@example.test", "fine@example.test"]))
    proc = start(tmp_path, peer, 'max_queue_lifetime = "60s"\n')
    try:
        [expired] = wait_for(lambda: events(proc, "expired"), timeout=15)
        assert expired["queue_id"] == ids[0] and expired["recipients"] == ["tempfail-old@example.test"]
        assert expired["status"] == "4.2.0" and expired["reply"].startswith("450 4.2.0")
        assert expired["attempts"] == 1 and expired["delay"] >= 2 * 3600
        dsn = wait_for(lambda: dsns(peer), timeout=15)[0]
        assert dsn.recipients == [SENDER]
        top, types, report = parse(dsn.data)
        assert top["Subject"] == "Undelivered Mail Returned to Sender"
        assert types[-1] == "message/rfc822"
        assert report[0]["Original-Envelope-Id"] == "old-1"
        assert (report[1]["Action"], report[1]["Status"]) == ("failed", "4.2.0")
        assert report[1]["Diagnostic-Code"].startswith("smtp; 450 4.2.0")
        # An old message that can be delivered is delivered, not expired.
        [delivered] = wait_for(lambda: events(proc, "delivered") and [
            e for e in events(proc, "delivered") if e["recipients"] == ["fine@example.test"]])
        assert delivered["queue_id"] == ids[1]
        assert not any(e["type"] == "bounced" for e in proc.mail_log())
        wait_for(lambda: proc.queue_json() == [])
    finally:
        proc.stop()
