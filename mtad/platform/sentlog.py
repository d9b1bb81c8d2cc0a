"""The sent log: which tenant, Message-ID and recipients a VERP-signed message had, for attribution.

A bounce names a queue id (in its VERP token), but it may arrive days after the message left the
queue, and the tenant it must be charged to is not in the token (tenant names are up to 63
characters; the local part has room for 64). So every message that gets a VERP return path is
recorded once, when it is accepted: `SentLog` subscribes to the event bus and takes the
`received` events of such mail (mtad.platform.verp.wants_verp). Recording at acceptance rather
than on the delivery events gives one row per message (delivery events come per recipient and
attempt) and a row that exists before the first attempt, so no bounce can outrun it.

The bus calls subscribers synchronously on the loop, so `__call__` only appends to a list; a
task owned by `run()` writes the pending rows in one SQLite transaction per batch (every
`FLUSH_INTERVAL`, or at once when `FLUSH_ROWS` are waiting) and deletes rows older than
`[bounces] keep_sent` every `EXPIRE_INTERVAL`. `lookup` reads the pending rows first, then
SQLite. A crash can lose the rows of the last fraction of a second; a bounce for such a message
is still reported (bounced event), only without tenant or recipient check.

Trust: rows come from our own events; lookups come with queue ids from verified VERP tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import structlog

from mtad.events import Event
from mtad.platform.statedb import StateDb
from mtad.platform.verp import wants_verp

log = structlog.get_logger("mtad.sentlog")

FLUSH_INTERVAL = 0.2
FLUSH_ROWS = 500
EXPIRE_INTERVAL = 3600.0
_INSERT = (
    "INSERT OR REPLACE INTO sent (queue_id, tenant, message_id, sender, recipients, time)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


class SentMessage(msgspec.Struct, kw_only=True, frozen=True):
    queue_id: str
    tenant: str
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    time: float


def from_event(event: Event) -> SentMessage | None:
    """The row a `received` event makes, or None when the message gets no VERP return path."""
    if event.type != "received" or not event.queue_id:
        return None
    if not wants_verp(event.sender or "", event.listener, event.tenant):
        return None
    return SentMessage(queue_id=event.queue_id, tenant=event.tenant, message_id=event.message_id,
                       sender=event.sender or "", recipients=tuple(event.recipients), time=event.time)


class SentLog:
    """Open with `await SentLog.open(path, keep)`, run `run()` in a task, `await close()` at the end."""

    def __init__(self, db: StateDb, keep: float, clock: Callable[[], float]) -> None:
        self._db = db
        self.keep = keep
        self._clock = clock
        self._pending: dict[str, SentMessage] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopping = False

    @classmethod
    async def open(cls, path: str, keep: float = 30 * 86400.0, *,
                   clock: Callable[[], float] = time.time) -> SentLog:
        return cls(await StateDb.open(path), keep, clock)

    def __call__(self, event: Event) -> None:
        """The bus subscriber: cheap, no I/O."""
        row = from_event(event)
        if row is None:
            return
        self._pending[row.queue_id] = row
        if len(self._pending) >= FLUSH_ROWS:
            self._wake.set()

    async def run(self) -> None:
        """Write pending rows in batches and expire old ones until `close()`."""
        last_expiry = 0.0
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                if self._clock() - last_expiry >= EXPIRE_INTERVAL:
                    last_expiry = self._clock()
                    await self.expire()
            except Exception:
                # SQLite trouble (disk full): the rows stay pending and are tried again.
                log.exception("sentlog.write_failed", pending=len(self._pending))
                await asyncio.sleep(1.0)

    async def flush(self) -> int:
        """Commit every pending row; the number written."""
        async with self._lock:
            if not self._pending:
                return 0
            rows = list(self._pending.values())
            await self._db.write([(_INSERT, (r.queue_id, r.tenant, r.message_id, r.sender,
                                             msgspec.json.encode(list(r.recipients)).decode(), r.time))
                                  for r in rows])
            for row in rows:
                if self._pending.get(row.queue_id) is row:
                    del self._pending[row.queue_id]
            return len(rows)

    async def expire(self) -> None:
        async with self._lock:
            await self._db.write([("DELETE FROM sent WHERE time < ?", (self._clock() - self.keep,))])

    async def lookup(self, queue_id: str) -> SentMessage | None:
        pending = self._pending.get(queue_id)
        if pending is not None:
            return pending
        rows = await self._db.rows("SELECT queue_id, tenant, message_id, sender, recipients, time FROM sent"
                                   " WHERE queue_id = ?", (queue_id,))
        if not rows:
            return None
        qid, tenant, message_id, sender, recipients, sent = rows[0]
        try:
            addresses = tuple(msgspec.json.decode(recipients, type=list[str]))
        except msgspec.DecodeError:
            addresses = ()
        return SentMessage(queue_id=qid, tenant=tenant, message_id=message_id, sender=sender,
                           recipients=addresses, time=sent)

    def stop(self) -> None:
        """Make `run()` return at its next turn (the owner awaits it, then calls close())."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        """Write what is pending and close the connection (after `run()` has returned)."""
        try:
            await self.flush()
        except Exception:
            log.exception("sentlog.write_failed", pending=len(self._pending))
        await self._db.close()
