"""QuotaTracker with an injected clock: token-bucket refill, UTC hour/day windows, refusal texts."""

from __future__ import annotations

import calendar

import pytest
from support import Clock

from mtad.platform.model import Quota, Tenant
from mtad.platform.quotas import QuotaTracker, window_start

# 2025-03-04 13:59:58 UTC: two seconds before an hour boundary, 10 h before a day boundary.
T0 = float(calendar.timegm((2025, 3, 4, 13, 59, 58)))


def tenant(name: str = "acme", **quota: float) -> Tenant:
    return Tenant(name=name, domains=frozenset({"acme.test"}), disabled=False,
                  quota=Quota(**quota), created=T0)  # type: ignore[arg-type]



def send(tracker: QuotaTracker, t: Tenant, count: int) -> int:
    """Admit and charge up to `count` messages now; how many got through."""
    sent = 0
    for _ in range(count):
        if tracker.admit(t) is not None:
            break
        tracker.charge(t)
        sent += 1
    return sent


def test_unlimited_tenant_is_always_admitted() -> None:
    tracker = QuotaTracker(Clock(T0))
    t = tenant()
    assert send(tracker, t, 10_000) == 10_000
    assert tracker.usage("acme")["hour"] == 10_000


def test_bucket_allows_a_burst_then_refuses_then_refills() -> None:
    clock = Clock(T0)
    tracker = QuotaTracker(clock)
    t = tenant(per_second=10)
    assert send(tracker, t, 50) == 10  # the burst is one second's worth
    assert tracker.admit(t) == "rate limit of 10 messages per second reached"
    clock.now += 0.05  # half a token
    assert tracker.admit(t) is not None
    clock.now += 0.05  # one token
    assert send(tracker, t, 50) == 1
    clock.now += 0.5  # five tokens
    assert send(tracker, t, 50) == 5
    clock.now += 60  # never more than the burst, however long the pause
    assert send(tracker, t, 50) == 10


def test_slow_rate_has_a_burst_of_one_and_its_own_wording() -> None:
    clock = Clock(T0)
    tracker = QuotaTracker(clock)
    t = tenant(per_second=0.5)
    assert send(tracker, t, 5) == 1
    assert tracker.admit(t) == "rate limit of 0.5 messages per second reached"
    clock.now += 1.9
    assert tracker.admit(t) is not None
    clock.now += 0.1
    assert tracker.admit(t) is None
    one = tenant(per_second=1)
    assert send(tracker, one, 5) == 1
    assert tracker.admit(one) == "rate limit of 1 message per second reached"


def test_concurrent_admissions_overshoot_then_pay_it_back() -> None:
    clock = Clock(T0)
    tracker = QuotaTracker(clock)
    t = tenant(per_second=2)
    # Five sessions pass MAIL FROM together, then all five messages are charged.
    assert all(tracker.admit(t) is None for _ in range(5))
    tracker.charge(t, 5)
    # The debt (bounded at one burst) delays the next admission: 2 - 5 -> -2, one token needs 1.5 s.
    clock.now += 1.4
    assert tracker.admit(t) is not None
    clock.now += 0.1
    assert tracker.admit(t) is None


def test_hourly_window_resets_at_the_utc_hour() -> None:
    clock = Clock(T0)
    tracker = QuotaTracker(clock)
    t = tenant(per_hour=3)
    assert send(tracker, t, 10) == 3
    assert tracker.admit(t) == "hourly quota of 3 messages reached, resets at 14:00 UTC"
    assert tracker.usage("acme")["hour"] == 3
    clock.now += 1.9  # 13:59:59.9
    assert tracker.admit(t) is not None
    clock.now += 0.1  # 14:00:00
    assert tracker.usage("acme")["hour"] == 0
    assert send(tracker, t, 10) == 3
    assert tracker.admit(t) == "hourly quota of 3 messages reached, resets at 15:00 UTC"


def test_daily_window_resets_at_utc_midnight_and_wins_over_hourly() -> None:
    clock = Clock(T0)
    tracker = QuotaTracker(clock)
    t = tenant(per_hour=2, per_day=3)
    assert send(tracker, t, 10) == 2
    clock.now += 2  # next hour: hourly resets, one left for the day
    assert send(tracker, t, 10) == 1
    assert tracker.admit(t) == "daily quota of 3 messages reached, resets at 00:00 UTC"
    usage = tracker.usage("acme")
    assert (usage["hour"], usage["day"]) == (1, 3)
    clock.now = float(calendar.timegm((2025, 3, 5, 0, 0, 0)))
    assert tracker.admit(t) is None
    assert tracker.usage("acme")["day"] == 0


def test_quota_change_applies_to_the_running_count() -> None:
    clock = Clock(T0)
    tracker = QuotaTracker(clock)
    assert send(tracker, tenant(per_hour=100), 5) == 5
    assert tracker.admit(tenant(per_hour=5)) is not None  # lowered below what was sent
    assert tracker.admit(tenant(per_hour=6)) is None


def test_now_argument_overrides_the_clock() -> None:
    tracker = QuotaTracker(Clock(0))
    t = tenant(per_day=1)
    tracker.charge(t, now=T0)
    assert tracker.admit(t, now=T0) is not None
    assert tracker.admit(t, now=T0 + 86400) is None


def test_one_small_record_per_tenant_and_forget() -> None:
    tracker = QuotaTracker(Clock(T0))
    for i in range(1000):
        t = tenant(f"t{i}", per_hour=10)
        for _ in range(20):
            if tracker.admit(t) is None:
                tracker.charge(t)
    assert len(tracker) == 1000
    tracker.forget("t0")
    assert len(tracker) == 999
    assert tracker.usage("t0")["hour"] == 0
    assert tracker.usage("t1")["hour"] == 10


def test_charge_of_nothing_and_unknown_usage() -> None:
    tracker = QuotaTracker(Clock(T0))
    tracker.charge(tenant(per_hour=1), 0)
    assert len(tracker) == 0
    assert tracker.usage("nobody") == {"hour": 0, "day": 0, "hour_start": window_start(T0, 3600),
                                       "day_start": window_start(T0, 86400)}


@pytest.mark.parametrize("now", [T0, T0 + 0.5, 0.0, 1e9 + 0.25])
def test_windows_are_utc_clock_aligned(now: float) -> None:
    assert window_start(now, 3600) % 3600 == 0 and 0 <= now - window_start(now, 3600) < 3600
    assert window_start(now, 86400) % 86400 == 0 and 0 <= now - window_start(now, 86400) < 86400
