"""SMTP smuggling: no end-of-data variant but CRLF.CRLF ends DATA, and no bare CR/LF is stored.

Each test sends, in one write on a raw socket, a message whose body hides a second transaction
behind a non-standard end-of-data sequence, then the real end. The server must answer once
(one queue id), store exactly one message in a real LMDB spool, and that message must hold the
smuggled commands as text, with every line ending CRLF, so no later hop can split it in two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_receive import QUEUED, Raw, real_spool, running

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
