"""JSON errors for every mtad HTTP app: `{"error": {"code", "message"}}` and the middleware.

The middleware is the one place where a failure becomes an HTTP answer: aiohttp's own
HTTP exceptions (404 no route, 405 method) keep their status with a JSON body, and any other
exception is logged and answered with a bland 500. Exception text never reaches a client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from mtad.http.adminapi import ErrorBody, ErrorDetail

log = structlog.get_logger("mtad.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Codes for aiohttp's own HTTP errors: the client sees these, not aiohttp's reason text.
_CODES = {
    400: ("bad_request", "bad request"),
    401: ("unauthorized", "missing or wrong bearer token"),
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "method not allowed"),
    413: ("too_large", "request body too large"),
}

_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """Raise in a handler to answer `status` with a JSON error; `message` is shown to clients."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json"
    )


def json_error(status: int, code: str, message: str) -> web.Response:
    response = json_response(ErrorBody(ErrorDetail(code, message)), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _CODES.get(exc.status, ("http_error", "request failed"))
        response = json_error(exc.status, code, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("http_handler_failed", method=request.method, path=request.path)
        return json_error(500, "internal", "internal error")
