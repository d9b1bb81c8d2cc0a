"""The spool: LMDB tables holding every queued message, written by one group-commit thread.

The public surface (implemented in store.py and writer.py; everything else is internal):

    Spool.open(directory, *, map_size, commit_linger, commit_max_batch) -> Spool   (sync)
        Create the directory (0700) if needed, open the two LMDB environments (meta/: envelopes,
        recipients, due index; data/: bodies), check or write the schema version, start the
        writer thread. Raises SpoolError with a clear message when the directory is unusable,
        holds a version-1 spool, or the schema version is newer than this code.
    spool.recover() -> RecoveryReport                                               (sync)
        Scan every record once at start. Records that fail to decode move to the `corrupt`
        table (logged, never dropped, never fatal); bodies without an envelope (never
        acknowledged, or already removed) are deleted and logged. Returns counts.
    await spool.store(envelope, recipients, body) -> None
        Write one message. Returns only after the synced commit holding it; many concurrent
        calls share one commit. Raises SpoolFull (map full -> 452 4.3.1) or SpoolFailed
        (I/O error -> 451 4.3.0); in both cases nothing of the message is stored.
    await spool.set_held(queue_id, held) -> bool          False when no such message
    await spool.delete(queue_id) -> bool                  False when no such message
    await spool.update_recipients(queue_id, recipients) -> bool
    spool.get(queue_id) -> QueuedMessage | None           (sync, one read txn, cheap)
    spool.read_body(queue_id) -> bytes | None              (sync)
    spool.messages() -> Iterator[QueuedMessage]            (sync, queue id order, read txn)
    spool.count() -> int                                   (sync, messages queued now)
    spool.due(until, limit=1000) -> list[(due, queue_id)]  (sync, due index: earliest first)
    spool.writable() -> bool                               writer alive and last commit ok
    spool.commits, spool.committed_writes -> int           synced commits / writes they held
    await spool.close() -> None                            drain pending writes, stop the writer, close

Refinements: update_recipients with an empty list removes the message (its last recipients
left the queue). A held message has no due-index entry. One process at a time: Spool.open
takes an flock on the directory and raises SpoolError when another process has it.
spool/README.md describes the on-disk format for operators.
"""

from .errors import SpoolError, SpoolFailed, SpoolFull
from .recovery import RecoveryReport
from .store import Spool

__all__ = ["RecoveryReport", "Spool", "SpoolError", "SpoolFailed", "SpoolFull"]
