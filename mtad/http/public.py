"""The public HTTP app: `/healthz` and `/metrics` now; the `/v1` API and tracking join it later.

`GET /healthz` answers 200 `{"status": "ok", ...}` when mtad can take mail (spool writable,
listeners up) and 503 `{"status": "unavailable", "reasons": [...]}` when it cannot, so a load
balancer stops sending traffic to an instance that would only answer 451. No authentication:
it tells nothing beyond up or down and why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from mtad.http import metrics
from mtad.http.errors import error_middleware, json_response

log = structlog.get_logger("mtad.http")

Health = Callable[[], tuple[bool, dict[str, Any]]]
"""Returns (healthy, details); details are merged into the answer, `reasons` when unhealthy."""

_HEALTH_KEY: web.AppKey[Health] = web.AppKey("health")
_METRICS_KEY: web.AppKey[metrics.Source] = web.AppKey("metrics")


def build_public_app(*, health: Health, metrics_source: metrics.Source | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[_HEALTH_KEY] = health
    app.router.add_get("/healthz", _healthz)
    if metrics_source is not None:
        app[_METRICS_KEY] = metrics_source
        app.router.add_get("/metrics", _metrics)
    return app


async def _metrics(request: web.Request) -> web.Response:
    text = metrics.render(request.app[_METRICS_KEY]())
    return web.Response(body=text.encode("utf-8"), headers={"Content-Type": metrics.CONTENT_TYPE,
                                                            "Cache-Control": "no-store"})


def health_report(
    *, spool_writable: bool, listeners_up: bool, queued: int | None = None
) -> tuple[bool, dict[str, Any]]:
    """The /healthz verdict from what the daemon knows; a convenience for its `health` callable."""
    reasons = []
    if not spool_writable:
        reasons.append("spool not writable")
    if not listeners_up:
        reasons.append("listeners not up")
    details: dict[str, Any] = {}
    if queued is not None:
        details["queued"] = queued
    if reasons:
        details["reasons"] = reasons
    return not reasons, details


def health_body(healthy: bool, details: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Status code and JSON body for a health verdict (pure)."""
    if healthy:
        return 200, {**details, "status": "ok"}
    reasons = [str(reason) for reason in details.get("reasons", [])] or ["unhealthy"]
    return 503, {**details, "status": "unavailable", "reasons": reasons}


async def _healthz(request: web.Request) -> web.Response:
    health = request.app[_HEALTH_KEY]
    try:
        healthy, details = health()
    except Exception:
        # A health check that fails is an answer too; its text stays in our log, not the reply.
        log.exception("health_check_failed")
        healthy, details = False, {"reasons": ["health check failed"]}
    status, body = health_body(healthy, details)
    response = json_response(body, status)
    response.headers["Cache-Control"] = "no-store"
    return response
