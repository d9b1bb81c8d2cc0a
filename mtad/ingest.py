"""The one way in: every message (SMTP now; HTTP, DSNs and re-injection later) enters here.

`Ingest.accept(submission)` prepends the trace header the caller built, adds Message-ID and
Date when the message has none, commits the message to the spool, publishes the `received`
event and returns the queue id. The caller acknowledges (SMTP 250, HTTP 202) only after
accept() returns: acknowledged means durable (DESIGN principle 2). When the spool refuses,
accept() publishes a `rejected` event and raises IngestError carrying the bland reply to send.

The message is never re-serialised: header lines are inserted as bytes at the top, and only
the header section is scanned (one regex match up to the blank line), never the body. A body
handed over as a bytearray (the SMTP receiver's) is taken over and our lines are inserted into
it in place, so a message of tens of MB is held once, not copied; a bytes body is copied once.
A header section above 256 KiB (hostile, or a mail loop's) is searched in a worker thread.

Before anything is stored: with a `feedback` sink, recipients on mx that are our VERP
addresses are taken out and the message handed to it (bounces and complaints are consumed, not
queued); with `suppressions`, suppressed recipients are dropped (a `dropped` event each). A
message left with no recipient is acknowledged and not stored.

With a `signer` (mtad.dkim.DkimSigner), mail from the listeners it applies to is DKIM-signed
off the loop, after Message-ID/Date are added and before our Received is prepended, so the
signature covers those fields and not our trace header: Received, DKIM-Signature, the rest.

Trust: the body is the client's and hostile; we only read its header section.
RFCs: 5321 4.4 (trace fields), 5322 3.3 (date-time), 3.6.4 (Message-ID), 3.6.7 (trace order),
6376 5.6 (DKIM-Signature prepended).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
import structlog

from mtad import reply
from mtad.events import Event, EventBus
from mtad.records import Envelope, Recipient, new_queue_id
from mtad.reply import Reply
from mtad.spool.errors import SpoolFailed, SpoolFull

log = structlog.get_logger("mtad.ingest")

# A header section: fields (name, colon, value, folded continuation lines), each CRLF-ended.
# RFC 5322 2.2: field names are printable ASCII except the colon.
_HEADER_SECTION = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Above this, the header section is searched off the loop (DESIGN principle 7).
_THREAD_SECTION = 256 * 1024


class Submission(msgspec.Struct, kw_only=True):
    """One message on its way in, as the receiving side hands it over."""

    sender: str
    """Envelope sender; "" for the null sender <>."""
    recipients: list[Recipient]
    body: bytes | bytearray
    """The message as received (dot-unstuffed, CRLF line ends), without our trace header. A
    bytearray is taken over: accept() inserts the header lines into it."""
    client_address: str = ""
    helo: str = ""
    listener: str = ""
    """Role of the listener (mx, submission, submissions), or "http"."""
    protocol: str = "ESMTP"
    smtputf8: bool = False
    body_type: str = ""
    ret: str = ""
    envid: str = ""
    received: bytes = b""
    """Trace header line(s) to prepend, CRLF-terminated (the SMTP receiver builds its Received)."""
    queue_id: str = ""
    """The queue id, when the caller allocated it first (it appears in `received`); else ingest does."""
    header_end: int = -1
    """header_section_end(body), when the caller already knows it (the SMTP receiver finds it
    while reading); -1: ingest finds it."""
    tenant: str = ""
    """The authenticated tenant's name (submission, HTTP API); "" when there is none (mx)."""


class IngestError(Exception):
    """accept() did not store the message; `reply` is what to tell the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class SpoolWriter(Protocol):
    async def store(self, envelope: Envelope, recipients: list[Recipient], body: bytes | memoryview) -> None: ...


class FeedbackSink(Protocol):
    """Takes reports sent to our VERP addresses (mtad.platform.feedback.Feedback): claims()
    says whether a recipient is one (its queue id); consume() commits what the report means."""

    def claims(self, address: str) -> str | None: ...
    async def consume(self, body: bytes | bytearray, queue_ids: list[str], *, client_address: str = "") -> int: ...


class SuppressionCheck(Protocol):
    """The suppression list's hot-path question (mtad.platform.suppress.SuppressionList)."""

    def suppressed(self, tenant: str, address: str) -> str | None: ...


class MessageSigner(Protocol):
    """Adds DKIM signatures (mtad.dkim.DkimSigner); sign() does its work off the loop."""

    def applies(self, listener: str) -> bool: ...
    async def sign(self, headers: bytes, body: bytes | bytearray, start: int) -> list[bytes]: ...


def header_section_end(body: bytes | bytearray) -> int:
    """Offset just past the header section: where the blank line (or non-header text) starts."""
    match = _HEADER_SECTION.match(body)
    return match.end() if match else 0


def find_field(section: bytes, lowered: bytes, name: bytes) -> bytes | None:
    """The unfolded value of the first `name` field (lowercase, colon included), or None."""
    if lowered.startswith(name):
        start = 0
    else:
        start = lowered.find(b"\n" + name)
        if start < 0:
            return None
        start += 1
    end = start
    while True:
        end = section.find(b"\r\n", end)
        if end < 0 or section[end + 2:end + 3] not in (b" ", b"\t"):
            break
        end += 2
    raw = section[start + len(name):end if end >= 0 else len(section)]
    return b" ".join(raw.split()).strip()


def trace_fields(section: bytes) -> tuple[bytes | None, bool]:
    """The Message-ID field's value (None when absent) and whether a Date field is present."""
    lowered = section.lower()
    return find_field(section, lowered, b"message-id:"), find_field(section, lowered, b"date:") is not None


def insert_at_top(body: bytes | bytearray, end: int, added: list[bytes]) -> bytes | bytearray:
    """The message with `added` on top; a blank line goes in at `end` when what stands there is
    not the blank line ending the header section (text that is not a header field, where
    headers should be), so the fields we add cannot swallow it into the header section.

    A bytearray is changed in place (two memmoves, no second copy); bytes are copied once.
    """
    if end < len(body) and body[end:end + 2] != b"\r\n" and end > 0:
        split = end
    elif end == 0 and body and not body.startswith(b"\r\n"):
        split = 0
    else:
        split = -1
    if isinstance(body, bytearray):
        if split >= 0:
            body[split:split] = b"\r\n"
        body[0:0] = b"".join(added)
        return body
    if split >= 0:
        added = [*added, body[:split], b"\r\n"]
    view = memoryview(body)
    return b"".join([*added, view[max(split, 0):]])


def rfc5322_date(now: float) -> str:
    """`Mon, 02 Jan 2006 15:04:05 +0000` (RFC 5322 3.3), locale-independent, in UTC."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")


class Ingest:
    """Commits messages to the spool and tells the event bus; see the module docstring."""

    def __init__(self, spool: SpoolWriter, bus: EventBus, hostname: str,
                 clock: Callable[[], float] = time.time, signer: MessageSigner | None = None,
                 feedback: FeedbackSink | None = None, suppressions: SuppressionCheck | None = None) -> None:
        self._signer = signer
        self._feedback = feedback
        self._suppressions = suppressions
        self._spool = spool
        self._bus = bus
        self._hostname = hostname
        self._clock = clock

    async def accept(self, submission: Submission) -> str:
        """Store one message; return its queue id. Raises IngestError (nothing stored)."""
        now = self._clock()
        queue_id = submission.queue_id or new_queue_id(now)
        recipients = submission.recipients
        if self._feedback is not None and submission.listener == "mx":
            recipients = await self._take_feedback(submission, recipients)
        if self._suppressions is not None:
            recipients = self._drop_suppressed(submission, queue_id, now, recipients)
        if not recipients:
            return queue_id  # acknowledged, nothing to queue: a report consumed, or all suppressed
        body = submission.body
        end = submission.header_end if submission.header_end >= 0 else header_section_end(body)
        section = bytes(memoryview(body)[:end])
        if end > _THREAD_SECTION:
            message_id, has_date = await asyncio.to_thread(trace_fields, section)
        else:
            message_id, has_date = trace_fields(section)
        added = [submission.received]
        if not message_id:
            message_id = f"<{queue_id}@{self._hostname}>".encode("ascii")
            added.append(b"Message-ID: " + message_id + b"\r\n")
        if not has_date:
            added.append(f"Date: {rfc5322_date(now)}\r\n".encode("ascii"))
        if self._signer is not None and self._signer.applies(submission.listener):
            # Signed: the fields we add here and the client's; not our Received, prepended last.
            added[1:1] = await self._signatures(b"".join(added[1:]) + section, body, end, queue_id)
        del section
        data = insert_at_top(body, end, added)
        message_id_text = message_id.decode("utf-8", "replace")[:998]
        envelope = Envelope(
            id=queue_id, sender=submission.sender, arrival_time=now, size=len(data),
            message_id=message_id_text, client_address=submission.client_address,
            client_helo=submission.helo, listener=submission.listener,
            protocol=submission.protocol, smtputf8=submission.smtputf8,
            body_type=submission.body_type, ret=submission.ret, envid=submission.envid,
            tenant=submission.tenant,
        )
        addresses = [r.address for r in recipients]
        try:
            if isinstance(data, bytearray):
                # The view pins the buffer (it cannot be resized) until the commit holds it.
                with memoryview(data) as view:
                    await self._spool.store(envelope, recipients, view)
            else:
                await self._spool.store(envelope, recipients, data)
        except (SpoolFull, SpoolFailed) as exc:
            refusal = reply.SPOOL_FULL if isinstance(exc, SpoolFull) else reply.SPOOL_FAILED
            log.warning("ingest.spool_refused", queue_id=queue_id, error=str(exc))
            self._publish(Event(
                type="rejected", time=now, client_address=submission.client_address,
                helo=submission.helo, sender=submission.sender, recipients=addresses,
                size=len(data), listener=submission.listener, reply=str(refusal),
            ))
            raise IngestError(refusal) from exc
        self._publish(Event(
            type="received", time=now, queue_id=queue_id, client_address=submission.client_address,
            helo=submission.helo, sender=submission.sender, recipients=addresses, size=len(data),
            message_id=message_id_text, listener=submission.listener,
            reply=str(reply.queued(queue_id)), tenant=submission.tenant,
        ))
        return queue_id

    async def _take_feedback(self, submission: Submission, recipients: list[Recipient]) -> list[Recipient]:
        """Hand a report sent to VERP addresses to the feedback sink; the other recipients remain.
        Its changes are committed before we return (the 250 follows); failing, nothing is stored."""
        assert self._feedback is not None
        claimed = {r.address: qid for r in recipients if (qid := self._feedback.claims(r.address))}
        if not claimed:
            return recipients
        try:
            await self._feedback.consume(submission.body, list(claimed.values()),
                                         client_address=submission.client_address)
        except Exception as exc:
            log.exception("ingest.feedback_failed", recipients=list(claimed))
            raise IngestError(reply.SPOOL_FAILED) from exc
        return [r for r in recipients if r.address not in claimed]

    def _drop_suppressed(self, submission: Submission, queue_id: str, now: float,
                         recipients: list[Recipient]) -> list[Recipient]:
        """The recipients not on the suppression list; a `dropped` event for each one that is."""
        assert self._suppressions is not None
        kept = []
        for recipient in recipients:
            reason = self._suppressions.suppressed(submission.tenant, recipient.address)
            if reason is None:
                kept.append(recipient)
                continue
            self._publish(Event(
                type="dropped", time=now, queue_id=queue_id, client_address=submission.client_address,
                sender=submission.sender, recipients=[recipient.address], listener=submission.listener,
                tenant=submission.tenant, reason=f"suppressed: {reason}",
            ))
        return kept

    async def _signatures(self, headers: bytes, body: bytes | bytearray, end: int, queue_id: str) -> list[bytes]:
        assert self._signer is not None
        # The body starts after the blank line; without one, right after the header fields.
        start = end + 2 if body[end:end + 2] == b"\r\n" else end
        try:
            return await self._signer.sign(headers, body, start)
        except Exception:
            # A message we cannot sign still goes out (unsigned), never lost; the log says why.
            log.exception("dkim.sign_failed", queue_id=queue_id)
            return []

    def _publish(self, event: Event) -> None:
        # The message is already durable (or already refused): a failing subscriber must not
        # turn that into a different answer to the client.
        try:
            self._bus.publish(event)
        except Exception:
            log.exception("ingest.publish_failed", event=event.type, queue_id=event.queue_id)
