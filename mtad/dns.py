"""The DNS adapter: MX and address lookups on aiodns, with a TTL cache and shared lookups.

`Resolver.mx()` and `Resolver.addresses()` are the DNS the delivery side routes by;
`Resolver.txt()` serves MTA-STS discovery (mtad.deliver.mtasts). Every
answer, positive or negative, is cached by name and type:

    positive         the smallest TTL in the answer (CNAMEs included), within
                     [min_ttl, max_ttl] (1 s .. 1 h)
    NXDOMAIN/NODATA  negative_ttl (60 s; at least 5 s). pycares hands errors over without the
                     response, so the SOA minimum of RFC 2308 is not available to us.
    SERVFAIL, REFUSED, timeout
                     failure_ttl (2 s): long enough that a burst of mail for a broken domain
                     does not wait out one timeout per message, short enough to recover.

The cache is an LRU bounded by entries (100,000 names by default); expired entries go when
they are next looked at or pushed out. Concurrent lookups of one name and type share one
query. Failures are translated once, here, into DnsError kinds; nothing from c-ares escapes.

c-ares 1.34 keeps a TTL-bounded query cache of its own (qcache) behind this one; pycares
offers no switch for it. Both honour the TTL, so together they still do.

`timeout` ([dns].timeout) is c-ares's per-try timeout: each query makes TRIES (2) rounds over
the nameservers, the second with a doubled timeout, so a lookup no server answers fails after
about 2.5 x timeout per server (0.55 s at 0.1 s, 2.4 s at 1 s, measured with one server).

`addresses()` asks AAAA and A at once and interleaves the answers, IPv6 first (RFC 8305 4:
one broken address family then costs one connection attempt, not all of them).

Trust: answers come from the network: names are lowercased and stripped of the root dot,
addresses re-parsed by ipaddress, garbage records dropped.
RFCs: 1035 (messages, TTL), 2308 (negative caching), 3596 (AAAA), 5321 5.1 (MX use),
7505 (null MX: an MX host of "." comes back as host ""), 8305 4 (address interleaving).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from typing import Generic, Literal, NamedTuple, TypeVar

import aiodns
import aiodns.error
import pycares

from mtad.config.endpoints import parse_nameserver

Kind = Literal["nxdomain", "nodata", "servfail", "timeout", "refused", "badname"]
QType = Literal["MX", "A", "AAAA", "TXT"]
TEMPORARY: frozenset[str] = frozenset({"servfail", "timeout", "refused"})

TRIES = 2
"""Rounds over the nameservers per query (c-ares doubles the timeout on the second)."""

# c-ares status codes (ares.h) -> our kinds; anything else is a server failure.
_ARES_KINDS: dict[int, Kind] = {
    1: "nodata",  # ARES_ENODATA
    3: "servfail",  # ARES_ESERVFAIL
    4: "nxdomain",  # ARES_ENOTFOUND
    6: "refused",  # ARES_EREFUSED
    8: "badname",  # ARES_EBADNAME
    12: "timeout",  # ARES_ETIMEOUT
}
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class DnsError(Exception):
    """A lookup that gave no usable answer. `kind` says why; `temporary` whether to retry."""

    def __init__(self, kind: Kind, name: str, qtype: str = "") -> None:
        super().__init__(kind, name, qtype)
        self.kind: Kind = kind
        self.name = name
        self.qtype = qtype

    @property
    def temporary(self) -> bool:
        return self.kind in TEMPORARY

    def __str__(self) -> str:
        return f"{self.qtype or 'lookup'} {self.name}: {self.kind}"


class MxRecord(NamedTuple):
    preference: int
    host: str
    """Lowercase, no trailing dot; "" for the null MX target "." (RFC 7505)."""


Answer = tuple[MxRecord, ...] | tuple[str, ...]
V = TypeVar("V")


class TtlCache(Generic[V]):
    """An LRU of values with expiry times, bounded by entries. Pure: the caller passes the time."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[tuple[str, str], tuple[float, V]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: tuple[str, str], now: float) -> V | None:
        """The value while it is fresh (and mark it recently used); None when absent or expired."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        expires, value = hit
        if expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def store(self, key: tuple[str, str], value: V, expires: float) -> None:
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How long an answer stays in the cache. Pure."""

    min_ttl: float = 1.0
    """Floor for positive answers: a TTL of 0 still spares a burst of mail one query each."""
    max_ttl: float = 3600.0
    negative_ttl: float = 60.0
    """NXDOMAIN and NODATA (floored at 5 s)."""
    failure_ttl: float = 2.0
    """SERVFAIL, REFUSED and timeouts."""

    def seconds(self, answer: Answer | Kind, record_ttl: int) -> float:
        if isinstance(answer, tuple):
            return min(max(float(record_ttl), self.min_ttl), self.max_ttl)
        if answer in ("nxdomain", "nodata"):
            return max(self.negative_ttl, 5.0)
        if answer == "badname":
            return 0.0
        return self.failure_ttl


@functools.lru_cache(maxsize=65536)
def query_name(text: str) -> str:
    """A name as it is looked up: lowercase, no trailing dot; DnsError("badname") if not a name."""
    name = text.strip().lower().removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise DnsError("badname", text[:255])
    return name


def interleave(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """first[0], second[0], first[1], second[1], ... then the rest of the longer one."""
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out.extend(seq[i] for seq in (first, second) if i < len(seq))
    return out


def _worst(kinds: list[Kind]) -> Kind:
    """The kind that speaks for two failed lookups of one name: a name that does not exist
    does not exist; else a temporary failure may be hiding data; else there is none."""
    for kind in ("nxdomain", "timeout", "servfail", "refused", "badname"):
        if kind in kinds:
            return kind
    return "nodata"


def _combine(name: str, six: Answer | Kind, four: Answer | Kind) -> list[str]:
    found = interleave([a for a in six if isinstance(a, str)] if isinstance(six, tuple) else [],
                       [a for a in four if isinstance(a, str)] if isinstance(four, tuple) else [])
    if found:
        return found
    raise DnsError(_worst([a for a in (six, four) if isinstance(a, str)]), name, "AAAA/A")


def parse_answer(qtype: QType, result: pycares.DNSResult) -> tuple[Answer, int]:
    """The records of the asked type in an answer (sorted by preference for MX) and its TTL."""
    ttl = min((record.ttl for record in result.answer), default=0)
    if qtype == "MX":
        mx = [MxRecord(record.data.priority, record.data.exchange.lower().rstrip("."))
              for record in result.answer if isinstance(record.data, pycares.MXRecordData)]
        mx.sort(key=lambda record: record.preference)
        return tuple(dict.fromkeys(mx)), ttl
    if qtype == "TXT":  # each record's character-strings come joined (RFC 7208 3.3, RFC 8461 3.1)
        return tuple(record.data.data.decode("utf-8", "replace") for record in result.answer
                     if isinstance(record.data, pycares.TXTRecordData)), ttl
    wanted = pycares.AAAARecordData if qtype == "AAAA" else pycares.ARecordData
    found: list[str] = []
    for record in result.answer:
        if isinstance(record.data, wanted):
            try:
                found.append(ipaddress.ip_address(record.data.addr).compressed)
            except ValueError:
                continue
    return tuple(dict.fromkeys(found)), ttl


class Resolver:
    """MX and address lookups through c-ares, cached. One per process; bound to one event loop."""

    def __init__(self, nameservers: list[str], timeout: float, *, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 100_000, policy: CachePolicy | None = None) -> None:
        # "ip", "ip:port", "[v6]:port" -> the "ip:port" / "[v6]:port" that ares_set_servers_csv takes.
        self._servers = [str(parse_nameserver(text)) for text in nameservers]
        self._timeout = timeout
        self._clock = clock
        self._policy = policy or CachePolicy()
        self._cache: TtlCache[Answer | Kind] = TtlCache(max_entries)
        self._inflight: dict[tuple[str, str], asyncio.Task[Answer | Kind]] = {}
        self._dns: aiodns.DNSResolver | None = None
        self._deadline = 0.0
        self._closed = False

    async def mx(self, domain: str) -> list[MxRecord]:
        """The MX records of a domain by preference (null MX as host ""); never empty."""
        name = query_name(domain)
        answer = await self._answer(name, "MX")
        if isinstance(answer, str):
            raise DnsError(answer, name, "MX")
        return [record for record in answer if isinstance(record, MxRecord)]

    async def txt(self, name: str) -> list[str]:
        """The TXT records at a name, each record's strings joined; DnsError when there are none."""
        qname = query_name(name)
        answer = await self._answer(qname, "TXT")
        if isinstance(answer, str):
            raise DnsError(answer, qname, "TXT")
        return [text for text in answer if isinstance(text, str)]

    async def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of a host, interleaved IPv6 first; an IP literal is itself.

        DnsError when neither family has one: nxdomain if the name does not exist, else a
        temporary kind if either lookup failed so, else nodata."""
        known = self.known_addresses(host)
        if isinstance(known, list):
            return known
        if known is not None:
            raise known
        name = query_name(host)
        # Both families at once; a family still cached is not asked again.
        six, four = await asyncio.gather(self._answer(name, "AAAA"), self._answer(name, "A"))
        return _combine(name, six, four)

    def known_addresses(self, host: str) -> list[str] | DnsError | None:
        """What addresses() would say from the cache alone, without waiting; None when it
        would have to ask. (For callers that look up many hosts and gather only the misses.)"""
        if host[-1:].isdigit() or ":" in host:  # a top-level domain is never numeric
            try:
                return [ipaddress.ip_address(host.strip()).compressed]
            except ValueError:
                pass
        try:
            name = query_name(host)
        except DnsError as exc:
            return exc
        now = self._clock()
        six = self._cache.lookup((name, "AAAA"), now)
        four = self._cache.lookup((name, "A"), now)
        if six is None or four is None:
            return None
        try:
            return _combine(name, six, four)
        except DnsError as exc:
            return exc

    def close(self) -> None:
        """Stop: pending lookups end as failures; the c-ares channel and its sockets are freed."""
        self._closed = True
        dns, self._dns = self._dns, None
        if dns is None:
            return
        dns.cancel()
        # aiodns's close() is a coroutine that never waits (cancel, unregister fds, free the
        # channel); running it to its end here keeps close() synchronous and deterministic.
        closing = dns.close()
        try:
            closing.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - a future aiodns that really waits
            closing.close()

    # -- the cache and the shared lookups ----------------------------------------------------

    async def _answer(self, name: str, qtype: QType) -> Answer | Kind:
        key = (name, qtype)
        hit = self._cache.lookup(key, self._clock())
        if hit is not None:
            return hit
        task = self._inflight.get(key)
        if task is None:
            if self._closed:
                raise RuntimeError("the resolver is closed")
            task = asyncio.get_running_loop().create_task(self._query(name, qtype), name=f"dns {qtype} {name}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        # shield: one caller's cancellation must not cancel the lookup the others wait for.
        return await asyncio.shield(task)

    def _landed(self, key: tuple[str, str], task: asyncio.Task[Answer | Kind]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _query(self, name: str, qtype: QType) -> Answer | Kind:
        answer: Answer | Kind
        record_ttl = 0
        try:
            async with asyncio.timeout(self._channel_deadline()):
                result = await self._channel().query_dns(name, qtype)
        except TimeoutError:
            answer = "timeout"
        except aiodns.error.DNSError as exc:
            answer = _ARES_KINDS.get(exc.args[0] if exc.args else 0, "servfail")
        else:
            answer, record_ttl = parse_answer(qtype, result)
            if not answer:  # NOERROR with only CNAMEs or records of other types
                answer = "nodata"
        seconds = self._policy.seconds(answer, record_ttl)
        if seconds > 0 and not self._closed:
            self._cache.store((name, qtype), answer, self._clock() + seconds)
        return answer

    def _channel(self) -> aiodns.DNSResolver:
        if self._dns is None:
            self._dns = aiodns.DNSResolver(nameservers=self._servers or None, loop=asyncio.get_running_loop(),
                                           timeout=self._timeout, tries=TRIES)
            # c-ares tries every server once per round and doubles the timeout per round; this
            # outer deadline only guards against a c-ares that never calls back.
            rounds = sum(2**i for i in range(TRIES))
            self._deadline = self._timeout * rounds * max(1, len(self._dns.nameservers)) + 1.0
        return self._dns

    def _channel_deadline(self) -> float:
        self._channel()
        return self._deadline
