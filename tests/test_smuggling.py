"""SMTP smuggling: no end-of-data variant but CRLF.CRLF ends DATA, and no bare CR/LF is stored.

Also: TCP segmentation never changes where DATA ends, a dot line with anything before the dot is
data, and what we store is the real (unstuffed) text, length-delimited in the spool.

Each test sends, in one write on a raw socket, a message whose body hides a second transaction
behind a non-standard end-of-data sequence, then the real end. The server must answer once
(one queue id), store exactly one message in a real LMDB spool, and that message must hold the
smuggled commands as text, with every line ending CRLF, so no later hop can split it in two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_receive import QUEUED, Raw, real_spool, running, wait_until

from mtad.config.schema import Limits
from mtad.receive.data import has_bare_newline

FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
}
SMUGGLED = (b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"From: admin@bank.test\r\nSubject: smuggled\r\n\r\npay now\r\n")


async def session(raw: Raw, body: bytes) -> list[bytes]:
    """EHLO..DATA, then body + real end + QUIT in one write; every reply until the server closes."""
    await raw.ask(b"EHLO attacker.test\r\n", b"250")
    await raw.ask(b"MAIL FROM:<a@attacker.test>\r\n", b"250")
    await raw.ask(b"RCPT TO:<user@example.test>\r\n", b"250")
    await raw.ask(b"DATA\r\n", b"354")
    await raw.send(body + b"\r\n.\r\nQUIT\r\n")
    replies = []
    while reply := await raw.reply():
        replies.append(reply)
    return replies


@pytest.mark.asyncio
@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
async def test_fake_end_of_data_is_not_an_end(tmp_path: Path, fake_end: bytes) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        body = b"From: a@attacker.test\r\nSubject: first\r\n\r\nhello" + fake_end + SMUGGLED
        replies = await session(raw, body)
        assert len(replies) == 2 and QUEUED.fullmatch(replies[0]) and replies[1] == b"221 2.0.0 Bye\r\n", replies
        [message] = list(spool.messages())
        stored = spool.read_body(message.envelope.id)
        assert stored is not None
        assert [r.address for r in message.recipients] == ["user@example.test"]
        assert b"MAIL FROM:<admin@bank.test>\r\n" in stored and b"pay now\r\n" in stored
        assert not has_bare_newline(stored)
        # What a later hop sends is this body dot-stuffed: only CRLF.CRLF ends it, and it has none.
        assert b"\r\n.\r\n" not in stored.replace(b"\r\n.", b"\r\n..")
        assert len(rx.of_type("received")) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
async def test_reject_mode_refuses_bare_newlines(tmp_path: Path, fake_end: bytes) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool, limits=Limits(bare_newline="reject")) as rx:
        raw = await rx.raw()
        replies = await session(raw, b"Subject: first\r\n\r\nhello" + fake_end + SMUGGLED)
        assert replies == [b"550 5.6.0 Bare <CR> or <LF> in message data is not allowed\r\n", b"221 2.0.0 Bye\r\n"]
        assert spool.count() == 0
        [event] = rx.of_type("rejected")
        assert event.reply.startswith("550 5.6.0") and event.recipients == ["user@example.test"]


@pytest.mark.asyncio
async def test_dot_stuffing_is_undone_and_a_lone_dot_line_stays_data(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        replies = await session(raw, b"Subject: dots\r\n\r\n..\r\n..leading\r\n.x\r\nend")
        assert QUEUED.fullmatch(replies[0])
        [message] = list(spool.messages())
        stored = spool.read_body(message.envelope.id)
        assert stored is not None and stored.endswith(b"\r\n\r\n.\r\n.leading\r\nx\r\nend\r\n")


@pytest.mark.asyncio
async def test_normalised_bare_newlines_in_headers_and_body(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        replies = await session(raw, b"Subject: a\nX-Other: b\r\rbody\rline\nlast")
        assert QUEUED.fullmatch(replies[0])
        [message] = list(spool.messages())
        stored = spool.read_body(message.envelope.id)
        assert stored is not None
        assert stored.endswith(b"Subject: a\r\nX-Other: b\r\n\r\nbody\r\nline\r\nlast\r\n")


@pytest.mark.asyncio
async def test_a_normalised_fake_end_is_stored_as_the_text_it_is(tmp_path: Path) -> None:
    # `\n.\n` is not an end; normalised, it becomes a line holding one dot. We store the real
    # (unstuffed) text: the spool keeps bodies length-delimited, never dot-terminated, so that is
    # unambiguous, and every hop that sends it on must dot-stuff it (RFC 5321 4.5.2).
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        replies = await session(raw, b"Subject: a\r\n\r\nhello\n.\nMAIL FROM:<x@y.test>")
        assert QUEUED.fullmatch(replies[0])
        [message] = list(spool.messages())
        stored = spool.read_body(message.envelope.id)
        assert stored is not None
        assert stored.endswith(b"Subject: a\r\n\r\nhello\r\n.\r\nMAIL FROM:<x@y.test>\r\n")
        assert message.envelope.size == len(stored)


@pytest.mark.asyncio
@pytest.mark.parametrize("before_dot", [b"\x00", b" ", b"\t", b"\x0b"], ids=["NUL", "SP", "TAB", "VT"])
async def test_a_dot_line_with_anything_before_the_dot_is_data(tmp_path: Path, before_dot: bytes) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        replies = await session(raw, b"Subject: a\r\n\r\nhello\r\n" + before_dot + b".\r\n" + SMUGGLED)
        assert len(replies) == 2 and QUEUED.fullmatch(replies[0]), replies
        [message] = list(spool.messages())
        stored = spool.read_body(message.envelope.id)
        assert stored is not None and b"\r\n" + before_dot + b".\r\nMAIL FROM:<admin@bank.test>\r\n" in stored


@pytest.mark.asyncio
async def test_a_dot_as_the_first_data_line_ends_an_empty_message(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\n", b"250")
        await raw.ask(b"MAIL FROM:<a@attacker.test>\r\n", b"250")
        await raw.ask(b"RCPT TO:<user@example.test>\r\n", b"250")
        await raw.ask(b"DATA\r\n", b"354")
        await raw.send(b".\r\n" + SMUGGLED + b".\r\nQUIT\r\n")
        replies = []
        while reply := await raw.reply():
            replies.append(reply)
        # the empty message, then the "smuggled" transaction is just a second, honest one
        assert QUEUED.fullmatch(replies[0]) and replies[1:4] == [
            b"250 2.1.0 Sender OK\r\n", b"250 2.1.5 Recipient OK\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        assert QUEUED.fullmatch(replies[4]) and replies[5] == b"221 2.0.0 Bye\r\n"
        first, second = sorted(spool.messages(), key=lambda m: m.envelope.arrival_time)
        assert first.envelope.sender == "a@attacker.test" and second.envelope.sender == "admin@bank.test"
        body = spool.read_body(first.envelope.id)
        assert body is not None and body.startswith(b"Received: ") and b"MAIL FROM" not in body


SPLITS = {
    # the real end, cut at every point across TCP segments: still exactly one end
    "dot line split": ([b"body\r\n", b".", b"\r\n"], True, b"\r\n\r\nbody\r\n"),
    "crlf split": ([b"body\r\n.\r", b"\n"], True, b"\r\n\r\nbody\r\n"),
    "cr then lf dot": ([b"body\r", b"\n.\r\n"], True, b"\r\n\r\nbody\r\n"),
    # fake ends cut across segments are still not ends
    "lf dot lf split": ([b"body\n", b".", b"\n", b"more\r\n"], False, b"\r\n\r\nbody\r\n.\r\nmore\r\n"),
    "cr dot cr split": ([b"body\r", b".\r", b"more\r\n"], False, b"\r\n\r\nbody\r\n.\r\nmore\r\n"),
    "lf dot crlf split": ([b"body\n.", b"\r\n"], False, b"\r\n\r\nbody\r\n.\r\n"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize(("parts", "ends", "tail"), SPLITS.values(), ids=SPLITS.keys())
async def test_segmentation_does_not_change_where_data_ends(parts: list[bytes], ends: bool, tail: bytes) -> None:
    async with running() as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\nMAIL FROM:<a@attacker.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n",
                      b"250")
        for _ in range(3):
            await raw.reply()
        # A spy on the server's stream reader: each part is sent only once the server has the
        # previous one, so the parts really arrive as separate segments.
        [server] = list(rx.receiver._sessions)
        reader = server._reader
        received = [0]
        feed = reader.feed_data

        def counting(data: bytes) -> None:
            received[0] += len(data)
            feed(data)

        reader.feed_data = counting  # type: ignore[method-assign]
        sent = 0
        for part in [b"Subject: s\r\n\r\n", *parts]:
            await raw.send(part)
            sent += len(part)
            await wait_until(lambda: received[0] >= sent)  # noqa: B023
        if not ends:
            more = b"X-Nothing: yet\r\nNOOP\r\n"  # still data, and nothing ended so far
            await raw.send(more)
            await wait_until(lambda: received[0] >= sent + len(more))
            assert rx.spool.stored == []
            await raw.send(b".\r\n")
            tail += more
        assert QUEUED.fullmatch(await raw.reply())
        [(_, _, stored)] = rx.spool.stored
        assert not has_bare_newline(stored)
        assert stored.endswith(tail), stored
