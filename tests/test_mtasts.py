"""MTA-STS (mtad.deliver.mtasts): the RFC 8461 grammar, hostile input, and the fetch + cache
against a real HTTPS policy server and a real DNS server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import pytest_asyncio
from dnsserver import DnsServer
from hypothesis import given, settings
from hypothesis import strategies as st
from stsserver import HANG, STS_DOMAINS, PolicyServer, Reply, policy_text, sts_tls
from support import Clock

from mtad.deliver.mtasts import (
    MAX_AGE_LIMIT,
    MAX_BODY,
    MtaSts,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
)
from mtad.dns import CachePolicy, Resolver

# --- the TXT record (RFC 8461 3.1) ----------------------------------------------------------


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc ;  "], "abc"),
    (["v=STSv1; ext-1.x=val; id=A1"], "A1"),
    (["v=STSv1; id=first; id=second"], "first"),
    (["v=spf1 -all", "v=STSv1; id=1"], "1"),  # other records are discarded
])
def test_txt_record(records: list[str], expected: str) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    ["v=STSv1; id=1", "v=STSv1; id=2"],  # two STSv1 records: no policy
    ["v=STSv1"],  # no id
    ["v=STSv1;"],
    ["v=STSv2; id=1"],
    ["V=STSv1; id=1"],  # case-sensitive
    [" v=STSv1; id=1"],
    ["v=STSv1; id="],
    ["v=STSv1; id=" + "a" * 33],  # 1 to 32 characters
    ["v=STSv1; id=ab-c"],
    ["v=STSv1; id=1;; x=y"],  # an empty field
    ["v=STSv1; id=1; bogus"],
    ["v=STSv1; id=1; x=a b"],
    ["v=STSv1; id=1\x00"],
])
def test_txt_record_refused(records: list[str]) -> None:
    with pytest.raises(PolicyError):
        parse_txt(records)


# --- the policy body (RFC 8461 3.2) ---------------------------------------------------------

def test_policy_parsed() -> None:
    body = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET\r\nmax_age: 604800\r\n"
    policy = parse_policy(body, "id1")
    assert (policy.id, policy.mode, policy.mx, policy.max_age) == (
        "id1", "enforce", ("mail.example.com", "*.example.net"), 604800)


def test_policy_lf_lines_whitespace_extensions_and_first_field_wins() -> None:
    body = (b"version:STSv1\nmode:   testing  \nmax_age: 10\nmax_age: 99\nmode: enforce\n"
            b"mx: a.example\n\nfuture_field.v2: some value here\nmx: b.example \t")
    policy = parse_policy(body)
    assert (policy.mode, policy.max_age, policy.mx) == ("testing", 10, ("a.example", "b.example"))


def test_policy_mode_none_needs_no_mx_and_max_age_is_capped() -> None:
    policy = parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999\n")
    assert policy.mode == "none" and policy.mx == () and policy.max_age == MAX_AGE_LIMIT


def test_policy_idna_mx_pattern() -> None:
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: *.bücher.example\nmax_age: 1\n".encode())
    assert policy.mx == ("*.xn--bcher-kva.example",)


BASE = {"version": "STSv1", "mode": "enforce", "mx": "mx.example", "max_age": "86400"}


@pytest.mark.parametrize("change", [
    {"version": "STSv2"}, {"version": None}, {"mode": "Enforce"}, {"mode": "report"}, {"mode": None},
    {"max_age": "-1"}, {"max_age": "12345678901"}, {"max_age": "1e5"}, {"max_age": "１２"}, {"max_age": None},
    {"mx": None}, {"mx": "mx.example bad"}, {"mx": "*"}, {"mx": "mx..example"}, {"mx": "a.*.example"},
    {"mx": "**.example"}, {"mx": ""},
])
def test_policy_refused(change: dict[str, str | None]) -> None:
    fields = {**BASE, **change}
    body = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None).encode()
    with pytest.raises(PolicyError):
        parse_policy(body)


@pytest.mark.parametrize("body", [
    b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 1\r\nnot a field\r\n",
    b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 1\r\n: value\r\n",
    b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 1\r\nx y: value\r\n",
    b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 1\r\nname: bad\x00value\r\n",
    b"version: STSv1\r\nmode: enforce\x0b\r\nmx: a.example\r\nmax_age: 1\r\n",
    b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 1\r\nnote: \xff\xfe\r\n",  # not UTF-8
    b"<html><body>version: STSv1</body></html>",
    b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 1\r\n" + b"x" * MAX_BODY,
    b"",
])
def test_hostile_policy_bodies_refused(body: bytes) -> None:
    with pytest.raises(PolicyError):
        parse_policy(body)


def test_long_whitespace_runs_parse_in_linear_time() -> None:
    # A value with a huge run of blanks in the middle (a regex that backtracks would hang).
    body = b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nnote: a" + b" " * 60000 + b"\x01"
    with pytest.raises(PolicyError):
        parse_policy(body)
    assert parse_txt(["v=STSv1; id=1;" + " " * 60000]) == "1"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_raise_policy_error(body: bytes) -> None:
    try:
        policy = parse_policy(body)
    except PolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none") and 0 <= policy.max_age <= MAX_AGE_LIMIT


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.text(max_size=200), max_size=4))
def test_any_txt_records_parse_or_raise_policy_error(records: list[str]) -> None:
    try:
        policy_id = parse_txt(records)
    except PolicyError:
        return
    assert 1 <= len(policy_id) <= 32 and policy_id.isalnum()


@pytest.mark.parametrize("pattern, host, expected", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.com.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),  # the wildcard is exactly one label (RFC 8461 4.1)
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "mx1.example.com.evil", False),
])
def test_mx_patterns(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


# --- fetch and cache against real servers ---------------------------------------------------


def zone(**txt: str) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for domain in STS_DOMAINS:
        out[f"mta-sts.{domain}"] = {"A": ["127.0.0.1"]}
    for domain, record in txt.items():
        # TTL 0: neither c-ares nor our resolver keeps the record, so a change is seen at once.
        out[f"_mta-sts.{domain.replace('_', '.')}"] = {"TXT": [record], "TTL": 0}
    return out


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[tuple[DnsServer, PolicyServer]]:
    with DnsServer(zone(sts_test="v=STSv1; id=1;")) as dns:
        async with PolicyServer() as web:
            yield dns, web


@asynccontextmanager
async def make(dns: DnsServer, web: PolicyServer, *, clock: Clock | None = None, ca: bool = True,
               timeout: float = 5) -> AsyncIterator[MtaSts]:
    """MtaSts on a resolver that asks `dns` and fetches from `web`; both closed on the way out."""
    resolver = Resolver([dns.address], 1.0, policy=CachePolicy(min_ttl=0))
    sts = MtaSts(resolver, port=web.port, ca_file=str(sts_tls().ca) if ca else "", timeout=timeout,
                 clock=clock or Clock(1000.0))
    try:
        yield sts
    finally:
        await sts.close()
        resolver.close()


@pytest.mark.asyncio
async def test_fetch_cache_and_refetch_on_id_change(servers: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = servers
    web.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"], max_age=3600)
    clock = Clock(1000.0)
    async with make(dns, web, clock=clock) as sts:
        policy = await sts.policy("sts.test")
        assert policy is not None and (policy.id, policy.mode, policy.mx) == ("1", "enforce", ("mx.peer.test",))
        # Within max_age and the same id: the cache answers, the TXT record is read again.
        txt_before = dns.count("_mta-sts.sts.test", "TXT")
        assert await sts.policy("STS.test.") == policy
        assert web.fetches["sts.test"] == 1
        assert dns.count("_mta-sts.sts.test", "TXT") == txt_before + 1
        # A new id in DNS: fetched again, the new policy applies.
        web.policies["sts.test"] = policy_text("testing", ["*.peer.test"], max_age=3600)
        dns.zone["_mta-sts.sts.test"]["TXT"] = ["v=STSv1; id=2;"]
        policy = await sts.policy("sts.test")
        assert policy is not None and (policy.id, policy.mode) == ("2", "testing")
        assert web.fetches["sts.test"] == 2
        # max_age over: fetched again although the id is the same.
        clock.now += 3601
        assert await sts.policy("sts.test") == policy
        assert web.fetches["sts.test"] == 3
        # The TXT record gone: the cached policy stays in force until it expires (RFC 8461 5.1).
        del dns.zone["_mta-sts.sts.test"]
        assert await sts.policy("sts.test") == policy
        clock.now += 3601
        assert await sts.policy("sts.test") is None
        assert web.fetches["sts.test"] == 3


@pytest.mark.asyncio
async def test_concurrent_callers_share_one_fetch(servers: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = servers
    web.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"])
    async with make(dns, web) as sts:
        policies = await asyncio.gather(*(sts.policy("sts.test") for _ in range(10)))
        assert all(p is not None and p.mode == "enforce" for p in policies)
        assert web.fetches["sts.test"] == 1 and sts.fetches == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("answer, ca", [
    (Reply(status=404, body=b"nope"), True),
    (Reply(status=301, headers={"Location": "https://mta-sts.other.test/.well-known/mta-sts.txt"}), True),
    (Reply(body=policy_text("enforce", ["mx.peer.test"]).encode(), content_type="text/html"), True),
    (Reply(body=b"version: STSv1\n" + b"#" * (MAX_BODY + 10)), True),
    (Reply(body=b"version: STSv1\nmode: enforce\n"), True),  # no max_age, no mx
    (Reply(body=policy_text("enforce", ["mx.peer.test"]).encode(), headers={"Content-Encoding": "gzip"}), True),
    (policy_text("enforce", ["mx.peer.test"]), False),  # the policy host's certificate is not trusted
    (HANG, True),
])
async def test_fetch_failures_mean_no_policy_and_are_not_retried_at_once(
        servers: tuple[DnsServer, PolicyServer], answer: str | Reply, ca: bool) -> None:
    dns, web = servers
    web.policies["sts.test"] = answer
    web.policies["other.test"] = policy_text("enforce", ["mx.peer.test"])
    clock = Clock(1000.0)
    async with make(dns, web, clock=clock, ca=ca, timeout=1) as sts:
        assert await sts.policy("sts.test") is None
        assert sts.fetches == 1 and web.fetches["other.test"] == 0  # no redirect followed
        assert await sts.policy("sts.test") is None
        assert sts.fetches == 1  # RFC 8461 3.3: not again for five minutes per id
        clock.now += 301
        web.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"])
        policy = await sts.policy("sts.test")
        assert sts.fetches == 2 and (policy is not None or not ca)


@pytest.mark.asyncio
async def test_failed_refresh_keeps_the_cached_policy(servers: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = servers
    web.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"])
    async with make(dns, web) as sts:
        first = await sts.policy("sts.test")
        assert first is not None
        web.policies["sts.test"] = Reply(status=500)
        dns.zone["_mta-sts.sts.test"]["TXT"] = ["v=STSv1; id=2;"]
        assert await sts.policy("sts.test") == first
        assert web.fetches["sts.test"] == 2


@pytest.mark.asyncio
async def test_no_txt_record_or_no_policy_host_means_no_policy(servers: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = servers
    dns.zone["_mta-sts.other.test"] = {"TXT": ["v=STSv1; id=1;", "v=STSv1; id=2;"], "TTL": 0}
    dns.zone["_mta-sts.nohost.test"] = {"TXT": ["v=STSv1; id=1;"], "TTL": 0}
    async with make(dns, web) as sts:
        assert await sts.policy("nothing.test") is None
        assert await sts.policy("other.test") is None  # two records: none (RFC 8461 3.1)
        assert await sts.policy("nohost.test") is None  # mta-sts.nohost.test does not resolve
        assert sts.fetches == 1 and sum(web.fetches.values()) == 0
