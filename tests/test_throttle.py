"""Brute-force protection of SMTP AUTH: the sliding windows (pure, on a hand-moved clock), then
the tarpit and the lockout over real sessions, and the loop staying responsive meanwhile."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time

import pytest
from support import Clock
from test_auth import PASSWORD, USER, plain_login, secure, submission, tenant_dir  # noqa: F401
from test_receive import Raw, tls_context  # noqa: F401

from mtad.config.schema import Duration, Limits
from mtad.platform.tenants import TenantDirectory
from mtad.receive.throttle import AuthThrottle, Decision, client_key

LIMITS = Limits(auth_delay_after=3, auth_lock_after=5, auth_window=Duration(60), auth_tarpit=Duration(1),
                auth_lockout=Duration(600), auth_tracked=100)


def test_delay_then_lock_then_release_after_the_lockout() -> None:
    throttle = AuthThrottle(LIMITS)
    now = 1000.0
    for _ in range(2):
        assert not throttle.failed("192.0.2.1", "alice", now)
    assert throttle.check("192.0.2.1", "alice", now) == Decision("ok")
    throttle.failed("192.0.2.1", "alice", now)
    assert throttle.check("192.0.2.1", "alice", now) == Decision("delay", 1.0)
    assert throttle.check("192.0.2.1", None, now) == Decision("delay", 1.0)  # LOGIN: the address alone
    assert throttle.check("198.51.100.7", "alice", now) == Decision("delay", 1.0)  # the username from elsewhere
    assert throttle.check("198.51.100.7", "bob", now) == Decision("ok")
    throttle.failed("192.0.2.1", "alice", now)
    assert throttle.failed("192.0.2.1", "alice", now)  # the fifth: locked
    assert throttle.check("192.0.2.1", "bob", now + 599).verdict == "locked"
    assert throttle.check("198.51.100.7", "ALICE", now + 599).verdict == "locked"  # case does not help
    assert throttle.check("192.0.2.1", "alice", now + 601) == Decision("ok")  # starts from zero


def test_the_window_slides() -> None:
    throttle = AuthThrottle(LIMITS)
    for t in (0.0, 30.0, 59.0):
        throttle.failed("192.0.2.1", None, t)
    assert throttle.check("192.0.2.1", None, 59.5).verdict == "delay"
    assert throttle.check("192.0.2.1", None, 60.5).verdict == "ok"  # the first fell out of the window
    for t in (61.0, 91.0, 92.0):
        assert not throttle.failed("192.0.2.1", None, t)  # at 92: 59, 61, 91, 92 (30 fell out)
    assert throttle.failed("192.0.2.1", None, 93.0)  # the fifth within 60 s


def test_success_forgets_the_username_not_the_address() -> None:
    throttle = AuthThrottle(LIMITS)
    for user in ("alice", "alice", "alice", "x"):
        throttle.failed("192.0.2.1", user, 0.0)
    throttle.succeeded("alice")
    assert throttle.check("198.51.100.7", "alice", 1.0).verdict == "ok"
    assert throttle.check("192.0.2.1", "alice", 1.0).verdict == "delay"


def test_ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    throttle = AuthThrottle(LIMITS)
    for host in range(5):
        throttle.failed(f"2001:db8:1:2::{host + 1}", None, 0.0)
    assert throttle.check("2001:db8:1:2::ffff", None, 1.0).verdict == "locked"
    assert throttle.check("2001:db8:1:3::1", None, 1.0).verdict == "ok"


def test_memory_is_bounded() -> None:
    throttle = AuthThrottle(LIMITS)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}", f"user{i}", 0.0)
    assert throttle.tracked() == (100, 100)
    # each key holds at most auth_lock_after timestamps however often it fails
    for t in range(50):
        throttle.failed("192.0.2.9", None, 1000.0 + t * 700)
    record = throttle._ips.get("192.0.2.9")
    assert record is not None and len(record.failures) <= LIMITS.auth_lock_after


def test_reload_changes_thresholds_and_keeps_counts() -> None:
    throttle = AuthThrottle(LIMITS)
    throttle.failed("192.0.2.1", None, 0.0)
    throttle.configure(Limits(auth_delay_after=1, auth_tarpit=Duration(0.5)))
    assert throttle.check("192.0.2.1", None, 1.0) == Decision("delay", 0.5)


# -- over real sessions -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_lockout_refuses_even_the_right_password_and_logs_each_failure(
        tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    limits = Limits(auth_delay_after=2, auth_lock_after=3, auth_tarpit=Duration(0.2), auth_lockout=Duration(60))
    clock = Clock()
    async with submission(tls_context, tenant_dir, limits=limits, clock=clock) as rx:
        raw = await rx.raw()
        await secure(raw)
        failed = b"535 5.7.8 Authentication credentials invalid\r\n"
        assert await plain_login(raw, password="not the password") == failed
        assert await plain_login(raw, password="not the password") == failed
        started = time.monotonic()
        assert await plain_login(raw, password="not the password") == failed  # tarpitted, then locks
        assert time.monotonic() - started >= 0.2
        locked = b"454 4.7.0 Too many failed authentications, try later\r\n"
        assert await plain_login(raw) == locked
        other = await rx.raw()  # a new connection from the same address changes nothing
        await secure(other)
        await other.ask(b"AUTH LOGIN\r\n", locked)
        reasons = [(e.reason, e.user) for e in rx.of_type("rejected")]
        # a locked address is refused before the exchange: no username was read
        assert reasons == [("auth_failed", USER)] * 3 + [("auth_locked", "")] * 2
        clock.now += 61  # the lockout is over
        assert await plain_login(other) == b"235 2.7.0 Authentication successful\r\n"


@pytest.mark.asyncio
async def test_failing_sessions_do_not_stall_others(tls_context: ssl.SSLContext,  # noqa: F811
                                                    tenant_dir: TenantDirectory) -> None:  # noqa: F811
    # 10 clients fail AUTH 5 times each, at once (scrypt in threads, tarpits awaiting), while
    # another session keeps asking NOOP: its replies must keep coming promptly. Were scrypt
    # (~50 ms) or the tarpit run on the loop, the median NOOP would wait for them.
    limits = Limits(auth_delay_after=1, auth_lock_after=1000, auth_tarpit=Duration(0.3), max_junk_commands=100000)
    attempt = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0guess guess guess".encode()) + b"\r\n"
    async with submission(tls_context, tenant_dir, limits=limits) as rx:
        watcher = await rx.raw()
        attackers = [await rx.raw() for _ in range(10)]
        for attacker in attackers:
            await secure(attacker)

        async def attack(raw: Raw) -> None:
            for _ in range(5):
                await raw.send(attempt)
                assert await raw.reply(timeout=60) == b"535 5.7.8 Authentication credentials invalid\r\n"

        attack_task = asyncio.gather(*(attack(a) for a in attackers))
        latencies = []
        while not attack_task.done():
            started = time.perf_counter()
            await watcher.ask(b"NOOP\r\n", b"250")
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)  # pacing the probe, not synchronisation
        await attack_task
        latencies.sort()
        assert len(latencies) > 20
        median, worst = latencies[len(latencies) // 2], latencies[-1]
        print(f"NOOP latency during 50 failing AUTHs: median {median * 1000:.2f} ms, max {worst * 1000:.2f} ms")
        assert median < 0.03 and worst < 0.5, (median, worst)
