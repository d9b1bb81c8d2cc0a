"""Drive an SMTP server with Postfix's smtp-source and report how many messages it took, how fast.

smtp-source (Debian package `postfix`, /usr/sbin) opens SESSIONS concurrent sessions, greets
with HELO, does not pipeline, and by default opens a new connection per message (`-d` reuses
one connection per session). With `-c` it prints a running count of completed DATA commands,
which is how a run cut short by the wall-clock cap still yields a message count.

Trust: smtp-source's output is parsed leniently; anything unexpected counts as an error line.
RFCs: none implemented here (RFC 5321 is smtp-source's business).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SENDER = "bench@source.test"


@dataclass(frozen=True)
class Job:
    """One load: SESSIONS concurrent sessions sending MESSAGES messages of SIZE bytes."""

    sessions: int
    messages: int
    size: int
    reuse: bool = False
    """True: one connection per session for many messages (`-d`); False: one per message."""

    def label(self) -> str:
        size = f"{self.size // 1024} KB" if self.size >= 1024 else f"{self.size} B"
        return f"{size:>6} x{self.sessions:<3}"


@dataclass(frozen=True)
class LoadResult:
    messages: int
    """DATA commands completed (smtp-source's own count)."""
    seconds: float
    """Wall time from starting smtp-source until it exited (or was stopped at the cap)."""
    capped: bool
    """The wall-clock cap stopped smtp-source before it sent every message."""
    errors: list[str]
    """smtp-source's warning and fatal lines (a refused or failed transaction)."""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def smtp_source_argv(job: Job, port: int, recipient: str, host: str = "127.0.0.1") -> list[str]:
    """The smtp-source command line for JOB against host:port (pure)."""
    argv = [SMTP_SOURCE, "-c", "-s", str(job.sessions), "-m", str(job.messages),
            "-l", str(job.size), "-f", SENDER, "-t", recipient]
    if job.reuse:
        argv.insert(1, "-d")
    argv.append(f"{host}:{port}")
    return argv


_COUNT = re.compile(rb"(\d+)\s*$")


def parse_count(output: bytes) -> int:
    """The last running count smtp-source -c printed ("1\\r2\\r...N\\r\\n"), 0 if none (pure)."""
    for piece in reversed(output.replace(b"\n", b"\r").split(b"\r")):
        match = _COUNT.search(piece)
        if match:
            return int(match[1])
    return 0


def parse_errors(stderr: bytes) -> list[str]:
    """smtp-source's complaint lines, one per failed command or session (pure)."""
    lines = stderr.decode(errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def run_smtp_source(job: Job, port: int, recipient: str, cap: float) -> LoadResult:
    """Run smtp-source to completion or until CAP seconds have passed; count what it did."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        argv = smtp_source_argv(job, port, recipient)
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        capped = False
        try:
            proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            capped = True
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        except BaseException:  # Ctrl-C: take the generator down with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return LoadResult(messages=parse_count(out.read()), seconds=seconds, capped=capped,
                          errors=parse_errors(err.read()))
