"""A full spool answers 452 4.3.1 over SMTP, keeps what it acknowledged, and recovers space."""

from __future__ import annotations

import smtplib
from pathlib import Path

from harness import MtadProcess, write_config

EXTRA = """
[limits]
max_message_size = "1MiB"

[spool]
map_size = "4MiB"
"""


def body(n: int, size: int) -> bytes:
    line = b"y" * 70 + b"\r\n"
    return b"Subject: fill %d\r\n\r\n" % n + line * (size // len(line))


def test_full_spool_refuses_with_452_and_loses_nothing(tmp_path: Path) -> None:
    proc = MtadProcess(write_config(tmp_path, extra=EXTRA)).start()
    try:
        accepted: list[int] = []
        refusal = None
        with smtplib.SMTP(*proc.mx, timeout=30) as client:
            for n in range(64):  # 64 x 600 KB cannot fit in a 4 MiB map
                try:
                    client.sendmail("a@origin.test", ["b@example.test"], body(n, 600_000))
                except smtplib.SMTPDataError as exc:
                    refusal = (exc.smtp_code, exc.smtp_error)
                    break
                accepted.append(n)
            assert refusal is not None, "the spool never filled"
            assert refusal[0] == 452 and refusal[1].startswith(b"4.3.1"), refusal
            # The session is still usable and small mail still fits.
            client.sendmail("a@origin.test", ["b@example.test"], b"Subject: small\r\n\r\nsmall\r\n")
        subjects = {proc.mtactl("queue", "show", m["id"]).stdout.decode().split("Subject: ")[1].split("\n")[0].strip()
                    for m in proc.queue_json()}
        assert subjects == {f"fill {n}" for n in accepted} | {"small"}
        # Deleting frees space for the next big one.
        proc.mtactl("queue", "delete", "--all")
        with smtplib.SMTP(*proc.mx, timeout=30) as client:
            client.sendmail("a@origin.test", ["b@example.test"], body(99, 600_000))
        assert len(proc.queue_json()) == 1
        rejected = [e for e in proc.mail_log() if e["type"] == "rejected"]
        assert rejected and rejected[0]["reply"].startswith("452 4.3.1")
    finally:
        proc.kill()
