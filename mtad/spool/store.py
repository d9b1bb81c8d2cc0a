"""Spool: the queue's only storage, as the rest of mtad sees it (see the package docstring).

Writes are encoded here, on the caller's thread, and handed to the one writer thread
(writer.py), which makes them durable in group commits. Reads use short read transactions on
the caller's thread: no I/O wait beyond the page cache, and no transaction held across a
yield, so a long listing never pins old pages. Every read but read_body stays in the meta
environment; read_body alone opens the data environment (bodies).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence

import lmdb

from mtad.records import Envelope, QueuedMessage, Recipient

from . import codec, recovery, writes
from .env import Tables, close_tables, open_tables, recipient_values
from .errors import CorruptRecord, SpoolError
from .recovery import RecoveryReport
from .writer import Writer

_PAGE = 512
"""Envelopes read per read transaction by messages()."""


class Spool:
    """An open spool directory. Create with Spool.open(); end with `await spool.close()`."""

    def __init__(self, tables: Tables, writer: Writer, clock: Callable[[], float]) -> None:
        self._tables = tables
        self._writer = writer
        self._clock = clock
        self._closed = False

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        map_size: int = 8 * 1024**3,
        commit_linger: float = 0.002,
        commit_max_batch: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> Spool:
        """Open (creating if needed) the spool in `directory` and start its writer thread.

        `clock` gives unix time for the hold/release state decisions (tests pass a fake).
        """
        tables = open_tables(directory, map_size=map_size)
        try:
            writer = Writer(tables.env, tables.data_env, tables.body,
                            linger=commit_linger, max_batch=commit_max_batch,
                            trim_path=os.path.join(tables.directory, codec.DATA_DIR, "data.mdb"))
        except BaseException:
            close_tables(tables)
            raise
        writer.start()
        return cls(tables, writer, clock)

    @property
    def directory(self) -> str:
        return self._tables.directory

    @property
    def commits(self) -> int:
        """Group commits since open (fewer than the writes; each is one synced commit per
        environment it changed: bodies first, then envelopes)."""
        return self._writer.commits

    @property
    def committed_writes(self) -> int:
        """Write operations made durable since open."""
        return self._writer.committed_ops

    def writable(self) -> bool:
        return not self._closed and self._writer.writable

    def recover(self) -> RecoveryReport:
        self._check_open()
        return recovery.recover(self._tables, self._writer)

    # --- writes: each returns after the synced commit that holds it ------------------------

    async def store(self, envelope: Envelope, recipients: Sequence[Recipient], body: bytes | memoryview) -> None:
        """Write one message. The body is passed to LMDB as is (no copy on the loop): the
        caller must not change a mutable buffer until this returns."""
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        mkey = codec.message_key(envelope.id)
        values = [codec.encode(r) for r in recipients]
        due = codec.message_due_key(envelope, recipients, mkey)
        apply = functools.partial(writes.put_message, self._tables, mkey, codec.encode(envelope), values, body, due)
        await self._writer.submit(apply)

    async def set_held(self, queue_id: str, held: bool) -> bool:
        apply = functools.partial(writes.set_held, self._tables, codec.message_key(queue_id), held, self._clock())
        return await self._writer.submit(apply)

    async def delete(self, queue_id: str) -> bool:
        return await self._writer.submit(functools.partial(writes.delete, self._tables, codec.message_key(queue_id)))

    async def update_recipients(self, queue_id: str, recipients: Sequence[Recipient]) -> bool:
        """Replace the message's per-recipient state. An empty list removes the message: its
        last recipients were delivered, bounced or expired. False when no such message."""
        mkey = codec.message_key(queue_id)
        values = [codec.encode(r) for r in recipients]
        apply = functools.partial(writes.update_recipients, self._tables, mkey, list(recipients), values)
        return await self._writer.submit(apply)

    async def close(self) -> None:
        """Let pending writes commit, stop the writer thread, close LMDB. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._writer.stop()
        close_tables(self._tables)

    # --- reads: short read transactions on the caller's thread -----------------------------

    def get(self, queue_id: str) -> QueuedMessage | None:
        mkey = codec.message_key(queue_id)
        with self._read() as txn:
            raw = txn.get(mkey, db=self._tables.envelope)
            if raw is None:
                return None
            rows = recipient_values(txn, self._tables, mkey)
        return QueuedMessage(
            envelope=codec.decode_envelope(raw),
            recipients=[codec.decode_recipient(value) for _, value in rows],
        )

    def read_body(self, queue_id: str) -> bytes | None:
        """The message's body, or None when no such message is queued.

        The envelope decides: a body whose envelope is gone (removed, its deletion not yet
        committed) or not yet there (a store between its two commits) is no message's body."""
        mkey = codec.message_key(queue_id)
        with self._read() as txn:
            if not txn.cursor(db=self._tables.envelope).set_key(mkey):
                return None
        with self._tables.data_env.begin() as txn:
            return txn.get(mkey, db=self._tables.body)

    def messages(self) -> Iterator[QueuedMessage]:
        """Every queued message in queue id (arrival) order, without bodies.

        Reads a page of envelopes per read transaction, so the listing may see messages stored
        or removed while it runs, but never the same message twice. Records that fail to decode
        (recover() moves them aside) are skipped.
        """
        after = b""
        while True:
            page: list[QueuedMessage] = []
            with self._read() as txn:
                cursor = txn.cursor(db=self._tables.envelope)
                positioned = cursor.set_range(after) if after else cursor.first()
                if positioned and after and cursor.key() == after:
                    positioned = cursor.next()
                recipients = txn.cursor(db=self._tables.recipient)
                while positioned and len(page) < _PAGE:
                    mkey = cursor.key()
                    after = mkey
                    message = _join(mkey, cursor.value(), recipients)
                    if message is not None:
                        page.append(message)
                    positioned = cursor.next()
            yield from page
            if not positioned:
                return

    def count(self) -> int:
        """Messages queued now (O(1): the envelope table's entry count)."""
        with self._read() as txn:
            return int(txn.stat(self._tables.envelope)["entries"])

    def due(self, until: float, limit: int = 1000,
            after: tuple[float, str] | None = None) -> list[tuple[float, str]]:
        """(due time, queue id) of messages due at or before `until`, earliest first; with
        `after`, only entries that sort after that (due, queue id) pair (to page on).

        The due index holds one entry per message that is not held: the earliest next attempt
        of its recipients (arrival time for "as soon as possible")."""
        end = codec.due_key(until, b"\xff")
        found: list[tuple[float, str]] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self._tables.due)
            if after is None:
                positioned = cursor.first()
            else:
                start = codec.resume_key(after[0], after[1])
                positioned = cursor.set_range(start)
                if positioned and cursor.key() == start:
                    positioned = cursor.next()
            while positioned:
                key = cursor.key()
                if key > end or len(found) >= limit:
                    break
                found.append(codec.split_due_key(key))
                positioned = cursor.next()
        return found

    def _read(self) -> lmdb.Transaction[bytes]:
        self._check_open()
        return self._tables.env.begin()

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError("spool is closed")


def _join(mkey: bytes, raw: bytes, recipients: lmdb.Cursor[bytes]) -> QueuedMessage | None:
    prefix = codec.recipient_prefix(mkey)
    rows: list[Recipient] = []
    try:
        envelope = codec.decode_envelope(raw)
        if recipients.set_range(prefix):
            for key, value in recipients:
                if not key.startswith(prefix):
                    break
                rows.append(codec.decode_recipient(value))
    except CorruptRecord:
        return None
    return QueuedMessage(envelope=envelope, recipients=rows)
