"""Events: the closed set of things that happen to mail, and the bus that hands them out.

Pure: no I/O. Every state change is one Event; the mail log, the counters behind
`mtactl stats` and (later) webhooks and the status API subscribe to the same bus.
Subscribers are plain functions called synchronously in publish order; they must be cheap
(no I/O that waits) because publish runs on the event loop in the hot path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Literal

import msgspec

EventType = Literal[
    "received",  # a message was committed to the spool and acknowledged
    "rejected",  # a message or recipient was refused (SMTP 4xx/5xx at RCPT or DATA)
    "queued",  # delivery: a recipient entered a destination queue
    "delivered",
    "deferred",
    "bounced",
    "dropped",  # suppressed, deleted by an operator
    "expired",
    "held",  # an operator parked a message
    "released",
    "complained",
    "opened",
    "clicked",
    "unsubscribed",
]

EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One thing that happened, keyed by queue id where there is one."""

    type: EventType
    time: float
    queue_id: str = ""
    client_address: str = ""
    helo: str = ""
    sender: str | None = None
    """The envelope sender; "" is the null sender <> (bounces), so it is written; None is left out."""
    recipients: list[str] = []
    size: int = 0
    message_id: str = ""
    listener: str = ""
    reply: str = ""
    """The SMTP reply mtad sent (received/rejected) or got (delivery events), as one line."""
    relay: str = ""
    attempts: int = 0
    delay: float = 0.0
    reason: str = ""
    status: str = ""
    """RFC 3463 enhanced status of a delivery outcome ("5.1.1")."""
    bounce_class: str = ""
    """hard / soft / complaint / auto-reply / unknown, for bounced and complained events."""
    tenant: str = ""
    """The tenant the message was submitted as (authenticated submission, HTTP API)."""
    user: str = ""
    """The SMTP AUTH username a rejected authentication claimed (never the password)."""
    feedback_type: str = ""
    """ARF Feedback-Type of a complained event (abuse, fraud, ...)."""
    source_ip: str = ""
    """ARF Source-IP of a complained event: where the reported message was seen coming from."""


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def publish(self, event: Event) -> None:
        for fn in self._subscribers:
            fn(event)


class Counters:
    """Counts events by type since start: what `mtactl stats` reports (plus queued-now from the spool)."""

    def __init__(self) -> None:
        self.by_type: Counter[str] = Counter()

    def __call__(self, event: Event) -> None:
        self.by_type[event.type] += 1
