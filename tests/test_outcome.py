"""Outcome classification: every phase x reply class, 421, greetings, network errors, status
extraction, expiry, and reasons that agree with the DSN parser (mtad.deliver.outcome)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtad.deliver.outcome import (
    COMMANDS,
    MAX_REPLY,
    Outcome,
    expired,
    from_reply,
    local,
    network_error,
    one_line,
    reply_status,
)
from mtad.dsn import parse

# phase -> scope of a 4xx/5xx reply there (the greeting, EHLO and STARTTLS are the connection's)
SCOPES = {"greeting": "connection", "ehlo": "connection", "starttls": "connection", "mail": "message",
          "rcpt": "recipient", "data": "message", "dot": "message"}
# phase -> what 5xx does there: greetings and STARTTLS defer (another MX, a TLS policy), the rest bounce
PERMANENT = {"greeting": False, "ehlo": True, "starttls": False, "mail": True, "rcpt": True, "data": True,
             "dot": True}


@pytest.mark.parametrize("phase", sorted(SCOPES))
@pytest.mark.parametrize(("code", "text"), [(250, "2.1.5 Ok"), (450, "4.2.1 try later"),
                                            (550, "5.7.1 refused")])
def test_every_phase_and_code_class(phase: str, code: int, text: str) -> None:
    out = from_reply(phase, code, text)  # type: ignore[arg-type]
    assert out.remote and out.phase == phase
    assert out.reply == f"{code} {text}"
    if code == 250:
        assert (out.kind, out.status, out.reason, out.bounce_class) == ("delivered", "2.1.5", "delivered", "")
        assert out.final
        return
    assert out.scope == SCOPES[phase]
    if code == 550 and PERMANENT[phase]:
        assert (out.kind, out.status) == ("bounced", "5.7.1")
        assert out.final and out.bounce_class in ("hard", "soft", "unknown")
    else:
        assert out.kind == "deferred" and not out.final
        assert out.status == ("4.7.1" if code == 550 else "4.2.1")  # class 4 whatever the server said
        assert out.bounce_class == "soft"


@pytest.mark.parametrize("phase", ["greeting", "ehlo", "mail", "rcpt", "data", "dot"])
def test_421_anywhere_ends_the_connection_and_defers(phase: str) -> None:
    out = from_reply(phase, 421, "4.3.2 Service shutting down")  # type: ignore[arg-type]
    assert (out.kind, out.scope, out.status) == ("deferred", "connection", "4.3.2")


def test_5xx_greeting_defers_so_the_next_mx_is_tried() -> None:
    out = from_reply("greeting", 554, "5.7.1 mx.example.net no SMTP service here")
    assert (out.kind, out.scope, out.status) == ("deferred", "connection", "4.7.1")
    assert out.reply.startswith("554 5.7.1")  # the reply itself is kept as said


def test_552_at_rcpt_is_too_many_recipients_but_552_at_dot_bounces() -> None:
    rcpt = from_reply("rcpt", 552, "5.5.3 Too many recipients")
    assert (rcpt.kind, rcpt.scope, rcpt.status) == ("deferred", "recipient", "4.5.3")
    dot = from_reply("dot", 552, "5.3.4 Message size exceeds fixed limit")
    assert (dot.kind, dot.scope, dot.status, dot.reason) == ("bounced", "message", "5.3.4", "mesgtoobig")


def test_354_is_the_go_ahead_only_at_data() -> None:
    assert from_reply("data", 354, "End data with <CR><LF>.<CR><LF>").kind == "delivered"
    odd = from_reply("rcpt", 354, "go ahead")
    assert (odd.kind, odd.scope, odd.status) == ("deferred", "connection", "4.5.0")


@pytest.mark.parametrize("code", [0, 99, 199, 600, 999, -1])
def test_codes_outside_smtp_are_a_protocol_error(code: int) -> None:
    out = from_reply("rcpt", code, "5.1.1 whatever")
    assert (out.kind, out.scope, out.status) == ("deferred", "connection", "4.5.0")


# --- status extraction -----------------------------------------------------------------

@pytest.mark.parametrize(("code", "text", "status"), [
    (550, "5.1.1 <a@example.net>: Recipient address rejected", "5.1.1"),
    (550, "  5.1.1 leading blanks", "5.1.1"),
    (452, "4.2.2 Mailbox full", "4.2.2"),
    (550, "4.1.1 class says 4, code says 5", "5.0.0"),  # RFC 3463: the classes must agree
    (450, "5.2.2 class says 5, code says 4", "4.0.0"),
    (550, "Requested action not taken: mailbox unavailable", "5.0.0"),
    (451, "Try again later", "4.0.0"),
    (550, "User unknown (5.1.1)", "5.0.0"),  # RFC 2034: the status opens the text
    (550, "5.1.10 null MX", "5.1.10"),
    (550, "5.1.1234 too many digits", "5.0.0"),
    (550, "5.1.1.2 an IP address, not a status", "5.0.0"),
    (250, "2.6.0 <id@x> queued as 123", "2.6.0"),
    (250, "", "2.0.0"),
])
def test_status_extraction(code: int, text: str, status: str) -> None:
    assert reply_status(code, text) == status
    phase = "dot" if code < 300 else "rcpt"
    assert from_reply(phase, code, text).status == status  # type: ignore[arg-type]


def test_multiline_replies_become_one_line_without_repeated_status() -> None:
    text = ("5.1.1 The email account that you tried to reach does not exist. Please try\n"
            "5.1.1 double-checking the recipient's email address for typos or\n"
            "5.1.1 unnecessary spaces. https://support.example/mail/?p=NoSuchUser x1si")
    out = from_reply("rcpt", 550, text)
    assert out.status == "5.1.1"
    assert out.reply.count("5.1.1") == 1 and "\n" not in out.reply
    assert out.reply.startswith("550 5.1.1 The email account") and "double-checking" in out.reply
    assert (out.reason, out.bounce_class) == ("userunknown", "hard")
    # A client that left the "550-" prefixes on continuation lines gets the same line.
    prefixed = from_reply("rcpt", 550, text.replace("\n5.1.1", "\n550-5.1.1"))
    assert prefixed.reply == out.reply


def test_one_line_drops_controls_and_caps() -> None:
    assert one_line("550 a\r\nb\tc\x00d\x1b[31m") == "550 a b c d [31m"
    assert len(one_line("x" * 10_000)) == MAX_REPLY
    assert one_line("  \n ") == ""


# --- network errors and local decisions ---------------------------------------------------

@pytest.mark.parametrize(("phase", "status"), [("connect", "4.4.1"), ("greeting", "4.4.2"), ("rcpt", "4.4.2"),
                                               ("dot", "4.4.2")])
@pytest.mark.parametrize("timeout", [False, True])
def test_network_errors_defer_the_connection(phase: str, status: str, timeout: bool) -> None:
    out = network_error(phase, "Connection reset\nby peer", timeout=timeout)  # type: ignore[arg-type]
    assert (out.kind, out.scope, out.status, out.remote) == ("deferred", "connection", status, False)
    assert out.reply == f"{'timed out' if timeout else 'failed'} during {phase}: Connection reset by peer"
    assert (out.reason, out.bounce_class) == ("networkerror", "soft")
    assert network_error(phase, "").reply.endswith(f"during {phase}")  # type: ignore[arg-type]


def test_local_outcomes() -> None:
    null_mx = local("bounced", "5.1.10", "Domain example.net does not accept mail (nullMX)", phase="dns")
    assert (null_mx.kind, null_mx.scope, null_mx.reason, null_mx.bounce_class) == (
        "bounced", "destination", "notaccept", "hard")
    nxdomain = local("bounced", "5.1.2", "example.invalid: Host not found", phase="dns")
    assert (nxdomain.reason, nxdomain.bounce_class) == ("hostunknown", "hard")
    servfail = local("deferred", "4.4.3", "example.net: Host not found, try again", phase="dns")
    assert (servfail.kind, servfail.bounce_class, servfail.remote) == ("deferred", "soft", False)
    named = local("bounced", "5.4.6", "mail loop", reason="networkerror", scope="message")
    assert (named.reason, named.scope) == ("networkerror", "message")
    done = local("delivered", "2.0.0", "delivered locally")
    assert (done.reason, done.bounce_class, done.final) == ("delivered", "", True)


def test_expiry_keeps_the_last_temporary_failure() -> None:
    last = from_reply("rcpt", 452, "4.2.2 Mailbox full")
    out = expired(last)
    assert (out.kind, out.scope, out.status, out.reply) == ("bounced", "recipient", "4.2.2", "452 4.2.2 Mailbox full")
    assert (out.reason, out.bounce_class, out.remote) == ("mailboxfull", "soft", True)
    # From the recipient's last_reply line alone: a remote reply is recognised by its code.
    again = expired(last_reply="452 4.2.2 Mailbox full")
    assert (again.status, again.remote, again.reason) == ("4.2.2", True, "mailboxfull")
    unreachable = expired(network_error("connect", "Connection refused"))
    assert (unreachable.status, unreachable.remote, unreachable.bounce_class) == ("4.4.1", False, "soft")
    local_words = expired(last_reply="failed during connect: Connection refused")
    assert (local_words.status, local_words.remote) == ("4.4.7", False)
    nothing = expired()
    assert (nothing.status, nothing.reply, nothing.reason) == ("4.4.7", "delivery time expired", "expired")
    # A 5xx greeting deferred to the end keeps class 4: the failure was never permanent.
    assert expired(last_reply="554 5.7.1 go away").status == "4.7.1"


# --- one vocabulary with the DSN parser ----------------------------------------------------

POSTFIX_DSN = """\
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
To: alice@example.org
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

<{rcpt}>: host mx.example.net[192.0.2.7] said: {code} {text} (in reply to {command}
    command)

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Remote-MTA: dns; mx.example.net
Diagnostic-Code: smtp; {code} {text}

--B--
"""


@pytest.mark.parametrize(("phase", "code", "text", "reason", "klass"), [
    ("rcpt", 550, "5.1.1 <bob@example.net>: Recipient address rejected: User unknown", "userunknown", "hard"),
    ("rcpt", 550, "User unknown", "userunknown", "hard"),  # no status: RCPT proves it
    ("dot", 550, "User unknown", "filtered", "soft"),  # after DATA a filter speaks
    ("rcpt", 552, "5.2.2 Mailbox full", None, None),  # deferred (RFC 5321 4.5.3.1.10)
    ("dot", 552, "5.2.2 Quota exceeded", "mailboxfull", "soft"),
    ("mail", 553, "5.7.1 Sender address rejected: not owned by user", "rejected", "soft"),
    ("rcpt", 554, "5.7.1 Service unavailable; client host blocked using zen.spamhaus.org", "blocked", "soft"),
    ("dot", 550, "5.7.1 Message rejected as spam", "spamdetected", "soft"),
    ("dot", 554, "5.7.26 DMARC policy violation", "authfailure", "soft"),
    ("rcpt", 550, "5.1.2 Host unknown", "hostunknown", "hard"),
])
def test_reasons_agree_with_the_dsn_parser(phase: str, code: int, text: str, reason: str | None,
                                           klass: str | None) -> None:
    out = from_reply(phase, code, text)  # type: ignore[arg-type]
    if reason is None:
        assert out.kind == "deferred"
        out = expired(out)
    else:
        assert out.kind == "bounced"
        assert (out.reason, out.bounce_class) == (reason, klass)
    report = POSTFIX_DSN.format(rcpt="bob@example.net", code=code, text=text, status=out.status,
                                command=COMMANDS[phase])
    [record] = parse(report.replace("\n", "\r\n").encode())
    assert (record.reason, record.class_, record.status) == (out.reason, out.bounce_class, out.status)


@given(phase=st.sampled_from(["connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "dot", "dns",
                              "local"]),
       code=st.integers(min_value=-10, max_value=1000), text=st.text(max_size=600))
def test_from_reply_never_raises(phase: str, code: int, text: str) -> None:
    out = from_reply(phase, code, text)  # type: ignore[arg-type]
    assert isinstance(out, Outcome)
    assert len(out.reply) <= MAX_REPLY and "\n" not in out.reply
    assert out.status[0] in "245" and out.status.count(".") == 2
    if out.kind != "delivered":
        assert out.status[0] == ("5" if out.kind == "bounced" else "4")
