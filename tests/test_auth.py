"""SMTP AUTH: SASL PLAIN and LOGIN decoding (pure), and the exchange byte for byte over TLS.

The byte-exact tests run an in-process Receiver with a submission listener, a real tenant
directory (SQLite in tmp_path, scrypt in its thread pool) and a real TLS handshake; the client
is the raw-socket one of test_receive. Also holds the helpers test_throttle and test_submission
import (`submission`, `tenant_dir`, `secure`, `plain_login`).
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_receive import (  # noqa: F401 - tls_context is a fixture re-export
    HOSTNAME,
    Raw,
    Running,
    running,
    tls_context,
)

from mtad.config.schema import Limits, Listener, Role
from mtad.platform.model import Quota
from mtad.platform.quotas import QuotaTracker
from mtad.platform.tenants import TenantDirectory
from mtad.receive import auth, policy

PASSWORD = "correct horse battery"
USER = "alice@acme.test"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- helpers shared with test_throttle and test_submission ------------------------------------



@pytest_asyncio.fixture
async def tenant_dir(tmp_path: Path) -> AsyncIterator[TenantDirectory]:
    """acme (acme.test, user alice), other (other.test, user bob), off (disabled, user carol)."""
    tenants = await TenantDirectory.open(str(tmp_path / "state.db"))
    try:
        await tenants.add_tenant("acme", ["acme.test"])
        await tenants.add_tenant("other", ["other.test"])
        await tenants.add_tenant("off", ["off.test"])
        await tenants.add_smtp_user("acme", USER, PASSWORD)
        await tenants.add_smtp_user("other", "bob", PASSWORD)
        await tenants.add_smtp_user("off", "carol", PASSWORD)
        await tenants.disable_tenant("off")
        yield tenants
    finally:
        await tenants.close()


@asynccontextmanager
async def submission(context: ssl.SSLContext, tenants: Any, *, role: Role = "submission",
                     limits: Limits | None = None, clock: Callable[[], float] = time.time,
                     quotas: QuotaTracker | None = None) -> AsyncIterator[Running]:
    async with running(listeners=[Listener(role=role, address="127.0.0.1:0")], limits=limits, tls_context=context,
                       tenants=tenants, quotas=quotas, clock=clock) as run:
        yield run


async def secure(raw: Raw) -> bytes:
    """EHLO, STARTTLS, handshake, EHLO again; returns the EHLO reply inside TLS."""
    await raw.ask(b"EHLO client.test\r\n", b"250-")
    await raw.ask(b"STARTTLS\r\n", b"220 2.0.0")
    await raw.writer.start_tls(ssl._create_unverified_context(), server_hostname=HOSTNAME)
    return await raw.ask(b"EHLO client.test\r\n", b"250-")


async def plain_login(raw: Raw, user: str = USER, password: str = PASSWORD) -> bytes:
    return await raw.ask(b"AUTH PLAIN " + b64(f"\0{user}\0{password}".encode()) + b"\r\n", b"")


# -- pure: the AUTH command and the SASL messages ---------------------------------------------


@pytest.mark.parametrize(("arg", "expected"), [
    ("PLAIN", auth.AuthStart("PLAIN", None)),
    ("plain", auth.AuthStart("PLAIN", None)),
    ("PLAIN =", auth.AuthStart("PLAIN", b"")),
    ("PLAIN AGEAYg==", auth.AuthStart("PLAIN", b"\0a\0b")),
    ("LOGIN dXNlcg==", auth.AuthStart("LOGIN", b"user")),
    ("PLAIN *", auth.CANCELLED),
    ("PLAIN AGFAYg", auth.BAD_BASE64),  # padding is required
    ("PLAIN AG#AYg==", auth.BAD_BASE64),
    ("CRAM-MD5", auth.UNKNOWN_MECHANISM),
    ("XOAUTH2 abc", auth.UNKNOWN_MECHANISM),
    ("PLAIN a b", policy.reply.BAD_SYNTAX),
    ("PLAIN  AGEAYg==", policy.reply.BAD_SYNTAX),
    (None, policy.reply.BAD_SYNTAX),
])
def test_parse_auth(arg: str | None, expected: object) -> None:
    assert auth.parse_auth(arg) == expected


@pytest.mark.parametrize(("message", "expected"), [
    (b"\0alice\0pw", auth.Credentials("alice", "pw")),
    (b"alice\0alice\0pw", auth.Credentials("alice", "pw")),  # authzid equal to authcid
    (b"admin\0alice\0pw", auth.AUTH_FAILED),  # acting for somebody else
    (b"\0\0pw", auth.AUTH_FAILED),
    (b"\0alice\0", auth.AUTH_FAILED),
    (b"\0alice", auth.BAD_BASE64),
    (b"\0alice\0pw\0x", auth.BAD_BASE64),
    (b"\0al\xffice\0pw", auth.BAD_BASE64),
    (b"\0al\x01ice\0pw", auth.AUTH_FAILED),  # control characters in a username
    (b"\0" + b"a" * 300 + b"\0pw", auth.AUTH_FAILED),
    ("\0jos\u00e9\0p\u00e4ss".encode(), auth.Credentials("jos\u00e9", "p\u00e4ss")),
])
def test_decode_plain(message: bytes, expected: object) -> None:
    assert auth.decode_plain(message) == expected


def test_decode_response_and_login_steps() -> None:
    assert auth.decode_response(b"*") is auth.CANCELLED
    assert auth.decode_response(b"") == b""
    assert auth.decode_response(b"dXNlcg==") == b"user"
    assert auth.decode_response(b"dXNlcg=") is auth.BAD_BASE64
    assert auth.decode_login_step(b"a\0b") is auth.BAD_BASE64
    assert auth.login_credentials("", "pw") is auth.AUTH_FAILED
    assert auth.login_credentials("u", "pw") == auth.Credentials("u", "pw")


def test_credentials_never_show_the_password() -> None:
    shown = repr(auth.Credentials("alice", "s3cret-pass"))
    assert "s3cret" not in shown and "alice" in shown
    assert auth.loggable_username("a\nb\x00c") == "a?b?c"


@pytest.mark.parametrize(("facts", "expected"), [
    ({"role": "mx"}, policy.reply.NOT_IMPLEMENTED),
    ({"helo": ""}, policy.reply.NEED_HELO),
    ({"esmtp": False}, policy.reply.NEED_HELO),
    ({"authenticated": True}, auth.ALREADY_AUTHENTICATED),
    ({"in_transaction": True}, policy.reply.TRANSACTION_IN_PROGRESS),
    ({"tls": False}, auth.ENCRYPTION_REQUIRED),
    ({}, None),
    ({"role": "submissions"}, None),
])
def test_when_auth_may_run(facts: dict[str, Any], expected: object) -> None:
    base: dict[str, Any] = {"role": "submission", "tls": True, "helo": "c.test", "esmtp": True,
                            "authenticated": False, "in_transaction": False}
    assert auth.auth_refusal(**{**base, **facts}) == expected


def test_ehlo_offers_auth_last() -> None:
    lines = policy.ehlo_lines("h.test", max_size=10, tls_offered=False, auth=auth.MECHANISMS)
    assert lines.endswith(b"250-DSN\r\n250 AUTH PLAIN LOGIN\r\n")


# -- the exchange on the wire, byte for byte ------------------------------------------------


@pytest.mark.asyncio
async def test_no_auth_in_the_clear(tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    async with submission(tls_context, tenant_dir) as rx:
        raw = await rx.raw()
        ehlo = await raw.ask(b"EHLO client.test\r\n", b"250-")
        assert ehlo.endswith(b"250-DSN\r\n250 STARTTLS\r\n") and b"AUTH" not in ehlo
        await raw.ask(b"AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n",
                      b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")
        await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"530 5.7.0 Authentication required\r\n")
        inside = await secure(raw)
        assert inside.endswith(b"250-DSN\r\n250 AUTH PLAIN LOGIN\r\n") and b"STARTTLS" not in inside
        await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"530 5.7.0 Authentication required\r\n")
        assert await plain_login(raw) == b"235 2.7.0 Authentication successful\r\n"
        assert b"AUTH" not in await raw.ask(b"EHLO client.test\r\n", b"250-")
        await raw.ask(b"AUTH LOGIN\r\n", b"503 5.5.1 Already authenticated\r\n")
        await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"250 2.1.0")


@pytest.mark.asyncio
async def test_plain_with_a_challenge_and_login_both_ways(tls_context: ssl.SSLContext,  # noqa: F811
                                                          tenant_dir: TenantDirectory) -> None:
    async with submission(tls_context, tenant_dir) as rx:
        raw = await rx.raw()
        await secure(raw)
        await raw.ask(b"AUTH PLAIN\r\n", b"334 \r\n")
        await raw.ask(b64(f"{USER}\0{USER}\0{PASSWORD}".encode()) + b"\r\n",
                      b"235 2.7.0 Authentication successful\r\n")
        for initial in (False, True):
            raw = await rx.raw()
            await secure(raw)
            if initial:
                await raw.ask(b"AUTH LOGIN " + b64(b"bob") + b"\r\n", b"334 UGFzc3dvcmQ6\r\n")
            else:
                await raw.ask(b"AUTH login\r\n", b"334 VXNlcm5hbWU6\r\n")
                await raw.ask(b64(b"BOB") + b"\r\n", b"334 UGFzc3dvcmQ6\r\n")  # usernames ignore case
            await raw.ask(b64(PASSWORD.encode()) + b"\r\n", b"235 2.7.0 Authentication successful\r\n")


@pytest.mark.asyncio
async def test_exchange_edge_cases(tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    async with submission(tls_context, tenant_dir) as rx:
        raw = await rx.raw()
        await raw.ask(b"AUTH PLAIN\r\n", b"503 5.5.1 Send HELO or EHLO first\r\n")
        await secure(raw)
        await raw.ask(b"AUTH PLAIN not-base64!\r\n", b"501 5.5.2 Cannot decode response\r\n")
        await raw.ask(b"AUTH PLAIN\r\n", b"334 \r\n")
        await raw.ask(b"%%%\r\n", b"501 5.5.2 Cannot decode response\r\n")
        await raw.ask(b"AUTH PLAIN\r\n", b"334 \r\n")
        await raw.ask(b"*\r\n", b"501 5.7.0 Authentication cancelled\r\n")
        await raw.ask(b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n")
        await raw.ask(b64(USER.encode()) + b"\r\n", b"334 UGFzc3dvcmQ6\r\n")
        await raw.ask(b"*\r\n", b"501 5.7.0 Authentication cancelled\r\n")
        await raw.ask(b"AUTH PLAIN " + b64(b"no-nul-here") + b"\r\n", b"501 5.5.2 Cannot decode response\r\n")
        await raw.ask(b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication type\r\n")
        await raw.ask(b"AUTH PLAIN\r\n", b"334 \r\n")
        await raw.ask(b"A" * 3000 + b"\r\n", b"500 5.5.6 Authentication exchange line is too long\r\n")
        # an authzid naming another account is a failure, counted like a wrong password
        await raw.ask(b"AUTH PLAIN " + b64(f"bob\0{USER}\0{PASSWORD}".encode()) + b"\r\n",
                      b"535 5.7.8 Authentication credentials invalid\r\n")
        # the session is still usable, and the right credentials still work
        assert await plain_login(raw) == b"235 2.7.0 Authentication successful\r\n"
        assert [e.reason for e in rx.of_type("rejected")] == ["auth_failed"]


@pytest.mark.asyncio
async def test_wrong_password_unknown_user_and_disabled_tenant_fail_alike(
        tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    async with submission(tls_context, tenant_dir) as rx:
        raw = await rx.raw()
        await secure(raw)
        failed = b"535 5.7.8 Authentication credentials invalid\r\n"
        assert await plain_login(raw, password="wrong password!") == failed
        assert await plain_login(raw, user="nobody@acme.test") == failed
        assert await plain_login(raw, user="carol") == failed  # right password, disabled tenant
        await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"530 5.7.0")
        events = rx.of_type("rejected")
        assert [(e.reason, e.user, e.client_address, e.listener) for e in events] == [
            ("auth_failed", USER, "127.0.0.1", "submission"),
            ("auth_failed", "nobody@acme.test", "127.0.0.1", "submission"),
            ("auth_failed", "carol", "127.0.0.1", "submission"),
        ]
        assert all(PASSWORD not in repr(e) and "wrong password" not in repr(e) for e in events)


class BrokenDirectory:
    async def authenticate(self, username: str, password: str) -> None:
        raise RuntimeError("database is locked at /secret/path")


@pytest.mark.asyncio
async def test_a_failing_directory_is_a_bland_454(tls_context: ssl.SSLContext) -> None:  # noqa: F811
    async with submission(tls_context, BrokenDirectory(), quotas=QuotaTracker()) as rx:
        raw = await rx.raw()
        await secure(raw)
        assert await plain_login(raw) == b"454 4.7.0 Temporary authentication failure\r\n"
        assert rx.of_type("rejected") == []  # not the client's failure: not counted, not logged as one


@pytest.mark.asyncio
async def test_mx_has_no_auth_even_inside_tls(tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    async with submission(tls_context, tenant_dir, role="mx") as rx:
        raw = await rx.raw()
        assert b"AUTH" not in await secure(raw)
        await raw.ask(b"AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n",
                      b"502 5.5.1 Command not implemented\r\n")
        await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"250 2.1.0")
        await raw.ask(b"RCPT TO:<x@elsewhere.test>\r\n", b"550 5.7.1 Relay access denied\r\n")


@pytest.mark.asyncio
async def test_implicit_tls_offers_auth_at_once(tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    async with submission(tls_context, tenant_dir, role="submissions") as rx:
        import asyncio

        reader, writer = await asyncio.open_connection(rx.host, rx.port, ssl=ssl._create_unverified_context(),
                                                       server_hostname=HOSTNAME)
        raw = Raw(reader, writer)
        await raw.expect(b"220 ")
        ehlo = await raw.ask(b"EHLO client.test\r\n", b"250-")
        assert ehlo.endswith(b"250 AUTH PLAIN LOGIN\r\n") and b"STARTTLS" not in ehlo
        await raw.ask(b"STARTTLS\r\n", b"503 5.5.1 TLS already active\r\n")
        assert await plain_login(raw) == b"235 2.7.0 Authentication successful\r\n"


def test_quota_value_is_what_the_tenant_directory_stores() -> None:
    # the fields the receiver reads; a rename in the model must fail here, not on the wire
    assert {"max_message_size", "max_recipients", "per_second"} <= set(Quota.__struct_fields__)
