"""The tenant directory: tenants, sending domains, SMTP users and API keys, in SQLite and memory.

Everything is loaded from `state.db` (mtad.platform.statedb) at start into an in-memory table;
the hot path (`authenticate`, `tenant_for_api_key`, `get`, `owner_of`) reads only memory. Every
change is committed to SQLite first and applied to memory after, under one lock, so memory never
shows what the database does not hold.

Secrets (mtad.platform.secrets): scrypt runs in a bounded thread pool of its own, never on the
event loop. An unknown username costs the same scrypt as a wrong password (a dummy hash with the
same parameters is checked). Successful checks are remembered for `VERIFIED_TTL` seconds as an
HMAC of the secret (VerifiedCache), so an API client or an SMTP client that authenticates on every
connection does not pay scrypt each time; every hit is re-checked against the current record,
so disabling, deleting or revoking takes effect at once.

Trust: usernames, passwords and API keys come from strangers (SMTP AUTH, HTTP Authorization);
they are shape-checked before lookup and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import os
import secrets as stdlib_secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import msgspec

from mtad.platform import secrets
from mtad.platform.model import (
    MAX_PASSWORD_LENGTH,
    ApiKeyInfo,
    Quota,
    SmtpUserInfo,
    Tenant,
    TenantError,
    check_domains,
    check_password,
    check_quota,
    check_tenant_name,
    check_username,
    conflict,
    printable,
)
from mtad.platform.quotas import QuotaTracker
from mtad.platform.statedb import StateDb, StateDbError

__all__ = ["ApiKeyInfo", "Quota", "SmtpUserInfo", "StateDbError", "Tenant", "TenantDirectory", "TenantError"]

T = TypeVar("T")

VERIFIED_TTL = 60.0
# Threads that run scrypt. Each hash holds a core for ~50 ms; more threads than cores would only
# queue in the kernel instead of here, and would take CPU time from the event loop's thread.
HASH_WORKERS = max(1, min(4, (os.cpu_count() or 1)))

HASH_NICENESS = 10

_QUOTA_FIELDS = ("per_second", "per_hour", "per_day", "max_message_size", "max_recipients")
_INSERT_TENANT = (
    "INSERT INTO tenants (name, disabled, created, per_second, per_hour, per_day, max_message_size,"
    " max_recipients) VALUES (?, 0, ?, ?, ?, ?, ?, ?)"
)
_INSERT_USER = (
    "INSERT INTO smtp_users (username, tenant, password_hash, created, disabled) VALUES (?, ?, ?, ?, 0)"
)


class _User(msgspec.Struct, frozen=True, kw_only=True):
    username: str
    tenant: str
    password_hash: str
    created: float
    disabled: bool = False


class _Key(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    secret_hash: str
    created: float
    revoked: float = 0


class TenantDirectory:
    """Open with `await TenantDirectory.open(path)`; close with `await directory.close()`."""

    def __init__(self, db: StateDb, executor: ThreadPoolExecutor, quotas: QuotaTracker,
                 clock: Callable[[], float]) -> None:
        self._db = db
        self._executor = executor
        self.quotas = quotas
        self._clock = clock
        self._lock = asyncio.Lock()
        self._tenants: dict[str, Tenant] = {}
        self._owners: dict[str, str] = {}  # domain -> tenant name
        self._users: dict[str, _User] = {}
        self._keys: dict[str, _Key] = {}
        self._dummy_hash = ""
        self._user_cache = secrets.VerifiedCache(VERIFIED_TTL)
        self._key_cache = secrets.VerifiedCache(VERIFIED_TTL)

    @classmethod
    async def open(cls, path: str, *, quotas: QuotaTracker | None = None, hash_workers: int = HASH_WORKERS,
                   clock: Callable[[], float] = time.time) -> TenantDirectory:
        """Open (creating or migrating) `path` and load everything; StateDbError when it cannot."""
        db = await StateDb.open(path)
        executor = ThreadPoolExecutor(max_workers=hash_workers, thread_name_prefix="mtad-hash",
                                      initializer=_lower_priority)
        directory = cls(db, executor, quotas or QuotaTracker(), clock)
        try:
            await directory._load()
            directory._dummy_hash = await directory._run(secrets.hash_secret, stdlib_secrets.token_urlsafe(16))
        except BaseException:
            await directory.close()
            raise
        return directory

    async def close(self) -> None:
        await self._db.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def _load(self) -> None:
        rows = await self._db.load()
        domains: dict[str, set[str]] = {}
        for domain, tenant in rows["domains"]:
            domains.setdefault(tenant, set()).add(domain)
            self._owners[domain] = tenant
        for name, disabled, created, *quota in rows["tenants"]:
            self._tenants[name] = Tenant(
                name=name, domains=frozenset(domains.get(name, ())), disabled=bool(disabled),
                quota=Quota(**dict(zip(_QUOTA_FIELDS, quota, strict=True))), created=created,
            )
        for username, tenant, password_hash, created, disabled in rows["users"]:
            self._users[username] = _User(username=username, tenant=tenant, password_hash=password_hash,
                                          created=created, disabled=bool(disabled))
        for key_id, tenant, secret_hash, created, revoked in rows["keys"]:
            self._keys[key_id] = _Key(id=key_id, tenant=tenant, secret_hash=secret_hash, created=created,
                                      revoked=revoked)

    # -- the hot path: memory only ------------------------------------------------------------

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    def owner_of(self, domain: str) -> Tenant | None:
        """The tenant owning `domain` (or a parent of it), whatever its state; None when nobody."""
        name = domain.lower().removesuffix(".")
        while name:
            owner = self._owners.get(name)
            if owner is not None:
                return self._tenants.get(owner)
            name = name.partition(".")[2]
        return None

    def _active(self, tenant_name: str) -> Tenant | None:
        tenant = self._tenants.get(tenant_name)
        return tenant if tenant is not None and not tenant.disabled else None

    async def authenticate(self, username: str, password: str) -> Tenant | None:
        """The tenant of an enabled SMTP user whose password this is, else None.

        Unknown users are checked against a dummy hash, so they take as long as wrong passwords.
        """
        try:
            name = check_username(username)
        except TenantError:
            name = ""
        if len(password) > MAX_PASSWORD_LENGTH:
            return None
        cache_secret = f"{name}\x00{password}"
        user = self._users.get(name)
        hit = self._user_cache.get(cache_secret)
        if user is not None and hit == (name, user.password_hash):
            return None if user.disabled else self._active(user.tenant)
        stored = user.password_hash if user is not None else self._dummy_hash
        matched = await self._run(secrets.verify_secret, password, stored)
        user = self._users.get(name)  # re-read: it may have changed while we hashed
        if not matched or user is None or user.password_hash != stored:
            return None
        self._user_cache.put(cache_secret, name, stored)
        return None if user.disabled else self._active(user.tenant)

    async def tenant_for_api_key(self, key: str) -> Tenant | None:
        """The tenant of a valid, unrevoked API key, else None. Key ids are public, so an
        unknown or revoked id is answered at once; a known id costs one scrypt (or a cache hit)."""
        key_id = secrets.parse_api_key(key)
        record = self._keys.get(key_id) if key_id is not None else None
        if record is None or record.revoked:
            return None
        if self._key_cache.get(key) != (record.id, record.secret_hash):
            stored = record.secret_hash
            if not await self._run(secrets.verify_secret, key, stored):
                return None
            self._key_cache.put(key, record.id, stored)
            record = self._keys.get(record.id)
            if record is None or record.revoked or record.secret_hash != stored:
                return None
        return self._active(record.tenant)

    # -- changes: SQLite first, then memory ---------------------------------------------------

    def _tenant(self, name: str) -> Tenant:
        tenant = self._tenants.get(name)
        if tenant is None:
            raise TenantError("not_found", f"no such tenant: {printable(name)}")
        return tenant

    def _check_free(self, domains: Iterable[str], tenant: str) -> None:
        for domain in sorted(domains):
            taken = conflict(domain, self._owners, tenant)
            if taken is not None:
                owner = self._owners[taken]
                raise TenantError("domain_taken", f"{domain} overlaps {taken} of tenant {owner}")

    async def add_tenant(self, name: str, domains: Iterable[str], quota: Quota | None = None) -> Tenant:
        check_tenant_name(name)
        wanted = check_domains(domains)
        quota = check_quota(quota or Quota())
        async with self._lock:
            if name in self._tenants:
                raise TenantError("exists", f"tenant {name} exists")
            self._check_free(wanted, name)
            tenant = Tenant(name=name, domains=wanted, disabled=False, quota=quota, created=self._clock())
            await self._db.write([
                (_INSERT_TENANT, (name, tenant.created, *(getattr(quota, f) for f in _QUOTA_FIELDS))),
                *(("INSERT INTO tenant_domains (domain, tenant) VALUES (?, ?)", (d, name)) for d in wanted),
            ])
            self._tenants[name] = tenant
            self._owners.update(dict.fromkeys(wanted, name))
            return tenant

    async def set_tenant(self, name: str, *, quota: Quota | None = None, domains: Iterable[str] | None = None,
                         add_domains: Iterable[str] = (), remove_domains: Iterable[str] = ()) -> Tenant:
        """Change a tenant's quota and/or domains: `domains` replaces the list, then
        `add_domains` and `remove_domains` apply."""
        new_quota = check_quota(quota) if quota is not None else None
        replace = check_domains(domains) if domains is not None else None
        adding, removing = check_domains(add_domains), check_domains(remove_domains)
        async with self._lock:
            tenant = self._tenant(name)
            wanted = ((replace if replace is not None else tenant.domains) | adding) - removing
            self._check_free(wanted - tenant.domains, name)
            gone, new = tenant.domains - wanted, wanted - tenant.domains
            quota = new_quota or tenant.quota
            await self._db.write([
                ("UPDATE tenants SET " + ", ".join(f"{f} = ?" for f in _QUOTA_FIELDS) + " WHERE name = ?",
                 (*(getattr(quota, f) for f in _QUOTA_FIELDS), name)),
                *(("DELETE FROM tenant_domains WHERE domain = ?", (d,)) for d in gone),
                *(("INSERT INTO tenant_domains (domain, tenant) VALUES (?, ?)", (d, name)) for d in new),
            ])
            for domain in gone:
                del self._owners[domain]
            self._owners.update(dict.fromkeys(new, name))
            updated = msgspec.structs.replace(tenant, domains=frozenset(wanted), quota=quota)
            self._tenants[name] = updated
            return updated

    async def set_disabled(self, name: str, disabled: bool) -> Tenant:
        """Disable (no AUTH, no API key opens it) or enable a tenant."""
        async with self._lock:
            tenant = self._tenant(name)
            await self._db.write([("UPDATE tenants SET disabled = ? WHERE name = ?", (int(disabled), name))])
            updated = msgspec.structs.replace(tenant, disabled=disabled)
            self._tenants[name] = updated
            return updated

    async def disable_tenant(self, name: str) -> Tenant:
        return await self.set_disabled(name, True)

    async def enable_tenant(self, name: str) -> Tenant:
        return await self.set_disabled(name, False)

    async def delete_tenant(self, name: str) -> None:
        """Delete a tenant with its domains, SMTP users and API keys (foreign-key cascade)."""
        async with self._lock:
            tenant = self._tenant(name)
            await self._db.write([("DELETE FROM tenants WHERE name = ?", (name,))])
            del self._tenants[name]
            for domain in tenant.domains:
                self._owners.pop(domain, None)
            self._users = {k: u for k, u in self._users.items() if u.tenant != name}
            self._keys = {k: r for k, r in self._keys.items() if r.tenant != name}
            self.quotas.forget(name)

    async def add_smtp_user(self, tenant: str, username: str, password: str) -> SmtpUserInfo:
        name = check_username(username)
        check_password(password)
        self._tenant(tenant)
        password_hash = await self._run(secrets.hash_secret, password)
        async with self._lock:
            self._tenant(tenant)
            if name in self._users:
                raise TenantError("exists", f"SMTP user {name} exists")
            user = _User(username=name, tenant=tenant, password_hash=password_hash, created=self._clock())
            await self._db.write([
                (_INSERT_USER, (name, tenant, password_hash, user.created)),
            ])
            self._users[name] = user
            return _user_info(user)

    async def delete_smtp_user(self, username: str) -> None:
        name = username.lower()
        async with self._lock:
            if name not in self._users:
                raise TenantError("not_found", f"no such SMTP user: {printable(username)}")
            await self._db.write([("DELETE FROM smtp_users WHERE username = ?", (name,))])
            del self._users[name]

    async def set_smtp_user_disabled(self, username: str, disabled: bool) -> SmtpUserInfo:
        """Disable (AUTH fails as for a wrong password) or enable one SMTP user."""
        name = username.lower()
        async with self._lock:
            user = self._users.get(name)
            if user is None:
                raise TenantError("not_found", f"no such SMTP user: {printable(username)}")
            await self._db.write([("UPDATE smtp_users SET disabled = ? WHERE username = ?", (int(disabled), name))])
            user = self._users[name] = msgspec.structs.replace(user, disabled=disabled)
            return _user_info(user)

    def list_smtp_users(self, tenant: str | None = None) -> list[SmtpUserInfo]:
        if tenant is not None:
            self._tenant(tenant)
        users = (u for u in self._users.values() if tenant is None or u.tenant == tenant)
        return sorted(map(_user_info, users), key=lambda u: (u.tenant, u.username))

    async def create_api_key(self, tenant: str) -> str:
        """A new API key for `tenant`: returned once, stored as its id and an scrypt hash."""
        self._tenant(tenant)
        key_id, key = secrets.new_api_key()
        secret_hash = await self._run(secrets.hash_secret, key)
        async with self._lock:
            self._tenant(tenant)
            record = _Key(id=key_id, tenant=tenant, secret_hash=secret_hash, created=self._clock())
            await self._db.write([
                ("INSERT INTO api_keys (id, tenant, secret_hash, created, revoked) VALUES (?, ?, ?, ?, 0)",
                 (key_id, tenant, secret_hash, record.created)),
            ])
            self._keys[key_id] = record
            return key

    async def revoke_api_key(self, key_id: str) -> ApiKeyInfo:
        """Revoke a key (kept, listed as revoked); revoking twice keeps the first time."""
        async with self._lock:
            record = self._keys.get(key_id)
            if record is None:
                raise TenantError("not_found", f"no such API key: {printable(key_id)}")
            if not record.revoked:
                revoked = self._clock()
                await self._db.write([("UPDATE api_keys SET revoked = ? WHERE id = ?", (revoked, key_id))])
                record = self._keys[key_id] = msgspec.structs.replace(record, revoked=revoked)
            return _key_info(record)

    def list_api_keys(self, tenant: str) -> list[ApiKeyInfo]:
        self._tenant(tenant)
        return sorted((_key_info(k) for k in self._keys.values() if k.tenant == tenant),
                      key=lambda k: (k.created, k.id))


def _lower_priority() -> None:
    """Run this hash thread at nice +10: on Linux niceness is per thread, so when the cores are
    busy hashing, the event loop's thread still gets the CPU as soon as it wakes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)
    except (OSError, AttributeError):
        pass  # not Linux, or not allowed: only the loop's latency under load suffers


def _user_info(user: _User) -> SmtpUserInfo:
    return SmtpUserInfo(username=user.username, tenant=user.tenant, created=user.created, disabled=user.disabled)


def _key_info(key: _Key) -> ApiKeyInfo:
    return ApiKeyInfo(id=key.id, tenant=key.tenant, created=key.created, revoked=key.revoked)
