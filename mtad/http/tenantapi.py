"""Admin API routes for tenants, SMTP users and API keys; mounted by mtad.http.admin.

The routes and bodies are listed in mtad.platform.views. Handlers only decode, call the
TenantDirectory and encode: every change is committed by the directory before the answer.
A TenantError becomes a 4xx with its code (invalid 400, not_found 404, exists and
domain_taken 409); a body that does not decode is 400 with a bland message.

Trust: the bearer-token holder is the operator, but bodies and path parts are still checked
(the directory validates every name, domain and password); secrets are never echoed except
the new API key in the one answer that creates it.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from mtad.http.errors import ApiError, json_response
from mtad.platform import views
from mtad.platform.model import TenantError, printable
from mtad.platform.secrets import parse_api_key
from mtad.platform.tenants import TenantDirectory

T = TypeVar("T")

_DIRECTORY_KEY = web.AppKey("tenant_directory", TenantDirectory)
_STATUS = {"invalid": 400, "not_found": 404, "exists": 409, "domain_taken": 409}


def add_routes(app: web.Application, directory: TenantDirectory) -> None:
    """Mount the tenant routes on the admin app (its auth and error middlewares apply)."""
    app[_DIRECTORY_KEY] = directory
    t = views.TENANTS
    app.router.add_get(t, _list_tenants)
    app.router.add_post(t, _add_tenant)
    app.router.add_get(t + "/{name}", _show_tenant)
    app.router.add_patch(t + "/{name}", _change_tenant)
    app.router.add_post(t + "/{name}/{action:disable|enable}", _disable_tenant)
    app.router.add_delete(t + "/{name}", _delete_tenant)
    app.router.add_post(t + "/{name}/apikeys", _create_api_key)
    app.router.add_get(t + "/{name}/apikeys", _list_api_keys)
    app.router.add_delete(views.APIKEYS + "/{id}", _revoke_api_key)
    app.router.add_post(views.SMTP_USERS, _add_smtp_user)
    app.router.add_get(views.SMTP_USERS, _list_smtp_users)
    app.router.add_delete(views.SMTP_USERS + "/{username}", _delete_smtp_user)
    app.router.add_post(views.SMTP_USERS + "/{username}/{action:disable|enable}", _disable_smtp_user)


def _directory(request: web.Request) -> TenantDirectory:
    return request.app[_DIRECTORY_KEY]


def _refused(exc: TenantError) -> ApiError:
    return ApiError(_STATUS[exc.code], exc.code, exc.message)


async def _body(request: web.Request, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.read(), type=type_)
    except msgspec.DecodeError:
        # msgspec's text would echo what the client sent; the message stays bland.
        raise ApiError(400, "invalid", f"the request body is not a valid {type_.__name__} object") from None


def _view(directory: TenantDirectory, name: str) -> views.TenantView:
    tenant = directory.get(name)
    if tenant is None:
        raise TenantError("not_found", f"no such tenant: {printable(name)}")
    usage = directory.quotas.usage(name)
    return views.tenant_view(
        tenant,
        views.Usage(hour=usage["hour"], day=usage["day"]),
        smtp_users=len(directory.list_smtp_users(name)),
        api_keys=sum(1 for key in directory.list_api_keys(name) if not key.revoked),
    )


async def _list_tenants(request: web.Request) -> web.Response:
    directory = _directory(request)
    return json_response([_view(directory, tenant.name) for tenant in directory.tenants()])


async def _add_tenant(request: web.Request) -> web.Response:
    directory = _directory(request)
    spec = await _body(request, views.NewTenant)
    try:
        tenant = await directory.add_tenant(spec.name, spec.domains, spec.quota)
    except TenantError as exc:
        raise _refused(exc) from None
    return json_response(_view(directory, tenant.name), status=201)


async def _show_tenant(request: web.Request) -> web.Response:
    try:
        return json_response(_view(_directory(request), request.match_info["name"]))
    except TenantError as exc:
        raise _refused(exc) from None


async def _change_tenant(request: web.Request) -> web.Response:
    directory = _directory(request)
    name = request.match_info["name"]
    change = await _body(request, views.TenantChange)
    try:
        current = directory.get(name)
        quota = change.quota.applied_to(current.quota) if current is not None else None
        await directory.set_tenant(name, quota=quota, domains=change.domains,
                                   add_domains=change.add_domains, remove_domains=change.remove_domains)
        return json_response(_view(directory, name))
    except TenantError as exc:
        raise _refused(exc) from None


async def _disable_tenant(request: web.Request) -> web.Response:
    directory = _directory(request)
    name = request.match_info["name"]
    try:
        await directory.set_disabled(name, request.match_info["action"] == "disable")
        return json_response(_view(directory, name))
    except TenantError as exc:
        raise _refused(exc) from None


async def _delete_tenant(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await _directory(request).delete_tenant(name)
    except TenantError as exc:
        raise _refused(exc) from None
    return json_response(views.Deleted(deleted=name))


async def _create_api_key(request: web.Request) -> web.Response:
    directory = _directory(request)
    name = request.match_info["name"]
    try:
        key = await directory.create_api_key(name)
    except TenantError as exc:
        raise _refused(exc) from None
    key_id = parse_api_key(key) or ""
    (info,) = [k for k in directory.list_api_keys(name) if k.id == key_id]
    return json_response(views.NewApiKey(id=key_id, tenant=name, created=info.created, key=key), status=201)


async def _list_api_keys(request: web.Request) -> web.Response:
    try:
        return json_response(_directory(request).list_api_keys(request.match_info["name"]))
    except TenantError as exc:
        raise _refused(exc) from None


async def _revoke_api_key(request: web.Request) -> web.Response:
    try:
        return json_response(await _directory(request).revoke_api_key(request.match_info["id"]))
    except TenantError as exc:
        raise _refused(exc) from None


async def _add_smtp_user(request: web.Request) -> web.Response:
    spec = await _body(request, views.NewSmtpUser)
    try:
        user = await _directory(request).add_smtp_user(spec.tenant, spec.username, spec.password)
    except TenantError as exc:
        raise _refused(exc) from None
    return json_response(user, status=201)


async def _list_smtp_users(request: web.Request) -> web.Response:
    tenant = request.query.get("tenant")
    try:
        return json_response(_directory(request).list_smtp_users(tenant))
    except TenantError as exc:
        raise _refused(exc) from None


async def _disable_smtp_user(request: web.Request) -> web.Response:
    disabled = request.match_info["action"] == "disable"
    try:
        user = await _directory(request).set_smtp_user_disabled(request.match_info["username"], disabled)
    except TenantError as exc:
        raise _refused(exc) from None
    return json_response(user)


async def _delete_smtp_user(request: web.Request) -> web.Response:
    username = request.match_info["username"]
    try:
        await _directory(request).delete_smtp_user(username)
    except TenantError as exc:
        raise _refused(exc) from None
    return json_response(views.Deleted(deleted=username.lower()))
