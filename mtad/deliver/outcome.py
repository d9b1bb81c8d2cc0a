"""Classify once: every remote reply or network error becomes one typed Outcome.

Pure. An Outcome says what happened to a recipient (delivered / deferred / bounced), how far
it reaches (scope), the RFC 3463 enhanced status, the reply as one line, and the reason and
class in the DSN parser's vocabulary (`mtad.dsn.classify`). The reason is computed from the
same inputs the parser reads back out of the DSN we would send (the one-line reply as the
Diagnostic-Code, the status, the action, the SMTP command named in the human part), so a 550
at RCPT and the later DSN for the same failure say the same thing.

Scopes:
    recipient    this recipient only (a RCPT reply)
    message      every recipient of this transaction (MAIL, DATA, the final dot)
    connection   the session failed (connect, greeting, EHLO, STARTTLS, any 421, a lost
                 link, a reply out of place), for every recipient it carried; a deferred one
                 sends them on to the next MX, a bounced one (5xx to EHLO) is final
    destination  the whole destination (DNS answers, null MX, a loop): no host will do

Decisions worth knowing (after Postfix's smtp_trouble.c and RFC 5321):
- 421 anywhere ends the connection and defers (RFC 5321 3.8).
- Any failure at the greeting defers, 5xx included: another MX may take the mail (Postfix's
  smtp_skip_5xx_greeting); the status keeps its detail with class 4.
- STARTTLS failures defer: TLS policy failures are temporary (RFC 8461 5).
- 552 at RCPT is RFC 821's "too many recipients" and defers (RFC 5321 4.5.3.1.10).
- The enhanced status is the one that opens the reply text (RFC 2034 4); one whose class
  differs from the reply code's is ignored, as is a missing one: the status is then X.0.0.
- A reply code outside 2xx-5xx, or a 3xx anywhere but DATA, is a protocol error (4.5.0).

RFCs: 5321 4.2, 4.5.3.1.10 and 4.5.3.2 (reply codes, limits, timeouts), 3463 (enhanced status
codes), 2034 (status in replies), 7505 (null MX: 5.1.10), 3464 (what a DSN reports).
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from mtad.dsn.classify import bounce_class, classify, reply_code

Kind = Literal["delivered", "deferred", "bounced"]
Scope = Literal["recipient", "message", "connection", "destination"]
Phase = Literal["dns", "connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "dot", "local"]

MAX_REPLY = 512
"""Characters of a remote reply kept (the mail log, DSNs and queue listings show it)."""

COMMANDS: dict[str, str] = {
    "greeting": "initial connection", "ehlo": "EHLO", "starttls": "STARTTLS", "mail": "MAIL FROM",
    "rcpt": "RCPT TO", "data": "DATA", "dot": "end of DATA",
}
"""The SMTP command a phase's reply answers, worded as a DSN's human part names it
("(in reply to RCPT TO command)"); the DSN parser reads the command back from that."""

_CLASSIFY_COMMAND = {"mail": "MAIL", "rcpt": "RCPT", "data": "DATA", "dot": "DATA", "ehlo": "HELO",
                     "greeting": "CONN", "connect": "CONN"}
_SCOPE: dict[str, Scope] = {
    "dns": "destination", "connect": "connection", "greeting": "connection", "ehlo": "connection",
    "starttls": "connection", "mail": "message", "rcpt": "recipient", "data": "message", "dot": "message",
    "local": "message",
}
# RFC 2034 4: the status opens the text of each line; bounded digits, no backtracking.
_LEADING_STATUS = re.compile(r"[ \t]*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_WHITESPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one attempt did for one recipient, as the scheduler, mail log and DSN see it."""

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
    """A reply's lines joined with single spaces, control characters dropped, at most MAX_REPLY."""
    return _WHITESPACE.sub(" ", text[: MAX_REPLY * 4]).strip()[:MAX_REPLY]


def reply_status(code: int, text: str) -> str:
    """The enhanced status of a reply: the one opening its text when its class matches the
    code's, else "X.0.0" from the code ("4.0.0" for a code outside 2xx-5xx)."""
    klass = str(code)[0] if 200 <= code < 600 else "4"
    found = _LEADING_STATUS.match(text)
    if found and found[1] == klass and 200 <= code < 600:
        return ".".join(found.groups())
    return f"{klass}.0.0"


def from_reply(phase: Phase, code: int, text: str) -> Outcome:
    """The outcome of a remote SMTP reply (`text` without the code; lines joined by "\\n").

    2xx (and 354 at DATA) means the step succeeded ("delivered" for the caller to apply at
    RCPT and the final dot); 4xx defers and 5xx bounces within the phase's scope, with the
    exceptions in the module docstring.
    """
    text = _strip_continuations(code, text)
    line = one_line(f"{code} {text}")
    status = reply_status(code, text)
    if 200 <= code < 300 or (code == 354 and phase == "data"):
        return Outcome(kind="delivered", scope=_SCOPE.get(phase, "message"), status="2.0.0" if code == 354 else status,
                       reply=line, phase=phase, remote=True, reason="delivered")
    scope = _SCOPE.get(phase, "message")
    permanent = 500 <= code < 600
    if code == 421 or phase in ("greeting", "connect", "starttls") or not 400 <= code < 600:
        scope, permanent = "connection", False
        if not 400 <= code < 600:
            status = "4.5.0"  # a reply out of place: the peer is not speaking SMTP to us
    elif phase == "rcpt" and code == 552:
        permanent = False
    if not permanent and status.startswith("5"):
        status = "4" + status[1:]
    reason, klass = _classify(status, line, "failed" if permanent else "", _CLASSIFY_COMMAND.get(phase, ""))
    return Outcome(kind="bounced" if permanent else "deferred", scope=scope, status=status, reply=line,
                   phase=phase, remote=True, reason=reason, bounce_class=klass if permanent else "soft")


def network_error(phase: Phase, detail: str, *, timeout: bool = False) -> Outcome:
    """A connection that failed or was lost (refused, reset, timed out, TLS broke): deferred.

    Status per RFC 3463: 4.4.1 no answer from host (connect), 4.4.2 bad connection (lost or
    timed out later in the session). The reason is "networkerror" whatever the words; when
    the queue gives up, `expired` classifies the words as the DSN parser will. `detail` is
    our own words (an errno name), never a peer's text unfiltered; it is kept to one line."""
    status = "4.4.1" if phase == "connect" else "4.4.2"
    what = "timed out" if timeout else "failed"
    words = one_line(f"{what} during {phase}: {detail}" if detail.strip() else f"{what} during {phase}")
    return Outcome(kind="deferred", scope="connection", status=status, reply=words, phase=phase,
                   reason="networkerror", bounce_class="soft")


def local(kind: Kind, status: str, text: str, *, scope: Scope = "destination", phase: Phase = "local",
          reason: str = "") -> Outcome:
    """An outcome mtad decides itself (null MX, no such domain, DNS failure, loop, expiry)."""
    line = one_line(text)
    if kind == "delivered":
        return Outcome(kind=kind, scope=scope, status=status, reply=line, phase=phase, reason=reason or "delivered")
    found, klass = _classify(status, line, "failed" if kind == "bounced" else "", "")
    if reason:
        klass = bounce_class(reason, 0, status)
    return Outcome(kind=kind, scope=scope, status=status, reply=line, phase=phase, reason=reason or found,
                   bounce_class=klass if kind == "bounced" else "soft")


def expired(last: Outcome | None = None, *, last_reply: str = "") -> Outcome:
    """The bounce of a recipient whose queue lifetime ran out.

    Like Postfix, the DSN reports the last temporary failure: its status and its reply as
    the diagnostic. The class stays 4: RFC 3463 2 defines 4.X.X as a transient condition
    whose persistence "has caused abandonment or delay", which an expiry is. Give
    `last` when the Outcome is at hand, else the recipient's `last_reply` line (a remote
    reply is recognised by its leading code); with neither, 4.4.7 "delivery time expired".
    """
    if last is not None:
        status, reply, remote, phase = last.status, last.reply, last.remote, last.phase
        if last.kind == "delivered" or status[:1] not in ("4", "5"):
            status = "4.4.7"
    else:
        reply = one_line(last_reply)
        code = reply_code(reply[:4])
        remote = code >= 400 and reply[:3] == str(code)
        status = reply_status(code, reply[4:]) if remote else "4.4.7"
        phase = "local"
    if status.startswith("5"):
        status = "4" + status[1:]
    if not reply:
        reply = "delivery time expired"
    command = _CLASSIFY_COMMAND.get(phase, "") if remote else ""
    reason, klass = _classify(status, reply, "failed", command)
    return Outcome(kind="bounced", scope="recipient", status=status, reply=reply, phase=phase, remote=remote,
                   reason=reason, bounce_class=klass)


def _classify(status: str, line: str, action: str, command: str) -> tuple[str, str]:
    """(reason, class) from exactly what a DSN parser would see: status, the reply line as the
    diagnostic, its reply code, the action and the command."""
    try:
        return classify(status=status, code=reply_code(line), text=line, action=action, command=command)
    except Exception:  # noqa: BLE001 - a classifier must never take delivery down
        return "undefined", "unknown"


def _strip_continuations(code: int, text: str) -> str:
    """Multi-line reply text with the repeats taken out: a "550-" prefix a client left on a
    line, and the status that every line of an RFC 2034 reply repeats."""
    if "\n" not in text:
        return text
    lines = text.split("\n")
    first = _LEADING_STATUS.match(lines[0])
    prefix = (f"{code}-", f"{code} ")
    out = [lines[0]]
    for line in lines[1:]:
        if line.startswith(prefix):
            line = line[4:]
        again = _LEADING_STATUS.match(line)
        if first and again and again.groups() == first.groups():
            line = line[again.end():]
        out.append(line)
    return "\n".join(out)
