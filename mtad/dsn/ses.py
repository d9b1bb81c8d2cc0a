"""Amazon SES event notifications (JSON mailed through SNS) as bounce/complaint records.

Pure. SES reports bounces, complaints and deliveries as a JSON document, either as the
whole mail body ("notificationType": "Bounce" | "Complaint" | "Delivery") or wrapped in
an SNS envelope ("Type": "Notification", "Message": "<the JSON as a string>"); event
publishing names the kind "eventType" instead. The per-recipient status and
diagnosticCode decide the reason like any DSN; bounceType/bounceSubType fill in when
the remote text says nothing we know.
Trust: the body is hostile text; it is size-capped, parsed with the stdlib JSON decoder
(whose errors, including deep nesting, are caught) and every field is type-checked.
RFCs: 3463 (status codes in "status"), 5965 (complaint feedback types).
"""

from __future__ import annotations

import json
from typing import Any

from mtad.dsn.classify import bounce_class, classify
from mtad.dsn.record import DsnRecord, clean_address, clean_status

MAX_JSON = 256 * 1024
MAX_RECIPIENTS = 500
_KINDS = ("bounce", "complaint", "delivery")

# bounceSubType -> reason when the diagnostic text does not decide it (SES documents
# these subtypes; "Suppressed" means SES itself refused an address that hard-bounced).
_SUBTYPE_REASON = {
    "noemail": "userunknown",
    "suppressed": "userunknown",
    "onaccountsuppressionlist": "onhold",
    "mailboxfull": "mailboxfull",
    "messagetoolarge": "mesgtoobig",
    "contentrejected": "contenterror",
    "attachmentrejected": "securityerror",
}
_DECODER = json.JSONDecoder()


def looks_like_ses(text: str) -> bool:
    head = text.lstrip()[:2000]
    return head.startswith("{") and ('"notificationType"' in head or '"eventType"' in head or '"Type"' in head)


def ses_records(text: str) -> list[DsnRecord]:
    """Records of one SES notification body; [] when it is not one."""
    doc = _load(text)
    if isinstance(doc, dict) and isinstance(doc.get("Message"), str) and doc.get("Type") == "Notification":
        doc = _load(doc["Message"])
    if not isinstance(doc, dict):
        return []
    kind = _str(doc.get("notificationType") or doc.get("eventType")).lower()
    if kind not in _KINDS:
        return []
    mail = doc.get("mail")
    message_id = _message_id(mail) if isinstance(mail, dict) else ""
    body = doc.get(kind)
    if not isinstance(body, dict):
        return []
    if kind == "complaint":
        return _complaints(body, message_id)
    if kind == "delivery":
        return _deliveries(body, message_id)
    return _bounces(body, message_id)


def _bounces(body: dict[str, Any], message_id: str) -> list[DsnRecord]:
    bounce_type = _str(body.get("bounceType")).lower()
    subtype = _str(body.get("bounceSubType")).lower()
    remote = _after_type(_str(body.get("remoteMtaIp")) or _str(body.get("reportingMTA")))
    out = []
    for item in _items(body.get("bouncedRecipients")):
        addr = clean_address(_str(item.get("emailAddress")))
        if not addr:
            continue
        diagnostic = _str(item.get("diagnosticCode"))
        kind, _, rest = diagnostic.partition(";")
        if _ and len(kind) < 20 and " " not in kind.strip():
            diagnostic = rest.strip()
        status = clean_status(_str(item.get("status"))) or clean_status(diagnostic[:200])
        transient = bounce_type == "transient" or status.startswith("4")
        action = _str(item.get("action")).lower() or ("delayed" if transient else "failed")
        if action not in ("failed", "delayed", "delivered", "relayed", "expanded"):
            action = "delayed" if transient else "failed"
        reason, klass = classify(status=status, text=diagnostic, action=action)
        if reason in ("undefined", "onhold") and subtype in _SUBTYPE_REASON:
            reason = _SUBTYPE_REASON[subtype]
            klass = bounce_class(reason, 0, status)
        if not status:
            status = "4.0.0" if transient else "5.0.0"
        out.append(DsnRecord(
            recipient=addr, action=action, status=status, reason=reason, class_=klass,
            diagnostic=" ".join(diagnostic.split())[:1000], remote_mta=remote, message_id=message_id,
        ))
    return out[:MAX_RECIPIENTS]


def _complaints(body: dict[str, Any], message_id: str) -> list[DsnRecord]:
    feedback = _str(body.get("complaintFeedbackType")).lower()[:32] or "abuse"
    out = []
    for item in _items(body.get("complainedRecipients")):
        addr = clean_address(_str(item.get("emailAddress")))
        if addr:
            out.append(DsnRecord(recipient=addr, reason="feedback", class_="complaint",
                                 feedback_type=feedback, message_id=message_id))
    return out[:MAX_RECIPIENTS]


def _deliveries(body: dict[str, Any], message_id: str) -> list[DsnRecord]:
    reply = _str(body.get("smtpResponse"))
    status = clean_status(reply[:200]) or "2.0.0"
    remote = _after_type(_str(body.get("reportingMTA")))
    out = []
    recipients = body.get("recipients")
    for raw in recipients[:MAX_RECIPIENTS] if isinstance(recipients, list) else []:
        addr = clean_address(_str(raw))
        if addr:
            out.append(DsnRecord(recipient=addr, action="delivered", status=status, reason="delivered",
                                 class_="unknown", diagnostic=reply[:1000], remote_mta=remote,
                                 message_id=message_id))
    return out


def _message_id(mail: dict[str, Any]) -> str:
    common = mail.get("commonHeaders")
    if isinstance(common, dict) and _str(common.get("messageId")):
        return _str(common.get("messageId")).split()[0][:250]
    for header in _items(mail.get("headers")):
        if _str(header.get("name")).lower() == "message-id":
            value = _str(header.get("value")).split()
            return value[0][:250] if value else ""
    return ""


def _load(text: str) -> Any:
    try:
        return _DECODER.raw_decode(text.strip()[:MAX_JSON])[0]
    except (ValueError, RecursionError):
        return None


def _items(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [v for v in value[:MAX_RECIPIENTS] if isinstance(v, dict)]


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _after_type(value: str) -> str:
    kind, sep, rest = value.partition(";")
    return (rest if sep else kind).strip()[:255]
