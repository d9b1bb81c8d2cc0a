"""Sinks for the relay benchmark: where mtad and Postfix deliver, and how we see mail arrive.

`CountingSink` runs Postfix's `smtp-sink -c` (a fast C sink that stores nothing) and reads its
running counters ("sess=N quit=N mesg=N", one update per CR) in a thread, stamping each change
with time.time(), so the benchmark knows when the first message of a run arrived and when the
Nth did without polling the sink. `sess` counts sessions that ended: after the sender closed
its connections it is the number of connections opened.

`ScriptedSink` is the test suite's scripted peer (tests/peer.py) in a thread of this process:
RCPT to a `tempfail-...` local part gets 450, everything else 250; it counts transactions that
reached the final dot. It is a Python server, slower than smtp-sink; the tempfail run measures
the same load with 0% tempfails against it for comparison.

Trust: the sinks' output is ours to parse; anything that is not a counter line is ignored.
RFCs: none implemented here.
"""

from __future__ import annotations

import bisect
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

SMTP_SINK = "/usr/sbin/smtp-sink"
_COUNTERS = re.compile(rb"sess=(\d+)\s+quit=(\d+)\s+mesg=(\d+)")


def parse_counters(piece: bytes) -> tuple[int, int, int] | None:
    """(sessions ended, QUITs, messages) from one `smtp-sink -c` update, None if not one (pure)."""
    match = _COUNTERS.search(piece)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


class CountingSink:
    """`smtp-sink -c` on 127.0.0.1:PORT, every change of its message count kept with its time."""

    def __init__(self, port: int, user: str = "postfix", backlog: int = 256, max_sessions: int = 256) -> None:
        """max_sessions: smtp-sink -m, sessions it serves at once (its default, 256); more
        connections wait in the listen queue (BACKLOG) unanswered."""
        self.port = port
        self.argv = [SMTP_SINK, "-c", "-m", str(max_sessions), "-u", user, f"127.0.0.1:{port}", str(backlog)]
        self.sessions = self.messages = 0
        self._times: list[float] = []
        self._counts: list[int] = []
        """The message count after each update, and the time.time() that update was read."""
        self._changed = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, name=f"sink {self.port}", daemon=True)
        self._reader.start()
        from mtad_process import accepts

        deadline = time.monotonic() + timeout
        while not accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not start on 127.0.0.1:{self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def time_of(self, count: int) -> float | None:
        """When the sink's message count first reached COUNT (time.time()), None if not yet."""
        with self._changed:
            at = bisect.bisect_left(self._counts, count)
            return self._times[at] if at < len(self._counts) else None

    def wait_messages(self, count: int, timeout: float) -> float | None:
        """Block until the sink has counted COUNT messages in all (or TIMEOUT seconds have
        passed); return the time it reached COUNT, None if it did not."""
        with self._changed:
            self._changed.wait_for(lambda: self.messages >= count, timeout)
        return self.time_of(count)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.time()
            *pieces, pending = (pending + chunk).replace(b"\n", b"\r").split(b"\r")
            last = next((c for piece in reversed(pieces) if (c := parse_counters(piece))), None)
            if last is None:
                continue
            with self._changed:
                self.sessions = last[0]
                if last[2] > self.messages:
                    self.messages = last[2]
                    self._times.append(now)
                    self._counts.append(last[2])
                self._changed.notify_all()


class ScriptedSink:
    """tests/peer.py's scripted server (tempfail-... gets RCPT 450), counting delivered mail."""

    def __init__(self, port: int = 0) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from peer import Peer  # the test suite's peer; a benchmark-only import

        self.peer = Peer(port=port)

    @property
    def port(self) -> int:
        return self.peer.port

    @property
    def messages(self) -> int:
        return len(self.peer.transactions)

    @property
    def sessions(self) -> int:
        return len(self.peer.connections)

    def start(self) -> None:
        self.peer.start()

    def stop(self) -> None:
        self.peer.stop()

    def wait_messages(self, count: int, timeout: float) -> float | None:
        try:
            self.peer.wait_transactions(count, timeout)
        except AssertionError:
            return None
        return time.time()
