"""Semantic checks of a decoded Config, and its normalised form.

`review()` runs after every table and field has its right type: it checks what one field
cannot say alone (addresses parse, no two sockets on one address, submission needs TLS,
cert and key come in pairs), normalises domain names (lowercase, IDNA A-labels, no trailing
dot) and resolves relative paths against the config file's directory. It is pure; the one
check that reads files, `check_tls_files()`, is separate and called by the loader.

Trust: the config file is the operator's; its file paths are opened read-only, never created.
RFCs: RFC 5321 4.1.2 (Domain syntax via endpoints.normalize_domain), RFC 8314 3.3 (implicit
TLS on submissions), RFC 6409 4.3 (submission needs authentication, hence TLS).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import msgspec

from mtad.config.endpoints import (
    HostPort,
    check_unix_path,
    is_unix_path,
    normalize_domain,
    parse_hostport,
    parse_nameserver,
)
from mtad.config.schema import Config, Delivery, Dkim, Route, show

_NEEDS_TLS = ("submission", "submissions")


def review(cfg: Config, base_dir: Path) -> tuple[Config, list[str]]:
    """The normalised Config and every semantic problem, each line starting with its dotted key."""
    problems: list[str] = []

    def check(key: str, parse: Callable[[str], object], value: str) -> object | None:
        try:
            return parse(value)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            return None

    server = cfg.server
    hostname = check("server.hostname", normalize_domain, server.hostname)
    if not server.spool_dir:
        problems.append("server.spool_dir: must not be empty")
    server = msgspec.structs.replace(
        server,
        hostname=hostname if isinstance(hostname, str) else server.hostname,
        spool_dir=resolve(server.spool_dir, base_dir),
    )

    problems += _check_sockets(cfg, check)

    has_tls = bool(cfg.tls.cert and cfg.tls.key) or cfg.tls.self_signed
    for i, listener in enumerate(cfg.listener):
        if listener.role in _NEEDS_TLS and not has_tls:
            problems.append(f'listener[{i}].role: "{listener.role}" needs [tls] cert and key')

    domains: list[str] = []
    for i, domain in enumerate(cfg.inbound.domains):
        name = check(f"inbound.domains[{i}]", normalize_domain, domain)
        if isinstance(name, str) and name not in domains:
            domains.append(name)

    routes = _review_routes(cfg.route, check, problems)

    for i, server_text in enumerate(cfg.dns.nameservers):
        check(f"dns.nameservers[{i}]", parse_nameserver, server_text)

    tls = cfg.tls
    if tls.cert and not tls.key:
        problems.append("tls.key: must be set when tls.cert is set")
    if tls.key and not tls.cert:
        problems.append("tls.cert: must be set when tls.key is set")
    if tls.self_signed and (tls.cert or tls.key):
        problems.append("tls.self_signed: must be false when tls.cert and tls.key are set")
    tls = msgspec.structs.replace(tls, cert=resolve(tls.cert, base_dir), key=resolve(tls.key, base_dir))

    delivery = _review_delivery(cfg, check, problems)

    if cfg.limits.max_message_size >= cfg.spool.map_size:
        problems.append(
            f"limits.max_message_size: {cfg.limits.max_message_size} bytes does not fit in "
            f"spool.map_size ({cfg.spool.map_size} bytes)"
        )

    log = msgspec.structs.replace(cfg.log, mail_log=resolve(cfg.log.mail_log, base_dir))
    normalised = msgspec.structs.replace(
        cfg,
        server=server,
        inbound=msgspec.structs.replace(cfg.inbound, domains=domains),
        route=routes,
        tls=tls,
        delivery=delivery,
        log=log,
    )
    normalised = msgspec.structs.replace(normalised, dkim=_review_dkim(cfg.dkim, base_dir, problems))
    normalised = _review_outbound_tls(normalised, base_dir, problems)
    return normalised, problems


def _review_delivery(cfg: Config, check: Callable[[str, Callable[[str], object], str], object],
                     problems: list[str]) -> Delivery:
    """[delivery]: the HELO name a domain, source addresses of the right family, sane orders."""
    delivery = cfg.delivery
    helo = delivery.helo_name
    if helo:
        name = check("delivery.helo_name", normalize_domain, helo)
        helo = name if isinstance(name, str) else helo
    for key, value, family in (("delivery.source_address", delivery.source_address, 4),
                               ("delivery.source_address6", delivery.source_address6, 6)):
        if value:
            try:
                if ipaddress.ip_address(value).version != family:
                    problems.append(f"{key}: {value!r} is not an IPv{family} address")
            except ValueError:
                problems.append(f"{key}: {value!r} is not an IP address")
    if delivery.max_backoff < delivery.min_backoff:
        problems.append(f"delivery.max_backoff: {delivery.max_backoff:g}s is shorter than "
                        f"delivery.min_backoff ({delivery.min_backoff:g}s)")
    if delivery.initial_concurrency > delivery.destination_concurrency:
        problems.append(f"delivery.initial_concurrency: {delivery.initial_concurrency} is above "
                        f"delivery.destination_concurrency ({delivery.destination_concurrency})")
    return msgspec.structs.replace(delivery, helo_name=helo)


def _check_sockets(cfg: Config, check: Callable[[str, Callable[[str], object], str], object]) -> list[str]:
    """Every listening address parses, and no two of them are the same socket."""
    problems: list[str] = []
    sockets: list[tuple[str, object]] = []
    for i, listener in enumerate(cfg.listener):
        key = f"listener[{i}].address"
        sockets.append((key, check(key, parse_hostport, listener.address)))
    sockets.append(("http.address", check("http.address", parse_hostport, cfg.http.address)))
    admin = cfg.http.admin_address
    if is_unix_path(admin):
        check("http.admin_address", check_unix_path, admin)
    else:
        admin_hp = check("http.admin_address", parse_hostport, admin)
        sockets.append(("http.admin_address", admin_hp))

    seen: list[tuple[str, HostPort]] = []
    for key, hp in sockets:
        # Port 0 asks the kernel for a free port: any number of those can coexist (tests).
        if not isinstance(hp, HostPort) or hp.port == 0:
            continue
        clash = next((other for other, taken in seen if _same_socket(hp, taken)), None)
        if clash:
            problems.append(f"{key}: same address as {clash} ({show(str(hp))})")
        seen.append((key, hp))
    return problems


def _same_socket(a: HostPort, b: HostPort) -> bool:
    """Two binds that would fail with EADDRINUSE: same port, same host or one a wildcard."""
    if a.port != b.port:
        return False
    wild = {"0.0.0.0", "::"}
    if a.host == b.host:
        return True
    # 0.0.0.0:25 takes port 25 on every IPv4 address, [::]:25 on every IPv6 one.
    if a.host in wild or b.host in wild:
        other = b.host if a.host in wild else a.host
        wildcard = a.host if a.host in wild else b.host
        return (":" in other) == (":" in wildcard)
    return False


def _review_routes(
    routes: list[Route],
    check: Callable[[str, Callable[[str], object], str], object],
    problems: list[str],
) -> list[Route]:
    out: list[Route] = []
    first: dict[str, int] = {}
    for i, route in enumerate(routes):
        domain: object = "*" if route.domain == "*" else check(f"route[{i}].domain", normalize_domain, route.domain)
        check(f"route[{i}].nexthop", _parse_nexthop, route.nexthop)
        if isinstance(domain, str):
            if domain in first:
                problems.append(f"route[{i}].domain: {show(domain)} is already routed by route[{first[domain]}]")
            first.setdefault(domain, i)
            route = msgspec.structs.replace(route, domain=domain)
        out.append(route)
    return out


def _parse_nexthop(text: str) -> HostPort:
    return parse_hostport(text, allow_port_zero=False)


def resolve(path: str, base_dir: Path) -> str:
    """An absolute, normalised path; relative ones are taken from base_dir. "" stays ""."""
    if not path:
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def check_tls_files(cert: str, key: str) -> list[str]:
    """tls.cert and tls.key are readable PEM files that belong together. Reads files; no socket."""
    if not cert or not key:
        return []
    problems = [
        p
        for p in (_check_pem("tls.cert", cert, b"CERTIFICATE-----"), _check_pem("tls.key", key, b"PRIVATE KEY-----"))
        if p
    ]
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key cannot be used by a daemon; the empty password makes it fail here
        # instead of prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        return [f"tls.key: cannot be used with tls.cert ({exc.reason or exc.strerror or 'invalid'})"]
    return []


def _check_pem(key: str, path: str, marker: bytes) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return f"{key}: file not found: {path}"
    except OSError as exc:
        return f"{key}: cannot read {path}: {(exc.strerror or 'error').lower()}"
    if b"-----BEGIN " not in data or marker not in data:
        kind = "certificate" if key == "tls.cert" else "private key"
        return f"{key}: no PEM {kind} in {path}"
    return None


_FIELD_NAME = re.compile(r"[!-9;-~]+")
# RFC 6376 5.4.1: fields that change in transit or per hop, which a signer SHOULD NOT sign.
_NEVER_SIGNED = frozenset({"dkim-signature", "received", "return-path", "comments", "keywords", "bcc", "resent-bcc"})


def _review_dkim(dkim: Dkim, base_dir: Path, problems: list[str]) -> Dkim:
    """[dkim]: key_dir resolved against base_dir, header names that can be signed."""
    for key in ("headers", "oversign"):
        for i, name in enumerate(getattr(dkim, key)):
            if not _FIELD_NAME.fullmatch(name):
                problems.append(f"dkim.{key}[{i}]: not a header field name: {show(name)}")
            elif name.lower() in _NEVER_SIGNED:
                problems.append(f"dkim.{key}[{i}]: {show(name)} must not be signed (RFC 6376 5.4.1)")
    if "from" not in {name.lower() for name in dkim.headers}:
        problems.append('dkim.headers: must include "From" (RFC 6376 5.4)')
    # "" stays "" (mtad.dkim.key_dir_of reads it as <spool_dir>/dkim), so the default is visible.
    return msgspec.structs.replace(dkim, key_dir=resolve(dkim.key_dir, base_dir))


def _review_outbound_tls(cfg: Config, base_dir: Path, problems: list[str]) -> Config:
    """[[tls_policy]] domains normalised, each at most once; the CA files of outbound TLS resolved."""
    policies = []
    first: dict[str, int] = {}
    for i, policy in enumerate(cfg.tls_policy):
        domain = policy.domain
        if domain != "*":
            try:
                domain = normalize_domain(domain)
            except ValueError as exc:
                problems.append(f"tls_policy[{i}].domain: {exc}")
                continue
        if domain in first:
            problems.append(f"tls_policy[{i}].domain: {show(domain)} already has a policy in tls_policy[{first[domain]}]")
        first.setdefault(domain, i)
        policies.append(msgspec.structs.replace(policy, domain=domain))
    delivery = msgspec.structs.replace(cfg.delivery, tls_ca_file=resolve(cfg.delivery.tls_ca_file, base_dir))
    mta_sts = msgspec.structs.replace(cfg.mta_sts, ca_file=resolve(cfg.mta_sts.ca_file, base_dir))
    return msgspec.structs.replace(cfg, tls_policy=policies, delivery=delivery, mta_sts=mta_sts)


def check_ca_files(cfg: Config) -> list[str]:
    """delivery.tls_ca_file and mta_sts.ca_file, when set, are readable PEM files of certificates."""
    problems = []
    for key, path in (("delivery.tls_ca_file", cfg.delivery.tls_ca_file), ("mta_sts.ca_file", cfg.mta_sts.ca_file)):
        if not path:
            continue
        try:
            ssl.create_default_context(cafile=path)
        except FileNotFoundError:
            problems.append(f"{key}: file not found: {path}")
        except ssl.SSLError:
            problems.append(f"{key}: no PEM certificate in {path}")
        except OSError as exc:
            problems.append(f"{key}: cannot read {path}: {(exc.strerror or 'error').lower()}")
    return problems
