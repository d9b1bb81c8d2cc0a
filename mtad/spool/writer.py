"""The spool's one writer thread: every LMDB write, grouped into synced commits.

Callers on the event loop submit a write operation (a function of the batch's `WriteTxns`) and
await its future. The thread takes the first waiting operation and everything queued behind it;
when the previous commit showed several writers at work it keeps collecting for up to `linger`
seconds (or `max_batch` operations) for the rest of them (see _collect). It applies the batch
to one write transaction per environment and commits them in a fixed order: first the data
environment's (bodies), with sync, then the meta environment's (envelopes, recipients, due
index), with sync; only then does it resolve the futures, in one hop back to each loop
(`call_soon_threadsafe`). So "the future resolved" always means "the write is on disk", many
concurrent writers share one pair of fsyncs (group commit), and a crash between the two
commits leaves bodies without envelopes (never acknowledged; recover() deletes them), never an
envelope without its body.

Removing a message goes the other way: its envelope and recipients leave in the meta commit;
its body is deleted afterwards, in the next data transaction (the next batch that stores a
body, or a commit of its own as soon as the writer has nothing else to do). A crash in between
again leaves only orphan bodies. Bodies of a batch whose meta commit failed after its data
commit succeeded are orphans too, and are deleted the same way.

Failure isolation: an operation that hits MapFullError (in either environment) gets SpoolFull
and the batch is retried without it, so one huge message cannot fail its neighbours. A failed
commit in either environment fails the whole batch with SpoolFailed and marks the spool
unwritable until a later batch commits. Operations must therefore be re-runnable: a pure
function of the transactions' contents.

LMDB (and py-lmdb) release the GIL while copying values and while writing and syncing, so a
30 MB body costs the event loop nothing but the enqueue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb
import structlog

from .errors import SpoolError, SpoolFailed, SpoolFull
from .trim import Trimmer
from .writes import WriteEnv, WriteTxns, delete_bodies

T = TypeVar("T")
_Waiter = asyncio.Future[Any] | concurrent.futures.Future[Any]

log = structlog.get_logger("mtad.spool")


Apply = Callable[[WriteTxns], Any]
RECLAIM_KEY = b"reclaim"
"""A key in the data environment's main (unnamed) table, rewritten by Writer._reclaim."""


class _Op:
    __slots__ = ("apply", "enqueued", "loop", "waiter")

    def __init__(self, apply: Apply | None, waiter: _Waiter, loop: asyncio.AbstractEventLoop | None) -> None:
        self.apply = apply  # None marks the stop request
        self.waiter = waiter
        self.loop = loop  # None: a concurrent.futures.Future, settled directly from the thread
        self.enqueued = time.monotonic()


_Settlement = tuple[_Op, Any, BaseException | None]


class Writer:
    """The group-commit writer thread of the spool's two LMDB environments."""

    def __init__(self, meta_env: WriteEnv, data_env: WriteEnv, bodies: lmdb._Database, *,
                 linger: float, max_batch: int, trim_path: str = "") -> None:
        """`trim_path`: the data environment's file, whose mapped pages are dropped from the
        resident set as it grows (trim.py); empty: no trimming."""
        if max_batch < 1 or linger < 0:
            raise ValueError("commit_max_batch must be >= 1 and commit_linger >= 0")
        self._meta_env = meta_env
        self._data_env = data_env
        self._bodies = bodies
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
        self._doomed: set[bytes] = set()
        """Bodies to delete in the next data transaction: their envelopes are gone (or were
        never committed). Writer thread only."""
        self._retry_purge = True
        self._data_freed = False
        """A data commit deleted bodies since the last reclaim commit (see _reclaim)."""
        self._thread = threading.Thread(target=self._run, name="mtad-spool-writer", daemon=True)
        self.commits = 0
        self._trimmer = Trimmer(trim_path) if trim_path else None
        """Batches committed so far (each one synced commit per environment it changed)."""
        self.committed_ops = 0
        """Operations made durable so far (committed_ops / commits = operations per commit)."""

    def start(self) -> None:
        self._thread.start()

    @property
    def writable(self) -> bool:
        return not self._closed and not self._dead and self._healthy and self._thread.is_alive()

    def submit(self, apply: Callable[[WriteTxns], T]) -> asyncio.Future[T]:
        """Queue a write; the future resolves after the synced commit holding it. Loop thread only."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(_Op(apply, future, loop))
        return future

    def run_blocking(self, apply: Callable[[WriteTxns], T]) -> T:
        """Queue a write and wait for its commit, from a thread that may block (startup, tests)."""
        waiter: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(_Op(apply, waiter, None))
        return waiter.result()

    async def stop(self) -> None:
        """Let every queued write commit, delete the bodies still due for deletion, end the thread."""
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
                    if self._doomed:
                        self._purge()
                    self._settle([(stop, None, None)])
                    return
        except BaseException:
            # A bug, not an I/O error (those are settled per batch): fail everything still
            # waiting so that no caller hangs, and report the spool unwritable from now on.
            log.exception("spool.writer_crashed")
            self._die()

    def _next_op(self) -> _Op:
        """The next queued op; while none is waiting, first delete the bodies due for deletion
        (once: after a failure they wait for the next batch, not a busy loop of retries)."""
        if self._doomed and self._retry_purge:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                self._purge()
        return self._queue.get()

    def _purge(self) -> None:
        doomed = frozenset(self._doomed)
        try:
            txn = self._data_env.begin(write=True)
            try:
                delete_bodies(txn, self._bodies, doomed)
            except BaseException:
                txn.abort()
                raise
            txn.commit()
        except (lmdb.Error, OSError) as exc:
            self._retry_purge = False
            log.error("spool.body_delete_failed", error=str(exc), bodies=len(doomed))
            return
        self._doomed -= doomed
        self._data_freed = True
        self._trim()

    def _reclaim(self) -> bool:
        """Make the pages of the last body deletions usable, when there were any: LMDB reuses
        the pages a transaction freed only from the second transaction after it, and a write
        that does not fit aborts instead of committing. So after deleting bodies to make room
        (`queue delete --all` on a full spool), every big message would be refused until some
        other data commit came along. One small commit (a counter in the data environment's
        main table) moves past that; then the refused write is tried once more."""
        if not self._data_freed:
            return False
        self._data_freed = False
        try:
            txn = self._data_env.begin(write=True)
            try:
                txn.put(RECLAIM_KEY, str(self.commits).encode("ascii"))
            except BaseException:
                txn.abort()
                raise
            txn.commit()
        except (lmdb.Error, OSError) as exc:
            log.error("spool.reclaim_failed", error=str(exc))
            return False
        return True

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
        first = self._next_op()
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
        wrote_data = False
        while pending:
            txns = WriteTxns(self._meta_env, self._data_env, self._bodies, frozenset(self._doomed))
            results: list[Any] = []
            failure: tuple[int, BaseException] | None = None
            for index, op in enumerate(pending):
                try:
                    results.append(op.apply(txns))  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - handed to the op's caller
                    failure = (index, _translate(exc))
                    break
            if failure is not None:
                txns.abort()
                failed_at, error = failure
                if isinstance(error, SpoolFull):
                    if txns.doomed and self._doomed:
                        # This transaction was also deleting bodies, and LMDB does not reuse
                        # pages freed in the same transaction: commit the deletions alone
                        # first, so that _reclaim can make their pages usable.
                        self._purge()
                    if self._reclaim():
                        continue  # the same ops again, now with the freed pages usable
                settled.append((pending[failed_at], None, error))
                pending = pending[:failed_at] + pending[failed_at + 1 :]
                continue
            try:
                self._commit_both(txns)
            except lmdb.MapFullError:
                # Rare: the free-page list itself did not fit. Commit one op at a time so only
                # the ops that really do not fit fail.
                if self._reclaim():
                    continue
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
            self._retry_purge = True
            wrote_data = txns.data_begun
            self.commits += 1
            self.committed_ops += len(pending)
            settled.extend((op, result, None) for op, result in zip(pending, results))
            break
        self._settle(settled)
        if wrote_data:
            self._trim()

    def _trim(self) -> None:
        """After a data commit: drop body pages from the resident set now and then (trim.py)."""
        if self._trimmer is not None:
            try:
                self._trimmer.after_commit(os.stat(self._trimmer.path).st_size)
            except OSError:
                pass

    def _commit_both(self, txns: WriteTxns) -> None:
        """Data first, then meta, each synced; raises what the failed commit raised. Keeps the
        doomed set right whatever fails: bodies deleted by a committed data transaction leave
        it, bodies of a data commit whose meta commit failed join it."""
        if txns.data_begun:
            try:
                txns.data.commit()
            except BaseException:
                txns.meta.abort()
                raise
            self._doomed -= txns.doomed
            self._data_freed = self._data_freed or bool(txns.doomed)
        try:
            txns.meta.commit()
        except BaseException:
            if txns.added:
                # Committed bodies whose envelopes never will be: orphans from now on.
                self._doomed.update(txns.added)
                log.warning("spool.orphan_bodies", bodies=len(txns.added), action="deleted in the next data commit")
            raise
        self._doomed.update(txns.dropped)

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
