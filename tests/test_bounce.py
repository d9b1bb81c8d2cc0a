"""DSN building (mtad.deliver.bounce): structure read back with the email package and with
our own DSN parser, RET, ENVID, ORCPT, 8-bit and huge originals, delay warnings, SMTPUTF8."""

from __future__ import annotations

import email
import re
from email import policy as email_policy
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtad.deliver import bounce
from mtad.deliver.bounce import (
    Failure,
    build_dsn,
    needs_smtputf8,
    submission_flags,
    wants_dsn,
    xtext_decode,
)
from mtad.deliver.outcome import Outcome, expired, from_reply, local, network_error
from mtad.dsn import DsnRecord, parse
from mtad.records import Attempt, Envelope, Recipient

NOW = 1_700_000_000.0
ARRIVAL = NOW - 3 * 3600
HOST = "mx.example.test"
ORIGINAL = (b"Received: from client.example.org (client.example.org [192.0.2.9])\r\n"
            b"\tby mx.example.test with ESMTP id 0123456789abcdef012345\r\n"
            b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: lunch?\r\n"
            b"Message-ID: <lunch.1@example.org>\r\n\r\nAre you free on Friday?\r\n")
RELAY = "mx.example.net[192.0.2.7]:25"


def envelope(**fields: object) -> Envelope:
    values: dict[str, object] = {"id": "0123456789abcdef012345", "sender": "alice@example.org",
                                 "arrival_time": ARRIVAL, "size": len(ORIGINAL), "message_id": "<lunch.1@example.org>"}
    values.update(fields)
    return Envelope(**values)  # type: ignore[arg-type]


def failure(address: str, outcome: Outcome, relay: str = RELAY, **fields: object) -> Failure:
    return Failure(recipient=Recipient(address=address, **fields), outcome=outcome,  # type: ignore[arg-type]
                   relay=relay if outcome.remote else "")


def dsn(failures: list[Failure], action: str = "failed", env: Envelope | None = None,
        original: bytes = ORIGINAL, **kw: object) -> bytes:
    return build_dsn(envelope=env or envelope(), failures=failures, action=action,  # type: ignore[arg-type]
                     reporting_mta=HOST, original=original, now=NOW, **kw)  # type: ignore[arg-type]


def read(data: bytes) -> Any:
    """The DSN as the email package reads it (an EmailMessage; typed loosely for the tests)."""
    return email.message_from_bytes(data, policy=email_policy.default)


def parts(msg: Any) -> list[Any]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def report_fields(msg: Any) -> list[dict[str, str]]:
    """The delivery-status blocks as dicts (the email package parses them as header blocks)."""
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return [{k: " ".join(str(v).split()) for k, v in block.items()} for block in blocks]


USER_UNKNOWN = from_reply("rcpt", 550, "5.1.1 <bob@example.net>: Recipient address rejected: User unknown")
FULL = from_reply("rcpt", 452, "4.2.2 Mailbox full")


def assert_well_formed(data: bytes) -> None:
    """CRLF only, no line over 998 octets, a body that is ASCII unless the DSN says 8bit."""
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    head, _, body = data.partition(b"\r\n\r\n")
    assert (b"\r\nContent-Transfer-Encoding: 8bit" in head) is not body.isascii()


# --- who gets a DSN ----------------------------------------------------------------------

@pytest.mark.parametrize(("sender", "notify", "failed", "delayed"), [
    ("alice@example.org", "", True, True),
    ("alice@example.org", "NEVER", False, False),
    ("alice@example.org", "FAILURE", True, False),
    ("alice@example.org", "DELAY", False, True),
    ("alice@example.org", "SUCCESS", False, False),
    ("alice@example.org", "success,failure,delay", True, True),
    ("", "", False, False),  # never a bounce to the null sender
    ("", "FAILURE,DELAY", False, False),
])
def test_wants_dsn(sender: str, notify: str, failed: bool, delayed: bool) -> None:
    rcpt = Recipient(address="bob@example.net", notify=notify)
    assert wants_dsn(sender, rcpt, "failed") is failed
    assert wants_dsn(sender, rcpt, "delayed") is delayed


# --- structure --------------------------------------------------------------------------

def test_failed_dsn_structure() -> None:
    rcpt_history = [Attempt(time=NOW - 60, reply=USER_UNKNOWN.reply, relay=RELAY)]
    data = dsn([failure("bob@example.net", USER_UNKNOWN, history=rcpt_history)])
    assert_well_formed(data)
    assert data.isascii()
    msg = read(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime.timestamp() == NOW
    assert re.fullmatch(r"<0123456789abcdef012345\.[0-9a-f]+@mx\.example\.test>", msg["Message-ID"])
    assert dsn([failure("bob@example.net", USER_UNKNOWN, history=rcpt_history)]) == data  # deterministic
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert "Content-Transfer-Encoding" not in msg
    assert [p.get_content_type() for p in parts(msg)] == ["text/plain", "message/delivery-status", "message/rfc822"]
    human = parts(msg)[0].get_content()
    assert "<bob@example.net>: host mx.example.net[192.0.2.7]:25 said: 550 5.1.1" in human
    assert "(in reply to RCPT TO command)" in " ".join(human.split())
    per_message, per_rcpt = report_fields(msg)
    assert per_message == {"Reporting-MTA": "dns; mx.example.test", "X-Mtad-Queue-ID": "0123456789abcdef012345",
                           "Arrival-Date": "Tue, 14 Nov 2023 19:13:20 +0000"}
    assert per_rcpt == {
        "Final-Recipient": "rfc822; bob@example.net", "Action": "failed", "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:12:20 +0000",
    }
    # RET absent: the original comes back whole and byte for byte.
    assert ORIGINAL.rstrip(b"\r\n") in data
    returned = parts(msg)[2].get_payload()[0]
    assert returned["Message-ID"] == "<lunch.1@example.org>"


def test_round_trip_through_our_parser_with_several_recipients() -> None:
    null_mx = local("bounced", "5.1.10", "Domain nomx.example does not accept mail (nullMX)", phase="dns")
    gave_up = expired(network_error("connect", "Connection refused"))
    failures = [
        failure("bob@example.net", USER_UNKNOWN),
        failure("carol@example.net", from_reply("rcpt", 550, "5.7.1 Service unavailable; client host "
                                                "[192.0.2.1] blocked using zen.spamhaus.org")),
        failure("dan@nomx.example", null_mx),
        failure("erin@down.example", gave_up),
        failure("frank@example.net", expired(FULL)),
    ]
    data = dsn(failures)
    assert_well_formed(data)
    records = {r.recipient: r for r in parse(data)}
    assert list(records) == [f.recipient.address for f in failures]
    for f in failures:
        record = records[f.recipient.address]
        expected = (f.recipient.address, "failed", f.outcome.status, f.outcome.reason, f.outcome.bounce_class,
                    f.outcome.reply, "mx.example.net" if f.outcome.remote else "", "<lunch.1@example.org>")
        assert (record.recipient, record.action, record.status, record.reason, record.class_,
                record.diagnostic, record.remote_mta, record.message_id) == expected
    assert records["dan@nomx.example"].class_ == "hard" and records["erin@down.example"].status == "4.4.1"
    assert records["frank@example.net"].reason == "mailboxfull"


def test_ret_hdrs_returns_the_header_section_only() -> None:
    data = dsn([failure("bob@example.net", USER_UNKNOWN)], env=envelope(ret="HDRS"))
    msg = read(data)
    third = parts(msg)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    header_section = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert header_section in data
    assert b"Are you free on Friday?" not in data
    assert "the header section of your message" in parts(msg)[0].get_content()
    assert parse(data)[0].message_id == "<lunch.1@example.org>"


def test_ret_full_returns_the_whole_message() -> None:
    data = dsn([failure("bob@example.net", USER_UNKNOWN)], env=envelope(ret="FULL"))
    assert parts(read(data))[2].get_content_type() == "message/rfc822"
    assert ORIGINAL.rstrip(b"\r\n") + b"\r\n--" in data


def test_envid_and_orcpt_are_reported_decoded() -> None:
    env = envelope(envid="QQ+2B314+3D")
    data = dsn([failure("bob@example.net", USER_UNKNOWN, orcpt="rfc822;Bob+2BSales@Example.NET")], env=env)
    per_message, per_rcpt = report_fields(read(data))
    assert per_message["Original-Envelope-Id"] == "QQ+314="
    assert per_rcpt["Original-Recipient"] == "rfc822;Bob+Sales@Example.NET"
    assert list(per_rcpt)[:2] == ["Original-Recipient", "Final-Recipient"]
    assert parse(data)[0].recipient == "bob@example.net"  # Final-Recipient wins in the parser


def test_xtext_decoding() -> None:
    assert xtext_decode("plain") == "plain"
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("caf+C3+A9") == "café"
    assert xtext_decode("bad+FF") == "bad+FF"  # not UTF-8: kept as given
    assert xtext_decode("+2") == "+2"


def test_eight_bit_original_makes_the_dsn_8bit_and_says_so() -> None:
    original = ORIGINAL.replace(b"Are you free", b"Bist du frei am Fr\xc3\xbchst\xc3\xbcck")
    failures = [failure("bob@example.net", USER_UNKNOWN)]
    data = dsn(failures, original=original)
    assert_well_formed(data)
    msg = read(data)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "8bit"
    assert original.rstrip(b"\r\n") in data  # the 8-bit bytes are carried unchanged
    assert submission_flags(envelope(), failures, data) == ("8BITMIME", False)
    ascii_dsn = dsn(failures)
    assert submission_flags(envelope(), failures, ascii_dsn) == ("7BIT", False)
    # Headers only (RET=HDRS) from an ASCII header section: 7bit again.
    assert dsn(failures, env=envelope(ret="HDRS"), original=original).isascii()


def test_bare_line_ends_in_the_original_become_crlf() -> None:
    original = b"Subject: lf only\nX-Old: cr\r\n\nline one\nline two\rline three\r\n"
    data = dsn([failure("bob@example.net", USER_UNKNOWN)], original=original)
    assert_well_formed(data)
    assert b"Subject: lf only\r\nX-Old: cr\r\n\r\nline one\r\nline two\r\nline three\r\n--" in data


def test_huge_original_is_capped_to_its_headers() -> None:
    big = ORIGINAL + b"x" * 76 + b"\r\n"
    big += (b"y" * 998 + b"\r\n") * (bounce.MAX_ORIGINAL // 1000 + 10)
    assert len(big) > bounce.MAX_ORIGINAL
    data = dsn([failure("bob@example.net", USER_UNKNOWN)], original=big)
    assert len(data) < 10_000
    msg = read(data)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "too large to return whole" in parts(msg)[0].get_content()
    assert parse(data)[0].message_id == "<lunch.1@example.org>"
    # The cap is a parameter; just under it the message comes back whole.
    whole = dsn([failure("bob@example.net", USER_UNKNOWN)], original=ORIGINAL, max_original=len(ORIGINAL))
    assert parts(read(whole))[2].get_content_type() == "message/rfc822"


@pytest.mark.parametrize("body", [b"nul \x00 byte\r\n", b"z" * 1200 + b"\r\n"])
def test_an_original_smtp_cannot_carry_comes_back_as_headers(body: bytes) -> None:
    data = dsn([failure("bob@example.net", USER_UNKNOWN)], original=ORIGINAL + body)
    assert_well_formed(data)
    assert b"\x00" not in data
    msg = read(data)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "could not be returned whole" in parts(msg)[0].get_content()


def test_delay_warning() -> None:
    until = ARRIVAL + 5 * 86400
    data = dsn([failure("carol@example.net", FULL, notify="DELAY")], action="delayed", expires_at=until,
               env=envelope(ret="FULL"))
    assert_well_formed(data)
    msg = read(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    human = parts(msg)[0].get_content()
    assert "warning only" in human and "After 3 hours" in human and "Sun, 19 Nov 2023 19:13:20 +0000" in human
    _, per_rcpt = report_fields(msg)
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("delayed", "4.2.2")
    assert per_rcpt["Will-Retry-Until"] == "Sun, 19 Nov 2023 19:13:20 +0000"
    # A warning returns the headers only, whatever RET said.
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    [record] = parse(data)
    assert (record.recipient, record.action, record.status, record.diagnostic) == (
        "carol@example.net", "delayed", "4.2.2", "452 4.2.2 Mailbox full")


def test_failed_and_delayed_differ_only_where_they_should() -> None:
    failed = report_fields(read(dsn([failure("carol@example.net", expired(FULL))])))[1]
    delayed = report_fields(read(dsn([failure("carol@example.net", FULL)], action="delayed",
                                     expires_at=NOW + 3600)))[1]
    assert failed["Action"] == "failed" and "Will-Retry-Until" not in failed
    assert delayed["Action"] == "delayed" and "Will-Retry-Until" in delayed
    assert failed["Status"] == delayed["Status"] == "4.2.2"  # an expiry keeps the last status


def test_utf8_addresses_use_the_global_types() -> None:
    env = envelope(sender="álice@exämple.org", smtputf8=True)
    failures = [failure("bøb@example.net", USER_UNKNOWN), failure("carol@example.net", FULL)]
    assert needs_smtputf8(env, failures)
    original = "From: álice@exämple.org\r\nSubject: ¿qué?\r\n\r\nhola\r\n".encode()
    data = dsn(failures, env=env, original=original)
    assert_well_formed(data)
    assert submission_flags(env, failures, data) == ("8BITMIME", True)
    msg = read(data)
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/global-delivery-status", "message/global"]
    assert "To: <álice@exämple.org>".encode() in data
    assert "Final-Recipient: utf-8; bøb@example.net".encode() in data
    assert b"Final-Recipient: rfc822; carol@example.net" in data
    assert original.rstrip(b"\r\n") in data
    # The parser reads the global report (ASCII addresses only: its address pattern is ASCII).
    records = {r.recipient: r for r in parse(data)}
    carol = records["carol@example.net"]
    assert (carol.action, carol.status, carol.diagnostic, carol.remote_mta) == (
        "failed", "4.2.2", "452 4.2.2 Mailbox full", "mx.example.net")


def test_non_ascii_reply_without_smtputf8_keeps_the_report_ascii() -> None:
    reply = from_reply("rcpt", 550, "5.1.1 Empfänger unbekannt")
    data = dsn([failure("bob@example.net", reply)])
    assert data.isascii()
    msg = read(data)
    assert parts(msg)[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Empfänger unbekannt" in " ".join(parts(msg)[0].get_content().split())
    assert report_fields(msg)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf?nger unbekannt"


@pytest.mark.parametrize("smtputf8", [False, True])
def test_report_fields_are_text_not_encoded_words(smtputf8: bool) -> None:
    # A long URL must not be folded into encoded words, nor "=?...?=" in a reply decoded.
    reply = from_reply("rcpt", 550, "5.7.1 see https://example.net/policy/" + "x" * 150
                       + "?a=b rejected =?utf-8?q?caf=C3=A9?= by the policy of this server, for more")
    data = dsn([failure("bob@example.net", reply)], env=envelope(smtputf8=smtputf8))
    assert_well_formed(data)
    assert b"=?utf-8?q?caf=C3=A9?=" in data and b"/" + b"x" * 150 + b"?a=b" in data
    [record] = parse(data)
    assert (record.diagnostic, record.status, record.remote_mta) == (reply.reply, "5.7.1", "mx.example.net")
    diagnostic = next(line for line in data.split(b"\r\n") if line.startswith(b"Diagnostic-Code:"))
    assert len(diagnostic) <= 78  # folded at a space before the long word


def test_hostile_replies_and_originals_stay_inside_their_parts() -> None:
    evil = from_reply("rcpt", 550, "5.1.1 x\r\n\r\n--0123456789abcdef012345\r\nContent-Type: text/html\r\n\r\n<b>")
    original = (b"Subject: mime\r\nContent-Type: multipart/mixed; boundary=\"0123456789abcdef012345\"\r\n\r\n"
                b"--0123456789abcdef012345\r\nContent-Type: message/delivery-status\r\n\r\n"
                b"Final-Recipient: rfc822; mallory@example.com\r\nAction: failed\r\nStatus: 5.0.0\r\n\r\n"
                b"--0123456789abcdef012345--\r\n")
    data = dsn([failure("bob@example.net", evil)], original=original)
    assert_well_formed(data)
    assert [p.get_content_type() for p in parts(read(data))] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert [r.recipient for r in parse(data)] == ["bob@example.net"]


@pytest.mark.parametrize("original", [b"", b"\r\n\r\nbody without headers\r\n", b"no header at all",
                                      b"\xff\xfe\x00garbage", b"Subject: unterminated"])
def test_odd_originals_never_raise(original: bytes) -> None:
    data = dsn([failure("bob@example.net", USER_UNKNOWN)], original=original)
    assert_well_formed(data)
    assert [r.recipient for r in parse(data)] == ["bob@example.net"]


def test_header_sections_without_headers_or_too_long() -> None:
    failures = [failure("bob@example.net", USER_UNKNOWN)]
    hdrs = envelope(ret="HDRS")
    assert len(parts(read(dsn(failures, env=hdrs, original=b"no header at all\r\n")))) == 2
    assert len(parts(read(dsn(failures, env=hdrs, original=b"\r\nbody only\r\n")))) == 2
    # A header section that stops at a body line with no blank line before it.
    data = dsn(failures, env=hdrs, original=b"Subject: s\r\nTo: t@example.net\r\nbody line\r\n")
    assert b"To: t@example.net\r\n--" in data and b"body line" not in data
    # A header section past MAX_HEADER_SECTION is cut at a line end.
    received = b"Received: from relay.example by relay.example; Tue, 14 Nov 2023 19:13:20 +0000\r\n"
    long_head = received * (bounce.MAX_HEADER_SECTION // len(received) + 50) + b"Subject: last\r\n\r\nbody\r\n"
    data = dsn(failures, env=hdrs, original=long_head)
    assert_well_formed(data)
    returned = parts(read(data))[2].get_payload()
    assert bounce.MAX_HEADER_SECTION - len(received) < len(returned) <= bounce.MAX_HEADER_SECTION + 1
    assert b"Subject: last" not in data


def test_odd_envelopes_never_raise() -> None:
    weird = envelope(sender='"odd person"@[192.0.2.1]', arrival_time=float("nan"), envid="+ZZ", id="")
    outcome = local("bounced", "not a status", "\x00\x01")
    data = build_dsn(envelope=weird, failures=[failure("", outcome), failure("a@b", USER_UNKNOWN)],
                     action="failed", reporting_mta="bad host\r\nX-Injected: 1", original=ORIGINAL,
                     now=float("inf"))
    assert_well_formed(data)
    head = data.split(b"\r\n\r\n")[0]
    assert not re.search(rb"^X-Injected", head, re.MULTILINE)
    assert read(data)["From"] == "Mail Delivery System <MAILER-DAEMON@badhostX-Injected1>"
    assert b"Status: 5.0.0" in data


def test_a_failing_build_falls_back_to_a_plain_report(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, original: bytes, max_original: int) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(bounce._Builder, "_original", broken)
    data = dsn([failure("bob@example.net", USER_UNKNOWN)])
    assert_well_formed(data)
    assert len(parts(read(data))) == 2  # no original, but the report is there
    assert parse(data)[0].reason == "userunknown"


# --- property: whatever the recipients and replies, the DSN parses back ---------------------

_LOCAL = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,14}[a-z0-9]", fullmatch=True).filter(lambda s: ".." not in s)
_DOMAIN = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]\.(net|org|example)", fullmatch=True)
_WORDS = st.lists(st.sampled_from([
    "user", "unknown", "mailbox", "full", "quota", "exceeded", "blocked", "spam", "rejected", "policy",
    "later", "try", "again", "relay", "denied", "no", "such", "address", "message", "content", "is", "the",
    "account", "disabled", "greylisted", "over", "limit", "rate", "dns", "spf", "dkim", "virus", "Ok",
    "=?utf-8?q?x?=", "https://example.net/" + "p" * 120, "--boundary", "Content-Type:",
]), min_size=0, max_size=12).map(" ".join)


@st.composite
def _outcomes(draw: st.DrawFn, action: str) -> Outcome:
    """An outcome for a recipient of a DSN with `action`."""
    kind = draw(st.sampled_from(["reply", "local", "network"]))
    if kind == "reply":
        phase = draw(st.sampled_from(["mail", "rcpt", "data", "dot", "ehlo"]))
        klass = 5 if action == "failed" and draw(st.booleans()) else 4
        code = klass * 100 + draw(st.sampled_from([21, 50, 51, 52, 53, 54, 55]))
        status = draw(st.one_of(st.just(""), st.tuples(st.integers(0, 7), st.integers(0, 9)).map(
            lambda t: f"{klass}.{t[0]}.{t[1]} ")))
        out = from_reply(phase, code, status + draw(_WORDS))  # type: ignore[arg-type]
    elif kind == "local":
        status = f"{5 if action == 'failed' else 4}.{draw(st.integers(0, 7))}.{draw(st.integers(0, 10))}"
        out = local("bounced" if action == "failed" else "deferred", status, draw(_WORDS) or "local failure")
    else:
        out = network_error(draw(st.sampled_from(["connect", "greeting", "rcpt", "dot"])), draw(_WORDS),
                            timeout=draw(st.booleans()))
    if action == "failed" and out.kind == "deferred":
        out = expired(out)
    if action == "delayed" and out.kind != "deferred":
        out = network_error("connect", "Connection refused")
    return out


@settings(deadline=None)
@given(data=st.data(), action=st.sampled_from(["failed", "delayed"]), ret=st.sampled_from(["", "FULL", "HDRS"]),
       smtputf8=st.booleans())
def test_random_dsns_parse_back(data: st.DataObject, action: str, ret: str, smtputf8: bool) -> None:
    addresses = data.draw(st.lists(st.tuples(_LOCAL, _DOMAIN).map("@".join), min_size=1, max_size=5,
                                   unique_by=str.lower))
    failures = []
    for address in addresses:
        failures.append(failure(address, data.draw(_outcomes(action))))
    built = dsn(failures, action=action, env=envelope(ret=ret, smtputf8=smtputf8), expires_at=NOW + 86400)
    assert_well_formed(built)
    records: list[DsnRecord] = parse(built)
    assert [r.recipient for r in records] == addresses
    for f, record in zip(failures, records, strict=True):
        assert (record.action, record.status, record.diagnostic) == (action, f.outcome.status, f.outcome.reply)
        assert record.remote_mta == ("mx.example.net" if f.outcome.remote else "")
        if action == "failed" and f.outcome.reason != "undefined":
            # (Where our classifier finds no reason, the parser searches the neighbouring
            # recipients' text too, and may find one of theirs.)
            assert (record.reason, record.class_) == (f.outcome.reason, f.outcome.bounce_class), f.outcome


@settings(deadline=None)
@given(sender=st.text(max_size=40), address=st.text(max_size=40), reply=st.text(max_size=300),
       status=st.text(max_size=8), relay=st.text(max_size=30), orcpt=st.text(max_size=30),
       envid=st.text(max_size=20), mta=st.text(max_size=20), original=st.binary(max_size=300),
       action=st.sampled_from(["failed", "delayed"]), smtputf8=st.booleans())
def test_arbitrary_input_never_raises(sender: str, address: str, reply: str, status: str, relay: str, orcpt: str,
                                      envid: str, mta: str, original: bytes, action: str, smtputf8: bool) -> None:
    outcome = Outcome(kind="bounced", scope="recipient", status=status, reply=reply, remote=bool(relay))
    env = envelope(sender=sender, envid=envid, smtputf8=smtputf8)
    rcpt = Recipient(address=address, orcpt=orcpt)
    built = build_dsn(envelope=env, failures=[Failure(rcpt, outcome, relay)], action=action,  # type: ignore[arg-type]
                      reporting_mta=mta, original=original, now=NOW)
    assert_well_formed(built)
    parse(built)  # never raises either; what it finds depends on the address


def test_failure_is_a_plain_struct() -> None:
    f = failure("bob@example.net", USER_UNKNOWN)
    decoded = msgspec.json.decode(msgspec.json.encode(f), type=Failure)
    assert decoded.recipient.address == "bob@example.net" and decoded.outcome == USER_UNKNOWN
