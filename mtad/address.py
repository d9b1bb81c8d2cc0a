"""Envelope addresses: parse RFC 5321 paths, normalise domains, and tell local mail from relaying.

Pure: no I/O, no asyncio. `split_path` cuts a MAIL/RCPT argument into the path and its ESMTP
parameters; `parse_path` turns the path into a `Mailbox` (or None for the null path `<>`);
`classify_recipient` says whether a recipient is ours, a relay attempt, or a local part that
tries to route mail onward (`%`, `!`, quoted `@`).

Trust: every string here comes from an SMTP peer and is hostile. Nothing is interpreted beyond
the grammar: source routes are dropped (RFC 5321 4.1.2 allows ignoring them), routing
characters in local parts are never acted on, and address literals are never local.
RFCs: 5321 4.1.2 (Path, Mailbox, Local-part, Domain), 4.1.3 (address literals),
4.5.3.1 (size limits), 6531 3.3 (UTF-8 in addresses with SMTPUTF8),
5890/5891 and UTS #46 (IDNA A-labels via the `idna` package).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import idna

# RFC 5321 4.1.2 atext (RFC 5322 3.2.3): letters, digits and these.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# RFC 5321 4.5.3.1.1-3: local part 64 octets, domain 255, path 256 (brackets and source route
# included). Longer objects are refused with 501 (4.5.3.1.10 "Path too long"): a next hop that
# enforces them would bounce the message later, after we had accepted responsibility for it.
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256
# Reverse-paths are the sender's business and real ones run long (VERP and SRS return paths,
# list bounce addresses that embed a whole recipient address): like Postfix and Exim we take
# them up to these looser bounds rather than lose the message over a sender's local part.
MAX_SENDER_LOCAL = 255
MAX_SENDER_PATH = 512
# Characters that route mail when a later hop interprets the local part (percent hack, UUCP
# bang paths, a second @), checked after NFKC so that fullwidth and small-form look-alikes
# (U+FF05, U+FF01, U+FF20, U+FE6A, U+FE57, U+FE6B) count as what they normalise to.
_ROUTING = frozenset("%!@")


class AddressError(ValueError):
    """A path that does not parse. `non_ascii` marks UTF-8 used without SMTPUTF8 (553 5.6.7)."""

    def __init__(self, reason: str, *, non_ascii: bool = False) -> None:
        super().__init__(reason)
        self.non_ascii = non_ascii


@dataclass(frozen=True, slots=True)
class Mailbox:
    """local@domain. `local` is as sent (quotes kept); `domain` is normalised (see normalize_domain)."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def quoted(self) -> bool:
        return self.local.startswith('"')

    @property
    def literal(self) -> bool:
        """The domain is an address literal such as [192.0.2.1] or [IPv6:2001:db8::1]."""
        return self.domain.startswith("[")

    def local_content(self) -> str:
        """The local part with quotes and quoted-pairs resolved: what the mailbox owner sees."""
        if not self.quoted:
            return self.local
        return re.sub(r"\\(.)", r"\1", self.local[1:-1])


class Verdict(enum.Enum):
    LOCAL = "local"
    """The domain is one of ours and the local part is plain: accept."""
    RELAY = "relay"
    """Not our domain (or an address literal): relaying is refused."""
    ROUTING_LOCAL_PART = "routing"
    """Our domain, but the local part carries %, ! or a quoted @: someone wants us to forward."""


def split_path(text: str) -> tuple[str, str]:
    """Cut `<path> params` into the path text and the parameter text (stripped).

    Accepts `<...>` (quotes may hold spaces and `>`) and, leniently, a bare mailbox ending at
    the first space. Raises AddressError when the brackets or quotes do not close.
    """
    text = text.strip(" ")
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        return path, rest.strip(" ")
    in_quotes = escaped = False
    for i in range(1, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif ch == "\\" and in_quotes:
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            rest = text[i + 1:]
            if rest and not rest.startswith(" "):
                raise AddressError("junk after the closing bracket")
            return text[: i + 1], rest.strip(" ")
    raise AddressError("unterminated path")


def parse_path(path: str, *, smtputf8: bool, null_ok: bool) -> Mailbox | None:
    """Parse a reverse-path or forward-path (as cut by split_path) into a Mailbox.

    Returns None for the null path `<>` when `null_ok` (MAIL FROM only). A source route
    (`<@a,@b:user@c>`) is checked for syntax and dropped: the final mailbox is what counts.
    """
    bracketed = path.startswith("<")
    max_path, max_local = (MAX_SENDER_PATH, MAX_SENDER_LOCAL) if null_ok else (MAX_PATH, MAX_LOCAL)
    if len(path.encode("utf-8", "surrogateescape")) + (0 if bracketed else 2) > max_path:
        raise AddressError("path too long")
    if bracketed != path.endswith(">") or path in ("<", ">"):
        raise AddressError("unbalanced angle brackets")
    inner = path[1:-1] if bracketed else path
    if inner == "":
        if null_ok and path == "<>":
            return None
        raise AddressError("empty path")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("source route without a mailbox")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            normalize_domain(hop[1:], smtputf8=smtputf8)
    return parse_mailbox(inner, smtputf8=smtputf8, max_local=max_local)


def parse_mailbox(text: str, *, smtputf8: bool, max_local: int = MAX_LOCAL) -> Mailbox:
    """Parse `local@domain` (RFC 5321 Mailbox; RFC 6531 UTF-8 when smtputf8)."""
    if text.startswith('"'):
        end = _quoted_end(text, smtputf8)
        local, rest = text[: end + 1], text[end + 1:]
        if end == 1:
            raise AddressError("empty local part")  # `""@domain` names nobody
        if not rest.startswith("@"):
            raise AddressError("quoted local part must be followed by @")
        domain = rest[1:]
    else:
        local, at, domain = text.partition("@")
        if not at:
            raise AddressError("missing @domain")
        _check_dot_string(local, smtputf8)
    if len(local.encode("utf-8", "surrogateescape")) > max_local:
        raise AddressError("local part too long")
    if domain.startswith("["):
        return Mailbox(local, normalize_literal(domain))
    return Mailbox(local, normalize_domain(domain, smtputf8=smtputf8))


def _quoted_end(text: str, smtputf8: bool) -> int:
    """Index of the closing quote of the Quoted-string at text[0]."""
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return i
        if ch == "\\":
            i += 1
            if i >= len(text) or not " " <= text[i] <= "~":
                raise AddressError("bad quoted-pair")
        elif ch >= "\x80":
            _check_utf8_char(ch, smtputf8)
        elif not (" " <= ch <= "~"):
            raise AddressError("control character in quoted local part")
        i += 1
    raise AddressError("unterminated quoted local part")


def _check_dot_string(local: str, smtputf8: bool) -> None:
    if not local:
        raise AddressError("empty local part")
    for atom in local.split("."):
        if not atom:
            raise AddressError("empty atom in local part")
        for ch in atom:
            if ch in _ATEXT:
                continue
            if ch >= "\x80":
                _check_utf8_char(ch, smtputf8)
            else:
                raise AddressError("invalid character in local part")


def _check_utf8_char(ch: str, smtputf8: bool) -> None:
    if not smtputf8:
        raise AddressError("non-ASCII address without SMTPUTF8", non_ascii=True)
    # Lone surrogates come from bytes that were not UTF-8 (surrogateescape decoding).
    if "\ud800" <= ch <= "\udfff" or not ch.isprintable():
        raise AddressError("invalid UTF-8 in address")


def normalize_domain(domain: str, *, smtputf8: bool = True) -> str:
    """A domain's comparison form: lowercase, A-labels (UTS #46, non-transitional), no trailing dot.

    Raises AddressError for bad syntax, and with non_ascii=True for a U-label without SMTPUTF8.
    """
    name = domain.removesuffix(".")
    if not name or len(name) > MAX_DOMAIN:
        raise AddressError("bad domain")
    if name.isascii():
        name = name.lower()
    else:
        if not smtputf8:
            raise AddressError("non-ASCII domain without SMTPUTF8", non_ascii=True)
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise AddressError("bad internationalised domain") from None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or len(name) > MAX_DOMAIN:
        raise AddressError("bad domain")
    if labels[-1].isdigit():
        # RFC 3696 2: an all-numeric top label is an IP address written without brackets.
        raise AddressError("bad domain")
    return name


def normalize_literal(text: str) -> str:
    """An address literal in canonical form: `[192.0.2.1]` or `[IPv6:2001:db8::1]`."""
    if not (text.startswith("[") and text.endswith("]")):
        raise AddressError("bad address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("bad address literal") from None


def normalize_domains(domains: Iterable[str]) -> frozenset[str]:
    """Normalise a configured domain list (U-labels allowed); AddressError names a bad entry."""
    result = set()
    for domain in domains:
        try:
            result.add(normalize_domain(domain.strip(), smtputf8=True))
        except AddressError as exc:
            raise AddressError(f"{domain!r}: {exc}") from None
    return frozenset(result)


def classify_recipient(mailbox: Mailbox, local_domains: frozenset[str]) -> Verdict:
    """Is this recipient ours? Only a plain local part at one of `local_domains` is.

    `local_domains` must hold normalised names (normalize_domains). Address literals are
    never local, so `user@[127.0.0.1]` cannot be used to reach us by IP and then onward.
    """
    if mailbox.literal or mailbox.domain not in local_domains:
        return Verdict.RELAY
    content = mailbox.local_content()
    if not _ROUTING.isdisjoint(content) or (
            not content.isascii() and not _ROUTING.isdisjoint(unicodedata.normalize("NFKC", content))):
        # The percent hack, UUCP bang paths and "user@elsewhere"@us: we never interpret these,
        # and handing them to a next hop that does (or that NFKC-folds `user＠ext`) would turn
        # us into an open relay.
        return Verdict.ROUTING_LOCAL_PART
    return Verdict.LOCAL
