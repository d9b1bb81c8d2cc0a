"""Read the machine part of a standard DSN: message/delivery-status fields per recipient.

Pure. Tolerates what real MTAs emit: missing blank lines between blocks, recipient
fields repeated in one block, a Status hidden in Diagnostic-Code, odd address types.
Trust: the fields are hostile text; each value is capped and parsed without backtracking.
RFCs: 3464 sections 2.2 (per-message fields) and 2.3 (per-recipient fields),
6533 (utf-8 address type).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtad.dsn.mime import field_blocks
from mtad.dsn.record import ACTIONS, clean_address, clean_status, remote_status

MAX_VALUE = 2000
_RECIPIENT_FIELDS = ("final-recipient", "original-recipient", "x-actual-recipient")


@dataclass
class RecipientFields:
    """One per-recipient block, reduced to the fields a bounce reader uses."""

    recipient: str = ""
    original: str = ""
    action: str = ""
    status: str = ""
    diagnostic: str = ""
    diagnostic_type: str = ""
    remote_mta: str = ""


@dataclass
class MessageFields:
    reporting_mta: str = ""
    received_from: str = ""


def parse_delivery_status(text: str) -> tuple[MessageFields, list[RecipientFields]]:
    """Per-message fields and one RecipientFields per recipient in a delivery-status body."""
    per_message = MessageFields()
    groups: list[list[tuple[str, str]]] = []
    for block in field_blocks(text):
        current: list[tuple[str, str]] = []
        seen: set[str] = set()
        for name, value in block:
            if name in _RECIPIENT_FIELDS[:2] and name in seen:
                groups.append(current)
                current, seen = [], set()
            seen.add(name)
            current.append((name, value[:MAX_VALUE]))
        groups.append(current)
    recipients: list[RecipientFields] = []
    for group in groups:
        names = {name for name, _ in group}
        if not names.intersection(_RECIPIENT_FIELDS):
            for name, value in group:
                if name == "reporting-mta" and not per_message.reporting_mta:
                    per_message.reporting_mta = _after_type(value)
                elif name == "received-from-mta" and not per_message.received_from:
                    per_message.received_from = _after_type(value)
            continue
        rec = _recipient(group)
        if rec.recipient:
            recipients.append(rec)
    return per_message, recipients


def _recipient(group: list[tuple[str, str]]) -> RecipientFields:
    rec = RecipientFields()
    final = original = actual = ""
    for name, value in group:
        if name == "final-recipient" and not final:
            final = clean_address(value)
        elif name == "original-recipient" and not original:
            original = clean_address(value)
        elif name == "x-actual-recipient" and not actual:
            actual = clean_address(value)
        elif name == "action" and not rec.action:
            rec.action = _action(value)
        elif name == "status" and not rec.status:
            rec.status = clean_status(value)
        elif name == "diagnostic-code" and not rec.diagnostic:
            kind, sep, rest = value.partition(";")
            if sep and len(kind) < 20 and " " not in kind.strip():
                rec.diagnostic_type, rec.diagnostic = kind.strip().lower(), rest.strip()
            else:
                rec.diagnostic = value.strip()
        elif name == "remote-mta" and not rec.remote_mta:
            rec.remote_mta = _after_type(value)
    rec.recipient = final or original or actual
    rec.original = original
    if rec.diagnostic:
        # "Status: 5.0.0" with "Diagnostic-Code: smtp; 550 5.7.1 ...": the remote
        # server's own code says more than the reporting MTA's translation of it
        # (same class digit only: a 4xx reply in a failed report stays 5.x.x).
        said = remote_status(rec.diagnostic[:400])
        if said and (not rec.status or said[0] == rec.status[0]):
            rec.status = said
    return rec


def _after_type(value: str) -> str:
    kind, sep, rest = value.partition(";")
    text = rest if sep else kind
    return text.strip().strip("[]").strip()[:255]


def _action(value: str) -> str:
    word = value.strip().lower().split(" ", 1)[0] if value.strip() else ""
    word = word.strip(";,.()")
    if word in ACTIONS:
        return word
    if word.startswith("fail"):
        return "failed"
    if word.startswith("delay") or word in ("deferred", "transient"):
        return "delayed"
    if word in ("deliverable", "success"):
        return "delivered"
    return ""
