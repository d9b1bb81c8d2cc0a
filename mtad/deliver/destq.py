"""One destination's queue: its ready work, its concurrency window, its suspension.

Pure: no asyncio, no I/O; the scheduler drives it with the clock's time. A destination is
what recipients share a connection for: the next hop of a static [[route]], or the domain.

The window is how many attempts may run at once. It starts at `initial` and grows by one per
delivery up to `limit`; a failed connection halves it (never below one). When the last
`suspend_after` connection attempts all failed and none succeeded since, the destination is
dead: it is suspended for `suspend_time`, its waiting work is deferred to the end of the
suspension, and new work for it is deferred on arrival, so a dead domain holds neither memory
nor connections. `mtactl queue flush --domain` ends a suspension early.
"""

from __future__ import annotations

from collections import deque

import msgspec


class Job(msgspec.Struct, kw_only=True):
    """One attempt's worth of work: some recipients of one message, one destination."""

    queue_id: str
    indexes: list[int]
    """Positions in the scheduler's copy of the message's recipient list."""
    domain: str
    """A recipient domain of this job (they all share the destination): what the router resolves."""
    key: str = ""
    """The destination queue's key (also the connection pool's)."""


class Windows(msgspec.Struct, frozen=True, kw_only=True):
    initial: int = 5
    limit: int = 20
    suspend_after: int = 5
    suspend_time: float = 300.0


class DestinationQueue:
    def __init__(self, key: str, windows: Windows) -> None:
        self.key = key
        self.windows = windows
        self.jobs: deque[Job] = deque()
        self.active = 0
        self.window = float(windows.initial)
        self.failures = 0
        """Connection failures in a row, with no success since."""
        self.suspended_until = 0.0
        self.last_error = ""
        self.delivered = 0
        self.deferred = 0
        self.bounced = 0

    def can_start(self, now: float) -> bool:
        """There is work and room in the window, and the destination is not resting."""
        return bool(self.jobs) and self.active < int(self.window) and not self.suspended(now)

    def suspended(self, now: float) -> bool:
        return now < self.suspended_until

    def start(self) -> Job:
        self.active += 1
        return self.jobs.popleft()

    def finished(self, *, connected: bool, error: str, now: float) -> bool:
        """An attempt ended. `connected`: some server of this destination talked to us.

        Returns True when this failure made the destination dead (now suspended)."""
        self.active -= 1
        if connected:
            self.failures = 0
            self.window = min(float(self.windows.limit), self.window + 1)
            if error:
                self.last_error = error
            return False
        self.failures += 1
        self.last_error = error
        self.window = max(1.0, self.window / 2)
        if self.failures >= self.windows.suspend_after and not self.suspended(now):
            self.suspended_until = now + self.windows.suspend_time
            return True
        return False

    def wake(self) -> None:
        """End a suspension now (operator flush); the window restarts small."""
        self.suspended_until = 0.0
        self.failures = 0
        self.window = float(self.windows.initial)

    def idle(self, now: float) -> bool:
        """Nothing queued, nothing running, not suspended: the scheduler may forget it."""
        return not self.jobs and not self.active and not self.suspended(now)
