"""The tenant directory against a real SQLite file in tmp_path; secrets; the tenant admin routes.

Covers: round trips and reopen, hashes (salted, self-describing, never the secret), AUTH and
API-key checks (wrong, unknown, disabled, revoked, deleted), domain ownership and uniqueness,
and that 100 concurrent AUTH checks leave the event loop responsive (the figure is printed).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from mtad.events import Counters
from mtad.http.admin import build_admin_app
from mtad.http.server import HttpServer
from mtad.platform import secrets
from mtad.platform.model import Quota, Tenant, TenantError
from mtad.platform.statedb import StateDbError
from mtad.platform.tenants import TenantDirectory

PASSWORD = "correct horse battery staple"


@pytest_asyncio.fixture
async def directory(tmp_path: Path) -> AsyncIterator[TenantDirectory]:
    opened = await TenantDirectory.open(str(tmp_path / "state.db"))
    try:
        yield opened
    finally:
        await opened.close()


async def reopen(directory: TenantDirectory, tmp_path: Path) -> TenantDirectory:
    await directory.close()
    return await TenantDirectory.open(str(tmp_path / "state.db"))


# -- secrets -------------------------------------------------------------------------------


def test_hashes_are_salted_self_describing_and_never_hold_the_secret() -> None:
    first, second = secrets.hash_secret(PASSWORD), secrets.hash_secret(PASSWORD)
    assert first != second
    for stored in (first, second):
        assert PASSWORD not in stored and PASSWORD.encode().hex() not in stored
        assert stored.startswith(f"scrypt${2**14}$8$1$")
        assert secrets.verify_secret(PASSWORD, stored)
        assert not secrets.verify_secret(PASSWORD + "x", stored)
    n, r, p, salt, digest = secrets.parse_hash(first)
    assert (n, r, p, len(salt), len(digest)) == (2**14, 8, 1, 16, 32)


@pytest.mark.parametrize("stored", [
    "", "scrypt$16384$8$1$AAAA", "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
    "scrypt$16383$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # n not a power of two
    f"scrypt${2**24}$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # 16 GiB: refused, not computed
    "scrypt$16384$8$1$!!!!$" + "A" * 43,
])
def test_malformed_or_absurd_hashes_never_verify(stored: str) -> None:
    assert not secrets.verify_secret(PASSWORD, stored)


def test_scrypt_cost_is_measured() -> None:
    started = time.perf_counter()
    for _ in range(3):
        secrets.hash_secret(PASSWORD)
    per_hash = (time.perf_counter() - started) / 3
    print(f"\nscrypt n=2**14 r=8 p=1: {per_hash * 1000:.1f} ms per hash")
    assert per_hash > 0.005  # a hash that costs nothing is no defence


def test_api_key_shape() -> None:
    key_id, key = secrets.new_api_key()
    assert key.startswith(f"mtad_{key_id}_") and len(key) == 5 + 16 + 1 + 43
    assert secrets.parse_api_key(key) == key_id
    for bad in ("", key + "x", key.replace("mtad_", "mtda_"), key[:-1], f"mtad_{key_id}"):
        assert secrets.parse_api_key(bad) is None


def test_verified_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache = secrets.VerifiedCache(ttl=10, max_entries=3, clock=lambda: now[0])
    cache.put("a", "owner-a", "hash-a")
    assert cache.get("a") == ("owner-a", "hash-a") and cache.get("b") is None
    now[0] = 10
    assert cache.get("a") is None
    for name in "bcde":
        cache.put(name, name, name)
    assert len(cache) == 3 and cache.get("b") is None and cache.get("e") == ("e", "e")


# -- the directory -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_everything_survives_a_reopen(directory: TenantDirectory, tmp_path: Path) -> None:
    quota = Quota(per_second=2.5, per_hour=100, per_day=1000, max_message_size=10_000_000, max_recipients=50)
    added = await directory.add_tenant("acme", ["Acme.TEST", "mail.other.test."], quota)
    assert added.domains == {"acme.test", "mail.other.test"}
    await directory.add_tenant("beta", ["beta.test"])
    await directory.disable_tenant("beta")
    await directory.add_smtp_user("acme", "Bob@Acme.test", PASSWORD)
    key = await directory.create_api_key("acme")
    revoked_key = await directory.create_api_key("acme")
    await directory.revoke_api_key(secrets.parse_api_key(revoked_key) or "")

    directory = await reopen(directory, tmp_path)
    try:
        acme = directory.get("acme")
        assert acme is not None and acme.quota == quota and acme.domains == {"acme.test", "mail.other.test"}
        assert acme.created == added.created and not acme.disabled
        beta = directory.get("beta")
        assert beta is not None and beta.disabled
        assert [t.name for t in directory.tenants()] == ["acme", "beta"]
        assert [u.username for u in directory.list_smtp_users()] == ["bob@acme.test"]
        assert await directory.authenticate("bob@acme.test", PASSWORD) == acme
        assert await directory.tenant_for_api_key(key) == acme
        assert await directory.tenant_for_api_key(revoked_key) is None
        assert [bool(k.revoked) for k in directory.list_api_keys("acme")] == [False, True]
    finally:
        await directory.close()


@pytest.mark.asyncio
async def test_state_db_is_private_versioned_and_holds_no_secret(directory: TenantDirectory, tmp_path: Path) -> None:
    await directory.add_tenant("acme", ["acme.test"])
    await directory.add_smtp_user("acme", "bob", PASSWORD)
    key = await directory.create_api_key("acme")
    path = tmp_path / "state.db"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert PASSWORD.encode() not in raw and key.encode() not in raw and key[-43:].encode() not in raw
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)  # 2: suppressions
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        (stored,) = db.execute("SELECT password_hash FROM smtp_users").fetchone()
    assert stored.startswith("scrypt$") and secrets.verify_secret(PASSWORD, stored)


@pytest.mark.asyncio
async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    with pytest.raises(StateDbError, match="schema version 99 is newer"):
        await TenantDirectory.open(str(path))


@pytest.mark.asyncio
async def test_authenticate_refusals(directory: TenantDirectory) -> None:
    await directory.add_tenant("acme", ["acme.test"])
    await directory.add_smtp_user("acme", "bob", PASSWORD)
    await directory.add_smtp_user("acme", "carol", PASSWORD)
    acme = directory.get("acme")
    assert await directory.authenticate("BOB", PASSWORD) == acme  # usernames ignore case
    assert await directory.authenticate("bob", PASSWORD.upper()) is None
    assert await directory.authenticate("nobody", PASSWORD) is None
    assert await directory.authenticate("bad name", PASSWORD) is None
    assert await directory.authenticate("bob", "x" * 5000) is None
    await directory.set_smtp_user_disabled("carol", True)
    assert await directory.authenticate("carol", PASSWORD) is None
    await directory.disable_tenant("acme")
    assert await directory.authenticate("bob", PASSWORD) is None  # the cached success is re-checked
    await directory.enable_tenant("acme")
    assert await directory.authenticate("bob", PASSWORD) is not None
    await directory.delete_smtp_user("bob")
    assert await directory.authenticate("bob", PASSWORD) is None
    await directory.delete_tenant("acme")
    assert await directory.authenticate("carol", PASSWORD) is None
    assert directory.list_smtp_users() == []


@pytest.mark.asyncio
async def test_unknown_users_cost_as_much_as_wrong_passwords(directory: TenantDirectory) -> None:
    await directory.add_tenant("acme", ["acme.test"])
    await directory.add_smtp_user("acme", "bob", PASSWORD)

    async def timed(username: str) -> float:
        started = time.perf_counter()
        assert await directory.authenticate(username, "wrong password!") is None
        return time.perf_counter() - started

    wrong = [await timed("bob") for _ in range(5)]
    unknown = [await timed(f"nobody{i}") for i in range(5)]
    print(f"\nwrong password {statistics.median(wrong) * 1000:.1f} ms, "
          f"unknown user {statistics.median(unknown) * 1000:.1f} ms")
    # Both run one scrypt; a lookup that skipped it would be ~1000 times faster.
    assert min(unknown) > 0.4 * min(wrong)
    assert min(wrong) > 0.4 * min(unknown)


@pytest.mark.asyncio
async def test_api_keys(directory: TenantDirectory) -> None:
    await directory.add_tenant("acme", ["acme.test"])
    await directory.add_tenant("beta", ["beta.test"])
    key = await directory.create_api_key("acme")
    other = await directory.create_api_key("beta")
    key_id = secrets.parse_api_key(key) or ""
    assert await directory.tenant_for_api_key(key) == directory.get("acme")
    assert await directory.tenant_for_api_key(other) == directory.get("beta")
    # Right id, wrong secret; another key's secret under this id; garbage.
    assert await directory.tenant_for_api_key(key[:-4] + "AAAA") is None
    assert await directory.tenant_for_api_key(key[:22] + other[22:]) is None
    assert await directory.tenant_for_api_key("Bearer nonsense") is None
    # A verified key is answered from the cache: no scrypt the second time.
    started = time.perf_counter()
    for _ in range(100):
        assert await directory.tenant_for_api_key(key) is not None
    assert time.perf_counter() - started < 0.5
    await directory.disable_tenant("acme")
    assert await directory.tenant_for_api_key(key) is None
    await directory.enable_tenant("acme")
    info = await directory.revoke_api_key(key_id)
    assert info.revoked and (await directory.revoke_api_key(key_id)).revoked == info.revoked
    assert await directory.tenant_for_api_key(key) is None
    with pytest.raises(TenantError) as refused:
        await directory.create_api_key("nobody")
    assert refused.value.code == "not_found"


@pytest.mark.asyncio
async def test_domains_belong_to_one_tenant(directory: TenantDirectory) -> None:
    await directory.add_tenant("acme", ["acme.test"])

    async def refused(code: str, coro: object) -> None:
        with pytest.raises(TenantError) as caught:
            await coro  # type: ignore[misc]
        assert caught.value.code == code, caught.value.message

    await refused("exists", directory.add_tenant("acme", ["new.test"]))
    await refused("domain_taken", directory.add_tenant("evil", ["ACME.test"]))
    await refused("domain_taken", directory.add_tenant("evil", ["mail.acme.test"]))  # inside acme's
    await refused("domain_taken", directory.add_tenant("evil", ["x.test", "acme.test"]))
    await directory.add_tenant("sub", ["bounce.example.test"])
    await refused("domain_taken", directory.add_tenant("evil", ["example.test"]))  # contains sub's
    await refused("invalid", directory.add_tenant("evil", ["test"]))
    await refused("invalid", directory.add_tenant("evil", ["bad domain.test"]))
    await refused("invalid", directory.add_tenant("Bad Name", ["ok.test"]))
    await refused("invalid", directory.add_tenant("evil", ["ok.test"], Quota(per_hour=-1)))
    await refused("domain_taken", directory.set_tenant("sub", add_domains=["acme.test"]))
    await refused("not_found", directory.set_tenant("nobody", add_domains=["n.test"]))
    assert directory.get("evil") is None
    # A tenant may add its own subdomains; a removed domain is free for another tenant.
    acme = await directory.set_tenant("acme", add_domains=["mail.acme.test", "acme2.test"])
    assert acme.domains == {"acme.test", "mail.acme.test", "acme2.test"}
    await directory.set_tenant("acme", remove_domains=["acme2.test"])
    await directory.add_tenant("other", ["acme2.test"])
    owner = directory.owner_of("deep.MAIL.acme.test.")
    assert owner is not None and owner.name == "acme"
    assert directory.owner_of("unowned.test") is None
    await directory.delete_tenant("acme")
    await directory.add_tenant("evil", ["acme.test"])


def test_owns_is_exact_or_a_subdomain() -> None:
    tenant = Tenant(name="acme", domains=frozenset({"acme.test", "xn--bcher-kva.test"}), disabled=False,
                    quota=Quota(), created=0)
    for domain in ("acme.test", "ACME.Test.", "mail.acme.test", "a.b.acme.test", "bücher.test", "x.xn--bcher-kva.test"):
        assert tenant.owns(domain), domain
    for domain in ("evilacme.test", "acme.test.evil", "test", "", "other.test", "acme.test..", "bad\udcff.test"):
        assert not tenant.owns(domain), domain


@pytest.mark.asyncio
async def test_smtp_user_rules(directory: TenantDirectory) -> None:
    await directory.add_tenant("acme", ["acme.test"])
    for username, password, code in (("bob", "short", "invalid"), ("bob", "a" * 11, "invalid"),
                                     ("b o b", PASSWORD, "invalid"), ("bob", "line\nbreak pass", "invalid"),
                                     ("bob", PASSWORD, None), ("BOB", PASSWORD, "exists")):
        try:
            await directory.add_smtp_user("acme", username, password)
            assert code is None
        except TenantError as exc:
            assert exc.code == code
    with pytest.raises(TenantError):
        await directory.add_smtp_user("nobody", "carol", PASSWORD)


@pytest.mark.asyncio
async def test_100_auth_checks_do_not_stall_the_loop(directory: TenantDirectory) -> None:
    """The issue's figure: 100 AUTH attempts in flight add at most a few ms to another session."""
    await directory.add_tenant("acme", ["acme.test"])
    await directory.add_smtp_user("acme", "bob", PASSWORD)
    stop = asyncio.Event()
    overshoots: list[float] = []

    async def probe() -> None:
        # What a concurrent session sees: how late a 1 ms timer fires.
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            overshoots.append(time.perf_counter() - started - 0.001)

    probing = asyncio.create_task(probe())
    await asyncio.sleep(0.2)
    baseline = sorted(overshoots)
    overshoots.clear()
    started = time.perf_counter()
    # Half right, half wrong passwords (a brute-force run): none may be answered from the cache.
    results = await asyncio.gather(*(directory.authenticate("bob", PASSWORD if i % 2 else f"guess {i:08}")
                                     for i in range(100)))
    elapsed = time.perf_counter() - started
    stop.set()
    await probing
    assert sum(r is not None for r in results) == 50
    loaded = sorted(overshoots)

    def p99(values: list[float]) -> float:
        return values[int(len(values) * 0.99)]

    print(f"\n100 AUTH checks in {elapsed:.2f} s; 1 ms timer overshoot: idle p99 {p99(baseline) * 1000:.2f} ms "
          f"max {baseline[-1] * 1000:.2f} ms; during AUTH p99 {p99(loaded) * 1000:.2f} ms "
          f"max {loaded[-1] * 1000:.2f} ms over {len(loaded)} wake-ups")
    assert len(loaded) > 100  # the loop kept turning while the hashes ran
    # Hashing on the loop would delay every wake-up by a whole scrypt (~50 ms); a loaded CI
    # machine may slow the idle loop too, so the bar rises with the idle figure.
    assert p99(loaded) < max(0.010, 5 * p99(baseline))


# -- the admin routes ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_admin_routes_map_errors_and_never_echo_secrets(directory: TenantDirectory, tmp_path: Path) -> None:
    from mtad.spool import Spool

    spool = Spool.open(str(tmp_path / "spool"), map_size=16 * 1024**2, commit_linger=0.0, commit_max_batch=8)
    server = HttpServer()
    app = build_admin_app(spool=spool, counters=Counters(), token="tok", started=time.time(), tenants=directory)
    await server.start(app, "127.0.0.1:0")
    base = f"http://{server.bound()}/admin/v1"
    auth = {"Authorization": "Bearer tok"}
    try:
        async with aiohttp.ClientSession(headers=auth) as http:
            async def call(method: str, path: str, body: object = None) -> tuple[int, object]:
                async with http.request(method, base + path, json=body) as response:
                    return response.status, await response.json()

            status, body = await call("POST", "/tenants", {"name": "acme", "domains": ["acme.test"],
                                                           "quota": {"per_hour": 10}})
            assert status == 201 and body["quota"]["per_hour"] == 10 and body["usage"] == {"hour": 0, "day": 0}
            assert (await call("POST", "/tenants", {"name": "acme", "domains": ["x.test"]}))[0] == 409
            assert (await call("POST", "/tenants", {"name": "b", "domains": ["acme.test"]}))[1] == {
                "error": {"code": "domain_taken", "message": "acme.test overlaps acme.test of tenant acme"}}
            assert (await call("POST", "/tenants", {"name": 5}))[1]["error"]["code"] == "invalid"
            assert (await call("GET", "/tenants/nobody"))[0] == 404
            status, body = await call("PATCH", "/tenants/acme", {"quota": {"per_day": 7}, "add_domains": ["a2.test"]})
            assert status == 200 and body["quota"]["per_day"] == 7 and body["quota"]["per_hour"] == 10
            assert body["domains"] == ["a2.test", "acme.test"]
            status, body = await call("POST", "/smtp-users", {"tenant": "acme", "username": "bob", "password": PASSWORD})
            assert status == 201 and PASSWORD not in str(body)
            status, body = await call("POST", "/tenants/acme/apikeys")
            assert status == 201 and await directory.tenant_for_api_key(body["key"]) is not None
            status, listed = await call("GET", "/tenants/acme/apikeys")
            assert body["key"] not in str(listed) and listed[0]["id"] == body["id"]
            assert (await call("DELETE", f"/apikeys/{body['id']}"))[1]["revoked"] > 0
            assert (await call("DELETE", "/apikeys/0000000000000000"))[0] == 404
            assert (await call("GET", "/smtp-users?tenant=acme"))[1][0]["username"] == "bob"
            assert (await call("DELETE", "/tenants/acme"))[1] == {"deleted": "acme"}
        async with aiohttp.ClientSession() as anonymous, anonymous.get(base + "/tenants") as response:
            assert response.status == 401
    finally:
        await server.stop()
        await spool.close()
