"""The spool's write operations, each a re-runnable function of one batch's write transactions.

The writer thread calls these (bound with functools.partial) inside a group commit, with the
batch's WriteTxns: `txns.meta` for envelopes, recipients, the due index and `corrupt`, and
txns.put_body / txns.delete_body for the body table in the data environment (the writer orders
those commits; see writer.py). The callers in store.py encode records on the loop first, so the
thread only copies bytes. Every operation keeps the due index in step with the records it
changes. `hold_recipients` is the pure state transition behind hold and release. WriteTxns (the
pair of transactions an operation gets, with the bookkeeping of bodies added and removed) lives
here too, so that operations and the writer share one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias

import lmdb
import msgspec

from mtad.records import Envelope, Recipient

from . import codec
from .env import Tables, recipient_values
from .errors import CorruptRecord, SpoolError

if TYPE_CHECKING:
    Txn: TypeAlias = lmdb.Transaction[bytes]
Body = bytes | memoryview


class WriteEnv(Protocol):
    """What the writer needs of an LMDB environment (tests wrap a real one to inject faults)."""

    def begin(self, *, write: bool) -> lmdb.Transaction[bytes]: ...


class WriteTxns:
    """The write transactions of one batch: `meta` (begun at once) and the body table's
    (begun on first use, so a batch that touches no body leaves the data environment alone).

    Operations put bodies with put_body and remove them with delete_body, never directly: the
    writer needs to know which bodies a batch added (orphans should its meta commit fail) and
    must delete bodies only after the meta commit that removed their envelopes.
    """

    def __init__(self, meta_env: WriteEnv, data_env: WriteEnv, bodies: lmdb._Database,
                 doomed: frozenset[bytes]) -> None:
        self.meta = meta_env.begin(write=True)
        self._data_env = data_env
        self._data: lmdb.Transaction[bytes] | None = None
        self.bodies = bodies
        self.doomed = doomed
        """Bodies (of messages already removed) that the data transaction deletes when it begins."""
        self.added: list[bytes] = []
        self.dropped: list[bytes] = []

    @property
    def data(self) -> lmdb.Transaction[bytes]:
        if self._data is None:
            self._data = self._data_env.begin(write=True)
            delete_bodies(self._data, self.bodies, self.doomed)
        return self._data

    @property
    def data_begun(self) -> bool:
        return self._data is not None

    def put_body(self, key: bytes, value: Body) -> None:
        put_packed(self.data, self.bodies, key, value)
        self.added.append(key)

    def delete_body(self, key: bytes) -> None:
        """Delete the body once the meta transaction (which removed its envelope) committed."""
        self.dropped.append(key)

    def abort(self) -> None:
        self.meta.abort()
        if self._data is not None:
            self._data.abort()


def delete_bodies(txn: lmdb.Transaction[bytes], bodies: lmdb._Database, keys: frozenset[bytes]) -> None:
    """Delete in key order: each leaf page is then copied once and emptied, and the copy is
    reused for the next leaf (in hash order every leaf is copied while still full, and a big
    delete grows the file by the pages it frees)."""
    for key in sorted(keys):
        txn.delete(key, db=bodies)


def hold_recipients(recipients: Sequence[Recipient], held: bool, now: float) -> list[Recipient]:
    """Recipients after an operator's hold or release.

    Hold parks every recipient ("held"). Release returns held recipients to "queued", or to
    "deferred" when their next attempt is still in the future, or to "scheduled" when it is in
    the future and none was made yet (a send_at time). Recipients that were not held are left
    as they are.
    """
    if held:
        return [msgspec.structs.replace(r, state="held") for r in recipients]
    released = []
    for r in recipients:
        if r.state == "held":
            if r.next_attempt > now:
                r = msgspec.structs.replace(r, state="deferred" if r.attempts else "scheduled")
            else:
                r = msgspec.structs.replace(r, state="queued")
        released.append(r)
    return released


def put_message(
    tables: Tables,
    mkey: bytes,
    envelope: bytes,
    recipients: Sequence[bytes],
    body: Body,
    due: bytes | None,
    txns: WriteTxns,
) -> None:
    txn = txns.meta
    if not put_packed(txn, tables.envelope, mkey, envelope, overwrite=False):
        raise SpoolError(f"queue id {codec.queue_id_of(mkey)} is already in the spool")
    txns.put_body(mkey, body)
    for index, value in enumerate(recipients):
        put_packed(txn, tables.recipient, codec.recipient_key(mkey, index), value)
    if due is not None:
        put_packed(txn, tables.due, due, b"")


def put_packed(txn: Txn, db: lmdb._Database, key: bytes, value: Body, *, overwrite: bool = True) -> bool:
    """txn.put, with MDB_APPEND when the key sorts after every key of the table.

    Queue ids (and mostly due times) grow with arrival, so nearly every new key is the table's
    last. A plain put that fills the last page splits it, and LMDB's split moves the page's
    last record to the new page along with the new one: with records over a third of a page
    (a 1.3 KB body) every page is left holding one record, half empty. MDB_APPEND starts the
    new page with the new record alone and leaves the full page full. A key that does not sort
    last (a queue id from a session that took longer, a due time in the past) takes a plain put.
    Returns False when overwrite=False and the key exists.
    """
    cursor = txn.cursor(db=db)
    if not cursor.last() or key > cursor.key():
        return cursor.put(key, value, append=True)
    return txn.put(key, value, overwrite=overwrite, db=db)


def set_held(tables: Tables, mkey: bytes, held: bool, now: float, txns: WriteTxns) -> bool:
    txn = txns.meta
    loaded = _load(txn, tables, mkey)
    if loaded is None:
        return False
    envelope, recipients = loaded
    new_envelope = msgspec.structs.replace(envelope, held=held)
    new_recipients = hold_recipients(recipients, held, now)
    txn.put(mkey, codec.encode(new_envelope), db=tables.envelope)
    _replace_recipients(txn, tables, mkey, [codec.encode(r) for r in new_recipients])
    _move_due(txn, tables, codec.message_due_key(envelope, recipients, mkey),
              codec.message_due_key(new_envelope, new_recipients, mkey))
    return True


def update_recipients(
    tables: Tables, mkey: bytes, recipients: Sequence[Recipient], values: Sequence[bytes], txns: WriteTxns
) -> bool:
    """Replace the message's recipients; an empty list removes the message (nobody is left)."""
    txn = txns.meta
    loaded = _load(txn, tables, mkey)
    if loaded is None:
        return False
    envelope, old = loaded
    if not recipients:
        _remove(txns, tables, mkey, codec.message_due_key(envelope, old, mkey))
        return True
    _replace_recipients(txn, tables, mkey, values)
    _move_due(txn, tables, codec.message_due_key(envelope, old, mkey),
              codec.message_due_key(envelope, recipients, mkey))
    return True


def delete(tables: Tables, mkey: bytes, txns: WriteTxns) -> bool:
    txn = txns.meta
    try:
        loaded = _load(txn, tables, mkey)
    except CorruptRecord:
        # Cannot compute its due key: remove whatever is there and find the index entry by scan.
        _remove(txns, tables, mkey, _scan_due(txn, tables, mkey))
        return True
    if loaded is None:
        return False
    envelope, recipients = loaded
    _remove(txns, tables, mkey, codec.message_due_key(envelope, recipients, mkey))
    return True


def move_to_corrupt(tables: Tables, moves: Sequence[tuple[str, bytes]], txns: WriteTxns) -> int:
    """Move each (table, key) record to `corrupt` (in the meta environment), raw bytes untouched.
    A body is copied there now and deleted from the data environment after the meta commit, like
    any body whose envelope left. Returns how many moved."""
    moved = 0
    for table, key in moves:
        source = txns.data if table == codec.BODY else txns.meta
        value = source.get(key, db=tables.by_name(table))
        if value is None:
            continue
        txns.meta.put(codec.corrupt_key(table, key), value, db=tables.corrupt)
        if table == codec.BODY:
            txns.delete_body(key)
        else:
            txns.meta.delete(key, db=tables.by_name(table))
        moved += 1
    return moved


def delete_orphan_bodies(tables: Tables, keys: Sequence[bytes], txns: WriteTxns) -> None:
    """Delete bodies that have no envelope (recover() found them): safe in the data transaction
    itself, since no envelope refers to them."""
    for key in keys:
        txns.data.delete(key, db=tables.body)


def fix_due(tables: Tables, stale: Sequence[bytes], missing: Sequence[bytes], txn: Txn) -> None:
    """Bring the due index in step with the messages (recover() found it out of step)."""
    for key in stale:
        txn.delete(key, db=tables.due)
    for key in missing:
        put_packed(txn, tables.due, key, b"")


def _load(txn: Txn, tables: Tables, mkey: bytes) -> tuple[Envelope, list[Recipient]] | None:
    raw = txn.get(mkey, db=tables.envelope)
    if raw is None:
        return None
    envelope = codec.decode_envelope(raw)
    return envelope, [codec.decode_recipient(value) for _, value in recipient_values(txn, tables, mkey)]


def _replace_recipients(txn: Txn, tables: Tables, mkey: bytes, values: Sequence[bytes]) -> None:
    new_keys = [codec.recipient_key(mkey, index) for index in range(len(values))]
    # By existing key, not by count: recover() may have moved one recipient out of the middle.
    for key, _ in recipient_values(txn, tables, mkey):
        if key not in new_keys:
            txn.delete(key, db=tables.recipient)
    for key, value in zip(new_keys, values):
        txn.put(key, value, db=tables.recipient)


def _remove(txns: WriteTxns, tables: Tables, mkey: bytes, due: bytes | None) -> None:
    txn = txns.meta
    txn.delete(mkey, db=tables.envelope)
    txns.delete_body(mkey)
    for key, _ in recipient_values(txn, tables, mkey):
        txn.delete(key, db=tables.recipient)
    if due is not None:
        txn.delete(due, db=tables.due)


def _move_due(txn: Txn, tables: Tables, old: bytes | None, new: bytes | None) -> None:
    if old == new:
        return
    if old is not None:
        txn.delete(old, db=tables.due)
    if new is not None:
        put_packed(txn, tables.due, new, b"")


def _scan_due(txn: Txn, tables: Tables, mkey: bytes) -> bytes | None:
    for key in txn.cursor(db=tables.due).iternext(keys=True, values=False):
        if key[8:] == mkey:
            return key
    return None
