"""Brute-force protection for SMTP AUTH: failed attempts counted per client and per username.

Each failure is remembered (its time) under two keys: the client's address (an IPv6 client by
its /64, which one host usually owns whole) and the username tried. Within a sliding window
(`limits.auth_window`):
- from `auth_delay_after` failures on either key, every further attempt waits
  `auth_tarpit` before it is answered (the session awaits it: other sessions run on);
- from `auth_lock_after` failures, the key is locked for `auth_lockout`: attempts are
  refused with 454 4.7.0 before any password is checked, even a right one.
A success forgets the username's failures (the owner got in), never the client's: one valid
account must not let a client reset its count against the others.

Memory is bounded: each table keeps at most `auth_tracked` keys (least recently failed first
out) and each key at most `auth_lock_after` timestamps (older ones cannot matter).

Pure: no I/O, no sleeping; the clock is a parameter. Trust: the client address is the
kernel's; the username is the peer's and is only used as a dictionary key.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from mtad.config.schema import Limits

Verdict = Literal["ok", "delay", "locked"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Before an attempt: go ahead (after `delay` seconds), or refuse it (`locked`)."""

    verdict: Verdict
    delay: float = 0.0


OK = Decision("ok")


@dataclass(slots=True)
class _Record:
    failures: deque[float]
    locked_until: float = 0.0


def client_key(ip: str) -> str:
    """The key a client address is counted under: IPv4 as is, IPv6 by its /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def username_key(username: str) -> str:
    """Usernames are counted case-insensitively (a case change must not reset the count)."""
    return username.casefold()


class _Table:
    """Failure records by key, least recently failed first; at most `cap` keys."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.records: OrderedDict[str, _Record] = OrderedDict()

    def get(self, key: str) -> _Record | None:
        return self.records.get(key)

    def add(self, key: str, now: float, keep: int) -> _Record:
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = _Record(deque(maxlen=keep))
            while len(self.records) > self.cap:
                self.records.popitem(last=False)
        else:
            self.records.move_to_end(key)
            if record.failures.maxlen != keep:
                record.failures = deque(record.failures, maxlen=keep)
        record.failures.append(now)
        return record

    def forget(self, key: str) -> None:
        self.records.pop(key, None)


class AuthThrottle:
    """Failed-AUTH bookkeeping for one process, over all listeners; see the module docstring."""

    def __init__(self, limits: Limits) -> None:
        self._ips = _Table(limits.auth_tracked)
        self._users = _Table(limits.auth_tracked)
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """Apply new thresholds (SIGHUP); what was counted stays counted."""
        self.delay_after = limits.auth_delay_after
        self.lock_after = max(limits.auth_lock_after, limits.auth_delay_after)
        self.window = float(limits.auth_window)
        self.lockout = float(limits.auth_lockout)
        self.tarpit = float(limits.auth_tarpit)
        self._ips.cap = self._users.cap = limits.auth_tracked

    def check(self, ip: str, username: str | None, now: float) -> Decision:
        """Before an attempt (username None: not known yet, as at the start of LOGIN)."""
        records = [self._ips.get(client_key(ip))]
        if username is not None:
            records.append(self._users.get(username_key(username)))
        delay = False
        for record in records:
            if record is None:
                continue
            if record.locked_until > now:
                return Decision("locked")
            delay = delay or self._recent(record, now) >= self.delay_after
        return Decision("delay", self.tarpit) if delay and self.tarpit > 0 else OK

    def failed(self, ip: str, username: str | None, now: float) -> bool:
        """Count one failure; True when it locked the client or the username."""
        locked = False
        keys = [(self._ips, client_key(ip))]
        if username:
            keys.append((self._users, username_key(username)))
        for table, key in keys:
            record = table.add(key, now, self.lock_after)
            if record.locked_until <= now and self._recent(record, now) >= self.lock_after:
                record.locked_until = now + self.lockout
                record.failures.clear()  # after the lockout the client starts from zero
                locked = True
        return locked

    def succeeded(self, username: str) -> None:
        self._users.forget(username_key(username))

    def tracked(self) -> tuple[int, int]:
        """(client keys, username keys) held now, for tests and metrics."""
        return len(self._ips.records), len(self._users.records)

    def _recent(self, record: _Record, now: float) -> int:
        start = now - self.window
        return sum(1 for t in record.failures if t > start)
