"""The server side of TLS for the SMTP listeners: the SSLContext, and a development certificate.

`server_context(cert, key)` is what STARTTLS (587, and 25 when [tls] is set) and implicit TLS
(465) use: TLS 1.2 at least, no compression, no renegotiation, the server's cipher order. The
cipher list is Python's own default for servers (OpenSSL 3 with `@SECLEVEL=2`): ECDHE and DHE
key exchange with AES-GCM, ChaCha20-Poly1305 and AES-CBC-SHA256/384 for TLS 1.2, OpenSSL's
TLS 1.3 suites; no RSA key exchange, no SHA-1 MACs, no anonymous or NULL ciphers (RFC 9325).

`ensure_self_signed(directory, hostname)` serves `[tls] self_signed = true`, a development
switch: with no certificate configured, mtad makes one (RSA-2048, one year, for the hostname,
localhost and 127.0.0.1 / ::1) under the spool directory the first time, then reuses it until
it nears expiry. Clients must be told not to verify it (swaks `--tls` does not by default).

Trust: the certificate files are the operator's (or ours); the key file is written 0600.
RFCs: 3207 (STARTTLS), 8314 (implicit TLS for submission, TLS 1.2 minimum), 9325 (BCP 195).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

CERT_NAME = "self-signed.pem"
KEY_NAME = "self-signed.key"
_RENEW_BEFORE = datetime.timedelta(days=7)
_VALIDITY = datetime.timedelta(days=365)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server SSLContext for `cert` (PEM chain) and `key`. Raises OSError / ssl.SSLError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context sets the first two already; said here so that no default change
    # in a later Python can drop them unnoticed.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert, key)
    return context


def ensure_self_signed(directory: str | Path, hostname: str, *,
                       now: datetime.datetime | None = None) -> tuple[str, str]:
    """Paths of a usable self-signed certificate and key in `directory`, made when missing,
    unreadable, for another hostname or within a week of expiry. Development only."""
    folder = Path(directory)
    cert, key = folder / CERT_NAME, folder / KEY_NAME
    now = now or datetime.datetime.now(datetime.UTC)
    if not _usable(cert, key, hostname, now):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_pem, key_pem = make_self_signed(hostname, now=now)
        _write(key, key_pem, 0o600)
        _write(cert, cert_pem, 0o644)
    return str(cert), str(key)


def make_self_signed(hostname: str, *, now: datetime.datetime) -> tuple[bytes, bytes]:
    """(certificate PEM, unencrypted PKCS#8 key PEM) for `hostname`, valid for a year."""
    # Imported here: only the development switch needs it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, hostname),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtad development (self-signed)"),
    ])
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _usable(cert: Path, key: Path, hostname: str, now: datetime.datetime) -> bool:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        loaded = x509.load_pem_x509_certificate(cert.read_bytes())
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except (OSError, ValueError, ssl.SSLError):
        return False
    common = loaded.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(common) and common[0].value == hostname and loaded.not_valid_after_utc - _RENEW_BEFORE > now


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write whole or not at all (a crash mid-write must not leave half a key behind)."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(temporary, mode)
    os.replace(temporary, path)
