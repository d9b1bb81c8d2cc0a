"""Admin API routes for the suppression list; mounted by mtad.http.admin.

The routes and bodies are listed in mtad.platform.suppressviews. Handlers decode, call the
SuppressionList and encode: every change is committed before the answer. A SuppressionError
becomes 400 invalid or 404 not_found; a body that does not decode is 400 with a bland message.
An import adds every good entry in one transaction and reports the bad ones by index.

Trust: the bearer-token holder is the operator, but addresses, reasons, tenants and expiries
are still checked (normalize_address, check_reason); nothing from the request is echoed
except the normalised address of an entry.
"""

from __future__ import annotations

import time
from typing import TypeVar

import msgspec
from aiohttp import web

from mtad.http.errors import ApiError, json_response
from mtad.platform import suppressviews as views
from mtad.platform.model import TenantError, check_tenant_name
from mtad.platform.suppress import (
    SuppressionError,
    SuppressionList,
    check_reason,
    normalize_address,
    parse_expiry,
)

T = TypeVar("T")

_LIST_KEY = web.AppKey("suppression_list", SuppressionList)
_STATUS = {"invalid": 400, "not_found": 404}
MAX_IMPORT = 1_000_000


def add_routes(app: web.Application, suppressions: SuppressionList) -> None:
    """Mount the suppression routes on the admin app (its auth and error middlewares apply)."""
    app[_LIST_KEY] = suppressions
    app.router.add_get(views.SUPPRESSIONS, _list)
    app.router.add_post(views.SUPPRESSIONS, _add)
    app.router.add_post(views.IMPORT, _import)
    app.router.add_delete(views.SUPPRESSIONS + "/{address}", _remove)


def _suppressions(request: web.Request) -> SuppressionList:
    return request.app[_LIST_KEY]


def _refused(exc: SuppressionError) -> ApiError:
    return ApiError(_STATUS[exc.code], exc.code, exc.message)


def _tenant(value: str | None) -> str:
    """A tenant query/body value: "" is the global list; else a tenant name's syntax."""
    if not value:
        return ""
    try:
        return check_tenant_name(value)
    except TenantError as exc:
        raise ApiError(400, "invalid", exc.message) from None


async def _body(request: web.Request, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.read(), type=type_)
    except msgspec.DecodeError:
        raise ApiError(400, "invalid", f"the request body is not a valid {type_.__name__} object") from None


async def _list(request: web.Request) -> web.Response:
    tenant = request.query.get("tenant")
    return json_response(await _suppressions(request).entries(None if tenant is None else _tenant(tenant)))


async def _add(request: web.Request) -> web.Response:
    suppressions = _suppressions(request)
    spec = await _body(request, views.NewSuppression)
    tenant = _tenant(spec.tenant)
    try:
        expires = parse_expiry(spec.expires, time.time(), suppressions.policy)
        entry = await suppressions.add(spec.address, tenant=tenant, reason=spec.reason, source="mtactl",
                                       expires=expires)
    except SuppressionError as exc:
        raise _refused(exc) from None
    return json_response(entry, status=201)


async def _remove(request: web.Request) -> web.Response:
    tenant = _tenant(request.query.get("tenant"))
    try:
        address = await _suppressions(request).remove(request.match_info["address"], tenant=tenant)
    except SuppressionError as exc:
        raise _refused(exc) from None
    return json_response(views.Removed(tenant=tenant, address=address))


async def _import(request: web.Request) -> web.Response:
    suppressions = _suppressions(request)
    spec = await _body(request, views.ImportRequest)
    tenant = _tenant(spec.tenant)
    if len(spec.entries) > MAX_IMPORT:
        raise ApiError(400, "invalid", f"at most {MAX_IMPORT} entries per import")
    now = time.time()
    good: dict[str, tuple[str, str, float | None]] = {}
    bad = []
    for index, item in enumerate(spec.entries):
        try:
            address = normalize_address(item.address)
            reason = check_reason(item.reason or views.MANUAL)
            good[address] = (address, reason, parse_expiry(item.expires, now, suppressions.policy))
        except SuppressionError as exc:
            bad.append(views.ImportProblem(index=index, message=exc.message))
    added = await suppressions.add_many(good.values(), tenant=tenant, source="import")
    return json_response(views.ImportResult(added=len(added), bad=bad))
