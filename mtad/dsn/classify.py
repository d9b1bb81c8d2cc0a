"""Decide why a recipient failed: reason (sisimai v5 vocabulary) and class (hard/soft/...).

Pure. One classifier for both paths, so a 550 at RCPT and a later DSN for the same
failure give the same reason: `classify_reply` for synchronous SMTP replies (the delivery
engine), `classify` for report fields (the DSN parser). Text beats status code, because
providers reuse generic codes (5.7.1, 5.0.0) for everything and say what they mean in
words; the code decides when the words say nothing we know.
RFCs: 3463 and 7372 (enhanced status codes), 5321 section 4.2 (reply codes),
7505 (null MX: X.1.10 / X.7.27).
"""

from __future__ import annotations

import re

from mtad.dsn.phrases import DEFINITIVE_USERUNKNOWN, FILTERED
from mtad.dsn.record import HARD_REASONS, clean_status

MAX_SCAN = 2048  # characters of reply text the phrase table looks at

# Enhanced status codes whose meaning is specific enough to name a reason on their own.
# Subject.detail -> reason; the class digit is handled separately.
_BY_STATUS: dict[str, str] = {
    "1.0": "userunknown", "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown",
    "1.4": "userunknown", "1.5": "userunknown", "1.6": "hasmoved", "1.7": "rejected",
    "1.8": "rejected", "1.9": "norelaying", "1.10": "userunknown",
    "2.0": "filtered", "2.1": "filtered", "2.2": "mailboxfull", "2.3": "exceedlimit", "2.4": "filtered",
    "3.0": "systemerror", "3.1": "systemfull", "3.2": "notaccept", "3.3": "contenterror",
    "3.4": "mesgtoobig", "3.5": "systemerror",
    "4.0": "networkerror", "4.1": "networkerror", "4.2": "networkerror", "4.3": "systemerror",
    "4.4": "networkerror", "4.5": "toomanyconn", "4.6": "networkerror", "4.7": "expired",
    "5.0": "syntaxerror", "5.1": "syntaxerror", "5.2": "syntaxerror", "5.3": "exceedlimit",
    "5.4": "syntaxerror", "5.5": "syntaxerror", "5.6": "syntaxerror",
    "6.0": "contenterror", "6.1": "contenterror", "6.2": "contenterror", "6.3": "contenterror",
    "6.4": "contenterror", "6.5": "contenterror", "6.6": "contenterror", "6.7": "contenterror",
    "6.8": "contenterror", "6.9": "contenterror", "6.10": "contenterror",
    "7.0": "securityerror", "7.1": "securityerror", "7.2": "securityerror", "7.3": "securityerror",
    "7.4": "securityerror", "7.5": "securityerror", "7.6": "securityerror", "7.7": "policyviolation",
    "7.8": "securityerror", "7.9": "securityerror", "7.10": "securityerror", "7.11": "securityerror",
    "7.12": "securityerror", "7.13": "suspend", "7.14": "securityerror", "7.15": "securityerror",
    "7.17": "hasmoved", "7.18": "hasmoved", "7.19": "hasmoved",
    "7.20": "authfailure", "7.21": "authfailure", "7.22": "authfailure", "7.23": "authfailure",
    "7.24": "authfailure", "7.25": "requireptr", "7.26": "authfailure", "7.27": "notaccept",
    "7.28": "toomanyconn", "7.29": "authfailure", "7.30": "securityerror",
}
# Codes so generic that any matching words override them; other codes are trusted over
# broad phrases (see _WEAK_TEXT).
_GENERIC_STATUS = frozenset({
    "0.0", "1.0", "2.0", "3.0", "4.0", "5.0", "6.0", "7.0", "7.1", "3.5", "2.1", "1.10", "4.1", "4.4",
})
# Reasons a broad phrase may claim even over a specific status code.
_STRONG_TEXT = frozenset({
    "virusdetected", "authfailure", "requireptr", "badreputation", "norelaying", "mailboxfull",
    "hasmoved", "mesgtoobig", "hostunknown", "suspend", "userunknown", "spamdetected", "blocked",
    "toomanyconn", "exceedlimit", "notcompliantrfc", "rejected", "mailererror", "filtered",
    "policyviolation", "expired", "systemfull",
})

_LOCAL_DELIVERY = frozenset({"mailboxfull", "systemfull", "mesgtoobig"})
_ADDRESS_STATUS = re.compile(r"^[45]\.1\.\d{1,3}$")
_REPLY_CODE = re.compile(r"(?<!\d)([245]\d\d)(?:[ \-]|$)")
_SPACES = re.compile(r"\s+")
_ADDRESS_WORD = re.compile(r"[^\s<>()\[\]\"',;:]{0,128}@[^\s<>()\[\]\"',;:]{1,255}")


def fold(text: str) -> str:
    """Lower-case, whitespace-collapsed, capped: the form the phrase table matches.

    Addresses are blanked first: a local part ("mailboxfull@", "no-such-user@") is not
    the reply speaking.
    """
    text = text[: MAX_SCAN * 2]
    if "@" in text:
        text = _ADDRESS_WORD.sub(" <> ", text)
    return _SPACES.sub(" ", text).lower()[:MAX_SCAN]


def reason_from_text(text: str) -> str:
    """The first reason whose phrases occur in `text` (already folded), or "".

    "expired" (the queue gave up) is the consequence of some other failure; when the
    text also names the cause (a DNS failure, a directory server down), the cause wins.
    """
    expired = False
    for reason, pattern, needed in FILTERED:
        if expired and reason in _NOT_A_CAUSE:
            continue
        if needed is not None:
            for needle in needed:
                if needle in text:
                    break
            else:
                continue  # none of the words this reason's phrases need: skip the search
        if pattern.search(text):
            if reason != "expired":
                return reason
            expired = True
    return "expired" if expired else ""


_SENDER_SIDE = frozenset({"", "userunknown", "hostunknown", "filtered", "securityerror", "systemerror"})
_TLS = re.compile(r"starttls|\btls\b|encryption|requiretls")
# Reasons too vague to report for a message that is only delayed (sisimai: "expired").
_NOT_A_DELAY_CAUSE = frozenset({"networkerror", "securityerror", "policyviolation", "syntaxerror",
                                "contenterror", "notcompliantrfc", "filtered"})
# Reasons matched by phrases too broad to name the cause behind an expiry.
_NOT_A_CAUSE = frozenset({"expired", "systemerror", "syntaxerror", "filtered", "policyviolation",
                          "securityerror", "contenterror", "notcompliantrfc"})


def reason_from_status(status: str) -> str:
    if not status:
        return ""
    _, _, rest = status.partition(".")
    if rest.startswith("7.6") and len(rest) == 5:  # Microsoft 5.7.6xx: IP blocked
        return "badreputation" if rest == "7.650" else "blocked"
    return _BY_STATUS.get(rest, "")


def classify(
    *,
    status: str = "",
    code: int = 0,
    text: str = "",
    action: str = "",
    command: str = "",
    diagnostic_type: str = "",
) -> tuple[str, str]:
    """(reason, class) for one recipient of a report or one SMTP reply."""
    folded = fold(text)
    reason = _decide(status, folded)
    if diagnostic_type.lower().startswith("x-unix") and reason not in _LOCAL_DELIVERY:
        # A local delivery program failed; only a full disk or quota is more specific.
        reason = "mailererror"
    command = command.upper()
    if (reason == "userunknown" and command != "RCPT" and not _ADDRESS_STATUS.match(status)
            and not DEFINITIVE_USERUNKNOWN.search(folded)):
        # Only a RCPT reply (or an X.1.x code) proves the mailbox is unknown; "unknown
        # user" after DATA, or from a filtering gateway that gives no SMTP context, is
        # a filter speaking (sisimai's "filtered").
        reason = "filtered"
    elif command == "MAIL" and reason in _SENDER_SIDE and not (reason == "securityerror" and _TLS.search(folded)):
        # Refused at MAIL FROM: the sender was judged, unless the server wants TLS first.
        reason = "rejected"
    if action == "delayed" and reason in _NOT_A_DELAY_CAUSE:
        # A delay notice whose reply names no cause of its own: the delay is the news.
        reason = "expired"
    if not reason:
        if action == "delayed" or status.startswith("4.4.7"):
            reason = "expired"
        elif status.endswith(".0.0") or not status:
            reason = _from_code(code, status, action)
    if not reason:
        reason = "undefined"
    return reason, bounce_class(reason, code, status)


def _decide(status: str, folded: str) -> str:
    by_text = reason_from_text(folded) if folded else ""
    by_status = reason_from_status(status)
    if not by_status:
        return by_text
    if not by_text:
        return by_status
    _, _, rest = status.partition(".")
    if by_status == "rejected" and by_text in ("hostunknown", "userunknown"):
        return by_status  # X.1.7/X.1.8: the sender's address or domain is what is unknown
    if rest in _GENERIC_STATUS or by_text in _STRONG_TEXT or by_status == "expired":
        return by_text
    return by_status


def _from_code(code: int, status: str, action: str) -> str:
    if code in (421, 450, 451, 452):
        return {421: "systemerror", 450: "systemerror", 451: "systemerror", 452: "systemfull"}[code]
    if action == "failed" and status.startswith("4."):
        return "expired"
    return ""


def bounce_class(reason: str, code: int = 0, status: str = "") -> str:
    """hard | soft | complaint | auto-reply | unknown for a reason (and its code)."""
    if reason in HARD_REASONS:
        return "hard"
    if reason == "notaccept":
        permanent = 500 <= code < 600 or (not code and status.startswith("5"))
        return "hard" if permanent else "soft"
    if reason == "feedback":
        return "complaint"
    if reason == "vacation":
        return "auto-reply"
    if reason in ("undefined", "onhold", "delivered"):
        return "unknown"
    return "soft"


def reply_code(text: str) -> int:
    """The first SMTP reply code in a line of text (550, 421, ...), or 0."""
    found = _REPLY_CODE.search(text[:MAX_SCAN])
    return int(found.group(1)) if found else 0


def classify_reply(code: int, status: str, text: str) -> tuple[str, str]:
    """(reason, class) for a synchronous SMTP reply, e.g. (550, "5.1.1", "User unknown").

    The delivery engine calls this for RCPT/DATA replies so that in-session failures and
    later DSNs share one vocabulary. Never raises.
    """
    try:
        status = clean_status(status) if status else clean_status(text[:64])
        return classify(status=status, code=code, text=text)
    except Exception:  # noqa: BLE001 - a classifier must never take the caller down
        return "undefined", "unknown"
