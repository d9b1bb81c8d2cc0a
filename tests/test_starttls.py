"""STARTTLS command injection (CVE-2011-0411 class): plaintext pipelined after STARTTLS is dropped.

RFC 3207 section 4.2: the server MUST discard any knowledge obtained from the client before
the TLS negotiation, and commands that arrived in the same packet as STARTTLS are such
knowledge. A client (or a man in the middle) that sends `STARTTLS\\r\\nMAIL FROM:...` in one
write must not see that MAIL FROM executed inside the encrypted session.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from test_receive import HOSTNAME, running, tls_context  # noqa: F401 - fixture re-export


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
