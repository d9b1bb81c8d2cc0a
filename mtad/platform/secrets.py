"""Hashing of SMTP passwords and API keys (scrypt), API-key syntax, and the verified-secret cache.

A stored hash is self-describing: `scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`, so the cost can be
raised later and old hashes still verify. Each hash has its own 16-byte random salt; checks
compare in constant time (hmac.compare_digest). Hashing is CPU-bound and slow on purpose
(about 50 ms at n=2**14, r=8, p=1 on the reference machine); callers run `hash_secret` and
`verify_secret` in a thread pool (hashlib.scrypt releases the GIL), never on the event loop.

API keys are `mtad_<id>_<secret>`: `id` is 16 hex digits, public, the database key;
`secret` is 32 random bytes in URL-safe base64 (256 bits), shown once and stored only as a hash.

`VerifiedCache` remembers, for a short time, that a secret was verified: keyed by an HMAC-SHA256
of the whole presented secret under a random per-process key, so the cache holds nothing an
attacker who dumps it could replay, and the HTTP API / repeated AUTH need not run scrypt per
request. Only successes are cached: a wrong secret always costs a full scrypt.

Trust: every presented secret and every stored hash read back from disk is checked for shape
before use; a stored hash asking for absurd scrypt parameters is refused, not computed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
# Bounds on parameters read back from a stored hash (a corrupted or hostile row must not make
# us allocate gigabytes): n up to 2**20 with r=8 is 1 GiB, so the product is bounded instead.
_MAX_MEMORY = 256 * 1024 * 1024
_MAX_P = 16

API_KEY_PREFIX = "mtad_"
_API_KEY = re.compile(r"mtad_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class HashFormatError(ValueError):
    """A stored hash that is not `scrypt$n$r$p$salt$hash` with sane parameters."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEMORY + 1024 * 1024, dklen=length)


def hash_secret(secret: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The storable hash of `secret` with a fresh random salt. Slow: run it in an executor."""
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(secret.encode("utf-8", "surrogatepass"), salt, n, r, p, _HASH_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, digest) of a stored hash; HashFormatError when it is not one we accept."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
        raise HashFormatError("not an scrypt hash")
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= _MAX_P or 128 * r * n > _MAX_MEMORY:
        raise HashFormatError("scrypt parameters out of bounds")
    try:
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError):
        raise HashFormatError("bad base64 in hash") from None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise HashFormatError("bad salt or digest length")
    return n, r, p, salt, digest


def verify_secret(secret: str, stored: str) -> bool:
    """Does `secret` match `stored`? Constant-time comparison; False for a malformed hash."""
    try:
        n, r, p, salt, digest = parse_hash(stored)
    except HashFormatError:
        return False
    candidate = _scrypt(secret.encode("utf-8", "surrogatepass"), salt, n, r, p, len(digest))
    return hmac.compare_digest(candidate, digest)


def new_api_key() -> tuple[str, str]:
    """A fresh (key id, whole key): `mtad_<16 hex>_<43 base64url chars>`."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_api_key(key: str) -> str | None:
    """The key id of a well-formed API key, else None (nothing else is looked at)."""
    match = _API_KEY.fullmatch(key)
    return match[1] if match else None


def is_key_id(text: str) -> bool:
    return _KEY_ID.fullmatch(text) is not None


class VerifiedCache:
    """Secrets verified recently: HMAC-SHA256(process key, secret) -> (owner, stored hash, expiry).

    The owner is what the secret opens (a username or a key id); the stored hash is kept so a
    changed password or a re-created key misses the cache. Callers re-check the owner's record
    on every hit (disabled, revoked, deleted), so removing access takes effect at once; the cache
    only saves the scrypt. Bounded: past `max_entries` the oldest entry goes.
    """

    def __init__(self, ttl: float = 60.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = os.urandom(32)
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[bytes, tuple[str, str, float]] = {}

    def _digest(self, secret: str) -> bytes:
        return hmac.new(self._key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def get(self, secret: str) -> tuple[str, str] | None:
        """(owner, stored hash) when `secret` was verified less than ttl ago."""
        digest = self._digest(secret)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[2] <= self._clock():
            del self._entries[digest]
            return None
        return entry[0], entry[1]

    def put(self, secret: str, owner: str, stored: str) -> None:
        digest = self._digest(secret)
        self._entries.pop(digest, None)
        while len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (owner, stored, self._clock() + self._ttl)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
