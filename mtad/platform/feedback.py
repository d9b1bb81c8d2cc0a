"""Bounce and complaint handling: reports sent to our VERP addresses, our own delivery's bounces.

`Feedback.consume(body, queue_ids)` is what ingest calls for a message whose recipients are VERP
addresses at `[bounces] domain` (the mx listener let them through only with a valid token, so
each names one of our messages): the report is parsed off the loop (mtad.dsn.parse in a thread),
each record is matched to the message through the sent log (mtad.platform.sentlog: tenant,
Message-ID, recipients), a record whose recipient was not one of that message's recipients is
ignored (a report cannot suppress someone we never wrote to), and then:
    failed (hard, soft, unknown)  -> a `bounced` event; hard and soft feed the suppression policy
    complaint (ARF)               -> a `complained` event (feedback type, source IP); policy
    delayed, auto-reply, others   -> logged only
Policy changes are committed before consume() returns, so the 250 that follows means durable.

`DeliveryBounces` is the bus subscriber for our own delivery's `bounced` events (a 550 at RCPT
is a hard bounce too): the bus calls it synchronously, so it queues the event, and a task
charges it to the message's tenant (from the event, else the sent log) and applies the policy.
Events published by Feedback carry `listener="mx"` and are left alone here.

`BounceHandling` builds and owns these for the daemon: one `open()`, one `start()`, one `stop()`.

Trust: report bodies come from strangers; the parser never raises on hostile input, but it runs
in a thread and its failure is caught (the report is then kept nowhere, and the sender is told
250: it was received; there is nothing to retry).
RFCs: 3464 (DSN), 5965 (ARF), 3834 (auto-replies are not bounces).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

import msgspec
import structlog

from mtad import dsn
from mtad.config.schema import Config
from mtad.events import Event, EventBus
from mtad.platform.sentlog import SentLog, SentMessage
from mtad.platform.suppress import (
    Policy,
    SuppressionError,
    SuppressionList,
    normalize_address,
)
from mtad.platform.verp import Verp, verp_from_config

log = structlog.get_logger("mtad.feedback")

PURGE_INTERVAL = 3600.0
BOUNCE_CLASSES = frozenset({"hard", "soft", "unknown"})


def comparable(address: str) -> str:
    """An address as the sent log and the suppression list hold it (domain lowercased)."""
    try:
        return normalize_address(address)
    except SuppressionError:
        return address.strip().lower()


def match(record: dsn.DsnRecord, sent: SentMessage | None) -> str | None:
    """The recipient of `sent` a report record is about, or None when it is not one of them.

    With the message unknown (its sent-log row expired or was lost) the record's own recipient
    is taken. An ARF report that names nobody (redacted) is about the only recipient, if one.
    """
    if sent is None:
        return record.recipient or None
    recipients = {comparable(r): r for r in sent.recipients}
    if not record.recipient:
        return sent.recipients[0] if len(sent.recipients) == 1 else None
    wanted = comparable(record.recipient)
    if wanted in recipients:
        return recipients[wanted]
    # Some MTAs report the local part in another case than we sent it.
    folded = {r.lower(): r for r in recipients.values()}
    return folded.get(wanted.lower())


class Feedback:
    """Consumes reports addressed to VERP addresses; see the module docstring."""

    def __init__(self, verp: Verp, sent: SentLog, suppressions: SuppressionList, bus: EventBus,
                 clock: Callable[[], float] = time.time) -> None:
        self.verp = verp
        self._sent = sent
        self._suppressions = suppressions
        self._bus = bus
        self._clock = clock

    def claims(self, address: str) -> str | None:
        """The queue id a recipient address names, when it is a valid VERP address; else None."""
        return self.verp.claims(address)

    async def consume(self, body: bytes | bytearray, queue_ids: list[str], *, client_address: str = "") -> int:
        """Attribute one report; return the number of events published. Raises only when the
        suppression list cannot be written (the caller answers 451 and the sender retries)."""
        data = bytes(body)
        try:
            records = await asyncio.to_thread(dsn.parse, data)
        except Exception:
            log.exception("feedback.parse_failed", queue_ids=queue_ids, size=len(data))
            return 0
        messages = {qid: await self._sent.lookup(qid) for qid in dict.fromkeys(queue_ids)}
        if not records:
            log.info("feedback.no_records", queue_ids=queue_ids, client_address=client_address, size=len(data))
            return 0
        events = []
        for record in records:
            attributed = self._attribute(record, messages)
            if attributed is None:
                log.info("feedback.not_our_recipient", queue_ids=queue_ids, recipient=record.recipient,
                         reason=record.reason)
                continue
            queue_id, sent, recipient = attributed
            event = await self._apply(record, queue_id, sent, recipient, client_address)
            if event is not None:
                events.append(event)
        for event in events:
            self._bus.publish(event)
        return len(events)

    def _attribute(self, record: dsn.DsnRecord,
                   messages: dict[str, SentMessage | None]) -> tuple[str, SentMessage | None, str] | None:
        for queue_id, sent in messages.items():
            recipient = match(record, sent)
            if recipient is not None:
                return queue_id, sent, recipient
        return None

    async def _apply(self, record: dsn.DsnRecord, queue_id: str, sent: SentMessage | None, recipient: str,
                     client_address: str) -> Event | None:
        tenant = sent.tenant if sent is not None else ""
        event = Event(type="bounced", time=self._clock(), queue_id=queue_id, recipients=[recipient],
                      tenant=tenant, sender=sent.sender if sent is not None else None, listener="mx",
                      message_id=sent.message_id if sent and sent.message_id else record.message_id,
                      client_address=client_address, reason=record.reason, bounce_class=record.class_)
        klass = record.class_
        if klass == "complaint":
            if sent is not None:
                await self._suppressions.record_complaint(tenant, recipient, f"complained:{queue_id}")
            return msgspec.structs.replace(event, type="complained", feedback_type=record.feedback_type,
                                           source_ip=record.source_ip)
        if record.action in ("failed", "") and klass in BOUNCE_CLASSES:
            if sent is not None:
                await self._suppressions.record_bounce(tenant, recipient, klass, f"bounced:{queue_id}")
            else:
                log.warning("feedback.unattributed", queue_id=queue_id, recipient=recipient,
                            note="no sent-log row: reported, not suppressed")
            return msgspec.structs.replace(event, status=record.status, reply=record.diagnostic[:998],
                                           relay=record.remote_mta)
        log.info("feedback.ignored", queue_id=queue_id, recipient=recipient, action=record.action,
                 bounce_class=klass, reason=record.reason, status=record.status)
        return None


class DeliveryBounces:
    """Our own delivery's bounced events -> the suppression policy (see the module docstring)."""

    def __init__(self, sent: SentLog, suppressions: SuppressionList) -> None:
        self._sent = sent
        self._suppressions = suppressions
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        if event.type == "bounced" and not event.listener and event.bounce_class in ("hard", "soft"):
            self._queue.put_nowait(event)

    def stop(self) -> None:
        self._queue.put_nowait(None)

    async def idle(self) -> None:
        """Wait until every queued event has been applied (tests, shutdown)."""
        await self._queue.join()

    async def run(self) -> None:
        """Apply queued events until `stop()`; purge expired entries every PURGE_INTERVAL."""
        last_purge = -PURGE_INTERVAL
        while True:
            if time.monotonic() - last_purge >= PURGE_INTERVAL:
                last_purge = time.monotonic()
                try:
                    await self._suppressions.purge()
                except Exception:
                    log.exception("suppress.purge_failed")
            try:
                event = await asyncio.wait_for(self._queue.get(), PURGE_INTERVAL)
            except TimeoutError:
                continue
            try:
                if event is None:
                    return
                await self._apply(event)
            except Exception:
                log.exception("suppress.policy_failed", queue_id=event.queue_id if event else "")
            finally:
                self._queue.task_done()

    async def _apply(self, event: Event) -> None:
        tenant = event.tenant
        if not tenant:
            sent = await self._sent.lookup(event.queue_id)
            if sent is None:
                return  # not mail we send for someone (relayed from mx, a DSN): nobody to charge
            tenant = sent.tenant
        for recipient in event.recipients:
            await self._suppressions.record_bounce(tenant, recipient, event.bounce_class,
                                                   f"bounced:{event.queue_id}")


class BounceHandling:
    """The sent log, suppression list, VERP and feedback of one daemon."""

    def __init__(self, *, verp: Verp | None, sent: SentLog, suppressions: SuppressionList,
                 feedback: Feedback | None, delivery_bounces: DeliveryBounces) -> None:
        self.verp = verp
        self.sent = sent
        self.suppressions = suppressions
        self.feedback = feedback
        self.delivery_bounces = delivery_bounces
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, cfg: Config, bus: EventBus) -> BounceHandling:
        """Open state.db's tables, load the list, subscribe to the bus. StateDbError, VerpKeyError
        (an OSError) when the files cannot be used."""
        path = os.path.join(cfg.server.spool_dir, "state.db")
        verp = verp_from_config(cfg)
        suppressions = await SuppressionList.open(path, Policy.from_config(cfg.suppression))
        try:
            sent = await SentLog.open(path, float(cfg.bounces.keep_sent))
        except BaseException:
            await suppressions.close()
            raise
        feedback = Feedback(verp, sent, suppressions, bus) if verp is not None else None
        delivery_bounces = DeliveryBounces(sent, suppressions)
        bus.subscribe(sent)
        bus.subscribe(delivery_bounces)
        log.info("suppression.loaded", entries=len(suppressions), verp_domain=verp.domain if verp else "")
        return cls(verp=verp, sent=sent, suppressions=suppressions, feedback=feedback,
                   delivery_bounces=delivery_bounces)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.sent.run(), name="sentlog"),
                       asyncio.create_task(self.delivery_bounces.run(), name="delivery-bounces")]

    async def stop(self) -> None:
        """After delivery has stopped: apply what is queued, write what is pending, close."""
        self.sent.stop()
        self.delivery_bounces.stop()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        await self.sent.close()
        await self.suppressions.close()
