#!/usr/bin/env python3
"""DKIM benchmark: signing throughput, and what signing costs ingest at 20 sessions.

1. Signing alone, one thread: messages/s for RSA-2048 and Ed25519 at 1 KB and 50 KB, with
   mtad's signer (own relaxed canonicalisation + `cryptography`), beside dkimpy's `dkim.sign`
   (pure-Python RSA; its Ed25519 needs PyNaCl, absent here), and how much of the signing time
   holds the GIL (the event loop's time): measured as the work a pure-Python thread gets done
   while two signing threads run, against that thread alone.
2. Ingest: mtad as a real process (bench/mtad_process.py) with one mx listener, driven by
   smtp-source (-s 20, a connection per message), with no key and then with a key for the
   sender's domain (`[dkim] sign = ["mx"]`; smtp-source writes `From: <bench@source.test>`).
   Median msgs/s of --runs runs each, and the ratio signed / unsigned (issue 4 target: >= 70%
   with RSA-2048 at 20 sessions).

    python3 bench/bench_dkim.py [--runs 3] [--messages 3000,1000] [--no-ingest]

Results go to bench/results/dkim-YYYYMMDD-HHMMSS.json. A benchmark, not a test: it asserts nothing.
Trust: none; every peer is a local process this script started.
RFCs: 6376, 8463 (what is measured, not implemented here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization

from mtad import dkim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtad_process import MtadError, MtadProcess
from smtp_source import SENDER, Job, run_smtp_source

DOMAIN = "example.test"
RECIPIENT = f"rcpt@{DOMAIN}"
SIGNING_DOMAIN = SENDER.rpartition("@")[2]
RESULTS = Path(__file__).resolve().parent / "results"


def sample_message(size: int) -> tuple[bytes, int]:
    """A message of about SIZE bytes (smtp-source-like text body) and its header length."""
    headers = (b"From: <bench@source.test>\r\nTo: <rcpt@example.test>\r\nSubject: benchmark\r\n"
               b"Date: Mon, 02 Jan 2006 15:04:05 +0000\r\nMessage-ID: <b1@source.test>\r\n")
    line = b"La de da de da 1. La de da de da 2.  La de da de da 3. La de da\r\n"
    return headers + b"\r\n" + line * max(1, (size - len(headers)) // len(line)), len(headers)


def _rate(fn: Any, seconds: float = 1.5) -> float:
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        fn()
        count += 1
    return count / elapsed


def _spin(stop: threading.Event, out: list[int]) -> None:
    count = 0
    while not stop.is_set():
        count += 1
    out.append(count)


def gil_share(work: Any, seconds: float = 1.5) -> float:
    """Fraction of a pure-Python thread's progress lost while two threads run WORK in a loop."""
    def spin_for(busy: bool) -> int:
        stop, out = threading.Event(), []  # type: ignore[var-annotated]
        spinner = threading.Thread(target=_spin, args=(stop, out))
        workers = [threading.Thread(target=lambda: [work() for _ in iter(lambda: stop.is_set(), True)])
                   for _ in range(2 if busy else 0)]
        spinner.start()
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for t in (spinner, *workers):
            t.join()
        return out[0]

    alone = spin_for(False)
    return max(0.0, 1 - spin_for(True) / alone)


def signing_figures() -> list[dict[str, Any]]:
    rows = []
    keys = {"rsa": dkim.generate_key("rsa", 2048), "ed25519": dkim.generate_key("ed25519")}
    pem = keys["rsa"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    for size in (1024, 51200):
        message, header_len = sample_message(size)
        for algorithm, private in keys.items():
            key_set = {SIGNING_DOMAIN: [dkim.SigningKey(SIGNING_DOMAIN, "b1", private)]}

            def ours(key_set: Any = key_set, message: bytes = message, header_len: int = header_len) -> None:
                dkim.sign_message(key_set, dkim.SignPolicy(), message[:header_len], message, header_len + 2, time.time())

            row: dict[str, Any] = {"size": size, "algorithm": algorithm, "mtad_msgs_per_s": round(_rate(ours)),
                                   "mtad_gil_share": round(gil_share(ours), 2)}
            if algorithm == "rsa":
                def theirs(message: bytes = message) -> None:
                    dkimpy.sign(message, b"b1", SIGNING_DOMAIN.encode(), pem, canonicalize=(b"relaxed", b"relaxed"))

                row["dkimpy_msgs_per_s"] = round(_rate(theirs))
                row["dkimpy_gil_share"] = round(gil_share(theirs), 2)
            rows.append(row)
            print(f"  sign {size // 1024:>2} KB {algorithm:<8} mtad {row['mtad_msgs_per_s']:>6}/s "
                  f"(GIL share {row['mtad_gil_share']:.2f})"
                  + (f"   dkimpy {row['dkimpy_msgs_per_s']:>5}/s (GIL share {row['dkimpy_gil_share']:.2f})"
                     if "dkimpy_msgs_per_s" in row else ""), flush=True)
    return rows


def ingest_rate(base: Path, job: Job, runs: int, signed: str | None, cap: float) -> dict[str, Any]:
    """Median msgs/s of RUNS runs of JOB against a fresh mtad (SIGNED: rsa, ed25519 or None)."""
    mtad = MtadProcess(base, ["mtad"], ["mtactl"], DOMAIN)
    if signed:
        with open(mtad.config, "a") as f:
            f.write('\n[dkim]\nsign = ["mx"]\n')
        made = mtad.mtactl("dkim", "genkey", SIGNING_DOMAIN, "--selector", "bench", "--algorithm", signed)
        if made.returncode != 0:
            raise MtadError("mtactl dkim genkey failed: " + made.stderr.decode(errors="replace"))
    rates, cpu = [], []
    try:
        mtad.start()
        run_smtp_source(Job(sessions=20, messages=200, size=job.size), mtad.port, RECIPIENT, cap)  # warm-up
        for _ in range(runs):
            mtad.delete_all()
            cpu0 = mtad.cpu_seconds()
            load = run_smtp_source(job, mtad.port, RECIPIENT, cap)
            cpu.append(1000 * (mtad.cpu_seconds() - cpu0) / max(1, load.messages))
            rates.append(load.rate)
        listing = mtad.mtactl("queue", "list", "--json").stdout.splitlines()
        first = json.loads(listing[0])["id"] if listing else ""
        stored = mtad.mtactl("queue", "cat", first).stdout if first else b""
    finally:
        mtad.stop()
    return {"msgs_per_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
            "cpu_ms_per_msg": round(statistics.median(cpu), 3),
            "signatures_in_a_stored_message": stored.count(b"DKIM-Signature:")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", default="3000,1000", help="messages per run at 1 KB and at 50 KB")
    p.add_argument("--cap", type=float, default=60.0)
    p.add_argument("--no-ingest", action="store_true", help="signing figures only")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print("signing, one thread:")
    result["signing"] = signing_figures()
    if not args.no_ingest:
        if shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists():
            print("bench: smtp-source not found (Debian package postfix)", file=sys.stderr)
            return 1
        base = Path(tempfile.mkdtemp(prefix="mtad-bench-dkim-"))
        result["ingest"] = []
        try:
            for size, count in zip((1024, 51200), (int(x) for x in args.messages.split(","))):
                job = Job(sessions=20, messages=count, size=size)
                cell: dict[str, Any] = {"size": size, "sessions": 20, "messages": count}
                for mode in (None, "rsa", "ed25519"):
                    cell[mode or "unsigned"] = ingest_rate(base / f"{size}-{mode}", job, args.runs, mode, args.cap)
                for mode in ("rsa", "ed25519"):
                    cell[f"{mode}_ratio"] = round(cell[mode]["msgs_per_s"] / cell["unsigned"]["msgs_per_s"], 3)
                print(f"  ingest {size // 1024:>2} KB x20: unsigned {cell['unsigned']['msgs_per_s']:>7}/s  "
                      f"rsa-2048 {cell['rsa']['msgs_per_s']:>7}/s ({cell['rsa_ratio']:.0%})  "
                      f"ed25519 {cell['ed25519']['msgs_per_s']:>7}/s ({cell['ed25519_ratio']:.0%})  "
                      f"cpu ms/msg {cell['unsigned']['cpu_ms_per_msg']}/{cell['rsa']['cpu_ms_per_msg']}/"
                      f"{cell['ed25519']['cpu_ms_per_msg']}", flush=True)
                result["ingest"].append(cell)
        except (MtadError, subprocess.SubprocessError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dkim-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
