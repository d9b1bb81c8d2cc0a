"""Spool records: what a queued message is, as msgspec Structs shared by spool, ingest and mtactl.

Pure: no I/O. The spool encodes these with msgspec msgpack; the admin API sends them as JSON.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Literal

import msgspec

# The states a recipient can be in while its message is queued. Delivery adds transitions
# between them; a recipient that is delivered, bounced or expired leaves the queue.
RecipientStateName = Literal["queued", "deferred", "held", "scheduled", "active"]


class Attempt(msgspec.Struct, kw_only=True):
    """One delivery attempt of one recipient, for `mtactl queue show`."""

    time: float
    reply: str
    """The remote reply or local error, as one line."""
    relay: str = ""
    """host[ip]:port of the server that answered, when one did."""


MAX_HISTORY = 10
"""Attempts remembered per recipient (the latest)."""


class Recipient(msgspec.Struct, kw_only=True):
    """One recipient of a queued message and where its delivery stands."""

    address: str
    state: RecipientStateName = "queued"
    attempts: int = 0
    next_attempt: float = 0.0
    """Unix time of the next attempt; 0 means as soon as possible."""
    last_reply: str = ""
    """The last remote reply or local error, as one line ("450 4.2.0 mailbox busy")."""
    orcpt: str = ""
    """RFC 3461 ORCPT, as given (addr-type;xtext)."""
    notify: str = ""
    """RFC 3461 NOTIFY, as given (NEVER or SUCCESS,FAILURE,DELAY)."""
    warned: bool = False
    """A "delayed" DSN has gone to the sender for this recipient."""
    history: list[Attempt] = []
    """The latest attempts, oldest first (at most MAX_HISTORY)."""


class Envelope(msgspec.Struct, kw_only=True):
    """Everything about a queued message except its body and per-recipient state."""

    id: str
    """Queue id: 22 lowercase hex digits, sortable by arrival."""
    sender: str
    """Envelope sender (MAIL FROM), "" for the null sender <>."""
    arrival_time: float
    size: int
    """Bytes of the stored body (headers we added included)."""
    message_id: str = ""
    """The Message-ID header, angle brackets included."""
    held: bool = False
    client_address: str = ""
    client_helo: str = ""
    listener: str = ""
    """Role of the listener the message came in on (mx, submission, ...), or "http"."""
    protocol: str = "ESMTP"
    smtputf8: bool = False
    body_type: str = ""
    """MAIL FROM BODY= (7BIT, 8BITMIME), as given."""
    ret: str = ""
    """RFC 3461 RET (FULL or HDRS), as given."""
    envid: str = ""
    """RFC 3461 ENVID, as given."""
    tenant: str = ""
    """The tenant that submitted the message (authenticated SMTP submission, HTTP API); "" for mx."""


class QueuedMessage(msgspec.Struct, kw_only=True):
    """A message as the queue sees it: envelope plus recipients (never the body)."""

    envelope: Envelope
    recipients: list[Recipient]


_counter = itertools.count()
_pid = os.getpid() & 0xFFFF


def new_queue_id(now: float | None = None) -> str:
    """A fresh queue id: microseconds since the epoch, then pid and a counter, in hex.

    Sorts by arrival, unique within a host as long as pids are not reused within a microsecond.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:014x}{_pid:04x}{next(_counter) & 0xFFFF:04x}"
