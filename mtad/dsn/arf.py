"""Complaint reports (ARF) and auto-replies: the two notices that are not bounces.

Pure. A feedback report becomes one complaint record per original recipient
(Original-Rcpt-To, else the To of the returned message); Microsoft's JMRP reports, which
carry the complainer in X-HmXmrOriginalRecipient, count too. An auto-reply (vacation,
out-of-office) becomes one auto-reply record for its author.
Trust: every field is hostile text; addresses are re-parsed, values capped.
RFCs: 5965 (ARF), 6591 (auth-failure reports), 6650 (Removal-Recipient),
3834 (Auto-Submitted, automatic responses).
"""

from __future__ import annotations

import re
from email.utils import getaddresses

from mtad.dsn.entity import Entity
from mtad.dsn.mime import Parts, header_text
from mtad.dsn.record import DsnRecord, clean_address

_FEEDBACK_TYPES = frozenset({"abuse", "fraud", "virus", "other", "not-spam", "auth-failure", "opt-out", "dmarc"})
_IP = re.compile(r"^\[?([0-9A-Fa-f:.]{2,45})\]?")


def is_feedback_report(parts: Parts) -> bool:
    if parts.feedback:
        return True
    raw = parts.message.get("Content-Type")
    if raw is not None and "feedback-report" in str(raw).lower():
        ctype = parts.message.get_param("report-type", header="content-type")
        if isinstance(ctype, str) and ctype.lower() == "feedback-report":
            return True
    return parts.original is not None and parts.original.get("X-HmXmrOriginalRecipient") is not None


def complaint_records(parts: Parts) -> list[DsnRecord]:
    fields = [f for block in parts.feedback for f in block]
    feedback_type = "abuse"
    source_ip = ""
    recipients: list[str] = []
    for name, value in fields:
        if name == "feedback-type":
            word = value.strip().lower()
            feedback_type = word if word in _FEEDBACK_TYPES else (word[:32] or "other")
        elif name == "source-ip" and not source_ip:
            found = _IP.match(value.strip())
            source_ip = found.group(1) if found else ""
        elif name in ("original-rcpt-to", "removal-recipient"):
            addr = clean_address(value)
            if addr and addr.lower() not in (r.lower() for r in recipients):
                recipients.append(addr)
    original = parts.original
    message_id = _message_id(original, parts.original_text)
    if not recipients and original is not None:
        for name in ("X-HmXmrOriginalRecipient", "X-Original-To", "To", "Delivered-To"):
            listed = [clean_address(a) for _, a in getaddresses([header_text(original, name)])]
            listed = [a for a in listed if a]
            if listed:
                recipients = listed[:100]
                break
    return [
        DsnRecord(
            recipient=addr,
            reason="feedback",
            class_="complaint",
            feedback_type=feedback_type,
            source_ip=source_ip,
            message_id=message_id,
        )
        for addr in recipients
    ]


_MESSAGE_ID = re.compile(r"^message-id:[ \t]*(\S{1,250})", re.IGNORECASE | re.MULTILINE)


def _message_id(original: Entity | None, inline: str) -> str:
    if original is not None:
        value = header_text(original, "Message-ID")
        if value:
            return value.split()[0][:250]
        body = original.body
        if body and not inline and not original.is_multipart():
            # A stray blank line inside the returned headers pushes the rest into the body.
            inline = body
    if inline:
        found = _MESSAGE_ID.search(inline[:20000])
        if found:
            return found.group(1)
    return ""


message_id = _message_id

# RFC 3834 and the de-facto markers of vacation responders (Exchange, Gmail, Zimbra,
# qmail autoresponder, procmail/vacation(1), ...).
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-mail-autoreply", "x-vacation")
_AUTO_SUBJECT = re.compile(
    r"^(?:auto(?:matic)?[ -]?(?:reply|response|antwort|risposta|respuesta|réponse)|autoreply|"
    r"out of (?:the )?office|away from (?:my|the) (?:office|desk)|on vacation|vacation|"
    r"abwesenheit|absence|r[ée]ponse automatique|risposta automatica|respuesta autom[aá]tica|"
    r"自動|不在)",
    re.IGNORECASE,
)
_AUTO_PREFIX = re.compile(r"^(?:auto:|autoreply:|automatic reply:|out of office:|ooo:)", re.IGNORECASE)


def is_auto_reply(msg: Entity) -> bool:
    """True for a vacation/out-of-office style automatic reply (not a bounce)."""
    auto = header_text(msg, "Auto-Submitted").lower()
    if auto.startswith("auto-replied"):
        return True
    if any(msg.get(name) is not None for name in _AUTO_HEADERS):
        return True
    precedence = header_text(msg, "Precedence").lower()
    if precedence == "auto_reply" or header_text(msg, "X-Auto-Response-Suppress") and _subject_says_auto(msg):
        return True
    return _subject_says_auto(msg)


# Automatic answers that hold the message rather than report an absence: challenge-
# response systems (TMDA, mailbox verification services) and list moderation queues.
# They carry Auto-Submitted: auto-replied (RFC 3834 section 2) yet say nothing about the
# recipient's reachability.
_HELD = re.compile(
    r"challenge[- ]?response|confirm (?:your|that you|you are)|verify (?:your|that you|you are)|"
    r"(?:is|has been|was) (?:being )?held|awaits? (?:moderator|approval)|moderator approval|"
    r"(?:whitelist|allow ?list|approved senders)|captcha|not a (?:robot|spammer)",
    re.IGNORECASE,
)


def is_held_notice(msg: Entity, text: str) -> bool:
    """True for a challenge-response or moderation notice (not an absence auto-reply).

    An "Automatic reply: <original subject>" is an absence notice whatever the original
    subject said, so the subject counts only when it is not shaped like one.
    """
    subject = header_text(msg, "Subject").strip()
    if _AUTO_PREFIX.match(subject) or _AUTO_SUBJECT.match(subject):
        return False
    return bool(_HELD.search(subject) or _HELD.search(text))


def _subject_says_auto(msg: Entity) -> bool:
    subject = header_text(msg, "Subject").strip()
    return bool(_AUTO_PREFIX.match(subject) or _AUTO_SUBJECT.match(subject))


def auto_reply_records(msg: Entity) -> list[DsnRecord]:
    author = ""
    for name in ("From", "Reply-To", "Sender", "Return-Path"):
        for _, raw in getaddresses([header_text(msg, name)]):
            author = clean_address(raw)
            if author:
                break
        if author:
            break
    if not author:
        return []
    return [DsnRecord(recipient=author, reason="vacation", class_="auto-reply", message_id=_in_reply_to(msg))]


def _in_reply_to(msg: Entity) -> str:
    value = header_text(msg, "In-Reply-To") or header_text(msg, "References")
    return value.split()[0][:250] if value else ""
