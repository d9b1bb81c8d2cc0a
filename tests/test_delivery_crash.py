"""Crash safety on the delivery side: SIGKILL mtad again and again while it relays 5,000 messages.

A real mtad relays everything (route "*") to the scripted peer, which records every
transaction that reached the final dot. The 5,000 messages go in first with Postfix's
smtp-source (10 sessions with connection reuse, `-N`: every message has its own recipient,
`1rcpt@example.test` .. `5000rcpt@example.test`, which is the token the sink records) while
delivery is paused (`[delivery] paused = true`); a SIGHUP with `paused = false` starts
delivery. Then mtad is killed with SIGKILL each time the sink has taken a few hundred more
messages (a random number: the kill lands mid-stream, with transactions in flight) and
restarted at once, a bounded number of times, until the queue is empty.

What must hold: every message reached the sink at least once (none lost), the queue ends
empty, nothing else was sent (no DSN: nothing failed), and the duplicates, the messages
whose 250 from the sink raced the kill (the sink took the message, mtad died before its spool
said so), are few: at most kills x the destination's concurrency window. Their count is
printed (`-s`) and recorded as a junit property.
"""

from __future__ import annotations

import collections
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import MtadProcess, fast_delivery, wait_for, write_config
from peer import Peer

pytestmark = pytest.mark.slow

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
MESSAGES = 5000
MAX_KILLS = 12
WINDOW = 20
"""delivery.destination_concurrency: the most transactions in flight when a kill lands."""


def stats(proc: MtadProcess) -> dict[str, int]:
    return dict(json.loads(proc.mtactl("stats", "--json").stdout.decode()))


def ready_queued(proc: MtadProcess) -> int:
    """Messages queued at start, as the daemon.ready line says (what recovery found)."""
    return int(next(r["queued"] for r in proc.records() if r.get("event") == "daemon.ready"))


@pytest.mark.skipif(not shutil.which("smtp-source") and not Path(SMTP_SOURCE).exists(), reason="no smtp-source")
def test_sigkill_while_delivering_loses_nothing(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    rng = random.Random()
    with Peer(scripted=False) as sink:
        extra = (f'\n[[route]]\ndomain = "*"\nnexthop = "127.0.0.1:{sink.port}"\n'
                 + fast_delivery(paused=True, initial_concurrency=5, destination_concurrency=WINDOW,
                                 suspend_after=None, suspend_time="1s", connection_idle_timeout=None))
        config = write_config(tmp_path, extra=extra)
        proc = MtadProcess(config).start()
        try:
            host, port = proc.mx
            started = time.monotonic()
            subprocess.run([SMTP_SOURCE, "-d", "-s", "10", "-m", str(MESSAGES), "-N", "-l", "200",
                            "-f", "sender@sender.test", "-t", "rcpt@example.test", f"{host}:{port}"],
                           check=True, capture_output=True, timeout=60)
            injected = time.monotonic() - started
            assert stats(proc)["queued_now"] == MESSAGES
            assert not sink.transactions, "delivery was paused"

            config.write_text(config.read_text().replace("paused = true", "paused = false"))
            proc.signal(signal.SIGHUP)
            started = time.monotonic()
            kills, left = 0, MESSAGES
            remaining: list[int] = []
            marks: list[int] = []
            """The sink's transaction count at each kill."""
            seen = Seen(sink)
            while kills < MAX_KILLS and left:
                target = len(sink.transactions) + rng.randint(150, 700)
                deadline = time.monotonic() + 20
                while len(sink.transactions) < target and time.monotonic() < deadline and seen.count() < MESSAGES:
                    time.sleep(0.002)  # polling the sink's progress, not a synchronisation sleep
                if seen.count() >= MESSAGES:
                    break
                proc.kill()
                marks.append(len(sink.transactions))
                kills += 1
                proc.start()
                left = ready_queued(proc)
                remaining.append(left)
                assert left < MESSAGES, "a restart found no progress"
            wait_for(lambda: seen.count() >= MESSAGES, timeout=60)
            wait_for(lambda: stats(proc)["queued_now"] == 0, timeout=30)
            took = time.monotonic() - started
        finally:
            proc.stop()

        tokens = _tokens(sink)
        counts = collections.Counter(tokens)
        expected = {f"{n}rcpt@example.test" for n in range(1, MESSAGES + 1)}
        missing = expected - set(counts)
        assert not missing, f"{len(missing)} messages never reached the sink, e.g. {sorted(missing)[:5]}"
        assert set(counts) == expected, "the sink got mail nobody sent"
        assert all(t.sender == "sender@sender.test" and len(t.recipients) == 1 for t in sink.transactions)
        duplicates = sum(n - 1 for n in counts.values())
        per_kill = _duplicates_per_kill(tokens, marks)
        print(f"\ncrash test: {MESSAGES} messages injected in {injected:.1f}s, delivered in {took:.1f}s "
              f"through {kills} SIGKILLs (queued at each restart: {remaining}); {duplicates} duplicates "
              f"(per kill: {per_kill}), {len(sink.connections)} connections")
        record_property("kills", kills)
        record_property("duplicates", duplicates)
        assert kills >= 3, "too few kills landed while delivering to show anything"
        assert duplicates <= kills * WINDOW
        assert sum(per_kill) == duplicates, "a message came twice without a kill between"


def _duplicates_per_kill(tokens: list[str], marks: list[int]) -> list[int]:
    """Duplicates charged to the kill that preceded them: a token's first copy came before
    kill k (its transaction index is below marks[k]) and a second one after it."""
    first: dict[str, int] = {}
    out = [0] * len(marks)
    for index, token in enumerate(tokens):
        if token not in first:
            first[token] = index
            continue
        kill = next((k for k, mark in enumerate(marks) if first[token] < mark <= index), None)
        if kill is not None:
            out[kill] += 1
    return out


class Seen:
    """The distinct tokens the sink has taken so far, counted incrementally."""

    def __init__(self, sink: Peer) -> None:
        self.sink = sink
        self.tokens: set[str] = set()
        self.read = 0

    def count(self) -> int:
        transactions = self.sink.transactions
        end = len(transactions)
        for transaction in transactions[self.read:end]:
            self.tokens.update(transaction.recipients)
        self.read = end
        return len(self.tokens)


def _tokens(sink: Peer) -> list[str]:
    return [r for t in list(sink.transactions) for r in t.recipients]
