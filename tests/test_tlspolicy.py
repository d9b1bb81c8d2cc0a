"""Outbound TLS policy (mtad.deliver.tlspolicy): [[tls_policy]] modes and MTA-STS enforce and
testing, against real SMTP peers with a test CA, a real HTTPS policy server and a real DNS
server on loopback; the config keys; and one real mtad delivering under an MTA-STS policy."""

from __future__ import annotations

import smtplib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import pytest_asyncio
import structlog
from dnsserver import DnsServer
from harness import MtadProcess, wait_for, write_config
from peer import Peer, tls_files
from stsserver import PolicyServer, Reply, policy_text, sts_tls

from mtad.config.load import ConfigError, load_config, loads_config
from mtad.deliver.attempt import AttemptResult
from mtad.deliver.client import ClientSettings
from mtad.deliver.pool import Pool
from mtad.deliver.route import NextHop
from mtad.deliver.tlspolicy import OutboundTls
from mtad.dns import CachePolicy, Resolver
from mtad.records import Envelope, Recipient

BODY = b"From: a@src.test\r\nTo: b@sts.test\r\nSubject: tls\r\n\r\nHello.\r\n"
ENVELOPE = Envelope(id="0" * 22, sender="a@src.test", arrival_time=0, size=len(BODY))
SETTINGS = ClientSettings(helo_name="client.test", connect_timeout=5, greeting_timeout=5, command_timeout=5,
                          data_timeout=5, data_block_timeout=5, final_timeout=5, quit_timeout=1)


def hop(peer: Peer, host: str = "mx.peer.test") -> NextHop:
    return NextHop(host=host, port=peer.port, addresses=[peer.host], mx=True)


def mails(peer: Peer) -> int:
    return sum(1 for conn in peer.connections for _, command in conn.commands if command.startswith("MAIL"))


class Setup:
    """OutboundTls from a config text, with a resolver on the test DNS server."""

    def __init__(self, tmp_path: Path, text: str, dns: DnsServer | None = None, *, idle_timeout: float = 0) -> None:
        self.cfg = loads_config(text, base_dir=tmp_path)
        nameservers = [dns.address] if dns else ["127.0.0.1:9"]
        self.resolver = Resolver(nameservers, 1.0, policy=CachePolicy(min_ttl=0))
        self.tls = OutboundTls(self.cfg, self.resolver)
        self.pool = Pool(SETTINGS, idle_timeout=idle_timeout, max_messages=100)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, hops: list[NextHop], *addresses: str, key: str = "") -> AttemptResult:
        recipients = [Recipient(address=a) for a in addresses]
        key = key or addresses[0].rpartition("@")[2]
        return await self.tls.deliver(key, hops, ENVELOPE, recipients, BODY, self.pool, SETTINGS)

    async def close(self) -> None:
        await self.pool.close()
        await self.tls.close()
        self.resolver.close()


def only(result: AttemptResult) -> tuple[str, str, str]:
    [outcome] = {(o.kind, o.status, o.phase) for o in result.outcomes}
    return outcome


CA = f'\n[delivery]\ntls_ca_file = "{tls_files().ca}"\n'
NO_STS = "\n[mta_sts]\nenabled = false\n"


def policies(*pairs: tuple[str, str]) -> str:
    return "".join(f'\n[[tls_policy]]\ndomain = "{d}"\nmode = "{m}"\n' for d, m in pairs)


# --- [[tls_policy]] --------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_require_defers_without_starttls_and_delivers_with_it(tmp_path: Path) -> None:
    async with Setup(tmp_path, policies(("dst.test", "require")) + NO_STS) as setup:
        async with Peer() as plain:
            result = await setup.send([hop(plain)], "a@dst.test")
            assert only(result) == ("deferred", "4.7.4", "starttls")
            assert mails(plain) == 0
        async with Peer(starttls=True) as secure:
            result = await setup.send([hop(secure, host="unrelated.name")], "a@dst.test")
            assert only(result) == ("delivered", "2.0.0", "dot")
            [txn] = secure.transactions
            assert txn.tls  # any certificate will do under require


@pytest.mark.asyncio
async def test_verify_needs_a_trusted_chain_and_the_host_name(tmp_path: Path) -> None:
    async with (Setup(tmp_path, policies(("dst.test", "verify")) + CA + NO_STS) as setup,
                Setup(tmp_path, policies(("dst.test", "verify")) + NO_STS) as untrusted,  # system CAs only
                Peer(starttls=True) as peer):
        assert only(await setup.send([hop(peer)], "a@dst.test")) == ("delivered", "2.0.0", "dot")
        assert peer.transactions[0].tls
        wrong = await setup.send([hop(peer, host="wrong.peer.test")], "a@dst.test")
        assert only(wrong) == ("deferred", "4.7.5", "starttls")
        assert "certificate" in wrong.outcomes[0].reply
        assert only(await untrusted.send([hop(peer)], "a@dst.test")) == ("deferred", "4.7.5", "starttls")
        assert len(peer.transactions) == 1


@pytest.mark.asyncio
async def test_default_policy_own_policy_and_the_strictest_on_a_shared_route(tmp_path: Path) -> None:
    text = policies(("*", "require"), ("open.test", "opportunistic"), ("strict.test", "verify")) + CA + NO_STS
    async with Setup(tmp_path, text) as setup, Peer() as plain:
        assert only(await setup.send([hop(plain)], "a@any.test"))[1] == "4.7.4"  # "*" says require
        assert only(await setup.send([hop(plain)], "a@open.test"))[0] == "delivered"
        # One batch on a static route for two domains: the stricter policy holds for both.
        route = f"[{plain.host}]:{plain.port}"
        mixed = await setup.send([hop(plain)], "a@open.test", "b@strict.test", key=route)
        assert only(mixed)[:2] == ("deferred", "4.7.4")
        assert len(plain.transactions) == 1


# --- MTA-STS ---------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def sts() -> AsyncIterator[tuple[DnsServer, PolicyServer]]:
    zone: dict[str, dict[str, Any]] = {
        "_mta-sts.sts.test": {"TXT": ["v=STSv1; id=1;"], "TTL": 0},
        "mta-sts.sts.test": {"A": ["127.0.0.1"]},
    }
    with DnsServer(zone) as dns:
        async with PolicyServer() as web:
            yield dns, web


def sts_config(web: PolicyServer, extra: str = "") -> str:
    return f'\n[mta_sts]\nport = {web.port}\nca_file = "{sts_tls().ca}"\ntimeout = "2s"\n' + CA + extra


@pytest.mark.asyncio
async def test_enforce_uses_only_matching_mx_and_verified_tls(tmp_path: Path,
                                                            sts: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = sts
    web.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"])
    async with Setup(tmp_path, sts_config(web), dns) as setup:
        async with Peer() as other, Peer(starttls=True) as secure:
            # The preferred MX is not in the policy: never contacted.
            result = await setup.send([hop(other, host="mx.other.test"), hop(secure)], "a@sts.test")
            assert only(result) == ("delivered", "2.0.0", "dot")
            assert other.connections == [] and secure.transactions[0].tls
            # Nothing matches: deferred 4.7.5, no connection at all.
            result = await setup.send([hop(other, host="mx.other.test")], "a@sts.test")
            assert only(result)[:2] == ("deferred", "4.7.5") and "MTA-STS" in result.outcomes[0].reply
            assert other.connections == []
        assert web.fetches["sts.test"] == 1  # the second attempt used the cached policy


@pytest.mark.asyncio
async def test_enforce_tls_failures_defer_and_never_fall_back(tmp_path: Path,
                                                              sts: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = sts
    web.policies["sts.test"] = policy_text("enforce", ["*.peer.test"])
    async with (Setup(tmp_path, sts_config(web), dns) as setup,
                Peer() as plain, Peer(starttls=True, tls_broken=True) as broken, Peer(starttls=True) as secure):
        for peer, host in ((plain, "mx.peer.test"), (broken, "mx.peer.test"), (secure, "other.peer.test")):
            result = await setup.send([hop(peer, host=host)], "a@sts.test")
            assert only(result) == ("deferred", "4.7.5", "starttls"), (host, result)
            assert "MTA-STS policy of sts.test" in result.outcomes[0].reply
            assert mails(peer) == 0 and len(peer.connections) == 1  # no plaintext retry


@pytest.mark.asyncio
async def test_testing_mode_delivers_and_logs_what_enforce_would_refuse(
        tmp_path: Path, sts: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = sts
    web.policies["sts.test"] = policy_text("testing", ["mx.peer.test"])
    async with Setup(tmp_path, sts_config(web), dns) as setup, Peer() as plain, Peer(starttls=True) as secure:
        with structlog.testing.capture_logs() as logs:
            result = await setup.send([hop(plain)], "a@sts.test", "b@sts.test")
        assert [o.kind for o in result.outcomes] == ["delivered", "delivered"]
        assert not plain.transactions[0].tls and plain.transactions[0].recipients == ["a@sts.test", "b@sts.test"]
        [record] = [r for r in logs if r["event"] == "mta_sts.testing_failure"]
        assert record["domain"] == "sts.test" and "STARTTLS" in record["failure"]
        # An MX the policy does not name: logged, delivered all the same.
        with structlog.testing.capture_logs() as logs:
            result = await setup.send([hop(plain, host="mx.other.test")], "a@sts.test")
        assert only(result)[0] == "delivered"
        assert any(r["event"] == "mta_sts.testing_failure" and "mx.other.test" in r["failure"] for r in logs)
        # A domain that keeps its policy: one pass, one connection, nothing logged.
        with structlog.testing.capture_logs() as logs:
            result = await setup.send([hop(secure)], "a@sts.test")
        assert only(result)[0] == "delivered" and secure.transactions[0].tls and len(secure.connections) == 1
        assert not [r for r in logs if r["event"] == "mta_sts.testing_failure"]


@pytest.mark.asyncio
async def test_fetch_failure_or_static_route_means_opportunistic(tmp_path: Path,
                                                                 sts: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = sts
    web.policies["sts.test"] = Reply(status=500)
    async with Setup(tmp_path, sts_config(web), dns) as setup, Peer() as plain:
        assert only(await setup.send([hop(plain)], "a@sts.test"))[0] == "delivered"
        assert web.fetches["sts.test"] == 1 and not plain.transactions[0].tls
        # A static route ("[host]:port" key) is the operator's choice: no MTA-STS lookup.
        web.policies["sts.test"] = policy_text("enforce", ["nothing.example"])
        txt = dns.count("_mta-sts.sts.test", "TXT")
        route = f"[{plain.host}]:{plain.port}"
        assert only(await setup.send([hop(plain)], "a@sts.test", key=route))[0] == "delivered"
        assert dns.count("_mta-sts.sts.test", "TXT") == txt and web.fetches["sts.test"] == 1


# --- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    (policies(("example.test", "strict")), "tls_policy[0].mode:"),
    (policies(("not a domain", "verify")), "tls_policy[0].domain:"),
    (policies(("A.test", "verify"), ("a.test.", "require")), "tls_policy[1].domain:"),
    ('\n[[tls_policy]]\ndomain = "a.test"\n', "tls_policy[0].mode:"),
    ("\n[mta_sts]\nport = 0\n", "mta_sts.port:"),
    ('\n[mta_sts]\ntimeout = "10m"\n', "mta_sts.timeout:"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(text, base_dir=tmp_path)
    assert [p for p in info.value.problems if p.startswith(problem)], info.value.problems


def test_config_ca_files_checked_and_resolved(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    path = tmp_path / "mtad.toml"
    path.write_text('[delivery]\ntls_ca_file = "missing.pem"\n[mta_sts]\nca_file = "junk.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"delivery.tls_ca_file: file not found: {tmp_path / 'missing.pem'}",
                                   f"mta_sts.ca_file: no PEM certificate in {tmp_path / 'junk.pem'}"]
    (tmp_path / "ca.pem").write_bytes(tls_files().ca.read_bytes())
    path.write_text('[delivery]\ntls_ca_file = "ca.pem"\n[[tls_policy]]\ndomain = "Example.TEST."\nmode = "verify"\n')
    cfg = load_config(path)
    assert cfg.delivery.tls_ca_file == str(tmp_path / "ca.pem")
    assert [(p.domain, p.mode) for p in cfg.tls_policy] == [("example.test", "verify")]


# --- a real mtad -----------------------------------------------------------------------------

@pytest.fixture
def e2e() -> Iterator[tuple[DnsServer, PolicyServer, Peer]]:
    zone: dict[str, dict[str, Any]] = {
        "e2e.test": {"MX": [(10, "mx.peer.test")]},
        "other.test": {"MX": [(10, "mx.other.test")]},
        "mx.peer.test": {"A": ["127.0.0.1"]},
        "mx.other.test": {"A": ["127.0.0.1"]},
        "_mta-sts.e2e.test": {"TXT": ["v=STSv1; id=20260101;"]},
        "_mta-sts.other.test": {"TXT": ["v=STSv1; id=1;"]},
        "mta-sts.e2e.test": {"A": ["127.0.0.1"]},
        "mta-sts.other.test": {"A": ["127.0.0.1"]},
    }
    with DnsServer(zone) as dns, PolicyServer() as web, Peer(starttls=True) as peer:
        web.policies["e2e.test"] = policy_text("enforce", ["mx.peer.test"])
        web.policies["other.test"] = policy_text("enforce", ["mx.peer.test"])  # its MX is not named
        yield dns, web, peer


@pytest.mark.slow
def test_mtad_delivers_under_an_enforced_policy(tmp_path: Path, e2e: tuple[DnsServer, PolicyServer, Peer]) -> None:
    dns, web, peer = e2e
    extra = f"""
[delivery]
mx_port = {peer.port}
tls_ca_file = "{tls_files().ca}"
min_backoff = "1h"
connect_timeout = "3s"
command_timeout = "3s"

[dns]
nameservers = ["{dns.address}"]
timeout = "1s"

[mta_sts]
port = {web.port}
ca_file = "{sts_tls().ca}"
timeout = "3s"
"""
    proc = MtadProcess(write_config(tmp_path, domains=("e2e.test", "other.test"), extra=extra)).start()
    try:
        with smtplib.SMTP(*proc.mx, timeout=10) as client:
            client.sendmail("a@src.test", ["x@e2e.test"], BODY)
            client.sendmail("a@src.test", ["y@other.test"], BODY)
        [txn] = peer.wait_transactions(1)
        assert txn.tls and txn.recipients == ["x@e2e.test"]
        deferred = wait_for(lambda: [e for e in proc.mail_log() if e.get("type") == "deferred"])
        assert deferred[0]["recipients"] == ["y@other.test"] and deferred[0]["status"] == "4.7.5"
        assert web.fetches["e2e.test"] == 1 and web.fetches["other.test"] == 1
        assert any(r.get("event") == "mta_sts.fetched" and r.get("domain") == "e2e.test" for r in proc.records())
    finally:
        proc.stop()


@pytest.mark.asyncio
async def test_a_pooled_plaintext_connection_never_serves_an_enforced_attempt(
        tmp_path: Path, sts: tuple[DnsServer, PolicyServer]) -> None:
    dns, web = sts
    web.policies["sts.test"] = Reply(status=500)
    async with Setup(tmp_path, sts_config(web), dns, idle_timeout=30) as setup, Peer() as plain:
        assert only(await setup.send([hop(plain)], "a@sts.test"))[0] == "delivered"
        assert setup.pool.idle("sts.test") == 1  # kept for reuse
        # The domain publishes an enforce policy under a new id: the idle plaintext
        # connection must not carry its mail.
        web.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"])
        dns.zone["_mta-sts.sts.test"]["TXT"] = ["v=STSv1; id=2;"]
        assert only(await setup.send([hop(plain)], "a@sts.test"))[:2] == ("deferred", "4.7.5")
        assert mails(plain) == 1
