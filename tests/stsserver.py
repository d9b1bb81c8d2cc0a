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
import shutil
import ssl
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from support import ThreadedServer, TlsFiles, make_test_tls

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
    names: list[x509.GeneralName] = [x509.DNSName(f"mta-sts.{domain}") for domain in STS_DOMAINS]
    return make_test_tls(directory, ca_name="mtad MTA-STS test CA", server_name="mta-sts test server", names=names)


class PolicyServer(ThreadedServer):
    """The HTTPS policy server; see the module docstring."""

    thread_name = "sts-server"

    def __init__(self, policies: dict[str, str | Reply] | None = None) -> None:
        super().__init__()
        self.policies: dict[str, str | Reply] = dict(policies or {})
        self.fetches: Counter[str] = Counter()

    async def _serve(self, ready: threading.Event) -> None:
        assert self._stopping is not None
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
