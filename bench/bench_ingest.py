#!/usr/bin/env python3
"""Ingest benchmark: mtad against a private Postfix, side by side, driven by smtp-source.

For each message size (1 KB, 50 KB) and each number of concurrent sessions (1, 20, 100) it sends
the same bounded job to mtad and to Postfix in the same run (alternating which goes first), and
prints msgs/s for both, the ratio, mtad's CPU per message, and every core's busy time per
message (generator included). Median of --runs runs. Then: mtad's peak RSS during those runs,
and on a spool holding --queued messages (100,000): RSS, start-up time (exec until the
listener accepts) and the wall time of `mtactl queue list --json`. Results also go, as JSON,
to bench/results/. This is a benchmark, not a test: it asserts nothing.

Both sides are durable (fsync before 250) and do the same job: accept and queue. Postfix puts
every message on hold (or, with --postfix-mode relay, relays it to an smtp-sink).

    scripts/bench            # or: python3 bench/bench_ingest.py [--quick] [--runs N] ...

Needs root (for Postfix) and Debian's postfix package; see bench/README.md.
Trust: none; every peer is a local process this script started.
RFCs: none implemented here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mtad_process import MtadError, MtadProcess, free_port, machine_busy_seconds
from postfix_peer import PostfixError, PostfixPeer, begin_run
from report import Cell, Sample, environment_lines, format_table, summary_lines
from smtp_source import Job, run_smtp_source
from spool_fill import direct_available, fill_direct, fill_via_smtp

DOMAIN = "example.test"
RECIPIENT = f"rcpt@{DOMAIN}"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mtad vs Postfix ingest benchmark (smtp-source)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell; the median is shown")
    p.add_argument("--quick", action="store_true",
                   help="1 run, 1/3 of the messages, 20,000 queued: a smoke run of ~2 minutes")
    p.add_argument("--sessions", default="1,20,100", help="concurrent sessions, comma-separated")
    p.add_argument("--sizes", default="1024,51200", help="message sizes in bytes")
    p.add_argument("--messages", default="3000,1000",
                   help="messages per run for each size (same order as --sizes)")
    p.add_argument("--cap", type=float, default=60.0, help="wall-clock cap per run, seconds")
    p.add_argument("--reuse", action="store_true",
                   help="smtp-source -d: many messages per connection (default: one each)")
    p.add_argument("--postfix-mode", choices=["hold", "relay"], default="hold")
    p.add_argument("--no-postfix", action="store_true", help="measure mtad alone")
    p.add_argument("--queued", type=int, default=None,
                   help="messages in the spool for the RSS/start-up figures (0 skips them)")
    p.add_argument("--fill", choices=["smtp", "direct"], default="smtp",
                   help="how to fill that spool: SMTP into mtad (default) or the mtad.spool "
                   "API with mtad stopped (faster)")
    p.add_argument("--mtad", default="mtad", help="command that runs the daemon")
    p.add_argument("--mtactl", default="mtactl", help="command that runs the CLI")
    p.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: "
                   "a temp dir, removed at the end)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    args = p.parse_args(argv)
    args.sessions = [int(x) for x in args.sessions.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.messages = [int(x) for x in args.messages.split(",")]
    if len(args.messages) != len(args.sizes):
        p.error("--messages needs one count per size")
    if args.quick:
        args.runs = 1
        args.messages = [max(100, m // 3) for m in args.messages]
    if args.queued is None:
        args.queued = 20_000 if args.quick else 100_000
    return args


def jobs(args: argparse.Namespace) -> list[Job]:
    return [Job(sessions=s, messages=m, size=size, reuse=args.reuse)
            for size, m in zip(args.sizes, args.messages) for s in args.sessions]


def measure_mtad(mtad: MtadProcess, job: Job, cap: float) -> Sample:
    if not mtad.delete_all():
        note_once("mtactl queue delete --all failed: mtad's spool keeps growing between runs")
    cpu0, busy0 = mtad.cpu_seconds(), machine_busy_seconds()
    load = run_smtp_source(job, mtad.port, RECIPIENT, cap)
    cpu1, busy1 = mtad.cpu_seconds(), machine_busy_seconds()
    if not mtad.alive():
        raise MtadError("mtad died during the run:\n" + mtad.tail())
    return Sample(target="mtad", load=load, cpu_seconds=cpu1 - cpu0, busy_seconds=busy1 - busy0)


def measure_postfix(peer: PostfixPeer, job: Job, cap: float) -> Sample:
    peer.clear()
    busy0 = machine_busy_seconds()
    load = run_smtp_source(job, peer.port, RECIPIENT, cap)
    busy1 = machine_busy_seconds()
    if peer.mode == "hold" and peer.queued() < load.messages:
        note_once(f"Postfix queued {peer.queued()} of {load.messages} messages smtp-source sent")
    return Sample(target="postfix", load=load, cpu_seconds=None, busy_seconds=busy1 - busy0)


_notes: list[str] = []


def note_once(text: str) -> None:
    if text not in _notes:
        _notes.append(text)
        print(f"  note: {text}", flush=True)


def ingest_cells(args: argparse.Namespace, mtad: MtadProcess, peer: PostfixPeer | None
                 ) -> list[Cell]:
    warm = Job(sessions=20, messages=300, size=1024, reuse=args.reuse)
    run_smtp_source(warm, mtad.port, RECIPIENT, args.cap)  # warm caches, spawn smtpd processes
    if peer is not None:
        run_smtp_source(warm, peer.port, RECIPIENT, args.cap)
    cells: list[Cell] = []
    for job in jobs(args):
        cell = Cell(job=job)
        for run in range(args.runs):
            order = ["mtad", "postfix"] if run % 2 == 0 else ["postfix", "mtad"]
            for target in order:
                if target == "mtad":
                    cell.samples.append(measure_mtad(mtad, job, args.cap))
                elif peer is not None:
                    cell.samples.append(measure_postfix(peer, job, args.cap))
        print(format_table([cell], header=not cells), flush=True)
        cells.append(cell)
    return cells


def queued_figures(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """RSS, start-up and `queue list --json` with args.queued messages in the spool."""
    n = args.queued
    mtad = MtadProcess(base, shlex.split(args.mtad), shlex.split(args.mtactl), DOMAIN)
    out: dict[str, Any] = {"messages": n}
    method = args.fill
    if method == "direct" and not direct_available():
        raise MtadError("--fill direct needs mtad.spool.Spool, which this checkout lacks")
    out["fill"] = method
    print(f"\nfilling a spool with {n:,} messages ({method}) ...", flush=True)
    try:
        if method == "direct":
            out["fill_seconds"] = fill_direct(base / "spool", n, RECIPIENT)
            out["startup_empty_s"] = None
        else:
            out["startup_empty_s"] = mtad.start()
            load = fill_via_smtp(mtad.port, n, RECIPIENT, cap=max(600.0, n / 100))
            out["fill_seconds"] = load.seconds
            out["fill_rate"] = load.rate
            out["fill_errors"] = len(load.errors)
            out["rss_after_fill_kb"] = mtad.rss_kb()
            out["rss_after_fill_split_kb"] = mtad.rss_split_kb()
            stop_started = time.monotonic()
            out["stop_exit"] = mtad.stop()
            out["stop_seconds"] = time.monotonic() - stop_started
        out["startup_s"] = mtad.start(timeout=120)
        out["rss_after_start_kb"] = mtad.rss_kb()
        out["rss_after_start_split_kb"] = mtad.rss_split_kb()
        try:
            seconds, lines = mtad.queue_list_json(timeout=600)
            out["queue_list_json_s"], out["queue_list_lines"] = seconds, lines
        except (MtadError, subprocess.TimeoutExpired, OSError) as exc:
            out["queue_list_error"] = str(exc)
        out["rss_after_list_kb"] = mtad.rss_kb()
        out["rss_after_list_split_kb"] = mtad.rss_split_kb()
        out["peak_rss_kb"] = mtad.peak_rss_kb()
    finally:
        out["final_stop_exit"] = mtad.stop()
    return out


def environment(args: argparse.Namespace, peer: PostfixPeer | None) -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        rev = ""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "mtad_git": rev,
        "postfix": peer.describe() if peer else None,
        "connections": "reused (-d)" if args.reuse else "one per message",
        "runs": args.runs, "cap_s": args.cap,
    }


def write_json(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    base = begin_run("bench", ("smtp-source", *shlex.split(args.mtad)[:1]), args.workdir, "mtad-bench-")
    if base is None:
        return 1
    peer = None if args.no_postfix else PostfixPeer(free_port(), mode=args.postfix_mode,
                                                     sink_port=free_port(), base=base / "postfix")
    mtad = MtadProcess(base / "ingest", shlex.split(args.mtad), shlex.split(args.mtactl), DOMAIN)
    result: dict[str, Any] = {}
    cells: list[Cell] = []
    started = time.monotonic()
    try:
        if peer is not None:
            peer.start()
        result["environment"] = environment(args, peer)
        for line in environment_lines(result["environment"]):
            print(line)
        startup_empty = mtad.start()
        result["mtad_startup_empty_s"] = startup_empty
        cells = ingest_cells(args, mtad, peer)
        result["cells"] = [cell.as_dict() for cell in cells]
        result["mtad_peak_rss_kb"] = mtad.peak_rss_kb()
        result["mtad_rss_end_split_kb"] = mtad.rss_split_kb()
        result["mtad_stop_exit"] = mtad.stop()
        if args.queued > 0:
            result["queued"] = queued_figures(args, base / "queued")
    except (PostfixError, MtadError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping mtad and Postfix", file=sys.stderr)
        return 130
    finally:
        mtad.stop()
        if peer is not None:
            peer.stop()
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    result["notes"] = _notes
    result["total_seconds"] = time.monotonic() - started
    print("\n" + format_table(cells))
    for line in summary_lines(result):
        print(line)
    print(f"results: {write_json(args, result)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
