"""One SMTP server session on the wire: aiosmtpd's protocol with our own loop, limits and timers.

We subclass aiosmtpd.smtp.SMTP for its transport plumbing (connection_made, which finishes
the TLS switch-over and discards plaintext pipelined behind STARTTLS) and replace the rest:
STARTTLS itself (our 220 2.0.0, a handshake deadline), the command loop (line, error and junk limits, NUL
and 8-bit checks, no exception text to the peer), DATA (read in chunks by reading.py; a timeout
between line ends and a total deadline) and the verbs, which ask the Dialog (handler.py) for a reply.

AUTH (submission roles) is ours too, not aiosmtpd's, whose authenticator is called
synchronously: here the SASL exchange (auth.py) is read line by line under the idle timer, the
brute-force throttle (throttle.py) is asked before and told after, and the password check awaits
the tenant directory, which hashes in a thread, so no session waits for another's scrypt.

Every way out ends in one place: a closing session whose peer does not read (its replies stuck
in our write buffer) is aborted after a short linger, and a STARTTLS handshake that dies or
never finishes ends the session, so the per-IP count is always given back.

SMTP.__init__ is deliberately not called: it introspects the handler and the class with
`inspect.getmembers` on every connection (~100 us, a quarter of a message's cost); we set the
attributes the inherited methods use instead. Verified against aiosmtpd 1.4.6.

Trust: everything read from the socket is hostile. Replies are typed Reply values only;
tracebacks go to the `mtad.receive` log.
RFCs: 5321 2.3.8 and 4.1.1.4 (CRLF, the final dot), 4.5.2 (transparency), 4.5.3.1.4-6 (line
limits), 4.5.3.2 (timeouts), 4.2.4 (500 vs 502), 4.1.1.5 (RSET), 3207 (STARTTLS), 2920
(PIPELINING), 6531, 4954 (AUTH), 4616 (PLAIN).
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import SMTP

from mtad import reply
from mtad.receive import auth
from mtad.receive.handler import Dialog, Settings
from mtad.receive.reading import read_command, read_data
from mtad.reply import Reply

if TYPE_CHECKING:
    from mtad.platform.model import Tenant
    from mtad.receive.listeners import Receiver

log = structlog.get_logger("mtad.receive")

_COMMANDS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS",
             "AUTH")
# Recognised but not implemented here: 502, not 500 (RFC 5321 4.2.4). TURN, SEND, SOML and
# SAML are RFC 821 (5321 F.1, F.3); ETRN RFC 1985, ATRN RFC 2645, BDAT RFC 3030 (CHUNKING is not
# advertised). AUTH (RFC 4954) answers 502 on the mx role the same way (auth.auth_refusal).
_UNIMPLEMENTED = frozenset({"TURN", "SEND", "SOML", "SAML", "ETRN", "ATRN", "BDAT"})
# Commands that move no mail: past max_junk_commands between accepted messages, each is an error.
_JUNK = frozenset({"HELO", "EHLO", "NOOP", "RSET", "VRFY", "EXPN", "HELP"})
# How long a closing session may wait for its last reply to leave before it is aborted.
_LINGER = 5.0


class SmtpSession(SMTP):
    """One connection. Built by the Receiver's protocol factory, one per accepted socket."""

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

    # -- connection lifecycle ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        first = self.dialog is None
        if first:
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if isinstance(peer, tuple) else ""
            self._refusal = self.receiver.admit(self)
            self._released = self._refusal is not None  # refused sessions were never counted
        super().connection_made(transport)
        if first:
            self.dialog = Dialog(settings=self.settings, ingest=self.receiver.ingest, bus=self.receiver.bus,
                                 role=self.role, client_ip=self.client_ip, tls=self._implicit_tls,
                                 clock=self.receiver.clock, quotas=self.receiver.quotas)
        else:
            self._tls_up = True
            self.dialog.after_tls()  # type: ignore[union-attr]

    def connection_lost(self, error: Exception | None) -> None:
        for handle in (self._timeout_handle, self._linger_handle):
            if handle is not None:
                handle.cancel()
        if self._original_transport is not None:
            self._original_transport.close()
        asyncio.StreamReaderProtocol.connection_lost(self, error)
        self.transport = None
        if self._busy:
            return  # the message is in ingest: let it finish so its event and state stay true
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self._release()

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

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.receiver.release(self)

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

    # -- the command loop ---------------------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            if self._refusal is not None:
                self._abort(self._refusal)
                return
            await self._reply(f"220 {self.hostname} {self.__ident__}\r\n".encode("ascii"))
            while self.transport is not None and not self._closing:
                line = await self._read_command()
                if line is None:
                    break
                await self._command(line)
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            pass
        except Exception as error:  # noqa: BLE001 - the session's last guard; the peer only sees a close
            # Past the per-command guard: STARTTLS failures and the like. Close, quietly.
            log.info("session.closed_on_error", client_address=self.client_ip, listener=self.role, error=type(error).__name__)
        finally:
            self._hang_up()
            self._busy = False
            self._release()

    async def _read_command(self) -> bytes | None:
        """The next command line without its line end; None at EOF. Over-long lines get 500.

        The idle timer restarts only when a whole line has arrived, so it is also the
        deadline for one command however slowly its bytes trickle in.
        """
        while True:
            line = await read_command(self._reader, self.limits.max_command_length)
            if line is None:
                return None
            self._reset_timeout()
            if line:
                return line.rstrip(b"\r\n")
            await self._reply(reply.LINE_TOO_LONG)
            if self.transport is None or self.transport.is_closing():
                return None

    async def _command(self, line: bytes) -> None:
        if not line or b"\x00" in line or b"\r" in line:
            await self._reply(reply.COMMAND_SYNTAX)
            return
        verb, _, rest = line.partition(b" ")
        name = verb.upper().decode("ascii", "replace")
        if name not in _COMMANDS:
            await self._reply(reply.NOT_IMPLEMENTED if name in _UNIMPLEMENTED else reply.UNKNOWN_COMMAND)
            return
        dialog = self.dialog
        assert dialog is not None
        before = dialog.wasted
        dialog.wasted += name in _JUNK
        rest = rest.strip(b" ")
        try:
            # Strict UTF-8: bytes that are not UTF-8 never reach the parsers.
            arg = rest.decode("ascii") if rest.isascii() else rest.decode("utf-8")
        except UnicodeDecodeError:
            await self._reply(reply.COMMAND_SYNTAX)
            return
        try:
            await getattr(self, "smtp_" + name)(arg or None)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as error:
            if name == "STARTTLS":
                raise  # the connection is half switched to TLS: nothing sane left to say
            log.error("session.exception", client_address=self.client_ip, listener=self.role, command=name, exc_info=error)
            dialog.reset()
            await self._reply(reply.INTERNAL_ERROR)
        if dialog.wasted > max(before, self.limits.max_junk_commands):
            self._count_error()  # in the spirit of Postfix's smtpd_junk_command_limit

    # -- verbs ----------------------------------------------------------------------------------

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._reply(self.dialog.greet(arg, extended=False))  # type: ignore[union-attr]

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._reply(self.dialog.greet(arg, extended=True))  # type: ignore[union-attr]

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._reply(self.dialog.mail_from(arg))  # type: ignore[union-attr]

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._reply(self.dialog.rcpt_to(arg))  # type: ignore[union-attr]

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self._reply(reply.BAD_SYNTAX)
            return
        self.dialog.reset()  # type: ignore[union-attr]
        await self._reply(reply.OK)

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self._reply(reply.OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self._reply(reply.GOODBYE)
        self._closing = True
        self._hang_up()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self._reply(reply.CANNOT_VRFY if arg else reply.BAD_SYNTAX)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self._reply(reply.NOT_IMPLEMENTED)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self._reply(reply.Reply(214, "2.0.0", "See RFC 5321"))

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        refusal = self.dialog.starttls(arg)  # type: ignore[union-attr]
        if refusal is not None or self.tls_context is None:
            await self._reply(refusal or reply.TLS_NOT_AVAILABLE)
            return
        # Our own switch-over rather than aiosmtpd's: its 220 lacks the enhanced status code
        # RFC 2034 requires, and its handshake has no deadline of ours.
        await self._reply(reply.READY_FOR_TLS)
        waiter = self.loop.create_future()
        tls = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter, server_side=True,
                                   ssl_handshake_timeout=self.limits.idle_timeout)  # type: ignore[arg-type]
        plain = self.transport
        assert plain is not None
        self._original_transport = plain
        self._tls_protocol = tls
        plain.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(plain)
        # Once the handshake is done, SSLProtocol calls our connection_made again, which (in
        # aiosmtpd's code) discards plaintext pipelined behind STARTTLS (RFC 3207 4.2).
        await waiter  # raises when the handshake fails
        if not self._tls_up:
            # The waiter also resolves, without error, when the connection drops mid-handshake:
            # without this the loop would wait on a dead reader and hold its slot forever.
            raise ConnectionResetError("TLS handshake did not complete")

    async def smtp_DATA(self, arg: str | None) -> None:
        dialog = self.dialog
        assert dialog is not None
        answer = dialog.data_start(arg)
        await self._reply(answer)
        if answer is not reply.START_DATA:
            return
        limits = self.limits
        self._set_wait_limit(float(limits.data_timeout), self.loop.time() + float(limits.data_deadline))
        self._in_data = True
        try:
            result = await read_data(self._reader, max_size=dialog.max_message_size,
                                     max_line=limits.max_line_length, touch=self._touch)
        finally:
            self._in_data = False
        self._set_wait_limit(float(limits.idle_timeout))
        if result is None:
            dialog.reset()
            self._closing = True  # EOF mid-DATA: nothing acknowledged, nothing stored
            return
        self._busy = True
        try:
            answer = await dialog.finish_data(result)
        finally:
            self._busy = False
        await self._reply(answer)
        if self._closing:
            self._abort(self._timeout_reply)

    def _touch(self) -> None:
        self._last_activity = self.loop.time()

    # -- AUTH (RFC 4954) -------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        dialog = self.dialog
        assert dialog is not None
        refusal = auth.auth_refusal(role=self.role, tls=dialog.tls, helo=dialog.helo, esmtp=dialog.esmtp,
                                    authenticated=dialog.tenant is not None, in_transaction=dialog.mail is not None)
        start = refusal or auth.parse_auth(arg)
        if isinstance(start, Reply):
            await self._reply(start)
            return
        throttle = self.receiver.throttle
        if throttle.check(self.client_ip, None, self.receiver.clock()).verdict == "locked":
            await self._auth_refused(auth.TOO_MANY_FAILURES, "", "auth_locked")
            return
        credentials = await self._auth_exchange(start)
        if credentials is None:
            return  # the client went away mid-exchange
        if isinstance(credentials, Reply):
            if credentials is auth.AUTH_FAILED:  # e.g. PLAIN naming another authzid
                throttle.failed(self.client_ip, None, self.receiver.clock())
                await self._auth_refused(credentials, "", "auth_failed")
            else:
                await self._reply(credentials)  # cancelled or undecodable: no attempt was made
            return
        username = credentials.username
        decision = throttle.check(self.client_ip, username, self.receiver.clock())
        if decision.verdict == "locked":
            await self._auth_refused(auth.TOO_MANY_FAILURES, username, "auth_locked")
            return
        if decision.delay:
            await asyncio.sleep(decision.delay)  # the tarpit: this session waits, the loop does not
        tenant = await self._verify(credentials)
        if isinstance(tenant, Reply):
            await self._reply(tenant)
            return
        if tenant is None or tenant.disabled:
            throttle.failed(self.client_ip, username, self.receiver.clock())
            await self._auth_refused(auth.AUTH_FAILED, username, "auth_failed")
            return
        throttle.succeeded(username)
        dialog.authenticated(tenant, username)
        log.info("session.authenticated", client_address=self.client_ip, listener=self.role, tenant=tenant.name)
        await self._reply(auth.AUTH_OK)

    async def _auth_exchange(self, start: auth.AuthStart) -> auth.Credentials | Reply | None:
        """The SASL exchange after `AUTH <mechanism> [initial]`: Credentials, the Reply that
        ends it, or None at EOF."""
        if start.mechanism == "PLAIN":
            message: bytes | Reply | None = start.initial
            if message is None:
                message = await self._auth_line(auth.PLAIN_CHALLENGE)
            if message is None or isinstance(message, Reply):
                return message
            return auth.decode_plain(message)
        first: bytes | Reply | None = start.initial
        if first is None:
            first = await self._auth_line(auth.LOGIN_USERNAME)
        if first is None or isinstance(first, Reply):
            return first
        username = auth.decode_login_step(first)
        if isinstance(username, Reply):
            return username
        second = await self._auth_line(auth.LOGIN_PASSWORD)
        if second is None or isinstance(second, Reply):
            return second
        password = auth.decode_login_step(second)
        if isinstance(password, Reply):
            return password
        return auth.login_credentials(username, password)

    async def _auth_line(self, challenge: bytes) -> bytes | Reply | None:
        """Send a 334 challenge, read and decode the answer; None at EOF."""
        await self._reply(challenge)
        line = await read_command(self._reader, self.limits.max_command_length)
        if line is None:
            return None
        self._reset_timeout()
        if not line:
            return auth.EXCHANGE_TOO_LONG
        return auth.decode_response(line.rstrip(b"\r\n"))

    async def _verify(self, credentials: auth.Credentials) -> Tenant | Reply | None:
        directory = self.receiver.tenants
        if directory is None:
            return auth.TEMPORARY_FAILURE
        try:
            return await directory.authenticate(credentials.username, credentials.password)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as error:  # the directory failing is a 454, never its text
            log.error("session.auth_error", client_address=self.client_ip, listener=self.role, exc_info=error)
            return auth.TEMPORARY_FAILURE

    async def _auth_refused(self, refusal: Reply, username: str, reason: str) -> None:
        self.dialog.auth_refused(refusal, username=username, reason=reason)  # type: ignore[union-attr]
        await self._reply(refusal)
