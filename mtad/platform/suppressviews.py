"""The suppression list's vocabulary: entries, admin routes and bodies, shared by daemon and mtactl.

Pure: msgspec Structs and path helpers, no aiohttp and no SQLite (mtactl imports this and must
start fast). Routes, all under /admin/v1 and the admin bearer token:

    GET    /suppressions[?tenant=T]                [Suppression]       every entry (of one list)
    POST   /suppressions          NewSuppression   Suppression (201)   add or replace one entry
    DELETE /suppressions/{address}[?tenant=T]      Removed             404 not_found
    POST   /suppressions/import   ImportRequest    ImportResult        the good entries are added

Errors are the usual `{"error": {"code", "message"}}`: 400 invalid, 404 not_found.
A tenant of "" is the global list, which applies to every tenant's mail.
"""

from __future__ import annotations

from urllib.parse import quote

import msgspec

PREFIX = "/admin/v1"
SUPPRESSIONS = f"{PREFIX}/suppressions"
IMPORT = f"{SUPPRESSIONS}/import"

# Reasons the policy writes; an operator may give any short text ("manual" when none).
HARD_BOUNCE = "hard-bounce"
SOFT_BOUNCES = "soft-bounces"
COMPLAINT = "complaint"
UNSUBSCRIBE = "unsubscribe"
MANUAL = "manual"


class Suppression(msgspec.Struct, kw_only=True, frozen=True):
    """One suppressed address in one list (tenant "" = global)."""

    tenant: str
    address: str
    """local@domain: the domain lowercased (A-labels), the local part as given."""
    reason: str
    source: str = ""
    """What added it: "<event type>:<queue id>" for the policy, "mtactl" for an operator."""
    created: float
    expires: float | None = None
    """Unix time after which the entry no longer applies; None: never."""


class NewSuppression(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    address: str
    tenant: str = ""
    reason: str = MANUAL
    expires: str = ""
    """A duration from now ("30d"); "" takes [suppression] default_expiry, "never" is forever."""


class ImportEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    address: str
    reason: str = ""
    expires: str = ""


class ImportRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: str = ""
    entries: list[ImportEntry] = []


class ImportProblem(msgspec.Struct, kw_only=True):
    index: int
    """Position of the entry in the request (0-based)."""
    message: str


class ImportResult(msgspec.Struct, kw_only=True):
    added: int
    bad: list[ImportProblem] = []


class Removed(msgspec.Struct, kw_only=True):
    tenant: str
    address: str


def suppression_path(address: str) -> str:
    return f"{SUPPRESSIONS}/{quote(address, safe='@')}"


def tenant_query(tenant: str | None) -> str:
    return "" if tenant is None else f"?tenant={quote(tenant, safe='')}"
