"""The transport side of one SMTP server session: aiosmtpd's plumbing, timers, closing, writing.

`Connection` is the base of `SmtpSession` (session.py), which adds the command loop and the
verbs. Here is what every session does whatever the peer says: the attributes aiosmtpd's
inherited methods rely on, data and EOF arriving, one idle/deadline timer, writing a reply
(and counting the errors among them), and closing.

Every way out ends in one place: a closing session whose peer does not read (its replies stuck
in our write buffer) is aborted after a short linger, so the socket, and the per-IP slot the
session holds, are always given back.

SMTP.__init__ is deliberately not called: it introspects the handler and the class with
`inspect.getmembers` on every connection (~100 us, a quarter of a message's cost); we set the
attributes the inherited methods use instead. Verified against aiosmtpd 1.4.6.

Trust: nothing read here is interpreted; it is counted and timed. Replies are typed Reply
values only; tracebacks go to the `mtad.receive` log.
RFCs: 5321 4.5.3.2 (timeouts: between commands, between data lines, and a total deadline).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import SMTP

from mtad import reply
from mtad.receive.handler import Dialog, Settings
from mtad.reply import Reply

if TYPE_CHECKING:
    from mtad.receive.listeners import Receiver

log = structlog.get_logger("mtad.receive")

# How long a closing session may wait for its last reply to leave before it is aborted.
_LINGER = 5.0


class Connection(SMTP):
    """One accepted socket's transport state; `SmtpSession` is the class the listeners build."""

    def __init__(self, receiver: Receiver, *, role: str, index: int, implicit_tls: bool,
                 loop: asyncio.AbstractEventLoop) -> None:
        settings: Settings = receiver.settings
        limits = settings.limits
        self.loop = loop
        # One reader limit for commands and data lines; each is then checked against its own.
        self.line_length_limit = max(limits.max_command_length, limits.max_line_length)
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        # The attributes aiosmtpd's connection_made, smtp_STARTTLS and push rely on.
        self.__ident__ = "ESMTP mtad"
        self.hostname = settings.hostname
        self.tls_context = None if implicit_tls else settings.tls_context
        self.enable_SMTPUTF8 = True
        self.event_handler = None
        self._handle_hooks: dict[str, Any] = {}
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        # Ours.
        self.receiver = receiver
        self.role = role
        self.index = index
        self.limits = limits
        self.settings = settings
        self.dialog: Dialog | None = None
        self.client_ip = ""
        self._implicit_tls = implicit_tls
        self._refusal: Reply | None = None
        self._errors = 0
        self._busy = False
        self._in_data = False
        self._closing = False
        self._released = False
        self._wait_limit = float(limits.idle_timeout)
        self._last_activity = 0.0
        self._deadline = float("inf")
        self._timeout_reply = reply.IDLE_TIMEOUT
        self._tls_up = False
        self._linger_handle: asyncio.TimerHandle | None = None

    # -- data and EOF -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # DATA is read in chunks, not lines (reading.py): here, a line end arriving is the
        # activity that restarts the data timeout (RFC 5321 4.5.3.2.5), so a line trickled
        # byte by byte is still idle, as between commands.
        if self._in_data and b"\n" in data:
            self._last_activity = self.loop.time()
        asyncio.StreamReaderProtocol.data_received(self, data)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session here, even when a message is half way into the spool;
        # we let the reader see EOF instead, and the loop ends on its own.
        asyncio.StreamReaderProtocol.eof_received(self)
        # Half-open (True) only works on plain TCP; a TLS transport closes on EOF anyway.
        return self._tls_protocol is None and not self._implicit_tls

    # -- closing ----------------------------------------------------------------------------

    def shutdown(self, final: Reply) -> None:
        """Close now with `final` (drain after the grace period); a message in ingest finishes first."""
        self._closing = True
        self._timeout_reply = final
        if not self._busy:
            self._abort(final)

    def _abort(self, final: Reply) -> None:
        """Say `final` and close; pipelined commands still buffered are not answered."""
        self._closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(f"{final}\r\n".encode("ascii"))  # type: ignore[attr-defined]
            self._hang_up()

    def _hang_up(self) -> None:
        """Close; abort if the last replies have not left after a short linger.

        close() waits for the write buffer to empty, which a peer that does not read never
        lets happen: the socket (and, before, the session's per-IP slot) would be held forever.
        """
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            linger = min(_LINGER, float(self.limits.idle_timeout))
            self._linger_handle = self.loop.call_later(linger, self._force_close)

    def _force_close(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    # -- timers: one handle, re-armed lazily, so touching it per line costs a clock read ------

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._last_activity = self.loop.time()
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_later(self._wait_limit, self._timeout_cb)

    def _set_wait_limit(self, seconds: float, deadline: float = float("inf")) -> None:
        """Wait at most `seconds` between lines, and until `deadline` (loop time) in all."""
        self._wait_limit = seconds
        self._deadline = deadline
        self._last_activity = now = self.loop.time()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timeout_handle = self.loop.call_later(min(seconds, deadline - now), self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        now = self.loop.time()
        remaining = min(self._last_activity + self._wait_limit, self._deadline) - now
        if self._busy or remaining > 0:
            self._timeout_handle = self.loop.call_later(max(remaining, 0.05), self._timeout_cb)
            return
        # RFC 5321 4.5.3.2 times each wait; the deadline also ends a client that trickles a
        # line just often enough to never be idle (slowloris).
        slow = now >= self._deadline
        log.info("session.timeout", client_address=self.client_ip, listener=self.role, slow=slow)
        self._abort(reply.DATA_TOO_SLOW if slow and not self._closing else self._timeout_reply)

    # -- writing ------------------------------------------------------------------------------

    async def _reply(self, answer: Reply | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(answer if isinstance(answer, bytes) else f"{answer}\r\n".encode())
        await self._writer.drain()
        if isinstance(answer, Reply) and answer.code >= 500:
            self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors > self.limits.max_bad_commands:
            log.info("session.too_many_errors", client_address=self.client_ip, listener=self.role)
            self._abort(reply.TOO_MANY_ERRORS)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default puts the exception text in the reply; ours never does.
        log.error("session.exception", client_address=self.client_ip, listener=self.role, exc_info=error)
        return str(reply.INTERNAL_ERROR)
