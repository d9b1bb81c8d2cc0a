"""Big messages and the chunked DATA reader: the same guarantees as line by line, held once.

The reader takes DATA in chunks (reading.py, DataParser in data.py) rather than line by line;
a property test holds it to the line-by-line model it replaced, over random content and random
TCP segmentation: where DATA ends, what is left in the stream, the body stored (unstuffed,
newlines normalised), the refusals, and the header facts it gathers on the way. Then end to end
with a real spool: a 5 MB message with bare LFs and stuffed dots stored byte-exact, and the size
limit exact to the octet, refused after the dot with nothing stored.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_receive import QUEUED, real_spool, running

from mtad.config.schema import Limits, Size
from mtad.events import EventBus
from mtad.ingest import Ingest, Submission, header_section_end, insert_at_top
from mtad.receive.data import (
    DataResult,
    check_message,
    count_received,
    has_bare_newline,
    normalize_newlines,
)
from mtad.receive.reading import read_data
from mtad.records import Recipient
from mtad.reply import Reply

# -- the line-by-line model ------------------------------------------------------------------


def line_model(stream: bytes, *, max_size: int, max_line: int) -> tuple[DataResult, bytes] | None:
    """DATA as RFC 5321 reads it, one CRLF-ended line at a time: (result, what follows the
    final dot), or None when the stream ends first."""
    pos, size, kept = 0, 0, []
    too_big = too_long = False
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return None
        line, pos = stream[pos:end + 2], end + 2
        if line == b".\r\n":
            break
        if line[:1] == b".":
            line = line[1:]
        size += len(line)
        if too_big or too_long:
            continue
        if len(line) > max_line:
            too_long = True
        elif size > max_size:
            too_big = True
        else:
            kept.append(line)
    body = b"" if too_big or too_long else b"".join(kept)
    return DataResult(body, size, too_big=too_big or size > max_size, line_too_long=too_long), stream[pos:]


async def chunked(parts: list[bytes], *, limit: int, max_size: int, max_line: int) -> tuple[DataResult | None, bytes]:
    """read_data on a real StreamReader fed `parts` one by one (then EOF); and what is left."""
    reader = asyncio.StreamReader(limit=limit)

    async def feed() -> None:
        for part in parts:
            reader.feed_data(part)
            await asyncio.sleep(0)  # let the reader take what it has: new segment boundaries
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    result = await read_data(reader, max_size=max_size, max_line=max_line, touch=lambda: None)
    await feeder
    return result, await reader.read()


TOKENS = [b"\r\n", b"\r", b"\n", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"a", b"xyz" * 7,
          b"Received: by x", b"X-Field: v", b"Subject:", b" folded", b"\t", b": ", b"\xc3\xa9", b"\x00"]
streams = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=streams, tail=st.sampled_from([b"\r\n.\r\nQUIT\r\n", b"\r\n.\r\n", b".\r\nNOOP\r\n", b""]),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       limit=st.sampled_from([8, 16, 2048]), max_line=st.sampled_from([12, 30, 1000]),
       max_size=st.sampled_from([40, 150, 10**6]))
def test_chunked_reading_matches_the_line_by_line_model(content: bytes, tail: bytes, cuts: list[int], limit: int,
                                                        max_line: int, max_size: int) -> None:
    stream = content + tail
    edges = sorted({c for c in cuts if 0 < c < len(stream)})
    parts = [stream[a:b] for a, b in zip([0, *edges], [*edges, len(stream)], strict=True)]
    got, rest = asyncio.run(chunked(parts, limit=limit, max_size=max_size, max_line=max_line))
    model = line_model(stream, max_size=max_size, max_line=max_line)
    if model is None:
        assert got is None
        return
    expected, expected_rest = model
    assert got is not None and rest == expected_rest
    want = check_message(expected, smtputf8=False, max_received=2, bare_newline="normalize")
    answer = check_message(got, smtputf8=False, max_received=2, bare_newline="normalize")
    if expected.too_big or expected.line_too_long:
        # Both refuse; once refused the rest is only counted (raw), so a line-too-long message
        # near the size limit may be called too big: both are 5xx after the dot.
        assert isinstance(answer, Reply) and answer.code >= 500 and not got.body
        assert got.too_big or not expected.too_big
        return
    assert got.size == expected.size
    assert got.bare_newline == has_bare_newline(expected.body)
    body = normalize_newlines(bytes(expected.body))
    assert bytes(got.body) == body
    end = header_section_end(body)
    assert (got.header_end, got.header_ascii, got.received_count) == (end, body[:end].isascii(),
                                                                     count_received(body[:end]))
    assert (answer if isinstance(answer, Reply) else bytes(answer)) == want
    assert check_message(got, smtputf8=False, max_received=2, bare_newline="reject") == (
        check_message(expected, smtputf8=False, max_received=2, bare_newline="reject"))


# -- ingest: our header lines go on top in place, or with one copy ----------------------------

CASES = {
    "headers then body": b"Subject: s\r\n\r\nbody\r\n",
    "no header": b"just text\r\n",
    "text where headers should be": b"Subject: s\r\nnot a field\r\n",
    "starts with the blank line": b"\r\nbody\r\n",
    "empty": b"",
}


@pytest.mark.parametrize("body", CASES.values(), ids=CASES.keys())
def test_insert_at_top_is_the_same_in_place_and_by_copy(body: bytes) -> None:
    added = [b"Received: x\r\n", b"Date: d\r\n"]
    end = header_section_end(body)
    buffer = bytearray(body)
    in_place = insert_at_top(buffer, end, added)
    copied = insert_at_top(body, end, added)
    assert in_place is buffer and bytes(in_place) == copied
    assert copied.startswith(b"Received: x\r\nDate: d\r\n")
    # what follows our fields is the message's own header section, then one blank line
    rest = copied[len(b"Received: x\r\nDate: d\r\n"):]
    assert header_section_end(rest) == end and (rest[end:].startswith(b"\r\n") or rest[end:] == b"")


class KeepingSpool:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def store(self, envelope: object, recipients: object, body: bytes | memoryview) -> None:
        self.bodies.append(bytes(body))


@pytest.mark.asyncio
async def test_a_huge_header_section_is_searched_off_the_loop_with_the_same_answer() -> None:
    spool = KeepingSpool()
    ingest = Ingest(spool, EventBus(), "mx.test", clock=lambda: 1_700_000_000.0)
    filler = b"X-Filler: " + b"f" * 60 + b"\r\n"
    for count in (10, 5000):  # 0.7 KB inline, 350 KB in a worker thread
        body = filler * count + b"Message-ID: <m@o.test>\r\n\r\nbody\r\n"
        for given_end in (-1, header_section_end(body)):
            await ingest.accept(Submission(sender="", recipients=[Recipient(address="u@x.test")],
                                           body=bytearray(body), received=b"Received: r\r\n", header_end=given_end))
            stored = spool.bodies[-1]
            assert stored.startswith(b"Received: r\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n" + filler)
            assert stored.endswith(body) and stored.count(b"Message-ID:") == 1


# -- end to end with a real spool -----------------------------------------------------------

MB = 1024 * 1024


def big_message(size: int) -> tuple[bytes, bytes]:
    """(what the client sends after DATA, dot-stuffed and with bare LFs and CRs; what must be
    stored after our Received header, by the line-by-line model)."""
    head = (b"From: big@origin.test\r\nSubject: big\r\nMessage-ID: <big@origin.test>\r\n"
            b"Date: Mon, 02 Jan 2006 15:04:05 +0000\r\n\r\n")
    block = (b"plain line of text " * 4 + b"\r\n"
             b"..a line that starts with a dot\r\n"
             b"a bare LF here\n.and a bare CR here\r.end\r\n"
             b"..\r\n"  # a lone dot line, stuffed
             + b"x" * 900 + b"\r\n")
    sent = head + block * ((size - len(head)) // len(block) + 1)
    model = line_model(sent + b".\r\n", max_size=2**31, max_line=2048)
    assert model is not None
    return sent, normalize_newlines(bytes(model[0].body))


@pytest.mark.asyncio
async def test_a_5mb_message_with_bare_newlines_and_stuffed_dots_is_stored_byte_exact(tmp_path: Path) -> None:
    sent, expected = big_message(5 * MB)
    assert len(sent) > 5 * MB and b"\r\n.a line" in expected and b"\r\n..a line" not in expected
    assert b"\r\n.\r\n" in expected and b"here\r\n.and" in expected and not has_bare_newline(expected)
    async with real_spool(tmp_path) as spool, running(spool=spool, limits=Limits(max_message_size=Size(8 * MB))) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\nMAIL FROM:<big@origin.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n", b"250")
        for _ in range(3):
            await raw.reply()
        await raw.send(sent + b".\r\n")
        queued = QUEUED.fullmatch(await raw.reply(timeout=30))
        assert queued is not None
        await raw.ask(b"NOOP\r\n", b"250")  # the session carries on
        body = spool.read_body(queued.group(1).decode())
        assert body is not None and body.startswith(b"Received: from c.test")
        received_end = body.index(b"\r\n", body.index(b"\tfor <user@example.test>")) + 2
        assert body[received_end:] == expected
        [event] = rx.of_type("received")
        assert event.size == len(body)


@pytest.mark.asyncio
async def test_the_size_limit_is_exact_and_refused_after_the_dot_with_nothing_stored(tmp_path: Path) -> None:
    limit = 2 * MB
    head = b"Subject: s\r\n\r\n"
    line = b"y" * 998 + b"\r\n"
    exact = head + line * ((limit - len(head)) // len(line))
    exact += b"z" * (limit - len(exact) - 2) + b"\r\n"
    assert len(exact) == limit
    async with real_spool(tmp_path) as spool, running(spool=spool, limits=Limits(max_message_size=Size(limit))) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\n", b"250")
        for body, answer in ((b"." + exact[:-2] + b"\r\n", b"250"),  # a stuffed dot does not count
                             (exact[:-2] + b"!\r\n", b"552 5.3.4"),   # one octet over
                             (exact, b"250")):
            await raw.send(b"MAIL FROM:<s@o.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
            assert [(await raw.reply())[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            await raw.send(body + b".\r\n")
            assert (await raw.reply(timeout=30)).startswith(answer)
        assert spool.count() == 2
        assert [len(spool.read_body(m.envelope.id) or b"") > limit for m in spool.messages()] == [True, True]
        [refused] = rx.of_type("rejected")
        assert refused.size == limit + 1 and refused.reply.startswith("552")
