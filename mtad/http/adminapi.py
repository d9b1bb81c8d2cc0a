"""The admin control API's vocabulary: routes and body types shared by the server and mtactl.

Pure: no I/O, no aiohttp (mtactl imports this and must start fast). Every body the admin API
sends is one of these msgspec Structs, encoded as JSON; `GET /admin/v1/queue` streams one
`QueueEntry` per line. The API is versioned by path prefix: a change that breaks a client gets a
new prefix, and the old one keeps working.

Trust: message headers shown by `message_detail` come from the sender and are hostile; they are
decoded with replacement and only displayed, never interpreted.
RFCs: 5322 section 2.2 (header fields, unfolding) for `parse_headers`.
"""

from __future__ import annotations

import email.parser
import email.policy
import re

import msgspec

from mtad.records import QueuedMessage, RecipientStateName

PREFIX = "/admin/v1"
QUEUE = f"{PREFIX}/queue"
STATS = f"{PREFIX}/stats"
DKIM_RELOAD = f"{PREFIX}/dkim/reload"
FLUSH = f"{QUEUE}/flush"
SUMMARY = f"{QUEUE}/summary"

# Queue actions that apply to one message (`POST /queue/{id}/{action}`) or to every message
# (`POST /queue/{action}-all`); `delete` is also `DELETE /queue/{id}`.
ACTIONS = ("hold", "release", "delete")

# Queue ids are 22 lowercase hex digits (records.new_queue_id); we accept a little more so an
# older or newer id scheme still reaches the spool, and refuse anything that is not an id.
_QUEUE_ID = re.compile(r"[0-9a-f]{8,64}")

# Only the header block is parsed; a header block larger than this is cut (and says so).
MAX_HEADER_BYTES = 256 * 1024


class AttemptView(msgspec.Struct, kw_only=True):
    time: float
    reply: str
    relay: str = ""


class RecipientView(msgspec.Struct, kw_only=True):
    address: str
    state: RecipientStateName
    attempts: int
    next_attempt: float
    last_reply: str


class RecipientHistory(msgspec.Struct, kw_only=True):
    """The latest delivery attempts of one recipient (`queue show`)."""

    address: str
    attempts: list[AttemptView]


class DestinationRow(msgspec.Struct, kw_only=True):
    """One destination in `mtactl queue summary --json`."""

    destination: str
    queued: int
    deferred: int
    active: int
    oldest: float
    """Arrival time (unix s) of its oldest message; 0 when none is queued."""
    last_error: str
    suspended_until: float
    """Unix time the destination rests until; 0 when it is not suspended."""
    window: int = 0
    """Connections the destination may have open now (its concurrency window); 0: not seen yet."""


class QueueEntry(msgspec.Struct, kw_only=True):
    """One queued message as `mtactl queue list --json` prints it (the CONTRACT fields + held)."""

    id: str
    message_id: str
    sender: str
    size: int
    arrival_time: float
    held: bool = False
    recipients: list[RecipientView]


class Header(msgspec.Struct, array_like=True):
    """One header field of a message body: [name, value], value unfolded."""

    name: str
    value: str


class MessageDetail(QueueEntry, kw_only=True):
    """One queued message as `queue show` prints it: envelope, recipients and headers."""

    client_address: str = ""
    client_helo: str = ""
    listener: str = ""
    tenant: str = ""
    """The tenant that submitted the message (SMTP AUTH, HTTP API); "" for mail taken on mx."""
    protocol: str = ""
    smtputf8: bool = False
    body_type: str = ""
    ret: str = ""
    envid: str = ""
    headers: list[Header] = []
    headers_truncated: bool = False
    history: list[RecipientHistory] = []
    """Per recipient, its latest attempts, oldest first."""


class QueueActionResult(msgspec.Struct, kw_only=True):
    """The answer to hold/release/delete: which action, and how many messages it changed."""

    action: str
    count: int


class DkimReloaded(msgspec.Struct, kw_only=True):
    """`POST /admin/v1/dkim/reload`: the signing keys now loaded, and the key files skipped."""

    domains: int
    keys: int
    problems: list[str] = []


class Stats(msgspec.Struct, kw_only=True):
    """Counters since start (`mtactl stats`); uptime in seconds."""

    received: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    rejected: int
    queued_now: int
    uptime: float


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """Every error the admin (and public) API sends: {"error": {"code", "message"}}."""

    error: ErrorDetail


def is_queue_id(text: str) -> bool:
    return _QUEUE_ID.fullmatch(text) is not None


def queue_entry(message: QueuedMessage, active: frozenset[int] = frozenset()) -> QueueEntry:
    """The listing entry of a message; `active`: indexes of recipients being delivered now."""
    env = message.envelope
    return QueueEntry(
        id=env.id,
        message_id=env.message_id,
        sender=env.sender,
        size=env.size,
        arrival_time=env.arrival_time,
        held=env.held,
        recipients=[
            RecipientView(
                address=r.address,
                state="active" if i in active else r.state,
                attempts=r.attempts,
                next_attempt=r.next_attempt,
                last_reply=r.last_reply,
            )
            for i, r in enumerate(message.recipients)
        ],
    )


def message_detail(message: QueuedMessage, body: bytes, active: frozenset[int] = frozenset()) -> MessageDetail:
    entry = queue_entry(message, active)
    env = message.envelope
    headers, truncated = parse_headers(body)
    return MessageDetail(
        **msgspec.structs.asdict(entry),
        client_address=env.client_address,
        client_helo=env.client_helo,
        listener=env.listener,
        tenant=env.tenant,
        protocol=env.protocol,
        smtputf8=env.smtputf8,
        body_type=env.body_type,
        ret=env.ret,
        envid=env.envid,
        headers=headers,
        headers_truncated=truncated,
        history=[
            RecipientHistory(address=r.address,
                             attempts=[AttemptView(time=a.time, reply=a.reply, relay=a.relay) for a in r.history])
            for r in message.recipients if r.history
        ],
    )


def header_block(body: bytes) -> tuple[bytes, bool]:
    """The header block of a message (up to the first empty line) and whether it was cut."""
    block = body[:MAX_HEADER_BYTES]
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = block.find(separator)
        if end >= 0:
            return block[: end + len(separator) // 2], False
    return block, len(body) > MAX_HEADER_BYTES


def parse_headers(body: bytes) -> tuple[list[Header], bool]:
    """Header fields of a message, in order, values unfolded; raw 8-bit bytes decoded as UTF-8.

    Encoded words (RFC 2047) are left as they are: the operator sees what was sent.
    """
    block, truncated = header_block(body)
    # Decoded by hand so UTF-8 (RFC 6532) survives; other bytes become surrogate escapes.
    text = block.decode("utf-8", "surrogateescape")
    parsed = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text)
    headers = []
    for name, value in parsed.raw_items():
        headers.append(Header(_display(name), _display(_unfold(str(value)))))
    return headers, truncated


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value).strip()


def _display(text: str) -> str:
    # The parser keeps undecodable bytes as surrogate escapes, which JSON cannot carry.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
