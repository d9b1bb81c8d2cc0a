"""Retry schedule, jitter bounds and expiry (mtad.retry)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtad.retry import (
    JITTER,
    backoff,
    base_delay,
    delay_warning_due,
    expired,
    expires_at,
    next_attempt,
)

MIN, MAX = 300.0, 4 * 3600.0


def test_schedule_doubles_from_min_and_stops_at_max() -> None:
    delays = [base_delay(n, min_backoff=MIN, max_backoff=MAX) for n in range(1, 9)]
    assert delays == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]


@pytest.mark.parametrize("attempts", [0, -5])
def test_no_attempt_yet_counts_as_the_first(attempts: int) -> None:
    assert base_delay(attempts, min_backoff=MIN, max_backoff=MAX) == MIN


def test_huge_attempt_counts_stay_finite() -> None:
    assert base_delay(10**9, min_backoff=MIN, max_backoff=MAX) == MAX
    assert backoff(10**9, min_backoff=MIN, max_backoff=MAX, rand=lambda: 0.5) <= MAX


@pytest.mark.parametrize(("attempts", "low", "high"), [
    (1, MIN, MIN * (1 + JITTER)),          # the first retry: never below min_backoff
    (3, 1200 * 0.8, 1200 * 1.2),           # in the middle: the full +-20%
    (20, MAX * (1 - JITTER), MAX),         # at the cap: never above max_backoff
])
def test_jitter_spans_its_window(attempts: int, low: float, high: float) -> None:
    assert backoff(attempts, min_backoff=MIN, max_backoff=MAX, rand=lambda: 0.0) == pytest.approx(low)
    top = backoff(attempts, min_backoff=MIN, max_backoff=MAX, rand=lambda: math.nextafter(1.0, 0.0))
    assert top == pytest.approx(high)
    assert backoff(attempts, min_backoff=MIN, max_backoff=MAX, rand=lambda: 0.5) == pytest.approx((low + high) / 2)


def test_first_retries_are_spread_not_piled_on_the_minimum() -> None:
    # Clamping a +-20% draw to min_backoff would put half the first retries at exactly min.
    rng = random.Random(7)
    delays = [backoff(1, min_backoff=MIN, max_backoff=MAX, rand=rng.random) for _ in range(2000)]
    assert sum(d == MIN for d in delays) < 5
    assert min(delays) >= MIN and max(delays) <= MIN * 1.2
    assert max(delays) - min(delays) > MIN * 0.19  # the whole window is used


@given(
    attempts=st.integers(min_value=-3, max_value=200),
    low=st.floats(min_value=1, max_value=86400),
    high=st.floats(min_value=1, max_value=7 * 86400),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_delays_stay_within_bounds_and_jitter(attempts: int, low: float, high: float, r: float) -> None:
    delay = backoff(attempts, min_backoff=low, max_backoff=high, rand=lambda: r)
    base = base_delay(attempts, min_backoff=low, max_backoff=high)
    assert low <= delay <= max(high, low) * (1 + 1e-12)
    assert abs(delay - base) <= JITTER * base * (1 + 1e-9)


def test_max_below_min_gives_a_flat_schedule_at_min() -> None:
    for attempts in (1, 2, 10):
        assert backoff(attempts, min_backoff=600, max_backoff=60, rand=lambda: 0.9) == 600


@pytest.mark.parametrize("bad", [-1.0, 1.0, 7.5, float("nan"), float("inf")])
def test_a_bad_random_source_is_clamped(bad: float) -> None:
    delay = backoff(3, min_backoff=MIN, max_backoff=MAX, rand=lambda: bad)
    assert 1200 * 0.8 <= delay <= 1200 * 1.2


def test_default_random_source_and_next_attempt() -> None:
    assert MIN <= backoff(1, min_backoff=MIN, max_backoff=MAX) <= MIN * 1.2
    assert next_attempt(1000.0, 2, min_backoff=MIN, max_backoff=MAX, rand=lambda: 0.5) == pytest.approx(1600.0)


def test_expiry_is_reached_at_the_lifetime() -> None:
    arrival, lifetime = 1_700_000_000.0, 5 * 86400.0
    assert expires_at(arrival, lifetime) == arrival + lifetime
    assert not expired(arrival, arrival + lifetime - 0.001, lifetime)
    assert expired(arrival, arrival + lifetime, lifetime)
    assert expired(arrival, arrival + lifetime + 1, lifetime)
    assert expires_at(arrival, -5) == arrival  # a negative lifetime is none at all


def test_delay_warning_due_once_after_the_age() -> None:
    arrival = 1000.0
    assert not delay_warning_due(arrival, arrival + 10**6, 0)  # 0: warnings off
    assert not delay_warning_due(arrival, arrival + 3599, 3600)
    assert delay_warning_due(arrival, arrival + 3600, 3600)
    assert not delay_warning_due(arrival, arrival + 7200, 3600, warned=True)
