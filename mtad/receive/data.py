"""Message data after DATA: the checks it must pass and the Received header we put on top.

Pure: functions on bytes. The session reads DATA line by line (a line ends only at CRLF, so a
bare `<LF>.<LF>` or `<CR>.<CR>` inside the data never ends it) and hands over the
dot-unstuffed lines; `check_message` then decides: a bare CR or LF left inside those lines is
rewritten as CRLF or refused, so what we store can never be split into two messages by a later
hop; 8-bit header text needs SMTPUTF8; too many Received fields means a loop.

Trust: the data is the client's and hostile; only the header section is inspected.
RFCs: 5321 4.1.4 and 2.3.8 (CRLF only; bare CR/LF), 4.5.2 (transparency), 4.4 (Received),
4.5.3.1.6 (line length), 6531 3.7.3-3.7.4 (Received WITH UTF8SMTP), 3848 (ESMTPS), 6532 3.2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mtad import reply
from mtad.ingest import header_section_end
from mtad.reply import Reply

_NEWLINES = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class DataResult:
    """What the session read between DATA and the final dot."""

    body: bytes
    """Dot-unstuffed lines joined (empty when the message was too big or a line too long)."""
    size: int
    """Bytes the client sent, whether kept or not."""
    too_big: bool = False
    line_too_long: bool = False


def has_bare_newline(body: bytes) -> bool:
    """True when a CR or LF appears other than as part of CRLF."""
    crlf = body.count(b"\r\n")
    return body.count(b"\r") != crlf or body.count(b"\n") != crlf


def normalize_newlines(body: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF."""
    return _NEWLINES.sub(b"\r\n", body)


def count_received(section: bytes) -> int:
    """Received fields in a header section (folded continuation lines do not count)."""
    lowered = section.lower()
    return lowered.count(b"\nreceived:") + lowered.startswith(b"received:")


def check_message(result: DataResult, *, smtputf8: bool, max_received: int,
                  bare_newline: Literal["normalize", "reject"]) -> bytes | Reply:
    """The body to store, or the reply that refuses it (sent after the final dot)."""
    if result.too_big:
        return reply.MESSAGE_TOO_BIG
    if result.line_too_long:
        return reply.LINE_TOO_LONG
    body = result.body
    if has_bare_newline(body):
        if bare_newline == "reject":
            return reply.BARE_NEWLINE
        body = normalize_newlines(body)
    section = body[:header_section_end(body)]
    if not smtputf8 and not section.isascii():
        return reply.EIGHT_BIT_HEADERS
    if count_received(section) > max_received:
        return reply.MAIL_LOOP
    return body


def protocol_name(*, esmtp: bool, tls: bool, smtputf8: bool) -> str:
    """The WITH keyword of our Received header (RFC 3848, RFC 6531 3.7.3)."""
    if not esmtp:
        return "SMTP"
    name = "UTF8SMTP" if smtputf8 else "ESMTP"
    return name + ("S" if tls else "")


def address_literal(ip: str) -> str:
    """An IP in RFC 5321 4.1.3 address-literal form: `[192.0.2.1]`, `[IPv6:2001:db8::1]`."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def received_header(*, helo: str, ip: str, hostname: str, protocol: str, queue_id: str,
                    recipient: str | None, date: str) -> bytes:
    """Our Received field (RFC 5321 4.4), CRLF-terminated.

    No reverse DNS lookup on the hot path: the client is named by its HELO and its IP, and
    the TCP-info says `unknown`. `for <rcpt>` appears only with exactly one recipient, so a
    message to many does not disclose its other recipients.
    """
    lines = (f"Received: from {helo} (unknown {address_literal(ip)})\r\n"
             f"\tby {hostname} (mtad) with {protocol} id {queue_id}")
    if recipient is not None:
        lines += f"\r\n\tfor <{recipient}>; {date}\r\n"
    else:
        lines += f";\r\n\t{date}\r\n"
    return lines.encode("utf-8")
