"""mtad.dns against a real authoritative server on loopback: aiodns/c-ares do real lookups.

The server (tests/dnsserver.py) counts queries per name, which is how caching and shared
lookups are shown. c-ares keeps a TTL cache of its own behind ours; where a test must see
our cache alone it uses answers c-ares does not cache (TTL 0, or negative answers without
an SOA).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnsserver import WILDCARD_HOST, DnsServer, Zone
from support import Clock

from mtad.dns import (
    CachePolicy,
    DnsError,
    MxRecord,
    Resolver,
    TtlCache,
    interleave,
    query_name,
)

ZONE: Zone = {
    "example.test": {"MX": [(20, "MX2.Example.Test."), (10, "mx1.example.test")], "TTL": 300},
    "mx1.example.test": {"A": ["127.0.0.11"], "AAAA": ["::1"], "TTL": 300},
    "v4only.test": {"A": ["127.0.0.12", "127.0.0.13"], "TTL": 0},
    "v6only.test": {"AAAA": ["2001:db8::1"]},
    "dual.test": {"A": ["127.0.0.21", "127.0.0.22"], "AAAA": ["2001:db8::21"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "nodata.test": {"TXT": ["v=spf1 -all"]},
    "broken.test": {"RCODE": "SERVFAIL"},
    "refused.test": {"RCODE": "REFUSED"},
    "slow.test": {"RCODE": "DROP"},
    "halfslow.test": {"A": ["127.0.0.31"], "AAAA": "DROP"},
    "alias.test": {"CNAME": "mx1.example.test"},
    "zero.test": {"MX": [(10, "mx1.example.test")], "TTL": 0},
    "short.test": {"MX": [(10, "mx1.example.test")], "TTL": 1},
}


MakeResolver = Callable[..., Resolver]



@pytest.fixture
def server() -> Iterator[DnsServer]:
    zone = {name: dict(entry) for name, entry in ZONE.items()}
    with DnsServer(zone) as dns:
        yield dns


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def make(server: DnsServer, clock: Clock) -> Iterator[MakeResolver]:
    made: list[Resolver] = []

    def factory(nameservers: list[str] | None = None, timeout: float = 1.0, **kwargs: object) -> Resolver:
        resolver = Resolver([server.address] if nameservers is None else nameservers, timeout,
                            clock=clock, **kwargs)  # type: ignore[arg-type]
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        resolver.close()


# -- pure pieces -----------------------------------------------------------------------------

def test_interleave_families() -> None:
    assert interleave(["a", "b", "c"], ["1"]) == ["a", "1", "b", "c"]
    assert interleave([], ["1", "2"]) == ["1", "2"]
    assert interleave(["a"], []) == ["a"]


@pytest.mark.parametrize("text", ["", ".", "a..b", "-a.test", "a-.test", "x" * 64 + ".test", "bücher.test",
                                  "a b.test", ("a." * 127) + "test"])
def test_query_name_refuses_what_is_not_a_name(text: str) -> None:
    with pytest.raises(DnsError) as caught:
        query_name(text)
    assert caught.value.kind == "badname"


def test_query_name_normalises() -> None:
    assert query_name(" MX.Example.TEST. ") == "mx.example.test"
    assert query_name("_dmarc.example.test") == "_dmarc.example.test"


def test_cache_is_lru_bounded_and_expires() -> None:
    cache: TtlCache[str] = TtlCache(3)
    for i, name in enumerate("abc"):
        cache.store((name, "A"), name.upper(), 100.0 + i)
    assert cache.lookup(("a", "A"), 50.0) == "A"  # a is now the most recently used
    cache.store(("d", "A"), "D", 200.0)
    assert len(cache) == 3
    assert cache.lookup(("b", "A"), 50.0) is None  # b was the least recently used
    assert cache.lookup(("a", "A"), 50.0) == "A"
    assert cache.lookup(("c", "A"), 102.0) is None  # expired at 102
    assert len(cache) == 2


def test_cache_policy_bounds() -> None:
    policy = CachePolicy(min_ttl=1, max_ttl=3600, negative_ttl=1, failure_ttl=2)
    record = (MxRecord(10, "mx.test"),)
    assert policy.seconds(record, 0) == 1
    assert policy.seconds(record, 300) == 300
    assert policy.seconds(record, 86400 * 7) == 3600
    assert policy.seconds("nxdomain", 0) == 5  # the negative floor
    assert policy.seconds("nodata", 0) == 5
    assert policy.seconds("servfail", 0) == 2
    assert policy.seconds("timeout", 0) == 2
    assert policy.seconds("badname", 0) == 0


# -- lookups against the server ----------------------------------------------------------------

@pytest.mark.asyncio
async def test_mx_sorted_lowercased_from_a_server_on_a_non_53_port(server: DnsServer, make: MakeResolver) -> None:
    assert server.port != 53
    resolver = make()
    assert await resolver.mx("Example.Test.") == [MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")]
    assert server.count("example.test", "MX") == 1


@pytest.mark.asyncio
async def test_nameserver_on_ipv6_loopback(make: MakeResolver) -> None:
    try:
        six = DnsServer(dict(ZONE), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with six:
        resolver = make([six.address])
        assert six.address.startswith("[::1]:")
        assert await resolver.addresses("dual.test") == ["2001:db8::21", "127.0.0.21", "127.0.0.22"]
        assert six.count("dual.test") == 2


@pytest.mark.asyncio
async def test_null_mx_comes_back_as_empty_host(make: MakeResolver) -> None:
    assert await make().mx("nullmx.test") == [MxRecord(0, "")]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "kind"), [
    ("nx.test", "nxdomain"), ("nodata.test", "nodata"), ("broken.test", "servfail"), ("refused.test", "refused"),
])
async def test_mx_failures_by_kind(make: MakeResolver, name: str, kind: str) -> None:
    with pytest.raises(DnsError) as caught:
        await make().mx(name)
    assert caught.value.kind == kind
    assert caught.value.temporary == (kind in ("servfail", "refused"))
    assert name in str(caught.value)


@pytest.mark.asyncio
async def test_badname_sends_no_query(server: DnsServer, make: MakeResolver) -> None:
    with pytest.raises(DnsError) as caught:
        await make().mx("bad..name.test")
    assert caught.value.kind == "badname"
    assert sum(server.queries.values()) == 0


@pytest.mark.asyncio
async def test_a_server_that_never_answers_times_out(server: DnsServer, make: MakeResolver) -> None:
    resolver = make(timeout=0.1)
    started = time.monotonic()
    with pytest.raises(DnsError) as caught:
        await resolver.mx("slow.test")
    assert caught.value.kind == "timeout"
    assert time.monotonic() - started < 2.0
    assert server.count("slow.test", "MX") >= 1


@pytest.mark.asyncio
async def test_no_server_listening_is_a_temporary_failure(make: MakeResolver) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        port = hole.getsockname()[1]
    with pytest.raises(DnsError) as caught:
        await make([f"127.0.0.1:{port}"], timeout=0.1).mx("example.test")
    assert caught.value.temporary


@pytest.mark.asyncio
async def test_addresses_interleave_ipv6_first(make: MakeResolver) -> None:
    resolver = make()
    assert await resolver.addresses("dual.test") == ["2001:db8::21", "127.0.0.21", "127.0.0.22"]
    assert await resolver.addresses("v4only.test") == ["127.0.0.12", "127.0.0.13"]
    assert await resolver.addresses("v6only.test") == ["2001:db8::1"]
    assert await resolver.addresses("alias.test") == ["::1", "127.0.0.11"]


@pytest.mark.asyncio
async def test_addresses_of_an_ip_literal_need_no_query(server: DnsServer, make: MakeResolver) -> None:
    resolver = make()
    assert await resolver.addresses("127.0.0.1") == ["127.0.0.1"]
    assert await resolver.addresses("2001:DB8:0::1") == ["2001:db8::1"]
    assert sum(server.queries.values()) == 0


@pytest.mark.asyncio
async def test_known_addresses_answers_from_the_cache_alone(server: DnsServer, make: MakeResolver) -> None:
    resolver = make()
    assert resolver.known_addresses("2001:db8::1") == ["2001:db8::1"]
    assert resolver.known_addresses("dual.test") is None
    assert isinstance(resolver.known_addresses("bad..name"), DnsError)
    await resolver.addresses("dual.test")
    assert resolver.known_addresses("dual.test") == ["2001:db8::21", "127.0.0.21", "127.0.0.22"]
    with pytest.raises(DnsError):
        await resolver.addresses("nx.test")
    missing = resolver.known_addresses("nx.test")
    assert isinstance(missing, DnsError) and missing.kind == "nxdomain"
    assert server.count("dual.test") == 2


@pytest.mark.asyncio
async def test_addresses_asks_both_families_at_once(server: DnsServer, make: MakeResolver) -> None:
    # AAAA is dropped, A answers. A is asked while AAAA is still unanswered (one after the
    # other, A would wait out AAAA's timeout), and its answer is used once AAAA times out.
    resolver = make(timeout=0.5)
    started = time.monotonic()
    lookup = asyncio.ensure_future(resolver.addresses("halfslow.test"))
    while server.count("halfslow.test", "A") == 0:
        assert time.monotonic() - started < 0.4, "A was not asked while AAAA was pending"
        await asyncio.sleep(0.01)
    assert not lookup.done()
    assert server.count("halfslow.test", "AAAA") == 1
    assert await lookup == ["127.0.0.31"]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "kind"), [("nx.test", "nxdomain"), ("nodata.test", "nodata"),
                                            ("broken.test", "servfail"), ("slow.test", "timeout")])
async def test_addresses_failures(make: MakeResolver, name: str, kind: str) -> None:
    with pytest.raises(DnsError) as caught:
        await make(timeout=0.1).addresses(name)
    assert caught.value.kind == kind


# -- caching -----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_positive_answers_cached_then_expire_by_ttl(server: DnsServer, make: MakeResolver,
                                                          clock: Clock) -> None:
    # TTL 0 is not cached by c-ares; ours keeps it min_ttl (1 s) on the injected clock.
    resolver = make()
    await resolver.mx("zero.test")
    clock.now += 0.5
    await resolver.mx("zero.test")
    assert server.count("zero.test", "MX") == 1
    clock.now += 1.0
    await resolver.mx("zero.test")
    assert server.count("zero.test", "MX") == 2


@pytest.mark.asyncio
async def test_real_ttl_expiry_end_to_end(server: DnsServer) -> None:
    resolver = Resolver([server.address], 1.0)  # the real clock: both caches expire the 1 s TTL
    try:
        await resolver.mx("short.test")
        await resolver.mx("short.test")
        assert server.count("short.test", "MX") == 1
        deadline = time.monotonic() + 5
        while server.count("short.test", "MX") < 2:
            assert time.monotonic() < deadline, "a 1 s TTL was never asked again"
            await asyncio.sleep(0.05)
            await resolver.mx("short.test")
    finally:
        resolver.close()


@pytest.mark.asyncio
async def test_negative_answers_cached(server: DnsServer, make: MakeResolver, clock: Clock) -> None:
    server.soa = False  # so c-ares does not cache it: what is seen is our cache
    resolver = make(policy=CachePolicy(negative_ttl=10))
    for _ in range(3):
        with pytest.raises(DnsError):
            await resolver.mx("nx.test")
    assert server.count("nx.test", "MX") == 1
    server.zone["nx.test"] = {"MX": [(10, "mx1.example.test")]}
    clock.now += 9
    with pytest.raises(DnsError):
        await resolver.mx("nx.test")
    clock.now += 2
    assert await resolver.mx("nx.test") == [MxRecord(10, "mx1.example.test")]
    assert server.count("nx.test", "MX") == 2


@pytest.mark.asyncio
async def test_failures_cached_briefly(server: DnsServer, make: MakeResolver, clock: Clock) -> None:
    resolver = make(policy=CachePolicy(failure_ttl=2))
    with pytest.raises(DnsError):
        await resolver.mx("broken.test")
    asked = server.count("broken.test", "MX")  # c-ares asks again after a SERVFAIL (TRIES)
    clock.now += 1.5
    with pytest.raises(DnsError):
        await resolver.mx("broken.test")
    assert server.count("broken.test", "MX") == asked
    server.zone["broken.test"] = {"MX": [(5, "mx1.example.test")], "TTL": 0}
    clock.now += 1.0
    assert await resolver.mx("broken.test") == [MxRecord(5, "mx1.example.test")]


@pytest.mark.asyncio
async def test_cache_bounded_by_entries(server: DnsServer, make: MakeResolver) -> None:
    resolver = make(max_entries=2)
    await resolver.mx("zero.test")
    await resolver.addresses("v4only.test")  # two more entries (AAAA, A) push zero.test out
    await resolver.mx("zero.test")
    assert server.count("zero.test", "MX") == 2


@pytest.mark.asyncio
async def test_concurrent_lookups_share_one_query(server: DnsServer, make: MakeResolver) -> None:
    resolver = make()
    answers = await asyncio.gather(*(resolver.mx("zero.test") for _ in range(50)))
    assert all(answer == [MxRecord(10, "mx1.example.test")] for answer in answers)
    assert server.count("zero.test", "MX") == 1


@pytest.mark.asyncio
async def test_one_cancelled_waiter_does_not_cancel_the_shared_lookup(server: DnsServer,
                                                                       make: MakeResolver) -> None:
    resolver = make()
    first = asyncio.ensure_future(resolver.mx("zero.test"))
    second = asyncio.ensure_future(resolver.mx("zero.test"))
    await asyncio.sleep(0)  # both are waiting on the one query now
    first.cancel()
    assert await second == [MxRecord(10, "mx1.example.test")]
    assert first.cancelled()
    assert server.count("zero.test", "MX") == 1


@pytest.mark.asyncio
async def test_close_frees_the_channel(make: MakeResolver) -> None:
    resolver = make()
    await resolver.mx("example.test")
    resolver.close()
    resolver.close()
    with pytest.raises(RuntimeError):
        await resolver.mx("zero.test")
    Resolver([], 1.0).close()  # never used: nothing to free


# -- the test server itself, standalone, and under uvloop -----------------------------------------

def test_standalone_server_with_wildcard_mx() -> None:
    script = Path(__file__).with_name("dnsserver.py")
    with subprocess.Popen([sys.executable, str(script), "--port", "0", "--wildcard-mx-to", "127.0.0.1"],
                          stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            port = int(process.stdout.readline())
            _standalone_lookups(port)
        finally:
            process.terminate()
            assert process.wait(5) == 0


def _standalone_lookups(port: int) -> None:
    async def lookups() -> tuple[list[MxRecord], list[str]]:
        resolver = Resolver([f"127.0.0.1:{port}"], 1.0)
        try:
            records = await resolver.mx("domain-17.bench.test")
            return records, await resolver.addresses(records[0].host)
        finally:
            resolver.close()

    records, addresses = asyncio.run(lookups())
    assert records == [MxRecord(10, WILDCARD_HOST)]
    assert addresses == ["127.0.0.1"]


def test_lookups_under_uvloop(server: DnsServer) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def lookup() -> list[str]:
        resolver = Resolver([server.address], 1.0)
        try:
            return await resolver.addresses("dual.test")
        finally:
            resolver.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(lookup()) == ["2001:db8::21", "127.0.0.21", "127.0.0.22"]
