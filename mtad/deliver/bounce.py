"""Build RFC 3464 delivery status notifications: the bounces and delay warnings mtad sends.

Pure. `wants_dsn` decides whether a recipient's failure or delay is reported (RFC 3461
NOTIFY); `build_dsn` writes the whole message, sent from <> to the envelope sender and
re-entering through ingest. The email package builds the structure (multipart/report,
message/delivery-status with its field blocks, header folding); the returned original is
spliced in as raw bytes afterwards, because re-serialising a parsed message alters it and
the stdlib's bytes generator cannot carry an 8-bit message/* body as text.

Content-Transfer-Encoding is honest: an 8-bit original (or an 8-bit human part under
SMTPUTF8) makes the DSN 8bit and its top-level header says so; `submission_flags` gives the
BODY and SMTPUTF8 parameters to send it with. A message that is SMTPUTF8, or names a non-ASCII
address, gets the RFC 6533 types (message/global-delivery-status, message/global,
message/global-headers) and "utf-8" address types. Otherwise every report field is ASCII
(other characters become "?"; the human part keeps them).

Trust: remote replies, addresses, ENVID/ORCPT and the original are other people's text: they
are reduced to one line and kept out of the MIME structure (the boundary carries a hash of
all of them, which none of them can contain), and the original is returned whole only when it
can be carried faithfully (at most `max_original` bytes, no NUL, no line over 998 octets);
otherwise only its header section is. The same input gives the same DSN. `build_dsn` never
raises: when the full build fails it falls back to an ASCII report without the original.
RFCs: 3464 (DSN format), 3461 4.1-4.4 (NOTIFY, RET, ENVID, ORCPT; 4 xtext), 6522 (multipart/
report), 3834 (Auto-Submitted), 6533 (internationalized DSNs), 2045 6.4 (CTE of multiparts),
5321 4.5.5 (DSNs go from the null sender), 3463 (status codes).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import Message, MIMEPart
from email.utils import format_datetime
from hashlib import blake2b
from textwrap import fill
from typing import Literal

import msgspec

from mtad.deliver.outcome import COMMANDS, Outcome, one_line
from mtad.records import Envelope, Recipient

Action = Literal["failed", "delayed", "relayed"]

MAX_ORIGINAL = 10 * 1024 * 1024
"""Largest original returned whole; a bigger one comes back as its header section only."""
MAX_HEADER_SECTION = 256 * 1024
"""Most of a header section returned (a longer one is cut at a line end)."""


class Failure(msgspec.Struct, frozen=True):
    """One recipient to report: its record, what happened, and who said so."""

    recipient: Recipient
    outcome: Outcome
    relay: str = ""
    """host[ip]:port that gave the reply ("" when local)."""


def wants_dsn(sender: str, recipient: Recipient, action: Action) -> bool:
    """Whether the sender gets a DSN for this recipient's failure or delay (RFC 3461 4.1).

    Never to the null sender (RFC 5321 4.5.5: no bounce of a bounce). NOTIFY=NEVER: no.
    NOTIFY given without FAILURE (or DELAY): no. No NOTIFY: yes to both; RFC 3461 leaves delay
    notices to the MTA, and the caller sends them only when delivery.delay_warning is set.
    """
    if not sender:
        return False
    words = {w.strip().upper() for w in recipient.notify.split(",") if w.strip()}
    if not words:
        return action != "relayed"  # success notices only on request
    if "NEVER" in words:
        return False
    return {"failed": "FAILURE", "delayed": "DELAY", "relayed": "SUCCESS"}[action] in words


def needs_smtputf8(envelope: Envelope, failures: list[Failure]) -> bool:
    """The DSN must travel as SMTPUTF8 with the RFC 6533 types: the original did, or an
    address it names is not ASCII."""
    if envelope.smtputf8 or not envelope.sender.isascii():
        return True
    return any(not f.recipient.address.isascii() or not xtext_decode(f.recipient.orcpt).isascii()
               for f in failures)


def submission_flags(envelope: Envelope, failures: list[Failure], dsn: bytes) -> tuple[str, bool]:
    """(body_type, smtputf8) for handing a built DSN to ingest: "8BITMIME" when any byte of
    it is 8-bit ("7BIT" otherwise), and whether it needs SMTPUTF8."""
    return ("7BIT" if dsn.isascii() else "8BITMIME"), needs_smtputf8(envelope, failures)


def xtext_decode(value: str) -> str:
    """RFC 3461 4 xtext: "+XX" is the byte XX; undecodable input comes back as given."""
    if "+" not in value:
        return value
    try:
        raw = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), value)
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeError, ValueError):
        return value


def build_dsn(
    *,
    envelope: Envelope,
    failures: list[Failure],
    action: Action,
    reporting_mta: str,
    original: bytes,
    now: float,
    expires_at: float | None = None,
    max_original: int = MAX_ORIGINAL,
) -> bytes:
    """The whole DSN (header section and body, CRLF line ends) to send from <> to the sender.

    `failures` are the recipients to report (one DSN may name several), `original` the
    message as spooled, `expires_at` until when a delayed recipient is retried.
    """
    host = _hostname(reporting_mta)
    utf8 = needs_smtputf8(envelope, failures)
    try:
        return _Builder(envelope, failures, action, host, now, expires_at, utf8).build(original, max_original)
    except Exception:  # noqa: BLE001 - odd input must not cost the sender their report
        return _Builder(envelope, failures, action, host, now, expires_at, False, safe=True).build(b"", 0)


class _Builder:
    """One DSN being built: the cleaned inputs, and the parts spliced in after generation."""

    def __init__(self, envelope: Envelope, failures: list[Failure], action: Action, host: str, now: float,
                 expires_at: float | None, utf8: bool, *, safe: bool = False) -> None:
        self.envelope, self.failures, self.action, self.host = envelope, failures, action, host
        self.now, self.expires_at, self.utf8, self.safe = now, expires_at, utf8, safe
        base = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP
        # refold_source="none": header values stored as plain text (the report fields) are
        # written as given; the header objects of the other headers fold themselves.
        self.policy = base.clone(cte_type="8bit", max_line_length=78, refold_source="none")
        self.token = ""
        self.splices: dict[bytes, bytes] = {}
        self.eight_bit = False

    def build(self, original: bytes, max_original: int) -> bytes:
        self.token = self._digest(original)
        if self.safe:
            attached, note = None, "Your message could not be attached."
        else:
            attached, note = self._original(original, max_original)
        top = Message(policy=self.policy)
        sender = self._text(self.envelope.sender)
        top["From"] = f"Mail Delivery System <MAILER-DAEMON@{self.host}>"
        top["To"] = f"<{sender}>"
        top["Subject"] = {"failed": "Undelivered Mail Returned to Sender",
                          "delayed": "Delayed Mail (still being retried)",
                          "relayed": "Successful Mail Delivery Report"}[self.action]
        top["Date"] = _date(self.now)
        top["Message-ID"] = f"<{self.envelope.id or 'dsn'}.{self.token[:8]}@{self.host}>"
        top["Auto-Submitted"] = "auto-replied"
        top["MIME-Version"] = "1.0"
        boundary = f"{self.envelope.id[:24]}.{self.token}/{self.host[:24]}"
        top.add_header("Content-Type", "multipart/report", report_type="delivery-status", boundary=boundary)
        top.attach(self._human(note, attached is not None and attached[0] in _FULL_TYPES))
        top.attach(self._report())
        if attached is not None:
            top.attach(attached[1])
        if self.eight_bit:
            top["Content-Transfer-Encoding"] = "8bit"
        out = top.as_bytes(policy=self.policy)
        for placeholder, data in self.splices.items():
            out = out.replace(placeholder, data, 1)
        return out

    # -- part 1: the human-readable explanation --------------------------------------------
    def _human(self, note: str, full: bool) -> MIMEPart:
        lines = [f"This is the mail system at host {self.host}.", ""]
        returned = "your message" if full else "the header section of your message"
        if self.action == "failed":
            lines += ["Your message could not be delivered to one or more of its recipients.",
                      f"The reasons are given below; a delivery report and {returned} are attached.", ""]
        elif self.action == "relayed":
            lines += ["Your message was passed on to the recipients' mail system below, which does not",
                      "send delivery notifications itself; this is the last notice you will get for them.", ""]
        else:
            waited = _duration(self.now - self.envelope.arrival_time)
            lines += ["This is a warning only: you do not need to send your message again.", "",
                      f"After {waited}, your message has not yet reached the recipients below.",
                      "The mail system keeps trying"
                      + (f" until {_date(self.expires_at)}." if self.expires_at is not None else "."), ""]
        if note:
            lines += [fill(note, 78), ""]
        for failure in self.failures:
            lines += [fill(self._explain(failure), 78, subsequent_indent="    ", break_long_words=False,
                           break_on_hyphens=False), ""]
        text = "\n".join(lines)
        part = MIMEPart(policy=self.policy)
        if text.isascii():
            cte = "7bit"
        elif self.eight_bit or self.utf8:
            cte = "8bit"
            self.eight_bit = True
        else:
            cte = "quoted-printable"  # keep a DSN that carries no 8-bit original 7bit
        part.set_content(text, charset="utf-8", cte=cte)
        part["Content-Description"] = "Notification"
        return part

    def _explain(self, failure: Failure) -> str:
        outcome = failure.outcome
        who = f"<{self._text(failure.recipient.address)}>"
        reply = self._text(outcome.reply) or "no reason given"
        if not outcome.remote:
            return f"{who}: {reply}"
        said = f"host {self._text(failure.relay)} said" if failure.relay else "the remote server said"
        command = COMMANDS.get(outcome.phase)
        return f"{who}: {said}: {reply}" + (f" (in reply to {command} command)" if command else "")

    # -- part 2: the machine-readable report ----------------------------------------------
    def _report(self) -> Message:
        blocks = [self._per_message()] + [self._per_recipient(f) for f in self.failures]
        part = Message(policy=self.policy)
        if not self.utf8:
            part["Content-Type"] = "message/delivery-status"
            part["Content-Description"] = "Delivery report"
            for block in blocks:
                part.attach(block)  # the stdlib writes a delivery-status part's blocks itself
            return part
        # message/global-delivery-status: the same blocks, but UTF-8, which the bytes
        # generator writes for headers only; render them so and splice the text in.
        part["Content-Type"] = "message/global-delivery-status"
        part["Content-Description"] = "Delivery report"
        part["Content-Transfer-Encoding"] = "8bit"
        rendered = b"".join(block.as_bytes(policy=self.policy) for block in blocks).rstrip(b"\r\n") + b"\r\n"
        part.set_payload(self._splice(rendered))
        self.eight_bit = self.eight_bit or not rendered.isascii()
        return part

    def _per_message(self) -> Message:
        block = self._block()
        _put(block, "Reporting-MTA", f"dns; {self.host}")
        _put(block, "X-Mtad-Queue-ID", self._field(self.envelope.id))
        if self.envelope.envid:
            _put(block, "Original-Envelope-Id", self._field(xtext_decode(self.envelope.envid)))
        _put(block, "Arrival-Date", _date(self.envelope.arrival_time))
        return block

    def _per_recipient(self, failure: Failure) -> Message:
        rcpt, outcome = failure.recipient, failure.outcome
        block = self._block()
        kind, sep, orcpt = rcpt.orcpt.partition(";")
        if sep and orcpt.strip():
            _put(block, "Original-Recipient", self._field(f"{kind.strip() or 'rfc822'};{xtext_decode(orcpt.strip())}"))
        address = self._field(rcpt.address)
        _put(block, "Final-Recipient", f"{'rfc822' if address.isascii() else 'utf-8'}; {address}")
        _put(block, "Action", self.action)
        _put(block, "Status", _status(outcome.status, self.action))
        host = _relay_host(failure.relay)
        if host and outcome.remote:
            _put(block, "Remote-MTA", f"dns; {self._field(host)}")
        if outcome.reply:
            _put(block, "Diagnostic-Code", f"{'smtp' if outcome.remote else 'X-mtad'}; {self._field(outcome.reply)}")
        tried = rcpt.history[-1].time if rcpt.history else self.now
        _put(block, "Last-Attempt-Date", _date(tried))
        if self.action == "delayed" and self.expires_at is not None:
            _put(block, "Will-Retry-Until", _date(self.expires_at))
        return block

    def _block(self) -> Message:
        # compat32 stores field values as plain text. The default policy would parse them as
        # headers: decode any "=?...?=" a remote reply contains, and fold a long word (a URL)
        # into encoded words. Report fields are text, neither (RFC 3464 2.1.2).
        return Message(policy=email_policy.compat32)

    # -- part 3: the original, whole or its header section ---------------------------------
    def _original(self, original: bytes, max_original: int) -> tuple[tuple[str, Message] | None, str]:
        if not original:
            return None, ""
        data = _crlf(bytes(original))
        note = ""
        full = self.action == "failed" and self.envelope.ret.upper() != "HDRS"
        if full and len(data) > max_original:
            full, note = False, (f"Your message was too large to return whole ({len(data)} bytes); "
                                 "only its header section is attached.")
        elif full and not _carriable(data):
            full, note = False, ("Your message could not be returned whole (it has a NUL byte or a line "
                                 "longer than 998 bytes); only its header section is attached.")
        if not full:
            data = _header_section(data)
            if not data or not _carriable(data):
                return None, "Your message could not be attached."
        eight = not data.isascii()
        if full:
            ctype = "message/global" if self.utf8 else "message/rfc822"
            description = "Undelivered Message"
        else:
            ctype = "message/global-headers" if self.utf8 else "text/rfc822-headers"
            description = "Undelivered Message Headers"
        part = Message(policy=self.policy)
        part["Content-Type"] = ctype
        part["Content-Description"] = description
        if eight:
            part["Content-Transfer-Encoding"] = "8bit"
            self.eight_bit = True
        part.set_payload(self._splice(data))
        return (ctype, part), note

    # -- helpers -------------------------------------------------------------------------
    def _digest(self, original: bytes) -> str:
        """The token in the boundary, the splice markers and the Message-ID: a hash of
        everything the DSN carries. Nobody can put it in a reply or the original ahead of
        time (it depends on them), and the same input gives the same DSN."""
        h = blake2b(digest_size=12)
        for f in self.failures:
            h.update(repr((f.recipient.address, f.outcome.reply, f.outcome.status, f.relay)).encode("utf-8", "replace"))
        h.update(repr((self.envelope.id, self.envelope.sender, self.action, self.now, self.host)).encode("utf-8", "replace"))
        h.update(original)
        return h.hexdigest()

    def _splice(self, data: bytes) -> str:
        placeholder = f"mtad-splice-{self.token}-{len(self.splices)}"
        # The generator ends the part with CRLF before the boundary: that is the last line's.
        self.splices[placeholder.encode("ascii")] = data.removesuffix(b"\r\n")
        return placeholder

    def _text(self, value: str) -> str:
        """Other people's text for the human part: one line, ASCII when safe mode says so."""
        text = one_line(value)
        return _ascii(text) if self.safe else text

    def _field(self, value: str) -> str:
        """A report field value: one line; ASCII unless the report is UTF-8 (RFC 6533)."""
        text = one_line(value)
        return text if self.utf8 else _ascii(text)


_FULL_TYPES = ("message/rfc822", "message/global")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_HOST_JUNK = re.compile(r"[^A-Za-z0-9.\-]")
# RFC 5322 2.2: a field is a name of printable ASCII but the colon, a colon, and a value with
# its folded continuation lines, each CRLF-ended. Linear: no nested repetition can backtrack.
_FIELDS = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")


def _put(block: Message, name: str, value: str) -> None:
    """Set a report field, folded at spaces to 78 columns where it can be (RFC 5322 2.2.3:
    a fold is a CRLF put before existing whitespace, so unfolding gives the value back)."""
    words = value.split(" ")
    pieces = [words[0]]
    column = len(name) + 2 + len(words[0])
    for word in words[1:]:
        if column + 1 + len(word) > 78 and word:
            pieces.append("\r\n " + word)
            column = 1 + len(word)
        else:
            pieces.append(" " + word)
            column += 1 + len(word)
    block[name] = "".join(pieces)


def _status(status: str, action: Action) -> str:
    """A valid status for the action: delayed is always class 4; failed keeps 4 (an expiry,
    as Postfix reports it) or 5; anything unreadable becomes X.0.0."""
    if action == "relayed":
        return status if _STATUS.match(status) and status[0] == "2" else "2.0.0"
    if not _STATUS.match(status):
        return "4.0.0" if action == "delayed" else "5.0.0"
    if action == "delayed":
        return "4" + status[1:]
    return status if status[0] in "45" else "5.0.0"


def _relay_host(relay: str) -> str:
    """The name in "host[ip]:port" ("host:port", "host"), or "[ip]" when there is no name."""
    name, bracket, rest = relay.strip().partition("[")
    if name:
        return name if bracket or name.count(":") != 1 else name.partition(":")[0]
    return "[" + rest.partition("]")[0] + "]" if rest else ""


def _hostname(name: str) -> str:
    cleaned = _HOST_JUNK.sub("", name.strip())[:255]
    return cleaned or "localhost"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _date(when: float | None) -> str:
    """RFC 5322 date-time in UTC ("+0000"); out-of-range times are pinned to the epoch."""
    try:
        return format_datetime(datetime.fromtimestamp(float(when or 0.0), tz=UTC))
    except (OverflowError, OSError, ValueError):
        return format_datetime(datetime.fromtimestamp(0, tz=UTC))


def _duration(elapsed: float) -> str:
    seconds = int(elapsed) if math.isfinite(elapsed) and elapsed > 0 else 0
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"


def _crlf(data: bytes) -> bytes:
    """Every line end as CRLF (RFC 5322 2.3; 8bit MIME allows CR and LF only as a pair)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _carriable(data: bytes) -> bool:
    """Can travel as 7bit/8bit MIME over SMTP: no NUL, no line over 998 octets (RFC 5321
    4.5.3.1.6). `data` has CRLF line ends, so a split line keeps its CR: at most 999."""
    return b"\x00" not in data and max(map(len, data.split(b"\n"))) <= 999


def _header_section(data: bytes) -> bytes:
    """The original's header section: its fields up to the blank line, or up to the first
    line that is not a field (a broken message's body starts there, as readers see it)."""
    found = _FIELDS.match(data, 0, MAX_HEADER_SECTION + 1)
    return data[: found.end()] if found else b""
