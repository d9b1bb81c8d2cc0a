"""The admin API's tenant vocabulary: routes and bodies shared by mtad.http.tenantapi and mtactl.

Pure: msgspec Structs and path helpers, no aiohttp (mtactl imports this and must start fast).
Routes, all under /admin/v1 and the admin bearer token:

    GET    /tenants                       [TenantView]            every tenant, with usage
    POST   /tenants             NewTenant  TenantView (201)       409 exists / domain_taken
    GET    /tenants/{name}                TenantView
    PATCH  /tenants/{name}      TenantChange TenantView           quota fields and domains
    POST   /tenants/{name}/disable|enable  TenantView
    DELETE /tenants/{name}                Deleted                 with its users and keys
    POST   /tenants/{name}/apikeys        NewApiKey (201)         the key, shown this once
    GET    /tenants/{name}/apikeys        [ApiKeyInfo]            never a secret
    DELETE /apikeys/{id}                  ApiKeyInfo              revoked (kept, marked)
    POST   /smtp-users          NewSmtpUser SmtpUserInfo (201)
    GET    /smtp-users[?tenant=NAME]      [SmtpUserInfo]
    POST   /smtp-users/{username}/disable|enable  SmtpUserInfo
    DELETE /smtp-users/{username}         Deleted

Errors are the usual `{"error": {"code", "message"}}`: 400 invalid, 404 not_found,
409 exists / domain_taken (the TenantError codes).
"""

from __future__ import annotations

from urllib.parse import quote

import msgspec

from mtad.platform.model import ApiKeyInfo, Quota, SmtpUserInfo, Tenant

__all__ = ["ApiKeyInfo", "SmtpUserInfo"]

PREFIX = "/admin/v1"
TENANTS = f"{PREFIX}/tenants"
APIKEYS = f"{PREFIX}/apikeys"
SMTP_USERS = f"{PREFIX}/smtp-users"


class Usage(msgspec.Struct, kw_only=True):
    """Messages counted in the current UTC hour and day (this process only)."""

    hour: int = 0
    day: int = 0


class TenantView(msgspec.Struct, kw_only=True):
    name: str
    domains: list[str]
    disabled: bool
    created: float
    quota: Quota
    usage: Usage = msgspec.field(default_factory=Usage)
    smtp_users: int = 0
    api_keys: int = 0


class NewTenant(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    domains: list[str]
    quota: Quota = msgspec.field(default_factory=Quota)


class QuotaChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Quota fields to change; absent (None) ones keep their value."""

    per_second: float | None = None
    per_hour: int | None = None
    per_day: int | None = None
    max_message_size: int | None = None
    max_recipients: int | None = None

    def applied_to(self, quota: Quota) -> Quota:
        changes = {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}
        return msgspec.structs.replace(quota, **changes)


class TenantChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    quota: QuotaChange = msgspec.field(default_factory=QuotaChange)
    domains: list[str] | None = None
    add_domains: list[str] = []
    remove_domains: list[str] = []


class NewApiKey(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    created: float
    key: str


class NewSmtpUser(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: str
    username: str
    password: str


class Deleted(msgspec.Struct, kw_only=True):
    deleted: str


def tenant_view(tenant: Tenant, usage: Usage, smtp_users: int = 0, api_keys: int = 0) -> TenantView:
    return TenantView(
        name=tenant.name, domains=sorted(tenant.domains), disabled=tenant.disabled,
        created=tenant.created, quota=tenant.quota, usage=usage,
        smtp_users=smtp_users, api_keys=api_keys,
    )


def tenant_path(name: str, suffix: str = "") -> str:
    return f"{TENANTS}/{quote(name, safe='')}{suffix}"


def apikey_path(key_id: str) -> str:
    return f"{APIKEYS}/{quote(key_id, safe='')}"


def smtp_user_path(username: str) -> str:
    return f"{SMTP_USERS}/{quote(username, safe='')}"
