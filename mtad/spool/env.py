"""The spool's LMDB environment: directory, process lock, named tables and schema version.

I/O at the edge: this module creates the directory, opens LMDB and checks the schema; the
rest of the spool works with the `Tables` it returns. Small helpers that read one message's
records inside a transaction live here too, because reads and writes both use them.

Trust: the directory is ours (mode 0700); its contents may be damaged by a crash of the
machine or an operator, which is what recover() is for, not this module.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

import lmdb

from . import codec
from .errors import SpoolError

LOCK_FILE = "mtad-spool.lock"
"""Held (flock) by the one process that has the spool open; two mtads on one spool would
deliver every message twice."""

MAX_READERS = 1024


@dataclass(frozen=True, slots=True)
class Tables:
    """An open spool environment and a handle on each named table."""

    env: lmdb.Environment
    meta: lmdb._Database
    envelope: lmdb._Database
    body: lmdb._Database
    recipient: lmdb._Database
    due: lmdb._Database
    corrupt: lmdb._Database
    lock_fd: int
    directory: str

    def by_name(self, name: str) -> lmdb._Database:
        db: lmdb._Database = getattr(self, name)
        return db


def open_tables(directory: str, *, map_size: int) -> Tables:
    """Create (0700) or open the spool directory and its LMDB environment.

    Writes the schema version into a new spool; refuses a spool written by newer code. Raises
    SpoolError naming the directory when anything is wrong.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SpoolError(f"spool directory {directory}: {exc.strerror}") from None
    if not os.path.isdir(directory):
        raise SpoolError(f"spool directory {directory}: not a directory")
    lock_fd = _lock_directory(directory)
    try:
        env = lmdb.open(
            directory,
            map_size=map_size,
            subdir=True,
            sync=True,
            metasync=True,
            writemap=False,
            lock=True,
            mode=0o600,
            max_readers=MAX_READERS,
            max_dbs=len(codec.TABLES) + 2,
            # MDB_NORDAHEAD (madvise RANDOM): a cold start reads only the pages it needs, not
            # the bodies around them. (It does not stop the kernel's fault-around on a warm
            # page cache; see spool/README.md, "Memory".)
            readahead=False,
        )
    except lmdb.Error as exc:
        os.close(lock_fd)
        raise SpoolError(f"spool directory {directory}: cannot open LMDB: {exc}") from None
    try:
        tables = Tables(
            env=env,
            **{name: env.open_db(name.encode("ascii")) for name in codec.TABLES},
            lock_fd=lock_fd,
            directory=directory,
        )
        _check_schema(tables)
    except BaseException:
        env.close()
        os.close(lock_fd)
        raise
    return tables


def close_tables(tables: Tables) -> None:
    tables.env.close()
    os.close(tables.lock_fd)


def _lock_directory(directory: str) -> int:
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SpoolError(f"spool directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SpoolError(f"spool directory {directory}: in use by another process") from None
        raise SpoolError(f"spool directory {directory}: cannot lock: {exc.strerror}") from None
    return fd


def _check_schema(tables: Tables) -> None:
    # Runs before the writer thread exists, so this one write at open is still single-writer.
    with tables.env.begin(write=True) as txn:
        raw = txn.get(codec.SCHEMA_KEY, db=tables.meta)
        if raw is None:
            txn.put(codec.SCHEMA_KEY, str(codec.SCHEMA_VERSION).encode("ascii"), db=tables.meta)
            return
    try:
        version = int(raw.decode("ascii"))
    except ValueError:
        raise SpoolError(f"spool directory {tables.directory}: unreadable schema version {raw!r}") from None
    if version > codec.SCHEMA_VERSION:
        raise SpoolError(
            f"spool directory {tables.directory} has schema version {version}; "
            f"this mtad understands up to {codec.SCHEMA_VERSION} (upgrade mtad, or point it at another spool)"
        )


def recipient_values(txn: lmdb.Transaction[bytes], tables: Tables, mkey: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the message's recipients, in index order."""
    prefix = codec.recipient_prefix(mkey)
    cursor = txn.cursor(db=tables.recipient)
    found: list[tuple[bytes, bytes]] = []
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            found.append((key, value))
    return found
