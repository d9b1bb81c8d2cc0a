"""Slow, idle and hostile-but-quiet clients: none of them holds a connection (or a per-IP slot)
for longer than the limits say, and every way a session ends gives its slot back.

RFC 5321 4.5.3.2 times each wait; on top of that a whole command must arrive within the idle
timeout and a whole DATA within `data_deadline`, however steadily the bytes trickle in. A peer
that does not read our replies is aborted once its replies fill the transport's buffer and the
idle timer runs out. The timeouts here are a fraction of a second, so the file stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_receive import QUEUED, Raw, running, tls_context, transaction, wait_until  # noqa: F401

from mtad.config.schema import Duration, Limits

IDLE = b"421 4.4.2 Idle timeout, closing connection\r\n"
TOO_SLOW = b"421 4.4.2 Message data took too long, closing connection\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing connection\r\n"


def fast(**overrides: Any) -> Limits:
    values: dict[str, Any] = {"idle_timeout": Duration(0.5), "data_timeout": Duration(0.5),
                              "data_deadline": Duration(30)}
    values.update(overrides)
    return Limits(**values)


async def drip(raw: Raw, chunks: list[bytes], interval: float) -> None:
    """Send the chunks `interval` apart, until done or the server hangs up. The sleeps are the
    client's slowness under test, not synchronisation: the tests wait on the server's reply."""
    try:
        for chunk in chunks:
            await raw.send(chunk)
            await asyncio.sleep(interval)
    except ConnectionError:
        pass


@contextlib.asynccontextmanager
async def dripping(raw: Raw, chunks: list[bytes], interval: float) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(drip(raw, chunks, interval))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_banner_then_silence_is_closed_after_the_idle_timeout() -> None:
    async with running(limits=fast()) as rx:
        loop = asyncio.get_running_loop()
        start = loop.time()
        raw = await rx.raw()
        assert await raw.reply(timeout=5) == IDLE
        assert await raw.closed_by_server()
        assert 0.4 < loop.time() - start < 3
        await wait_until(lambda: rx.receiver.session_count() == 0)


@pytest.mark.asyncio
async def test_a_command_trickled_byte_by_byte_still_hits_the_idle_deadline() -> None:
    # Every byte arrives well within the idle timeout, but the line never completes in time.
    async with running(limits=fast()) as rx:
        raw = await rx.raw()
        line = b"NOOP " + b"x" * 100 + b"\r\n"
        async with dripping(raw, [line[i:i + 1] for i in range(len(line))], 0.05) as sender:
            assert await raw.reply(timeout=5) == IDLE
            assert await raw.closed_by_server()
            assert not sender.done()  # the server hung up before the line was done
        await wait_until(lambda: rx.receiver.session_count() == 0)


@pytest.mark.asyncio
async def test_data_trickled_line_by_line_hits_the_data_deadline() -> None:
    # Each line comes well inside data_timeout, so only the total deadline can end this.
    async with running(limits=fast(data_timeout=Duration(0.5), data_deadline=Duration(1))) as rx:
        raw = await rx.raw()
        await raw.send(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
        assert [(await raw.reply())[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with dripping(raw, [b"X-Slow: line\r\n"] * 100, 0.1):
            assert await raw.reply(timeout=5) == TOO_SLOW
            assert await raw.closed_by_server()
        assert 0.9 < loop.time() - start < 3
        assert rx.spool.stored == [] and rx.of_type("received") == []
        await wait_until(lambda: rx.receiver.session_count() == 0)


@pytest.mark.asyncio
async def test_the_data_deadline_is_per_message_not_per_session() -> None:
    async with running(limits=fast(idle_timeout=Duration(5), data_deadline=Duration(0.6))) as rx:
        raw = await rx.raw()
        for _ in range(3):  # three messages, together longer than one deadline
            assert QUEUED.fullmatch(await transaction(raw))
            await asyncio.sleep(0.25)
        assert len(rx.spool.stored) == 3


@pytest.mark.asyncio
async def test_slow_clients_from_one_address_hit_the_per_ip_limit_then_time_out() -> None:
    async with running(limits=fast(max_connections_per_ip=3)) as rx:
        slow = [await rx.raw() for _ in range(3)]
        extra = await Raw.connect(rx.host, rx.port, greet=False)
        assert await extra.reply() == b"421 4.7.0 Too many connections from your address\r\n"
        assert rx.receiver.connections_from("127.0.0.1") == 3
        for raw in slow:
            assert await raw.reply(timeout=5) == IDLE
        await wait_until(lambda: rx.receiver.connections_from("127.0.0.1") == 0)
        fresh = await rx.raw()
        await fresh.ask(b"NOOP\r\n", b"250")


@pytest.mark.asyncio
async def test_a_client_that_never_reads_is_aborted_and_released() -> None:
    # It pipelines tens of thousands of EHLOs and reads none of the replies: our writes back
    # up (drain waits, we stop reading it), and the idle timer then ends the session; close()
    # alone would wait forever for a buffer the peer never empties.
    async with running(limits=fast(max_junk_commands=100_000, max_bad_commands=1000)) as rx:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(rx.addr)
        sock.setblocking(False)
        _, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"EHLO client.test\r\n" * 60_000)
            await wait_until(lambda: rx.receiver.session_count() == 1, timeout=5)
            await wait_until(lambda: rx.receiver.session_count() == 0, timeout=10)
        finally:
            writer.transport.abort()


@pytest.mark.asyncio
@pytest.mark.parametrize("last", [b"", b"QUIT\r\n"], ids=["eof", "quit"])
async def test_a_socket_left_with_unread_replies_is_aborted_not_kept_open(last: bytes) -> None:
    # Replies under the write buffer's high-water mark never block us, so the session ends
    # normally (EOF or QUIT) with them unsent; close() alone would then keep the socket until
    # the peer reads, which a hostile one never does. (A high mark makes that case certain.)
    async with running(limits=fast(max_junk_commands=100_000, max_bad_commands=1000)) as rx:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(rx.addr)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            assert (await reader.readline()).startswith(b"220 ")
            [server] = list(rx.receiver._sessions)
            server.transport.set_write_buffer_limits(high=64 * 1024**2)
            server.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            writer.write(b"EHLO client.test\r\n" * 20_000 + last)  # 3 MB of replies, none read
            writer.write_eof()
            await wait_until(lambda: rx.receiver.session_count() == 0, timeout=5)
            await wait_until(lambda: server.transport is None, timeout=5)
        finally:
            writer.transport.abort()


@pytest.mark.asyncio
async def test_junk_commands_without_mail_count_as_errors() -> None:
    limits = fast(idle_timeout=Duration(5), max_junk_commands=4, max_bad_commands=2)
    async with running(limits=limits) as rx:
        raw = await rx.raw()
        # EHLO and three NOOPs are the four allowed; past them each one is an error.
        await raw.ask(b"EHLO c.test\r\n", b"250-")
        for _ in range(3):
            await raw.ask(b"NOOP\r\n", b"250 2.0.0 OK\r\n")
        await raw.ask(b"NOOP\r\n", b"250 2.0.0 OK\r\n")  # error 1
        await raw.ask(b"RSET\r\n", b"250 2.0.0 OK\r\n")  # error 2
        await raw.send(b"VRFY x\r\n")  # error 3: past max_bad_commands
        assert (await raw.reply()).startswith(b"252 2.5.0")
        assert await raw.reply() == TOO_MANY_ERRORS
        assert await raw.closed_by_server()


@pytest.mark.asyncio
async def test_repeating_a_recipient_is_junk_too_but_an_accepted_message_resets_the_count() -> None:
    limits = fast(idle_timeout=Duration(5), max_junk_commands=3, max_bad_commands=1, max_recipients=1)
    async with running(limits=limits) as rx:
        raw = await rx.raw()
        for _ in range(3):  # EHLO + MAIL + RCPT + DATA: one junk command per message
            assert QUEUED.fullmatch(await transaction(raw))
        await raw.ask(b"MAIL FROM:<s@o.test>\r\n", b"250")
        await raw.ask(b"RCPT TO:<u@example.test>\r\n", b"250 2.1.5")
        await raw.ask(b"RCPT TO:<u@example.test>\r\n", b"250 2.1.5")  # junk 1
        await raw.ask(b"RCPT TO:<v@example.test>\r\n", b"452 4.5.3 Too many recipients\r\n")  # junk 2
        await raw.ask(b"NOOP\r\n", b"250 2.0.0 OK\r\n")  # junk 3
        await raw.ask(b"RCPT TO:<u@example.test>\r\n", b"250 2.1.5")  # junk 4: error 1
        await raw.send(b"RCPT TO:<u@example.test>\r\n")  # error 2
        assert await raw.reply() == b"250 2.1.5 Recipient OK\r\n"
        assert await raw.reply() == TOO_MANY_ERRORS
        assert len(rx.spool.stored) == 3


@pytest.mark.asyncio
async def test_a_huge_pipelined_burst_is_answered_in_order() -> None:
    async with running(limits=Limits(max_recipients=5000)) as rx:
        raw = await rx.raw()
        rcpts = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(3000))
        await raw.send(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\n" + rcpts + b"DATA\r\nSubject: burst\r\n\r\nx\r\n.\r\n"
                       b"QUIT\r\n")
        assert (await raw.reply()).startswith(b"250-")
        assert await raw.reply() == b"250 2.1.0 Sender OK\r\n"
        replies = [await raw.reply() for _ in range(3000)]
        assert set(replies) == {b"250 2.1.5 Recipient OK\r\n"}
        assert await raw.reply() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        assert QUEUED.fullmatch(await raw.reply())
        assert await raw.reply() == b"221 2.0.0 Bye\r\n"
        assert len(rx.spool.stored[0][1]) == 3000


class ExplodingIngest:
    async def accept(self, submission: Any) -> str:
        raise RuntimeError("boom")


@pytest.mark.asyncio
async def test_every_way_a_session_ends_gives_its_per_ip_slot_back(tls_context: ssl.SSLContext) -> None:  # noqa: F811
    limits = fast(max_bad_commands=1, data_deadline=Duration(0.6), data_timeout=Duration(5))
    async with running(limits=limits, tls_context=tls_context, ingest=ExplodingIngest()) as rx:
        async def quit_() -> None:
            raw = await rx.raw()
            await raw.ask(b"QUIT\r\n", b"221")

        async def client_reset() -> None:
            raw = await rx.raw()
            raw.writer.transport.abort()

        async def idle() -> None:
            raw = await rx.raw()
            assert await raw.reply() == IDLE

        async def errors() -> None:
            raw = await rx.raw()
            await raw.send(b"X\r\nY\r\n")
            assert [await raw.reply() for _ in range(3)][-1] == TOO_MANY_ERRORS

        async def tls_garbage() -> None:
            raw = await rx.raw()
            await raw.ask(b"STARTTLS\r\n", b"220")
            await raw.send(b"this is not a ClientHello\r\n")
            assert await raw.closed_by_server()

        async def tls_silence() -> None:
            raw = await rx.raw()
            await raw.ask(b"STARTTLS\r\n", b"220")
            assert await raw.closed_by_server()

        async def eof_mid_data() -> None:
            raw = await rx.raw()
            await raw.send(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nSubj")
            for _ in range(4):
                await raw.reply()
            await raw.close()

        async def ingest_exception() -> None:
            raw = await rx.raw()
            assert await transaction(raw) == b"451 4.3.0 Local error in processing\r\n"
            await raw.close()

        async def data_deadline() -> None:
            raw = await rx.raw()
            await raw.send(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
            for _ in range(4):
                await raw.reply()
            async with dripping(raw, [b"x\r\n"] * 100, 0.05):
                assert await raw.reply() == TOO_SLOW

        endings = [quit_, client_reset, idle, errors, tls_garbage, tls_silence, eof_mid_data, ingest_exception,
                   data_deadline]
        await asyncio.gather(*(ending() for ending in endings for _ in range(3)))
        await wait_until(lambda: rx.receiver.connections_from("127.0.0.1") == 0 and rx.receiver.session_count() == 0)
        fresh = await rx.raw()  # and the loop is still serving
        await fresh.ask(b"NOOP\r\n", b"250")
