"""The spool's LMDB environments: directory, process lock, named tables and schema version.

I/O at the edge: this module creates the directory, opens the two LMDB environments and checks
the schema; the rest of the spool works with the `Tables` it returns. Bodies live in their own
environment (`data/`), everything else in `meta/`: a scan of envelopes, recipients or the due
index then maps only meta pages, so the process's RSS follows those small tables and not the
volume of queued mail (see spool/README.md, "Memory"). Small helpers that read one message's
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
    """The open spool environments and a handle on each named table.

    `env` is the meta environment (meta, envelope, recipient, due, corrupt); `data_env` holds
    the body table alone.
    """

    env: lmdb.Environment
    data_env: lmdb.Environment
    meta: lmdb._Database
    envelope: lmdb._Database
    recipient: lmdb._Database
    due: lmdb._Database
    corrupt: lmdb._Database
    body: lmdb._Database
    lock_fd: int
    directory: str

    def by_name(self, name: str) -> lmdb._Database:
        db: lmdb._Database = getattr(self, name)
        return db


def open_tables(directory: str, *, map_size: int) -> Tables:
    """Create (0700) or open the spool directory and its two LMDB environments.

    Writes the schema version into a new spool; refuses a spool written by newer code and a
    version-1 spool. `map_size` applies to each environment (address space, not disk). Raises
    SpoolError naming the directory when anything is wrong.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SpoolError(f"spool directory {directory}: {exc.strerror}") from None
    if not os.path.isdir(directory):
        raise SpoolError(f"spool directory {directory}: not a directory")
    lock_fd = _lock_directory(directory)
    opened: list[lmdb.Environment] = []
    try:
        _refuse_version_1(directory)
        opened.append(_open_env(directory, codec.META_DIR, map_size, len(codec.META_TABLES)))
        opened.append(_open_env(directory, codec.DATA_DIR, map_size, len(codec.DATA_TABLES)))
        meta_env, data_env = opened
        tables = Tables(
            env=meta_env,
            data_env=data_env,
            **{name: meta_env.open_db(name.encode("ascii")) for name in codec.META_TABLES},
            **{name: data_env.open_db(name.encode("ascii")) for name in codec.DATA_TABLES},
            lock_fd=lock_fd,
            directory=directory,
        )
        _check_schema(tables)
    except BaseException:
        for env in opened:
            env.close()
        os.close(lock_fd)
        raise
    return tables


def _open_env(directory: str, name: str, map_size: int, tables: int) -> lmdb.Environment:
    path = os.path.join(directory, name)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return lmdb.open(
            path,
            map_size=map_size,
            subdir=True,
            sync=True,
            metasync=True,
            writemap=False,
            lock=True,
            mode=0o600,
            max_readers=MAX_READERS,
            max_dbs=tables + 1,
            # MDB_NORDAHEAD (madvise RANDOM): a cold start reads only the pages it needs. (It
            # does not stop the kernel's fault-around on a warm page cache, which is why the
            # bodies have an environment, and a file, of their own.)
            readahead=False,
        )
    except OSError as exc:
        raise SpoolError(f"spool directory {path}: {exc.strerror}") from None
    except lmdb.Error as exc:
        raise SpoolError(f"spool directory {path}: cannot open LMDB: {exc}") from None


def _refuse_version_1(directory: str) -> None:
    if os.path.exists(os.path.join(directory, codec.V1_FILE)):
        raise SpoolError(
            f"spool directory {directory} holds a version-1 spool ({codec.V1_FILE} directly in it); "
            f"this mtad keeps its spool in {codec.META_DIR}/ and {codec.DATA_DIR}/ (version "
            f"{codec.SCHEMA_VERSION}) and does not convert: no release used version 1. Deliver or "
            f"delete that mail with the build that wrote it, or move {codec.V1_FILE} and lock.mdb "
            f"out of the directory, then start mtad again"
        )


def close_tables(tables: Tables) -> None:
    tables.env.close()
    tables.data_env.close()
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
