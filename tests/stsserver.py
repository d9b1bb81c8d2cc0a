"""An MTA-STS policy server for tests: HTTPS on 127.0.0.1:0, certificates from a test CA.

`sts_tls()` makes (once per process) a CA of its own and a certificate for mta-sts.<domain>
of every domain in STS_DOMAINS. `PolicyServer` answers GET /.well-known/mta-sts.txt by the
Host header's domain from `server.policies`, which a test may change while it runs:

    server.policies["sts.test"] = policy_text("enforce", ["mx.peer.test"])   # 200 text/plain
    server.policies["x.test"] = Reply(status=301, headers={"Location": "https://elsewhere/"})
    server.policies["slow.test"] = HANG                                          # never answers

Anything else is 404. `server.fetches[domain]` counts the requests per domain. The server
runs its own event loop in a thread, so sync tests (a real mtad process) and async ones use it
alike.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import shutil
import ssl
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from peer import TlsFiles

STS_DOMAINS = ("sts.test", "testing.test", "other.test", "e2e.test", "broken.test")
HANG = "hang"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


def policy_text(mode: str, mx: list[str], max_age: int = 86400) -> str:
    return "version: STSv1\r\nmode: " + mode + "\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"


_lock = threading.Lock()
_files: list[TlsFiles] = []


def sts_tls() -> TlsFiles:
    """A CA and a certificate for mta-sts.<d> of every d in STS_DOMAINS (cached per process)."""
    with _lock:
        if not _files:
            directory = Path(tempfile.mkdtemp(prefix="mtad-sts-tls-"))
            atexit.register(shutil.rmtree, directory, True)
            _files.append(_make(directory))
        return _files[0]


def _make(directory: Path) -> TlsFiles:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtad MTA-STS test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(f"mta-sts.{domain}") for domain in STS_DOMAINS]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mta-sts test server")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
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


class PolicyServer:
    """The HTTPS policy server; see the module docstring."""

    def __init__(self, policies: dict[str, str | Reply] | None = None) -> None:
        self.policies: dict[str, str | Reply] = dict(policies or {})
        self.fetches: Counter[str] = Counter()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(ready),), name="sts-server",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError("policy server did not start")
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

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        files = sts_tls()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files.cert, files.key)
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        await runner.cleanup()

    async def _policy(self, request: web.Request) -> web.StreamResponse:
        host = (request.host or "").rpartition(":")[0] or request.host or ""
        domain = host.removeprefix("mta-sts.")
        self.fetches[domain] += 1
        answer = self.policies.get(domain)
        if answer is None:
            return web.Response(status=404, text="no policy")
        if answer == HANG:
            assert self._stopping is not None
            await self._stopping.wait()
            return web.Response(status=503)
        if isinstance(answer, str):
            return web.Response(body=answer.encode(), content_type="text/plain")
        response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        response.content_type = answer.content_type
        return response
