"""Admin routes for delivery: flush, bounce, the per-destination summary.

    POST /admin/v1/queue/flush[?domain=D]   every deferred recipient (of domain D) due now
    POST /admin/v1/queue/{id}/flush         the same for one message
    POST /admin/v1/queue/{id}/bounce        give up now, DSN to the sender, remove
    GET  /admin/v1/queue/summary            DestinationRow per destination, JSON lines

Mounted by admin.build_admin_app when the daemon runs a delivery engine. Answers use the
admin API's Structs (adminapi) and error shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec
from aiohttp import web

from mtad.config.endpoints import normalize_domain
from mtad.http import adminapi
from mtad.http.errors import ApiError, json_response


class SummaryRow(Protocol):
    destination: str
    queued: int
    deferred: int
    active: int
    oldest: float
    last_error: str
    suspended_until: float
    window: int


class DeliveryControl(Protocol):
    async def flush(self, *, queue_id: str = "", domain: str = "") -> int | None: ...
    async def bounce(self, queue_id: str) -> bool: ...
    async def summary(self) -> Sequence[SummaryRow]: ...
    def active_indexes(self, queue_id: str) -> frozenset[int]: ...


_CONTROL_KEY = web.AppKey("delivery_control", DeliveryControl)


def add_routes(app: web.Application, control: DeliveryControl) -> None:
    """Register the delivery routes (before the admin API's /queue/{id} routes)."""
    app[_CONTROL_KEY] = control
    app.router.add_post(adminapi.FLUSH, _flush_all)
    app.router.add_get(adminapi.SUMMARY, _summary)
    app.router.add_post(adminapi.QUEUE + "/{id}/flush", _flush_one)
    app.router.add_post(adminapi.QUEUE + "/{id}/bounce", _bounce)


def _queue_id(request: web.Request) -> str:
    queue_id = request.match_info["id"]
    if not adminapi.is_queue_id(queue_id):
        raise ApiError(404, "no_such_message", "no such message: (invalid queue id)")
    return queue_id


async def _flush_all(request: web.Request) -> web.Response:
    domain = request.query.get("domain", "")
    if domain:
        try:
            domain = normalize_domain(domain)
        except ValueError as exc:
            raise ApiError(400, "bad_domain", f"domain: {exc}") from None
    count = await request.app[_CONTROL_KEY].flush(domain=domain)
    return json_response(adminapi.QueueActionResult(action="flush", count=count or 0))


async def _flush_one(request: web.Request) -> web.Response:
    queue_id = _queue_id(request)
    count = await request.app[_CONTROL_KEY].flush(queue_id=queue_id)
    if count is None:
        raise ApiError(404, "no_such_message", f"no such message: {queue_id}")
    return json_response(adminapi.QueueActionResult(action="flush", count=count))


async def _bounce(request: web.Request) -> web.Response:
    queue_id = _queue_id(request)
    if not await request.app[_CONTROL_KEY].bounce(queue_id):
        raise ApiError(404, "no_such_message", f"no such message: {queue_id}")
    return json_response(adminapi.QueueActionResult(action="bounce", count=1))


async def _summary(request: web.Request) -> web.StreamResponse:
    rows = await request.app[_CONTROL_KEY].summary()
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    encoder = msgspec.json.Encoder()
    lines = bytearray()
    for row in rows:
        encoder.encode_into(msgspec.convert(row, adminapi.DestinationRow, from_attributes=True), lines, len(lines))
        lines += b"\n"
    await response.write(bytes(lines))
    await response.write_eof()
    return response
