"""Submission (587 STARTTLS, 465 implicit TLS): sender rights, tenant quotas, and real clients.

First in-process (a Receiver with a real tenant directory and a hand-moved clock): what an
authenticated tenant may send. Then a real mtad process with mx, submission and submissions
listeners and a certificate made in tmp_path, driven by smtplib and swaks: STARTTLS + AUTH
PLAIN/LOGIN + a message that lands in the spool with its tenant; AUTH in the clear refused;
MAIL before AUTH refused; forged senders refused; a per-second quota answered 451 and recovering;
wrong passwords throttled then locked, on the mail log; STARTTLS injection still discarded;
the 465 certificate reloaded on SIGHUP; the shipped development switch `[tls] self_signed`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from harness import MtadProcess, wait_for, write_config
from support import Clock
from test_auth import PASSWORD, USER, plain_login, secure, submission, tenant_dir  # noqa: F401
from test_receive import QUEUED, send_mail, tls_context  # noqa: F401

from mtad.config.schema import Limits
from mtad.platform.model import Quota
from mtad.platform.quotas import QuotaTracker
from mtad.platform.tenants import TenantDirectory
from mtad.spool import Spool

MESSAGE = b"From: Alice <alice@acme.test>\r\nTo: x@elsewhere.test\r\nSubject: hi\r\n\r\nhello\r\n"


# -- in-process: sender rights and quotas ------------------------------------------------------


@pytest.mark.asyncio
async def test_sender_rights(tls_context: ssl.SSLContext, tenant_dir: TenantDirectory) -> None:  # noqa: F811
    async with submission(tls_context, tenant_dir, quotas=QuotaTracker()) as rx:
        raw = await rx.raw()
        await secure(raw)
        await plain_login(raw)
        not_owned = b"553 5.7.1 Sender address not owned by this account\r\n"
        await raw.ask(b"MAIL FROM:<ceo@other.test>\r\n", not_owned)
        await raw.ask(b"MAIL FROM:<x@acme.test.other.test>\r\n", not_owned)
        await raw.ask(b"MAIL FROM:<x@[127.0.0.1]>\r\n", not_owned)
        await raw.ask(b"MAIL FROM:<>\r\n", b"553 5.7.1 Null sender not allowed on submission\r\n")
        # a subdomain is owned; any recipient domain is fine (relay for the authenticated)
        assert QUEUED.fullmatch(await send_mail(raw, b"<news@mail.ACME.test>", (b"<x@elsewhere.test>",), MESSAGE))
        forged_from = b"553 5.7.1 From header address not owned by this account\r\n"
        for header in (b"From: boss@other.test", b"From: a@acme.test, b@other.test", b"From: nobody",
                       b"From: undisclosed:;", b"X-Note: no from at all"):
            body = header + b"\r\nSubject: x\r\n\r\nbody\r\n"
            assert await send_mail(raw, b"<a@acme.test>", (b"<x@elsewhere.test>",), body) == forged_from, header
        folded = b"From: Alice\r\n <alice@acme.test>\r\nFrom: =?utf-8?q?B=C3=B6b?= <bob@sub.acme.test>\r\n\r\nx\r\n"
        assert QUEUED.fullmatch(await send_mail(raw, b"<a@acme.test>", (b"<x@elsewhere.test>",), folded))
    stored = [(envelope.tenant, envelope.listener, envelope.sender) for envelope, _, _ in rx.spool.stored]
    assert stored == [("acme", "submission", "news@mail.acme.test"), ("acme", "submission", "a@acme.test")]
    assert {e.tenant for e in rx.of_type("received")} == {"acme"}
    refused = [e for e in rx.of_type("rejected")]
    assert len(refused) == 9 and all(e.tenant == "acme" and e.reply.startswith("553 5.7.1") for e in refused)


@pytest.mark.asyncio
async def test_tenant_quotas(tls_context: ssl.SSLContext, tmp_path: Path) -> None:  # noqa: F811
    clock = Clock()
    quotas = QuotaTracker(clock=clock)
    tenants = await TenantDirectory.open(str(tmp_path / "state.db"), quotas=quotas, clock=clock)
    try:
        await tenants.add_tenant("acme", ["acme.test"], Quota(per_second=1, max_recipients=2, max_message_size=2000))
        await tenants.add_smtp_user("acme", USER, PASSWORD)
        async with submission(tls_context, tenants, clock=clock, limits=Limits(max_recipients=5)) as rx:
            raw = await rx.raw()
            ehlo = await secure(raw)
            assert b"250-SIZE 26214400\r\n" in ehlo  # before AUTH: the server's limit
            await plain_login(raw)
            await raw.ask(b"MAIL FROM:<a@acme.test> SIZE=2001\r\n", b"552 5.3.4 Message size exceeds fixed limit\r\n")
            await raw.ask(b"MAIL FROM:<a@acme.test> SIZE=1000\r\n", b"250 2.1.0")
            await raw.ask(b"RCPT TO:<x@one.test>\r\n", b"250 2.1.5")
            await raw.ask(b"RCPT TO:<x@two.test>\r\n", b"250 2.1.5")
            await raw.ask(b"RCPT TO:<x@three.test>\r\n", b"452 4.5.3 Too many recipients\r\n")
            await raw.ask(b"DATA\r\n", b"354 ")
            await raw.send(MESSAGE + b"x" * 2000 + b"\r\n.\r\n")  # SIZE= lied: refused at the dot
            await raw.expect(b"552 5.3.4 Message size exceeds fixed limit\r\n")
            assert QUEUED.fullmatch(await send_mail(raw, b"<a@acme.test>", (b"<x@one.test>",), MESSAGE))
            refused = await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"451 4.7.1 ")
            assert b"per second" in refused, refused
            clock.now += 1.0  # the bucket refills
            assert QUEUED.fullmatch(await send_mail(raw, b"<a@acme.test>", (b"<x@one.test>",), MESSAGE))
            await raw.ask(b"MAIL FROM:<a@acme.test>\r\n", b"451 4.7.1 ")
    finally:
        await tenants.close()


# -- a real daemon, real clients ---------------------------------------------------------------


def make_cert(folder: Path, name: str, common_name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def prepare(tmp_path: Path, *, limits: str = "", tls: str | None = None) -> Path:
    """A config with mx, submission and submissions, tenants acme and other in state.db."""
    if tls is None:
        cert, key = make_cert(tmp_path, "cert", "first.test")
        tls = f'cert = "{cert}"\nkey = "{key}"\n'
    extra = f'[tls]\n{tls}\n[limits]\n{limits}\n[[route]]\ndomain = "*"\nnexthop = "127.0.0.1:9"\n'
    config = write_config(tmp_path, listeners=("mx", "submission", "submissions"), extra=extra)
    (tmp_path / "spool").mkdir()

    async def tenants() -> None:
        store = await TenantDirectory.open(str(tmp_path / "spool" / "state.db"))
        try:
            await store.add_tenant("acme", ["acme.test"])
            await store.add_tenant("other", ["other.test"])
            await store.add_tenant("slow", ["slow.test"], Quota(per_second=1))
            await store.add_smtp_user("acme", USER, PASSWORD)
            await store.add_smtp_user("slow", "slow", PASSWORD)
        finally:
            await store.close()
    asyncio.run(tenants())
    return config


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    proc = MtadProcess(prepare(tmp_path)).start()
    try:
        yield proc
    finally:
        proc.stop()


def unverified() -> ssl.SSLContext:
    return ssl._create_unverified_context()


def stored_envelopes(proc: MtadProcess) -> dict[str, Any]:
    """queue id -> envelope, read from the spool after the daemon stopped."""
    assert proc.stop() == 0
    spool = Spool.open(str(proc.directory / "spool"), map_size=64 * 1024**2, commit_linger=0, commit_max_batch=1)
    try:
        return {m.envelope.id: m.envelope for m in spool.messages()}
    finally:
        asyncio.run(spool.close())


@pytest.mark.slow
def test_smtplib_on_587_and_465(daemon: MtadProcess) -> None:
    host, port = daemon.smtp["submission"]
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
        assert (code, text) == (538, b"5.7.11 Encryption required for requested authentication mechanism")
        code, text = client.mail("alice@acme.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        client.starttls(context=unverified())
        client.ehlo("client.test")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.login(USER, PASSWORD)  # smtplib tries PLAIN first
        refused = client.sendmail("alice@acme.test", ["x@elsewhere.test"], MESSAGE)
        assert refused == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as sender:
            client.sendmail("ceo@other.test", ["x@elsewhere.test"], MESSAGE)
        assert sender.value.smtp_code == 553
        with pytest.raises(smtplib.SMTPDataError) as data:
            client.sendmail("alice@acme.test", ["x@elsewhere.test"], MESSAGE.replace(b"alice@acme.test", b"ceo@other.test"))
        assert (data.value.smtp_code, data.value.smtp_error) == (553, b"5.7.1 From header address not owned by this account")
    host, port = daemon.smtp["submissions"]
    with smtplib.SMTP_SSL(host, port, timeout=10, context=unverified()) as client:
        client.ehlo("client.test")
        client.user, client.password = USER, PASSWORD
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
        assert client.sendmail("alice@acme.test", ["y@elsewhere.test"], MESSAGE) == {}
    received = wait_for(lambda: [e for e in daemon.mail_log() if e.get("type") == "received"] if len(
        [e for e in daemon.mail_log() if e.get("type") == "received"]) == 2 else None)
    assert [(e["listener"], e["tenant"]) for e in received] == [("submission", "acme"), ("submissions", "acme")]
    envelopes = stored_envelopes(daemon)
    assert sorted((env.listener, env.tenant, env.sender, env.protocol) for env in envelopes.values()) == [
        ("submission", "acme", "alice@acme.test", "ESMTPSA"),
        ("submissions", "acme", "alice@acme.test", "ESMTPSA"),
    ]


@pytest.mark.slow
def test_queue_show_names_the_tenant(daemon: MtadProcess) -> None:
    with smtplib.SMTP_SSL(*daemon.smtp["submissions"], timeout=10, context=unverified()) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail("alice@acme.test", ["x@elsewhere.test"], MESSAGE) == {}
    [entry] = wait_for(lambda: daemon.queue_json() or None)
    shown = daemon.mtactl("queue", "show", entry["id"]).stdout.decode().splitlines()
    assert "tenant:     acme" in shown, shown
    assert shown.index("tenant:     acme") < shown.index("recipients: 1")  # with the envelope, not a header
    as_json = json.loads(daemon.mtactl("queue", "show", "--json", entry["id"]).stdout)
    assert (as_json["tenant"], as_json["listener"]) == ("acme", "submissions")


def test_queue_show_has_no_tenant_line_for_mx_mail() -> None:
    from mtad.http.adminapi import MessageDetail
    from mtad.mtactl.output import message_details

    detail = MessageDetail(id="0" * 22, message_id="<m@x>", sender="a@b.test", size=1, arrival_time=0.0,
                           recipients=[], listener="mx")
    assert not [line for line in message_details(detail) if line.startswith("tenant")]
    assert "tenant:     acme" in message_details(msgspec.structs.replace(detail, tenant="acme"))


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--silent", "1", "--timeout", "20", *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
@pytest.mark.peer
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_starttls_auth_plain_and_implicit_tls_auth_login(daemon: MtadProcess) -> None:
    common = ["--from", "alice@acme.test", "--to", "x@elsewhere.test", "--h-From", "alice@acme.test",
              "--auth-user", USER, "--auth-password", PASSWORD]
    host, port = daemon.smtp["submission"]
    plain = swaks("--server", f"{host}:{port}", "--tls", "--auth", "PLAIN", *common)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    host, port = daemon.smtp["submissions"]
    login = swaks("--server", f"{host}:{port}", "--tlsc", "--auth", "LOGIN", *common)
    assert login.returncode == 0, login.stdout + login.stderr
    wrong = swaks("--server", f"{host}:{port}", "--tlsc", "--auth", "PLAIN", *common[:-1], "not the password")
    assert wrong.returncode != 0 and "535 5.7.8" in wrong.stdout + wrong.stderr
    cleartext = swaks("--server", f"{host}:{daemon.smtp['submission'][1]}", "--auth", "PLAIN", *common)
    assert cleartext.returncode != 0  # swaks finds no AUTH advertised outside TLS
    received = wait_for(lambda: [e for e in daemon.mail_log() if e.get("type") == "received"] or None)
    assert {e["tenant"] for e in received} == {"acme"}


@pytest.mark.slow
def test_quota_451_then_recovers(daemon: MtadProcess) -> None:
    host, port = daemon.smtp["submissions"]
    message = MESSAGE.replace(b"alice@acme.test", b"slow@slow.test")
    with smtplib.SMTP_SSL(host, port, timeout=10, context=unverified()) as client:
        client.login("slow", PASSWORD)
        assert client.sendmail("slow@slow.test", ["x@elsewhere.test"], message) == {}
        code, text = client.mail("slow@slow.test")
        assert code == 451 and text.startswith(b"4.7.1 "), (code, text)
        client.rset()

        def admitted() -> bool:
            code, _ = client.mail("slow@slow.test")
            if code != 250:
                client.rset()
            return code == 250
        wait_for(admitted, timeout=5, interval=0.1)  # one message per second: back within a second
    rejected = [e for e in daemon.mail_log() if e.get("type") == "rejected"]
    assert rejected and all(e["reply"].startswith("451 4.7.1") and e["tenant"] == "slow" for e in rejected)


@pytest.mark.slow
def test_wrong_passwords_are_throttled_then_locked(tmp_path: Path) -> None:
    proc = MtadProcess(prepare(tmp_path, limits='auth_delay_after = 2\nauth_lock_after = 4\nauth_tarpit = "200ms"\n'))
    proc.start()
    try:
        host, port = proc.smtp["submissions"]
        with smtplib.SMTP_SSL(host, port, timeout=10, context=unverified()) as client:
            client.ehlo("client.test")
            # one mechanism per attempt (smtplib's login() would try PLAIN, then LOGIN)
            attempt = "PLAIN " + base64.b64encode(f"\0{USER}\0wrong password!!".encode()).decode()
            for _ in range(4):
                assert client.docmd("AUTH", attempt) == (535, b"5.7.8 Authentication credentials invalid")
            code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
            assert (code, text) == (454, b"4.7.0 Too many failed authentications, try later")
        events = wait_for(lambda: [e for e in proc.mail_log() if e.get("type") == "rejected"] if len(
            [e for e in proc.mail_log() if e.get("type") == "rejected"]) >= 5 else None)
        assert [e["reason"] for e in events] == ["auth_failed"] * 4 + ["auth_locked"]
        assert all(e["user"] == USER for e in events[:4]) and all(e["client_address"] == "127.0.0.1" for e in events)
        assert "wrong password" not in (proc.directory / "mail.log").read_text()
        assert "wrong password" not in proc.new_output()
    finally:
        proc.stop()


@pytest.mark.slow
def test_starttls_injection_on_587_is_discarded(daemon: MtadProcess) -> None:
    host, port = daemon.smtp["submission"]
    auth = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n"
    with socket.create_connection((host, port), timeout=10) as plain:
        stream = plain.makefile("rb")
        stream.readline()
        plain.sendall(b"EHLO client.test\r\n")
        while stream.readline()[3:4] == b"-":
            pass
        plain.sendall(b"STARTTLS\r\n" + auth + b"MAIL FROM:<alice@acme.test>\r\n")
        assert stream.readline().startswith(b"220 2.0.0")
        with unverified().wrap_socket(plain, server_hostname="mx.test.local") as tls:
            secure_stream = tls.makefile("rb")
            tls.sendall(b"EHLO client.test\r\n")
            first = secure_stream.readline()
            assert first.startswith(b"250-mx.test.local"), first  # our EHLO, not the injected AUTH
            while secure_stream.readline()[3:4] == b"-":
                pass
            tls.sendall(b"MAIL FROM:<alice@acme.test>\r\n")
            assert secure_stream.readline() == b"530 5.7.0 Authentication required\r\n"


def peer_common_name(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=10) as sock, \
            unverified().wrap_socket(sock) as tls:  # no server_hostname: no SNI at all
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    pem = ssl.DER_cert_to_PEM_cert(der)
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253"], input=pem,
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"CN=([^,\n]+)", subject)
    assert match, subject
    return match[1]


@pytest.mark.slow
def test_sighup_reloads_the_certificate_on_465_too(daemon: MtadProcess, tmp_path: Path) -> None:
    assert peer_common_name(*daemon.smtp["submissions"]) == "first.test"
    cert, key = make_cert(tmp_path, "second", "second.test")
    os.replace(cert, tmp_path / "cert.pem")
    os.replace(key, tmp_path / "cert.key")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: any(r.get("event") == "config.reloaded" for r in daemon.records()))
    assert peer_common_name(*daemon.smtp["submissions"]) == "second.test"
    with smtplib.SMTP(*daemon.smtp["submission"], timeout=10) as client:
        client.starttls(context=unverified())
        assert client.sock is not None
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert b"second.test" in (der or b"")


@pytest.mark.slow
def test_development_switch_makes_a_certificate(tmp_path: Path) -> None:
    config = prepare(tmp_path, tls="self_signed = true\n")
    check = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(config), "--check"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (tmp_path / "spool" / "tls").exists()  # --check makes nothing
    proc = MtadProcess(config).start()
    try:
        key = tmp_path / "spool" / "tls" / "self-signed.key"
        assert key.stat().st_mode & 0o777 == 0o600
        assert peer_common_name(*proc.smtp["submissions"]) == "mx.test.local"
        with smtplib.SMTP(*proc.smtp["submission"], timeout=10) as client:
            client.starttls(context=unverified())
            client.login(USER, PASSWORD)
            assert client.sendmail("alice@acme.test", ["x@elsewhere.test"], MESSAGE) == {}
        made = key.read_bytes()
    finally:
        proc.stop()
    proc.start()  # a restart reuses the certificate
    try:
        assert key.read_bytes() == made
    finally:
        proc.stop()
