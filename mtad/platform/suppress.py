"""The suppression list: addresses we never send to again, globally or per tenant, and its policy.

Entries live in SQLite (`suppressions` in `<spool_dir>/state.db`, mtad.platform.statedb) and in
an in-memory table that the hot path reads: `suppressed(tenant, address)` is one or two dict
lookups (the tenant's list, then the global list ""), no I/O. Memory holds only what that
question needs (the reason and expiry); listings read SQLite. Every change is committed to SQLite
first and applied to memory after, under one lock, so memory never shows what the database does
not hold, and the caller that awaited a change may acknowledge it (acknowledged means durable).

Policy (`[suppression]`): a hard bounce suppresses at once; soft bounces are counted in
`soft_bounces` rows and suppress once `soft_bounces` of them fall within `soft_window`; a
complaint suppresses. `add(..., reason="unsubscribe")` is the path for unsubscribes (a later
issue). Entries may expire (`expires`, unix time); an expired entry no longer applies and is
purged by `purge`.

Addresses are compared as local@domain with the domain lowercased (IDNA A-labels) and the
local part kept as given (RFC 5321 2.4: only the receiving host may fold its case).

Trust: addresses come from operators (mtactl), from our own delivery outcomes and from bounce
reports that strangers send (already attributed to one of our messages by a signed VERP token).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from mtad.address import AddressError, parse_mailbox
from mtad.config.schema import Duration
from mtad.config.schema import Suppression as SuppressionSettings
from mtad.platform.statedb import StateDb
from mtad.platform.suppressviews import (
    COMPLAINT,
    HARD_BOUNCE,
    SOFT_BOUNCES,
    Suppression,
)

log = structlog.get_logger("mtad.suppress")

MAX_REASON = 200
_LOGGED_ADDS = 20  # an import of more is logged as one line
_UPSERT = (
    "INSERT INTO suppressions (tenant, address, reason, source, created, expires) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, address) DO UPDATE SET reason = excluded.reason, source = excluded.source,"
    " created = excluded.created, expires = excluded.expires"
)


class SuppressionError(Exception):
    """A refused change; `code` is invalid or not_found, `message` safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Policy:
    """`[suppression]` as numbers."""

    hard_bounce: bool = True
    soft_bounces: int = 3
    soft_window: float = 7 * 86400.0
    complaint: bool = True
    default_expiry: float = 0.0

    @classmethod
    def from_config(cls, settings: SuppressionSettings) -> Policy:
        return cls(hard_bounce=settings.hard_bounce, soft_bounces=settings.soft_bounces,
                   soft_window=float(settings.soft_window), complaint=settings.complaint,
                   default_expiry=float(settings.default_expiry))

    def expiry(self, now: float) -> float | None:
        return now + self.default_expiry if self.default_expiry else None


def normalize_address(text: str) -> str:
    """`Local@Example.ORG` -> `Local@example.org`; SuppressionError(invalid) when not an address."""
    candidate = text.strip().removeprefix("<").removesuffix(">")
    try:
        mailbox = parse_mailbox(candidate, smtputf8=True)
    except AddressError:
        raise SuppressionError("invalid", "not a valid address") from None
    if mailbox.literal:
        raise SuppressionError("invalid", "address literals cannot be suppressed")
    return str(mailbox)


def parse_expiry(text: str, now: float, policy: Policy) -> float | None:
    """An entry's expiry from "30d" ("" takes the default; "never" and "0" are forever)."""
    value = text.strip().lower()
    if not value:
        return policy.expiry(now)
    if value == "never":
        return None
    try:
        seconds = float(Duration.parse(value))
    except ValueError:
        raise SuppressionError("invalid", 'expires: expected a duration such as "30d", or "never"') from None
    return now + seconds if seconds else None


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON or not reason.isprintable():
        raise SuppressionError("invalid", f"a reason is 1-{MAX_REASON} printable characters")
    return reason


class SuppressionList:
    """Open with `await SuppressionList.open(path, policy)`; close with `await close()`."""

    def __init__(self, db: StateDb, policy: Policy, clock: Callable[[], float]) -> None:
        self._db = db
        self.policy = policy
        self._clock = clock
        self._lock = asyncio.Lock()
        # "tenant\0address" -> reason (no expiry) or (reason, expires): ~150 bytes an entry, so a
        # list of millions fits; the rest of a row (source, created) is read from SQLite when listed.
        self._active: dict[str, str | tuple[str, float]] = {}

    @classmethod
    async def open(cls, path: str, policy: Policy | None = None, *,
                   clock: Callable[[], float] = time.time) -> SuppressionList:
        db = await StateDb.open(path)
        suppressions = cls(db, policy or Policy(), clock)
        try:
            rows = await db.rows("SELECT tenant, address, reason, expires FROM suppressions")
        except BaseException:
            await db.close()
            raise
        for tenant, address, reason, expires in rows:
            suppressions._remember(tenant, address, reason, expires)
        return suppressions

    async def close(self) -> None:
        await self._db.close()

    def _remember(self, tenant: str, address: str, reason: str, expires: float | None) -> None:
        reason = sys.intern(reason)  # a handful of distinct reasons, shared by every entry
        self._active[f"{tenant}\0{address}"] = reason if expires is None else (reason, expires)

    # -- the hot path: memory only ------------------------------------------------------------

    def suppressed(self, tenant: str, address: str) -> str | None:
        """The reason `address` is suppressed for `tenant`'s mail (its own list, then the global
        list ""), or None: ingest's question, asked for every recipient."""
        for key in (f"{tenant}\0{address}", f"\0{address}") if tenant else (f"\0{address}",):
            found = self._active.get(key)
            if found is None:
                continue
            if isinstance(found, str):
                return found
            if found[1] > self._clock():
                return found[0]
        return None

    def __len__(self) -> int:
        return len(self._active)

    async def entries(self, tenant: str | None = None) -> list[Suppression]:
        """Every entry in force (of one list, or of all), by list and domain."""
        sql = "SELECT tenant, address, reason, source, created, expires FROM suppressions WHERE"
        params: list[object] = [self._clock()]
        sql += " (expires IS NULL OR expires > ?)"
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        rows = await self._db.rows(sql, params)
        found = [Suppression(tenant=t, address=a, reason=r, source=s, created=c, expires=e)
                 for t, a, r, s, c, e in rows]
        return sorted(found, key=lambda e: (e.tenant, e.address.rpartition("@")[2], e.address))

    # -- changes: SQLite first, then memory ---------------------------------------------------

    async def add(self, address: str, *, tenant: str = "", reason: str, source: str = "",
                  expires: float | None = None) -> Suppression:
        """Add or replace one entry (normalising the address); committed when it returns."""
        (entry,) = await self.add_many([(normalize_address(address), check_reason(reason), expires)],
                                       tenant=tenant, source=source)
        return entry

    async def add_many(self, items: Iterable[tuple[str, str, float | None]], *, tenant: str,
                       source: str) -> list[Suppression]:
        """Add (address, reason, expires) entries, already checked, in one transaction."""
        now = self._clock()
        entries = [Suppression(tenant=tenant, address=address, reason=reason, source=source, created=now,
                               expires=expires) for address, reason, expires in items]
        if not entries:
            return []
        async with self._lock:
            await self._db.write([(_UPSERT, (e.tenant, e.address, e.reason, e.source, e.created, e.expires))
                                  for e in entries])
            for entry in entries:
                self._remember(entry.tenant, entry.address, entry.reason, entry.expires)
        if len(entries) <= _LOGGED_ADDS:
            for entry in entries:
                log.info("suppression.added", tenant=entry.tenant, address=entry.address, reason=entry.reason,
                         source=entry.source)
        else:
            log.info("suppression.added", tenant=tenant, entries=len(entries), source=source)
        return entries

    async def remove(self, address: str, *, tenant: str = "") -> str:
        """Lift one entry; the address as it was listed. SuppressionError(not_found) when none."""
        normalized = normalize_address(address)
        key = f"{tenant}\0{normalized}"
        async with self._lock:
            if key not in self._active:
                raise SuppressionError("not_found", "no such suppression")
            await self._db.write([("DELETE FROM suppressions WHERE tenant = ? AND address = ?",
                                   (tenant, normalized))])
            del self._active[key]
        log.info("suppression.removed", tenant=tenant, address=normalized)
        return normalized

    async def purge(self, now: float | None = None) -> int:
        """Drop expired entries and soft bounces older than the window; the number of entries gone."""
        when = self._clock() if now is None else now
        async with self._lock:
            gone = [k for k, v in self._active.items() if not isinstance(v, str) and v[1] <= when]
            await self._db.write([
                ("DELETE FROM suppressions WHERE expires IS NOT NULL AND expires <= ?", (when,)),
                ("DELETE FROM soft_bounces WHERE time < ?", (when - self.policy.soft_window,)),
            ])
            for key in gone:
                self._active.pop(key, None)
        return len(gone)

    # -- the policy ---------------------------------------------------------------------------

    async def record_bounce(self, tenant: str, address: str, bounce_class: str, source: str) -> Suppression | None:
        """A failed recipient of `tenant`'s mail: suppress it when the policy says so (the entry
        is returned), count a soft bounce; nothing for other classes or an already suppressed one."""
        if (normalized := self._not_yet_suppressed(tenant, address)) is None:
            return None
        address = normalized
        policy = self.policy
        now = self._clock()
        if bounce_class == "hard" and policy.hard_bounce:
            return (await self.add_many([(address, HARD_BOUNCE, policy.expiry(now))], tenant=tenant,
                                        source=source))[0]
        if bounce_class != "soft" or policy.soft_bounces <= 0:
            return None
        async with self._lock:
            await self._db.write([("INSERT INTO soft_bounces (tenant, address, time, source) VALUES (?, ?, ?, ?)",
                                   (tenant, address, now, source))])
            count = await self._db.scalar(
                "SELECT COUNT(*) FROM soft_bounces WHERE tenant = ? AND address = ? AND time >= ?",
                (tenant, address, now - policy.soft_window))
        if int(count or 0) < policy.soft_bounces:
            return None
        (entry,) = await self.add_many([(address, SOFT_BOUNCES, policy.expiry(now))], tenant=tenant, source=source)
        async with self._lock:
            await self._db.write([("DELETE FROM soft_bounces WHERE tenant = ? AND address = ?", (tenant, address))])
        return entry

    async def record_complaint(self, tenant: str, address: str, source: str) -> Suppression | None:
        if not self.policy.complaint or (normalized := self._not_yet_suppressed(tenant, address)) is None:
            return None
        (entry,) = await self.add_many([(normalized, COMPLAINT, self.policy.expiry(self._clock()))], tenant=tenant,
                                       source=source)
        return entry

    def _not_yet_suppressed(self, tenant: str, address: str) -> str | None:
        """`address` normalized; None when it is no address or already suppressed for `tenant`."""
        try:
            address = normalize_address(address)
        except SuppressionError:
            return None
        return address if self.suppressed(tenant, address) is None else None

    async def soft_count(self, tenant: str, address: str) -> int:
        """Soft bounces counted for `address` in `tenant`'s mail within the window (tests, status)."""
        since = self._clock() - self.policy.soft_window
        count = await self._db.scalar("SELECT COUNT(*) FROM soft_bounces WHERE tenant = ? AND address = ?"
                                      " AND time >= ?", (tenant, normalize_address(address), since))
        return int(count or 0)
