"""The group-commit writer thread, through the Spool and directly: batching, futures that
resolve only after the synced commits (data, then meta), MapFull isolation in either
environment, commit failures in either (and the orphan bodies a failed meta commit leaves),
body deletion after the meta commit, draining on close, and a 30 MB body that does not stall
the event loop."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool, SpoolError, SpoolFailed, SpoolFull
from mtad.spool.env import Tables, close_tables, open_tables
from mtad.spool.writer import Writer
from mtad.spool.writes import WriteTxns

MB = 1024 * 1024


def envelope(size: int = 5) -> Envelope:
    return Envelope(id=new_queue_id(), sender="alice@example.test", arrival_time=time.time(), size=size)


RCPTS = [Recipient(address="bob@example.net")]


class FaultyTxn:
    """A real write transaction whose commit can be made to wait or to fail."""

    def __init__(self, txn: lmdb.Transaction[bytes], env: FaultyEnv) -> None:
        self._txn = txn
        self._env = env

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)

    def commit(self) -> None:
        self._env.commit_entered.set()
        assert self._env.commit_may_go.wait(30)
        if self._env.fail_commits:
            self._env.fail_commits -= 1
            self._txn.abort()
            raise lmdb.DiskError("simulated EIO")
        self._txn.commit()
        self._env.committed.set()


class FaultyEnv:
    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self.fail_commits = 0
        self.commit_entered = threading.Event()
        self.commit_may_go = threading.Event()
        self.commit_may_go.set()
        self.committed = threading.Event()

    def begin(self, *, write: bool) -> lmdb.Transaction[bytes]:
        return FaultyTxn(self._env.begin(write=write), self)  # type: ignore[return-value]


@pytest.fixture
def tables(tmp_path: Path) -> Iterator[Tables]:
    yield open_tables(str(tmp_path / "spool"), map_size=64 * MB)  # the test closes them


def spool_with(tables: Tables, env: Any, *, data: Any = None, linger: float = 0.002,
               max_batch: int = 256) -> Spool:
    """A Spool whose writer goes through `env` (the meta environment, possibly a FaultyEnv)
    and `data` (the data environment; the real one unless given)."""
    writer = Writer(env, data or tables.data_env, tables.body, linger=linger, max_batch=max_batch)
    writer.start()
    return Spool(tables, writer, time.time)


def bodies_on_disk(tables: Tables) -> set[str]:
    """Queue ids in the body table, read from the data environment directly."""
    with tables.data_env.begin() as txn:
        return {key.decode() for key in txn.cursor(db=tables.body).iternext(keys=True, values=False)}


@pytest.mark.asyncio
async def test_group_commit_batches_concurrent_stores(tmp_path: Path) -> None:
    spool = Spool.open(str(tmp_path / "spool"), map_size=64 * MB, commit_linger=0.005, commit_max_batch=64)
    try:
        envelopes = [envelope() for _ in range(400)]
        await asyncio.gather(*(spool.store(e, RCPTS, b"body") for e in envelopes))
        assert spool.committed_writes == 400
        assert 400 / 64 <= spool.commits <= 40, spool.commits  # many writes per synced commit
        assert spool.count() == 400
    finally:
        await spool.close()


@pytest.mark.asyncio
async def test_future_resolves_only_after_the_commit(tables: Tables) -> None:
    faulty = FaultyEnv(tables.env)
    faulty.commit_may_go.clear()
    spool = spool_with(tables, faulty)
    try:
        env = envelope()
        pending = asyncio.ensure_future(spool.store(env, RCPTS, b"body"))
        assert await asyncio.to_thread(faulty.commit_entered.wait, 30)
        # The writer is inside the meta commit: the body is on disk already, but the store
        # must not have returned, nor be visible, body included.
        done, _ = await asyncio.wait({pending}, timeout=0.1)
        assert not done and spool.get(env.id) is None and spool.read_body(env.id) is None
        assert bodies_on_disk(tables) == {env.id}
        faulty.commit_may_go.set()
        await pending
        assert faulty.committed.is_set() and spool.get(env.id) is not None
    finally:
        faulty.commit_may_go.set()
        await spool.close()


async def queue_behind_a_blocked_commit(faulty: FaultyEnv, spool: Spool, stores: list[Any]) -> asyncio.Future[Any]:
    """Hold the writer inside the commit of one store, then queue `stores` (coroutines) behind
    it, so that they all reach the writer's queue before it collects its next batch."""
    faulty.commit_may_go.clear()
    blocker = asyncio.ensure_future(spool.store(envelope(), RCPTS, b"blocker"))
    assert await asyncio.to_thread(faulty.commit_entered.wait, 30)
    queued = asyncio.gather(*stores, return_exceptions=True)
    await asyncio.sleep(0)  # one scheduling turn: each store task runs up to its enqueue
    return asyncio.gather(blocker, queued, return_exceptions=True)


@pytest.mark.asyncio
async def test_failed_commit_fails_the_batch_then_recovers(tables: Tables) -> None:
    faulty = FaultyEnv(tables.env)
    spool = spool_with(tables, faulty, linger=0.05)
    try:
        doomed = [envelope() for _ in range(5)]
        both = await queue_behind_a_blocked_commit(faulty, spool, [spool.store(e, RCPTS, b"x") for e in doomed])
        faulty.fail_commits = 2  # the blocker's commit, then the one holding all five
        faulty.commit_may_go.set()
        blocker, results = await both
        assert isinstance(blocker, SpoolFailed)
        assert all(isinstance(r, SpoolFailed) for r in results), results
        assert not spool.writable()
        assert all(spool.get(e.id) is None and spool.read_body(e.id) is None for e in doomed)
        ok = envelope()
        await spool.store(ok, RCPTS, b"x")
        assert spool.writable() and spool.get(ok.id) is not None
        # Their bodies were committed before the meta commit failed: orphans, deleted by the
        # next data commit (at the latest the one that stored `ok`).
        assert bodies_on_disk(tables) == {ok.id}
        assert spool.recover().orphan_bodies == 0
    finally:
        faulty.commit_may_go.set()
        await spool.close()


@pytest.mark.asyncio
async def test_map_full_fails_only_the_big_message(tmp_path: Path) -> None:
    tables = open_tables(str(tmp_path / "spool"), map_size=2 * MB)
    faulty = FaultyEnv(tables.env)
    spool = spool_with(tables, faulty)
    try:
        big = envelope(4 * MB)
        small = [envelope() for _ in range(20)]
        # One batch: the huge message sits in the middle of its neighbours.
        both = await queue_behind_a_blocked_commit(faulty, spool, [
            *(spool.store(e, RCPTS, b"small") for e in small[:10]),
            spool.store(big, RCPTS, bytes(4 * MB)),
            *(spool.store(e, RCPTS, b"small") for e in small[10:]),
        ])
        faulty.commit_may_go.set()
        blocker, results = await both
        assert blocker is None
        assert isinstance(results[10], SpoolFull)
        assert [r for i, r in enumerate(results) if i != 10] == [None] * 20
        assert spool.commits == 2  # the blocker's, then one for the twenty that fit
        assert spool.get(big.id) is None and spool.read_body(big.id) is None
        assert all(spool.read_body(e.id) == b"small" for e in small)
        assert spool.writable()
        later = envelope()
        await spool.store(later, RCPTS, b"still works")
        assert spool.read_body(later.id) == b"still works"
        assert spool.count() == 22
    finally:
        faulty.commit_may_go.set()
        await spool.close()


@pytest.mark.asyncio
async def test_a_lone_writer_does_not_wait_out_the_linger(tmp_path: Path) -> None:
    # A 30 s linger: were a lone store held for company, these would take minutes (and time out).
    spool = Spool.open(str(tmp_path / "spool"), map_size=64 * MB, commit_linger=30.0)
    try:
        started = time.monotonic()
        for _ in range(20):
            await spool.store(envelope(), RCPTS, b"one at a time")
        assert (spool.commits, spool.committed_writes) == (20, 20)
        assert time.monotonic() - started < 15.0
    finally:
        await spool.close()


@pytest.mark.asyncio
async def test_after_a_group_the_writer_lingers_for_the_rest_of_it(tables: Tables) -> None:
    # Twenty writers committed together; then their next ops come one by one, each after the
    # previous one's enqueue. The writer waits (up to the linger) until it has all twenty again.
    faulty = FaultyEnv(tables.env)
    spool = spool_with(tables, faulty, linger=30.0, max_batch=64)
    try:
        first = await queue_behind_a_blocked_commit(faulty, spool, [spool.store(envelope(), RCPTS, b"x")
                                                                    for _ in range(20)])
        faulty.commit_may_go.set()
        await first
        assert spool.commits == 2  # the blocker, then all twenty
        stores = []
        for _ in range(20):
            stores.append(asyncio.ensure_future(spool.store(envelope(), RCPTS, b"y")))
            await asyncio.sleep(0)
        await asyncio.gather(*stores)
        assert spool.commits == 3, spool.commits
    finally:
        faulty.commit_may_go.set()
        await spool.close()


@pytest.mark.asyncio
async def test_close_drains_pending_writes_then_refuses(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    spool = Spool.open(directory, map_size=64 * MB, commit_linger=0.01, commit_max_batch=7)
    envelopes = [envelope() for _ in range(100)]
    stores = [asyncio.ensure_future(spool.store(e, RCPTS, b"x")) for e in envelopes]
    await asyncio.sleep(0)  # one scheduling turn: each store task runs up to its enqueue
    await spool.close()
    assert all(s.done() and s.exception() is None for s in stores)
    assert not spool.writable()
    with pytest.raises(SpoolError, match="closed"):
        await spool.store(envelope(), RCPTS, b"x")
    await spool.close()  # idempotent
    reopened = Spool.open(directory, map_size=64 * MB)
    try:
        assert reopened.count() == 100
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_writer_runs_blocking_ops_and_reports_op_errors(tables: Tables) -> None:
    writer = Writer(tables.env, tables.data_env, tables.body, linger=0.0, max_batch=8)
    writer.start()

    def put(key: bytes, txns: WriteTxns) -> int:
        txns.meta.put(key, b"v", db=tables.meta)
        return len(key)

    def boom(txns: WriteTxns) -> None:
        raise ValueError("bug in an op")

    try:
        assert await asyncio.to_thread(writer.run_blocking, functools.partial(put, b"k1")) == 2
        results = await asyncio.gather(
            writer.submit(functools.partial(put, b"k22")), writer.submit(boom), return_exceptions=True
        )
        assert results[0] == 3 and isinstance(results[1], ValueError)
        # An op-level LMDB error other than MapFull fails that op only.
        oversized = writer.submit(functools.partial(put, b"k" * 4096))
        with pytest.raises(SpoolFailed):
            await oversized
        assert writer.writable
    finally:
        await writer.stop()
        close_tables(tables)


@pytest.mark.asyncio
async def test_thirty_megabyte_body_does_not_stall_the_loop(tmp_path: Path) -> None:
    spool = Spool.open(str(tmp_path / "spool"), map_size=256 * MB)
    body = bytes(range(256)) * (30 * MB // 256)
    stalls: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last)
            last = now

    try:
        tick = asyncio.create_task(ticker())
        env = envelope(len(body))
        started = time.perf_counter()
        await spool.store(env, RCPTS, body)
        took = time.perf_counter() - started
        stop.set()
        await tick
        assert spool.read_body(env.id) == body
        # The copy and the fsync happen in the writer thread; the loop keeps ticking.
        # Were the loop blocked for the store, one stall would be as long as the store itself.
        assert max(stalls) < max(0.05, took / 2), (max(stalls), took)
    finally:
        await spool.close()


class WriterBug(BaseException):
    """Escapes the per-op `except Exception`, as a bug in the writer itself would."""


@pytest.mark.asyncio
async def test_a_crashed_writer_fails_waiters_instead_of_hanging(tables: Tables) -> None:
    writer = Writer(tables.env, tables.data_env, tables.body, linger=0.05, max_batch=8)
    writer.start()

    def crash(txns: WriteTxns) -> None:
        raise WriterBug

    try:
        results = await asyncio.gather(
            writer.submit(lambda txn: None), writer.submit(crash), return_exceptions=True
        )
        assert all(isinstance(r, SpoolFailed) for r in results), results
        assert not writer.writable
        with pytest.raises(SpoolFailed):
            writer.submit(lambda txn: None)
    finally:
        await writer.stop()
        close_tables(tables)


@pytest.mark.asyncio
async def test_failed_data_commit_fails_the_batch_and_stores_nothing(tables: Tables) -> None:
    data = FaultyEnv(tables.data_env)
    spool = spool_with(tables, tables.env, data=data)
    try:
        data.fail_commits = 1
        doomed = envelope()
        with pytest.raises(SpoolFailed):
            await spool.store(doomed, RCPTS, b"x")
        assert not spool.writable()
        assert spool.get(doomed.id) is None and bodies_on_disk(tables) == set()
        ok = envelope()
        await spool.store(ok, RCPTS, b"fine")
        assert spool.writable() and spool.read_body(ok.id) == b"fine"
        assert bodies_on_disk(tables) == {ok.id}
    finally:
        await spool.close()


@pytest.mark.asyncio
async def test_map_full_in_the_meta_environment_fails_only_that_message(tmp_path: Path) -> None:
    tables = open_tables(str(tmp_path / "spool"), map_size=2 * MB)
    faulty = FaultyEnv(tables.env)
    spool = spool_with(tables, faulty)
    try:
        crowd = [Recipient(address=f"r{i}@example.net") for i in range(40_000)]  # ~2.7 MB of records
        crowded = envelope()
        small = [envelope() for _ in range(10)]
        both = await queue_behind_a_blocked_commit(faulty, spool, [
            *(spool.store(e, RCPTS, b"small") for e in small[:5]),
            spool.store(crowded, crowd, b"its body"),
            *(spool.store(e, RCPTS, b"small") for e in small[5:]),
        ])
        faulty.commit_may_go.set()
        blocker, results = await both
        assert blocker is None and isinstance(results[5], SpoolFull)
        assert [r for i, r in enumerate(results) if i != 5] == [None] * 10
        assert spool.commits == 2 and spool.writable()
        assert spool.get(crowded.id) is None
        assert crowded.id not in bodies_on_disk(tables)  # its body went with the aborted attempt
        assert all(spool.read_body(e.id) == b"small" for e in small)
    finally:
        faulty.commit_may_go.set()
        await spool.close()


@pytest.mark.asyncio
async def test_a_removed_message_body_is_deleted_after_its_envelope(tables: Tables) -> None:
    data = FaultyEnv(tables.data_env)
    spool = spool_with(tables, tables.env, data=data)
    try:
        gone, kept = envelope(), envelope()
        await spool.store(gone, RCPTS, b"gone")
        assert await spool.delete(gone.id)
        assert spool.read_body(gone.id) is None  # the message is gone, whenever its body leaves
        await spool.store(kept, RCPTS, b"kept")
        # The next data commit (this store's, or an idle one before it) deleted the body.
        assert bodies_on_disk(tables) == {kept.id}

        # Now the data environment fails every commit: the removal still commits (meta), and
        # the body it leaves behind is an orphan, never an envelope without a body.
        data.fail_commits = 1000
        assert await spool.update_recipients(kept.id, [])
        assert spool.get(kept.id) is None and spool.read_body(kept.id) is None
        assert spool.writable()  # deleting a body is housekeeping, not a refused write
    finally:
        await spool.close()  # tries once more to delete the body, and fails
    assert data.fail_commits < 1000
    reopened = Spool.open(tables.directory, map_size=64 * MB)
    try:
        assert bodies_on_disk(reopened._tables) == {kept.id}
        report = reopened.recover()
        assert (report.messages, report.corrupt, report.orphan_bodies) == (0, 0, 1)
        assert bodies_on_disk(reopened._tables) == set()
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_room_made_by_deleting_is_usable_at_once(tmp_path: Path) -> None:
    # LMDB reuses the pages a transaction freed only two transactions later, and a store that
    # does not fit aborts rather than commits: without the writer's reclaim commit, a full
    # spool emptied in one group commit would refuse every big message from then on.
    spool = Spool.open(str(tmp_path / "spool"), map_size=4 * MB)
    try:
        stored: list[str] = []
        with pytest.raises(SpoolFull):
            for _ in range(64):
                env = envelope(600_000)
                await spool.store(env, RCPTS, bytes(600_000))
                stored.append(env.id)
        assert len(stored) >= 3
        assert all(await asyncio.gather(*(spool.delete(queue_id) for queue_id in stored)))
        for _ in range(3):
            env = envelope(600_000)
            await spool.store(env, RCPTS, bytes(600_000))
            assert spool.read_body(env.id) == bytes(600_000)
        assert spool.writable()
    finally:
        await spool.close()
