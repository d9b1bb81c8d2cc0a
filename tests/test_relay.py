"""Relay policy over real SMTP sessions: every classic trick is refused, local mail is accepted.

The mx listener serves `local.test` and `éxample.test` (configured as a U-label) only.
"""

from __future__ import annotations

import asyncio
import smtplib

import pytest
from test_receive import QUEUED, running, transaction

DOMAINS = ("local.test", "éxample.test")

# (RCPT TO argument, MAIL FROM parameters, expected reply prefix, stored address when accepted)
CASES = [
    # plain local mail, and the harmless variants that normalise to it
    (b"<user@local.test>", b"", b"250 2.1.5", "user@local.test"),
    (b"<user@LOCAL.TEST>", b"", b"250 2.1.5", "user@local.test"),
    (b"<User@Local.Test.>", b"", b"250 2.1.5", "User@local.test"),
    (b"user@local.test", b"", b"250 2.1.5", "user@local.test"),
    (b"<@ext.test:user@local.test>", b"", b"250 2.1.5", "user@local.test"),
    (b'<"john doe"@local.test>', b"", b"250 2.1.5", '"john doe"@local.test'),
    # RFC 5321 4.5.1: <Postmaster> (any case) names this host's postmaster, always accepted
    (b"<Postmaster>", b"", b"250 2.1.5", "postmaster@mx.receive.test"),
    (b"<POSTMASTER@MX.RECEIVE.TEST>", b"", b"250 2.1.5", "POSTMASTER@mx.receive.test"),
    (b"<postmaster@ext.test>", b"", b"550 5.7.1", None),
    # relay: other domains, however dressed
    (b"<user@ext.test>", b"", b"550 5.7.1", None),
    (b"<user@ext.test.>", b"", b"550 5.7.1", None),
    (b"<@local.test:user@ext.test>", b"", b"550 5.7.1", None),
    (b"<@local.test,@local.test:user@ext.test>", b"", b"550 5.7.1", None),
    (b"<user@local.test.ext.test>", b"", b"550 5.7.1", None),
    (b"<user@sub.local.test>", b"", b"550 5.7.1", None),
    # routing local parts at our own domain: never interpreted, never forwarded
    (b"<user%ext.test@local.test>", b"", b"550 5.7.1", None),
    (b"<ext.test!user@local.test>", b"", b"550 5.7.1", None),
    (b'<"user@ext.test"@local.test>', b"", b"550 5.7.1", None),
    (b'<"user%ext.test"@local.test>', b"", b"550 5.7.1", None),
    (b'<"ext.test!user"@local.test>', b"", b"550 5.7.1", None),
    (b'<"user\\@ext.test"@local.test>', b"", b"550 5.7.1", None),
    # address literals are never local, not even our own loopback
    (b"<user@[127.0.0.1]>", b"", b"550 5.7.1", None),
    (b"<user@[IPv6:::1]>", b"", b"550 5.7.1", None),
    # IDNA: a U-label needs SMTPUTF8; with it, it normalises to the A-label we serve
    ("<user@ÉXAMPLE.test>".encode(), b"", b"553 5.6.7", None),
    ("<user@ÉXAMPLE.test>".encode(), b" SMTPUTF8", b"250 2.1.5", "user@xn--xample-9ua.test"),
    (b"<user@xn--xample-9ua.test>", b"", b"250 2.1.5", "user@xn--xample-9ua.test"),
    ("<usér@local.test>".encode(), b"", b"553 5.6.7", None),
    # look-alikes: UTS #46 maps U+FF0E and U+3002 to ".", so the domain is what it reads as ...
    ("<user@ext\uff0etest>".encode(), b" SMTPUTF8", b"550 5.7.1", None),
    ("<user@ext\u3002test>".encode(), b" SMTPUTF8", b"550 5.7.1", None),
    ("<user@local\u3002test>".encode(), b" SMTPUTF8", b"250 2.1.5", "user@local.test"),
    ("<user@local\uff0eTEST\uff0e>".encode(), b" SMTPUTF8", b"501 5.1.3", None),
    # ... and fullwidth or small-form %, ! and @ in a local part are routing characters (NFKC)
    ("<user\uff05ext.test@local.test>".encode(), b" SMTPUTF8", b"550 5.7.1", None),
    ("<ext.test\uff01user@local.test>".encode(), b" SMTPUTF8", b"550 5.7.1", None),
    ("<user\uff20ext.test@local.test>".encode(), b" SMTPUTF8", b"550 5.7.1", None),
    ("<user\ufe6bext.test@local.test>".encode(), b" SMTPUTF8", b"550 5.7.1", None),
    ('<"user\uff20ext.test"@local.test>'.encode(), b" SMTPUTF8", b"550 5.7.1", None),
    # routing characters in any case, in any quoting
    (b"<USER%EXT.TEST@LOCAL.TEST>", b"", b"550 5.7.1", None),
    (b"<EXT.TEST!USER@LOCAL.TEST>", b"", b"550 5.7.1", None),
    (b'<"user\\@ext"@local.test>', b"", b"550 5.7.1", None),
    (b"<user@[IPv6:::ffff:127.0.0.1]>", b"", b"550 5.7.1", None),
    # syntax errors are 501 5.1.3
    (b"<user@local.test@ext.test>", b"", b"501 5.1.3", None),
    (b"<user\\@ext.test@local.test>", b"", b"501 5.1.3", None),
    (b'<""@local.test>', b"", b"501 5.1.3", None),
    (b'<"">', b"", b"501 5.1.3", None),
    (b"<user@ext.test>\t", b"", b"501 5.1.3", None),
    (b"\t<user@local.test>", b"", b"501 5.1.3", None),
    (b"< user@local.test>", b"", b"501 5.1.3", None),
    (b"<user@local.test\t>", b"", b"501 5.1.3", None),
    (b"<user@local.test. >", b"", b"501 5.1.3", None),
    (b"<user@local.test .>", b"", b"501 5.1.3", None),
    (b"<user@[local.test]>", b"", b"501 5.1.3", None),
    (b"<@local.test:@ext.test:user@x.test>", b"", b"501 5.1.3", None),
    (b"<@local.test user@ext.test>", b"", b"501 5.1.3", None),
    (b"<@:user@ext.test>", b"", b"501 5.1.3", None),
    (b"<@local.test,user@ext.test>", b"", b"501 5.1.3", None),
    (b"<" + b"a" * 65 + b"@local.test>", b"", b"501 5.1.3", None),
    (b"<user@@local.test>", b"", b"501 5.1.3", None),
    (b"<user@local..test>", b"", b"501 5.1.3", None),
    (b"<user@local.test", b"", b"501 5.1.3", None),
    (b"<user.@local.test>", b"", b"501 5.1.3", None),
    (b"<>", b"", b"501 5.1.3", None),
    (b"<user@[300.1.1.1]>", b"", b"501 5.1.3", None),
    (b"<@local.test>", b"", b"501 5.1.3", None),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("rcpt", "mail_params", "expected", "stored"), CASES,
                         ids=[c[0].decode("utf-8", "replace") + c[1].decode() for c in CASES])
async def test_relay_trick(rcpt: bytes, mail_params: bytes, expected: bytes, stored: str | None) -> None:
    async with running(domains=DOMAINS) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO client.test\r\n", b"250")
        await raw.ask(b"MAIL FROM:<s@origin.test>" + mail_params + b"\r\n", b"250 2.1.0")
        await raw.ask(b"RCPT TO:" + rcpt + b"\r\n", expected)
        if stored is None:
            # nothing to deliver to: no message at all (RFC 2920 3.1: 554 after failed RCPTs)
            await raw.ask(b"DATA\r\n", b"554 5.5.1 No valid recipients\r\n")
            assert rx.spool.stored == []
            if expected.startswith(b"550"):
                [event] = rx.of_type("rejected")
                assert event.reply == "550 5.7.1 Relay access denied"
            return
        await raw.ask(b"DATA\r\n", b"354")
        assert QUEUED.fullmatch(await raw.ask(b"Subject: r\r\n\r\nx\r\n.\r\n", b"250"))
        [(_, recipients, _)] = rx.spool.stored
        assert [r.address for r in recipients] == [stored]


@pytest.mark.asyncio
async def test_relay_refused_with_smtplib_and_local_delivery_still_works() -> None:
    async with running(domains=DOMAINS) as rx:
        def send() -> tuple[dict[str, tuple[int, bytes]], dict[str, tuple[int, bytes]]]:
            with smtplib.SMTP(*rx.addr, timeout=10) as client:
                mixed = client.sendmail("s@o.test", ["a@ext.test", "b@local.test"], b"Subject: m\r\n\r\nx\r\n")
                try:
                    client.sendmail("s@o.test", ["a%b@local.test"], b"Subject: m\r\n\r\nx\r\n")
                except smtplib.SMTPRecipientsRefused as exc:
                    return mixed, exc.recipients
                raise AssertionError("relay accepted")
        mixed, refused = await asyncio.to_thread(send)
        assert mixed == {"a@ext.test": (550, b"5.7.1 Relay access denied")}
        assert refused == {"a%b@local.test": (550, b"5.7.1 Relay access denied")}
        [(_, recipients, _)] = rx.spool.stored
        assert [r.address for r in recipients] == ["b@local.test"]


@pytest.mark.asyncio
async def test_null_sender_is_accepted_for_local_mail() -> None:
    async with running(domains=DOMAINS) as rx:
        raw = await rx.raw()
        assert QUEUED.fullmatch(await transaction(raw, sender=b"<>", rcpts=(b"<postmaster@local.test>",)))
        assert rx.spool.stored[0][0].sender == ""
