"""The suppression list and its policy, the sent log, and feedback attribution, on a real state.db.

In-process: SuppressionList (add/remove/expiry/reopen, hard/soft/complaint policy), SentLog
(batched writes from received events), Feedback.consume on DSN and ARF reports (events,
suppressions, recipient checks), DeliveryBounces (our own bounced events), and Ingest dropping
suppressed recipients and consuming VERP reports (nothing stored).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support import Clock, arf_report, dsn_report

from mtad.events import Event, EventBus
from mtad.ingest import Ingest, Submission
from mtad.platform.feedback import DeliveryBounces, Feedback
from mtad.platform.sentlog import SentLog
from mtad.platform.suppress import (
    Policy,
    SuppressionError,
    SuppressionList,
    normalize_address,
    parse_expiry,
)
from mtad.platform.verp import Verp
from mtad.records import Envelope, Recipient

QID = "0123456789abcdef012345"
VERP = Verp("bounce.test", b"k" * 32)



@pytest_asyncio.fixture
async def store(tmp_path: Path) -> Any:
    clock = Clock()
    suppressions = await SuppressionList.open(str(tmp_path / "state.db"), Policy(), clock=clock)
    try:
        yield suppressions, clock
    finally:
        await suppressions.close()


@pytest_asyncio.fixture
async def sent(store: Any, tmp_path: Path) -> AsyncIterator[SentLog]:
    """The sent log in the same state.db, on the store's clock."""
    log = await SentLog.open(str(tmp_path / "state.db"), clock=store[1])
    try:
        yield log
    finally:
        await log.close()


def recording_bus() -> tuple[EventBus, list[Event]]:
    """An event bus and the list every event it publishes is appended to."""
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    return bus, events


def test_addresses_and_expiry_parsing() -> None:
    assert normalize_address(" <Bob.Smith@Example.ORG> ") == "Bob.Smith@example.org"
    assert normalize_address("u@Bücher.example") == "u@xn--bcher-kva.example"
    for bad in ("", "no-at", "a@[192.0.2.1]", "a b@c.test", "@c.test"):
        with pytest.raises(SuppressionError):
            normalize_address(bad)
    policy = Policy(default_expiry=86400)
    assert parse_expiry("", 100.0, policy) == 100.0 + 86400
    assert parse_expiry("never", 100.0, policy) is None and parse_expiry("0s", 100.0, policy) is None
    assert parse_expiry("30d", 100.0, Policy()) == 100.0 + 30 * 86400
    assert parse_expiry("", 100.0, Policy()) is None
    with pytest.raises(SuppressionError):
        parse_expiry("soon", 100.0, policy)


@pytest.mark.asyncio
async def test_add_lookup_remove_expire_and_reopen(store: Any, tmp_path: Path) -> None:
    suppressions, clock = store
    await suppressions.add("Gone@Peer.TEST", reason="manual", source="mtactl")
    await suppressions.add("only-acme@peer.test", tenant="acme", reason="unsubscribe")
    await suppressions.add("brief@peer.test", reason="manual", expires=clock.now + 60)
    assert suppressions.suppressed("acme", "Gone@peer.test") == "manual"  # the global list applies to all
    assert suppressions.suppressed("", "gone@peer.test") is None  # the local part keeps its case
    assert suppressions.suppressed("acme", "only-acme@peer.test") == "unsubscribe"
    assert suppressions.suppressed("other", "only-acme@peer.test") is None
    assert suppressions.suppressed("", "only-acme@peer.test") is None
    assert suppressions.suppressed("other", "brief@peer.test") == "manual"
    clock.now += 61
    assert suppressions.suppressed("other", "brief@peer.test") is None
    assert await suppressions.purge() == 1
    assert [(e.tenant, e.address) for e in await suppressions.entries()] == [
        ("", "Gone@peer.test"), ("acme", "only-acme@peer.test")]
    assert [e.address for e in await suppressions.entries("acme")] == ["only-acme@peer.test"]
    with pytest.raises(SuppressionError) as missing:
        await suppressions.remove("only-acme@peer.test")  # not in the global list
    assert missing.value.code == "not_found"
    await suppressions.remove("only-acme@PEER.test", tenant="acme")
    with pytest.raises(SuppressionError):
        await suppressions.add("x@peer.test", reason="")
    reopened = await SuppressionList.open(str(tmp_path / "state.db"))
    try:
        assert [(e.address, e.reason, e.source) for e in await reopened.entries()] == [("Gone@peer.test", "manual", "mtactl")]
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_policy_hard_soft_complaint(store: Any) -> None:
    suppressions, clock = store
    hard = await suppressions.record_bounce("acme", "gone@peer.test", "hard", f"bounced:{QID}")
    assert hard is not None and (hard.tenant, hard.reason, hard.source) == ("acme", "hard-bounce", f"bounced:{QID}")
    assert suppressions.suppressed("acme", "gone@peer.test") == "hard-bounce"
    assert suppressions.suppressed("other", "gone@peer.test") is None  # per tenant
    assert await suppressions.record_bounce("acme", "gone@peer.test", "hard", "again") is None  # already
    # soft: 3 within 7 days suppress; one that fell out of the window does not count
    assert await suppressions.record_bounce("acme", "full@peer.test", "soft", "s1") is None
    clock.now += 8 * 86400
    assert await suppressions.record_bounce("acme", "full@peer.test", "soft", "s2") is None
    assert await suppressions.record_bounce("acme", "full@peer.test", "soft", "s3") is None
    assert await suppressions.soft_count("acme", "full@peer.test") == 2
    assert suppressions.suppressed("acme", "full@peer.test") is None
    third = await suppressions.record_bounce("acme", "full@peer.test", "soft", "s4")
    assert third is not None and third.reason == "soft-bounces"
    assert await suppressions.soft_count("acme", "full@peer.test") == 0
    assert await suppressions.record_bounce("acme", "odd@peer.test", "unknown", "u") is None
    assert await suppressions.record_bounce("acme", "not an address", "hard", "u") is None
    complaint = await suppressions.record_complaint("acme", "angry@peer.test", f"complained:{QID}")
    assert complaint is not None and complaint.reason == "complaint"
    suppressions.policy = Policy(hard_bounce=False, soft_bounces=0, complaint=False, default_expiry=3600)
    assert await suppressions.record_bounce("acme", "g2@peer.test", "hard", "x") is None
    assert await suppressions.record_bounce("acme", "f2@peer.test", "soft", "x") is None
    assert await suppressions.record_complaint("acme", "a2@peer.test", "x") is None
    suppressions.policy = Policy(default_expiry=3600)
    timed = await suppressions.record_bounce("acme", "g3@peer.test", "hard", "x")
    assert timed is not None and timed.expires == clock.now + 3600


@pytest.mark.asyncio
async def test_sent_log_batches_received_events(tmp_path: Path) -> None:
    sent = await SentLog.open(str(tmp_path / "state.db"))
    try:
        sent(Event(type="received", time=1.0, queue_id=QID, sender="a@acme.test", recipients=["x@p.test"],
                   message_id="<m@acme.test>", listener="submission", tenant="acme"))
        sent(Event(type="received", time=1.0, queue_id="1" * 22, sender="a@b.test", recipients=["y@p.test"],
                   listener="mx"))  # inbound: no VERP, not logged
        sent(Event(type="delivered", time=1.0, queue_id="2" * 22, sender="a@b.test", listener="submission"))
        pending = await sent.lookup(QID)
        assert pending is not None and pending.tenant == "acme"  # before the write, from memory
        assert await sent.flush() == 1
        row = await sent.lookup(QID)
        assert row is not None and (row.tenant, row.message_id, row.recipients) == ("acme", "<m@acme.test>", ("x@p.test",))
        assert await sent.lookup("1" * 22) is None
        sent.keep = 0.0
        await sent.expire()
        assert await sent.lookup(QID) is None
    finally:
        await sent.close()


DSN_RECIPIENTS = [("Gone@peer.test", "failed", "5.1.1", "550 5.1.1 user unknown"),
                  ("full@peer.test", "failed", "4.2.2", "452 4.2.2 mailbox full"),
                  ("slow@peer.test", "delayed", "4.4.1", ""), ("stranger@peer.test", "failed", "5.1.1", "")]


def dsn() -> bytes:
    """A DSN to the VERP address of QID about <m1@acme.test>: hard, soft, delayed, not ours."""
    return dsn_report(to=VERP.address(QID), message_id="<m1@acme.test>", original_from="a@acme.test",
                      recipients=DSN_RECIPIENTS)


def arf() -> bytes:
    """A complaint by angry@peer.test to the VERP address of QID about <m1@acme.test>."""
    return arf_report(to=VERP.address(QID), message_id="<m1@acme.test>", original_from="a@acme.test",
                      subject="complaint about message from 192.0.2.7", original_body="hi")


class MemorySpool:
    def __init__(self) -> None:
        self.stored: list[tuple[Envelope, list[Recipient], bytes]] = []

    async def store(self, envelope: Envelope, recipients: list[Recipient], body: bytes | memoryview) -> None:
        self.stored.append((envelope, list(recipients), bytes(body)))


@pytest.mark.asyncio
async def test_feedback_attributes_reports_and_ingest_consumes_them(store: Any, sent: SentLog) -> None:
    suppressions, clock = store
    bus, events = recording_bus()
    bus.subscribe(sent)
    bus.publish(Event(type="received", time=clock.now, queue_id=QID, sender="a@acme.test", tenant="acme",
                      recipients=["Gone@peer.test", "full@peer.test", "slow@peer.test", "angry@peer.test"],
                      message_id="<m1@acme.test>", listener="submission"))
    await sent.flush()
    feedback = Feedback(VERP, sent, suppressions, bus, clock=clock)
    spool = MemorySpool()
    ingest = Ingest(spool, bus, "mx.test", clock=clock, feedback=feedback, suppressions=suppressions)
    verp_rcpt = [Recipient(address=VERP.address(QID))]
    for body in (dsn(), arf()):
        await ingest.accept(Submission(sender="", recipients=verp_rcpt, body=body, listener="mx",
                                       client_address="192.0.2.9"))
    assert spool.stored == []  # consumed, never queued
    bounced = [e for e in events if e.type == "bounced"]
    assert [(e.recipients, e.bounce_class, e.status, e.reason, e.tenant) for e in bounced] == [
        (["Gone@peer.test"], "hard", "5.1.1", "userunknown", "acme"),
        (["full@peer.test"], "soft", "4.2.2", "mailboxfull", "acme")]
    assert bounced[0].message_id == "<m1@acme.test>" and bounced[0].reply == "550 5.1.1 user unknown"
    (complained,) = [e for e in events if e.type == "complained"]
    assert (complained.recipients, complained.feedback_type, complained.source_ip, complained.tenant) == (
        ["angry@peer.test"], "abuse", "192.0.2.7", "acme")
    assert {e.address: e.reason for e in await suppressions.entries("acme")} == {
        "Gone@peer.test": "hard-bounce", "angry@peer.test": "complaint"}  # stranger: not our recipient
    assert await suppressions.soft_count("acme", "full@peer.test") == 1
    # the next message of acme to them: suppressed recipients dropped, the rest queued
    events.clear()
    rcpts = [Recipient(address=a) for a in ("Gone@peer.test", "angry@peer.test", "full@peer.test")]
    queue_id = await ingest.accept(Submission(sender="a@acme.test", recipients=rcpts, body=b"Subject: x\r\n\r\nx\r\n",
                                              listener="submission", tenant="acme"))
    (stored,) = spool.stored
    assert stored[0].id == queue_id and [r.address for r in stored[1]] == ["full@peer.test"]
    dropped = [(e.recipients, e.reason, e.queue_id) for e in events if e.type == "dropped"]
    assert dropped == [(["Gone@peer.test"], "suppressed: hard-bounce", queue_id),
                       (["angry@peer.test"], "suppressed: complaint", queue_id)]
    # all suppressed: acknowledged with a queue id, nothing stored, no received event
    events.clear()
    await ingest.accept(Submission(sender="a@acme.test", recipients=rcpts[:1], body=b"\r\nx\r\n",
                                   listener="submission", tenant="acme"))
    assert len(spool.stored) == 1 and [e.type for e in events] == ["dropped"]
    # another tenant's mail is not affected by acme's list
    await ingest.accept(Submission(sender="a@o.test", recipients=rcpts[:1], body=b"\r\nx\r\n",
                                   listener="submission", tenant="other"))
    assert len(spool.stored) == 2


@pytest.mark.asyncio
async def test_unknown_message_is_reported_not_suppressed(store: Any, sent: SentLog) -> None:
    suppressions, clock = store
    bus, events = recording_bus()
    feedback = Feedback(VERP, sent, suppressions, bus, clock=clock)
    assert await feedback.consume(dsn(), [QID]) == 3  # gone, full, stranger (delayed: logged)
    assert {e.tenant for e in events} == {""} and await suppressions.entries() == []
    assert await feedback.consume(b"Subject: hello\r\n\r\njust a reply\r\n", [QID]) == 0
    assert await feedback.consume(b"\x00\xff" * 1000, [QID]) == 0


@pytest.mark.asyncio
async def test_own_delivery_bounces_feed_the_policy(store: Any, sent: SentLog) -> None:
    suppressions, clock = store
    worker = DeliveryBounces(sent, suppressions)
    task = asyncio.create_task(worker.run())
    try:
        sent(Event(type="received", time=clock.now, queue_id=QID, sender="a@acme.test", tenant="acme",
                   recipients=["550-x@peer.test"], listener="submission"))
        worker(Event(type="bounced", time=clock.now, queue_id=QID, recipients=["550-x@peer.test"],
                     bounce_class="hard", status="5.1.1"))
        worker(Event(type="bounced", time=clock.now, queue_id="1" * 22, recipients=["relayed@peer.test"],
                     bounce_class="hard"))  # not mail we sent for a tenant: nobody to charge
        worker(Event(type="bounced", time=clock.now, queue_id=QID, recipients=["op@peer.test"], reason="operator"))
        worker(Event(type="deferred", time=clock.now, queue_id=QID, recipients=["t@peer.test"], bounce_class="soft"))
        await worker.idle()
        assert [(e.tenant, e.address, e.source) for e in await suppressions.entries()] == [
            ("acme", "550-x@peer.test", f"bounced:{QID}")]
    finally:
        worker.stop()
        await task


@pytest.mark.asyncio
async def test_state_db_has_the_tables(store: Any, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "state.db") as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"suppressions", "soft_bounces", "sent", "tenants"} <= names
