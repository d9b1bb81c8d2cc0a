"""Tenants as values: Tenant, Quota, the typed TenantError, and the rules for names and domains.

Pure: no I/O, no asyncio. The directory (mtad.platform.tenants) stores these; the receiver reads
them on the hot path (`Tenant.owns`), the quota tracker reads `Tenant.quota`.

Domain ownership: a tenant owns each of its domains and every subdomain of them. So that no
tenant can send as another's domain, a new domain may not equal, contain or sit inside a domain
of another tenant, and must have at least two labels (no `com`). Public suffixes with two labels
(`co.uk`) are not known here: the operator adding domains is trusted to not hand one out.

Trust: names, domains and usernames arrive from the admin API (the operator) and, for lookups,
from SMTP peers; every one is checked against its pattern before it is stored or shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import msgspec

from mtad.address import AddressError, normalize_domain

ErrorCode = Literal["exists", "not_found", "domain_taken", "invalid"]

_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# SMTP AUTH usernames: printable, no spaces (RFC 4954 carries them in SASL, often an address).
_USERNAME = re.compile(r"[\x21-\x7e]{1,254}")
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
MAX_DOMAINS = 1000


class TenantError(Exception):
    """A refused change to the directory; `code` is machine-readable, str() is safe to show."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


class Quota(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tenant's limits; 0 means unlimited (or, for size and recipients, the server's limit)."""

    per_second: float = 0
    """Token-bucket rate in messages per second; burst is max(1, per_second)."""
    per_hour: int = 0
    """Messages per UTC clock hour."""
    per_day: int = 0
    """Messages per UTC day."""
    max_message_size: int = 0
    """Largest message in bytes; 0: [limits].max_message_size."""
    max_recipients: int = 0
    """Recipients per message; 0: [limits].max_recipients."""


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    """One customer sending through mtad: its sending domains, state and limits."""

    name: str
    domains: frozenset[str]
    disabled: bool
    quota: Quota
    created: float

    def owns(self, domain: str) -> bool:
        """Is `domain` one of this tenant's domains or a subdomain of one? Case and a trailing
        dot don't matter; a U-label domain is compared in its A-label form."""
        name = domain.lower().removesuffix(".")
        if not name.isascii():
            try:
                name = normalize_domain(name)
            except AddressError:
                return False
        while True:
            if name in self.domains:
                return True
            _, dot, name = name.partition(".")
            if not dot:
                return False


class SmtpUserInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An SMTP credential as listed: never its password or hash."""

    username: str
    tenant: str
    created: float
    disabled: bool = False


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An API key as listed: its public id, never its secret or hash; revoked is a unix time."""

    id: str
    tenant: str
    created: float
    revoked: float = 0


def check_quota(quota: Quota) -> Quota:
    """`quota` when every value is in bounds; TenantError(invalid) naming the first that is not."""
    if not (0 <= quota.per_second <= 1_000_000) or quota.per_second != quota.per_second:
        raise TenantError("invalid", "rate must be between 0 and 1000000 messages per second")
    for field in ("per_hour", "per_day", "max_message_size", "max_recipients"):
        if not 0 <= getattr(quota, field) <= 2**40:
            raise TenantError("invalid", f"{field} must be between 0 and {2**40}")
    return quota


def check_tenant_name(name: str) -> str:
    if not _TENANT_NAME.fullmatch(name):
        raise TenantError(
            "invalid", "a tenant name is 1-63 of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def check_domain(domain: str) -> str:
    """The comparison form of a sending domain (lowercase A-labels), or TenantError(invalid)."""
    try:
        name = normalize_domain(domain.strip())
    except AddressError:
        raise TenantError("invalid", f"not a valid domain: {printable(domain)}") from None
    if "." not in name:
        raise TenantError("invalid", f"a sending domain needs at least two labels: {name}")
    return name


def check_domains(domains: Iterable[str]) -> frozenset[str]:
    result = frozenset(check_domain(d) for d in domains)
    if len(result) > MAX_DOMAINS:
        raise TenantError("invalid", f"at most {MAX_DOMAINS} domains per tenant")
    return result


def check_username(username: str) -> str:
    """The stored form of an SMTP username: printable ASCII without spaces, lowercased."""
    if not _USERNAME.fullmatch(username):
        raise TenantError("invalid", "a username is 1-254 printable ASCII characters without spaces")
    return username.lower()


def check_password(password: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise TenantError(
            "invalid",
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
        )
    if any(c in "\r\n\x00" for c in password):
        raise TenantError("invalid", "a password may not contain CR, LF or NUL")
    return password


def overlaps(a: str, b: str) -> bool:
    """Are two domains equal, or is one a subdomain of the other?"""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def conflict(domain: str, owners: dict[str, str], tenant: str) -> str | None:
    """The domain of another tenant that `domain` overlaps, if any (`owners`: domain -> tenant)."""
    owner = owners.get(domain)
    if owner is not None:
        return domain if owner != tenant else None
    for other, owner in owners.items():
        if owner != tenant and overlaps(domain, other):
            return other
    return None


def printable(text: str, limit: int = 80) -> str:
    """`text` cut and with control characters escaped, for error messages."""
    shown = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
