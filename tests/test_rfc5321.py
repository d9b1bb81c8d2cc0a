"""RFC 5321 conformance, byte-exact: every command in every state gets exactly the reply the RFC
(and RFC 2920, 1870, 3207, 3461, 6152) calls for.

Each dialog is one session against a Receiver on 127.0.0.1:0: (bytes sent, the exact reply
expected). The session must survive each dialog (a final NOOP), and nothing is stored unless a
dialog says so.
"""

from __future__ import annotations

import pytest
from test_receive import HOSTNAME, QUEUED, Raw, running, transaction

from mtad.config.schema import Limits

EHLO = (f"250-{HOSTNAME}\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        "250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n").encode()
HELO = f"250 {HOSTNAME}\r\n".encode()
OK = b"250 2.0.0 OK\r\n"
SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RCPT_OK = b"250 2.1.5 Recipient OK\r\n"
START = b"354 End data with <CR><LF>.<CR><LF>\r\n"
SYNTAX = b"501 5.5.4 Syntax error in parameters or arguments\r\n"
BAD_ADDRESS = b"501 5.1.3 Bad address syntax\r\n"
NEED_HELO = b"503 5.5.1 Send HELO or EHLO first\r\n"
NEED_MAIL = b"503 5.5.1 Need MAIL command first\r\n"
NEED_RCPT = b"503 5.5.1 Need RCPT command first\r\n"
NO_VALID = b"554 5.5.1 No valid recipients\r\n"
RELAY = b"550 5.7.1 Relay access denied\r\n"
UNKNOWN = b"500 5.5.1 Command unrecognized\r\n"
NOT_IMPLEMENTED = b"502 5.5.1 Command not implemented\r\n"
PARAM = b"555 5.5.4 Parameter not recognized\r\n"
ROUTE = b".".join([b"r" * 60] * 3) + b".test"  # a 187-octet source-route domain

DIALOGS: dict[str, list[tuple[bytes, bytes]]] = {
    # 4.1.1.1: HELO/EHLO need a domain or address literal
    "helo and ehlo need an argument": [(b"HELO\r\n", SYNTAX), (b"EHLO\r\n", SYNTAX), (b"EHLO   \r\n", SYNTAX),
                                       (b"helo client.test\r\n", HELO), (b"ehlo [127.0.0.1]\r\n", EHLO)],
    # 4.1.4: a transaction needs HELO first, then MAIL, then RCPT, then DATA
    "order before helo": [(b"MAIL FROM:<a@b.test>\r\n", NEED_HELO), (b"RCPT TO:<u@example.test>\r\n", NEED_HELO),
                          (b"DATA\r\n", NEED_HELO)],
    "order after ehlo": [(b"EHLO c.test\r\n", EHLO), (b"RCPT TO:<u@example.test>\r\n", NEED_MAIL),
                         (b"DATA\r\n", NEED_MAIL), (b"MAIL FROM:<a@b.test>\r\n", SENDER_OK),
                         (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Sender already specified\r\n"),
                         (b"DATA\r\n", NEED_RCPT)],
    # 3.3 and RFC 2920 3.1: DATA after RCPTs that all failed is "no valid recipients"
    "data after failed rcpts": [(b"EHLO c.test\r\n", EHLO), (b"MAIL FROM:<a@b.test>\r\n", SENDER_OK),
                                (b"RCPT TO:<u@ext.test>\r\n", RELAY), (b"RCPT TO:<bad\r\n", BAD_ADDRESS),
                                (b"DATA\r\n", NO_VALID), (b"RSET\r\n", OK), (b"MAIL FROM:<>\r\n", SENDER_OK),
                                (b"DATA\r\n", NEED_RCPT)],
    # 4.1.4: EHLO in a transaction resets it
    "ehlo resets the transaction": [(b"EHLO c.test\r\n", EHLO), (b"MAIL FROM:<a@b.test>\r\n", SENDER_OK),
                                    (b"RCPT TO:<u@example.test>\r\n", RCPT_OK), (b"EHLO c.test\r\n", EHLO),
                                    (b"DATA\r\n", NEED_MAIL), (b"MAIL FROM:<a@b.test>\r\n", SENDER_OK)],
    # 4.1.1.5-4.1.1.10 and 3.5.3: RSET takes nothing, NOOP may take a string, VRFY gets 252
    "rset noop vrfy help": [(b"RSET\r\n", OK), (b"RSET now\r\n", SYNTAX), (b"NOOP\r\n", OK),
                            (b"NOOP any string at all\r\n", OK), (b"VRFY\r\n", SYNTAX),
                            (b"VRFY <postmaster>\r\n",
                             b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
                            (b"HELP\r\n", b"214 2.0.0 See RFC 5321\r\n"),
                            (b"HELP MAIL\r\n", b"214 2.0.0 See RFC 5321\r\n"), (b"EXPN staff\r\n", NOT_IMPLEMENTED)],
    # 4.2.4: 500 for what we do not know, 502 for what we know and do not do
    "500 versus 502": [(b"EHLO c.test\r\n", EHLO), (b"XYZZY\r\n", UNKNOWN), (b"TURN\r\n", NOT_IMPLEMENTED),
                       (b"SEND FROM:<a@b.test>\r\n", NOT_IMPLEMENTED), (b"SOML FROM:<a@b.test>\r\n", NOT_IMPLEMENTED),
                       (b"SAML FROM:<a@b.test>\r\n", NOT_IMPLEMENTED), (b"ETRN example.test\r\n", NOT_IMPLEMENTED),
                       (b"ATRN\r\n", NOT_IMPLEMENTED), (b"BDAT 10 LAST\r\n", NOT_IMPLEMENTED),
                       (b"AUTH LOGIN\r\n", NOT_IMPLEMENTED), (b"MAIL\r\n", SYNTAX)],
    # 2.4: verbs and keywords are case-insensitive; a space after the colon is widely sent
    "case and spaces": [(b"eHlO c.test\r\n", EHLO), (b"mail from:<a@b.test>\r\n", SENDER_OK),
                        (b"rCpT tO:<u@example.test>\r\n", RCPT_OK), (b"rset\r\n", OK),
                        (b"MAIL FROM: <a@b.test>\r\n", SENDER_OK), (b"RCPT TO: <u@example.test>  \r\n", RCPT_OK),
                        (b"RSET\r\n", OK), (b"MAIL FROM:<>\r\n", SENDER_OK),
                        (b"RCPT TO:<Postmaster>\r\n", RCPT_OK)],
    # RFC 1870, 6152, 3461, 6531: parameters that need "=value" refuse a bare keyword
    "mail parameters": [(b"EHLO c.test\r\n", EHLO), (b"MAIL FROM:<a@b.test> SIZE\r\n", SYNTAX),
                        (b"MAIL FROM:<a@b.test> SIZE=\r\n", SYNTAX), (b"MAIL FROM:<a@b.test> BODY\r\n", SYNTAX),
                        (b"MAIL FROM:<a@b.test> RET\r\n", SYNTAX), (b"MAIL FROM:<a@b.test> ENVID\r\n", SYNTAX),
                        (b"MAIL FROM:<a@b.test> SMTPUTF8=YES\r\n", SYNTAX),
                        (b"MAIL FROM:<a@b.test> ENVID=" + b"x" * 101 + b"\r\n", SYNTAX),
                        (b"MAIL FROM:<a@b.test> SIZE=" + b"9" * 21 + b"\r\n", SYNTAX),
                        (b"MAIL FROM:<a@b.test> SIZE=" + b"9" * 20 + b"\r\n",
                         b"552 5.3.4 Message size exceeds fixed limit\r\n"),
                        (b"MAIL FROM:<a@b.test> X-UNKNOWN=1\r\n", PARAM),
                        (b"MAIL FROM:<a@b.test> size=0 body=8bitmime smtputf8 ret=hdrs\r\n", SENDER_OK),
                        (b"RCPT TO:<u@example.test> NOTIFY\r\n", SYNTAX),
                        (b"RCPT TO:<u@example.test> X-UNKNOWN\r\n", PARAM)],
    # 4.1.1.2 and RFC 1869: ESMTP parameters exist only after EHLO
    "no parameters after helo": [(b"HELO c.test\r\n", HELO), (b"MAIL FROM:<a@b.test> SIZE=10\r\n", SYNTAX),
                                 (b"MAIL FROM:<a@b.test> BODY=8BITMIME\r\n", SYNTAX),
                                 (b"MAIL FROM:<a@b.test> SMTPUTF8\r\n", SYNTAX),
                                 (b"MAIL FROM:<a@b.test>\r\n", SENDER_OK),
                                 (b"RCPT TO:<u@example.test> NOTIFY=NEVER\r\n", SYNTAX),
                                 (b"RCPT TO:<u@example.test>\r\n", RCPT_OK)],
    # 4.5.3.1.1-3: local part 64, domain 255, path 256 octets; longer is 501
    "address length limits": [(b"EHLO c.test\r\n", EHLO), (b"MAIL FROM:<" + b"s" * 64 + b"@b.test>\r\n", SENDER_OK),
                              (b"RCPT TO:<" + b"a" * 64 + b"@example.test>\r\n", RCPT_OK),
                              (b"RCPT TO:<" + b"a" * 65 + b"@example.test>\r\n", BAD_ADDRESS),
                              # <@route:local@example.test> of exactly 256, then 257 octets
                              (b"RCPT TO:<@" + ROUTE + b":" + b"b" * 52 + b"@example.test>\r\n", RCPT_OK),
                              (b"RCPT TO:<@" + ROUTE + b":" + b"b" * 53 + b"@example.test>\r\n", BAD_ADDRESS),
                              (b"RCPT TO:<u@" + b"x" * 64 + b".example.test>\r\n", BAD_ADDRESS),
                              (b"RSET\r\n", OK),
                              # senders are taken up to 255 / 512 (VERP, SRS), not past them
                              (b"MAIL FROM:<" + b"s" * 255 + b"@b.test>\r\n", SENDER_OK), (b"RSET\r\n", OK),
                              (b"MAIL FROM:<" + b"s" * 256 + b"@b.test>\r\n", BAD_ADDRESS)],
    "starttls not offered": [(b"EHLO c.test\r\n", EHLO), (b"STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n")],
}


@pytest.mark.asyncio
@pytest.mark.parametrize("steps", DIALOGS.values(), ids=DIALOGS.keys())
async def test_dialog(steps: list[tuple[bytes, bytes]]) -> None:
    async with running(limits=Limits(max_bad_commands=100)) as rx:
        raw = await rx.raw()
        for send, expected in steps:
            await raw.send(send)
            assert await raw.reply() == expected, send
        await raw.ask(b"NOOP\r\n", OK)
        assert rx.spool.stored == []


@pytest.mark.asyncio
async def test_quit_says_221_and_closes_even_with_pipelined_commands_behind_it() -> None:
    async with running() as rx:
        raw = await rx.raw()
        await raw.send(b"QUIT\r\nNOOP\r\nHELO c.test\r\n")
        assert await raw.reply() == b"221 2.0.0 Bye\r\n"
        assert await raw.closed_by_server()


@pytest.mark.asyncio
async def test_pipelined_rcpt_failures_then_data_get_554_and_no_354() -> None:
    # RFC 2920 3.1: the client sent DATA before it saw the RCPT replies; it must get a refusal,
    # and the body that follows is then read as commands (each one refused), never stored.
    async with running() as rx:
        raw = await rx.raw()
        await raw.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@ext.test>\r\nRCPT TO:<y@ext.test>\r\n"
                       b"DATA\r\nRSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
        assert [await raw.reply() for _ in range(9)] == [
            EHLO, SENDER_OK, RELAY, RELAY, NO_VALID, OK, SENDER_OK, RCPT_OK, START]
        assert QUEUED.fullmatch(await raw.ask(b"Subject: p\r\n\r\nok\r\n.\r\n", b"250"))
        assert len(rx.spool.stored) == 1


@pytest.mark.asyncio
async def test_command_line_limit_is_exact() -> None:
    async with running(limits=Limits(max_command_length=512)) as rx:
        raw = await rx.raw()
        await raw.ask(b"NOOP " + b"x" * 505 + b"\r\n", OK)  # 512 octets with CRLF (4.5.3.1.4)
        await raw.ask(b"NOOP " + b"x" * 506 + b"\r\n", b"500 5.5.2 Line too long\r\n")
        await raw.ask(b"NOOP\r\n", OK)


@pytest.mark.asyncio
async def test_text_line_limit_is_exact_and_does_not_count_the_stuffed_dot() -> None:
    async with running(limits=Limits(max_line_length=1000)) as rx:
        raw = await rx.raw()
        exact = b"y" * 998 + b"\r\n"  # 1000 octets with CRLF (4.5.3.1.6)
        assert QUEUED.fullmatch(await transaction(raw, body=b"Subject: l\r\n\r\n" + exact))
        # "not counting the leading dot duplicated for transparency"
        assert QUEUED.fullmatch(await transaction(raw, body=b"Subject: l\r\n\r\n." + b"." + b"y" * 997 + b"\r\n"))
        refused = await transaction(raw, body=b"Subject: l\r\n\r\n" + b"y" + exact)
        assert refused == b"500 5.5.2 Line too long\r\n"
        assert len(rx.spool.stored) == 2
        assert rx.spool.stored[0][2].endswith(b"\r\n\r\n" + exact)
        assert rx.spool.stored[1][2].endswith(b"\r\n\r\n." + b"y" * 997 + b"\r\n")


@pytest.mark.asyncio
async def test_size_limit_counts_octets_after_unstuffing() -> None:
    # RFC 1870 3: the size excludes the terminating dot and doubled quoting dots.
    async with running(limits=Limits(max_message_size=2000)) as rx:
        raw = await rx.raw()
        head = b"Subject: s\r\n\r\n"
        line = b"." * 98 + b"\r\n"  # 100 octets; sent stuffed as 101
        body = head + line * 19 + b"z" * (2000 - len(head) - 1900 - 2) + b"\r\n"
        assert len(body) == 2000
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        assert QUEUED.fullmatch(await transaction(raw, body=stuffed))
        assert await transaction(raw, body=stuffed.replace(b"z", b"zz", 1)) == (
            b"552 5.3.4 Message size exceeds fixed limit\r\n")
        [(_, _, stored)] = rx.spool.stored
        assert stored.endswith(body)


@pytest.mark.asyncio
async def test_8bitmime_and_smtputf8_transactions() -> None:
    async with running(domains=("example.test", "bücher.test")) as rx:
        raw = await rx.raw()
        got = await transaction(raw, sender=b"<s@o.test> BODY=8BITMIME", body="Subject: x\r\n\r\nbüro\r\n".encode())
        assert QUEUED.fullmatch(got)
        await raw.ask(b"MAIL FROM:<s@o.test>\r\n", SENDER_OK)
        await raw.ask("RCPT TO:<jörg@bücher.test>\r\n".encode(), b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n")
        await raw.ask(b"RSET\r\n", OK)
        await raw.ask("MAIL FROM:<jörg@o.test> SMTPUTF8\r\n".encode(), SENDER_OK)
        await raw.ask("RCPT TO:<jörg@bücher.test>\r\n".encode(), RCPT_OK)
        await raw.ask(b"DATA\r\n", START)
        assert QUEUED.fullmatch(await raw.ask("Subject: grüße\r\n\r\nx\r\n.\r\n".encode(), b"250"))
        assert [r.address for r in rx.spool.stored[1][1]] == ["jörg@xn--bcher-kva.test"]
        assert rx.spool.stored[1][0].smtputf8 and rx.spool.stored[0][0].body_type == "8BITMIME"


@pytest.mark.asyncio
async def test_mail_may_follow_a_message_directly_and_an_empty_message_is_a_message() -> None:
    # 4.1.4: after a message the session is back to "greeted": MAIL may follow directly.
    async with running() as rx:
        raw = await Raw.connect(rx.host, rx.port)
        assert QUEUED.fullmatch(await transaction(raw))
        await raw.ask(b"MAIL FROM:<s@o.test>\r\n", SENDER_OK)
        await raw.ask(b"RCPT TO:<u@example.test>\r\n", RCPT_OK)
        await raw.ask(b"DATA\r\n", START)
        assert QUEUED.fullmatch(await raw.ask(b".\r\n", b"250"))  # an empty message is a message
        assert len(rx.spool.stored) == 2
