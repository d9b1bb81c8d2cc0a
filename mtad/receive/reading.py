"""Reading an SMTP stream: command lines and message data, each with its length and size limits.

The session (session.py) owns the timers and the replies; these coroutines only read. A
command line ends at LF (a bare LF is tolerated there; a CR inside is refused by the session).
A data line ends only at CRLF, so `<LF>.<LF>`, `<CR>.<CR>`, `<LF>.<CR><LF>`, `<CR><LF>.<LF>`
and their kin are data, never the end of DATA: one rule, whatever the TCP segmentation.

Trust: every byte is the peer's and hostile. Memory is bounded by the reader's limit per
command line and, for DATA, by the message size limit: past it (or past the line limit) the
data is counted and dropped, never kept.
RFCs: 5321 2.3.8 and 4.1.1.4 (CRLF and the final dot), 4.5.2 (transparency: a leading dot is
removed), 4.5.3.1.4 and 4.5.3.1.6 (command and text line limits; the stuffed dot does not count),
1870 (message size counts unstuffed octets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mtad.receive.data import DataParser, DataResult

_DOT_CRLF = b".\r\n"


async def read_command(reader: asyncio.StreamReader, max_length: int) -> bytes | None:
    """The next command line with its line end; b"" when longer than `max_length` octets
    (CRLF included; the rest of the line is discarded); None at EOF."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        return b"" if await _skip_line(reader, exc.consumed) else None
    return line if len(line) <= max_length else b""


async def _skip_line(reader: asyncio.StreamReader, consumed: int) -> bool:
    """Discard the rest of an over-long command line; False at EOF."""
    await reader.read(consumed)
    while True:
        try:
            await reader.readuntil(b"\n")
            return True
        except asyncio.LimitOverrunError as exc:
            await reader.read(exc.consumed)
        except asyncio.IncompleteReadError:
            return False


async def read_data(reader: asyncio.StreamReader, *, max_size: int, max_line: int,
                    touch: Callable[[], None]) -> DataResult | None:
    """The message up to the final dot, unstuffed and checked (DataParser); None when the
    client went away first.

    Read in chunks, not lines: up to the next `.<CRLF>`, or whatever is buffered when there is
    none. That `.<CRLF>` ends DATA only when its dot starts a line; otherwise it is data like
    the rest. Nothing past the final dot is consumed, so pipelined commands stay in the reader.
    `touch` is called for every chunk (the session's activity clock). Once the message is too
    big or a line too long, the rest is read and counted but not kept, so the refusal comes
    after the final dot, where the client listens for it (RFC 5321 4.5.3.1.10).
    """
    parser = DataParser(max_size=max_size, max_line=max_line)
    while True:
        try:
            chunk = await reader.readuntil(_DOT_CRLF)
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            # No `.<CRLF>` starts within the first `consumed` octets: data, whatever follows.
            parser.feed(await reader.readexactly(exc.consumed))
            touch()
            continue
        touch()
        if parser.ends(chunk):
            parser.feed(chunk[:-3])
            return parser.result()
        parser.feed(chunk)
