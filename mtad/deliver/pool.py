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

from mtad.deliver.client import ClientSettings, SmtpConnection


class _Idle:
    __slots__ = ("conn", "timer")

    def __init__(self, conn: SmtpConnection, timer: asyncio.TimerHandle) -> None:
        self.conn, self.timer = conn, timer


class Pool:
    """Idle connections per destination key, and a count of the busy ones."""

    def __init__(self, settings: ClientSettings, *, idle_timeout: float, max_messages: int) -> None:
        self.settings = settings
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self._idle: dict[str, list[_Idle]] = {}
        self._active: Counter[str] = Counter()
        self._closing: set[asyncio.Task[None]] = set()
        self._shut = False

    def take(self, key: str) -> SmtpConnection | None:
        """An idle usable connection for this destination key (now counted active), or None."""
        idle = self._idle.get(key)
        while idle:
            entry = idle.pop()
            entry.timer.cancel()
            if entry.conn.usable:
                if not idle:
                    del self._idle[key]
                self._active[key] += 1
                return entry.conn
            self._close(entry.conn)
        self._idle.pop(key, None)
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
        entry = _Idle(conn, loop.call_later(self.idle_timeout, self._expire, key, conn))
        self._idle.setdefault(key, []).append(entry)

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
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def _expire(self, key: str, conn: SmtpConnection) -> None:
        entries = self._idle.get(key, [])
        for i, entry in enumerate(entries):
            if entry.conn is conn:
                del entries[i]
                break
        if not entries:
            self._idle.pop(key, None)
        self._close(conn)

    def _close(self, conn: SmtpConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
