"""Classify once: every remote reply or network error becomes one typed Outcome.

Pure. An Outcome says what happened to a recipient (delivered / deferred / bounced), how far
it reaches (scope), the RFC 3463 enhanced status, the reply as one line, and the reason and
class in the DSN parser's vocabulary (`mtad.dsn.classify_reply`), so that a 550 at RCPT and a
later DSN for the same failure say the same thing.

Scopes:
    recipient    this recipient only (a RCPT reply)
    message      every recipient of this transaction (MAIL, DATA, the final dot)
    connection   this connection failed (greeting, 421, timeout, lost link): the attempt may
                 try the next MX; the recipients are deferred when no host is left
    destination  the whole destination (DNS answers, null MX, a loop): no host will do

RFCs: 5321 4.2 and 4.5.3.2 (reply codes, timeouts), 3463 (enhanced status codes),
7505 (null MX: 5.1.10), 2034 (status in replies).
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from mtad.dsn.classify import bounce_class, classify_reply

Kind = Literal["delivered", "deferred", "bounced"]
Scope = Literal["recipient", "message", "connection", "destination"]
Phase = Literal["dns", "connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "dot", "local"]

MAX_REPLY = 512
"""Characters of a remote reply kept (the mail log, DSNs and queue listings show it)."""

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    kind: Kind
    scope: Scope
    status: str
    """RFC 3463 enhanced status, "2.0.0", "4.4.1", "5.1.1"."""
    reply: str
    """One line: the remote reply ("550 5.1.1 <a@b>: no such user") or our own words."""
    phase: Phase = "local"
    remote: bool = False
    """The reply came from a remote server (a DSN's Diagnostic-Code is then `smtp; ...`)."""
    reason: str = ""
    """sisimai vocabulary (userunknown, mailboxfull, ...); "delivered" for a delivery."""
    bounce_class: str = ""
    """hard / soft / unknown for failures; "" for a delivery."""

    @property
    def final(self) -> bool:
        """The recipient leaves the queue (delivered or bounced)."""
        return self.kind != "deferred"


def one_line(text: str) -> str:
    """A reply's lines joined with spaces, control characters dropped, at most MAX_REPLY."""
    return _CONTROL.sub(" ", text).strip()[:MAX_REPLY]


def from_reply(phase: Phase, code: int, text: str) -> Outcome:
    """The outcome of a remote SMTP reply (`text` without the code; lines joined by "\\n").

    2xx at the final dot or at RCPT-less stages means delivered for the caller to apply; a
    4xx defers and a 5xx bounces within the phase's scope, except that 421 always ends the
    connection, and any failure at the greeting is a connection failure (try the next MX).
    """
    line = one_line(f"{code} {text}")
    found = _STATUS.search(text[:40])
    if found and found[1] == str(code)[0]:
        status = found[0]
    else:
        status = f"{str(code)[0]}.0.0" if 200 <= code < 600 else "4.0.0"
    if 200 <= code < 400:
        return Outcome(kind="delivered", scope=_scope(phase), status=status, reply=line, phase=phase,
                       remote=True, reason="delivered")
    reason, klass = classify_reply(code, status, text)
    permanent = 500 <= code < 600
    scope = _scope(phase)
    if code == 421 or phase in ("greeting", "connect"):
        scope, permanent = "connection", False
    if not permanent and status.startswith("5"):
        status = "4" + status[1:]
    return Outcome(kind="bounced" if permanent else "deferred", scope=scope, status=status, reply=line,
                   phase=phase, remote=True, reason=reason, bounce_class=klass if permanent else "soft")


def network_error(phase: Phase, detail: str, *, timeout: bool = False) -> Outcome:
    """A connection that failed or was lost (refused, reset, timed out, TLS broke): deferred.

    Status per RFC 3463: 4.4.1 no answer from host (connect), 4.4.2 bad connection (lost or
    timed out later in the session)."""
    status = "4.4.1" if phase == "connect" else "4.4.2"
    words = f"{'timed out' if timeout else 'failed'} during {phase}: {detail}" if detail else \
        f"{'timed out' if timeout else 'failed'} during {phase}"
    return Outcome(kind="deferred", scope="connection", status=status, reply=one_line(words), phase=phase,
                   reason="expired" if timeout else "networkerror", bounce_class="soft")


def local(kind: Kind, status: str, text: str, *, scope: Scope = "destination", phase: Phase = "local",
          reason: str = "") -> Outcome:
    """An outcome mtad decides itself (null MX, no such domain, DNS failure, loop, expiry)."""
    code = int(status[0]) * 100 + 50
    if not reason:
        reason = classify_reply(code, status, text)[0]
    klass = "" if kind == "delivered" else (bounce_class(reason, code, status) if kind == "bounced" else "soft")
    return Outcome(kind=kind, scope=scope, status=status, reply=one_line(text), phase=phase, reason=reason,
                   bounce_class=klass)


def _scope(phase: Phase) -> Scope:
    if phase == "rcpt":
        return "recipient"
    if phase in ("mail", "data", "dot", "local"):
        return "message"
    if phase == "dns":
        return "destination"
    return "connection"
