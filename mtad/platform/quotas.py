"""Per-tenant rate limits and quotas: a token bucket per second, fixed UTC hour and day windows.

Pure: no I/O, no asyncio; time comes from an injected clock (or `now=`). The receiver asks
`admit` before it accepts MAIL FROM and calls `charge` once a message is committed; a refusal
text goes to the client as `451 4.7.1 <text>`.

The bucket holds up to max(1, per_second) tokens and refills at per_second. `admit` only looks
(one token must be there); `charge` takes, and may take the bucket below zero when several
sessions were admitted together: the debt delays the next admission, so over time the rate
holds even though a burst of concurrent sessions may overshoot by their number. The hour and day
windows are UTC clock windows (14:00-15:00, midnight to midnight): a counter resets when its
window ends.

Memory: one small record per tenant that has sent since the start; usage lives only in this
process (a restart starts the windows afresh).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mtad.platform.model import Tenant

HOUR = 3600
DAY = 86400
# Unix times near 1.7e9 carry ~2e-7 s of float error; a token that is one part in a million short
# of whole is whole.
_EPSILON = 1e-6


class _Usage:
    __slots__ = ("day_count", "day_start", "hour_count", "hour_start", "stamp", "tokens")

    def __init__(self, now: float, burst: float) -> None:
        self.tokens = burst
        self.stamp = now
        self.hour_start = window_start(now, HOUR)
        self.hour_count = 0
        self.day_start = window_start(now, DAY)
        self.day_count = 0

    def roll(self, now: float, rate: float) -> None:
        """Bring the bucket and both windows up to `now`."""
        burst = max(1.0, rate)
        if rate > 0:
            elapsed = max(0.0, now - self.stamp)
            self.tokens = min(burst, self.tokens + elapsed * rate)
        else:
            self.tokens = burst
        self.stamp = max(self.stamp, now)
        hour = window_start(now, HOUR)
        if hour > self.hour_start:
            self.hour_start, self.hour_count = hour, 0
        day = window_start(now, DAY)
        if day > self.day_start:
            self.day_start, self.day_count = day, 0


def window_start(now: float, size: int) -> float:
    """Start of the UTC window of `size` seconds holding `now` (unix time has no leap seconds)."""
    return float(int(now // size) * size)


def _rate_text(per_second: float) -> str:
    if per_second == int(per_second):
        count = int(per_second)
        return f"{count} message{'s' if count != 1 else ''} per second"
    return f"{per_second:g} messages per second"


def _clock_time(unix: float) -> str:
    return time.strftime("%H:%M UTC", time.gmtime(unix))


class QuotaTracker:
    """Usage per tenant name; see the module docstring for the rules."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def _record(self, tenant: Tenant, now: float) -> _Usage:
        usage = self._usage.get(tenant.name)
        if usage is None:
            usage = self._usage[tenant.name] = _Usage(now, max(1.0, tenant.quota.per_second))
        usage.roll(now, tenant.quota.per_second)
        return usage

    def admit(self, tenant: Tenant, *, now: float | None = None) -> str | None:
        """None when one more message is allowed now; else the reason, for `451 4.7.1 <reason>`."""
        quota = tenant.quota
        if not (quota.per_second or quota.per_hour or quota.per_day):
            return None
        when = self._clock() if now is None else now
        usage = self._record(tenant, when)
        if quota.per_day and usage.day_count >= quota.per_day:
            return (f"daily quota of {quota.per_day} messages reached, resets at "
                    f"{_clock_time(usage.day_start + DAY)}")
        if quota.per_hour and usage.hour_count >= quota.per_hour:
            return (f"hourly quota of {quota.per_hour} messages reached, resets at "
                    f"{_clock_time(usage.hour_start + HOUR)}")
        if quota.per_second and usage.tokens < 1 - _EPSILON:
            return f"rate limit of {_rate_text(quota.per_second)} reached"
        return None

    def charge(self, tenant: Tenant, messages: int = 1, *, now: float | None = None) -> None:
        """Count `messages` sent by `tenant` (after they were accepted)."""
        if messages <= 0:
            return
        when = self._clock() if now is None else now
        usage = self._record(tenant, when)
        usage.hour_count += messages
        usage.day_count += messages
        if tenant.quota.per_second:
            # Bounded debt: never more than one burst below zero, so a huge batch cannot lock
            # a tenant out for longer than about two seconds' worth of its rate.
            burst = max(1.0, tenant.quota.per_second)
            usage.tokens = max(-burst, usage.tokens - messages)

    def usage(self, tenant_name: str, *, now: float | None = None) -> dict[str, Any]:
        """Messages counted in the current UTC hour and day (0 when the window has rolled over)."""
        when = self._clock() if now is None else now
        hour_start, day_start = window_start(when, HOUR), window_start(when, DAY)
        record = self._usage.get(tenant_name)
        hour = record.hour_count if record is not None and record.hour_start == hour_start else 0
        day = record.day_count if record is not None and record.day_start == day_start else 0
        return {"hour": hour, "day": day, "hour_start": hour_start, "day_start": day_start}

    def forget(self, tenant_name: str) -> None:
        """Drop a deleted tenant's record."""
        self._usage.pop(tenant_name, None)

    def __len__(self) -> int:
        return len(self._usage)
