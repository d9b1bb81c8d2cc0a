"""DKIM verification of inbound mail: one result per DKIM-Signature, graded as RFC 8601 words.

`verify(message, lookup, now=...)` checks every signature of a message, top to bottom, with
dkimpy doing the parsing and canonicalisation (an implementation independent of our signer's)
and `cryptography` checking the RSA or Ed25519 signature itself (dkimpy's Ed25519 needs PyNaCl,
which we do not ship). RFC 8301 applies: rsa-sha1 and RSA keys under 1024 bits are not valid.
`lookup(name)` returns the TXT record text for `<selector>._domainkey.<domain>` (the strings of
one record joined), None when there is none, or raises DnsTempError; it is a parameter so the
caller chooses the resolver (a fetched dict for inbound mail, a corpus in tests).

Trust: the message and the DNS answers are hostile; every parse failure is a permerror, never
an exception out of verify().
RFCs: 6376 3.5 (tags), 3.6 (key records), 6 (verifier actions), 8.15 (extra From);
8301 (algorithm and key size), 8463 (ed25519-sha256), 8601 2.7.1 (result words).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
)
from dkim.crypto import UnparsableKeyError, parse_public_key
from dkim.util import InvalidTagValueList, parse_tag_value

MIN_RSA_BITS = 1024
CLOCK_SLOP = 36000  # t= up to 10 h in the future and x= up to 10 h past are tolerated (clock skew)
# Which result speaks for the message when no signature passes: a temporary failure may pass
# later, so it outranks a definite failure (RFC 8601 2.7.1 words).
_RANK = ("pass", "temperror", "fail", "permerror", "policy", "neutral")


class DnsTempError(Exception):
    """The key lookup failed for now (SERVFAIL, timeout): the result is temperror."""


@dataclass(frozen=True)
class SignatureResult:
    result: str
    """pass, fail, permerror, temperror, policy or neutral (RFC 8601 2.7.1)."""
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""


class _Outcome(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


Lookup = Callable[[str], str | None]


async def fetch_txt(name: str, nameservers: list[str], timeout: float) -> list[str]:
    """Every TXT record at NAME (each record's strings joined, RFC 6376 3.6.2.2); [] when the
    name or the type does not exist; DnsTempError when no answer could be had."""
    import aiodns  # here: mtactl imports this module and needs no resolver for most commands

    resolver = aiodns.DNSResolver(nameservers=nameservers or None, timeout=timeout, tries=2)
    try:
        result = await resolver.query_dns(name, "TXT")
    except aiodns.error.DNSError as exc:
        code = exc.args[0] if exc.args else None
        if code in (aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA):
            return []
        raise DnsTempError(str(exc.args[1]) if len(exc.args) > 1 else "lookup failed") from None
    finally:
        resolver.cancel()
    records = []
    for answer in result.answer:
        data = getattr(answer.data, "data", b"")
        if isinstance(data, bytes):
            records.append(data.decode("utf-8", "replace"))
    return records


def message_result(results: list[SignatureResult]) -> str:
    """The dkim= result for the whole message: the best signature's, "none" without any."""
    if not results:
        return "none"
    return min((r.result for r in results), key=lambda word: _RANK.index(word) if word in _RANK else len(_RANK))


def key_names(message: bytes) -> list[str]:
    """The `<s>._domainkey.<d>` names verify() will look up, so a caller can fetch them first."""
    try:
        headers, _ = dkim.rfc822_parse(message)
    except dkim.MessageFormatError:
        return []
    names = []
    for name, value in headers:
        if name.lower() == b"dkim-signature":
            try:
                tags = parse_tag_value(value)
                names.append(_key_name(tags))
            except (InvalidTagValueList, KeyError, UnicodeDecodeError):
                continue
    return list(dict.fromkeys(names))


def verify(message: bytes, lookup: Lookup, *, now: float | None = None) -> list[SignatureResult]:
    """One SignatureResult per DKIM-Signature field, top to bottom ([] when unsigned)."""
    when = time.time() if now is None else now
    try:
        headers, body = dkim.rfc822_parse(message)
    except dkim.MessageFormatError:
        return [SignatureResult("permerror", reason="unparsable header section")] if b"DKIM-Signature" in message else []
    results = []
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        tags: dict[bytes, bytes] = {}
        try:
            tags = parse_tag_value(value)
            _verify_one(headers, body, (name, value), tags, lookup, when)
            result = SignatureResult("pass")
        except _Outcome as outcome:
            result = SignatureResult(outcome.result, reason=outcome.reason)
        except InvalidTagValueList:
            result = SignatureResult("permerror", reason="malformed tag list")
        except (ValueError, KeyError, IndexError, TypeError, dkim.DKIMException):
            result = SignatureResult("permerror", reason="malformed signature")
        results.append(SignatureResult(result.result, _text(tags.get(b"d")), _text(tags.get(b"s")),
                                       _text(tags.get(b"a")), result.reason))
    return results


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _key_name(tags: dict[bytes, bytes]) -> str:
    return (tags[b"s"] + b"._domainkey." + tags[b"d"]).decode("ascii").lower().rstrip(".")


def _verify_one(headers: list[tuple[bytes, bytes]], body: bytes, field: tuple[bytes, bytes],
                tags: dict[bytes, bytes], lookup: Lookup, now: float) -> None:
    """Returns when the signature verifies; raises _Outcome otherwise."""
    _check_tags(tags, now)
    include = [h.strip().lower() for h in re.split(rb"\s*:\s*", tags[b"h"]) if h.strip()]
    if b"from" not in include:
        raise _Outcome("permerror", "From is not signed (RFC 6376 5.4)")
    try:
        name = _key_name(tags)
    except UnicodeDecodeError:
        raise _Outcome("permerror", "non-ASCII d= or s=") from None
    try:
        record = lookup(name)
    except DnsTempError as exc:
        raise _Outcome("temperror", f"key lookup failed: {exc}") from None
    if record is None:
        raise _Outcome("permerror", f"no key at {name}")
    if tags[b"a"] == b"rsa-sha1":  # after the lookup: a key that cannot be had is temperror first
        raise _Outcome("permerror", "rsa-sha1 is not a valid algorithm (RFC 8301 3.1)")
    public = _public_key(record, tags[b"a"])
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        raise _Outcome("permerror", "unknown canonicalisation") from None
    canonical_body = policy.canonicalize_body(body)
    if b"l" in tags:
        length = int(tags[b"l"])
        if length > len(canonical_body):
            raise _Outcome("fail", "l= is longer than the body")
        canonical_body = canonical_body[:length]
    try:
        expected = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]), validate=True)
        signature = base64.b64decode(re.sub(rb"\s+", b"", tags[b"b"]), validate=True)
    except binascii.Error:
        raise _Outcome("permerror", "bad base64 in b= or bh=") from None
    if hashlib.sha256(canonical_body).digest() != expected:
        raise _Outcome("fail", "body hash mismatch")
    # RFC 6376 8.15 (dkimpy's defence too): a From added above the signed one breaks the hash.
    include.append(b"from")
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, policy.canonicalize_headers(headers), include, field, tags)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, hasher.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        else:
            public.verify(signature, hasher.digest())
    except InvalidSignature:
        raise _Outcome("fail", "signature does not verify") from None


def _check_tags(tags: dict[bytes, bytes], now: float) -> None:
    """Required tags and their syntax (dkimpy), then t= and x= against NOW."""
    timeless = {k: v for k, v in tags.items() if k not in (b"t", b"x")}
    try:
        dkim.validate_signature_fields(timeless)
    except dkim.ValidationError as exc:
        raise _Outcome("permerror", str(exc)[:200]) from None
    for tag in (b"t", b"x"):
        if tag in tags and not tags[tag].isdigit():
            raise _Outcome("permerror", f"{tag.decode()}= is not a number")
    signed = int(tags[b"t"]) if b"t" in tags else None
    if signed is not None and signed > now + CLOCK_SLOP:
        raise _Outcome("permerror", "t= is in the future")
    if b"x" in tags:
        expires = int(tags[b"x"])
        if signed is not None and expires < signed:
            raise _Outcome("permerror", "x= is before t=")
        if expires < now - CLOCK_SLOP:
            raise _Outcome("permerror", "signature expired (x=)")


def _public_key(record: str, algorithm: bytes) -> rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    """The key of a key record (RFC 6376 3.6.1), checked against the signature's a=."""
    try:
        key = parse_tag_value(record.encode("ascii"))
    except (InvalidTagValueList, UnicodeEncodeError):
        raise _Outcome("permerror", "malformed key record") from None
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        raise _Outcome("permerror", "key record v= is not DKIM1")
    kind = key.get(b"k", b"rsa")
    if kind + b"-sha256" != algorithm:
        raise _Outcome("permerror", f"key type {kind.decode('ascii', 'replace')} does not match a=")
    if b"h" in key and b"sha256" not in [h.strip() for h in key[b"h"].split(b":")]:
        raise _Outcome("permerror", "key record does not allow sha256")
    if b"s" in key and not {b"*", b"email"} & {s.strip() for s in key[b"s"].split(b":")}:
        raise _Outcome("permerror", "key is not for email (s=)")
    data = re.sub(rb"\s+", b"", key.get(b"p", b""))
    if not data:
        raise _Outcome("permerror", "key revoked (empty p=)")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise _Outcome("permerror", "bad base64 in p=") from None
    if kind == b"ed25519":
        if len(raw) != 32:
            raise _Outcome("permerror", "an Ed25519 key is 32 octets (RFC 8463 4.2)")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    try:
        numbers = parse_public_key(raw)
    except (UnparsableKeyError, IndexError, ValueError, TypeError):
        raise _Outcome("permerror", "unparsable RSA key") from None
    modulus, exponent = numbers["modulus"], numbers["publicExponent"]
    if modulus.bit_length() < MIN_RSA_BITS:
        raise _Outcome("permerror", f"RSA key of {modulus.bit_length()} bits (RFC 8301: at least 1024)")
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        raise _Outcome("permerror", "unusable RSA key") from None
