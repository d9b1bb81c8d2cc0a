"""Real SMTP clients from Debian against a running mtad: swaks and Postfix's smtp-source."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import MtadProcess, wait_for, write_config

SWAKS = shutil.which("swaks")
SMTP_SOURCE = shutil.which("smtp-source") or ("/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None)


@pytest.fixture
def daemon(tmp_path: Path):
    proc = MtadProcess(write_config(tmp_path)).start()
    yield proc
    proc.kill()


@pytest.mark.peer
@pytest.mark.skipif(SWAKS is None, reason="swaks not installed (apt-get install swaks)")
def test_swaks_message_is_queued_with_its_headers(daemon: MtadProcess) -> None:
    host, port = daemon.mx
    result = subprocess.run(
        [SWAKS or "swaks", "--server", host, "--port", str(port), "--from", "alice@origin.test",
         "--to", "bob@example.test", "--header", "Subject: swaks test", "--body", "hello from swaks",
         "--ehlo", "client.origin.test"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0" in result.stdout
    [entry] = daemon.queue_json()
    assert entry["sender"] == "alice@origin.test"
    assert [r["address"] for r in entry["recipients"]] == ["bob@example.test"]
    assert entry["recipients"][0]["state"] == "queued"
    shown = daemon.mtactl("queue", "show", entry["id"]).stdout.decode()
    assert "swaks test" in shown
    assert "bob@example.test" in shown


@pytest.mark.peer
@pytest.mark.skipif(SWAKS is None, reason="swaks not installed (apt-get install swaks)")
def test_swaks_relay_attempt_is_refused(daemon: MtadProcess) -> None:
    host, port = daemon.mx
    result = subprocess.run(
        [SWAKS or "swaks", "--server", host, "--port", str(port), "--from", "alice@origin.test",
         "--to", "victim@elsewhere.test"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "550 5.7.1" in result.stdout
    assert daemon.queue_json() == []


@pytest.mark.peer
@pytest.mark.skipif(SMTP_SOURCE is None, reason="postfix's smtp-source not installed (apt-get install postfix)")
def test_smtp_source_concurrent_sessions_all_queued(daemon: MtadProcess) -> None:
    host, port = daemon.mx
    result = subprocess.run(
        [SMTP_SOURCE or "smtp-source", "-s", "20", "-m", "400", "-l", "1024", "-f", "load@origin.test",
         "-t", "sink@example.test", f"{host}:{port}"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    queued = wait_for(lambda: (q := daemon.queue_json()) and len(q) >= 400 and q, timeout=30)
    assert len(queued) == 400
    assert all(m["sender"] == "load@origin.test" for m in queued)
    stats = json.loads(daemon.mtactl("stats", "--json").stdout)
    assert stats["received"] == 400
    assert stats["queued_now"] == 400
