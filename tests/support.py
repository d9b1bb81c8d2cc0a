"""Small pieces several test files share: a hand-moved clock, test servers, feedback reports.

`Clock` is the clock a test moves by hand (`clock.now += 60`), for whatever takes a
`clock: Callable[[], float]`.

`make_test_tls()` writes a fresh EC test CA and a server certificate it signed (tests/peer.py's
SMTP peer, tests/stsserver.py's HTTPS policy server). `ThreadedServer` is the base of those
servers: an event loop of its own in a thread, so sync and async tests start and stop it alike.

`dsn_report()` builds a delivery status notification (RFC 3464: multipart/report with a
message/delivery-status part and the original's headers) from mx.peer.test; `arf_report()` a
complaint (RFC 5965: multipart/report with a message/feedback-report part, Feedback-Type
abuse, and the original message) from fbl@peer.test about angry@peer.test. Both are addressed
to `to` (the VERP return path under test) and name the original by its Message-ID, the way
mtad's feedback attribution reads them (tests/test_suppress.py in-process, tests/test_feedback.py
against a real daemon).

RFCs: 3464 (DSN), 5965 (ARF), both only as test input.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class Clock:
    """A clock the test moves by hand: calling it gives `now`."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TlsFiles(NamedTuple):
    ca: Path
    cert: Path
    key: Path


def make_test_tls(directory: Path, *, ca_name: str, server_name: str, names: list[x509.GeneralName]) -> TlsFiles:
    """Write a new EC test CA (`ca_name`) and a server certificate it signed for `names`.

    The certificate's subject CN is `server_name`; both are valid from an hour ago for two days.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(issuer).issuer_name(issuer).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


class ThreadedServer:
    """A test server on an event loop of its own in a daemon thread, so sync and async tests use it alike.

    `with server:` / `async with server:` start and stop it. A subclass writes `_serve(ready)`:
    listen, set `self.port`, set `ready`, then return once `self._stopping` is set.
    """

    thread_name = "test-server"

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.thread_name, daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError(f"{self.thread_name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self._serve(ready)

    async def _serve(self, ready: threading.Event) -> None:
        raise NotImplementedError


DsnRecipient = tuple[str, str, str, str]
"""(Final-Recipient address, Action, Status, Diagnostic-Code text or "" for none)."""


def dsn_report(*, to: str, message_id: str, original_from: str, recipients: Sequence[DsnRecipient]) -> bytes:
    """A DSN from mx.peer.test to `to` about the message `message_id` sent by `original_from`."""
    blocks = "".join(f"Final-Recipient: rfc822; {address}\r\nAction: {action}\r\nStatus: {status}\r\n"
                     + (f"Diagnostic-Code: smtp; {diagnostic}\r\n" if diagnostic else "") + "\r\n"
                     for address, action, status, diagnostic in recipients)
    return (f"From: MAILER-DAEMON@mx.peer.test\r\n"
            f"To: {to}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
            "\r\n"
            "--B\r\n"
            "Content-Type: text/plain\r\n"
            "\r\n"
            "Delivery to some recipients failed.\r\n"
            "--B\r\n"
            "Content-Type: message/delivery-status\r\n"
            "\r\n"
            "Reporting-MTA: dns; mx.peer.test\r\n"
            "\r\n"
            f"{blocks}"
            "--B\r\n"
            "Content-Type: text/rfc822-headers\r\n"
            "\r\n"
            f"Message-ID: {message_id}\r\n"
            f"From: {original_from}\r\n"
            "\r\n"
            "--B--\r\n").encode()


def arf_report(*, to: str, message_id: str, original_from: str, subject: str = "complaint",
               original_body: str = "hello") -> bytes:
    """An abuse complaint from fbl@peer.test to `to`: angry@peer.test (Source-IP 192.0.2.7) about
    the message `message_id` sent by `original_from`."""
    return (f"From: fbl@peer.test\r\n"
            f"To: {to}\r\n"
            f"Subject: {subject}\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n'
            "\r\n"
            "--A\r\n"
            "Content-Type: text/plain\r\n"
            "\r\n"
            "This is an email abuse report.\r\n"
            "--A\r\n"
            "Content-Type: message/feedback-report\r\n"
            "\r\n"
            "Feedback-Type: abuse\r\n"
            "User-Agent: fbl/1.0\r\n"
            "Version: 1\r\n"
            "Source-IP: 192.0.2.7\r\n"
            "Original-Rcpt-To: angry@peer.test\r\n"
            "\r\n"
            "--A\r\n"
            "Content-Type: message/rfc822\r\n"
            "\r\n"
            f"Message-ID: {message_id}\r\n"
            f"From: {original_from}\r\n"
            "To: angry@peer.test\r\n"
            "\r\n"
            f"{original_body}\r\n"
            "--A--\r\n").encode()
