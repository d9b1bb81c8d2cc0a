"""DKIM signing: keys on disk, relaxed canonicalisation, and the DKIM-Signature headers ingest adds.

Keys live in `<key_dir>/<domain>/<selector>.key` (PEM, 0600, directories 0700): RSA (2048
bits by default; below 1024 refused) or Ed25519. Every `.key` file present for a domain is
active, so two selectors sign side by side while DNS catches up with a rotation; a file renamed
to anything else (`s1.key.retired`) stops signing at the next reload (start, SIGHUP,
`POST /admin/v1/dkim/reload`).

The signing domain is the From header's domain or, failing keys for it, its nearest parent
with keys (relaxed DMARC alignment); a message without a key is passed on unsigned. The header
list is the configured names present in the message, each listed once per instance, plus once
more for the oversigned names (RFC 6376 8.15), so a second From cannot be added. No l= tag.

Canonicalisation (relaxed/relaxed) is done here with bytes methods, and the body is streamed
in chunks, so a 25 MB message is never copied whole; the signature itself is made by the
`cryptography` package (OpenSSL), which releases the GIL. dkimpy signs with pure-Python RSA
(6.5 ms a message, GIL held: see bench/bench_dkim.py) and is used for verification instead
(mtad.dkimverify), which keeps our signer checked by an implementation that is not ours.
`DkimSigner.sign` runs in a small thread pool of its own: never on the event loop.

Trust: the message is the client's and hostile (only its header section and body bytes are
read); key files are the operator's, checked for type, size and mode.
RFCs: 6376 3.4.2 and 3.4.4 (relaxed canonicalisation), 3.5 (tags), 3.7 (hash computation),
5.4 and 8.15 (header selection, oversigning); 8301 (rsa-sha256 only, keys >= 1024 bits);
8463 (ed25519-sha256).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from mtad.address import AddressError, normalize_domain
from mtad.config.schema import Config

log = structlog.get_logger("mtad.dkim")

MIN_RSA_BITS = 1024  # RFC 8301 3.2: smaller keys MUST NOT be used
GENKEY_RSA_BITS = (2048, 3072, 4096)  # what `mtactl dkim genkey` makes (RFC 8301 3.2: SHOULD 2048)
DEFAULT_HEADERS = (
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "List-Unsubscribe",
    "List-Unsubscribe-Post", "List-Id", "Feedback-ID", "Sender",
)
DEFAULT_OVERSIGN = ("From", "To", "Subject")
# RFC 6376 5.4.1: fields a signer SHOULD NOT sign (they change in transit or are per hop).
NEVER_SIGNED = frozenset({"dkim-signature", "received", "return-path", "comments", "keywords", "bcc", "resent-bcc"})
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")
_CHUNK = 1 << 20  # body canonicalisation works on about this much at a time
_SIGN_WORKERS = 2

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(Exception):
    """A key file that cannot be used; str() names the file and the reason."""


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private: PrivateKey
    path: str = ""

    @property
    def algorithm(self) -> str:
        return "ed25519-sha256" if isinstance(self.private, ed25519.Ed25519PrivateKey) else "rsa-sha256"

    @property
    def kind(self) -> str:
        """The k= tag of the key record: rsa or ed25519."""
        return "ed25519" if isinstance(self.private, ed25519.Ed25519PrivateKey) else "rsa"

    @property
    def bits(self) -> int:
        return self.private.key_size if isinstance(self.private, rsa.RSAPrivateKey) else 256

    def public_key_b64(self) -> str:
        """p= of the key record: SubjectPublicKeyInfo DER (RSA) or the raw 32 octets (RFC 8463 4.2)."""
        public = self.private.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(raw).decode("ascii")

    def record(self) -> str:
        """The TXT record text to publish at `<selector>._domainkey.<domain>` (RFC 6376 3.6.1)."""
        return f"v=DKIM1; k={self.kind}; p={self.public_key_b64()}"

    def sign_digest(self, digest: bytes) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(digest)  # RFC 8463 3: PureEdDSA over the SHA-256 hash
        return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


# -- keys on disk --------------------------------------------------------------------------

def check_selector(selector: str) -> str:
    """The selector in lowercase; ValueError unless it is a dot-separated list of DNS labels."""
    lowered = selector.lower()
    if len(lowered) > 63 * 4 or not _SELECTOR.fullmatch(lowered):
        raise ValueError(f"invalid selector {selector!r}: DNS labels (letters, digits, hyphens) separated by dots")
    return lowered


def key_path(key_dir: str | os.PathLike[str], domain: str, selector: str) -> Path:
    return Path(key_dir) / domain / f"{selector}.key"


def generate_key(algorithm: str, bits: int = 2048) -> PrivateKey:
    """A new private key: "rsa" (bits in GENKEY_RSA_BITS) or "ed25519"."""
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != "rsa":
        raise ValueError(f"unknown algorithm {algorithm!r}: rsa or ed25519")
    if bits not in GENKEY_RSA_BITS:
        raise ValueError(f"RSA keys of {bits} bits are not made here: {', '.join(map(str, GENKEY_RSA_BITS))}"
                         " (RFC 8301: 1024 is too weak)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(key_dir: str | os.PathLike[str], domain: str, selector: str, key: PrivateKey, *,
              force: bool = False) -> Path:
    """Write KEY as PKCS#8 PEM (0600; directories 0700). FileExistsError unless FORCE."""
    path = key_path(key_dir, domain, selector)
    Path(key_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(temp, path)
        else:
            os.link(temp, path)  # fails with FileExistsError instead of overwriting
    finally:
        temp.unlink(missing_ok=True)
    return path


def load_key(path: Path, domain: str, selector: str) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"{path}: cannot read: {(exc.strerror or 'error').lower()}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise DkimKeyError(f"{path}: not an unencrypted PEM private key") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{path}: RSA key of {private.key_size} bits is too weak (RFC 8301: at least 1024)")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{path}: neither an RSA nor an Ed25519 key")
    return SigningKey(domain=domain, selector=selector, private=private, path=str(path))


def load_keys(key_dir: str | os.PathLike[str]) -> tuple[dict[str, list[SigningKey]], list[str]]:
    """Every usable `<domain>/<selector>.key` under key_dir, by domain (selectors sorted), and one
    line per file that was skipped. A missing key_dir holds no keys."""
    keys: dict[str, list[SigningKey]] = {}
    problems: list[str] = []
    root = Path(key_dir)
    try:
        domain_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return keys, problems
    except OSError as exc:
        return keys, [f"{root}: cannot list: {(exc.strerror or 'error').lower()}"]
    for directory in domain_dirs:
        try:
            domain = normalize_domain(directory.name)
        except AddressError:
            problems.append(f"{directory}: not a domain name")
            continue
        for path in sorted(directory.glob("*.key")):
            try:
                selector = check_selector(path.stem)
                key = load_key(path, domain, selector)
            except (ValueError, DkimKeyError) as exc:
                problems.append(f"{path}: {exc}" if isinstance(exc, ValueError) else str(exc))
                continue
            if path.stat().st_mode & 0o077:
                problems.append(f"{path}: readable by others than its owner (chmod 600)")
            keys.setdefault(domain, []).append(key)
    return keys, problems


def txt_zone_line(key: SigningKey) -> str:
    """`S._domainkey.D. IN TXT ( "..." "..." )`: the record as a zone-file line, in strings of
    at most 255 octets (RFC 1035 3.3.14; RFC 6376 3.6.2.2 joins them without spaces)."""
    text = key.record()
    parts = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT ( {parts} )"


# -- canonicalisation (RFC 6376 3.4) -------------------------------------------------------

def _squeeze(text: bytes) -> bytes:
    """Every run of SP/HTAB as one SP (bytes methods: C speed, unlike a regex)."""
    if b"\t" in text:
        text = text.replace(b"\t", b" ")
    while b"  " in text:
        text = text.replace(b"  ", b" ")
    return text


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """`name:value` relaxed (3.4.2): name lowercased, value unfolded, WSP squeezed and stripped."""
    return name.lower().rstrip(b" \t") + b":" + _squeeze(value.replace(b"\r\n", b"")).strip(b" ") + b"\r\n"


def header_fields(section: bytes) -> list[tuple[bytes, bytes]]:
    """(name, raw value with its CRLFs) of each field of a header section, top to bottom."""
    return [(m[1], m[2]) for m in _FIELD.finditer(section)]


def relaxed_body_hash(body: bytes | bytearray, start: int = 0, chunk_size: int = _CHUNK) -> bytes:
    """SHA-256 of body[start:] in relaxed canonical form (3.4.4), read in chunks cut after a LF."""
    digest = hashlib.sha256()
    pending = 0  # CRLFs held back: they count only if more content follows (trailing empty lines)
    seen = False
    size = len(body)
    with memoryview(body) as view:
        position = start
        while position < size:
            cut = body.find(b"\n", min(position + chunk_size, size) - 1)
            end = size if cut < 0 else cut + 1
            chunk = _squeeze(bytes(view[position:end]))
            position = end
            if b" \r\n" in chunk:
                chunk = chunk.replace(b" \r\n", b"\r\n")
            content = chunk.rstrip(b"\r\n")
            trailing = (len(chunk) - len(content)) // 2
            if content:
                if pending:
                    digest.update(b"\r\n" * pending)
                digest.update(content)
                seen = True
                pending = trailing
            else:
                pending += trailing
    if seen:
        digest.update(b"\r\n")  # the last line's CRLF (added when the body lacked one)
    return digest.digest()


# -- choosing what to sign -----------------------------------------------------------------

def from_domain(fields: list[tuple[bytes, bytes]]) -> str | None:
    """The domain of the first From address, normalised (A-labels); None when there is none."""
    value = next((v for n, v in fields if n.lower() == b"from"), None)
    if value is None:
        return None
    text = value.replace(b"\r\n", b"").decode("utf-8", "replace")
    for _, address in email.utils.getaddresses([text]):
        if "@" in address:
            try:
                return normalize_domain(address.rpartition("@")[2].strip().rstrip("."))
            except AddressError:
                return None
    return None


def signing_domain(author_domain: str, has_keys: Callable[[str], bool]) -> str | None:
    """The author domain, or its nearest parent that has keys (never a bare top-level label)."""
    labels = author_domain.split(".")
    for i in range(len(labels) - 1):
        candidate = ".".join(labels[i:])
        if has_keys(candidate):
            return candidate
    return None


def header_list(fields: list[tuple[bytes, bytes]], names: Iterable[str], oversign: Iterable[str]) -> list[str]:
    """h=: each configured name once per instance present, plus once more when oversigned."""
    present: dict[str, int] = {}
    for name, _ in fields:
        lowered = name.decode("ascii").lower()
        present[lowered] = present.get(lowered, 0) + 1
    extra = {n.lower() for n in oversign}
    out: list[str] = []
    for wanted in dict.fromkeys(n.lower() for n in names):
        out += [wanted] * (present.get(wanted, 0) + (wanted in extra))
    return out


def _hashed_headers(fields: list[tuple[bytes, bytes]], h: list[str]) -> bytes:
    """The canonical fields h= names, each instance taken from the bottom up (RFC 6376 5.4.2)."""
    instances: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        instances.setdefault(name.decode("ascii").lower(), []).append((name, value))
    out = []
    for wanted in h:
        stack = instances.get(wanted)
        if stack:
            field_name, value = stack.pop()
            out.append(relaxed_header(field_name, value))
    return b"".join(out)


def _fold_list(names: list[str], first: int) -> str:
    lines, line = [], ""
    for name in names:
        piece = name if not line else ":" + name
        if line and first + len(line) + len(piece) > 76:
            lines.append(line + ":")
            line, first = name, 1
        else:
            line += piece
    return "\r\n\t".join([*lines, line])


def signature_field(key: SigningKey, h: list[str], body_hash: bytes, now: float,
                    headers: bytes) -> bytes:
    """The complete `DKIM-Signature:` field (CRLF-terminated) for the canonical HEADERS."""
    head = (f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain};\r\n"
            f"\ts={key.selector}; t={int(now)};\r\n"
            f"\th={_fold_list(h, 3)};\r\n"
            f"\tbh={base64.b64encode(body_hash).decode('ascii')};\r\n\tb=").encode("ascii")
    name, _, value = head.partition(b":")
    # RFC 6376 3.7: the signature covers its own field with an empty b=, canonicalised, no CRLF.
    digest = hashlib.sha256(headers + relaxed_header(name, value)[:-2]).digest()
    b64 = base64.b64encode(key.sign_digest(digest)).decode("ascii")
    return head + "\r\n\t ".join(b64[i:i + 72] for i in range(0, len(b64), 72)).encode("ascii") + b"\r\n"


# -- the signer ingest calls ---------------------------------------------------------------

@dataclass(frozen=True)
class SignPolicy:
    """Which mail is signed and how ([dkim] in the config)."""

    listeners: frozenset[str] = frozenset({"submission", "submissions", "http", "dsn"})
    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = DEFAULT_OVERSIGN


def sign_message(keys: dict[str, list[SigningKey]], policy: SignPolicy, headers: bytes,
                 body: bytes | bytearray, start: int, now: float) -> list[bytes]:
    """DKIM-Signature fields for one message (one per key of the signing domain), top first.

    HEADERS is the header section (CRLF-terminated fields), BODY[START:] the body. Returns []
    when the From domain (or a parent) has no key."""
    fields = header_fields(headers)
    author = from_domain(fields)
    domain = signing_domain(author, keys.__contains__) if author else None
    if domain is None:
        return []
    h = header_list(fields, policy.headers, policy.oversign)
    canonical = _hashed_headers(fields, h)
    body_hash = relaxed_body_hash(body, start)
    return [signature_field(key, h, body_hash, now, canonical) for key in keys[domain]]


def key_dir_of(cfg: Config) -> str:
    """[dkim].key_dir, or <spool_dir>/dkim when it is empty."""
    return cfg.dkim.key_dir or os.path.join(cfg.server.spool_dir, "dkim")


def policy_of(cfg: Config) -> SignPolicy:
    return SignPolicy(listeners=frozenset(cfg.dkim.sign), headers=tuple(cfg.dkim.headers),
                      oversign=tuple(cfg.dkim.oversign))


class DkimSigner:
    """Signs messages for Ingest in a bounded thread pool; keys can be swapped at any time."""

    def __init__(self, key_dir: str, policy: SignPolicy, *, clock: Callable[[], float] = time.time,
                 workers: int = _SIGN_WORKERS) -> None:
        self.key_dir = key_dir
        self.policy = policy
        self._clock = clock
        self._keys: dict[str, list[SigningKey]] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dkim-sign")

    @property
    def keys(self) -> dict[str, list[SigningKey]]:
        return self._keys

    def applies(self, listener: str) -> bool:
        """Whether mail that came in through LISTENER (a role, "http" or "dsn") is signed."""
        return listener in self.policy.listeners and bool(self._keys)

    def reload(self, key_dir: str | None = None, policy: SignPolicy | None = None) -> tuple[int, int, list[str]]:
        """Load every key again (blocking file reads); returns (domains, keys, problems)."""
        if key_dir is not None:
            self.key_dir = key_dir
        if policy is not None:
            self.policy = policy
        keys, problems = load_keys(self.key_dir)
        self._keys = keys  # one assignment: a signature in flight keeps the dict it started with
        for problem in problems:
            log.warning("dkim.key_skipped", problem=problem)
        count = sum(len(v) for v in keys.values())
        log.info("dkim.keys_loaded", key_dir=self.key_dir, domains=len(keys), keys=count)
        return len(keys), count, problems

    async def sign(self, headers: bytes, body: bytes | bytearray, start: int) -> list[bytes]:
        """The DKIM-Signature fields for the message, computed off the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, sign_message, self._keys, self.policy, headers,
                                          body, start, self._clock())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
