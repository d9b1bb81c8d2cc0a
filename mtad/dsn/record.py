"""The bounce record (one per affected recipient) and the small value helpers around it.

Pure. A record is what `mtad.dsn.parse` returns and what `mtactl dsn --json` prints.
RFCs: 3464 section 2.3 (per-recipient fields), 3463 (enhanced status codes), 5965 (ARF).
"""

from __future__ import annotations

import re

import msgspec

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
CLASSES = frozenset({"hard", "soft", "complaint", "auto-reply", "unknown"})

# The reasons that mean "this address will never take mail": the caller may suppress it
# at once. notaccept is hard only with a permanent (5xx) code, see classify.bounce_class.
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved"})


class DsnRecord(msgspec.Struct, kw_only=True):
    """One recipient's outcome as reported by a bounce, complaint or auto-reply."""

    recipient: str
    action: str = ""
    """failed | delayed | delivered | relayed | expanded; "" for complaints and auto-replies."""
    status: str = ""
    """RFC 3463 "X.Y.Z", or "" when the report carries none."""
    reason: str = "undefined"
    """sisimai v5 reason name (userunknown, mailboxfull, blocked, feedback, vacation, ...)."""
    class_: str = msgspec.field(default="unknown", name="class")
    """hard | soft | complaint | auto-reply | unknown."""
    diagnostic: str = ""
    """The remote reply text (Diagnostic-Code or the scraped human-readable line)."""
    remote_mta: str = ""
    message_id: str = ""
    """Message-ID of the original message, angle brackets included, when found."""
    feedback_type: str = ""
    """ARF Feedback-Type (abuse, fraud, virus, other, not-spam, auth-failure, opt-out)."""
    source_ip: str = ""
    """ARF Source-IP."""


# An addr-spec good enough for reports: local@domain, no spaces, bounded lengths so a
# hostile line cannot make the search expensive.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\"]{1,128}"
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}\.){0,10}[A-Za-z0-9\-]{1,63}"
ADDRESS_RE = re.compile(rf"(?<![A-Za-z0-9.\-_+=])({_LOCAL}@{_DOMAIN})")
STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_STATUS_FULL = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def clean_address(raw: str) -> str:
    """An address from a report field ("rfc822; <User@Example.org>") as "User@Example.org".

    Returns "" when no plausible address is there.
    """
    text = raw.strip()
    if ";" in text[:16]:
        kind, _, rest = text.partition(";")
        if kind.strip().lower() in ("rfc822", "utf-8", "x-local", "unknown", "x400", "smtp"):
            text = rest.strip()
    text = text.strip().strip("<>\"' \t").strip()
    if text.lower().startswith("mailto:"):
        text = text[7:]
    found = ADDRESS_RE.search(text)
    if not found:
        return ""
    addr = found.group(1).strip(".'\"")
    local, _, domain = addr.rpartition("@")
    # Unqualified hosts ("user@mailhub0") do appear in real reports; keep them only
    # when the whole field is just that address.
    unqualified = "." not in domain and domain.lower() != "localhost"
    if not local or unqualified and text.strip("<>") != addr:
        return ""
    return addr


def clean_status(raw: str) -> str:
    """The first RFC 3463 code in `raw` ("5.1.1"), or ""."""
    found = STATUS_RE.search(raw)
    if not found:
        return ""
    return ".".join(found.groups())


def failure_status(raw: str) -> str:
    """The first 4.x.x/5.x.x code in bounce text (a session transcript shows the 2.x.x
    replies that went well before the one that failed), else the first code, else ""."""
    first = ""
    for m in STATUS_RE.finditer(raw):
        if m.group(1) != "2":
            return ".".join(m.groups())
        first = first or ".".join(m.groups())
    return first


def remote_status(raw: str) -> str:
    """The remote server's code in a diagnostic: the last RFC 3463 code, because relays
    and gateways put their own summary first and quote the remote reply after it
    ("5.1.0 - Unknown address error 550-'5.2.2 ... Mailbox Full'"); "" when none."""
    found = ""
    for m in STATUS_RE.finditer(raw):
        found = ".".join(m.groups())
    return found


def valid_status(status: str) -> bool:
    return bool(_STATUS_FULL.match(status))
