"""Operator actions on delivery: flush, bounce, and the per-destination summary.

`mtactl queue flush|bounce|summary` reach these through the admin API. A flush rewrites the
matching recipients as due now in the spool (so it survives a restart) and wakes the
scheduler; the queue is scanned in a worker thread page by page, and each page is written as
soon as it is found, so delivery starts while a large queue is still being scanned. A
message the scheduler holds in memory is changed through its copy there (one writer per
message at a time, see scheduler.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import msgspec

from mtad.deliver import outcome as outcomes
from mtad.deliver.scheduler import Scheduler, outcome_event
from mtad.deliver.transitions import flushed
from mtad.records import QueuedMessage, Recipient

_PAGE = 256


class DestinationSummary(msgspec.Struct, kw_only=True):
    destination: str
    queued: int = 0
    """Recipients due now or waiting for their first attempt."""
    deferred: int = 0
    """Recipients waiting for a retry."""
    active: int = 0
    """Attempts (connections) running now."""
    oldest: float = 0.0
    """Arrival time (unix s) of the oldest message with a recipient here."""
    last_error: str = ""
    suspended_until: float = 0.0
    window: int = 0


class Control:
    def __init__(self, scheduler: Scheduler, *, clock: Callable[[], float] = time.time) -> None:
        self.scheduler = scheduler
        self.spool = scheduler.spool
        self.key_of = scheduler.key_of
        self.clock = clock

    async def flush(self, *, queue_id: str = "", domain: str = "") -> int | None:
        """Make deferred recipients due now: of one message, of one destination, or all.
        Returns how many recipients were made due; None when `queue_id` is not queued."""
        sched = self.scheduler
        if queue_id and self.spool.get(queue_id) is None:
            return None
        key = self.key_of(domain.lower()) if domain else ""
        if key and key in sched.queues:
            sched.queues[key].wake()
        count = 0
        async for page in self._scan(queue_id):
            writes = []
            for snapshot in page:
                if not any(self._matches(r, key) for r in snapshot.recipients):
                    continue
                # The worker thread's snapshot may be stale by now (delivered meanwhile):
                # decide on the spool's current state, read on the loop, before any await.
                message = self.spool.get(snapshot.envelope.id)
                if message is None:
                    continue
                changed, mine = self._flush_one(message, key)
                count += changed
                if changed and mine:
                    writes.append(message)
            if writes:
                await asyncio.gather(*(self.spool.update_recipients(m.envelope.id, m.recipients) for m in writes))
                sched.wake(rescan=True)
        sched.wake(rescan=True)
        return count

    def _flush_one(self, message: QueuedMessage, key: str) -> tuple[int, bool]:
        """Flush the matching recipients in `message`, or in the scheduler's copy of it.
        Returns (recipients changed, whether the caller writes `message`)."""
        am = self.scheduler.active.get(message.envelope.id)
        if am is not None:
            changed = 0
            for index, recipient in enumerate(am.recipients):
                if recipient is not None and index not in am.busy and self._matches(recipient, key):
                    am.recipients[index] = flushed(recipient)
                    changed += 1
            if changed:
                self.scheduler.write_back(message.envelope.id, am)
            return changed, False
        changed = 0
        for index, recipient in enumerate(message.recipients):
            if self._matches(recipient, key):
                message.recipients[index] = flushed(recipient)
                changed += 1
        return changed, True

    def _matches(self, recipient: Recipient, key: str) -> bool:
        if recipient.state == "held" or recipient.next_attempt == 0.0:
            return False
        return not key or self.key_of(recipient.address.rpartition("@")[2].lower()) == key

    async def bounce(self, queue_id: str, *, text: str = "bounced by operator request") -> bool:
        """Give up on every recipient of the message now, return a DSN, remove it."""
        sched = self.scheduler
        am = sched.active.get(queue_id)
        message = sched.spool.get(queue_id)
        if message is None:
            return False
        envelope = message.envelope
        recipients: list[Recipient] = message.recipients
        if am is not None:
            recipients = [r for r in am.recipients if r is not None]
            am.recipients = [None] * len(am.recipients)  # running attempts' results are dropped
        failed = outcomes.local("bounced", "5.0.0", text, scope="message", reason="onhold")
        now = self.clock()
        for recipient in recipients:
            sched.publish(outcome_event("bounced", envelope, recipient, failed, now=now,
                                        attempts=recipient.attempts, reason="operator"))
        await sched.send_dsn(envelope, [(r, failed, "") for r in recipients], "failed")
        if am is not None:
            sched.write_back(queue_id, am)  # the now empty list: removes the message
            return True
        return await sched.spool.update_recipients(queue_id, [])

    def active_indexes(self, queue_id: str) -> frozenset[int]:
        """Recipients of the message in an attempt now (shown as state "active")."""
        am = self.scheduler.active.get(queue_id)
        return frozenset(am.busy) if am is not None else frozenset()

    async def summary(self) -> list[DestinationSummary]:
        """Per destination: what the spool holds for it, and what the scheduler knows of it."""
        now = self.clock()
        rows: dict[str, DestinationSummary] = {}
        async for page in self._scan(""):
            for message in page:
                for recipient in message.recipients:
                    key = self.key_of(recipient.address.rpartition("@")[2].lower())
                    row = rows.get(key) or rows.setdefault(key, DestinationSummary(destination=key))
                    if recipient.state == "deferred" and recipient.next_attempt > now:
                        row.deferred += 1
                    else:
                        row.queued += 1
                    if not row.oldest or message.envelope.arrival_time < row.oldest:
                        row.oldest = message.envelope.arrival_time
        for key, queue in self.scheduler.queues.items():
            row = rows.get(key) or rows.setdefault(key, DestinationSummary(destination=key))
            row.active = queue.active
            row.last_error = queue.last_error
            row.suspended_until = queue.suspended_until if queue.suspended(now) else 0.0
            row.window = int(queue.window)
        return sorted(rows.values(), key=lambda r: (-(r.queued + r.deferred), r.destination))

    async def _scan(self, queue_id: str) -> AsyncIterator[list[QueuedMessage]]:
        """Pages of queued messages (one message when `queue_id`), read in a worker thread."""
        if queue_id:
            message = self.spool.get(queue_id)
            if message is not None:
                yield [message]
            return
        pages: asyncio.Queue[list[QueuedMessage] | None] = asyncio.Queue(maxsize=4)
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def scan() -> None:
            try:
                page: list[QueuedMessage] = []
                for message in self.spool.messages():
                    if stop.is_set():
                        return
                    page.append(message)
                    if len(page) >= _PAGE:
                        asyncio.run_coroutine_threadsafe(pages.put(page), loop).result()
                        page = []
                if page:
                    asyncio.run_coroutine_threadsafe(pages.put(page), loop).result()
            finally:
                asyncio.run_coroutine_threadsafe(pages.put(None), loop).result()

        worker = loop.run_in_executor(None, scan)
        try:
            while (page := await pages.get()) is not None:
                yield page
        finally:
            stop.set()
            while not worker.done():  # unblock the thread's last put, let it see `stop`
                try:
                    pages.get_nowait()
                except asyncio.QueueEmpty:
                    await asyncio.wait([worker], timeout=0.01)
            await worker


