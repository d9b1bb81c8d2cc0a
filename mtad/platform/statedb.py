"""The SQLite side of the tenant directory: `<spool_dir>/state.db`, its schema and migrations.

aiosqlite (one thread per connection) in WAL mode with foreign keys on. `synchronous=FULL`:
changes are rare operator actions, and an operator who was shown a new API key or told
"tenant added" must find it there after a power cut; FULL syncs the WAL at every commit, which
costs a few ms per admin change and nothing on the hot path (lookups read memory).

The file holds password and key hashes, so it is created mode 0600 (WAL and shm files take
the database file's mode). The schema version lives in the `meta` table; a database written
by a newer mtad is refused rather than guessed at.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

SCHEMA_VERSION = 2

# Migration N brings the schema from version N-1 to N. Statements are separated by ';'.
_MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    disabled INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    per_second REAL NOT NULL DEFAULT 0,
    per_hour INTEGER NOT NULL DEFAULT 0,
    per_day INTEGER NOT NULL DEFAULT 0,
    max_message_size INTEGER NOT NULL DEFAULT 0,
    max_recipients INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tenant_domains (
    domain TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE
);
CREATE INDEX tenant_domains_tenant ON tenant_domains(tenant);
CREATE TABLE smtp_users (
    username TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX smtp_users_tenant ON smtp_users(tenant);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    secret_hash TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_tenant ON api_keys(tenant)
""",
    # Suppression list, soft-bounce counts and the sent log for bounce attribution (platform.suppress,
    # platform.sentlog). tenant '' is the global list.
    2: """
CREATE TABLE suppressions (
    tenant TEXT NOT NULL,
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL,
    PRIMARY KEY (tenant, address)
);
CREATE TABLE soft_bounces (
    tenant TEXT NOT NULL,
    address TEXT NOT NULL,
    time REAL NOT NULL,
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX soft_bounces_address ON soft_bounces(tenant, address, time);
CREATE TABLE sent (
    queue_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX sent_time ON sent(time)
""",
}

_SET_VERSION = (
    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

Statement = tuple[str, Sequence[Any]]


class StateDbError(Exception):
    """state.db cannot be opened or used; str() names the file and the cause."""


class StateDb:
    """One connection to state.db; every write is one IMMEDIATE transaction, committed."""

    def __init__(self, path: str, db: aiosqlite.Connection) -> None:
        self.path = path
        self._db = db

    @classmethod
    async def open(cls, path: str) -> StateDb:
        if not os.path.exists(path):
            try:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise StateDbError(f"{path}: {exc.strerror or exc}") from None
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateDbError(f"{path}: {exc}") from None
        state = cls(path, db)
        try:
            mode = await state.scalar("PRAGMA journal_mode=WAL")
            if str(mode).lower() != "wal":
                raise StateDbError(f"{path}: cannot switch to WAL (journal mode {mode})")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            await state._migrate()
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise StateDbError(f"{path}: {exc}") from None
            raise
        return state

    async def close(self) -> None:
        await self._db.close()

    async def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._db.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def write(self, statements: Iterable[Statement]) -> None:
        """Run `statements` in one transaction and commit it (synced: synchronous=FULL)."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                await self._db.execute(sql, params)
            await self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                await self._db.execute("ROLLBACK")
            raise

    async def _migrate(self) -> None:
        await self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        found = await self.scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(found) if found is not None else 0
        if version > SCHEMA_VERSION:
            raise StateDbError(
                f"{self.path}: schema version {version} is newer than this mtad's ({SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            statements: list[Statement] = [
                (sql.strip(), ()) for sql in _MIGRATIONS[target].split(";") if sql.strip()
            ]
            statements.append((_SET_VERSION, (str(target),)))
            await self.write(statements)

    async def load(self) -> dict[str, list[sqlite3.Row]]:
        """Every row of every table, for the in-memory directory."""
        return {
            "tenants": await self.rows(
                "SELECT name, disabled, created, per_second, per_hour, per_day, max_message_size,"
                " max_recipients FROM tenants ORDER BY name"
            ),
            "domains": await self.rows("SELECT domain, tenant FROM tenant_domains"),
            "users": await self.rows(
                "SELECT username, tenant, password_hash, created, disabled FROM smtp_users"
            ),
            "keys": await self.rows("SELECT id, tenant, secret_hash, created, revoked FROM api_keys"),
        }
