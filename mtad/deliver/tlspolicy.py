"""Outbound TLS policy: how much TLS one attempt demands, decided per destination.

`OutboundTls.deliver()` stands in front of attempt.deliver(): it picks the TLS mode for the
attempt, narrows the next hops when an MTA-STS policy says so, and passes the mode on in the
ClientSettings of this attempt only (client.py does the TLS):

    1. [[tls_policy]] for the recipient domain   that mode; MTA-STS is not looked up
       (a batch of several domains on one       (the operator's word beats the domain's)
       static route takes the strictest)
    2. MTA-STS, for MX deliveries only           enforce: only MX hosts matching the policy's
       (not static routes, not address literals)  mx patterns, TLS verified against the MX
                                                  name; failures defer with 4.7.5 and never
                                                  fall back to plaintext.
                                                  testing: deliver as under 3, log what
                                                  enforce would have refused.
    3. [[tls_policy]] domain = "*", else         opportunistic (STARTTLS when offered;
       [delivery]'s client default                plaintext again when the handshake fails)

Modes (client.py): none (no STARTTLS), opportunistic, require (STARTTLS must succeed, any
certificate; 4.7.4 when the server offers none), verify (a chain to the system CAs, or
[delivery] tls_ca_file, and the next hop's name in the certificate, RFC 6125; 4.7.5).

Testing mode delivers in two passes: first as enforce would (matching MX hosts, verify),
and only the recipients that pass could not hand over (a connection-scope failure) go again,
over every MX host in the usual mode; the first pass's failure is logged
(`mta_sts.testing_failure`). A domain whose policy holds costs nothing extra. TLS-RPT
(RFC 8460) reports are not sent: the log records are what an operator has.

Pooled connections are kept per destination key and mode, so a connection opened under one
mode never carries mail that needs another.

Trust: policies come from mtasts.py (parsed strictly); the config was validated.
RFCs: 8461 4.1 (MX matching), 4.2 (certificate checks), 5 and 5.1 (enforce / testing,
no fallback), 3207 (STARTTLS), 6125 (names, via ssl), 3463 (4.7.4, 4.7.5).
"""

from __future__ import annotations

import msgspec
import structlog

from mtad.config.schema import Config, OutboundTlsMode
from mtad.deliver.attempt import AttemptResult, deliver, settles
from mtad.deliver.client import ClientSettings
from mtad.deliver.mtasts import MtaSts, StsPolicy
from mtad.deliver.outcome import Outcome, local
from mtad.deliver.pool import Pool
from mtad.deliver.route import NextHop
from mtad.dns import Resolver
from mtad.records import Envelope, Recipient

log = structlog.get_logger("mtad.deliver.tls")

STRENGTH: dict[str, int] = {"none": 0, "opportunistic": 1, "require": 2, "verify": 3}


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def strictest(modes: list[OutboundTlsMode]) -> OutboundTlsMode:
    return max(modes, key=lambda mode: STRENGTH[mode])


def sts_applies(key: str, domain: str) -> bool:
    """MTA-STS speaks about MX hosts: not about a static route ("[host]:port" keys) or an
    address literal, where the operator or the sender named the server."""
    return not key.startswith("[") and not domain.startswith("[")


def enforced(outcome: Outcome, domain: str) -> Outcome:
    """A TLS failure under an enforce policy: 4.7.5, saying which policy refused plaintext."""
    if outcome.kind != "deferred" or outcome.phase != "starttls" or outcome.remote:
        return outcome
    return local("deferred", "4.7.5", f"MTA-STS policy of {domain}: {outcome.reply}", scope=outcome.scope,
                 phase="starttls")


def no_matching_mx(domain: str, hops: list[NextHop]) -> Outcome:
    hosts = ", ".join(hop.host for hop in hops) or "none"
    return local("deferred", "4.7.5", f"MTA-STS policy of {domain} allows none of its MX hosts ({hosts})",
                 scope="destination")


class OutboundTls:
    """Per-destination TLS modes and MTA-STS, applied to each attempt."""

    def __init__(self, cfg: Config, resolver: Resolver, *, sts: MtaSts | None = None) -> None:
        policies = {policy.domain: policy.mode for policy in cfg.tls_policy}
        self.default: OutboundTlsMode | None = policies.pop("*", None)
        self.policies = policies
        self.ca_file = cfg.delivery.tls_ca_file
        if sts is None and cfg.mta_sts.enabled:
            sts = MtaSts(resolver, port=cfg.mta_sts.port, ca_file=cfg.mta_sts.ca_file,
                         timeout=float(cfg.mta_sts.timeout))
        self.sts = sts

    async def close(self) -> None:
        if self.sts is not None:
            await self.sts.close()

    async def deliver(self, key: str, hops: list[NextHop], envelope: Envelope, recipients: list[Recipient],
                      body: bytes, pool: Pool, settings: ClientSettings) -> AttemptResult:
        """attempt.deliver() under the TLS policy of the recipients' domain (module docstring)."""
        domains = sorted({domain_of(r.address) for r in recipients})
        explicit = [self.policies[d] for d in domains if d in self.policies]
        if explicit:
            return await self._send(key, hops, strictest(explicit), envelope, recipients, body, pool, settings)
        usual: OutboundTlsMode = self.default or settings.tls
        domain = domains[0] if len(domains) == 1 else ""
        policy = None
        if self.sts is not None and domain and sts_applies(key, domain):
            policy = await self.sts.policy(domain)
        if policy is None or policy.mode == "none":
            return await self._send(key, hops, usual, envelope, recipients, body, pool, settings)
        allowed = [hop for hop in hops if policy.matches(hop.host)]
        if policy.mode == "enforce":
            if not allowed:
                log.warning("mta_sts.no_matching_mx", domain=domain, mx=[hop.host for hop in hops],
                            patterns=list(policy.mx))
                refused = no_matching_mx(domain, hops)
                return AttemptResult(outcomes=[refused] * len(recipients), relay="", connected=False)
            result = await self._send(key, allowed, "verify", envelope, recipients, body, pool, settings)
            return msgspec.structs.replace(result, outcomes=[enforced(o, domain) for o in result.outcomes])
        return await self._testing(key, domain, policy, hops, allowed, usual, envelope, recipients, body, pool,
                                   settings)

    async def _testing(self, key: str, domain: str, policy: StsPolicy, hops: list[NextHop],
                       allowed: list[NextHop], usual: OutboundTlsMode, envelope: Envelope,
                       recipients: list[Recipient], body: bytes, pool: Pool,
                       settings: ClientSettings) -> AttemptResult:
        """Testing mode: as enforce first; what that could not hand over goes the usual way."""
        first: AttemptResult | None = None
        if allowed:
            first = await self._send(key, allowed, "verify", envelope, recipients, body, pool, settings)
            if all(settles(outcome) for outcome in first.outcomes):
                return first
            failure = next(o for o in first.outcomes if not settles(o)).reply
        else:
            failure = no_matching_mx(domain, hops).reply
        log.warning("mta_sts.testing_failure", domain=domain, id=policy.id, failure=failure,
                    mx=[hop.host for hop in hops], patterns=list(policy.mx))
        pending = [i for i in range(len(recipients)) if first is None or not settles(first.outcomes[i])]
        second = await self._send(key, hops, usual, envelope, [recipients[i] for i in pending], body, pool,
                                  settings)
        if first is None:
            return second
        outcomes = list(first.outcomes)
        for i, outcome in zip(pending, second.outcomes):
            outcomes[i] = outcome
        base = second if second.relay else first
        return msgspec.structs.replace(base, outcomes=outcomes, connected=first.connected or second.connected)

    async def _send(self, key: str, hops: list[NextHop], mode: OutboundTlsMode, envelope: Envelope,
                    recipients: list[Recipient], body: bytes, pool: Pool, settings: ClientSettings) -> AttemptResult:
        if mode != settings.tls or (mode == "verify" and self.ca_file != settings.ca_file):
            settings = msgspec.structs.replace(settings, tls=mode, ca_file=self.ca_file or settings.ca_file)
            key = f"{key} tls={mode}"  # a pooled connection serves only attempts of its own mode
        return await deliver(key, hops, envelope, recipients, body, pool, settings)
