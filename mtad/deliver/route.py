"""Routing: which destination queue a recipient domain joins, and where its mail goes.

`Router.destination_key()` is sync and cheap (called per recipient): a domain with a
`[[route]]` (exact domain first, then "*") shares the queue of its next hop, written
"[host]:port" (brackets: no MX lookup, as in Postfix's transport syntax); any other domain is
its own destination.

`Router.resolve()` turns a domain into next hops to try in order, or into a destination-wide
Outcome (phase "dns"):

    static route        its host (IP literal, or a name resolved for AAAA+A); no MX lookup
    address literal     [192.0.2.1] / [IPv6:2001:db8::1] straight to that address
    MX                  by preference, random among equal preferences, at most max_mx hosts;
                        hosts that do not resolve are skipped
    no MX (NODATA)      implicit MX: the domain's own AAAA/A (RFC 5321 5.1)
    null MX             bounced 5.1.10 (RFC 7505 3.2); a "." among real MX hosts is ignored
    NXDOMAIN            bounced 5.1.2  (RFC 3463: bad destination system address)
    no MX, no address   bounced 5.4.4  (RFC 5321 5.1: no implicit MX either; unable to route)
    DNS failure         deferred 4.4.3 (SERVFAIL, REFUSED, timeout: directory server failure)
    MX hosts without    deferred 4.4.4 (unable to route) when every host is NXDOMAIN/NODATA,
    addresses           4.4.3 when any host's lookup failed. Deferred, not bounced: a broken
                        MX host is usually fixed within the queue lifetime.
    a static route      deferred 4.4.3 / 4.4.4 likewise: a route is the operator's config,
    host that fails     and a config mistake must not bounce mail.
    loop                bounced 5.4.6 "mail for D loops back to myself"

MX, implicit MX and address-literal next hops use port `mx_port` ([delivery] mx_port, 25).

Loops (RFC 5321 5.1): an MX host is ours when its name is one of own_names, or one of its
addresses reaches one of our listeners on mx_port. That host and every host of the same or a
worse preference are dropped (we are a backup MX: send only to better ones); if none is left,
the mail would come back to us. A static route or an address literal is
ours only when address AND port reach a listener: a test sink on 127.0.0.1:other-port is not us.
A listener on 0.0.0.0 or [::] reaches loopback addresses and any address this host owns (found
by binding to it); a destination of 0.0.0.0 or :: reaches the local host.

Trust: DNS answers are hostile input (see mtad.dns); route config was validated by
mtad.config.checks.
RFCs: 5321 5.1 (MX, implicit MX, loops), 7505 (null MX), 3463 (status codes), 8305 (address
order, via mtad.dns).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
from collections.abc import Iterable

import msgspec

from mtad.address import AddressError
from mtad.address import normalize_domain as normalize_address_domain
from mtad.config.endpoints import HostPort, normalize_domain, parse_hostport
from mtad.config.schema import Route
from mtad.deliver.outcome import Outcome, local
from mtad.dns import DnsError, MxRecord, Resolver

SMTP_PORT = 25


class NextHop(msgspec.Struct, frozen=True):
    host: str
    """The name (MX host, route host) for logging and TLS SNI/verification; an IP for literals."""
    port: int
    addresses: list[str]
    """IPs to try, in order."""
    mx: bool
    """Came from an MX record (False: static route, address literal or implicit MX)."""


class Router:
    """Routes and DNS turned into next hops, with RFC 5321 loop detection."""

    def __init__(self, routes: list[Route], resolver: Resolver, *, own_names: set[str], own_addresses: set[str],
                 max_mx: int = 5, mx_port: int = SMTP_PORT, rng: random.Random | None = None) -> None:
        """own_addresses: our listeners as "ip:port" / "[v6]:port", or a bare IP for every port."""
        self._routes: dict[str, HostPort] = {}
        for route in routes:
            domain = "*" if route.domain == "*" else normalize_domain(route.domain)
            self._routes.setdefault(domain, parse_hostport(route.nexthop, allow_port_zero=False))
        self._keys = {domain: f"[{hop.host}]:{hop.port}" for domain, hop in self._routes.items()}
        self._resolver = resolver
        self._own_names = {name.lower().rstrip(".") for name in own_names if name}
        self._own = [_listener(text) for text in own_addresses]
        self._is_own: dict[tuple[str, int], bool] = {}
        self._max_mx = max_mx
        self._mx_port = mx_port
        self._rng = rng or random.Random()

    def set_own_addresses(self, own_addresses: set[str]) -> None:
        """Our listeners' bound addresses, known only once they are open (port 0 in tests)."""
        self._own = [_listener(text) for text in own_addresses]
        self._is_own.clear()

    def destination_key(self, domain: str) -> str:
        """The route's "[host]:port" when a route matches, else the domain's lookup form."""
        name = lookup_name(domain)
        return self._keys.get(name) or self._keys.get("*") or name

    async def resolve(self, domain: str) -> list[NextHop] | Outcome:
        """Next hops in the order to try them, or the Outcome for every recipient of the domain."""
        name = lookup_name(domain)
        route = self._routes.get(name) or self._routes.get("*")
        if route is not None:
            return await self._static(name, route)
        if name.startswith("["):
            return self._literal(name)
        return await self._mx(name)

    def is_own(self, address: str, port: int) -> bool:
        """Would a connection to address:port reach one of our listeners?"""
        known = self._is_own.get((address, port))
        if known is None:
            if len(self._is_own) >= 65536:
                self._is_own.clear()
            known = self._is_own[(address, port)] = any(
                own_port in (None, port) and _reaches(own_ip, address) for own_ip, own_port in self._own)
        return known

    # -- the three kinds of destination ------------------------------------------------------

    async def _static(self, domain: str, route: HostPort) -> list[NextHop] | Outcome:
        try:
            addresses = await self._resolver.addresses(route.host)
        except DnsError as exc:
            status = "4.4.3" if exc.temporary else "4.4.4"
            return local("deferred", status, f"next hop {route} of the route for {domain}: "
                         f"{_words(exc)}", phase="dns")
        if any(self.is_own(address, route.port) for address in addresses):
            return _loop(domain)
        return [NextHop(host=route.host, port=route.port, addresses=addresses, mx=False)]

    def _literal(self, domain: str) -> list[NextHop] | Outcome:
        inner = domain[1:-1].removeprefix("ipv6:") if domain.endswith("]") else ""
        try:
            address = ipaddress.ip_address(inner).compressed
        except ValueError:
            return local("bounced", "5.1.2", f"bad address literal {domain}", phase="dns")
        if self.is_own(address, self._mx_port):
            return _loop(domain)
        return [NextHop(host=address, port=self._mx_port, addresses=[address], mx=False)]

    async def _mx(self, domain: str) -> list[NextHop] | Outcome:
        try:
            records = await self._resolver.mx(domain)
        except DnsError as exc:
            if exc.kind == "nodata":
                return await self._implicit(domain)
            return _dns_failure(domain, "MX", exc)
        usable = [record for record in records if record.host]
        if not usable:
            return local("bounced", "5.1.10", f"Domain {domain} does not accept mail (nullMX)", phase="dns")
        ordered = self.order(usable)
        ours = [record.preference for record in ordered if record.host in self._own_names]
        if ours:
            ordered = [record for record in ordered if record.preference < min(ours)]
        ordered = ordered[:self._max_mx]
        answers = await self._addresses_of([record.host for record in ordered])
        cut = next((record.preference for record, found in zip(ordered, answers)
                    if isinstance(found, list) and any(self.is_own(a, self._mx_port) for a in found)), None)
        if cut is not None:
            answers = [found for record, found in zip(ordered, answers) if record.preference < cut]
            ordered = [record for record in ordered if record.preference < cut]
        if not ordered:
            return _loop(domain)
        return self._hops(domain, ordered, answers)

    async def _implicit(self, domain: str) -> list[NextHop] | Outcome:
        try:
            addresses = await self._resolver.addresses(domain)
        except DnsError as exc:
            if exc.kind == "nodata":
                return local("bounced", "5.4.4", f"no MX and no address record for {domain}", phase="dns")
            return _dns_failure(domain, "AAAA/A", exc)
        if domain in self._own_names or any(self.is_own(a, self._mx_port) for a in addresses):
            return _loop(domain)
        return [NextHop(host=domain, port=self._mx_port, addresses=addresses, mx=False)]

    # -- pieces ------------------------------------------------------------------------------

    def order(self, records: Iterable[MxRecord]) -> list[MxRecord]:
        """By preference, shuffled among equal preferences (RFC 5321 5.1: spread the load)."""
        return sorted(records, key=lambda record: (record.preference, self._rng.random()))

    async def _addresses_of(self, hosts: list[str]) -> list[list[str] | DnsError]:
        """Addresses of every host, or why not; the ones not cached are looked up at once."""
        found = [self._resolver.known_addresses(host) for host in hosts]
        missing = [i for i, known in enumerate(found) if known is None]
        if missing:
            asked = await asyncio.gather(*(self._ask(hosts[i]) for i in missing))
            for i, answer in zip(missing, asked):
                found[i] = answer
        return [answer for answer in found if answer is not None]

    async def _ask(self, host: str) -> list[str] | DnsError:
        try:
            return await self._resolver.addresses(host)
        except DnsError as exc:
            return exc

    def _hops(self, domain: str, records: list[MxRecord], answers: list[list[str] | DnsError]) -> list[NextHop] | Outcome:
        hops: list[NextHop] = []
        seen: set[str] = set()
        failures: list[DnsError] = []
        for record, found in zip(records, answers):
            if isinstance(found, DnsError):
                failures.append(found)
                continue
            fresh = [address for address in found if address not in seen]
            seen.update(fresh)
            if fresh:
                hops.append(NextHop(host=record.host, port=self._mx_port, addresses=fresh, mx=True))
        if hops:
            return hops
        if any(failure.temporary for failure in failures):
            return local("deferred", "4.4.3", f"no MX host of {domain} could be resolved, try again: "
                         + "; ".join(_words(failure) for failure in failures), phase="dns")
        return local("deferred", "4.4.4", f"no MX host of {domain} has an address: "
                     + "; ".join(_words(failure) for failure in failures), phase="dns")


def lookup_name(domain: str) -> str:
    """A recipient domain as DNS and routes know it: lowercase, no trailing dot, and A-labels for
    an internationalised (SMTPUTF8) domain. A name that is not valid stays as it is (its lookup
    then fails as NXDOMAIN would)."""
    name = domain.strip().rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        return normalize_address_domain(name, smtputf8=True)
    except AddressError:
        return name.lower()


def _loop(domain: str) -> Outcome:
    return local("bounced", "5.4.6", f"mail for {domain} loops back to myself", phase="dns")


def _dns_failure(domain: str, qtype: str, exc: DnsError) -> Outcome:
    words = f"Host or domain name not found. Name service error for name={domain} type={qtype}: "
    if exc.kind in ("nxdomain", "badname"):
        return local("bounced", "5.1.2", words + "Host not found", phase="dns")
    if exc.kind == "timeout":
        return local("deferred", "4.4.3", words + "lookup timed out, try again", phase="dns")
    return local("deferred", "4.4.3", words + "Host not found, try again", phase="dns")


def _words(exc: DnsError) -> str:
    return {
        "nxdomain": f"{exc.name}: host not found",
        "nodata": f"{exc.name}: no address record",
        "badname": f"{exc.name}: not a valid host name",
        "timeout": f"{exc.name}: DNS lookup timed out",
    }.get(exc.kind, f"{exc.name}: DNS server failure ({exc.kind})")


def _listener(text: str) -> tuple[str, int | None]:
    """One of own_addresses: "ip:port", "[v6]:port", or a bare IP meaning every port."""
    try:
        return ipaddress.ip_address(text).compressed, None
    except ValueError:
        pass
    endpoint = parse_hostport(text)
    ipaddress.ip_address(endpoint.host)  # ValueError for a name: own addresses are addresses
    return endpoint.host, endpoint.port


def _reaches(listener: str, destination: str) -> bool:
    """Does a connection to `destination` arrive at a socket bound to `listener`?"""
    try:
        dest = ipaddress.ip_address(destination)
    except ValueError:
        return False
    if isinstance(dest, ipaddress.IPv6Address) and dest.ipv4_mapped:
        dest = dest.ipv4_mapped
    if dest.is_unspecified:  # connect() to 0.0.0.0 or :: goes to the local host
        dest = ipaddress.ip_address("::1" if dest.version == 6 else "127.0.0.1")
    bound = ipaddress.ip_address(listener)
    if not bound.is_unspecified:
        return bound == dest
    # [::] takes IPv4 too (Linux bindv6only=0); 0.0.0.0 takes IPv4 only.
    if bound.version == 4 and dest.version == 6:
        return False
    return dest.is_loopback or _local_address(dest.compressed)


@functools.lru_cache(maxsize=4096)
def _local_address(address: str) -> bool:
    """Is this one of the host's own addresses? (Binding to it succeeds only then.)"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True
