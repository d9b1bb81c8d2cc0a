"""Hostile and broken clients, byte-exact: each send gets exactly the expected reply, and the
spool holds only what was acknowledged with a queue id."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_receive import QUEUED, Raw, real_spool, running, transaction, wait_until

from mtad.config.schema import Limits

# Dialog steps: (bytes to send, exact reply expected). One session per dialog.
DIALOGS: dict[str, list[tuple[bytes, bytes]]] = {
    "nul in command": [(b"EHLO a\x00b\r\n", b"500 5.5.2 Syntax error, command unrecognized\r\n"),
                       (b"HELO c.test\r\n", b"250 mx.receive.test\r\n"),
                       (b"MAIL FROM:<a@b.test>\x00 SIZE=1\r\n", b"500 5.5.2 Syntax error, command unrecognized\r\n")],
    "empty line": [(b"\r\n", b"500 5.5.2 Syntax error, command unrecognized\r\n")],
    "bare cr inside a command": [(b"HELO a\rMAIL FROM:<x@y.test>\r\n",
                                  b"500 5.5.2 Syntax error, command unrecognized\r\n")],
    "8-bit verb": [(b"H\xc9LO c.test\r\n", b"500 5.5.1 Command unrecognized\r\n")],
    "invalid utf-8 argument": [(b"EHLO c.test\r\n", b""),
                               (b"MAIL FROM:<\xff\xfe@b.test>\r\n", b"500 5.5.2 Syntax error, command unrecognized\r\n")],
    # RFC 5321 4.2.4: 502 for commands we recognise but do not implement, 500 for the rest
    "unknown and unimplemented": [(b"AUTH PLAIN AGFiAGM=\r\n", b"502 5.5.1 Command not implemented\r\n"),
                                  (b"BDAT 10 LAST\r\n", b"502 5.5.1 Command not implemented\r\n"),
                                  (b"TURN\r\n", b"502 5.5.1 Command not implemented\r\n"),
                                  (b"etrn example.test\r\n", b"502 5.5.1 Command not implemented\r\n"),
                                  (b"XYZZY\r\n", b"500 5.5.1 Command unrecognized\r\n"),
                                  (b"MAILFROM:<a@b.test>\r\n", b"500 5.5.1 Command unrecognized\r\n")],
    "out of sequence": [(b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Send HELO or EHLO first\r\n"),
                        (b"EHLO c.test\r\n", b""),
                        (b"RCPT TO:<u@example.test>\r\n", b"503 5.5.1 Need MAIL command first\r\n"),
                        (b"DATA\r\n", b"503 5.5.1 Need MAIL command first\r\n"),
                        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender OK\r\n"),
                        (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Sender already specified\r\n"),
                        (b"DATA\r\n", b"503 5.5.1 Need RCPT command first\r\n"),
                        (b"RSET now\r\n", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                        (b"RSET\r\n", b"250 2.0.0 OK\r\n"),
                        (b"RCPT TO:<u@example.test>\r\n", b"503 5.5.1 Need MAIL command first\r\n")],
    "malformed mail and rcpt": [(b"EHLO c.test\r\n", b""),
                                (b"HELO\r\n", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                                (b"MAIL TO:<a@b.test>\r\n", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                                (b"MAIL FROM:<a@b.test\r\n", b"501 5.1.3 Bad address syntax\r\n"),
                                (b"MAIL FROM:<a@b.test>junk\r\n", b"501 5.1.3 Bad address syntax\r\n"),
                                (b"MAIL FROM:<a@b.test> FOO=BAR\r\n", b"555 5.5.4 Parameter not recognized\r\n"),
                                (b"MAIL FROM:<a@b.test> SIZE=big\r\n",
                                 b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                                (b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n",
                                 b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                                ("MAIL FROM:<jö@b.test>\r\n".encode(), b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"),
                                (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender OK\r\n"),
                                (b"RCPT TO:<u@example.test> NOTIFY=SOMETIMES\r\n",
                                 b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                                (b"RCPT TO:<u@example.test> ORCPT=u@example.test\r\n",
                                 b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
                                (b"RCPT TO:\r\n", b"501 5.1.3 Bad address syntax\r\n")],
    "params after helo are refused": [(b"HELO c.test\r\n", b""),
                                      (b"MAIL FROM:<a@b.test> SIZE=10\r\n",
                                       b"501 5.5.4 Syntax error in parameters or arguments\r\n")],
    "starttls garbage": [(b"STARTTLS now\r\n", b"501 5.5.4 Syntax error in parameters or arguments\r\n")],
}


@pytest.mark.asyncio
@pytest.mark.parametrize("steps", DIALOGS.values(), ids=DIALOGS.keys())
async def test_dialog(steps: list[tuple[bytes, bytes]]) -> None:
    async with running() as rx:
        raw = await rx.raw()
        for send, expected in steps:
            await raw.send(send)
            got = await raw.reply()
            if expected:
                assert got == expected, (send, got)
        await raw.ask(b"NOOP\r\n", b"250 2.0.0 OK\r\n")  # the session survives all of it
        assert rx.spool.stored == []


@pytest.mark.asyncio
async def test_huge_command_line_gets_500_and_the_session_goes_on() -> None:
    async with running(limits=Limits(max_command_length=600)) as rx:
        raw = await rx.raw()
        await raw.send(b"HELO " + b"a" * 594 + b"\r\n")  # 601 bytes with CRLF
        assert await raw.reply() == b"500 5.5.2 Line too long\r\n"
        await raw.send(b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\n")  # far past the reader's buffer
        assert await raw.reply() == b"500 5.5.2 Line too long\r\n"
        assert await raw.reply() == b"250 2.0.0 OK\r\n"


@pytest.mark.asyncio
async def test_pipelined_garbage_is_answered_in_order(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        await raw.send(b"EHLO c.test\r\n\x00\x01\x02\r\nGARBAGE\r\n\xff\xff\r\nMAIL FROM:<s@o.test>\r\n"
                       b"RCPT TO:<u@example.test>\r\nDATA\r\n")
        assert (await raw.reply()).startswith(b"250-mx.receive.test\r\n")
        assert [await raw.reply() for _ in range(6)] == [
            b"500 5.5.2 Syntax error, command unrecognized\r\n", b"500 5.5.1 Command unrecognized\r\n",
            b"500 5.5.1 Command unrecognized\r\n", b"250 2.1.0 Sender OK\r\n", b"250 2.1.5 Recipient OK\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        assert QUEUED.fullmatch(await raw.ask(b"Subject: x\r\n\r\nok\r\n.\r\n", b"250"))
        assert spool.count() == 1


@pytest.mark.asyncio
async def test_eight_bit_headers_need_smtputf8() -> None:
    async with running() as rx:
        raw = await rx.raw()
        header = "Subject: grüße\r\n\r\nbody\r\n".encode()
        assert await transaction(raw, body=header) == b"550 5.6.7 8-bit header data requires SMTPUTF8\r\n"
        assert rx.spool.stored == []
        assert QUEUED.fullmatch(await transaction(raw, sender=b"<s@o.test> SMTPUTF8", body=header))
        # 8-bit in the body is fine without SMTPUTF8 (8BITMIME)
        assert QUEUED.fullmatch(await transaction(raw, body="Subject: x\r\n\r\ngrüße\r\n".encode()))
        assert len(rx.spool.stored) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [b"", b"Subject: half\r\n\r\npart", b"Subject: half\r\n\r\nline\r\n."])
async def test_disconnect_mid_data_stores_nothing(tmp_path: Path, cut: bytes) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n", b"250")
        for _ in range(3):
            await raw.reply()
        await raw.send(cut)
        await raw.close()
        await wait_until(lambda: rx.receiver.session_count() == 0)
        assert spool.count() == 0 and rx.of_type("received") == []


@pytest.mark.asyncio
async def test_half_close_after_the_dot_still_stores_and_answers(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        await raw.send(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
        for _ in range(4):
            await raw.reply()
        await raw.send(b"Subject: x\r\n\r\nbye\r\n.\r\n")
        raw.writer.write_eof()
        assert QUEUED.fullmatch(await raw.reply())
        assert await raw.closed_by_server()
        assert spool.count() == 1


@pytest.mark.asyncio
async def test_long_data_line_is_refused_after_the_dot() -> None:
    async with running(limits=Limits(max_line_length=1000)) as rx:
        raw = await rx.raw()
        for length in (1200, 200_000):
            got = await transaction(raw, body=b"Subject: long\r\n\r\n" + b"z" * length + b"\r\nend\r\n")
            assert got == b"500 5.5.2 Line too long\r\n"
        assert rx.spool.stored == []
        assert QUEUED.fullmatch(await transaction(raw, body=b"Subject: ok\r\n\r\n" + b"z" * 900 + b"\r\n"))


@pytest.mark.asyncio
async def test_endless_line_without_newline_is_cut_by_the_idle_timeout() -> None:
    from mtad.config.schema import Duration
    async with running(limits=Limits(idle_timeout=Duration(0.5))) as rx:
        raw = await rx.raw()
        for _ in range(20):
            await raw.send(b"x" * 10_000)
        assert await raw.reply(timeout=5) == b"421 4.4.2 Idle timeout, closing connection\r\n"
        assert await raw.closed_by_server()


@pytest.mark.asyncio
async def test_refused_connection_is_not_counted() -> None:
    async with running(limits=Limits(max_connections_per_ip=1)) as rx:
        first = await rx.raw()
        for _ in range(3):
            extra = await Raw.connect(rx.host, rx.port, greet=False)
            assert (await extra.reply()).startswith(b"421 4.7.0")
        assert rx.receiver.session_count() == 1
        await first.ask(b"QUIT\r\n", b"221")
        await wait_until(lambda: rx.receiver.session_count() == 0)
