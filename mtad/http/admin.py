"""The admin control API (`/admin/v1`): what mtactl talks to.

Routes (bodies are the Structs in mtad.http.adminapi):
    GET    /admin/v1/queue                 every queued message, one QueueEntry per JSON line, streamed
    GET    /admin/v1/queue/{id}            MessageDetail: envelope, recipients, headers of the body
    GET    /admin/v1/queue/{id}/body       the stored message, application/octet-stream
    POST   /admin/v1/queue/{id}/hold       \
    POST   /admin/v1/queue/{id}/release     > QueueActionResult; 404 when there is no such message
    POST   /admin/v1/queue/{id}/delete      |  (DELETE /admin/v1/queue/{id} is the same as .../delete)
    POST   /admin/v1/queue/{action}-all    /  the same for every queued message
    GET    /admin/v1/stats                 Stats: event counters since start + queued now + uptime
    POST   /admin/v1/dkim/reload           DkimReloaded: read the DKIM signing keys again (`dkim_reload`)
    (flush, bounce, summary: see deliveryapi.py, mounted when `delivery` is given)
    (tenants, API keys, SMTP users: see tenantapi.py, mounted when `tenants` is given)
    (the suppression list: see suppressapi.py, mounted when `suppressions` is given)

Every request needs `Authorization: Bearer <admin token>` (compared in constant time). The API
publishes no events itself; an optional `queue_hooks` object hears about every change so the
delivery scheduler can drop or pick up a message (see QueueHooks).

Trust: the token holder is the operator, but paths and ids are still checked; message headers
are hostile and only displayed (adminapi.parse_headers).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import msgspec
from aiohttp import web

from mtad.events import Counters
from mtad.http import adminapi, deliveryapi
from mtad.http.deliveryapi import DeliveryControl
from mtad.http.errors import (
    ApiError,
    Handler,
    error_middleware,
    json_error,
    json_response,
)
from mtad.http.suppressapi import add_routes as add_suppression_routes
from mtad.http.tenantapi import add_routes as add_tenant_routes
from mtad.http.token import ensure_admin_token
from mtad.platform.suppress import SuppressionList
from mtad.platform.tenants import TenantDirectory
from mtad.records import QueuedMessage

__all__ = ["AdminSpool", "QueueHooks", "build_admin_app", "ensure_admin_token"]

# Lines written to a streaming queue listing between flushes: large enough to be cheap, small
# enough that a slow client never makes us hold much in memory.
_STREAM_BATCH = 256
# Queue changes submitted together by the *-all actions (they share the spool's commits).
_ACTION_BATCH = 256



class AdminSpool(Protocol):
    """The part of mtad.spool.Spool the admin API uses."""

    def messages(self) -> Iterator[QueuedMessage]: ...
    def get(self, queue_id: str) -> QueuedMessage | None: ...
    def read_body(self, queue_id: str) -> bytes | None: ...
    async def set_held(self, queue_id: str, held: bool) -> bool: ...
    async def delete(self, queue_id: str) -> bool: ...
    def count(self) -> int: ...


class QueueHooks(Protocol):
    """Told after a queue change has been committed. Every method is optional."""

    def held(self, queue_id: str) -> None: ...
    def released(self, queue_id: str) -> None: ...
    def deleted(self, queue_id: str) -> None: ...


# The hook method each action calls (QueueHooks), in past tense like events.
_HOOK_NAMES = {"hold": "held", "release": "released", "delete": "deleted"}


class _Context:
    def __init__(self, spool: AdminSpool, counters: Counters, started: float, hooks: Any,
                 delivery: DeliveryControl | None = None) -> None:
        self.delivery = delivery
        self.spool = spool
        self.counters = counters
        self.started = started
        self.hooks = hooks

    async def apply(self, action: str, queue_id: str) -> bool:
        """Hold, release or delete one message; False when there is no such message."""
        if action == "delete":
            changed = await self.spool.delete(queue_id)
        else:
            changed = await self.spool.set_held(queue_id, action == "hold")
        if changed:
            hook = getattr(self.hooks, _HOOK_NAMES[action], None)
            if hook is not None:
                hook(queue_id)
        return changed

    def active(self, queue_id: str) -> frozenset[int]:
        return self.delivery.active_indexes(queue_id) if self.delivery is not None else frozenset()


_TOKEN_KEY = web.AppKey("admin_token", bytes)
_CONTEXT_KEY = web.AppKey("admin_context", _Context)


def build_admin_app(
    *,
    spool: AdminSpool,
    counters: Counters,
    token: str,
    started: float,
    queue_hooks: QueueHooks | None = None,
    delivery: DeliveryControl | None = None,
    tenants: TenantDirectory | None = None,
    dkim_reload: Callable[[], Awaitable[adminapi.DkimReloaded]] | None = None,
    suppressions: SuppressionList | None = None,
) -> web.Application:
    """The admin API as an aiohttp Application; `started` is the daemon's start (unix time)."""
    if not token:
        raise ValueError("the admin token must not be empty")
    app = web.Application(middlewares=[error_middleware, _auth_middleware])
    app[_TOKEN_KEY] = token.encode()
    app[_CONTEXT_KEY] = _Context(spool, counters, started, queue_hooks, delivery)
    q = adminapi.QUEUE
    if delivery is not None:
        deliveryapi.add_routes(app, delivery)
    if tenants is not None:
        add_tenant_routes(app, tenants)
    if suppressions is not None:
        add_suppression_routes(app, suppressions)
    app.router.add_get(q, _list_queue)
    for action in adminapi.ACTIONS:
        app.router.add_post(f"{q}/{action}-all", _action_all(action))
    app.router.add_get(q + "/{id}", _show)
    app.router.add_get(q + "/{id}/body", _body)
    app.router.add_post(q + "/{id}/{action:hold|release|delete}", _action_one)
    app.router.add_delete(q + "/{id}", _action_one)
    app.router.add_get(adminapi.STATS, _stats)
    if dkim_reload is not None:
        app.router.add_post(adminapi.DKIM_RELOAD, _dkim_reload(dkim_reload))
    return app


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Before routing answers, so an unauthenticated client learns nothing about routes.
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    expected = request.app[_TOKEN_KEY]
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
        return json_error(401, "unauthorized", "missing or wrong bearer token")
    return await handler(request)


def _context(request: web.Request) -> _Context:
    return request.app[_CONTEXT_KEY]


def _queue_id(request: web.Request) -> str:
    queue_id = request.match_info["id"]
    if not adminapi.is_queue_id(queue_id):
        raise _no_such_message(queue_id)
    return queue_id


def _no_such_message(queue_id: str) -> ApiError:
    # The id is echoed only when it looks like one, so the message stays a bland, safe line.
    shown = queue_id if adminapi.is_queue_id(queue_id) else "(invalid queue id)"
    return ApiError(404, "no_such_message", f"no such message: {shown}")


async def _list_queue(request: web.Request) -> web.StreamResponse:
    ctx = _context(request)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    encoder = msgspec.json.Encoder()
    buffer = bytearray()
    for lines, message in enumerate(ctx.spool.messages(), 1):
        entry = adminapi.queue_entry(message, ctx.active(message.envelope.id))
        encoder.encode_into(entry, buffer, len(buffer))
        buffer += b"\n"
        if lines % _STREAM_BATCH == 0:
            await response.write(bytes(buffer))
            buffer.clear()
    if buffer:
        await response.write(bytes(buffer))
    await response.write_eof()
    return response


async def _show(request: web.Request) -> web.Response:
    ctx = _context(request)
    queue_id = _queue_id(request)
    message = ctx.spool.get(queue_id)
    body = ctx.spool.read_body(queue_id) if message is not None else None
    if message is None or body is None:
        raise _no_such_message(queue_id)
    detail = await asyncio.get_running_loop().run_in_executor(
        None, adminapi.message_detail, message, body, ctx.active(queue_id)
    )
    return json_response(detail)


async def _body(request: web.Request) -> web.Response:
    queue_id = _queue_id(request)
    body = _context(request).spool.read_body(queue_id)
    if body is None:
        raise _no_such_message(queue_id)
    return web.Response(body=body, content_type="application/octet-stream")


async def _action_one(request: web.Request) -> web.Response:
    action = request.match_info.get("action", "delete")
    queue_id = _queue_id(request)
    if not await _context(request).apply(action, queue_id):
        raise _no_such_message(queue_id)
    return json_response(adminapi.QueueActionResult(action=action, count=1))


def _action_all(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        ctx = _context(request)
        # Ids first, changes after; a message that leaves the queue meanwhile is not counted.
        # Changes go to the writer in batches so that many share one synced commit.
        queue_ids = [message.envelope.id for message in ctx.spool.messages()]
        count = 0
        for start in range(0, len(queue_ids), _ACTION_BATCH):
            batch = queue_ids[start : start + _ACTION_BATCH]
            count += sum(await asyncio.gather(*(ctx.apply(action, queue_id) for queue_id in batch)))
        return json_response(adminapi.QueueActionResult(action=action, count=count))

    return handler


async def _stats(request: web.Request) -> web.Response:
    ctx = _context(request)
    by_type = ctx.counters.by_type
    stats = adminapi.Stats(
        received=by_type["received"],
        delivered=by_type["delivered"],
        deferred=by_type["deferred"],
        bounced=by_type["bounced"],
        expired=by_type["expired"],
        rejected=by_type["rejected"],
        queued_now=ctx.spool.count(),
        uptime=round(max(0.0, time.time() - ctx.started), 3),
    )
    return json_response(stats)


def _dkim_reload(reload: Callable[[], Awaitable[adminapi.DkimReloaded]]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return json_response(await reload())

    return handler
