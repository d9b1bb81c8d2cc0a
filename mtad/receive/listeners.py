"""The SMTP receiver the daemon runs: binds every listener and keeps count of the sessions.

`Receiver` opens one asyncio server per `[[listener]]` on the running loop (uvloop in
production; no threaded Controller), builds an `SmtpSession` per connection, enforces the
connection limits at connect time (per client IP over all listeners, per listener), swaps
limits, domains and TLS context on SIGHUP (new sessions get them; open ones keep theirs), and
shuts down in order: stop accepting, let sessions finish, then 421 the rest. It also holds
what every session shares: the tenant directory and quota tracker (submission roles) and the
failed-AUTH throttle (throttle.py), which outlives reloads.

Implicit TLS (465) is set up by the server socket, once; so that SIGHUP's new certificate
reaches it too, its context swaps in the current one during each handshake (the SNI callback,
which OpenSSL calls for every ClientHello, with or without a server name).

Trust: client addresses are counted, never trusted for anything else.
RFCs: 5321 3.8 and 4.3.2 (421 at connect and at shutdown), 3207 (STARTTLS), 8314 (465).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog

from mtad import reply
from mtad.address import normalize_domains
from mtad.config.endpoints import parse_hostport
from mtad.config.schema import Limits, Listener
from mtad.events import EventBus
from mtad.ingest import Ingest
from mtad.receive.handler import Settings
from mtad.receive.session import SmtpSession
from mtad.receive.throttle import AuthThrottle
from mtad.reply import Reply

if TYPE_CHECKING:
    from mtad.platform.quotas import QuotaTracker
    from mtad.platform.tenants import TenantDirectory
    from mtad.platform.verp import Verp

log = structlog.get_logger("mtad.receive")

# How long drain waits, after closing everything, for messages still being committed.
_INGEST_WAIT = 30.0


class Receiver:
    """Every SMTP listener of one mtad process."""

    def __init__(self, *, listeners: list[Listener], limits: Limits, inbound_domains: Iterable[str],
                 hostname: str, ingest: Ingest, bus: EventBus, tls_context: ssl.SSLContext | None,
                 clock: Callable[[], float] = time.time, tenants: TenantDirectory | None = None,
                 quotas: QuotaTracker | None = None, bounces: Verp | None = None) -> None:
        self.ingest = ingest
        self.bus = bus
        self.clock = clock
        self.tenants = tenants
        """Who may AUTH (submission roles); None: every AUTH gets 454 4.7.0."""
        self.quotas = quotas if quotas is not None else (tenants.quotas if tenants is not None else None)
        self.throttle = AuthThrottle(limits)
        self.settings = Settings(hostname=hostname, limits=limits,
                                 local_domains=normalize_domains(inbound_domains), tls_context=tls_context,
                                 bounces=bounces)
        self._listeners = list(listeners)
        self._servers: list[tuple[str, asyncio.Server]] = []
        self._sessions: set[SmtpSession] = set()
        self._per_ip: Counter[str] = Counter()
        self._per_listener: Counter[int] = Counter()
        self._empty: asyncio.Event | None = None

    async def start(self) -> None:
        """Bind every listener. An OSError names the address that failed; none stays bound."""
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self._listeners):
            endpoint = parse_hostport(listener.address)
            implicit_tls = listener.role == "submissions"
            if implicit_tls and self.settings.tls_context is None:
                await self.stop_accepting()
                raise OSError(f"listener {listener.address} (submissions) needs [tls] cert and key")
            try:
                server = await loop.create_server(
                    self._factory(listener.role, index, implicit_tls, loop), endpoint.host, endpoint.port,
                    reuse_address=True, backlog=1024,
                    ssl=self._implicit_context() if implicit_tls else None,
                )
            except OSError as exc:
                await self.stop_accepting()
                raise OSError(exc.errno, f"cannot listen on {listener.address} ({listener.role}): "
                                         f"{exc.strerror or exc}") from exc
            self._servers.append((listener.role, server))

    def _factory(self, role: str, index: int, implicit_tls: bool,
                 loop: asyncio.AbstractEventLoop) -> Callable[[], SmtpSession]:
        def build() -> SmtpSession:
            return SmtpSession(self, role=role, index=index, implicit_tls=implicit_tls, loop=loop)
        return build

    def _implicit_context(self) -> ssl.SSLContext:
        """The context 465 listens with: the current one, swapped in per handshake (see above)."""
        context = self.settings.tls_context
        assert context is not None

        def current(connection: ssl.SSLObject, _name: str | None, _context: ssl.SSLContext) -> None:
            latest = self.settings.tls_context
            if latest is not None and latest is not connection.context:
                connection.context = latest
        context.sni_callback = current
        return context

    def bound(self) -> list[tuple[str, str, int]]:
        """(role, host, port) of every bound socket: the real port when the config said 0."""
        result = []
        for role, server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                result.append((role, str(host), int(port)))
        return result

    def reload(self, *, limits: Limits, inbound_domains: Iterable[str],
               tls_context: ssl.SSLContext | None) -> None:
        """SIGHUP: new sessions use these; open sessions finish with what they started with.

        Raises AddressError (a ValueError) for a bad domain, leaving the old settings in place.
        """
        self.settings = Settings(hostname=self.settings.hostname, limits=limits,
                                 local_domains=normalize_domains(inbound_domains), tls_context=tls_context,
                                 bounces=self.settings.bounces)
        self.throttle.configure(limits)

    async def stop_accepting(self) -> None:
        """Close the listening sockets; open sessions carry on."""
        servers, self._servers = self._servers, []
        for _, server in servers:
            server.close()
        for _, server in servers:
            await server.wait_closed()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for open sessions to end, then 421 4.3.2 and close the rest.

        A session whose message is in the middle of ingest finishes it (and sends its reply)
        before it closes: what the spool committed is acknowledged.
        """
        if self._sessions:
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), timeout=grace)
            except TimeoutError:
                log.info("receive.drain_timeout", open_sessions=len(self._sessions))
                for session in list(self._sessions):
                    session.shutdown(reply.SHUTTING_DOWN)
                try:
                    # Closed sessions leave at once; one in ingest waits for its commit.
                    await asyncio.wait_for(self._empty.wait(), timeout=_INGEST_WAIT)
                except TimeoutError:
                    log.warning("receive.drain_stuck", open_sessions=len(self._sessions))
            finally:
                self._empty = None

    def session_count(self) -> int:
        return len(self._sessions)

    def connections_from(self, client_ip: str) -> int:
        """Open sessions from one client address, over all listeners (what the per-IP limit counts)."""
        return self._per_ip[client_ip]

    # -- called by sessions ---------------------------------------------------------------

    def admit(self, session: SmtpSession) -> Reply | None:
        """At connect: count the session in, or say why not (it is then not counted)."""
        limits = session.limits
        if self._per_listener[session.index] >= self._listeners[session.index].max_connections:
            return reply.SERVER_BUSY
        if self._per_ip[session.client_ip] >= limits.max_connections_per_ip:
            return reply.TOO_MANY_CONNECTIONS
        self._per_listener[session.index] += 1
        self._per_ip[session.client_ip] += 1
        self._sessions.add(session)
        return None

    def release(self, session: SmtpSession) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._per_listener[session.index] -= 1
        self._per_ip[session.client_ip] -= 1
        if self._per_ip[session.client_ip] <= 0:
            del self._per_ip[session.client_ip]
        if not self._sessions and self._empty is not None:
            self._empty.set()
