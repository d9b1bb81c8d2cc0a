"""Recipient state transitions: what an outcome does to a queued recipient.

Pure: values in, values out. The scheduler applies the result to its copy of the message,
writes it to the spool and publishes the event; a DSN is sent when `dsn` says so.

    delivered            leaves the queue                      event delivered
    bounced              leaves the queue, DSN "failed"        event bounced
    deferred, expired    leaves the queue, DSN "failed"        event expired
    deferred             stays: attempts + 1, next attempt after the backoff, maybe a
                         one-time DSN "delayed"                event deferred
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

import msgspec

from mtad.deliver.outcome import Outcome, expired
from mtad.events import EventType
from mtad.records import MAX_HISTORY, Attempt, Recipient
from mtad.retry import backoff
from mtad.retry import expired as lifetime_over

DsnAction = Literal["failed", "delayed", "relayed", ""]


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    min_backoff: float = 300.0
    max_backoff: float = 4 * 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0
    """Age after which one "delayed" DSN goes out; 0: never."""


class Change(msgspec.Struct, frozen=True, kw_only=True):
    recipient: Recipient | None
    """The recipient's new state, or None when it leaves the queue."""
    event: EventType
    outcome: Outcome
    dsn: DsnAction = ""


def after_outcome(recipient: Recipient, outcome: Outcome, *, arrival: float, now: float, relay: str,
                  policy: Policy, rand: Callable[[], float] = random.random, dsn_relayed: bool = True) -> Change:
    """The recipient after one attempt ended with `outcome`. `dsn_relayed`: the server that
    took it offers DSN (else a sender who asked for NOTIFY=SUCCESS gets a "relayed" DSN)."""
    if outcome.kind == "delivered":
        success = not dsn_relayed and "SUCCESS" in recipient.notify.upper()
        return Change(recipient=None, event="delivered", outcome=outcome, dsn="relayed" if success else "")
    if outcome.kind == "bounced":
        return Change(recipient=None, event="bounced", outcome=outcome, dsn="failed")
    attempts = recipient.attempts + 1
    if lifetime_over(arrival, now, policy.lifetime):
        return Change(recipient=None, event="expired", outcome=expire(outcome), dsn="failed")
    history = [*recipient.history, Attempt(time=now, reply=outcome.reply, relay=relay)][-MAX_HISTORY:]
    warn = bool(policy.delay_warning) and not recipient.warned and now - arrival >= policy.delay_warning
    delay = backoff(attempts, min_backoff=policy.min_backoff, max_backoff=policy.max_backoff, rand=rand)
    updated = msgspec.structs.replace(
        recipient, state="deferred", attempts=attempts, next_attempt=now + delay,
        last_reply=outcome.reply, history=history, warned=recipient.warned or warn,
    )
    return Change(recipient=updated, event="deferred", outcome=outcome, dsn="delayed" if warn else "")


def expire(outcome: Outcome) -> Outcome:
    """The bounce an expiry gives: the last temporary failure's status and reply, as Postfix
    reports it (outcome.expired), so the mail log and the DSN agree."""
    return expired(last=outcome)


def rest(recipient: Recipient, *, until: float, reply: str) -> Recipient:
    """A recipient whose destination is suspended: wait until `until`, no attempt counted."""
    return msgspec.structs.replace(recipient, state="deferred", next_attempt=until, last_reply=reply)


def due_now(recipient: Recipient, now: float) -> bool:
    """Waiting for an attempt now (not held, not waiting for a later time)."""
    return recipient.state != "held" and recipient.next_attempt <= now


def flushed(recipient: Recipient) -> Recipient:
    """A deferred or scheduled recipient made due at once (operator flush)."""
    if recipient.state == "held":
        return recipient
    return msgspec.structs.replace(recipient, state="queued", next_attempt=0.0)
