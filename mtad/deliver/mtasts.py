"""MTA-STS: discover, fetch, parse and cache a recipient domain's policy (RFC 8461).

`MtaSts.policy(domain)` answers which policy applies to a delivery now, or None:

    TXT _mta-sts.<domain>   "v=STSv1; id=...;" read on every call (the resolver caches it by
                            TTL). No usable record: the cached policy if there is one, else none.
    id as cached            the cached policy, while its max_age lasts.
    new id, or expired      fetch https://mta-sts.<domain>/.well-known/mta-sts.txt; concurrent
                            callers share one fetch. A fetch that fails leaves the cached policy
                            in force (RFC 8461 5.1), or none: the caller then delivers as if
                            the domain had no policy. A failed id is not fetched again for
                            RETRY_FAILED seconds (RFC 8461 3.3: five minutes or longer).

The cache is in memory, bounded (MAX_ENTRIES domains, least recently used dropped) and lost
on restart; the first mail after a restart fetches again. A policy of mode "none" is cached
like any other, so a domain withdraws its policy by publishing one.

The fetch: HTTPS only, certificate checked against the system CAs (or `ca_file`) and the name
mta-sts.<domain>; names resolved through mtad's own Resolver (the configured nameservers,
never the system's); no redirects and no caches (3.3); a status other than 200, a media type
other than text/plain, a content encoding, or a body over MAX_BODY bytes fail it; one
deadline (`timeout`) covers connect, TLS and the whole response. `port` exists for tests and
private setups (the policy host on a port other than 443).

Trust: TXT records and policy bodies are hostile. Both are parsed strictly by pure functions
(`parse_txt`, `parse_policy`) that raise PolicyError and nothing else; the body is read
within the size cap, decoded as UTF-8 strictly; no text of theirs reaches an SMTP peer.
RFCs: 8461 3.1 (TXT record), 3.2 (policy grammar), 3.3 (HTTPS retrieval), 3.4 (max_age,
id changes), 4.1 (MX host matching), 5.1 (what to do without a policy).
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import Literal

import aiohttp
import aiohttp.abc
import msgspec
import structlog

from mtad.config.endpoints import normalize_domain
from mtad.dns import DnsError, Resolver

log = structlog.get_logger("mtad.deliver.mtasts")

Mode = Literal["enforce", "testing", "none"]

_MODES: dict[str, Mode] = {"enforce": "enforce", "testing": "testing", "none": "none"}

MAX_BODY = 64 * 1024
"""Largest policy body read (RFC 8461 3.3 suggests 64 KB)."""
MAX_AGE_LIMIT = 31_557_600
"""max_age above this (about a year) is taken as this (RFC 8461 3.2)."""
RETRY_FAILED = 300.0
"""Seconds before a policy id whose fetch failed is fetched again."""
MAX_ENTRIES = 100_000
WELL_KNOWN = "/.well-known/mta-sts.txt"

_TXT_ID = re.compile(r"id=([A-Za-z0-9]{1,32})")
_TXT_EXTENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# No regex here backtracks over the text: split and strip first, then match bounded pieces.


class PolicyError(ValueError):
    """A TXT record or policy body that does not follow RFC 8461's grammar."""


class FetchError(Exception):
    """The policy could not be fetched (network, TLS, HTTP status, type, size, grammar)."""


class StsPolicy(msgspec.Struct, frozen=True):
    id: str
    """The TXT record's id the policy was fetched under."""
    mode: Mode
    mx: tuple[str, ...]
    """Patterns: lowercase A-label names, "*." allowed as the whole first label."""
    max_age: int

    def matches(self, host: str) -> bool:
        """Is this MX host name allowed by one of the mx patterns (RFC 8461 4.1)?"""
        return any(mx_matches(pattern, host) for pattern in self.mx)


# --- pure parsing ---------------------------------------------------------------------------

def parse_txt(records: list[str]) -> str:
    """The policy id of the TXT records at _mta-sts.<domain>; PolicyError when there is not
    exactly one STSv1 record or it is malformed (RFC 8461 3.1: then there is no policy)."""
    ours = [record for record in records if record.startswith("v=STSv1;")]
    if len(ours) != 1:
        raise PolicyError(f"{len(ours)} STSv1 TXT records")
    fields = [field.strip(" \t") for field in ours[0].split(";")[1:]]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing delimiter
    policy_id = ""
    for field in fields:
        found = _TXT_ID.fullmatch(field)
        if found:
            policy_id = policy_id or found[1]
        elif not _TXT_EXTENSION.fullmatch(field):
            raise PolicyError("malformed STSv1 TXT record")
    if not policy_id:
        raise PolicyError("STSv1 TXT record without an id")
    return policy_id


def parse_policy(body: bytes, policy_id: str = "") -> StsPolicy:
    """A policy body (RFC 8461 3.2); PolicyError when it breaks the grammar or lacks a field.

    Lines end in LF or CRLF; a field given twice counts the first time (mx adds up); fields
    of other names that fit the extension grammar are ignored; blank lines are tolerated."""
    if len(body) > MAX_BODY:
        raise PolicyError("policy too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _FIELD_NAME.fullmatch(name) or not value or _CONTROL.search(value):
            raise PolicyError("malformed policy line")
        if name == "mx":
            patterns.append(_pattern(value))
        else:
            fields.setdefault(name, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    mode = _MODES.get(fields.get("mode", ""))
    if mode is None:
        raise PolicyError("policy mode is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyError("policy max_age is not 1 to 10 digits")
    if mode != "none" and not patterns:
        raise PolicyError("policy has no mx pattern")
    return StsPolicy(id=policy_id, mode=mode, mx=tuple(dict.fromkeys(patterns)),
                     max_age=min(int(age), MAX_AGE_LIMIT))


def _pattern(value: str) -> str:
    wildcard = value.startswith("*.")
    try:
        name = normalize_domain(value[2:] if wildcard else value)
    except ValueError:
        raise PolicyError("policy mx is not a domain name") from None
    return "*." + name if wildcard else name


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: a pattern matches the host exactly, or "*.rest" matches one label + rest."""
    name = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = name.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return name == pattern


# --- the cache and the fetch ----------------------------------------------------------------

class _Entry:
    __slots__ = ("expires", "policy")

    def __init__(self, policy: StsPolicy, expires: float) -> None:
        self.policy, self.expires = policy, expires


class MtaSts:
    """Policies of recipient domains, fetched when their TXT id says so. One per process."""

    def __init__(self, resolver: Resolver, *, port: int = 443, ca_file: str = "", timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_ENTRIES) -> None:
        self._resolver = resolver
        self._port = port
        self._ca_file = ca_file
        self._timeout = timeout
        self._clock = clock
        self._max_entries = max_entries
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._failed: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[StsPolicy | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0
        """Fetches started (success or not), for logs and tests."""

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in force for `domain` now (any mode, "none" included), or None."""
        name = domain.lower().rstrip(".")
        cached = self._cached(name)
        try:
            policy_id = parse_txt(await self._resolver.txt(f"_mta-sts.{name}"))
        except (DnsError, PolicyError):
            return cached  # no (readable) record: a cached policy stays in force until max_age
        if cached is not None and cached.id == policy_id:
            return cached
        key = (name, policy_id)
        failed = self._failed.get(key)
        if failed is not None and failed > self._clock():
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(name, policy_id), name=f"mta-sts {name}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._inflight.pop(key, None) if self._inflight.get(key) is done
                                   else None)
        fresh = await asyncio.shield(task)
        return fresh if fresh is not None else cached

    def _cached(self, name: str) -> StsPolicy | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._cache[name]
            return None
        self._cache.move_to_end(name)
        return entry.policy

    async def _refresh(self, name: str, policy_id: str) -> StsPolicy | None:
        self.fetches += 1
        try:
            body = await self.fetch(name)
            policy = parse_policy(body, policy_id)
        except (FetchError, PolicyError) as exc:
            log.warning("mta_sts.fetch_failed", domain=name, id=policy_id, reason=str(exc))
            self._failed[(name, policy_id)] = self._clock() + RETRY_FAILED
            while len(self._failed) > self._max_entries:
                self._failed.popitem(last=False)
            return None
        self._failed.pop((name, policy_id), None)
        self._cache[name] = _Entry(policy, self._clock() + policy.max_age)
        self._cache.move_to_end(name)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        log.info("mta_sts.fetched", domain=name, id=policy_id, mode=policy.mode, mx=list(policy.mx),
                 max_age=policy.max_age)
        return policy

    def url(self, name: str) -> str:
        port = "" if self._port == 443 else f":{self._port}"
        return f"https://mta-sts.{name}{port}{WELL_KNOWN}"

    async def fetch(self, name: str) -> bytes:
        """The policy body of a domain (RFC 8461 3.3); FetchError with bland words otherwise."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client().get(self.url(name), allow_redirects=False) as response:
                    if response.status != 200:
                        raise FetchError(f"HTTP status {response.status}")
                    if response.content_type != "text/plain":
                        raise FetchError("media type is not text/plain")
                    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                        raise FetchError("content encoding refused")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(16384):
                        body += chunk
                        if len(body) > MAX_BODY:
                            raise FetchError(f"policy larger than {MAX_BODY} bytes")
                    return bytes(body)
        except TimeoutError:
            raise FetchError("timed out") from None
        except aiohttp.ClientConnectorCertificateError:
            raise FetchError("certificate not trusted") from None
        except aiohttp.ClientConnectorDNSError:
            raise FetchError("policy host not found") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # the class name only: for the log
            raise FetchError(f"connection failed ({type(exc).__name__})") from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(cafile=self._ca_file or None)
            connector = aiohttp.TCPConnector(resolver=_Names(self._resolver), ssl=context, use_dns_cache=False,
                                             force_close=True, limit=100)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": "mtad (MTA-STS)", "Accept-Encoding": "identity"})
        return self._session

    async def close(self) -> None:
        """Stop fetching: running fetches are cancelled, the HTTP client closed."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _Names(aiohttp.abc.AbstractResolver):
    """aiohttp's name lookups through mtad's Resolver (configured nameservers, cached)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[aiohttp.abc.ResolveResult]:
        try:
            addresses = await self._resolver.addresses(host)
        except DnsError as exc:
            raise OSError(f"{host}: {exc.kind}") from None
        return [{"hostname": host, "host": address, "port": port,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for address in addresses]

    async def close(self) -> None:
        return None
