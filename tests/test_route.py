"""mtad.deliver.route: routes, MX, implicit MX, null MX, DNS failures and loops.

A real DNS server on loopback answers; aiodns does real lookups through mtad.dns.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterator

import pytest
from dnsserver import DnsServer, Zone

from mtad.config.schema import Route
from mtad.deliver.outcome import Outcome
from mtad.deliver.route import NextHop, Router
from mtad.dns import MxRecord, Resolver

OURS = "mx.ours.test"

ZONE: Zone = {
    "example.test": {"MX": [(10, "mx1.example.test"), (10, "mx2.example.test"), (20, "mx3.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.11"]},
    "mx2.example.test": {"A": ["127.0.0.12"], "AAAA": ["2001:db8::12"]},
    "mx3.example.test": {"A": ["127.0.0.13"]},
    "implicit.test": {"A": ["127.0.0.20"], "AAAA": ["2001:db8::20"]},
    "xn--bcher-kva.test": {"MX": [(10, "mx1.example.test")]},  # bücher.test (SMTPUTF8 recipients)
    "nullmx.test": {"MX": [(0, ".")]},
    "halfnull.test": {"MX": [(0, "."), (10, "mx1.example.test")]},
    "nothing.test": {"TXT": ["v=spf1 -all"]},
    "broken.test": {"RCODE": "SERVFAIL"},
    "slow.test": {"RCODE": "DROP"},
    "deadmx.test": {"MX": [(10, "nohost.test"), (20, "nothing.test")]},
    "flakymx.test": {"MX": [(10, "broken.test"), (20, "nohost.test")]},
    "partial.test": {"MX": [(10, "nohost.test"), (20, "mx3.example.test")]},
    "samehost.test": {"MX": [(10, "mx2.example.test"), (20, "mx2-alias.test")]},
    "mx2-alias.test": {"A": ["127.0.0.12", "127.0.0.14"]},
    "many.test": {"MX": [(i, f"mx{i}.many.test") for i in range(1, 9)]},
    **{f"mx{i}.many.test": {"A": [f"127.0.1.{i}"]} for i in range(1, 9)},
    # loops
    OURS: {"A": ["127.0.0.1"]},
    "loopname.test": {"MX": [(10, OURS), (20, "mx3.example.test")]},
    "backup.test": {"MX": [(5, "mx1.example.test"), (10, OURS), (10, "mx2.example.test"), (20, "mx3.example.test")]},
    "self.test": {"A": ["127.0.0.1"]},
    "loopaddr.test": {"MX": [(10, "self.test")]},
    "wildloop.test": {"MX": [(10, "zero.test")]},
    "zero.test": {"A": ["0.0.0.0"]},
    "selfimplicit.test": {"A": ["127.0.0.1"]},
    # static route hosts
    "relay.test": {"A": ["127.0.0.30"]},
    "relay-broken.test": {"RCODE": "SERVFAIL"},
}

MakeRouter = Callable[..., Router]


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer({name: dict(entry) for name, entry in ZONE.items()}) as dns:
        yield dns


@pytest.fixture
def make(server: DnsServer) -> Iterator[MakeRouter]:
    resolvers: list[Resolver] = []

    def factory(routes: list[Route] | None = None, *, own_names: set[str] | None = None,
                own_addresses: set[str] | None = None, timeout: float = 1.0, **kwargs: object) -> Router:
        resolver = Resolver([server.address], timeout)
        resolvers.append(resolver)
        return Router(routes or [], resolver, own_names={OURS} if own_names is None else own_names,
                      own_addresses={"127.0.0.1:2525"} if own_addresses is None else own_addresses,
                      **kwargs)  # type: ignore[arg-type]

    yield factory
    for resolver in resolvers:
        resolver.close()


def outcome(result: list[NextHop] | Outcome) -> Outcome:
    assert isinstance(result, Outcome), result
    assert result.scope == "destination" and result.phase == "dns"
    return result


def hops(result: list[NextHop] | Outcome) -> list[NextHop]:
    assert isinstance(result, list), result
    return result


# -- destination keys ----------------------------------------------------------------------------

def test_destination_key_without_routes(make: MakeRouter) -> None:
    router = make()
    assert router.destination_key("Example.TEST.") == "example.test"
    assert router.destination_key("[127.0.0.1]") == "[127.0.0.1]"


def test_destination_key_exact_route_before_star(make: MakeRouter) -> None:
    router = make([Route(domain="*", nexthop="relay.test:2527"), Route(domain="Routed.Test", nexthop="127.0.0.1:2526"),
                   Route(domain="six.test", nexthop="[::1]:2526")])
    assert router.destination_key("routed.TEST") == "[127.0.0.1]:2526"
    assert router.destination_key("six.test") == "[::1]:2526"
    assert router.destination_key("anything.test") == "[relay.test]:2527"
    assert router.destination_key("other.test") == router.destination_key("anything.test")


# -- MX ----------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_mx_in_preference_order(make: MakeRouter) -> None:
    found = hops(await make().resolve("example.test"))
    assert {hop.host for hop in found[:2]} == {"mx1.example.test", "mx2.example.test"}
    assert found[2] == NextHop(host="mx3.example.test", port=25, addresses=["127.0.0.13"], mx=True)
    mx2 = next(hop for hop in found if hop.host == "mx2.example.test")
    assert mx2.addresses == ["2001:db8::12", "127.0.0.12"] and mx2.mx


@pytest.mark.asyncio
async def test_equal_preferences_shuffled(make: MakeRouter) -> None:
    router = make(rng=random.Random(7))
    firsts: collections.Counter[str] = collections.Counter()
    for _ in range(400):  # answers are cached: this is the shuffle, not 400 lookups
        found = hops(await router.resolve("example.test"))
        firsts[found[0].host] += 1
        assert found[2].host == "mx3.example.test"
    assert set(firsts) == {"mx1.example.test", "mx2.example.test"}
    assert 140 <= firsts["mx1.example.test"] <= 260  # binomial(400, 1/2): mean 200, sd 10


def test_order_spreads_evenly_among_equals(make: MakeRouter) -> None:
    router = make(rng=random.Random(11))
    records = [MxRecord(10, "a"), MxRecord(10, "b"), MxRecord(10, "c"), MxRecord(5, "best"), MxRecord(30, "last")]
    firsts: collections.Counter[str] = collections.Counter()
    for _ in range(3000):
        ordered = router.order(records)
        assert ordered[0].host == "best" and ordered[-1].host == "last"
        firsts[ordered[1].host] += 1
    assert all(850 <= firsts[name] <= 1150 for name in "abc"), firsts  # mean 1000, sd 26


@pytest.mark.asyncio
async def test_implicit_mx_when_there_is_none(make: MakeRouter, server: DnsServer) -> None:
    found = hops(await make().resolve("implicit.test"))
    assert found == [NextHop(host="implicit.test", port=25, addresses=["2001:db8::20", "127.0.0.20"], mx=False)]
    assert server.count("implicit.test", "MX") == 1


@pytest.mark.asyncio
async def test_internationalised_domain_is_looked_up_by_its_a_label(make: MakeRouter, server: DnsServer) -> None:
    router = make()
    assert router.destination_key("Bücher.Test.") == "xn--bcher-kva.test"
    found = hops(await router.resolve("bücher.test"))
    assert [hop.host for hop in found] == ["mx1.example.test"]
    assert server.count("xn--bcher-kva.test", "MX") == 1


@pytest.mark.asyncio
async def test_null_mx_bounces_5_1_10(make: MakeRouter, server: DnsServer) -> None:
    result = outcome(await make().resolve("nullmx.test"))
    assert (result.kind, result.status) == ("bounced", "5.1.10")
    assert "nullmx.test" in result.reply
    assert server.count("nullmx.test", "A") == 0  # no implicit MX behind a null MX


@pytest.mark.asyncio
async def test_null_mx_among_real_ones_is_ignored(make: MakeRouter) -> None:
    assert [hop.host for hop in hops(await make().resolve("halfnull.test"))] == ["mx1.example.test"]


@pytest.mark.asyncio
async def test_nxdomain_bounces_5_1_2(make: MakeRouter) -> None:
    result = outcome(await make().resolve("nx.test"))
    assert (result.kind, result.status) == ("bounced", "5.1.2")
    assert "Host or domain name not found" in result.reply


@pytest.mark.asyncio
async def test_no_mx_and_no_address_bounces_5_4_4(make: MakeRouter) -> None:
    result = outcome(await make().resolve("nothing.test"))
    assert (result.kind, result.status) == ("bounced", "5.4.4")


@pytest.mark.asyncio
@pytest.mark.parametrize("domain", ["broken.test", "slow.test"])
async def test_dns_failure_defers_4_4_3(make: MakeRouter, domain: str) -> None:
    result = outcome(await make(timeout=0.1).resolve(domain))
    assert (result.kind, result.status) == ("deferred", "4.4.3")
    assert "try again" in result.reply


@pytest.mark.asyncio
async def test_mx_hosts_without_address_defer(make: MakeRouter) -> None:
    router = make()
    dead = outcome(await router.resolve("deadmx.test"))
    assert (dead.kind, dead.status) == ("deferred", "4.4.4")
    assert "nohost.test" in dead.reply
    flaky = outcome(await router.resolve("flakymx.test"))
    assert (flaky.kind, flaky.status) == ("deferred", "4.4.3")


@pytest.mark.asyncio
async def test_unresolvable_mx_hosts_skipped(make: MakeRouter) -> None:
    assert [hop.host for hop in hops(await make().resolve("partial.test"))] == ["mx3.example.test"]


@pytest.mark.asyncio
async def test_an_address_is_tried_once(make: MakeRouter) -> None:
    found = hops(await make().resolve("samehost.test"))
    assert [hop.addresses for hop in found] == [["2001:db8::12", "127.0.0.12"], ["127.0.0.14"]]


@pytest.mark.asyncio
async def test_max_mx_hosts(make: MakeRouter, server: DnsServer) -> None:
    found = hops(await make(max_mx=3).resolve("many.test"))
    assert [hop.host for hop in found] == ["mx1.many.test", "mx2.many.test", "mx3.many.test"]
    assert server.count("mx4.many.test") == 0


# -- address literals --------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_address_literals_go_straight_to_the_address(make: MakeRouter, server: DnsServer) -> None:
    router = make()
    assert hops(await router.resolve("[127.0.0.9]")) == [NextHop("127.0.0.9", 25, ["127.0.0.9"], False)]
    assert hops(await router.resolve("[IPv6:2001:DB8::9]")) == [NextHop("2001:db8::9", 25, ["2001:db8::9"], False)]
    assert sum(server.queries.values()) == 0
    bad = outcome(await router.resolve("[300.1.1.1]"))
    assert (bad.kind, bad.status) == ("bounced", "5.1.2")


# -- static routes -------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_static_routes_need_no_mx_lookup(make: MakeRouter, server: DnsServer) -> None:
    router = make([Route(domain="*", nexthop="relay.test:2527"), Route(domain="routed.test", nexthop="127.0.0.1:2526"),
                   Route(domain="six.test", nexthop="[::1]:2526")])
    assert hops(await router.resolve("routed.test")) == [NextHop("127.0.0.1", 2526, ["127.0.0.1"], False)]
    assert hops(await router.resolve("six.test")) == [NextHop("::1", 2526, ["::1"], False)]
    assert hops(await router.resolve("example.test")) == [NextHop("relay.test", 2527, ["127.0.0.30"], False)]
    assert hops(await router.resolve("[192.0.2.1]")) == [NextHop("relay.test", 2527, ["127.0.0.30"], False)]
    assert server.count("example.test") == server.count("routed.test") == 0


@pytest.mark.asyncio
async def test_static_route_host_that_fails_defers(make: MakeRouter) -> None:
    router = make([Route(domain="gone.test", nexthop="nohost.test:25"),
                   Route(domain="flaky.test", nexthop="relay-broken.test:25")])
    gone = outcome(await router.resolve("gone.test"))
    assert (gone.kind, gone.status) == ("deferred", "4.4.4")
    flaky = outcome(await router.resolve("flaky.test"))
    assert (flaky.kind, flaky.status) == ("deferred", "4.4.3")


# -- loops -------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_best_mx_named_as_us_is_a_loop(make: MakeRouter) -> None:
    result = outcome(await make().resolve("loopname.test"))
    assert (result.kind, result.status) == ("bounced", "5.4.6")
    assert result.reply == "mail for loopname.test loops back to myself"


@pytest.mark.asyncio
async def test_backup_mx_sends_only_to_better_ones(make: MakeRouter) -> None:
    # We are at 10: mx2 (also 10) and mx3 (20) are dropped, mx1 (5) stays.
    assert [hop.host for hop in hops(await make().resolve("backup.test"))] == ["mx1.example.test"]


@pytest.mark.asyncio
async def test_best_mx_resolving_to_our_port_25_listener_is_a_loop(make: MakeRouter) -> None:
    looped = outcome(await make(own_addresses={"127.0.0.1:25"}).resolve("loopaddr.test"))
    assert looped.status == "5.4.6"
    # The same MX when we listen on 127.0.0.1:2525 only: a server on port 25 there is not us.
    assert hops(await make(own_addresses={"127.0.0.1:2525"}).resolve("loopaddr.test"))[0].addresses == ["127.0.0.1"]


@pytest.mark.asyncio
async def test_wildcard_listener_reaches_loopback_and_unspecified(make: MakeRouter) -> None:
    router = make(own_addresses={"0.0.0.0:25"})
    assert outcome(await router.resolve("loopaddr.test")).status == "5.4.6"
    assert outcome(await router.resolve("wildloop.test")).status == "5.4.6"  # MX host -> 0.0.0.0
    assert outcome(await router.resolve("selfimplicit.test")).status == "5.4.6"  # implicit MX
    assert router.is_own("127.0.0.1", 25) and router.is_own("::ffff:127.0.0.1", 25)
    assert not router.is_own("::1", 25)  # 0.0.0.0 takes IPv4 only
    assert make(own_addresses={"[::]:25"}).is_own("::1", 25)
    assert not router.is_own("192.0.2.77", 25)  # not an address of this host
    assert not router.is_own("127.0.0.1", 2526)


@pytest.mark.asyncio
async def test_mx_port_decides_what_an_mx_reaches(make: MakeRouter) -> None:
    # A test sink on 127.0.0.1:2526 reached through MX: not us while we listen on 2525.
    router = make(own_addresses={"127.0.0.1:2525"}, mx_port=2526)
    assert hops(await router.resolve("loopaddr.test")) == [NextHop("self.test", 2526, ["127.0.0.1"], True)]
    assert outcome(await make(own_addresses={"127.0.0.1:2526"}, mx_port=2526).resolve("loopaddr.test")).status \
        == "5.4.6"


@pytest.mark.asyncio
async def test_static_route_loops_compare_address_and_port(make: MakeRouter) -> None:
    routes = [Route(domain="sink.test", nexthop="127.0.0.1:2526"), Route(domain="back.test", nexthop="127.0.0.1:2525"),
              Route(domain="byname.test", nexthop=f"{OURS}:2525"), Route(domain="bare.test", nexthop="127.0.0.7:2600")]
    router = make(routes, own_addresses={"127.0.0.1:2525", "127.0.0.7"})
    assert hops(await router.resolve("sink.test"))[0].port == 2526
    assert outcome(await router.resolve("back.test")).status == "5.4.6"
    assert outcome(await router.resolve("byname.test")).status == "5.4.6"
    assert outcome(await router.resolve("bare.test")).status == "5.4.6"  # a bare own IP: every port


@pytest.mark.asyncio
async def test_literal_of_our_own_address_is_a_loop(make: MakeRouter) -> None:
    assert outcome(await make(own_addresses={"127.0.0.1:25"}).resolve("[127.0.0.1]")).status == "5.4.6"
    assert hops(await make(own_addresses={"127.0.0.1:2525"}).resolve("[127.0.0.1]"))[0].port == 25
