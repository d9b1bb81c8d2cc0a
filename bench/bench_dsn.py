"""Benchmark: DSN parsing throughput on one core (bounces/s) for typical ~5 KB reports.

    python3 bench/bench_dsn.py [--seconds 5]

Uses the corpus messages between 3 and 8 KB (real bounces of many MTAs) when the shared
corpus is present, else a synthetic 5 KB Postfix-style report. Target: >= 2,000/s.
Reports CPU time (time.process_time) beside wall time: the machines are shared and
noisy, and CPU seconds per bounce is the figure that compares across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtad.dsn import parse

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "bounces" / "mail"
TARGET = 2000.0


def synthetic() -> bytes:
    head = (
        b"From: MAILER-DAEMON@mx.sender.example (Mail Delivery System)\nTo: alice@sender.example\n"
        b"Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n--B\n'
        b"Content-Type: text/plain\n\nThis is the mail system at host mx.sender.example.\n\n"
        b"<bob@rcpt.example>: host mx.rcpt.example[192.0.2.25] said: 550 5.1.1 <bob@rcpt.example>:\n"
        b"    Recipient address rejected: User unknown (in reply to RCPT TO command)\n\n--B\n"
        b"Content-Type: message/delivery-status\n\nReporting-MTA: dns; mx.sender.example\n\n"
        b"Final-Recipient: rfc822; bob@rcpt.example\nAction: failed\nStatus: 5.1.1\n"
        b"Remote-MTA: dns; mx.rcpt.example\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\n\n--B\n"
        b"Content-Type: message/rfc822\n\nFrom: alice@sender.example\nTo: bob@rcpt.example\n"
        b"Message-ID: <orig@sender.example>\nSubject: news\n\n"
    )
    body = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * ((5000 - len(head)) // 58)
    return head + body + b"\n--B--\n"


def samples() -> list[bytes]:
    found = [p.read_bytes() for p in sorted(CORPUS.rglob("*.eml"))] if CORPUS.exists() else []
    typical = [d for d in found if 3000 <= len(d) <= 8000]
    return typical or [synthetic()]


def run(messages: list[bytes], seconds: float) -> tuple[float, float]:
    """(bounces per wall second, bounces per CPU second) over about `seconds`."""
    done = 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for data in messages:
            parse(data)
        done += len(messages)
    return done / (time.perf_counter() - start), done / max(time.process_time() - cpu_start, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    messages = samples()
    run(messages[:5], 0.2)  # warm up regex caches
    runs = [run(messages, args.seconds / 3) for _ in range(3)]
    size = statistics.mean(len(m) for m in messages)
    rate = statistics.median(r for r, _ in runs)
    cpu_rate = statistics.median(c for _, c in runs)
    print(f"messages: {len(messages)} distinct, mean size {size / 1024:.1f} KB")
    print(f"throughput: {rate:,.0f} bounces/s wall (runs: {', '.join(f'{r:,.0f}' for r, _ in runs)})")
    print(f"cpu: {cpu_rate:,.0f} bounces per CPU second, {1e6 / cpu_rate:,.0f} us per bounce")
    print(f"target {TARGET:,.0f}/s on one core: {'met' if cpu_rate >= TARGET else 'NOT met'}")
    synth_wall, synth_cpu = run([synthetic()], 1.0)
    print(f"synthetic 5 KB Postfix report: {synth_wall:,.0f} bounces/s wall, {synth_cpu:,.0f} per CPU second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
