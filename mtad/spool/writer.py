"""The spool's one writer thread: every LMDB write, grouped into synced commits.

Callers on the event loop submit a write operation (a function of the write transaction) and
await its future. The thread takes the first waiting operation and everything queued behind it;
when the previous commit showed several writers at work it keeps collecting for up to `linger`
seconds (or `max_batch` operations) for the rest of them (see _collect); it applies the batch
in one transaction and commits it with sync; only then does it resolve the futures, in one hop
back to each loop (`call_soon_threadsafe`). So "the future resolved" always means "the write
is on disk", and many concurrent writers share one fsync (group commit).

Failure isolation: an operation that hits MapFullError gets SpoolFull and the batch is retried
without it, so one huge message cannot fail its neighbours. A failed commit fails the whole
batch with SpoolFailed and marks the spool unwritable until a later commit succeeds.
Operations must therefore be re-runnable: a pure function of the transaction's contents.

LMDB (and py-lmdb) release the GIL while copying values and while writing and syncing, so a
30 MB body costs the event loop nothing but the enqueue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import lmdb
import structlog

from .errors import SpoolError, SpoolFailed, SpoolFull

T = TypeVar("T")
Apply = Callable[["lmdb.Transaction[bytes]"], Any]
_Waiter = asyncio.Future[Any] | concurrent.futures.Future[Any]

log = structlog.get_logger("mtad.spool")


class WriteEnv(Protocol):
    """What the writer needs of an LMDB environment (tests wrap a real one to inject faults)."""

    def begin(self, *, write: bool) -> lmdb.Transaction[bytes]: ...


class _Op:
    __slots__ = ("apply", "enqueued", "loop", "waiter")

    def __init__(self, apply: Apply | None, waiter: _Waiter, loop: asyncio.AbstractEventLoop | None) -> None:
        self.apply = apply  # None marks the stop request
        self.waiter = waiter
        self.loop = loop  # None: a concurrent.futures.Future, settled directly from the thread
        self.enqueued = time.monotonic()


_Settlement = tuple[_Op, Any, BaseException | None]


class Writer:
    """The group-commit writer thread of one LMDB environment."""

    def __init__(self, env: WriteEnv, *, linger: float, max_batch: int) -> None:
        if max_batch < 1 or linger < 0:
            raise ValueError("commit_max_batch must be >= 1 and commit_linger >= 0")
        self._env = env
        self._linger = linger
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._dead = False
        self._healthy = True
        self._current: list[_Op] = []
        self._previous_batch = 1
        """Ops in the last batch: how many writers to expect in the next (see _collect)."""
        self._thread = threading.Thread(target=self._run, name="mtad-spool-writer", daemon=True)
        self.commits = 0
        """Synced commits so far."""
        self.committed_ops = 0
        """Operations made durable so far (committed_ops / commits = operations per commit)."""

    def start(self) -> None:
        self._thread.start()

    @property
    def writable(self) -> bool:
        return not self._closed and not self._dead and self._healthy and self._thread.is_alive()

    def submit(self, apply: Callable[[lmdb.Transaction[bytes]], T]) -> asyncio.Future[T]:
        """Queue a write; the future resolves after the synced commit holding it. Loop thread only."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(_Op(apply, future, loop))
        return future

    def run_blocking(self, apply: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        """Queue a write and wait for its commit, from a thread that may block (startup, tests)."""
        waiter: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(_Op(apply, waiter, None))
        return waiter.result()

    async def stop(self) -> None:
        """Let every queued write commit, then end the thread."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._dead:
                return
            self._queue.put(_Op(None, done, loop))
        await done
        self._thread.join()

    def _enqueue(self, op: _Op) -> None:
        with self._lock:
            if self._closed:
                raise SpoolError("spool is closed")
            if self._dead:
                raise SpoolFailed("spool writer has stopped")
            self._queue.put(op)

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch, stop = self._collect()
                if batch:
                    self._current = batch
                    self._commit(batch)
                    self._current = []
                if stop is not None:
                    self._settle([(stop, None, None)])
                    return
        except BaseException:
            # A bug, not an I/O error (those are settled per batch): fail everything still
            # waiting so that no caller hangs, and report the spool unwritable from now on.
            log.exception("spool.writer_crashed")
            self._die()

    def _collect(self) -> tuple[list[_Op], _Op | None]:
        """The next batch: the first waiting op, whatever is queued behind it, and, when more
        writers are known to be active, whatever else arrives within the linger.

        How many writers are active is read from the previous batch: a commit of N ops means N
        callers were writing, and each may be back with its next op soon. So the thread lingers
        only while the batch is smaller than the previous one, and never longer than `linger`
        after the first op was queued. A lone writer (previous batch of one, nothing else
        queued) commits at once instead of waiting out the linger for company that never comes.
        Ops that queued up while the previous commit was syncing go straight into this one.
        """
        first = self._queue.get()
        if first.apply is None:
            return [], first
        batch = [first]
        expected = min(self._max_batch, max(self._previous_batch, 1))
        deadline = first.enqueued + self._linger
        while len(batch) < self._max_batch:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if len(batch) >= expected or remaining <= 0:
                    break
                try:
                    op = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if op.apply is None:
                return batch, op
            batch.append(op)
        self._previous_batch = len(batch)
        return batch, None

    def _commit(self, batch: list[_Op]) -> None:
        settled: list[_Settlement] = []
        pending = batch
        while pending:
            txn = self._env.begin(write=True)
            results: list[Any] = []
            failure: tuple[int, BaseException] | None = None
            for index, op in enumerate(pending):
                try:
                    results.append(op.apply(txn))  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - handed to the op's caller
                    failure = (index, _translate(exc))
                    break
            if failure is not None:
                txn.abort()
                failed_at, error = failure
                settled.append((pending[failed_at], None, error))
                pending = pending[:failed_at] + pending[failed_at + 1 :]
                continue
            try:
                txn.commit()
            except lmdb.MapFullError:
                # Rare: the free-page list itself did not fit. Commit one op at a time so only
                # the ops that really do not fit fail.
                if len(pending) > 1:
                    for op in pending:
                        self._commit([op])
                else:
                    settled.append((pending[0], None, SpoolFull("spool map is full")))
                break
            except (lmdb.Error, OSError) as exc:
                self._healthy = False
                log.error("spool.commit_failed", error=str(exc), writes=len(pending))
                settled.extend((op, None, SpoolFailed(f"spool commit failed: {exc}")) for op in pending)
                break
            self._healthy = True
            self.commits += 1
            self.committed_ops += len(pending)
            settled.extend((op, result, None) for op, result in zip(pending, results))
            break
        self._settle(settled)

    def _settle(self, settled: list[_Settlement]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Settlement]] = {}
        for item in settled:
            op, result, exc = item
            if op.loop is None:
                waiter = op.waiter
                if waiter.done():
                    continue
                if exc is None:
                    waiter.set_result(result)
                else:
                    waiter.set_exception(exc)
            else:
                by_loop.setdefault(op.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting for these any more

    def _die(self) -> None:
        with self._lock:
            self._dead = True
        leftovers: list[_Settlement] = [(op, None, SpoolFailed("spool writer has stopped")) for op in self._current]
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            leftovers.append((op, None, None if op.apply is None else SpoolFailed("spool writer has stopped")))
        self._settle(leftovers)


def _translate(exc: Exception) -> BaseException:
    """The exception an op's caller sees: our own tree for LMDB trouble, anything else as is."""
    if isinstance(exc, lmdb.MapFullError):
        return SpoolFull("spool map is full")
    if isinstance(exc, lmdb.Error):
        return SpoolFailed(f"spool write failed: {exc}")
    return exc


def _resolve(items: list[_Settlement]) -> None:
    """On the loop: hand each op's outcome to its future (unless its awaiter gave up)."""
    for op, result, exc in items:
        future = op.waiter
        if future.done():
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
