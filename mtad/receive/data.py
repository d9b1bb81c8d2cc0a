"""Message data after DATA: reading it in chunks, the checks it must pass, our Received header.

Pure: functions and a parser on bytes. The session's reader (reading.py) hands DATA over in
chunks as they arrive; `DataParser` keeps only complete lines (a line ends only at CRLF, so a
bare `<LF>.<LF>` or `<CR>.<CR>` inside the data never ends it), undoes dot-stuffing, enforces
the line and size limits, rewrites a bare CR or LF as CRLF (so what we store can never be split
into two messages by a later hop) and notes the header facts the checks need, chunk by chunk:
a message of tens of MB costs the event loop a little per chunk and nothing big after the final
dot, and it is held once, in one bytearray. `check_message` then decides: bare newlines
refused (when so configured), 8-bit header text needs SMTPUTF8, too many Received fields means
a loop.

Trust: the data is the client's and hostile; memory is bounded by the size limit (past it, or
past a line limit, nothing more is kept); only the header section is inspected.
RFCs: 5321 4.1.4 and 2.3.8 (CRLF only; bare CR/LF), 4.1.1.4 (the final dot), 4.5.2
(transparency), 4.4 (Received), 4.5.3.1.6 (line length), 1870 (size counts unstuffed octets),
6531 3.7.3-3.7.4 (Received WITH UTF8SMTP), 3848 (ESMTPS), 6532 3.2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mtad import reply
from mtad.ingest import header_section_end
from mtad.reply import Reply

_NEWLINES = re.compile(rb"\r\n|\r|\n")
# The header section line by line: a field's first line or a folded continuation line. Matched
# on CRLF-only text that starts with a field line, this ends where ingest's header_section_end
# does, and it can be applied to consecutive runs of whole lines one after the other.
_HEADER_LINES = re.compile(rb"(?:[!-9;-~]++[ \t]*+:[^\r\n]*+\r\n|[ \t][^\r\n]*+\r\n)*+")


@dataclass(frozen=True, slots=True)
class DataResult:
    """What the session read between DATA and the final dot."""

    body: bytes | bytearray
    """Dot-unstuffed lines joined (empty when the message was too big or a line too long)."""
    size: int
    """Octets of the message (unstuffed; once refused, as sent), whether kept or not."""
    too_big: bool = False
    line_too_long: bool = False
    bare_newline: bool | None = None
    """A bare CR or LF was found (and `body` already has CRLF instead); None: not looked for."""
    header_end: int = -1
    """Offset just past the header section of `body`; -1: not looked for (nor the next two)."""
    header_ascii: bool = True
    received_count: int = 0


class DataParser:
    """DATA fed in chunks as they arrive; `result()` once the reader has seen the final dot.

    Everything fed is data: the reader strips the terminating `.<CRLF>` line, which `ends`
    recognises. A partial last line is carried over to the next chunk, so every run of lines
    processed starts at a line start and the dot-stuffing, line-length, newline and header
    checks never see a line cut in two.
    """

    def __init__(self, *, max_size: int, max_line: int) -> None:
        self._max_size = max_size
        self._max_line = max_line
        self._body = bytearray()
        self._carry = b""
        self._tail = b"\r\n"  # the last two octets fed; DATA starts at a line start
        self._refused = False
        self.size = 0
        self.too_big = False
        self.line_too_long = False
        self.bare_newline = False
        self.header_end = -1
        self.header_ascii = True
        self.received_count = 0

    def ends(self, chunk: bytes) -> bool:
        """Whether `chunk`, which ends with `.<CRLF>`, ends DATA: its dot starts a line."""
        before = chunk[-5:-3] if len(chunk) >= 5 else (self._tail + chunk[:-3])[-2:]
        return before == b"\r\n"

    def feed(self, data: bytes) -> None:
        """Take the next octets of DATA (never the final `.<CRLF>`)."""
        if not data:
            return
        self._tail = data[-2:] if len(data) >= 2 else self._tail[-1:] + data
        if self._refused:
            self.size += len(data)  # counted, not kept: the refusal waits for the final dot
            return
        pending = self._carry + data if self._carry else data
        last = pending.rfind(b"\r\n")
        if last >= 0:
            carry = pending[last + 2:]
            self._lines(pending[:last + 2])
            if self._refused:
                self.size += len(carry)  # refused inside the run: what follows is only counted
                return
            self._carry = carry
        else:
            self._carry = pending
        if len(self._carry) > self._max_line and not self._refused:
            # However it ends, this line is already longer than the limit (the CRLF it
            # lacks outweighs a stuffed dot it may start with).
            self._refuse(len(self._carry), too_long=True)

    def result(self) -> DataResult:
        """The message, once the final dot was seen (any partial line was followed by CRLF)."""
        body = self._body
        end = len(body) if self.header_end < 0 else self.header_end
        too_big = self.too_big or self.size > self._max_size
        return DataResult(body, self.size, too_big=too_big, line_too_long=self.line_too_long,
                          bare_newline=self.bare_newline, header_end=end,
                          header_ascii=self.header_ascii, received_count=self.received_count)

    def _lines(self, run: bytes) -> None:
        """Complete lines: `run` starts at a line start and ends with CRLF."""
        lines = run.split(b"\r\n")
        crlf = len(lines) - 1
        if max(map(len, lines)) + 2 > self._max_line and any(
                len(line) + 2 - line.startswith(b".") > self._max_line for line in lines):
            self._refuse(len(run), too_long=True)  # RFC 5321 4.5.3.1.6; the dot is not counted
            return
        del lines
        text = run.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2; unchanged (same object) if none
        if text[:1] == b".":
            text = text[1:]
        self.size += len(text)
        if self.size > self._max_size:
            self._refuse(0, too_long=False)
            return
        if run.count(b"\r") != crlf or run.count(b"\n") != crlf:
            self.bare_newline = True
            text = normalize_newlines(text)  # runs end at CRLF: per run is the same as whole
        if self.header_end < 0:
            self._header(text)
        self._body += text

    def _header(self, text: bytes) -> None:
        """Follow the header section across runs of lines: where it ends, 8-bit, Received."""
        if not self._body and text[:1] in (b" ", b"\t"):
            end = 0  # a header section starts with a field, not a continuation line
        else:
            match = _HEADER_LINES.match(text)
            end = match.end() if match else 0
        section = text if end == len(text) else text[:end]
        self.header_ascii = self.header_ascii and section.isascii()
        self.received_count += count_received(section)  # runs start at line starts
        if end < len(text):
            self.header_end = len(self._body) + end

    def _refuse(self, unseen: int, *, too_long: bool) -> None:
        self._refused = True
        self.size += unseen
        if too_long:
            self.line_too_long = True
        else:
            self.too_big = True
        self._body = bytearray()  # give the memory back now, not after the final dot
        self._carry = b""


def has_bare_newline(body: bytes | bytearray) -> bool:
    """True when a CR or LF appears other than as part of CRLF."""
    crlf = body.count(b"\r\n")
    return body.count(b"\r") != crlf or body.count(b"\n") != crlf


def normalize_newlines(body: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF."""
    return _NEWLINES.sub(b"\r\n", body)


def count_received(section: bytes | bytearray) -> int:
    """Received fields in a header section (folded continuation lines do not count)."""
    lowered = section.lower()
    return lowered.count(b"\nreceived:") + lowered.startswith(b"received:")


def check_message(result: DataResult, *, smtputf8: bool, max_received: int,
                  bare_newline: Literal["normalize", "reject"]) -> bytes | bytearray | Reply:
    """The body to store, or the reply that refuses it (sent after the final dot)."""
    if result.too_big:
        return reply.MESSAGE_TOO_BIG
    if result.line_too_long:
        return reply.LINE_TOO_LONG
    body = result.body
    if result.header_end >= 0:  # read by DataParser: the facts are known, nothing to scan
        if result.bare_newline and bare_newline == "reject":
            return reply.BARE_NEWLINE
        ascii_header, received = result.header_ascii, result.received_count
    else:
        if has_bare_newline(body):
            if bare_newline == "reject":
                return reply.BARE_NEWLINE
            body = normalize_newlines(bytes(body))
        section = body[:header_section_end(body)]
        ascii_header, received = section.isascii(), count_received(section)
    if not smtputf8 and not ascii_header:
        return reply.EIGHT_BIT_HEADERS
    if received > max_received:
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
