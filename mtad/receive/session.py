"""One SMTP server session: the command loop and the verbs, on the transport of connection.py.

`SmtpSession` extends `Connection` (connection.py: aiosmtpd's plumbing, timers, closing,
writing) with what the peer's commands drive: the command loop (line, error and junk limits,
NUL and 8-bit checks, no exception text to the peer), STARTTLS (our 220 2.0.0, a handshake
deadline; aiosmtpd's connection_made finishes the switch-over and discards plaintext pipelined
behind STARTTLS), DATA (read in chunks by reading.py; a timeout between line ends and a total
deadline) and the verbs, which ask the Dialog (handler.py) for a reply. A STARTTLS handshake
that dies or never finishes ends the session, so the per-IP count is always given back.

AUTH (submission roles) is ours too, not aiosmtpd's, whose authenticator is called
synchronously: `smtp_AUTH` hands the session's reader and writer to authcmd.py, which runs the
SASL exchange (auth.py) under the idle timer, asks the brute-force throttle (throttle.py) and
awaits the tenant directory, which hashes in a thread.

Trust: everything read from the socket is hostile. Replies are typed Reply values only;
tracebacks go to the `mtad.receive` log.
RFCs: 5321 2.3.8 and 4.1.1.4 (CRLF, the final dot), 4.5.2 (transparency), 4.5.3.1.4-6 (line
limits), 4.5.3.2 (timeouts), 4.2.4 (500 vs 502), 4.1.1.5 (RSET), 3207 (STARTTLS), 2920
(PIPELINING), 6531, 4954 (AUTH), 4616 (PLAIN).
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto

import structlog

from mtad import reply
from mtad.receive.authcmd import AuthCommand
from mtad.receive.connection import Connection
from mtad.receive.handler import Dialog
from mtad.receive.reading import read_command, read_data

log = structlog.get_logger("mtad.receive")

_COMMANDS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS",
             "AUTH")
# Recognised but not implemented here: 502, not 500 (RFC 5321 4.2.4). TURN, SEND, SOML and
# SAML are RFC 821 (5321 F.1, F.3); ETRN RFC 1985, ATRN RFC 2645, BDAT RFC 3030 (CHUNKING is not
# advertised). AUTH (RFC 4954) answers 502 on the mx role the same way (auth.auth_refusal).
_UNIMPLEMENTED = frozenset({"TURN", "SEND", "SOML", "SAML", "ETRN", "ATRN", "BDAT"})
# Commands that move no mail: past max_junk_commands between accepted messages, each is an error.
_JUNK = frozenset({"HELO", "EHLO", "NOOP", "RSET", "VRFY", "EXPN", "HELP"})


class SmtpSession(Connection):
    """One connection. Built by the Receiver's protocol factory, one per accepted socket."""

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

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.receiver.release(self)

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

    # -- AUTH (RFC 4954): the exchange is authcmd.py's ----------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        dialog = self.dialog
        assert dialog is not None
        command = AuthCommand(dialog=dialog, receiver=self.receiver, client_ip=self.client_ip, role=self.role,
                              reader=self._reader, max_line=self.limits.max_command_length, send=self._reply,
                              touch=self._reset_timeout)
        await command.run(arg)
