"""Pure decisions of the receiving side: MAIL/RCPT parameters, relay policy, DATA checks,
the Received header, and ingest's header handling (with a fake spool and a fixed clock)."""

from __future__ import annotations

import pytest

from mtad import reply
from mtad.address import Mailbox
from mtad.events import Event, EventBus
from mtad.ingest import (
    Ingest,
    IngestError,
    Submission,
    find_field,
    header_section_end,
    rfc5322_date,
)
from mtad.receive import policy
from mtad.receive.data import (
    DataResult,
    check_message,
    count_received,
    has_bare_newline,
    normalize_newlines,
    protocol_name,
    received_header,
)
from mtad.records import Recipient
from mtad.spool import SpoolFull

# -- MAIL and RCPT ---------------------------------------------------------------------------


def test_mail_parameters_are_parsed_and_kept_as_given() -> None:
    got = policy.parse_mail("FROM:<a@b.test> size=10 body=8bitmime RET=hdrs ENVID=ab+2Bc SMTPUTF8",
                            esmtp=True, max_size=100)
    assert got == policy.MailRequest(Mailbox("a", "b.test"), 10, "8BITMIME", True, "HDRS", "ab+2Bc")
    assert policy.parse_mail("FROM: <>", esmtp=False, max_size=100) == policy.MailRequest(None)


MAIL_REFUSALS = [
    ("FROM:<a@b.test> SIZE=101", reply.MESSAGE_TOO_BIG),
    ("FROM:<a@b.test> SIZE=-1", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> SIZE=1 SIZE=2", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> RET=ALL", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> ENVID=has=equals", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> ENVID=" + "x" * 101, reply.BAD_SYNTAX),
    ("FROM:<a@b.test> SMTPUTF8=yes", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> BODY=", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> BODY", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> RET", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> SIZE", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> ENVID", reply.BAD_SYNTAX),
    ("FROM:<a@b.test> AUTH=<>", reply.PARAM_NOT_RECOGNIZED),
    ("FROM:<a@b.test> X-FOO", reply.PARAM_NOT_RECOGNIZED),
    ("FROM:<a@b.test> ENVID=é", reply.BAD_SYNTAX),
    ("FROM:<jö@b.test>", reply.NON_ASCII_ADDRESS),
    ("FROM:<a@b..test>", reply.BAD_ADDRESS),
    ("FROM <a@b.test>", reply.BAD_SYNTAX),
    (None, reply.BAD_SYNTAX),
]


@pytest.mark.parametrize(("arg", "expected"), MAIL_REFUSALS)
def test_mail_refusals(arg: str | None, expected: reply.Reply) -> None:
    assert policy.parse_mail(arg, esmtp=True, max_size=100) == expected


def test_parameters_need_ehlo() -> None:
    assert policy.parse_mail("FROM:<a@b.test> SIZE=1", esmtp=False, max_size=100) == reply.BAD_SYNTAX
    assert policy.parse_rcpt("TO:<a@b.test> NOTIFY=NEVER", esmtp=False, smtputf8=False, hostname="h") == reply.BAD_SYNTAX


RCPTS = [
    ("TO:<u@x.test> NOTIFY=success,delay ORCPT=rfc822;u+40x.test",
     policy.RcptRequest(Mailbox("u", "x.test"), "SUCCESS,DELAY", "rfc822;u+40x.test")),
    ("TO:<u@x.test> NOTIFY=NEVER", policy.RcptRequest(Mailbox("u", "x.test"), "NEVER")),
    ("TO:<Postmaster>", policy.RcptRequest(Mailbox("postmaster", "mx.test"))),
    ("TO:<u@x.test> NOTIFY=NEVER,SUCCESS", reply.BAD_SYNTAX),
    ("TO:<u@x.test> NOTIFY=SUCCESS,SUCCESS", reply.BAD_SYNTAX),
    ("TO:<u@x.test> ORCPT=rfc822;bad=xtext", reply.BAD_SYNTAX),
    ("TO:<u@x.test> ORCPT=;u@x.test", reply.BAD_SYNTAX),
    ("TO:<u@x.test> FOO=1", reply.PARAM_NOT_RECOGNIZED),
    ("TO:<>", reply.BAD_ADDRESS),
    ("FROM:<u@x.test>", reply.BAD_SYNTAX),
]


@pytest.mark.parametrize(("arg", "expected"), RCPTS)
def test_rcpt(arg: str, expected: object) -> None:
    assert policy.parse_rcpt(arg, esmtp=True, smtputf8=False, hostname="MX.test.") == expected


def test_recipient_reply_is_the_same_for_every_trick() -> None:
    local = frozenset({"local.test"})
    ok = policy.recipient_reply(Mailbox("u", "local.test"), role="mx", local_domains=local)
    assert ok is reply.RECIPIENT_OK
    for mailbox in (Mailbox("u", "ext.test"), Mailbox("u%x.test", "local.test"), Mailbox("u", "[127.0.0.1]")):
        assert policy.recipient_reply(mailbox, role="submission", local_domains=local) is reply.RELAY_DENIED


def test_ehlo_lines_and_helo_cleaning() -> None:
    lines = policy.ehlo_lines("mx.test", max_size=10, tls_offered=True).split(b"\r\n")
    assert lines[0] == b"250-mx.test" and lines[-2] == b"250 STARTTLS" and b"250-SIZE 10" in lines
    assert policy.clean_helo("  host.test  extra") == "host.test"
    assert policy.clean_helo("hóst(\x7f)") == "h?st(?)"


# -- DATA checks and the Received header -----------------------------------------------------


def check(body: bytes, *, smtputf8: bool = False, mode: str = "normalize", **flags: bool) -> bytes | reply.Reply:
    return check_message(DataResult(body, len(body), **flags), smtputf8=smtputf8, max_received=3,
                         bare_newline=mode)  # type: ignore[arg-type]


def test_check_message() -> None:
    assert check(b"A: b\r\n\r\nx\r\n") == b"A: b\r\n\r\nx\r\n"
    assert check(b"A: b\n\rx\r\n") == b"A: b\r\n\r\nx\r\n"
    assert check(b"A: b\n\r\nx\r\n", mode="reject") is reply.BARE_NEWLINE
    assert check(b"", too_big=True) is reply.MESSAGE_TOO_BIG
    assert check(b"", line_too_long=True) is reply.LINE_TOO_LONG
    assert check("S: é\r\n\r\n".encode()) is reply.EIGHT_BIT_HEADERS
    assert check("S: é\r\n\r\n".encode(), smtputf8=True) == "S: é\r\n\r\n".encode()
    assert check("S: x\r\n\r\né\r\n".encode()) == "S: x\r\n\r\né\r\n".encode()
    assert check(b"Received: a\r\n" * 4 + b"\r\nx\r\n") is reply.MAIL_LOOP
    # Received in the body, or folded lines, are not hops
    assert isinstance(check(b"Received: a\r\n received: b\r\n\r\nReceived: c\r\nReceived: d\r\n"), bytes)


def test_newline_helpers() -> None:
    assert not has_bare_newline(b"a\r\nb\r\n")
    for bare in (b"a\nb", b"a\rb", b"a\r\r\n", b"a\n\r"):
        assert has_bare_newline(bare)
    assert normalize_newlines(b"a\rb\nc\r\n\r\rd") == b"a\r\nb\r\nc\r\n\r\n\r\nd"
    assert count_received(b"received: x\r\nX: y\r\nRECEIVED: z\r\n") == 2


def test_received_header_and_protocol() -> None:
    assert protocol_name(esmtp=False, tls=False, smtputf8=False) == "SMTP"
    assert protocol_name(esmtp=True, tls=True, smtputf8=False) == "ESMTPS"
    assert protocol_name(esmtp=True, tls=False, smtputf8=True) == "UTF8SMTP"
    one = received_header(helo="c.test", ip="::1", hostname="mx.test", protocol="ESMTP", queue_id="q1",
                          recipient="u@x.test", date="D")
    assert one == (b"Received: from c.test (unknown [IPv6:::1])\r\n\tby mx.test (mtad) with ESMTP id q1\r\n"
                   b"\tfor <u@x.test>; D\r\n")
    many = received_header(helo="c.test", ip="192.0.2.1", hostname="mx.test", protocol="SMTP", queue_id="q2",
                           recipient=None, date="D")
    assert many == b"Received: from c.test (unknown [192.0.2.1])\r\n\tby mx.test (mtad) with SMTP id q2;\r\n\tD\r\n"


# -- ingest ------------------------------------------------------------------------------------


def test_header_helpers() -> None:
    body = b"Subject: a\r\nMessage-ID:\r\n <x@y>\r\n\r\nMessage-ID: <body@y>\r\n"
    end = header_section_end(body)
    assert body[end:end + 2] == b"\r\n" and body[:end].endswith(b"<x@y>\r\n")
    assert find_field(body[:end], body[:end].lower(), b"message-id:") == b"<x@y>"
    assert find_field(body[:end], body[:end].lower(), b"date:") is None
    assert header_section_end(b"no header here\r\n") == 0
    assert rfc5322_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"


class Recorder:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.stored: list[tuple[object, list[Recipient], bytes]] = []

    async def store(self, envelope: object, recipients: list[Recipient], body: bytes) -> None:
        if self.fail:
            raise self.fail
        self.stored.append((envelope, recipients, body))


def make(spool: Recorder) -> tuple[Ingest, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    return Ingest(spool, bus, "mx.test", clock=lambda: 86400.0), events


@pytest.mark.asyncio
async def test_ingest_adds_missing_headers_at_the_top() -> None:
    spool = Recorder()
    ingest, events = make(spool)
    queue_id = await ingest.accept(Submission(sender="", recipients=[Recipient(address="u@x.test")],
                                              body=b"Subject: s\r\n\r\nbody\r\n", received=b"Received: r\r\n"))
    [(_, _, body)] = spool.stored
    assert body == (b"Received: r\r\nMessage-ID: <" + queue_id.encode() + b"@mx.test>\r\n"
                    b"Date: Fri, 02 Jan 1970 00:00:00 +0000\r\nSubject: s\r\n\r\nbody\r\n")
    [event] = events
    assert (event.type, event.queue_id, event.size, event.message_id, event.time) == (
        "received", queue_id, len(body), f"<{queue_id}@mx.test>", 86400.0)


@pytest.mark.asyncio
async def test_ingest_keeps_a_given_queue_id_and_separates_headerless_text() -> None:
    spool = Recorder()
    ingest, _ = make(spool)
    assert await ingest.accept(Submission(sender="s@o.test", recipients=[Recipient(address="u@x.test")],
                                          body=b"Date: x\r\njust text\r\n", queue_id="0" * 22)) == "0" * 22
    assert spool.stored[0][2].endswith(b"Date: x\r\n\r\njust text\r\n")


@pytest.mark.asyncio
async def test_ingest_spool_full_is_a_bland_refusal() -> None:
    ingest, events = make(Recorder(fail=SpoolFull("/var/secret full")))
    with pytest.raises(IngestError) as info:
        await ingest.accept(Submission(sender="s@o.test", recipients=[Recipient(address="u@x.test")], body=b""))
    assert info.value.reply is reply.SPOOL_FULL
    assert [(e.type, e.reply, e.recipients) for e in events] == [
        ("rejected", "452 4.3.1 Insufficient system storage", ["u@x.test"])]
