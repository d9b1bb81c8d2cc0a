"""How mtactl prints: mailq-style queue listings, message details, stats, and JSON lines.

Pure: functions from adminapi Structs to text. Times are shown in local time, like mailq.
Trust: header values, message ids and replies come from strangers; control characters in
them (ESC, BEL, backspace, ...) are printed as `\\xNN`, never sent to the operator's terminal.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Iterator

import msgspec

from mtad.http.adminapi import (
    DestinationRow,
    MessageDetail,
    QueueEntry,
    RecipientView,
    Stats,
)

_ID_WIDTH = 22
_HEADER = f"{'-Queue ID-':<{_ID_WIDTH + 1}} --Size-- ----Arrival Time---- -Sender/Recipient-------"
_INDENT = " " * (_ID_WIDTH + 1 + 1 + 8 + 1 + 20 + 1)

_encoder = msgspec.json.Encoder()

# C0 controls but TAB, DEL, C1 controls: what a terminal would act on rather than print.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0))}


def printable(line: str) -> str:
    """LINE with every terminal control character written out as `\\xNN`."""
    return line.translate(_CONTROLS)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json` after the command; SUPPRESS keeps a `--json` given before it."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one JSON object per line",
    )


def json_line(value: object) -> str:
    return _encoder.encode(value).decode()


def queue_listing(entries: Iterable[QueueEntry]) -> Iterator[str]:
    """mailq-style lines, as the entries arrive; a final `-- N Kbytes in M Requests.` line.

    Status marks after the queue id, as in Postfix: `!` held, `*` being delivered now.
    """
    count = 0
    total = 0
    for entry in entries:
        if count == 0:
            yield _HEADER
        count += 1
        total += entry.size
        yield from map(printable, _entry_lines(entry))
    if count == 0:
        yield "Mail queue is empty"
    else:
        yield f"-- {math.ceil(total / 1024)} Kbytes in {count} Requests."


def _entry_lines(entry: QueueEntry) -> Iterator[str]:
    mark = "!" if entry.held else "*" if any(r.state == "active" for r in entry.recipients) else " "
    arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(entry.arrival_time))
    yield f"{entry.id:<{_ID_WIDTH}}{mark} {entry.size:>8} {arrival:<20} {_sender(entry.sender)}"
    for recipient in entry.recipients:
        yield f"{_INDENT}{recipient.address}  {_recipient_state(recipient)}"
        if recipient.last_reply:
            yield f"{_INDENT}  ({recipient.last_reply})"
    yield ""


def _sender(sender: str) -> str:
    return sender or "MAILER-DAEMON"


def _recipient_state(recipient: RecipientView) -> str:
    parts: list[str] = [recipient.state]
    if recipient.attempts:
        parts.append(f"{recipient.attempts} attempt{'s' if recipient.attempts != 1 else ''}")
    if recipient.next_attempt and recipient.state in ("deferred", "scheduled"):
        parts.append(f"next {_when(recipient.next_attempt)}")
    return "[" + ", ".join(parts) + "]"


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(unix))


def message_details(detail: MessageDetail) -> Iterator[str]:
    """`queue show`: envelope, per-recipient state, then the header block."""
    return map(printable, _detail_lines(detail))


def _detail_lines(detail: MessageDetail) -> Iterator[str]:
    fields = [
        ("queue id", detail.id),
        ("message-id", detail.message_id or "(none)"),
        ("sender", f"<{detail.sender}>"),
        ("size", f"{detail.size} bytes"),
        ("arrival", f"{_when(detail.arrival_time)} ({int(detail.arrival_time)})"),  # same second as _when
        ("held", "yes" if detail.held else "no"),
        ("client", _joined(detail.client_address, detail.client_helo and f"helo={detail.client_helo}")),
        (
            "received",
            _joined(
                detail.listener and f"via {detail.listener}",
                detail.protocol,
                detail.body_type and f"body={detail.body_type}",
                "smtputf8" if detail.smtputf8 else "",
            ),
        ),
        ("tenant", detail.tenant),
        ("dsn", _joined(detail.ret and f"ret={detail.ret}", detail.envid and f"envid={detail.envid}")),
    ]
    for name, value in fields:
        if value:
            yield f"{name + ':':<12}{value}"
    yield f"recipients: {len(detail.recipients)}"
    for recipient in detail.recipients:
        yield f"  {recipient.address}  {_recipient_state(recipient)}"
        if recipient.last_reply:
            yield f"    last reply: {recipient.last_reply}"
        for past in detail.history:
            if past.address == recipient.address:
                for attempt in past.attempts:
                    via = f" via {attempt.relay}" if attempt.relay else ""
                    yield f"    attempt {_when(attempt.time)}{via}: {attempt.reply}"
    yield "headers:"
    for header in detail.headers:
        yield f"  {header.name}: {header.value}"
    if detail.headers_truncated:
        yield "  (header block truncated)"


def _joined(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def stats_lines(stats: Stats) -> Iterator[str]:
    for name in ("received", "delivered", "deferred", "bounced", "expired", "rejected", "queued_now"):
        yield f"{name:<12}{getattr(stats, name)}"
    yield f"{'uptime':<12}{duration(stats.uptime)}"


def duration(seconds: float) -> str:
    """1d 2h 3m 4s, leading zero units left out."""
    remaining = int(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        value, remaining = divmod(remaining, size)
        if value or parts:
            parts.append(f"{value}{unit}")
    parts.append(f"{remaining}s")
    return " ".join(parts)


def summary_lines(rows: list[DestinationRow], now: float | None = None) -> Iterator[str]:
    """`queue summary`: one line per destination, busiest first."""
    now = time.time() if now is None else now
    yield f"{'DESTINATION':<32} {'QUEUED':>7} {'DEFERRED':>8} {'CONNS':>5} {'WINDOW':>6} {'OLDEST':>8}  STATUS"
    for row in rows:
        age = duration(max(0.0, now - row.oldest)) if row.oldest else "-"
        status = f"suspended until {_when(row.suspended_until)}" if row.suspended_until else ""
        if row.last_error:
            status = _joined(status, ("last error: " if status else "") + row.last_error)
        window = str(row.window) if row.window else "-"
        yield printable(f"{row.destination:<32} {row.queued:>7} {row.deferred:>8} {row.active:>5} {window:>6} "
                        f"{age:>8}  {status}")
    if not rows:
        yield "(queue is empty)"
