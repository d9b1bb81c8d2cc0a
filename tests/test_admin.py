"""The admin control API, /healthz, the HTTP server and the admin token, over real HTTP.

Apps are served by HttpServer on 127.0.0.1:0 (or a unix socket) and called with aiohttp's
client; the spool is the real LMDB spool in tmp_path.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from mtad.events import Counters, Event
from mtad.http import adminapi
from mtad.http.admin import build_admin_app
from mtad.http.public import build_public_app, health_body, health_report
from mtad.http.server import HttpServer, HttpServerError, parse_address
from mtad.http.token import AdminTokenError, ensure_admin_token, read_admin_token
from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool

TOKEN = "s3cret-token"
BODY = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: a folded\r\n subject line\r\n"
    b"X-Raw: caf\xc3\xa9 \xff\r\n"
    b"\r\n"
    b"Hello.\r\nFrom: not a header\r\n"
)


async def store(spool: Any, *recipients: str, body: bytes = BODY, sender: str = "alice@example.test") -> str:
    queue_id = new_queue_id()
    envelope = Envelope(
        id=queue_id,
        sender=sender,
        arrival_time=time.time(),
        size=len(body),
        message_id=f"<{queue_id}@example.test>",
        client_address="192.0.2.1",
        client_helo="client.example.test",
        listener="mx",
    )
    rcpts = [Recipient(address=r) for r in recipients or ("bob@example.net",)]
    await spool.store(envelope, rcpts, body)
    return queue_id


@pytest_asyncio.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = Spool.open(str(tmp_path / "spool"), map_size=64 * 1024**2, commit_linger=0.0, commit_max_batch=64)
    try:
        yield opened
    finally:
        await opened.close()


class Hooks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def held(self, queue_id: str) -> None:
        self.calls.append(("held", queue_id))

    def deleted(self, queue_id: str) -> None:
        self.calls.append(("deleted", queue_id))
    # no released(): hooks are optional, method by method


class Admin:
    """A served admin app plus a client session that sends the token."""

    def __init__(self, base: str, session: aiohttp.ClientSession, hooks: Hooks, counters: Counters) -> None:
        self.base = base
        self.session = session
        self.hooks = hooks
        self.counters = counters

    def request(self, method: str, path: str, *, token: str | None = TOKEN) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.session.request(method, self.base + path, headers=headers)

    async def json(self, method: str, path: str, status: int = 200) -> Any:
        async with self.request(method, path) as response:
            assert response.status == status, await response.text()
            assert response.content_type == "application/json"
            return await response.json()

    async def queue(self) -> list[adminapi.QueueEntry]:
        async with self.request("GET", adminapi.QUEUE) as response:
            assert response.status == 200
            assert response.content_type == "application/x-ndjson"
            data = await response.read()
        return [msgspec.json.decode(line, type=adminapi.QueueEntry) for line in data.splitlines()]


@pytest_asyncio.fixture
async def admin(spool: Any) -> AsyncIterator[Admin]:
    counters = Counters()
    hooks = Hooks()
    app = build_admin_app(spool=spool, counters=counters, token=TOKEN, started=time.time() - 5, queue_hooks=hooks)
    server = HttpServer()
    await server.start(app, "127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as session:
            yield Admin(f"http://{server.bound()}", session, hooks, counters)
    finally:
        await server.stop()


# -- the admin token ---------------------------------------------------------------------------


def test_token_created_private_and_stable(tmp_path: Path) -> None:
    spool_dir = str(tmp_path / "spool")
    token = ensure_admin_token(spool_dir)
    path = Path(spool_dir, "admin.token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40
    assert ensure_admin_token(spool_dir) == token
    assert read_admin_token(spool_dir) == token
    assert os.listdir(spool_dir) == ["admin.token"]  # no temporary file left behind


def test_token_refused_when_group_or_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("token\n")
    path.chmod(0o644)
    with pytest.raises(AdminTokenError, match="readable by group or others"):
        ensure_admin_token(str(tmp_path))
    path.chmod(0o640)
    with pytest.raises(AdminTokenError, match="mode 0640"):
        read_admin_token(str(tmp_path))
    path.chmod(0o600)
    assert read_admin_token(str(tmp_path)) == "token"


def test_token_refuses_symlink_and_empty_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("token")
    target.chmod(0o600)
    (tmp_path / "admin.token").symlink_to(target)
    with pytest.raises(AdminTokenError, match="symbolic link"):
        ensure_admin_token(str(tmp_path))
    (tmp_path / "admin.token").unlink()
    (tmp_path / "admin.token").write_text("")
    (tmp_path / "admin.token").chmod(0o600)
    with pytest.raises(AdminTokenError, match="empty"):
        read_admin_token(str(tmp_path))
    with pytest.raises(AdminTokenError, match="cannot read"):
        read_admin_token(str(tmp_path / "missing"))


# -- pure parts ----------------------------------------------------------------------------------


def test_parse_headers_unfolds_and_stops_at_body() -> None:
    headers, truncated = adminapi.parse_headers(BODY)
    assert not truncated
    assert [(h.name, h.value) for h in headers] == [
        ("From", "Alice <alice@example.test>"),
        ("To", "bob@example.net"),
        ("Subject", "a folded subject line"),
        ("X-Raw", "café \ufffd"),
    ]
    lf_only, _ = adminapi.parse_headers(b"A: 1\nB: 2\n\nC: 3\n")
    assert [h.name for h in lf_only] == ["A", "B"]
    huge = b"X: " + b"a" * adminapi.MAX_HEADER_BYTES + b"\r\n\r\nbody"
    assert adminapi.parse_headers(huge)[1] is True


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:8026") == ("127.0.0.1", 8026)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("/run/mtad/admin.sock") == "/run/mtad/admin.sock"
    for bad in ("::1:80", "localhost", "host:99999", ":80", "relative/path.sock"):
        with pytest.raises(HttpServerError):
            parse_address(bad)


def test_health_body() -> None:
    assert health_body(*health_report(spool_writable=True, listeners_up=True, queued=3)) == (
        200,
        {"status": "ok", "queued": 3},
    )
    status, body = health_body(*health_report(spool_writable=False, listeners_up=True))
    assert status == 503 and body == {"status": "unavailable", "reasons": ["spool not writable"]}


# -- the admin API over HTTP ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_route_needs_the_token(admin: Admin) -> None:
    for token in (None, "wrong", TOKEN + "x", ""):
        for method, path in (("GET", adminapi.QUEUE), ("POST", f"{adminapi.QUEUE}/delete-all"), ("GET", "/nope")):
            async with admin.request(method, path, token=token) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Bearer"
                body = await response.json()
                assert body["error"]["code"] == "unauthorized"
    async with admin.session.get(admin.base + adminapi.STATS, headers={"Authorization": f"Basic {TOKEN}"}) as r:
        assert r.status == 401
    assert (await admin.json("GET", "/admin/v1/nope", 404))["error"]["code"] == "not_found"
    assert (await admin.json("PUT", adminapi.STATS, 405))["error"]["code"] == "method_not_allowed"


@pytest.mark.asyncio
async def test_queue_list_streams_every_message(admin: Admin, spool: Any) -> None:
    assert await admin.queue() == []
    first = await store(spool, "bob@example.net", "carol@example.org")
    ids = [first] + [await store(spool, f"r{i}@example.net") for i in range(300)]  # > one stream batch
    entries = await admin.queue()
    assert [e.id for e in entries] == ids
    entry = entries[0]
    assert entry.message_id == f"<{first}@example.test>"
    assert entry.sender == "alice@example.test" and entry.size == len(BODY) and entry.arrival_time > 0
    assert [(r.address, r.state, r.attempts, r.next_attempt, r.last_reply) for r in entry.recipients] == [
        ("bob@example.net", "queued", 0, 0.0, ""),
        ("carol@example.org", "queued", 0, 0.0, ""),
    ]


@pytest.mark.asyncio
async def test_show_and_body(admin: Admin, spool: Any) -> None:
    queue_id = await store(spool, "bob@example.net")
    detail = await admin.json("GET", f"{adminapi.QUEUE}/{queue_id}")
    assert detail["id"] == queue_id
    assert detail["client_address"] == "192.0.2.1" and detail["listener"] == "mx"
    assert detail["recipients"][0]["address"] == "bob@example.net"
    assert ["Subject", "a folded subject line"] in detail["headers"]
    assert all(name != "From" or value.startswith("Alice") for name, value in detail["headers"])
    async with admin.request("GET", f"{adminapi.QUEUE}/{queue_id}/body") as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        assert await response.read() == BODY
    missing = new_queue_id()
    for path in (f"{adminapi.QUEUE}/{missing}", f"{adminapi.QUEUE}/{missing}/body"):
        error = (await admin.json("GET", path, 404))["error"]
        assert error == {"code": "no_such_message", "message": f"no such message: {missing}"}
    error = (await admin.json("GET", f"{adminapi.QUEUE}/..%2Fetc", 404))["error"]
    assert error["code"] == "no_such_message" and "etc" not in error["message"]


@pytest.mark.asyncio
async def test_hold_release_delete_one(admin: Admin, spool: Any) -> None:
    queue_id = await store(spool, "bob@example.net")
    other = await store(spool, "carol@example.net")
    q = adminapi.QUEUE
    assert await admin.json("POST", f"{q}/{queue_id}/hold") == {"action": "hold", "count": 1}
    entries = {e.id: e for e in await admin.queue()}
    assert entries[queue_id].held and entries[queue_id].recipients[0].state == "held"
    assert not entries[other].held and entries[other].recipients[0].state == "queued"
    assert spool.get(queue_id).envelope.held
    assert await admin.json("POST", f"{q}/{queue_id}/release") == {"action": "release", "count": 1}
    assert not spool.get(queue_id).envelope.held
    assert await admin.json("DELETE", f"{q}/{queue_id}") == {"action": "delete", "count": 1}
    assert spool.get(queue_id) is None
    assert await admin.json("POST", f"{q}/{other}/delete") == {"action": "delete", "count": 1}
    assert [e.id for e in await admin.queue()] == []
    assert admin.hooks.calls == [("held", queue_id), ("deleted", queue_id), ("deleted", other)]
    for method, path in (("POST", f"{q}/{queue_id}/hold"), ("DELETE", f"{q}/{queue_id}")):
        assert (await admin.json(method, path, 404))["error"]["code"] == "no_such_message"


@pytest.mark.asyncio
async def test_actions_on_all(admin: Admin, spool: Any) -> None:
    q = adminapi.QUEUE
    assert await admin.json("POST", f"{q}/hold-all") == {"action": "hold", "count": 0}
    ids = [await store(spool) for _ in range(3)]
    assert await admin.json("POST", f"{q}/hold-all") == {"action": "hold", "count": 3}
    assert all(spool.get(i).envelope.held for i in ids)
    assert await admin.json("POST", f"{q}/release-all") == {"action": "release", "count": 3}
    assert not any(spool.get(i).envelope.held for i in ids)
    assert await admin.json("POST", f"{q}/delete-all") == {"action": "delete", "count": 3}
    assert spool.count() == 0
    assert sorted(admin.hooks.calls) == sorted([("held", i) for i in ids] + [("deleted", i) for i in ids])


@pytest.mark.asyncio
async def test_stats(admin: Admin, spool: Any) -> None:
    await store(spool)
    for kind in ("received", "received", "delivered", "rejected", "bounced", "held"):
        admin.counters(Event(type=kind, time=time.time()))
    stats = await admin.json("GET", adminapi.STATS)
    uptime = stats.pop("uptime")
    assert 5 <= uptime < 60
    assert stats == {
        "received": 2, "delivered": 1, "deferred": 0, "bounced": 1,
        "expired": 0, "rejected": 1, "queued_now": 1,
    }


@pytest.mark.asyncio
async def test_internal_error_is_bland_json(spool: Any) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any) -> Any:
                raise RuntimeError("secret internals /var/spool")
            return fail

    app = build_admin_app(spool=Broken(), counters=Counters(), token=TOKEN, started=0.0)
    server = HttpServer()
    await server.start(app, "127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://{server.bound()}{adminapi.STATS}"
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 500
                text = await response.text()
    finally:
        await server.stop()
    assert msgspec.json.decode(text) == {"error": {"code": "internal", "message": "internal error"}}


# -- /healthz and the server ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_healthz() -> None:
    verdict: list[Any] = [(True, {"uptime": 1.5})]

    def health() -> tuple[bool, dict[str, Any]]:
        if isinstance(verdict[0], Exception):
            raise verdict[0]
        result: tuple[bool, dict[str, Any]] = verdict[0]
        return result

    server = HttpServer()
    await server.start(build_public_app(health=health), "127.0.0.1:0")
    url = f"http://{server.bound()}/healthz"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as r:
                assert (r.status, await r.json()) == (200, {"status": "ok", "uptime": 1.5})
            verdict[0] = (False, {"reasons": ["spool not writable"]})
            async with session.get(url) as r:
                assert (r.status, await r.json()) == (503, {"status": "unavailable", "reasons": ["spool not writable"]})
            verdict[0] = RuntimeError("secret")
            async with session.get(url) as r:
                assert r.status == 503 and "secret" not in await r.text()
            async with session.get(url.replace("/healthz", "/nope")) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_unix_socket_is_private_and_replaces_stale(spool: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="mtad") as directory:
        path = os.path.join(directory, "admin.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a socket file nobody listens on, as a crashed mtad leaves it
        app = build_admin_app(spool=spool, counters=Counters(), token=TOKEN, started=time.time())
        server = HttpServer()
        await server.start(app, path)
        try:
            assert server.bound() == path
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert os.listdir(directory) == ["admin.sock"]
            with pytest.raises(HttpServerError, match="another process is listening"):
                await HttpServer().start(app, path)
            connector = aiohttp.UnixConnector(path=path)
            async with aiohttp.ClientSession(connector=connector) as session:
                headers = {"Authorization": f"Bearer {TOKEN}"}
                async with session.get("http://mtad" + adminapi.STATS, headers=headers) as r:
                    assert r.status == 200 and (await r.json())["queued_now"] == 0
        finally:
            await server.stop()
        assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_tcp_port_in_use_is_a_clear_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        with pytest.raises(HttpServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            await HttpServer().start(build_public_app(health=lambda: (True, {})), f"127.0.0.1:{port}")
    finally:
        holder.close()
