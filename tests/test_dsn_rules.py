"""The generalised rules of the DSN classifier, each shown on a small report of our own.

Samples are written from the documented formats (Amazon SES notifications, Postfix and
Exim transcripts, Microsoft/Gmail/Yahoo replies), not copied from any corpus.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mtad.dsn import classify_reply, parse
from mtad.dsn.mime import trim_originals


def _ses(doc: dict[str, Any], *, wrap: bool = False) -> bytes:
    body = json.dumps(doc)
    if wrap:
        body = json.dumps({"Type": "Notification", "MessageId": "m-1", "Message": body})
    return (
        b"From: no-reply@sns.amazonaws.com\nTo: ops@sender.example\nSubject: AWS Notification Message\n"
        b"Content-Type: text/plain; charset=UTF-8\n\n" + body.encode() + b"\n--\nIf you wish to stop ...\n"
    )


_MAIL = {"messageId": "ses-1", "commonHeaders": {"messageId": "<orig-9@sender.example>"}}


@pytest.mark.parametrize("wrap", [False, True])
def test_ses_bounce_notification(wrap: bool) -> None:
    doc = {"notificationType": "Bounce", "mail": _MAIL, "bounce": {
        "bounceType": "Permanent", "bounceSubType": "General", "reportingMTA": "dsn; a1.smtp-out.example",
        "bouncedRecipients": [
            {"emailAddress": "gone@rcpt.example", "action": "failed", "status": "5.1.1",
             "diagnosticCode": "smtp; 550 5.1.1 user unknown"},
            {"emailAddress": "full@rcpt.example", "action": "failed", "status": "5.2.2",
             "diagnosticCode": "smtp; 552 5.2.2 Mailbox full"},
        ]}}
    gone, full = parse(_ses(doc, wrap=wrap))
    assert (gone.recipient, gone.status, gone.reason, gone.class_) == ("gone@rcpt.example", "5.1.1", "userunknown", "hard")
    assert (full.reason, full.class_) == ("mailboxfull", "soft")
    assert gone.message_id == "<orig-9@sender.example>"
    assert gone.diagnostic == "550 5.1.1 user unknown"


def test_ses_subtype_decides_when_the_text_says_nothing() -> None:
    doc = {"eventType": "Bounce", "mail": _MAIL, "bounce": {
        "bounceType": "Permanent", "bounceSubType": "NoEmail",
        "bouncedRecipients": [{"emailAddress": "x@rcpt.example"}]}}
    [r] = parse(_ses(doc))
    assert (r.action, r.status, r.reason, r.class_) == ("failed", "5.0.0", "userunknown", "hard")


def test_ses_complaint_and_delivery() -> None:
    complaint = {"notificationType": "Complaint", "mail": _MAIL, "complaint": {
        "complaintFeedbackType": "abuse", "complainedRecipients": [{"emailAddress": "erin@mailbox.example"}]}}
    [c] = parse(_ses(complaint))
    assert (c.recipient, c.reason, c.class_, c.feedback_type) == ("erin@mailbox.example", "feedback", "complaint", "abuse")
    delivery = {"notificationType": "Delivery", "mail": _MAIL, "delivery": {
        "recipients": ["ok@rcpt.example"], "smtpResponse": "250 2.6.0 Message received"}}
    [d] = parse(_ses(delivery))
    assert (d.action, d.status, d.reason) == ("delivered", "2.6.0", "delivered")


@pytest.mark.parametrize("text", [b"{", b'{"notificationType": 5}', b'{"Type": "Notification", "Message": "[[[["}',
                                  b'{"notificationType": "Bounce", "bounce": {"bouncedRecipients": [1, "x"]}}'])
def test_broken_ses_json_gives_nothing(text: bytes) -> None:
    assert parse(b"From: no-reply@sns.amazonaws.com\nSubject: AWS Notification Message\n\n" + text) == []


@pytest.mark.parametrize(("text", "reason", "klass"), [
    # A bare "user unknown" with no SMTP stage is what content filters say: filtered.
    ("550 Unknown user", "filtered", "soft"),
    # ...but X.1.x proves it is about the address,
    ("550 5.1.1 Unknown user", "userunknown", "hard"),
    # and so do replies that only a recipient lookup produces.
    ("550 5.5.0 Requested action not taken: mailbox unavailable", "userunknown", "hard"),
    ("554 delivery error: dd This user doesn't have a rcpt.example account", "userunknown", "hard"),
    ("550 5.4.1 Recipient address rejected: Access denied", "userunknown", "hard"),
    ("550 5.1.1 The email account that you tried to reach does not exist.", "userunknown", "hard"),
    # RFC 3463 detail texts printed verbatim after a Postfix prefix.
    ("550 Recipient address rejected: Bad destination system address", "hostunknown", "hard"),
    ("552 Recipient address rejected: Message length exceeds administrative limit", "exceedlimit", "soft"),
    # The cause beats the expiry it led to; X.7.9 is an authentication matter.
    ("Deferred: Name server: host name lookup failure; message could not be delivered for 5 days",
     "networkerror", "soft"),
    ("550 5.7.9 Rejected", "securityerror", "soft"),
    # A local part is not the reply speaking.
    ("550 5.0.0 <mailboxfull@rcpt.example>: message refused by filter", "filtered", "soft"),
])
def test_classify_reply_rules(text: str, reason: str, klass: str) -> None:
    code = int(text[:3]) if text[:3].isdigit() else 0
    assert classify_reply(code, "", text) == (reason, klass)


def _dsn(status: str, diagnostic: str, human: str = "") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.sender.example\nTo: alice@sender.example\nSubject: Undelivered Mail\n"
        'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        f"--B\nContent-Type: text/plain\n\n{human}\n\n--B\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.sender.example\n\nFinal-Recipient: rfc822; bob@rcpt.example\nAction: failed\n"
        f"Status: {status}\nDiagnostic-Code: smtp; {diagnostic}\n\n--B\nContent-Type: message/rfc822\n\n"
        "From: alice@sender.example\nTo: bob@rcpt.example\nMessage-ID: <orig-7@sender.example>\n"
        'Content-Type: multipart/mixed; boundary="INNER"\n\n--INNER\nContent-Type: text/plain\n\nhello\n'
        "--INNER--\n\n--B--\n"
    ).encode()


def test_remote_reply_code_beats_the_reporting_mtas_status() -> None:
    [r] = parse(_dsn("5.0.0", "550 5.7.1 IP address blacklisted"))
    assert (r.status, r.reason) == ("5.7.1", "blocked")
    # A gateway's summary first, the remote reply quoted after it: the remote one counts.
    [r] = parse(_dsn("5.0.0", "5.1.0 - Unknown address error 550-'5.2.2 <bob@rcpt.example>... Mailbox Full'"))
    assert (r.status, r.reason) == ("5.2.2", "mailboxfull")
    # Never across class digits: a 4xx reply inside a failed report stays 5.x.x.
    [r] = parse(_dsn("5.4.7", "421 4.4.2 Connection timed out"))
    assert r.status == "5.4.7"


def test_rcpt_stage_in_the_human_part_makes_unknown_user_hard() -> None:
    human = ("<bob@rcpt.example>: host mx.rcpt.example[192.0.2.1] said: 550 Unknown user\n"
             "    (in reply to RCPT TO command)")
    [r] = parse(_dsn("5.0.0", "550 Unknown user", human))
    assert (r.reason, r.class_) == ("userunknown", "hard")
    [r] = parse(_dsn("5.0.0", "550 Unknown user", "The message was refused."))
    assert (r.reason, r.class_) == ("filtered", "soft")


EXIM_REPEATED = b"""\
From: Mail Delivery System <Mailer-Daemon@mx.sender.example>
To: alice@sender.example
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: bob@rcpt.example

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  bob@rcpt.example
    SMTP error from remote mail server after RCPT TO:<bob@rcpt.example>:
    host mx.rcpt.example [192.0.2.12]: 550 5.2.1 <bob@rcpt.example>... User Unknown
"""

POSTFIX_TRANSCRIPT = b"""\
From: MAILER-DAEMON@mx.sender.example (Mail Delivery System)
To: alice@sender.example
Subject: Undelivered Mail Returned to Sender

<bob@rcpt.example>: host mx.rcpt.example said:
 Out: 250 2.1.0 Ok
 Out: 250 2.1.5 Ok
 Out: 451 4.3.0 Error: queue file write error
"""


def test_text_bounce_keeps_the_words_around_a_repeated_address() -> None:
    [r] = parse(EXIM_REPEATED)
    assert (r.recipient, r.status, r.reason, r.class_) == ("bob@rcpt.example", "5.2.1", "userunknown", "hard")


def test_transcript_status_is_the_failing_reply() -> None:
    [r] = parse(POSTFIX_TRANSCRIPT)
    assert (r.status, r.reason) == ("4.3.0", "systemerror")


def test_trim_originals_keeps_headers_and_drops_the_returned_body() -> None:
    data = _dsn("5.1.1", "550 5.1.1 User unknown")
    trimmed = trim_originals(data)
    assert b"Message-ID: <orig-7@sender.example>" in trimmed
    assert b"--INNER" not in trimmed and trimmed.rstrip().endswith(b"--B--")
    [r] = parse(data)
    assert r.message_id == "<orig-7@sender.example>"
    # No enclosing boundary found: nothing is cut.
    plain = b"Subject: x\n\nContent-Type: message/rfc822\n\nTo: a@b.example\n\nbody\n"
    assert trim_originals(plain) == plain
