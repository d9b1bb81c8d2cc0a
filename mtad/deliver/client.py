"""SmtpConnection: one outbound SMTP session on asyncio streams.

Connect (from the configured source address of the destination's family), read the greeting,
EHLO (HELO when EHLO gets a 5xx), STARTTLS when offered, EHLO again; then any number of
transactions, each answering one Outcome per recipient, in order. MAIL, every RCPT and DATA go
in one write when the server offers PIPELINING, so a 1 KB message costs two round trips.

We never downgrade: a message that needs SMTPUTF8 or 8BITMIME which the server lacks bounces
(5.6.7 / 5.6.3) without being sent, as does a message over the server's SIZE. Postfix sends
8-bit data to servers without 8BITMIME; we follow RFC 6152 and RFC 6531 3.4 to the letter.

Own client rather than aiosmtplib: pipelining (aiosmtplib waits for each reply), per-phase
timeouts, per-recipient replies without exceptions, dot-stuffing in blocks; measured in
bench/bench_client.py (the report figures are in that file's docstring).

Trust: everything the server sends is hostile. Reply lines are bounded (LINE_LIMIT bytes,
MAX_REPLY_LINES lines), parsed strictly, and reach logs and DSNs only through Outcome.reply
(one line, control characters dropped, cut). Plaintext the server sends ahead of the TLS
handshake is refused (a response-injection attack). Envelope values are ours (validated at
ingest); one with CR or LF is still refused rather than written.
RFCs: 5321 (3.3, 4.1.1, 4.5.2 transparency, 4.5.3.2 timeouts), 2920 (PIPELINING), 3207
(STARTTLS), 1870 (SIZE), 6152 (8BITMIME), 6531 (SMTPUTF8), 3461 (DSN parameters relayed
when the server offers DSN; otherwise the caller owes the "relayed" notice), 2034.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import ssl
from typing import TYPE_CHECKING, Literal

import msgspec

from mtad.deliver.outcome import Outcome, from_reply, local, network_error
from mtad.deliver.wire import (
    dot_stuff,
    mail_command,
    parse_ehlo,
    parse_reply_line,
    rcpt_command,
    refusal,
    size_limit,
    unsafe,
)
from mtad.records import Envelope, Recipient

if TYPE_CHECKING:
    from mtad.config.schema import Delivery
    from mtad.deliver.outcome import Phase

TlsMode = Literal["none", "opportunistic", "require", "verify"]

LINE_LIMIT = 8192
"""Longest reply line we read (RFC 5321 4.5.3.1.5 allows 512); longer ends the session."""
MAX_REPLY_LINES = 200
DATA_BLOCK = 64 * 1024
"""Bytes of message data per write; each block has data_block_timeout to drain."""


class ClientSettings(msgspec.Struct, frozen=True, kw_only=True):
    helo_name: str
    source_address: str = ""
    source_address6: str = ""
    connect_timeout: float = 30
    greeting_timeout: float = 300
    command_timeout: float = 300
    data_timeout: float = 120
    data_block_timeout: float = 180
    final_timeout: float = 600
    tls: TlsMode = "opportunistic"
    ca_file: str = ""
    """verify: a PEM file of trusted CAs instead of the system's (a private CA, tests)."""
    max_messages: int = 100
    """Transactions per connection; past this `usable` is False."""
    max_recipients: int = 100
    """Recipients per transaction (deliver() sends a larger batch in several)."""
    quit_timeout: float = 5

    @classmethod
    def from_config(cls, delivery: Delivery, *, hostname: str = "") -> ClientSettings:
        """Settings from [delivery]; an empty helo_name falls back to `hostname` (server.hostname)."""
        return cls(helo_name=delivery.helo_name or hostname or "localhost",
                   source_address=delivery.source_address, source_address6=delivery.source_address6,
                   connect_timeout=delivery.connect_timeout, greeting_timeout=delivery.greeting_timeout,
                   command_timeout=delivery.command_timeout, data_timeout=delivery.data_timeout,
                   data_block_timeout=delivery.data_block_timeout, final_timeout=delivery.final_timeout,
                   max_messages=delivery.max_messages_per_connection,
                   max_recipients=delivery.max_recipients_per_transaction)


class SessionFailed(Exception):
    """The connection could not be used; `outcome` has scope "connection"."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


class _Lost(Exception):
    """The session broke (network error, timeout, 421, garbage): abort it."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


class _TlsFallback(Exception):
    """Opportunistic TLS failed in the handshake: reconnect in plaintext (Postfix does the same)."""


ServerReply = tuple[int, list[str]]
"""A reply's code and its lines of text."""

__all__ = ["ClientSettings", "SessionFailed", "SmtpConnection", "dot_stuff", "mail_command", "parse_ehlo",
           "parse_reply_line", "rcpt_command", "refusal", "size_limit", "tls_context"]


def _source_for(address: str, settings: ClientSettings) -> str:
    """The configured source address of the destination address's family ("" for none)."""
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        return ""
    return settings.source_address6 if version == 6 else settings.source_address


def _describe(exc: OSError) -> str:
    """Bland words for a network error (no exception text in replies or DSNs)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return "network error"


@functools.lru_cache(maxsize=8)
def tls_context(mode: TlsMode, ca_file: str = "") -> ssl.SSLContext:
    """Client TLS context: verify checks chain and host name; the others encrypt without checking."""
    if mode == "verify":
        return ssl.create_default_context(cafile=ca_file or None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- the session -----------------------------------------------------------------------------

class SmtpConnection:
    """One outbound SMTP session. Build it with `await SmtpConnection.open(...)`."""

    def __init__(self, host: str, address: str, port: int, settings: ClientSettings,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host, self.address, self.port = host, address, port
        self.relay = f"{host}[{address}]:{port}"
        self.transactions = 0
        self.tls = False
        self.extensions: dict[str, str] = {}
        self._settings = settings
        self._reader, self._writer = reader, writer
        self._broken = False
        self._closed = False
        self._dirty = False
        """A transaction is open on the server's side (MAIL accepted, no final dot): RSET first."""

    @classmethod
    async def open(cls, host: str, address: str, port: int, settings: ClientSettings) -> SmtpConnection:
        """Connect, greet, EHLO, STARTTLS as settings.tls says; SessionFailed when it can't be used."""
        try:
            return await cls._open(host, address, port, settings, settings.tls != "none")
        except _TlsFallback:
            return await cls._open(host, address, port, settings, False)

    @classmethod
    async def _open(cls, host: str, address: str, port: int, settings: ClientSettings,
                    starttls: bool) -> SmtpConnection:
        source = _source_for(address, settings)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    address, port, local_addr=(source, 0) if source else None, limit=LINE_LIMIT)
        except TimeoutError:
            raise SessionFailed(network_error("connect", "", timeout=True)) from None
        except OSError as exc:
            raise SessionFailed(network_error("connect", _describe(exc))) from None
        conn = cls(host, address, port, settings, reader, writer)
        try:
            await conn._handshake(starttls)
        except _Lost as lost:
            conn._abort()
            raise SessionFailed(lost.outcome) from None
        except SessionFailed:
            await conn.close()
            raise
        except BaseException:  # _TlsFallback, or cancelled: leave no socket behind
            conn._abort()
            raise
        return conn

    async def _handshake(self, starttls: bool) -> None:
        settings = self._settings
        code, lines = await self._read(settings.greeting_timeout, "greeting")
        if code != 220:
            raise SessionFailed(from_reply("greeting", code, "\n".join(lines)))
        await self._hello()
        mode = settings.tls
        if not starttls:
            return
        if "STARTTLS" not in self.extensions:
            if mode in ("require", "verify"):
                raise SessionFailed(local("deferred", "4.7.4", "TLS is required and the server does not offer "
                                          "STARTTLS", scope="connection", phase="starttls"))
            return
        code, lines = await self._ask(b"STARTTLS\r\n", settings.command_timeout, "starttls")
        if code != 220:
            if mode in ("require", "verify"):
                raise SessionFailed(local("deferred", "4.7.4", f"TLS is required and STARTTLS was refused: "
                                          f"{code} {' '.join(lines)}", scope="connection", phase="starttls"))
            return
        try:
            if getattr(self._reader, "_buffer", b""):
                # Bytes sent ahead of the handshake would be read as if they came over TLS.
                raise ssl.SSLError("plaintext after the STARTTLS reply")
            async with asyncio.timeout(settings.command_timeout):
                await self._writer.start_tls(tls_context(mode, settings.ca_file), server_hostname=self.host,
                                             ssl_handshake_timeout=settings.command_timeout)
        except ssl.SSLCertVerificationError as exc:
            self._abort()
            raise SessionFailed(local("deferred", "4.7.5", f"TLS certificate not trusted: {exc.verify_message}",
                                      scope="connection", phase="starttls")) from None
        except (OSError, TimeoutError, ConnectionError):
            self._abort()
            if mode == "opportunistic":
                raise _TlsFallback() from None
            raise SessionFailed(local("deferred", "4.7.5", "TLS handshake failed", scope="connection",
                                      phase="starttls")) from None
        self.tls = True
        await self._hello()

    async def _hello(self) -> None:
        helo = self._settings.helo_name
        code, lines = await self._ask(f"EHLO {helo}\r\n".encode(), self._settings.command_timeout, "ehlo")
        if 500 <= code < 600:
            # RFC 5321 3.2: a server that does not know EHLO gets HELO.
            code, lines = await self._ask(f"HELO {helo}\r\n".encode(), self._settings.command_timeout, "ehlo")
            if 200 <= code < 300:
                self.extensions = {}
                return
        if not 200 <= code < 300:
            raise SessionFailed(from_reply("ehlo", code, "\n".join(lines)))
        self.extensions = parse_ehlo(lines)

    @property
    def usable(self) -> bool:
        """Still open, no error, not past max_messages."""
        return not (self._broken or self._closed or self._writer.is_closing() or self._reader.at_eof()) \
            and self.transactions < self._settings.max_messages

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def send(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> list[Outcome]:
        """One transaction: one Outcome per recipient, in order (see the module docstring)."""
        if not self.usable:
            return [network_error("mail", "connection no longer usable")] * len(recipients)
        refused = refusal(envelope, self.extensions, len(body))
        if refused is not None:
            return [refused] * len(recipients)
        results: list[Outcome | None] = [None] * len(recipients)
        for i, recipient in enumerate(recipients):
            if unsafe(recipient.address):
                results[i] = local("bounced", "5.1.3", "recipient address has control characters",
                                   scope="recipient", phase="rcpt")
        wanted = [i for i, result in enumerate(results) if result is None]
        if wanted:
            try:
                await self._transaction(envelope, [recipients[i] for i in wanted], body, wanted, results)
            except _Lost as lost:
                self._abort()
                return [lost.outcome if result is None else result for result in results]
            except BaseException:  # cancelled mid-transaction: the session state is unknown
                self._abort()
                raise
        return [result if result is not None else network_error("dot", "no reply") for result in results]

    async def _transaction(self, envelope: Envelope, recipients: list[Recipient], body: bytes,
                           slots: list[int], results: list[Outcome | None]) -> None:
        timeout = self._settings.command_timeout
        mail = mail_command(envelope, self.extensions, len(body))
        rcpts = [rcpt_command(recipient, self.extensions) for recipient in recipients]
        data: ServerReply | None = None
        accepted: list[int] = []

        def rcpt_answered(slot: int, reply: ServerReply) -> None:
            # Recorded at once, so that a session lost later keeps what RCPT already said.
            if 200 <= reply[0] < 300:
                accepted.append(slot)
            else:
                results[slot] = from_reply("rcpt", reply[0], "\n".join(reply[1]))

        if self.pipelining:
            # RFC 2920 3.1: RSET, MAIL and RCPT may be grouped, DATA ends the group.
            reset = b"RSET\r\n" if self._dirty else b""
            await self._write(reset + mail + b"".join(rcpts) + b"DATA\r\n", timeout, "mail")
            if reset:
                await self._read(timeout, "mail")
            mail_reply = await self._read(timeout, "mail")
            self._dirty = 200 <= mail_reply[0] < 300
            for slot in slots:
                reply = await self._read(timeout, "rcpt")
                if self._dirty:  # after a refused MAIL, the RCPTs get 503s that say nothing
                    rcpt_answered(slot, reply)
            data = await self._read(self._settings.data_timeout, "data")
        else:
            if self._dirty:
                await self._ask(b"RSET\r\n", timeout, "mail")
            mail_reply = await self._ask(mail, timeout, "mail")
            self._dirty = 200 <= mail_reply[0] < 300
            if self._dirty:
                for slot, rcpt in zip(slots, rcpts):
                    rcpt_answered(slot, await self._ask(rcpt, timeout, "rcpt"))
                if accepted:
                    data = await self._ask(b"DATA\r\n", self._settings.data_timeout, "data")
        self.transactions += 1
        if not self._dirty:
            outcome = from_reply("mail", mail_reply[0], "\n".join(mail_reply[1]))
            for slot in slots:
                results[slot] = outcome
        if data is None:
            return
        if data[0] != 354:
            for slot in accepted:
                results[slot] = from_reply("data", data[0], "\n".join(data[1]))
            return
        # 354 with nobody accepted (a server that ignores RFC 2920 3.1): end an empty message.
        stream = dot_stuff(body) if accepted else b".\r\n"
        for start in range(0, len(stream), DATA_BLOCK):
            await self._write(stream[start:start + DATA_BLOCK], self._settings.data_block_timeout, "data")
        code, lines = await self._read(self._settings.final_timeout, "dot")
        self._dirty = False
        for slot in accepted:
            results[slot] = from_reply("dot", code, "\n".join(lines))

    async def reset(self) -> None:
        """RSET, so that the next transaction starts clean; a failure makes the connection unusable."""
        if not self.usable:
            return
        try:
            code, _ = await self._ask(b"RSET\r\n", self._settings.command_timeout, "mail")
        except _Lost:
            self._abort()
            return
        if 200 <= code < 300:
            self._dirty = False
        else:
            self._broken = True

    async def close(self) -> None:
        """QUIT (short timeout), then close. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(self._settings.quit_timeout):
                if not self._broken and not self._writer.is_closing():
                    self._writer.write(b"QUIT\r\n")
                    await self._writer.drain()
                    await self._reader.readline()
                self._writer.close()
                await self._writer.wait_closed()
        except Exception:  # noqa: BLE001 - closing must not fail whatever the peer did
            self._writer.transport.abort()

    def _abort(self) -> None:
        self._broken = True
        self._closed = True
        self._writer.transport.abort()

    async def _ask(self, command: bytes, timeout: float, phase: Phase) -> ServerReply:
        await self._write(command, timeout, phase)
        return await self._read(timeout, phase)

    async def _write(self, data: bytes, timeout: float, phase: Phase) -> None:
        try:
            self._writer.write(data)
            # drain() only waits above the transport's high-water mark; skip its timer below that.
            if self._writer.transport.get_write_buffer_size() >= DATA_BLOCK:
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError:
            raise _Lost(network_error(phase, "", timeout=True)) from None
        except OSError as exc:
            raise _Lost(network_error(phase, _describe(exc))) from None

    async def _read(self, timeout: float, phase: Phase) -> ServerReply:
        """One reply, all its lines; a 421 ends the session (RFC 5321 3.8)."""
        lines: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self._reader.readline()
                    if not raw.endswith(b"\n"):
                        raise _Lost(network_error(phase, "connection closed by the server"))
                    code, more, text = parse_reply_line(raw)
                    lines.append(text)
                    if not more:
                        break
                    if len(lines) >= MAX_REPLY_LINES:
                        raise ValueError("reply too long")
        except TimeoutError:
            raise _Lost(network_error(phase, "", timeout=True)) from None
        except ValueError:  # a malformed line, or one over LINE_LIMIT (StreamReader's LimitOverrunError)
            raise _Lost(network_error(phase, "malformed reply")) from None
        except OSError as exc:
            raise _Lost(network_error(phase, _describe(exc))) from None
        if code == 421:
            raise _Lost(from_reply(phase, code, "\n".join(lines)))
        return code, lines
