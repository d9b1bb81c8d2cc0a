"""`mtactl tenant|apikey|smtp-user` end to end: the real mtad process (tests/harness.py), real
admin API over its unix socket, real state.db; stdout, stderr and exit codes as operators see them.

One daemon serves the module; each test uses its own tenant names.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MtadProcess, write_config

from mtad.platform import secrets

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def mtad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtadProcess]:
    process = MtadProcess(write_config(tmp_path_factory.mktemp("mtad"))).start()
    try:
        yield process
    finally:
        process.stop()


def ok(mtad: MtadProcess, *args: str, stdin: bytes | None = None) -> str:
    result = mtad.mtactl(*args, stdin=stdin, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def fails(mtad: MtadProcess, code: int, *args: str, stdin: bytes | None = None) -> str:
    result = mtad.mtactl(*args, stdin=stdin, check=False)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == b""
    return result.stderr.decode()


def listed(mtad: MtadProcess, *args: str) -> dict[str, dict]:
    lines = ok(mtad, *args, "--json").splitlines()
    return {entry.get("name") or entry.get("id") or entry["username"]: entry for entry in map(json.loads, lines)}


def state_db(mtad: MtadProcess) -> Path:
    return mtad.directory / "spool" / "state.db"


def test_tenant_add_list_disable_enable_delete(mtad: MtadProcess) -> None:
    out = ok(mtad, "tenant", "add", "acme", "--domain", "acme.test", "Mail.Acme2.test",
             "--rate", "600/m", "--hourly", "1000", "--daily", "20000", "--max-size", "10MiB", "--max-recipients", "50")
    assert out == "added tenant acme: acme.test, mail.acme2.test\n"
    ok(mtad, "tenant", "add", "brio", "--domain", "brio.test", "--domain", "brio2.test")
    tenants = listed(mtad, "tenant", "list")
    acme = tenants["acme"]
    assert acme["domains"] == ["acme.test", "mail.acme2.test"] and acme["disabled"] is False
    assert acme["quota"] == {"per_second": 10.0, "per_hour": 1000, "per_day": 20000,
                             "max_message_size": 10 * 1024**2, "max_recipients": 50}
    assert acme["usage"] == {"hour": 0, "day": 0}
    assert tenants["brio"]["domains"] == ["brio.test", "brio2.test"]
    assert tenants["brio"]["quota"]["per_hour"] == 0

    table = ok(mtad, "tenant", "list").splitlines()
    assert table[0].split() == ["NAME", "STATE", "RATE", "HOUR", "DAY", "MAX-SIZE", "MAX-RCPT", "USERS", "KEYS", "DOMAINS"]
    (row,) = [line for line in table if line.startswith("acme ")]
    assert row.split() == ["acme", "enabled", "10/s", "0/1000", "0/20000", "10MiB", "50", "0", "0",
                           "acme.test,mail.acme2.test"]

    assert ok(mtad, "tenant", "disable", "acme") == "disabled tenant acme\n"
    assert listed(mtad, "tenant", "list")["acme"]["disabled"] is True
    assert "acme  disabled" in ok(mtad, "tenant", "list")
    ok(mtad, "tenant", "enable", "acme")
    changed = json.loads(ok(mtad, "tenant", "set", "acme", "--hourly", "0", "--add-domain", "acme3.test",
                            "--remove-domain", "mail.acme2.test", "--json"))
    assert changed["domains"] == ["acme.test", "acme3.test"] and changed["quota"]["per_hour"] == 0
    assert changed["quota"]["per_day"] == 20000 and changed["disabled"] is False
    assert ok(mtad, "tenant", "delete", "brio") == "deleted tenant brio\n"
    assert "brio" not in listed(mtad, "tenant", "list")


def test_refusals_exit_1_with_a_clear_line(mtad: MtadProcess) -> None:
    ok(mtad, "tenant", "add", "cargo", "--domain", "cargo.test")
    assert fails(mtad, 1, "tenant", "disable", "nobody") == "mtactl: mtad answered 404: no such tenant: nobody\n"
    assert fails(mtad, 1, "apikey", "create", "nobody") == "mtactl: mtad answered 404: no such tenant: nobody\n"
    assert "no such tenant: nobody" in fails(mtad, 1, "smtp-user", "add", "nobody", "u1", stdin=PASSWORD.encode())
    assert "tenant cargo exists" in fails(mtad, 1, "tenant", "add", "cargo", "--domain", "other-cargo.test")
    assert "overlaps cargo.test of tenant cargo" in fails(mtad, 1, "tenant", "add", "thief", "--domain", "x.cargo.test")
    assert "not a valid domain" in fails(mtad, 1, "tenant", "add", "thief", "--domain", "bad_domain!.test")
    assert "no such API key" in fails(mtad, 1, "apikey", "revoke", "0123456789abcdef")
    assert "no such SMTP user" in fails(mtad, 1, "smtp-user", "delete", "nobody")


@pytest.mark.parametrize("args", [
    ("tenant",),
    ("tenant", "add", "dandy"),  # no --domain
    ("tenant", "add", "dandy", "--domain", "dandy.test", "--rate", "fast"),
    ("tenant", "add", "dandy", "--domain", "dandy.test", "--hourly", "-1"),
    ("tenant", "add", "dandy", "--domain", "dandy.test", "--max-size", "huge"),
    ("apikey", "create"),
    ("smtp-user", "add", "dandy"),
])
def test_bad_usage_exits_2(mtad: MtadProcess, args: tuple[str, ...]) -> None:
    assert "usage:" in fails(mtad, 2, *args)


def test_apikey_is_printed_once_and_never_listed(mtad: MtadProcess) -> None:
    ok(mtad, "tenant", "add", "delta", "--domain", "delta.test")
    result = mtad.mtactl("apikey", "create", "delta")
    key = result.stdout.decode().strip()
    key_id = secrets.parse_api_key(key)
    assert key_id is not None and result.stdout.decode() == key + "\n"
    assert "only time it is shown" in result.stderr.decode() and key not in result.stderr.decode()
    created = json.loads(ok(mtad, "apikey", "create", "delta", "--json"))
    assert secrets.parse_api_key(created["key"]) == created["id"] and created["tenant"] == "delta"

    keys = listed(mtad, "apikey", "list", "delta")
    assert set(keys) == {key_id, created["id"]} and all(k["revoked"] == 0 for k in keys.values())
    text = ok(mtad, "apikey", "list", "delta")
    for listing in (text, json.dumps(keys), ok(mtad, "tenant", "list", "--json")):
        assert key not in listing and key[-43:] not in listing and created["key"] not in listing
    assert f"{key_id}  delta  created " in text and "active" in text
    assert listed(mtad, "tenant", "list")["delta"]["api_keys"] == 2

    assert ok(mtad, "apikey", "revoke", key_id) == f"revoked API key {key_id}\n"
    assert listed(mtad, "apikey", "list", "delta")[key_id]["revoked"] > 0
    assert "revoked 20" in ok(mtad, "apikey", "list", "delta")
    with sqlite3.connect(state_db(mtad)) as db:
        (stored,) = db.execute("SELECT secret_hash FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    assert stored.startswith("scrypt$") and key[-43:] not in stored and secrets.verify_secret(key, stored)


def test_smtp_user_password_from_stdin(mtad: MtadProcess) -> None:
    ok(mtad, "tenant", "add", "echo", "--domain", "echo.test")
    out = ok(mtad, "smtp-user", "add", "echo", "Sender@Echo.test", stdin=PASSWORD.encode() + b"\r\n")
    assert out == "added SMTP user sender@echo.test for tenant echo\n"
    with sqlite3.connect(state_db(mtad)) as db:
        (stored,) = db.execute("SELECT password_hash FROM smtp_users WHERE username = 'sender@echo.test'").fetchone()
    assert secrets.verify_secret(PASSWORD, stored) and PASSWORD not in stored  # CRLF not part of it

    assert fails(mtad, 2, "smtp-user", "add", "echo", "u2", stdin=b"short\n") == (
        "mtactl: password too short: at least 12 characters\n")
    assert "no password given" in fails(mtad, 2, "smtp-user", "add", "echo", "u2", stdin=b"")
    assert "no password given" in fails(mtad, 2, "smtp-user", "add", "echo", "u2", stdin=b"\n")
    assert "exists" in fails(mtad, 1, "smtp-user", "add", "echo", "SENDER@echo.test", stdin=PASSWORD.encode())

    users = listed(mtad, "smtp-user", "list", "echo")
    assert set(users) == {"sender@echo.test"} and users["sender@echo.test"]["tenant"] == "echo"
    assert PASSWORD not in ok(mtad, "smtp-user", "list") and "sender@echo.test  echo  created" in ok(mtad, "smtp-user", "list")
    assert ok(mtad, "smtp-user", "disable", "sender@echo.test") == "disabled SMTP user sender@echo.test\n"
    assert listed(mtad, "smtp-user", "list", "echo")["sender@echo.test"]["disabled"] is True
    assert ok(mtad, "smtp-user", "delete", "sender@echo.test") == "deleted SMTP user sender@echo.test\n"
    assert ok(mtad, "smtp-user", "list", "echo") == ""


def test_a_restart_keeps_everything_and_a_stopped_daemon_exits_1(mtad: MtadProcess) -> None:
    ok(mtad, "tenant", "add", "foxtrot", "--domain", "foxtrot.test", "--daily", "5")
    ok(mtad, "smtp-user", "add", "foxtrot", "fox", stdin=PASSWORD.encode())
    key_id = secrets.parse_api_key(ok(mtad, "apikey", "create", "foxtrot").strip())
    before = (listed(mtad, "tenant", "list"), listed(mtad, "smtp-user", "list"), listed(mtad, "apikey", "list", "foxtrot"))
    assert mtad.stop() == 0
    assert "cannot reach mtad" in fails(mtad, 1, "tenant", "list")
    mtad.start()
    after = (listed(mtad, "tenant", "list"), listed(mtad, "smtp-user", "list"), listed(mtad, "apikey", "list", "foxtrot"))
    assert after == before and key_id in after[2]
