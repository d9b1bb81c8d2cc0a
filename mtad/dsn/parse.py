"""Turn any message into bounce records: DSN, non-standard bounce, complaint, auto-reply or nothing.

Pure, and total: `parse` never raises and runs in bounded time (the input is capped, every
pattern is linear). Order of evidence: an ARF report is a complaint; a message/delivery-
status part gives the recipients and codes, the human-readable part fills in missing
reply text; a message that only looks like a bounce (null sender, MAILER-DAEMON, a bounce
subject, X-Failed-Recipients, multipart/report) is scraped; an RFC 3834 auto-reply gives
one auto-reply record (not a challenge-response or moderation notice, which also carry
Auto-Submitted); anything else gives nothing, read receipts and TLS reports included.
Trust: the whole input is hostile (anyone can send us a "bounce"); attribution to our
own mail (VERP, Message-ID) is the caller's job.
RFCs: 3464 (DSN), 3462/6522 (multipart/report), 5965 (ARF), 3834 (auto-replies),
3463 (status codes), 8098 (MDN) and 8460 (TLS-RPT) as what is not a bounce.
"""

from __future__ import annotations

import re
from email.utils import getaddresses

from mtad.dsn.arf import (
    auto_reply_records,
    complaint_records,
    is_auto_reply,
    is_feedback_report,
    is_held_notice,
    message_id,
)
from mtad.dsn.classify import bounce_class, classify, fold, reason_from_text, reply_code
from mtad.dsn.entity import Entity
from mtad.dsn.mime import Parts, header_text, split_parts
from mtad.dsn.record import (
    ADDRESS_RE,
    DsnRecord,
    clean_address,
    failure_status,
)
from mtad.dsn.rfc3464 import parse_delivery_status
from mtad.dsn.scrape import Scraped, find_code, find_command, scrape
from mtad.dsn.ses import looks_like_ses, ses_records

MAX_RECORDS = 500
MAX_DIAGNOSTIC = 1000

_BOUNCE_FROM = re.compile(
    r"mailer[-_ ]?daemon|post_?master|mail ?delivery|delivery ?(?:status|subsystem|notification)|"
    r"mail ?administrator|system ?administrator|mail ?system|\bmta\b|bounce|mail ?router|"
    r"internet ?mail ?service|mailer@|smtp ?gateway|mail ?gateway|\bnoreply-dsn",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|deliver(?:y|ing)? (?:status|fail|failure|report|notification|problem|"
    r"has failed|unsuccessful|incomplete|error|delay)|returned (?:mail|to sender)|"
    r"mail delivery|failure notice|failed (?:delivery|mail)|non[- ]?deliver|not (?:be )?delivered|"
    r"could not (?:be )?(?:delivered|sent)|unable to deliver|delayed mail|warning: could not|"
    r"mail system error|permanent error|\bdsn\b|\bndr\b|nondeliverable|rejected|bounced?\b|"
    r"unzustellbar|non remis|impossible de remettre|no se puede entregar|non recapitabile|"
    r"message (?:not|could not be) (?:delivered|sent)|delivery notification|problem delivering|"
    r"returned message|mail error|error sending|message delivery|zustellung|配信|エラー|送信できません|"
    r"недостав|не доставлен|nicht zugestellt|non distribu|no entregado|non consegnat|返送|不達",
    re.IGNORECASE,
)

_OTHER_REPORTS = frozenset({"disposition-notification", "tlsrpt"})
_INLINE_DS = re.compile(
    r"^[ \t]*(?:reporting-mta|original-envelope-id|final-recipient|original-recipient|action)[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_RECIPIENT = re.compile(r"^[ \t]*final-recipient[ \t]*:", re.IGNORECASE | re.MULTILINE)
_BOUNCE_BODY = re.compile(
    r"could(?: not|n't) be delivered|was not delivered|undeliverable|deliver(?:y|ing) (?:has )?failed|"
    r"failed to deliver|unable to deliver|(?:delivery|deliver) to the following|permanent(?:ly)? (?:error|fail)|"
    r"returned to sender|non-?delivery|not (?:be )?delivered|following (?:address|recipient)|"
    r"user unknown|mailbox (?:is )?full|delivery (?:status|problem|error)|could not deliver|"
    r"rejected (?:your|the) message|message (?:was )?rejected|"
    r"nicht zugestellt|pas pu être (?:remis|distribu)|не (?:было |может быть )?доставлен|配信できません",
    re.IGNORECASE,
)


def parse(data: bytes) -> list[DsnRecord]:
    """Every bounce/complaint/auto-reply record in one message; [] for anything else."""
    try:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return []
        return _parse(bytes(data))[:MAX_RECORDS]
    except Exception:  # noqa: BLE001 - hostile input must never take the caller down
        return []


def _parse(data: bytes) -> list[DsnRecord]:
    parts = split_parts(data)
    msg = parts.message
    if is_feedback_report(parts):
        return complaint_records(parts)
    if not parts.ds_text and parts.texts and looks_like_ses(parts.texts[0]):
        found = ses_records(parts.texts[0])
        if found:
            return found
    bounce = _looks_like_bounce(parts)
    if not parts.ds_text and bounce:
        # Delivery-status fields pasted into the text (PMDF, WorkMail, broken MIME).
        text = _human_text(parts)
        inline = _INLINE_DS.search(text)
        if inline and _INLINE_RECIPIENT.search(text, inline.start()):
            parts.ds_text.append(text[inline.start() :])
    records: list[DsnRecord] = []
    if parts.ds_text:
        records = _from_delivery_status(parts)
    if not records and (bounce or parts.ds_text):
        records = _from_text(parts)
    if not records and not bounce and not parts.ds_text and is_auto_reply(msg):
        if is_held_notice(msg, _human_text(parts)[:4000]):
            return []  # challenge-response or moderation: the mail waits, nobody is away
        return auto_reply_records(msg)
    return records


def _looks_like_bounce(parts: Parts) -> bool:
    msg = parts.message
    if msg.get("X-Failed-Recipients") is not None:
        return True
    if msg.get_content_type() == "multipart/report":
        # Read receipts (RFC 8098) and TLS reports (RFC 8460) share the container.
        report_type = (msg.get_param("report-type") or "").strip().lower()
        if report_type not in _OTHER_REPORTS:
            return True
    sender = header_text(msg, "From")
    if _BOUNCE_FROM.search(sender):
        return True
    subject = header_text(msg, "Subject")
    if _BOUNCE_SUBJECT.search(subject):
        return True
    # Weak evidence (a null envelope sender, a returned message attached) counts only
    # together with bounce wording in the text: vacation replies have null senders too.
    weak = header_text(msg, "Return-Path").strip() in ("<>", "") and msg.get("Return-Path") is not None
    weak = weak or parts.original is not None or bool(parts.original_text)
    return weak and bool(_BOUNCE_BODY.search(_human_text(parts)[:8000]))


def _own_addresses(parts: Parts) -> frozenset[str]:
    """Addresses of the bounce's own envelope and headers: never failed recipients."""
    return _addresses(parts.message, ("From", "Sender", "Errors-To"))


def _addresses(msg: Entity, names: tuple[str, ...]) -> frozenset[str]:
    found: set[str] = set()
    for name in names:
        value = msg.get(name)
        if value is not None:
            found.update(m.group(1).lower() for m in ADDRESS_RE.finditer(value[:1000]))
    return frozenset(found)


def _human_text(parts: Parts) -> str:
    return "\n".join(parts.texts)[:65536]


def _from_delivery_status(parts: Parts) -> list[DsnRecord]:
    text = _human_text(parts)
    scraped = {s.recipient.lower(): s for s in scrape(text, _own_addresses(parts))} if text.strip() else {}
    original_id = message_id(parts.original, parts.original_text)
    records: list[DsnRecord] = []
    for ds in parts.ds_text:
        per_message, recipients = parse_delivery_status(ds)
        for fields in recipients:
            diagnostic = fields.diagnostic
            code = reply_code(diagnostic)
            command = find_command(diagnostic)
            extra = scraped.get(fields.recipient.lower()) or scraped.get(fields.original.lower())
            if extra is None and len(scraped) == 1 and len(recipients) == 1:
                extra = next(iter(scraped.values()))
            fallbacks = [text]
            if extra is not None:
                code = code or extra.code
                command = command or extra.command
                fallbacks = [extra.diagnostic, extra.context, text]
                if not diagnostic:
                    diagnostic = extra.diagnostic
            elif len(recipients) == 1:
                command = command or find_command(text)
            action = fields.action or ("delayed" if fields.status.startswith("4") else "failed")
            records.append(_record(
                recipient=fields.recipient, action=action, status=fields.status, code=code,
                diagnostic=diagnostic, command=command, diagnostic_type=fields.diagnostic_type,
                remote_mta=fields.remote_mta or per_message.received_from, message_id=original_id,
                fallbacks=fallbacks,
            ))
    return records


def _from_text(parts: Parts) -> list[DsnRecord]:
    text = _human_text(parts)
    own = _own_addresses(parts)
    found = scrape(text, own)
    failed_header = header_text(parts.message, "X-Failed-Recipients")
    if failed_header:
        listed = [clean_address(a) for _, a in getaddresses([failed_header])]
        by_addr = {s.recipient.lower(): s for s in found}
        found = [by_addr.get(a.lower()) or Scraped(recipient=a) for a in listed if a]
    if not found:
        found = [Scraped(recipient=a) for a in _original_recipients(parts)]
    if parts.original is None and not parts.original_text:
        # A notice to the user about their own mailbox (a postmaster's quota warning)
        # names its addressee; a bounce naming its own addressee shows a code for it.
        addressees = _addresses(parts.message, ("To", "Delivered-To", "X-Original-To"))
        found = [s for s in found if s.recipient.lower() not in addressees or s.code or s.status]
    original_id = message_id(parts.original, parts.original_text)
    delayed = _says_delayed(header_text(parts.message, "Subject"), text)
    records = []
    for item in found:
        status = item.status
        action = "delayed" if delayed or status.startswith("4") and not _says_failed(text) else "failed"
        records.append(_record(
            recipient=item.recipient, action=action, status=status, code=item.code or find_code(item.diagnostic),
            diagnostic=item.diagnostic, command=item.command or (find_command(text) if len(found) == 1 else ""),
            diagnostic_type="", remote_mta="", message_id=original_id, fallbacks=[item.context, text],
        ))
    return records


_TO_LINE = re.compile(r"^[ \t]*to:[ \t]*([^\n]{1,500})", re.IGNORECASE | re.MULTILINE)


def _original_recipients(parts: Parts) -> list[str]:
    """The To of the returned message: the last resort when the text names nobody."""
    value = header_text(parts.original, "To") if parts.original is not None else ""
    if not value and parts.original_text:
        found = _TO_LINE.search(parts.original_text[:20000])
        value = found.group(1) if found else ""
    addrs = [clean_address(a) for _, a in getaddresses([value])] if value else []
    addrs = [a for a in addrs if a]
    return addrs if len(addrs) == 1 else []


_DELAYED = re.compile(r"delay|will (?:continue to )?(?:retry|try)|not yet been delivered|warning", re.IGNORECASE)
_FAILED = re.compile(r"permanent|fatal|failed|could\s+not\s+be\s+delivered|giving up|gave up", re.IGNORECASE)


def _says_delayed(subject: str, text: str) -> bool:
    return bool(_DELAYED.search(subject)) and not _FAILED.search(subject)


def _says_failed(text: str) -> bool:
    return bool(_FAILED.search(text[:4000]))


def _record(
    *, recipient: str, action: str, status: str, code: int, diagnostic: str, command: str,
    diagnostic_type: str, remote_mta: str, message_id: str, fallbacks: list[str],
) -> DsnRecord:
    if not status and diagnostic:
        status = failure_status(diagnostic[:600])
    reason, klass = classify(status=status, code=code, text=diagnostic, action=action, command=command,
                             diagnostic_type=diagnostic_type)
    diagnostic_says = None
    for extra in fallbacks:
        if reason != "undefined" and not (reason == "expired" and not status):
            break
        if diagnostic_says is None:
            diagnostic_says = bool(reason_from_text(fold(diagnostic)))
        if extra and not diagnostic_says:
            if not code:
                code = find_code(extra)
            if not status:
                status = failure_status(extra[:2000])
            reason, klass = classify(status=status, code=code, text=extra, action=action, command=command)
    if action == "delivered":
        reason, klass = "delivered", "unknown"
    if not status:
        if code:
            status = f"{code // 100}.0.0"
        elif action == "delayed":
            status = "4.0.0"
        elif action == "failed":
            status = "5.0.0"
        klass = bounce_class(reason, code, status)  # notaccept's class follows the code
    return DsnRecord(
        recipient=recipient, action=action, status=status, reason=reason, class_=klass,
        diagnostic=" ".join(diagnostic.split())[:MAX_DIAGNOSTIC], remote_mta=remote_mta, message_id=message_id,
    )
