"""Crash safety: SIGKILL mtad while many clients send; every acknowledged message survives.

A real mtad process takes mail from concurrent smtplib clients; at a random moment it is killed
with SIGKILL, several times over. After each restart every message that got a 250 is in
`mtactl queue list --json` with its body byte-identical (our Received header prepended), and no
message appears twice.
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from pathlib import Path

import pytest
from harness import MtadProcess, admin_get_body, write_config

CLIENTS = 12
CYCLES = 4
TOKEN = re.compile(rb"X-Crash-Token: (\S+)")


def body_for(token: str) -> bytes:
    # Message-ID and Date present, so mtad only prepends its Received header.
    filler = b"".join(b"line %d of %s\r\n" % (i, token.encode()) for i in range(random.randint(1, 60)))
    return (b"From: a@origin.test\r\nTo: b@example.test\r\nSubject: crash\r\n"
            b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
            b"Message-ID: <" + token.encode() + b"@origin.test>\r\n"
            b"X-Crash-Token: " + token.encode() + b"\r\n\r\n" + filler + b".leading dot line\r\n")


def sender(addr: tuple[str, int], prefix: str, acked: dict[str, bytes], stop: threading.Event, deadline: float) -> None:
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with smtplib.SMTP(*addr, timeout=10) as client:
                while not stop.is_set() and time.monotonic() < deadline:
                    token = f"{prefix}-{n}"
                    n += 1
                    body = body_for(token)
                    client.sendmail("a@origin.test", ["b@example.test"], body)
                    acked[token] = body  # only after the 250
        except (OSError, smtplib.SMTPException):
            return  # the daemon died under us


@pytest.mark.slow
def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random()
    proc = MtadProcess(write_config(tmp_path))
    acked: dict[str, bytes] = {}
    try:
        for cycle in range(CYCLES):
            proc.start()
            stop = threading.Event()
            deadline = time.monotonic() + 30
            threads = [threading.Thread(target=sender, args=(proc.mx, f"c{cycle}t{i}", acked, stop, deadline))
                       for i in range(CLIENTS)]
            before = len(acked)
            for t in threads:
                t.start()
            # Kill at a random moment once mail is flowing.
            target = before + rng.randint(20, 200)
            while len(acked) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.kill()
            stop.set()
            for t in threads:
                t.join(20)
            assert len(acked) > before, "no message was acknowledged in this cycle"

            proc.start()
            queued = proc.queue_json()
            tokens: dict[str, str] = {}
            for entry in queued:
                stored = admin_get_body(proc, entry["id"])
                match = TOKEN.search(stored)
                assert match, stored[:300]
                token = match.group(1).decode()
                assert token not in tokens, f"{token} queued twice"
                tokens[token] = entry["id"]
                if token in acked:
                    sent = acked[token]
                    assert stored.endswith(sent), f"{token}: body differs"
                    assert stored[: -len(sent)].startswith(b"Received: ")
                    assert entry["size"] == len(stored)
            missing = sorted(set(acked) - set(tokens))
            assert not missing, f"cycle {cycle}: {len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
            proc.stop()
    finally:
        proc.kill()
