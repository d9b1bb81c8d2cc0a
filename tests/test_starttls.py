"""STARTTLS: command injection (CVE-2011-0411 class), the handshake's failures, and the state around it.

RFC 3207 section 4.2: the server MUST discard any knowledge obtained from the client before
the TLS negotiation, and commands that arrived in the same packet as STARTTLS are such
knowledge. A client (or a man in the middle) that sends `STARTTLS\\r\\nMAIL FROM:...` in one
write must not see that MAIL FROM executed inside the encrypted session. STARTTLS is refused
inside TLS and inside a transaction; a handshake that fails, stalls or is abandoned ends the
session and gives its per-IP slot back, on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import uvloop
from test_receive import (  # noqa: F401 - tls_context is a fixture re-export
    HOSTNAME,
    QUEUED,
    Raw,
    running,
    tls_context,
    transaction,
    wait_until,
)

from mtad.config.schema import Duration, Limits


def injected_session(addr: tuple[str, int], pipelined: bytes) -> list[bytes]:
    """STARTTLS with `pipelined` in the same write; then EHLO and RCPT over TLS. Returns replies."""
    replies = []
    with socket.create_connection(addr, timeout=10) as plain:
        stream = plain.makefile("rb")
        stream.readline()  # banner
        plain.sendall(b"EHLO client.test\r\n")
        while stream.readline()[3:4] == b"-":
            pass
        plain.sendall(b"STARTTLS\r\n" + pipelined)
        replies.append(stream.readline())
        client_ctx = ssl._create_unverified_context()
        with client_ctx.wrap_socket(plain, server_hostname="mx.test.local") as tls:
            secure = tls.makefile("rb")
            tls.sendall(b"EHLO client.test\r\n")
            lines = [secure.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(secure.readline())
            replies.append(b"".join(lines))
            tls.sendall(b"RCPT TO:<u@example.test>\r\n")
            replies.append(secure.readline())
    return replies


@pytest.mark.asyncio
@pytest.mark.parametrize("pipelined", [
    b"MAIL FROM:<attacker@evil.test>\r\n",
    b"RSET\r\nMAIL FROM:<attacker@evil.test>\r\n",
])
async def test_plaintext_after_starttls_is_discarded(tls_context: ssl.SSLContext, pipelined: bytes) -> None:  # noqa: F811
    async with running(tls_context=tls_context) as rx:
        ready, ehlo, rcpt = await asyncio.to_thread(injected_session, rx.addr, pipelined)
    assert ready.startswith(b"220")
    # The first reply inside TLS answers our EHLO, not the injected MAIL FROM ...
    assert ehlo.startswith(b"250-" + HOSTNAME.encode()), ehlo
    assert b"STARTTLS" not in ehlo
    # ... and no transaction is open, so RCPT needs a MAIL first.
    assert rcpt.startswith(b"503"), rcpt


# -- the handshake and the state around it ----------------------------------------------------


def client_context() -> ssl.SSLContext:
    return ssl._create_unverified_context()


async def upgrade(raw: Raw) -> None:
    """EHLO, STARTTLS, handshake; the Raw client then speaks inside TLS."""
    await raw.ask(b"EHLO client.test\r\n", b"250-")
    await raw.ask(b"STARTTLS\r\n", b"220 ")
    await raw.writer.start_tls(client_context(), server_hostname=HOSTNAME)


@pytest.mark.asyncio
async def test_starttls_twice_is_refused_inside_tls(tls_context: ssl.SSLContext) -> None:  # noqa: F811
    async with running(tls_context=tls_context) as rx:
        raw = await rx.raw()
        await upgrade(raw)
        ehlo = await raw.ask(b"EHLO client.test\r\n", b"250-")
        assert b"STARTTLS" not in ehlo
        await raw.ask(b"STARTTLS\r\n", b"503 5.5.1 TLS already active\r\n")
        assert QUEUED.fullmatch(await transaction(raw))


@pytest.mark.asyncio
async def test_starttls_inside_a_transaction_is_refused_and_the_transaction_goes_on(
        tls_context: ssl.SSLContext) -> None:  # noqa: F811
    async with running(tls_context=tls_context) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO client.test\r\n", b"250-")
        await raw.ask(b"MAIL FROM:<s@o.test>\r\n", b"250 2.1.0")
        await raw.ask(b"STARTTLS\r\n", b"503 5.5.1 Mail transaction in progress\r\n")
        await raw.ask(b"RCPT TO:<u@example.test>\r\n", b"250 2.1.5")
        await raw.ask(b"RSET\r\n", b"250 2.0.0 OK\r\n")
        await raw.ask(b"STARTTLS\r\n", b"220 ")


@pytest.mark.asyncio
@pytest.mark.parametrize("after_220", [b"", b"MAIL FROM:<a@evil.test>\r\n", b"\x16\x03\x01\x00\x05hello"],
                         ids=["silence", "plaintext", "broken-hello"])
async def test_a_handshake_that_never_completes_ends_the_session(tls_context: ssl.SSLContext,  # noqa: F811
                                                                 after_220: bytes) -> None:
    async with running(tls_context=tls_context, limits=Limits(idle_timeout=Duration(0.5))) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO client.test\r\n", b"250-")
        await raw.ask(b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n")  # RFC 2034: with its status code
        await raw.send(after_220)
        # nothing readable comes back in plaintext: the server just hangs up ...
        assert await raw.closed_by_server(timeout=5)
        # ... and gives the per-IP slot back; the loop serves the next client.
        await wait_until(lambda: rx.receiver.connections_from("127.0.0.1") == 0)
        fresh = await rx.raw()
        await fresh.ask(b"NOOP\r\n", b"250")


@pytest.mark.asyncio
async def test_client_hanging_up_mid_handshake_is_released(tls_context: ssl.SSLContext) -> None:  # noqa: F811
    async with running(tls_context=tls_context) as rx:
        raw = await rx.raw()
        await raw.ask(b"STARTTLS\r\n", b"220 ")
        await raw.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then gone
        raw.writer.transport.abort()
        await wait_until(lambda: rx.receiver.session_count() == 0)


def test_starttls_and_a_stalled_handshake_on_uvloop(tls_context: ssl.SSLContext) -> None:  # noqa: F811
    async def main() -> None:
        async with running(tls_context=tls_context, limits=Limits(idle_timeout=Duration(0.5))) as rx:
            good = await rx.raw()
            await upgrade(good)
            assert QUEUED.fullmatch(await transaction(good))
            stalled = await rx.raw()
            await stalled.ask(b"STARTTLS\r\n", b"220 ")
            assert await stalled.closed_by_server(timeout=5)
            await good.close()
            await wait_until(lambda: rx.receiver.session_count() == 0)
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
