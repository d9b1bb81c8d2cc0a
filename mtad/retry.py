"""Retry timing: when a deferred recipient is tried again, and when the queue gives up on it.

Pure: numbers in, numbers out; the clock and the random source are the caller's.

The schedule is exponential: the n-th retry waits `min_backoff * 2**(n-1)`, capped at
`max_backoff` (Postfix's minimal/maximal_backoff_time, doubling as its qmgr does). Each delay
is spread by +-20% so that recipients deferred together (a destination that was down) do not
all come back in the same second. The spread is drawn uniformly from the part of
[0.8 * base, 1.2 * base] that lies inside [min_backoff, max_backoff]: a delay is never
shorter than min_backoff (the operator's "first retry" promise) nor longer than max_backoff
(the "longest wait" promise), and no value is favoured, as clamping would favour the bounds.
When max_backoff < min_backoff (a configuration the checks should refuse) min_backoff wins:
the schedule is flat.

Times are unix seconds (float); durations are seconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

JITTER = 0.2
"""Relative spread of each delay: +-20%."""

_MAX_DOUBLINGS = 62  # 2**62 times any backoff is past every cap; keeps the float finite


def base_delay(attempts: int, *, min_backoff: float, max_backoff: float) -> float:
    """The delay after `attempts` attempts before any jitter: min * 2**(attempts-1), capped."""
    low, high = _bounds(min_backoff, max_backoff)
    doublings = min(max(attempts, 1) - 1, _MAX_DOUBLINGS)
    return min(low * 2.0**doublings, high)


def backoff(
    attempts: int,
    *,
    min_backoff: float,
    max_backoff: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt, after `attempts` attempts (1 = the first failed).

    Within +-20% of `base_delay`, and always within [min_backoff, max_backoff]. `rand` gives
    a float in [0, 1) (random.random); anything outside is clamped into it.
    """
    low, high = _bounds(min_backoff, max_backoff)
    base = base_delay(attempts, min_backoff=low, max_backoff=high)
    lo = max(base * (1 - JITTER), low)
    hi = min(base * (1 + JITTER), high)
    if hi <= lo:
        return lo
    r = rand()
    if not 0.0 <= r < 1.0:  # NaN too
        r = math.nextafter(1.0, 0.0) if r >= 1.0 else 0.0
    return lo + (hi - lo) * r


def next_attempt(now: float, attempts: int, *, min_backoff: float, max_backoff: float,
                 rand: Callable[[], float] = random.random) -> float:
    """Unix time of the next attempt after `attempts` attempts, the last of them at `now`."""
    return now + backoff(attempts, min_backoff=min_backoff, max_backoff=max_backoff, rand=rand)


def expires_at(arrival: float, lifetime: float) -> float:
    """Unix time at which a message that arrived at `arrival` expires (max_queue_lifetime)."""
    return arrival + max(lifetime, 0.0)


def expired(arrival: float, now: float, lifetime: float) -> bool:
    """The message has been queued for `lifetime` seconds or more: its recipients bounce."""
    return now >= expires_at(arrival, lifetime)


def delay_warning_due(arrival: float, now: float, delay_warning: float, *, warned: bool = False) -> bool:
    """A "delayed" DSN is due: delay warnings are on (> 0), the message has waited that long,
    and none has gone for this recipient yet (Recipient.warned)."""
    return delay_warning > 0 and not warned and now >= arrival + delay_warning


def _bounds(min_backoff: float, max_backoff: float) -> tuple[float, float]:
    low = max(min_backoff, 0.0)
    return low, max(max_backoff, low)
