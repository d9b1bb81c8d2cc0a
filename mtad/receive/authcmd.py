"""The AUTH command on the wire: one SASL exchange, the brute-force throttle and the password check.

aiosmtpd's own AUTH calls its authenticator synchronously; ours is not used. `AuthCommand` is
what the session (session.py) runs for `AUTH ...`: it asks `auth.auth_refusal` whether AUTH may
run at all, reads the exchange line by line (each line restarts the session's idle timer),
asks the throttle (throttle.py) before the attempt and tells it the result after, and awaits
the tenant directory, which hashes in a thread, so no session waits for another's scrypt.
The tarpit of a throttled client is an `asyncio.sleep` of that session alone.

The session hands over only what the exchange needs: its Dialog, the Receiver's shared
throttle and directory, its reader, and two callables (write a reply; note activity). The
decoding is pure and lives in auth.py; this module is the sequencing and the I/O.

Trust: every line of the exchange is the peer's and hostile (bounded by the command line
limit, decoded strictly by auth.py). The password lives only in the Credentials value handed
to the directory; a directory failure is logged here and answered 454, never its text.
RFCs: 4954 4 (the exchange, 334 challenges, "*" cancel) and 6 (status codes), 4616 (PLAIN),
draft-murchison-sasl-login (LOGIN).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from mtad.receive import auth
from mtad.receive.handler import Dialog
from mtad.receive.reading import read_command
from mtad.reply import Reply

if TYPE_CHECKING:
    from mtad.platform.model import Tenant
    from mtad.receive.listeners import Receiver

log = structlog.get_logger("mtad.receive")


@dataclass(slots=True)
class AuthCommand:
    """One `AUTH` command of one session, run once with `run(arg)`."""

    dialog: Dialog
    receiver: Receiver
    client_ip: str
    role: str
    reader: asyncio.StreamReader
    max_line: int
    """The session's command line limit, which bounds every line of the exchange too."""
    send: Callable[[Reply | bytes], Awaitable[None]]
    """Write one reply (a Reply, or raw bytes for a 334 challenge) and drain."""
    touch: Callable[[], None]
    """A whole line arrived: restart the session's idle timer."""

    async def run(self, arg: str | None) -> None:
        dialog = self.dialog
        refusal = auth.auth_refusal(role=self.role, tls=dialog.tls, helo=dialog.helo, esmtp=dialog.esmtp,
                                    authenticated=dialog.tenant is not None, in_transaction=dialog.mail is not None)
        start = refusal or auth.parse_auth(arg)
        if isinstance(start, Reply):
            await self.send(start)
            return
        throttle = self.receiver.throttle
        if throttle.check(self.client_ip, None, self.receiver.clock()).verdict == "locked":
            await self._refused(auth.TOO_MANY_FAILURES, "", "auth_locked")
            return
        credentials = await self._exchange(start)
        if credentials is None:
            return  # the client went away mid-exchange
        if isinstance(credentials, Reply):
            if credentials is auth.AUTH_FAILED:  # e.g. PLAIN naming another authzid
                throttle.failed(self.client_ip, None, self.receiver.clock())
                await self._refused(credentials, "", "auth_failed")
            else:
                await self.send(credentials)  # cancelled or undecodable: no attempt was made
            return
        username = credentials.username
        decision = throttle.check(self.client_ip, username, self.receiver.clock())
        if decision.verdict == "locked":
            await self._refused(auth.TOO_MANY_FAILURES, username, "auth_locked")
            return
        if decision.delay:
            await asyncio.sleep(decision.delay)  # the tarpit: this session waits, the loop does not
        tenant = await self._verify(credentials)
        if isinstance(tenant, Reply):
            await self.send(tenant)
            return
        if tenant is None or tenant.disabled:
            throttle.failed(self.client_ip, username, self.receiver.clock())
            await self._refused(auth.AUTH_FAILED, username, "auth_failed")
            return
        throttle.succeeded(username)
        dialog.authenticated(tenant, username)
        log.info("session.authenticated", client_address=self.client_ip, listener=self.role, tenant=tenant.name)
        await self.send(auth.AUTH_OK)

    async def _exchange(self, start: auth.AuthStart) -> auth.Credentials | Reply | None:
        """The SASL exchange after `AUTH <mechanism> [initial]`: Credentials, the Reply that
        ends it, or None at EOF."""
        if start.mechanism == "PLAIN":
            message: bytes | Reply | None = start.initial
            if message is None:
                message = await self._line(auth.PLAIN_CHALLENGE)
            if message is None or isinstance(message, Reply):
                return message
            return auth.decode_plain(message)
        first: bytes | Reply | None = start.initial
        if first is None:
            first = await self._line(auth.LOGIN_USERNAME)
        if first is None or isinstance(first, Reply):
            return first
        username = auth.decode_login_step(first)
        if isinstance(username, Reply):
            return username
        second = await self._line(auth.LOGIN_PASSWORD)
        if second is None or isinstance(second, Reply):
            return second
        password = auth.decode_login_step(second)
        if isinstance(password, Reply):
            return password
        return auth.login_credentials(username, password)

    async def _line(self, challenge: bytes) -> bytes | Reply | None:
        """Send a 334 challenge, read and decode the answer; None at EOF."""
        await self.send(challenge)
        line = await read_command(self.reader, self.max_line)
        if line is None:
            return None
        self.touch()
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

    async def _refused(self, refusal: Reply, username: str, reason: str) -> None:
        self.dialog.auth_refused(refusal, username=username, reason=reason)
        await self.send(refusal)
