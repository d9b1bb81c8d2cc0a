"""Pool: idle outbound SMTP connections per destination key, for reuse.

A connection comes out of the pool with take() (or, opened fresh, is announced with opened())
and goes back with give(). Idle connections are kept newest first, so under a falling load
the oldest ones expire; each idle connection has one loop.call_later timer (no task per
connection, no polling), cancelled when it is taken. Connections that are not usable, have
carried max_messages transactions, or would idle with idle_timeout 0 are closed (QUIT) by a
task the pool owns; close() waits for those and closes every idle connection.

The pool does no I/O of its own beyond those closes and never opens connections: deliver()
in attempt.py does, and decides what a dead pooled connection means.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from mtad.deliver.client import ClientSettings, SmtpConnection


class _Idle:
    __slots__ = ("conn", "key", "timer")

    def __init__(self, conn: SmtpConnection, key: str, timer: asyncio.TimerHandle) -> None:
        self.conn, self.key, self.timer = conn, key, timer


def _shareable(key: str) -> bool:
    """Keys whose connections another destination may borrow: opportunistic TLS (attempts with a
    stricter TLS mode get keys of their own, "<key> tls=<mode>", and never share)."""
    return " tls=" not in key


class Pool:
    """Idle connections per destination key, and a count of the busy ones."""

    def __init__(self, settings: ClientSettings, *, idle_timeout: float, max_messages: int,
                 max_idle_per_server: int = 20) -> None:
        self.settings = settings
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.max_idle_per_server = max_idle_per_server
        self._idle: dict[str, list[_Idle]] = {}
        self._servers: dict[tuple[str, int], list[_Idle]] = {}
        """The same idle connections by server (address, port), oldest first: many domains
        hosted on one MX share its connection slots, so idle ones are capped per server and
        may be borrowed by another destination (as Postfix caches connections by address)."""
        self._active: Counter[str] = Counter()
        self._closing: set[asyncio.Task[None]] = set()
        self._shut = False

    def take(self, key: str) -> SmtpConnection | None:
        """An idle usable connection for this destination key (now counted active), or None."""
        idle = self._idle.get(key)
        while idle:
            entry = idle[-1]
            self._forget(entry)
            if entry.conn.usable:
                self._active[key] += 1
                return entry.conn
            self._close(entry.conn)
        return None

    def take_server(self, key: str, address: str, port: int) -> SmtpConnection | None:
        """An idle usable connection to the server address:port that another destination opened,
        now counted active for `key`; None when there is none or the keys may not share."""
        if not _shareable(key):
            return None
        for entry in reversed(self._servers.get((address, port), [])):
            if _shareable(entry.key) and entry.conn.usable:
                self._forget(entry)
                self._active[key] += 1
                return entry.conn
        return None

    def opened(self, key: str) -> None:
        """A fresh connection for this key is busy now (counted in active() until give())."""
        self._active[key] += 1

    def give(self, key: str, conn: SmtpConnection) -> None:
        """Back to idle; closed when not usable, past max_messages, idle_timeout 0 or shut down."""
        if self._active[key] > 1:
            self._active[key] -= 1
        else:
            del self._active[key]
        if self._shut or not conn.usable or conn.transactions >= self.max_messages or self.idle_timeout <= 0:
            self._close(conn)
            return
        loop = asyncio.get_running_loop()
        entry = _Idle(conn, key, loop.call_later(self.idle_timeout, self._expire, key, conn))
        self._idle.setdefault(key, []).append(entry)
        server = self._servers.setdefault((conn.address, conn.port), [])
        server.append(entry)
        if len(server) > self.max_idle_per_server:
            oldest = server[0]
            self._forget(oldest)
            self._close(oldest.conn)

    def active(self, key: str) -> int:
        """Connections of this key busy now."""
        return self._active.get(key, 0)

    def idle(self, key: str) -> int:
        """Connections of this key waiting for reuse."""
        return len(self._idle.get(key, ()))

    async def close(self) -> None:
        """Close every idle connection and wait for all closes (shutdown). Later give()s close too."""
        self._shut = True
        for entries in self._idle.values():
            for entry in entries:
                entry.timer.cancel()
                self._close(entry.conn)
        self._idle.clear()
        self._servers.clear()
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def _expire(self, key: str, conn: SmtpConnection) -> None:
        for entry in self._idle.get(key, []):
            if entry.conn is conn:
                self._forget(entry)
                break
        self._close(conn)

    def _forget(self, entry: _Idle) -> None:
        """Take an idle entry out of both indexes and stop its timer."""
        entry.timer.cancel()
        _remove(self._idle, entry.key, entry)
        _remove(self._servers, (entry.conn.address, entry.conn.port), entry)

    def _close(self, conn: SmtpConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _remove(index: dict[Any, list[_Idle]], name: object, entry: _Idle) -> None:
    entries = index.get(name)
    if entries is None:
        return
    try:
        entries.remove(entry)
    except ValueError:
        return
    if not entries:
        del index[name]
