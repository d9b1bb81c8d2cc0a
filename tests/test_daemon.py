"""The daemon as a process: start, readiness, health, SIGHUP reload, graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import MtadProcess, wait_for, write_config


@pytest.fixture
def daemon(tmp_path: Path):
    proc = MtadProcess(write_config(tmp_path)).start()
    yield proc
    proc.kill()


def send(addr: tuple[str, int], rcpt: str, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> None:
    with smtplib.SMTP(*addr, timeout=10) as client:
        client.sendmail("sender@origin.test", [rcpt], body)


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port something (this test) is listening on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def config_with(directory: Path, old: str, new: str) -> Path:
    """The harness config with one fragment replaced (which must be there)."""
    cfg = write_config(directory)
    text = cfg.read_text()
    assert old in text, old
    cfg.write_text(text.replace(old, new, 1))
    return cfg


def test_check_accepts_shipped_config() -> None:
    shipped = Path(__file__).resolve().parent.parent / "conf" / "mtad.toml"
    result = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(shipped), "--check"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_every_bad_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nhostnme = "x"\n[limits]\nmax_recipients = 0\n')
    result = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(bad), "--check"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("server.hostnme:") for line in lines), lines
    assert any(line.startswith("limits.max_recipients:") for line in lines), lines


def test_check_opens_no_socket(tmp_path: Path) -> None:
    # The configured port is taken by us; --check must still succeed because it binds nothing.
    with taken_port() as port:
        cfg = config_with(tmp_path, 'role = "mx"\naddress = "127.0.0.1:0"', f'role = "mx"\naddress = "127.0.0.1:{port}"')
        result = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(cfg), "--check"],
                                capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "spool").exists()


def test_ready_notification_reaches_systemd_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sock_path))
        notify.settimeout(20)
        proc = MtadProcess(write_config(tmp_path), env={"NOTIFY_SOCKET": str(sock_path)}).start()
        try:
            assert b"READY=1" in notify.recv(4096)
            proc.signal(signal.SIGTERM)
            assert b"STOPPING=1" in notify.recv(4096)
            assert proc.proc is not None and proc.proc.wait(20) == 0
        finally:
            proc.kill()


def test_healthz_is_ok_while_running(daemon: MtadProcess) -> None:
    with urllib.request.urlopen(f"http://{daemon.http}/healthz", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read())["status"] == "ok"


def test_sigterm_finishes_open_session_then_exits_zero(daemon: MtadProcess) -> None:
    client = smtplib.SMTP(*daemon.mx, timeout=10)
    client.ehlo("client.test")
    client.mail("sender@origin.test")
    client.rcpt("user@example.test")
    daemon.signal(signal.SIGTERM)
    # The listener closes, but the session already open may finish its transaction.
    wait_for(lambda: any(r.get("event") == "daemon.stopping" for r in daemon.records()))
    code, _ = client.data(b"Subject: during shutdown\r\n\r\nbody\r\n")
    assert code == 250
    client.quit()
    assert daemon.proc is not None and daemon.proc.wait(20) == 0
    with pytest.raises(OSError):
        socket.create_connection(daemon.mx, timeout=2).close()
    restarted = MtadProcess(daemon.config).start()
    try:
        assert [m["recipients"][0]["address"] for m in restarted.queue_json()] == ["user@example.test"]
    finally:
        restarted.kill()


def test_sighup_reloads_inbound_domains(daemon: MtadProcess) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(daemon.mx, "user@later.test")
    assert refused.value.recipients["user@later.test"][0] == 550
    text = daemon.config.read_text().replace('domains = ["example.test"]', 'domains = ["example.test", "later.test"]')
    daemon.config.write_text(text)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: any(r.get("event") == "config.reloaded" for r in daemon.records()))
    send(daemon.mx, "user@later.test")
    assert any(m["recipients"][0]["address"] == "user@later.test" for m in daemon.queue_json())


def test_sighup_with_broken_config_keeps_running(daemon: MtadProcess) -> None:
    good = daemon.config.read_text()
    daemon.config.write_text(good + "\n[limits]\nmax_recipients = -5\n")
    daemon.signal(signal.SIGHUP)
    failed = wait_for(lambda: [r for r in daemon.records() if r.get("event") == "config.reload_failed"])
    assert "limits" in json.dumps(failed[0]["problems"])
    send(daemon.mx, "user@example.test")
    daemon.config.write_text(good)  # mtactl reads the same file
    assert len(daemon.queue_json()) == 1


def test_received_event_on_mail_log(daemon: MtadProcess) -> None:
    send(daemon.mx, "user@example.test")
    events = wait_for(lambda: [e for e in daemon.mail_log() if e["type"] == "received"])
    event = events[0]
    assert event["sender"] == "sender@origin.test"
    assert event["recipients"] == ["user@example.test"]
    assert event["client_address"] == "127.0.0.1"
    assert event["queue_id"] == daemon.queue_json()[0]["id"]
    assert event["reply"].startswith("250")


def test_operator_actions_are_events_on_the_mail_log(daemon: MtadProcess) -> None:
    send(daemon.mx, "user@example.test")
    [entry] = daemon.queue_json()
    daemon.mtactl("queue", "hold", entry["id"])
    assert [r["state"] for r in daemon.queue_json()[0]["recipients"]] == ["held"]
    daemon.mtactl("queue", "release", entry["id"])
    daemon.mtactl("queue", "delete", entry["id"])
    assert daemon.queue_json() == []
    kinds = wait_for(lambda: [e["type"] for e in daemon.mail_log() if e.get("queue_id") == entry["id"]][-3:] == ["held", "released", "dropped"])
    assert kinds


def test_ipv6_listener_takes_mail(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('address = "127.0.0.1:0"', 'address = "[::1]:0"', 1))
    proc = MtadProcess(cfg).start()
    try:
        assert proc.mx[0] == "::1"
        send(proc.mx, "user@example.test")
        [entry] = proc.queue_json()
        stored = proc.mtactl("queue", "cat", entry["id"]).stdout
        assert b"(unknown [IPv6:::1])" in stored.split(b"\r\n\r\n", 1)[0]
    finally:
        proc.kill()


def test_null_sender_is_written_on_the_mail_log(daemon: MtadProcess) -> None:
    # A bounce (MAIL FROM:<>) must be greppable as such: "sender":"" rather than no sender at all.
    with smtplib.SMTP(*daemon.mx, timeout=10) as client:
        client.sendmail("", ["user@example.test"], b"Subject: bounce\r\n\r\nbody\r\n")
    [event] = wait_for(lambda: [e for e in daemon.mail_log() if e["type"] == "received"])
    assert event["sender"] == ""
    [entry] = daemon.queue_json()
    daemon.mtactl("queue", "hold", entry["id"])
    held = wait_for(lambda: [e for e in daemon.mail_log() if e["type"] == "held"])
    assert "sender" not in held[0]  # an operator action has no sender to report


def test_http_address_in_use_is_a_clean_start_failure(tmp_path: Path) -> None:
    with taken_port() as port:
        cfg = config_with(tmp_path, '[http]\naddress = "127.0.0.1:0"', f'[http]\naddress = "127.0.0.1:{port}"')
        result = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(cfg)],
                                capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    failed = [json.loads(line) for line in result.stdout.splitlines() if '"daemon.start_failed"' in line]
    assert failed and f"127.0.0.1:{port}" in failed[0]["error"], result.stdout
    assert any('"daemon.stopped"' in line for line in result.stdout.splitlines())


def test_sighup_keeps_reporting_a_change_that_needs_a_restart(daemon: MtadProcess) -> None:
    def reloads() -> list[dict]:
        return [r for r in daemon.records() if r.get("event") in ("config.reloaded", "config.reload_needs_restart")]

    original = daemon.config.read_text()
    daemon.config.write_text(original.replace('hostname = "mx.test.local"', 'hostname = "other.test.local"'))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: len([r for r in reloads() if r["event"] == "config.reloaded"]) == 1)
    daemon.signal(signal.SIGHUP)  # nothing changed since, but the new hostname is still not in use
    wait_for(lambda: len([r for r in reloads() if r["event"] == "config.reloaded"]) == 2)
    daemon.config.write_text(original)  # back to what runs: nothing pending any more
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: len([r for r in reloads() if r["event"] == "config.reloaded"]) == 3)
    kinds = [(r["event"], tuple(r.get("keys", ()))) for r in reloads()]
    assert kinds == [
        ("config.reload_needs_restart", ("server.hostname",)), ("config.reloaded", ()),
        ("config.reload_needs_restart", ("server.hostname",)), ("config.reloaded", ()),
        ("config.reloaded", ()),
    ]
    with smtplib.SMTP(*daemon.mx, timeout=10) as client:
        assert client.ehlo("client.test")[1].split(b"\n")[0] == b"mx.test.local"


def test_sighup_reports_routing_changes_as_needing_a_restart(daemon: MtadProcess) -> None:
    original = daemon.config.read_text()
    daemon.config.write_text(original + '\n[[route]]\ndomain = "*"\nnexthop = "127.0.0.1:2626"\n')
    daemon.signal(signal.SIGHUP)
    pending = wait_for(lambda: [r for r in daemon.records() if r.get("event") == "config.reload_needs_restart"])
    assert pending[0]["keys"] == ["route"]


def test_session_diagnostics_name_the_client_address(daemon: MtadProcess) -> None:
    # The diagnostic log uses the mail log's words: client_address and listener.
    with socket.create_connection(daemon.mx, timeout=10) as raw:
        raw.recv(1024)
        replies = b""
        for _ in range(40):
            raw.sendall(b"BOGUS\r\n")
            replies += raw.recv(1024)
            if b"421" in replies:
                break
    assert b"421 4.7.0" in replies
    [record] = wait_for(lambda: [r for r in daemon.records() if r.get("event") == "session.too_many_errors"])
    assert record["client_address"] == "127.0.0.1" and record["listener"] == "mx"
