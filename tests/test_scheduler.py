"""The scheduler's decisions, on a real spool, with a scripted attempt in place of SMTP.

What the scheduler promises: every due recipient gets an attempt; outcomes land in the spool
(delivered and bounced leave, deferred wait with a backoff and their history); a DSN is asked
for on failures; windows bound concurrency per destination; a dead destination is suspended
and its mail deferred; one slow destination does not starve the others; a restarted
scheduler picks up from the spool alone. The end-to-end tests (test_delivery.py) show the
same with real SMTP and DNS peers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import msgspec
import pytest
import pytest_asyncio

from mtad.deliver import outcome as outcomes
from mtad.deliver.control import Control
from mtad.deliver.destq import Job, Windows
from mtad.deliver.outcome import Outcome
from mtad.deliver.scheduler import Scheduler
from mtad.deliver.transitions import Policy
from mtad.events import Event
from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool


class Result(msgspec.Struct):
    outcomes: list[Outcome]
    relay: str = "sink[127.0.0.1]:25"
    connected: bool = True


def by_local_part(address: str) -> Outcome:
    local = address.partition("@")[0]
    if local.startswith("bad"):
        return outcomes.from_reply("rcpt", 550, "5.1.1 user unknown")
    if local.startswith("later"):
        return outcomes.from_reply("rcpt", 450, "4.2.0 mailbox busy")
    return outcomes.from_reply("dot", 250, "2.0.0 ok")


WINDOWS = Windows(initial=2, limit=4, suspend_after=3, suspend_time=60)
POLICY = Policy(min_backoff=60, max_backoff=600, lifetime=3600)


class Harness:
    def __init__(self, spool: Spool, *, decide: Callable[[str], Outcome] = by_local_part,
                 windows: Windows = WINDOWS, policy: Policy = POLICY,
                 active_limit: int = 1000, gate: asyncio.Event | None = None,
                 down: set[str] | None = None) -> None:
        self.spool = spool
        self.events: list[Event] = []
        self.dsns: list[tuple[str, list[str], str]] = []
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.order: list[str] = []
        self.gate = gate
        self.down = down or set()
        self.decide = decide
        self.scheduler = Scheduler(
            spool, key_of=lambda domain: domain, attempt=self.attempt, publish=self.events.append,
            send_dsn=self.send_dsn, policy=policy, windows=windows, active_limit=active_limit,
            max_recipients=10,
        )
        self.task: asyncio.Task[None] | None = None

    async def attempt(self, job: Job, envelope: Envelope, recipients: list[Recipient]) -> Result:
        self.running[job.domain] = self.running.get(job.domain, 0) + 1
        self.peak[job.domain] = max(self.peak.get(job.domain, 0), self.running[job.domain])
        self.order.append(job.domain)
        try:
            if self.gate is not None and job.domain == "slow.test":
                await self.gate.wait()
            await asyncio.sleep(0)
            if job.domain in self.down:
                failed = outcomes.network_error("connect", "Connection refused")
                return Result(outcomes=[failed] * len(recipients), relay="", connected=False)
            return Result(outcomes=[self.decide(r.address) for r in recipients])
        finally:
            self.running[job.domain] -= 1

    async def send_dsn(self, envelope: Envelope, items: list[tuple[Recipient, Outcome, str]], action: str) -> None:
        self.dsns.append((envelope.id, [r.address for r, _, _ in items], action))

    def __enter__(self) -> Self:
        self.task = asyncio.create_task(self.scheduler.run())
        return self

    async def stop(self) -> None:
        await self.scheduler.stop(5)
        assert self.task is not None
        await self.task

    def __exit__(self, *exc: object) -> None:
        pass


async def queue_message(spool: Spool, *addresses: str, arrival: float | None = None) -> str:
    queue_id = new_queue_id()
    envelope = Envelope(id=queue_id, sender="sender@example.org", arrival_time=arrival or time.time(), size=10)
    await spool.store(envelope, [Recipient(address=a) for a in addresses], b"Subject: t\r\n\r\nbody\r\n")
    return queue_id


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest_asyncio.fixture
async def spool(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Spool.open(str(tmp_path / "spool"), map_size=64 * 1024**2)
    s.recover()
    yield s
    await s.close()


@pytest.mark.asyncio
async def test_outcomes_land_in_the_spool(spool: Spool) -> None:
    queue_id = await queue_message(spool, "ok@a.test", "bad@a.test", "later@b.test")
    h = Harness(spool)
    with h:
        h.scheduler.wake()
        await until(lambda: len(h.events) == 3)
        await until(lambda: queue_id not in h.scheduler.active)
    await h.stop()
    kinds = sorted((e.type, e.recipients[0]) for e in h.events)
    assert kinds == [("bounced", "bad@a.test"), ("deferred", "later@b.test"), ("delivered", "ok@a.test")]
    assert h.dsns == [(queue_id, ["bad@a.test"], "failed")]
    left = spool.get(queue_id)
    assert left is not None and [r.address for r in left.recipients] == ["later@b.test"]
    later = left.recipients[0]
    assert later.state == "deferred" and later.attempts == 1
    assert 60 * 0.7 < later.next_attempt - time.time() <= 60 * 1.3
    assert later.last_reply.startswith("450 4.2.0") and later.history[-1].reply == later.last_reply
    bounced = next(e for e in h.events if e.type == "bounced")
    assert (bounced.status, bounced.reason, bounced.bounce_class) == ("5.1.1", "userunknown", "hard")


@pytest.mark.asyncio
async def test_delivered_messages_leave_the_spool(spool: Spool) -> None:
    ids = [await queue_message(spool, f"ok{i}@a.test", f"ok{i}@b.test") for i in range(50)]
    h = Harness(spool)
    with h:
        h.scheduler.wake()
        await until(lambda: spool.count() == 0)
    await h.stop()
    assert sum(e.type == "delivered" for e in h.events) == 100
    assert {e.queue_id for e in h.events} == set(ids)


@pytest.mark.asyncio
async def test_window_bounds_concurrency_per_destination(spool: Spool) -> None:
    for i in range(40):
        await queue_message(spool, f"ok{i}@a.test")
    h = Harness(spool, windows=Windows(initial=2, limit=3, suspend_after=3, suspend_time=60))
    with h:
        h.scheduler.wake()
        await until(lambda: spool.count() == 0)
    await h.stop()
    assert h.peak["a.test"] <= 3
    assert h.scheduler.queues["a.test"].window == 3  # grew from 2 on success


@pytest.mark.asyncio
async def test_dead_destination_is_suspended_and_its_mail_deferred(spool: Spool) -> None:
    dead = [await queue_message(spool, f"x{i}@down.test") for i in range(20)]
    alive = await queue_message(spool, "ok@up.test")
    h = Harness(spool, down={"down.test"}, windows=Windows(initial=1, limit=4, suspend_after=3, suspend_time=60))
    with h:
        h.scheduler.wake()
        await until(lambda: spool.get(alive) is None)
        await until(lambda: not h.scheduler.active)
    await h.stop()
    assert h.order.count("down.test") == 3  # three failed connections, then the rest rests
    queue = h.scheduler.queues["down.test"]
    assert queue.suspended(time.time())
    for queue_id in dead:
        message = spool.get(queue_id)
        assert message is not None
        assert message.recipients[0].state == "deferred"
        assert message.recipients[0].next_attempt >= queue.suspended_until - 0.001


@pytest.mark.asyncio
async def test_a_slow_destination_does_not_starve_others(spool: Spool) -> None:
    for i in range(10):
        await queue_message(spool, f"ok{i}@slow.test")
    fast = [await queue_message(spool, f"ok{i}@fast.test") for i in range(30)]
    gate = asyncio.Event()
    h = Harness(spool, gate=gate)
    with h:
        h.scheduler.wake()
        await until(lambda: all(spool.get(q) is None for q in fast))
        assert h.running["slow.test"] == 2  # its window's worth, stuck
        gate.set()
        await until(lambda: spool.count() == 0)
    await h.stop()


@pytest.mark.asyncio
async def test_restart_rebuilds_from_the_spool_and_flush_makes_mail_due(spool: Spool) -> None:
    queue_id = await queue_message(spool, "later@a.test")
    h = Harness(spool)
    with h:
        h.scheduler.wake()
        await until(lambda: any(e.type == "deferred" for e in h.events))
        await until(lambda: not h.scheduler.active)
    await h.stop()
    message = spool.get(queue_id)
    assert message is not None and message.recipients[0].next_attempt > time.time()

    # A fresh scheduler (a restart) knows only the spool; the recipient is not due yet.
    h2 = Harness(spool, decide=lambda address: outcomes.from_reply("dot", 250, "2.0.0 ok"))
    with h2:
        seen = h2.scheduler.cycles
        h2.scheduler.wake()
        await until(lambda: h2.scheduler.cycles >= seen + 2)  # it looked at the due index twice
        assert h2.order == []
        assert await Control(h2.scheduler).flush(domain="a.test") == 1
        await until(lambda: spool.get(queue_id) is None)
    await h2.stop()
    assert [e.type for e in h2.events] == ["delivered"]


@pytest.mark.asyncio
async def test_expired_recipients_bounce_with_the_last_status(spool: Spool) -> None:
    queue_id = await queue_message(spool, "later@a.test", arrival=time.time() - 7200)
    h = Harness(spool)
    with h:
        h.scheduler.wake()
        await until(lambda: spool.get(queue_id) is None)
    await h.stop()
    assert [(e.type, e.status) for e in h.events] == [("expired", "4.2.0")]
    assert h.events[0].reply.startswith("450 4.2.0")
    assert h.dsns == [(queue_id, ["later@a.test"], "failed")]


@pytest.mark.asyncio
async def test_active_set_is_bounded(spool: Spool) -> None:
    for i in range(60):
        await queue_message(spool, f"ok{i}@slow.test")
    gate = asyncio.Event()
    h = Harness(spool, gate=gate, active_limit=10)
    with h:
        h.scheduler.wake()
        await until(lambda: len(h.scheduler.active) == 10)
        gate.set()
        await until(lambda: spool.count() == 0)
    await h.stop()
    assert sum(e.type == "delivered" for e in h.events) == 60
