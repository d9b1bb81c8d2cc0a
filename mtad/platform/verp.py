"""VERP return paths: `bounces+<queue id>-<tag>@<bounce domain>`, signed so they cannot be forged.

Tenants' mail goes out with a return path that names the message (its queue id), so a bounce or
complaint sent back to it is attributed without guessing from the report's content. The tag is
HMAC-SHA256 of the queue id under a secret key, truncated to 10 bytes (80 bits) and written in
lowercase base32 without padding (16 characters): the local part is 8 + 22 + 1 + 16 = 47 octets,
inside RFC 5321's 64. A tag is checked with hmac.compare_digest (constant time), so a prober
cannot learn a valid tag byte by byte, and an invalid or forged local part attributes nothing.

The key is `[bounces] secret`, or else 32 random bytes kept mode 0600 in `<spool_dir>/verp.key`,
created once (written to a private temporary file and linked into place, like the admin token),
so the receiving side and the delivery side of one process, and a restarted process, agree.

`Verp` is pure (values in, values out); `load_key` and `verp_from_config` are the file I/O edge.

Trust: the local part handed to `parse` comes from a stranger's RCPT TO and is hostile; it is
length- and charset-checked before any HMAC is computed.
RFCs: 5321 4.5.3.1.1 (local part at most 64 octets), 4648 6 (base32).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets

from mtad import secretfile
from mtad.config.schema import Config
from mtad.records import Envelope
from mtad.secretfile import SecretFileError

KEY_FILE = "verp.key"
PREFIX = "bounces+"
TAG_BYTES = 10
TAG_CHARS = 16  # base32 of 10 bytes, no padding
QUEUE_ID_CHARS = 22
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
# Listeners whose mail is ours to send for someone (never mx: that is mail relayed to us).
VERP_LISTENERS = frozenset({"submission", "submissions", "http"})

_QUEUE_ID = re.compile(r"[0-9a-f]{22}")
_TAG = re.compile(r"[a-z2-7]{16}")
_CONTEXT = b"mtad-verp-1:"


class VerpKeyError(OSError):
    """The key file cannot be read or created; str() names the file and why."""


def wants_verp(sender: str, listener: str, tenant: str) -> bool:
    """Whether a message gets a VERP return path: never the null sender (a bounce must not
    bounce), never mail that came in on mx; mail of a tenant or from submission/API listeners."""
    if not sender or listener in ("mx", "dsn"):
        return False
    return bool(tenant) or listener in VERP_LISTENERS


class Verp:
    """Makes and checks VERP addresses for one bounce domain and key."""

    def __init__(self, domain: str, key: bytes) -> None:
        if not domain:
            raise ValueError("a VERP bounce domain is required")
        if len(key) < 16:
            raise ValueError("a VERP key needs at least 16 bytes")
        self.domain = domain.lower().rstrip(".")
        self._key = key

    def tag(self, queue_id: str) -> str:
        digest = hmac.new(self._key, _CONTEXT + queue_id.encode("ascii"), hashlib.sha256).digest()
        return base64.b32encode(digest[:TAG_BYTES]).decode("ascii").lower()

    def local_part(self, queue_id: str) -> str:
        """`bounces+<queue id>-<tag>`; ValueError when `queue_id` is not one of ours."""
        if not _QUEUE_ID.fullmatch(queue_id):
            raise ValueError("not a queue id")
        return f"{PREFIX}{queue_id}-{self.tag(queue_id)}"

    def address(self, queue_id: str) -> str:
        return f"{self.local_part(queue_id)}@{self.domain}"

    def return_path(self, envelope: Envelope) -> str:
        """The envelope sender to use on the wire for `envelope` (see wants_verp)."""
        if not wants_verp(envelope.sender, envelope.listener, envelope.tenant):
            return envelope.sender
        return self.address(envelope.id)

    def parse(self, local_part: str) -> str | None:
        """The queue id a VERP local part names, when its tag is right; else None."""
        if len(local_part) > MAX_LOCAL_PART or local_part[:len(PREFIX)].lower() != PREFIX:
            return None
        # Our tokens are lowercase; a relay that upper-cased the address still matches.
        token = local_part[len(PREFIX):].lower()
        queue_id, dash, tag = token.partition("-")
        if not dash or not _QUEUE_ID.fullmatch(queue_id) or not _TAG.fullmatch(tag):
            return None
        if not hmac.compare_digest(tag.encode("ascii"), self.tag(queue_id).encode("ascii")):
            return None
        return queue_id

    def is_bounce_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") == self.domain

    def claims(self, address: str) -> str | None:
        """The queue id of a recipient address at the bounce domain with a valid token, else None."""
        local, at, domain = address.rpartition("@")
        if not at or not self.is_bounce_domain(domain):
            return None
        return self.parse(local)


def load_key(spool_dir: str) -> bytes:
    """The key in `<spool_dir>/verp.key`, created (32 random bytes, 0600) when absent."""
    path = os.path.join(spool_dir, KEY_FILE)
    try:
        data = secretfile.ensure(path, secrets.token_bytes(32), "VERP key")
    except SecretFileError as exc:
        raise VerpKeyError(str(exc)) from None
    if len(data) < 16:
        raise VerpKeyError(f"VERP key {path} is too short; remove it and restart mtad")
    return data


def verp_from_config(cfg: Config) -> Verp | None:
    """The Verp of `[bounces]`, or None when no bounce domain is set (VERP off)."""
    bounces = cfg.bounces
    if not bounces.domain:
        return None
    key = bounces.secret.encode("utf-8") if bounces.secret else load_key(cfg.server.spool_dir)
    return Verp(bounces.domain, key)
