"""The scheduler: decides when each recipient is tried, never how (DESIGN principle 4).

It reads the spool's due index, loads due messages (envelope and recipient state, never the
body) into a bounded set of active messages, splits their due recipients into jobs per
destination queue, and starts jobs round-robin over the queues within each queue's window and
the global connection limit. Each job runs the injected `attempt` (which reads the body,
routes and talks SMTP); its outcomes go through `transitions.after_outcome`, then to the spool
(one write with the message's whole recipient state), the event bus and, for failures, the
DSN sender. A message leaves the active set only after its last write has committed, so a
rescan of the due index can never load a stale copy and deliver twice.

Everything it knows it can rebuild from the spool: after a restart the due index says what to
do. Wake-ups (new mail, released messages) are hints; a one-second tick is the safety net.
Deferred and scheduled mail waits in the due index, not in memory.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from mtad.deliver import outcome as outcomes
from mtad.deliver.destq import DestinationQueue, Job, Windows
from mtad.deliver.outcome import Outcome
from mtad.deliver.transitions import DsnAction, Policy, after_outcome, due_now, rest
from mtad.events import Event, EventType
from mtad.records import Envelope, QueuedMessage, Recipient
from mtad.spool import Spool, SpoolError

log = structlog.get_logger("mtad.deliver")

_PULL_PAGE = 512
_RESCAN_EVERY = 1.0
"""Seconds between full rescans of the due index (entries that landed behind the cursor)."""


class AttemptResult(Protocol):
    outcomes: list[Outcome]
    relay: str
    connected: bool


Attempt = Callable[[Job, Envelope, list[Recipient]], Awaitable[AttemptResult]]
SendDsn = Callable[[Envelope, list[tuple[Recipient, Outcome, str]], DsnAction], Awaitable[None]]


class _Failed:
    """The result of an attempt that raised: every recipient deferred, nothing learnt."""

    def __init__(self, count: int, error: str) -> None:
        self.outcomes = [outcomes.local("deferred", "4.3.0", f"local error: {error}", scope="message")] * count
        self.relay = ""
        self.connected = True  # our bug, not the destination's: don't count it against the window


class ActiveMessage:
    __slots__ = ("busy", "deleted", "envelope", "held", "jobs", "recipients", "writes")

    def __init__(self, message: QueuedMessage) -> None:
        self.envelope = message.envelope
        self.recipients: list[Recipient | None] = list(message.recipients)
        """The master copy; None marks a recipient that left the queue."""
        self.jobs = 0
        self.writes = 0
        self.held = False
        self.deleted = False
        self.busy: set[int] = set()
        """Indexes of recipients in a job (queued or running)."""


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        *,
        key_of: Callable[[str], str],
        attempt: Attempt,
        publish: Callable[[Event], None],
        send_dsn: SendDsn,
        policy: Policy,
        windows: Windows,
        max_connections: int = 1000,
        active_limit: int = 20000,
        max_recipients: int = 100,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.spool = spool
        self.key_of = key_of
        self.attempt = attempt
        self.publish = publish
        self.send_dsn = send_dsn
        self.policy = policy
        self.windows = windows
        self.max_connections = max_connections
        self.active_limit = active_limit
        self.max_recipients = max_recipients
        self.clock = clock
        self.rand = rand
        self.active: dict[str, ActiveMessage] = {}
        self.queues: dict[str, DestinationQueue] = {}
        self.connections = 0
        self._ready: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._cursor: tuple[float, str] | None = None
        self._last_rescan = 0.0
        self.paused = False
        """Start nothing: [delivery] paused (running attempts finish)."""
        self.cycles = 0
        """Passes of the main loop (pull, dispatch, wait): tests wait on it."""

    # --- control ---------------------------------------------------------------------------

    def wake(self, *, rescan: bool = False) -> None:
        """Look at the due index again soon; `rescan`: from its start (entries may have landed
        behind the cursor: a flush, a release)."""
        if rescan:
            self._cursor = None
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            now = self.clock()
            if now - self._last_rescan >= _RESCAN_EVERY:
                self._cursor, self._last_rescan = None, now
            if not self.paused:
                try:
                    self._pull(now)
                except SpoolError as exc:
                    log.error("deliver.pull_failed", error=str(exc))
                self._dispatch(now)
            self.cycles += 1
            try:
                # A suspended destination holds no jobs (they wait in the due index until the
                # suspension ends), so the rescan tick is the longest anything waits.
                await asyncio.wait_for(self._wake.wait(), _RESCAN_EVERY)
            except TimeoutError:
                pass

    async def stop(self, grace: float) -> None:
        """Start nothing new; let running attempts finish within `grace`, then cancel them
        (their recipients stay queued as the spool last recorded them)."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + grace
        while self._tasks:  # attempts start writes as they finish: wait for those too
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
            if pending and time.monotonic() >= deadline:
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)

    def forget(self, queue_id: str, *, deleted: bool) -> None:
        """An operator held or deleted the message: start none of its waiting jobs; a deleted
        message's running attempts are not written back either."""
        am = self.active.get(queue_id)
        if am is not None:
            am.held = True
            am.deleted = am.deleted or deleted

    # --- pulling due work from the spool ---------------------------------------------------

    def _pull(self, now: float) -> None:
        while len(self.active) < self.active_limit:
            limit = min(_PULL_PAGE, self.active_limit - len(self.active))
            entries = self.spool.due(now, limit, after=self._cursor)
            for due, queue_id in entries:
                self._cursor = (due, queue_id)
                if queue_id not in self.active:
                    self._load(queue_id, now)
            if len(entries) < limit:
                return

    def _load(self, queue_id: str, now: float) -> None:
        message = self.spool.get(queue_id)
        if message is None or message.envelope.held:
            return
        groups: dict[str, tuple[str, list[int]]] = {}
        for index, recipient in enumerate(message.recipients):
            if due_now(recipient, now):
                domain = recipient.address.rpartition("@")[2].lower()
                groups.setdefault(self.key_of(domain), (domain, []))[1].append(index)
        if not groups:
            return
        am = ActiveMessage(message)
        self.active[queue_id] = am
        resting: list[int] = []
        for key, (domain, indexes) in groups.items():
            queue = self._queue(key)
            if queue.suspended(now):
                for index in indexes:
                    am.recipients[index] = rest(message.recipients[index], until=queue.suspended_until,
                                                reply=_resting(queue))
                resting += indexes
                continue
            for start in range(0, len(indexes), self.max_recipients):
                batch = indexes[start : start + self.max_recipients]
                queue.jobs.append(Job(queue_id=queue_id, indexes=batch, domain=domain, key=key))
                am.jobs += 1
                am.busy.update(batch)
            self._ready[key] = None
        if resting:
            self.write_back(queue_id, am)
        elif not am.jobs:
            del self.active[queue_id]

    def _queue(self, key: str) -> DestinationQueue:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = DestinationQueue(key, self.windows)
        return queue

    # --- starting jobs -----------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        started = True
        while started and self.connections < self.max_connections and not self._stopping:
            started = False
            for key in list(self._ready):
                queue = self.queues[key]
                if not queue.can_start(now):
                    if not queue.jobs or queue.active >= int(queue.window):
                        del self._ready[key]  # finished() puts it back when there is room
                    continue
                job = queue.start()
                am = self.active.get(job.queue_id)
                if am is None or am.held:
                    queue.active -= 1
                    self._job_done(job, am)
                    started = True
                    continue
                self.connections += 1
                task = asyncio.create_task(self._run(queue, job, am), name=f"deliver {job.queue_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self._ready.move_to_end(key)
                started = True
                if self.connections >= self.max_connections:
                    return

    async def _run(self, queue: DestinationQueue, job: Job, am: ActiveMessage) -> None:
        live = [(i, r) for i in job.indexes if (r := am.recipients[i]) is not None]
        result: AttemptResult
        try:
            result = await self.attempt(job, am.envelope, [r for _, r in live]) if live else _Failed(0, "")
        except asyncio.CancelledError:
            self.connections -= 1
            queue.active -= 1
            self._job_done(job, am)
            raise
        except Exception as exc:  # one attempt's bug must not stop delivery
            log.exception("deliver.attempt_crashed", queue_id=job.queue_id, destination=queue.key)
            result = _Failed(len(live), type(exc).__name__)
        self.connections -= 1
        now = self.clock()
        failure = next((o.reply for o in result.outcomes if o.kind != "delivered"), "")
        if queue.finished(connected=result.connected, error=failure, now=now):
            log.warning("deliver.destination_suspended", destination=queue.key,
                        until=round(queue.suspended_until, 3), error=failure)
            self._rest_queue(queue)
        if queue.jobs and queue.key not in self._ready:
            self._ready[queue.key] = None
        await self._apply(job, am, live, result, now)
        self._wake.set()

    async def _apply(self, job: Job, am: ActiveMessage, live: Sequence[tuple[int, Recipient]],
                     result: AttemptResult, now: float) -> None:
        envelope = am.envelope
        dsns: dict[DsnAction, list[tuple[Recipient, Outcome, str]]] = {}
        for (index, recipient), outcome in zip(live, result.outcomes, strict=True):
            if am.recipients[index] is None or am.deleted:
                continue  # bounced or deleted by the operator meanwhile
            change = after_outcome(recipient, outcome, arrival=envelope.arrival_time, now=now, relay=result.relay,
                                   policy=self.policy, rand=self.rand,
                                   dsn_relayed=getattr(result, "dsn_relayed", True))
            am.recipients[index] = change.recipient
            self.publish(outcome_event(change.event, envelope, recipient, change.outcome, now=now,
                                       relay=result.relay, attempts=recipient.attempts + 1))
            if change.dsn:
                dsns.setdefault(change.dsn, []).append((recipient, change.outcome, result.relay))
        for action, items in dsns.items():
            await self._send_dsn(envelope, items, action)
        self._job_done(job, am)

    def _job_done(self, job: Job, am: ActiveMessage | None) -> None:
        if am is None:
            return
        am.jobs -= 1
        am.busy.difference_update(job.indexes)
        if am.deleted:
            if am.jobs == 0 and am.writes == 0:
                self.active.pop(job.queue_id, None)
            return
        self.write_back(job.queue_id, am)

    def _rest_queue(self, queue: DestinationQueue) -> None:
        """The destination is dead: defer its waiting jobs to the end of the suspension."""
        reply = _resting(queue)
        while queue.jobs:
            job = queue.jobs.popleft()
            am = self.active.get(job.queue_id)
            if am is None:
                continue
            for index in job.indexes:
                recipient = am.recipients[index]
                if recipient is not None:
                    am.recipients[index] = rest(recipient, until=queue.suspended_until, reply=reply)
            self._job_done(job, am)

    # --- writing back -------------------------------------------------------------------------

    def write_back(self, queue_id: str, am: ActiveMessage) -> None:
        """Write the message's whole recipient state; it leaves the active set once its last
        write has committed and no job of it is left."""
        am.writes += 1
        remaining = [r for r in am.recipients if r is not None]
        task = asyncio.create_task(self._commit(queue_id, am, remaining), name=f"write {queue_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, queue_id: str, am: ActiveMessage, remaining: list[Recipient]) -> None:
        try:
            await self.spool.update_recipients(queue_id, remaining)
        except SpoolError as exc:
            # The spool still says what it said: keep the message active (not retried from the
            # stale record until a restart) rather than risk delivering twice.
            log.error("deliver.write_failed", queue_id=queue_id, error=str(exc))
            am.writes -= 1
            return
        am.writes -= 1
        if am.jobs == 0 and am.writes == 0 and self.active.get(queue_id) is am:
            del self.active[queue_id]
            self._wake.set()

    async def _send_dsn(self, envelope: Envelope, items: list[tuple[Recipient, Outcome, str]],
                        action: DsnAction) -> None:
        try:
            await self.send_dsn(envelope, items, action)
        except Exception:  # a DSN that cannot be queued is logged; delivery goes on
            log.exception("deliver.dsn_failed", queue_id=envelope.id, action=action)


def outcome_event(kind: EventType, envelope: Envelope, recipient: Recipient, outcome: Outcome, *, now: float,
                  relay: str = "", attempts: int = 0, reason: str = "") -> Event:
    """The mail-log event of one recipient's outcome (delivered, deferred, bounced, expired)."""
    return Event(
        type=kind, time=now, queue_id=envelope.id, sender=envelope.sender, recipients=[recipient.address],
        message_id=envelope.message_id, size=envelope.size, reply=outcome.reply, relay=relay,
        attempts=attempts, delay=round(now - envelope.arrival_time, 3), reason=reason or outcome.reason,
        status=outcome.status, bounce_class=outcome.bounce_class,
    )


def _resting(queue: DestinationQueue) -> str:
    return f"destination {queue.key} not responding, retrying later: {queue.last_error}"[:512]
