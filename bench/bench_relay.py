#!/usr/bin/env python3
"""Relay benchmark: smtp-source -> mtad -> smtp-sink beside smtp-source -> Postfix -> smtp-sink.

Scenarios (issue 3, "bench/" and Targets), each printed as it finishes:
  relay     20 sessions, 1 KB, the same job into mtad (route "*" to an smtp-sink) and into a
            private Postfix (relayhost = that kind of sink), both durable (fsync before 250)
            and both reusing outbound connections; end-to-end msgs/s = messages / (time from
            starting smtp-source until the sink counted the last one). Median of --runs, the
            ratio (target >= 1.5x), mtad CPU ms/msg, every core's busy ms/msg, mtad peak RSS.
  domains   recipients spread over --domains (1,000) domains, each its own destination, MX
            looked up at a loopback DNS server (tests/dnsserver.py: wildcard MX -> 127.0.0.1)
            with [delivery] mx_port = the sink's port; msgs/s and connections opened (sink
            sessions), beside the same load to one domain through the same DNS.
  tempfail  the scripted peer (tests/peer.py) answers RCPT 450 to `tempfail-...`: every 10th
            recipient; msgs/s of the other 90% and the deferred count, beside 0% tempfail.
  deferred  --deferred (100,000) messages routed to a closed port: mtad defers them and
            suspends the destination; RSS then (target <= 300 MB); then an smtp-sink comes up
            on that port and `mtactl queue flush --domain` runs: seconds from the command to
            the first delivery (target <= 1 s), and the rate until all are delivered.

    sudo python3 bench/bench_relay.py [--quick] [--runs 3] [--scenarios relay,domains,...]

A benchmark, not a test: it asserts nothing. Needs root (Postfix), Debian's postfix package
(smtp-source, smtp-sink), and mtad/mtactl on PATH. JSON results go to bench/results/.
Trust: none; every peer is a local process this script started.
RFCs: none implemented here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mtad_process import MtadError, MtadProcess, free_port, machine_busy_seconds
from postfix_peer import PostfixError, begin_run, postfix_version
from relay_deferred import deferred_scenario
from relay_setup import DOMAIN, RelayPostfix, mail_log_counts, make_mtad, run_injector
from relay_sink import CountingSink, ScriptedSink
from smtp_source import Job, run_smtp_source

RECIPIENT = f"rcpt@{DOMAIN}"
RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parent.parent / "tests"
TARGET_RATIO = 1.5
SCENARIOS = ("relay", "domains", "tempfail", "deferred")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mtad vs Postfix relay benchmark")
    p.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown")
    p.add_argument("--quick", action="store_true", help="1 run, 1/3 of the messages, 20,000 deferred")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--messages", type=int, default=6000, help="messages per relay run")
    p.add_argument("--no-reuse", action="store_true", help="smtp-source: a new connection per message")
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--domain-messages", type=int, default=5000)
    p.add_argument("--sink-sessions", type=int, default=10000,
                   help="domains scenario: smtp-sink -m (sessions at once; 256 is its default)")
    p.add_argument("--tempfail-every", type=int, default=10, help="every Nth recipient tempfails")
    p.add_argument("--tempfail-messages", type=int, default=5000)
    p.add_argument("--deferred", type=int, default=100_000)
    p.add_argument("--no-restart", action="store_true",
                   help="deferred scenario: skip the restart (and the RSS reading after it) before the flush")
    p.add_argument("--fill", choices=["smtp", "direct"], default="smtp",
                   help="deferred scenario: fill through SMTP (default) or the spool API, mtad stopped")
    p.add_argument("--cap", type=float, default=120.0, help="wall-clock cap per run, seconds")
    p.add_argument("--no-postfix", action="store_true")
    p.add_argument("--mtad", default="mtad")
    p.add_argument("--mtactl", default="mtactl")
    p.add_argument("--workdir", type=Path, default=None, help="keep configs, spools, logs here")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.runs = 1
        for name in ("messages", "domain_messages", "tempfail_messages"):
            setattr(args, name, max(300, getattr(args, name) // 3))
        args.deferred = min(args.deferred, 20_000)
    return args


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_empty(mtad: MtadProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (queued := mtad.queued()) not in (0, None):
        if time.monotonic() > deadline:
            print(f"  note: mtad still holds {queued} messages", flush=True)
            return
        time.sleep(0.2)


# --- 1: end-to-end relay, mtad beside Postfix ----------------------------------------------------

def relay_sample(target: str, port: int, sink: CountingSink, job: Job, cap: float,
                 mtad: MtadProcess | None) -> dict[str, Any]:
    """One smtp-source job into PORT; timed until SINK has counted every message it took."""
    before = sink.messages
    cpu0 = mtad.cpu_seconds() if mtad else 0.0
    busy0, started = machine_busy_seconds(), time.time()
    load = run_smtp_source(job, port, RECIPIENT, cap)
    reached = sink.wait_messages(before + load.messages, cap)
    done = reached or time.time()
    cpu = mtad.cpu_seconds() - cpu0 if mtad else None
    busy = machine_busy_seconds() - busy0
    first = sink.time_of(before + 1)
    n = max(1, load.messages)
    return {"target": target, "messages": load.messages, "delivered": sink.messages - before,
            "e2e_s": round(done - started, 3), "msgs_per_s": round(load.messages / (done - started), 1),
            "ingest_s": round(load.seconds, 3), "first_delivery_s": round(first - started, 4) if first else None,
            "complete": reached is not None, "cpu_ms_per_msg": round(1000 * cpu / n, 3) if cpu is not None else None,
            "busy_ms_per_msg": round(1000 * busy / n, 3), "errors": load.errors[:5],
            "error_count": len(load.errors), "loadavg": loadavg()}


def relay_scenario(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    sink_m, sink_p = CountingSink(free_port()), CountingSink(free_port())
    mtad = make_mtad(base / "relay", args.mtad, args.mtactl, nexthop=f"[127.0.0.1]:{sink_m.port}")
    peer = None if args.no_postfix else RelayPostfix(free_port(), sink_port=sink_p.port, base=base / "postfix")
    job = Job(sessions=args.sessions, messages=args.messages, size=args.size, reuse=not args.no_reuse)
    samples: list[dict[str, Any]] = []
    out: dict[str, Any] = {"job": f"{job.sessions} sessions, {job.size} B, {job.messages} messages, "
                                  f"{'one connection per session (-d)' if job.reuse else 'a connection per message'}"}
    try:
        sink_m.start()
        sink_p.start()
        if peer is not None:
            peer.start()
            out["postfix"] = peer.describe()
        out["mtad_startup_s"] = round(mtad.start(), 3)
        warm = Job(sessions=args.sessions, messages=300, size=args.size, reuse=job.reuse)
        targets: list[tuple[str, int, CountingSink, MtadProcess | None]] = [("mtad", mtad.port, sink_m, mtad)]
        if peer is not None:
            targets.append(("postfix", peer.port, sink_p, None))
        for _name, port, sink, _m in targets:
            relay_sample("warm-up", port, sink, warm, args.cap, None)
        for run in range(args.runs):
            for name, port, sink, m in targets if run % 2 == 0 else targets[::-1]:
                if m is not None:
                    wait_empty(m)
                elif peer is not None:
                    peer.clear()
                sample = relay_sample(name, port, sink, job, args.cap, m)
                samples.append(sample)
                print(f"  relay run {run + 1} {name:>7}: {sample['msgs_per_s']:>7,.0f} msg/s end to end "
                      f"({sample['messages']} in {sample['e2e_s']:.2f} s; smtp-source done at "
                      f"{sample['ingest_s']:.2f} s)  cpu {sample['cpu_ms_per_msg'] or '-'} ms/msg  "
                      f"busy {sample['busy_ms_per_msg']} ms/msg  load {sample['loadavg']}"
                      + ("" if sample["complete"] else "  INCOMPLETE"), flush=True)
        out["mtad_peak_rss_kb"] = mtad.peak_rss_kb()
        out["mtad_rss_kb"] = mtad.rss_split_kb()
    finally:
        mtad.stop()
        if peer is not None:
            peer.stop()
        sink_m.stop()
        sink_p.stop()
    out["samples"] = samples
    for name in ("mtad", "postfix"):
        mine = [s for s in samples if s["target"] == name]
        out[name] = {key: median([s[key] for s in mine]) for key in ("msgs_per_s", "cpu_ms_per_msg", "busy_ms_per_msg")}
    m, p = out["mtad"]["msgs_per_s"], out["postfix"]["msgs_per_s"]
    out["ratio"] = round(m / p, 2) if m and p else None
    return out


# --- 2 and 3: per-message recipients through relay_inject.py ----------------------------------

class DnsServer:
    """tests/dnsserver.py standalone: every name's MX resolves to 127.0.0.1."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(TESTS / "dnsserver.py"), "--port", "0",
                                      "--wildcard-mx-to", "127.0.0.1"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def injected_sample(label: str, mtad: MtadProcess, sink: CountingSink | ScriptedSink, args: argparse.Namespace, *,
                    messages: int, domains: int = 0, tempfail_every: int = 0) -> dict[str, Any]:
    before, sessions_before, log_before = sink.messages, sink.sessions, mail_log_counts(mtad.base / "mail.log")
    cpu0 = mtad.cpu_seconds()
    load = run_injector(mtad.port, sessions=args.sessions, messages=messages, size=args.size,
                        domains=domains, tempfail_every=tempfail_every, timeout=args.cap * 4)
    tempfails = len(range(0, messages, tempfail_every)) if tempfail_every else 0
    expected = load.sent - tempfails
    reached = sink.wait_messages(before + expected, args.cap)
    cpu = mtad.cpu_seconds() - cpu0
    done = reached or time.time()
    log = mail_log_counts(mtad.base / "mail.log")
    seconds = done - load.started if load.started else 0.0
    delivered = sink.messages - before
    return {"label": label, "injected": load.sent, "refused_at_ingest": load.refused, "expected_at_sink": expected,
            "delivered": delivered, "e2e_s": round(seconds, 3),
            "msgs_per_s": round(min(delivered, expected) / seconds, 1) if seconds else None,
            "ingest_s": round(load.ended - load.started, 3), "complete": reached is not None,
            "cpu_ms_per_msg": round(1000 * cpu / max(1, load.sent), 3), "injector_cpu_s": round(load.cpu_s, 2),
            "deferred_events": log.get("deferred", 0) - log_before.get("deferred", 0),
            "sink_sessions": sink.sessions - sessions_before, "loadavg": loadavg(), "injector_errors": load.error}


def print_injected(s: dict[str, Any], extra: str = "") -> None:
    print(f"  {s['label']:<28} {s['msgs_per_s'] or 0:>7,.0f} msg/s ({s['delivered']} of {s['expected_at_sink']} at the sink in "
          f"{s['e2e_s']:.2f} s; ingest {s['ingest_s']:.2f} s)  mtad cpu {s['cpu_ms_per_msg']} ms/msg  {extra}"
          f"load {s['loadavg']}" + ("" if s["complete"] else "  INCOMPLETE")
          + (f"  [{s['injector_errors'][:120]}]" if s["injector_errors"] else ""), flush=True)


def settle_sessions(sink: CountingSink, timeout: float = 10.0) -> int:
    """The sink's ended-session count once it stops changing (connections closed by a stop)."""
    deadline, last, stable_since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        if sink.sessions != last:
            last, stable_since = sink.sessions, time.monotonic()
        elif time.monotonic() - stable_since > 0.5:
            break
        time.sleep(0.05)
    return sink.sessions


def domains_scenario(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    from relay_inject import domain_names

    dns, sink = DnsServer(), CountingSink(free_port(), backlog=4096, max_sessions=args.sink_sessions)
    names = domain_names(args.domains, "relay.test")
    samples = []
    try:
        sink.start()
        for run in range(args.runs):
            for label, count in ((f"{args.domains} domains", args.domains), ("1 domain (same DNS)", 0)):
                mtad = make_mtad(base / f"domains-{run}-{count}", args.mtad, args.mtactl, domains=[*names, DOMAIN],
                                 nameserver=f"127.0.0.1:{dns.port}", delivery={"mx_port": sink.port})
                try:
                    mtad.start()
                    sessions0 = sink.sessions
                    sample = injected_sample(label, mtad, sink, args, messages=args.domain_messages, domains=count)
                    sample["peak_rss_kb"] = mtad.peak_rss_kb()
                finally:
                    mtad.stop()
                sample["connections"] = settle_sessions(sink) - sessions0
                samples.append(sample)
                print_injected(sample, f"connections {sample['connections']}  ")
    finally:
        sink.stop()
        dns.stop()
    return {"samples": samples, **{label: {k: median([s[k] for s in samples if s["label"] == label])
                                           for k in ("msgs_per_s", "connections", "cpu_ms_per_msg")}
                                   for label in dict.fromkeys(s["label"] for s in samples)}}


def tempfail_scenario(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    sink = ScriptedSink()
    samples = []
    try:
        sink.start()
        mtad = make_mtad(base / "tempfail", args.mtad, args.mtactl, nexthop=f"[127.0.0.1]:{sink.port}")
        try:
            mtad.start()
            for run in range(args.runs):
                for every in (args.tempfail_every, 0):
                    label = f"1 in {every} tempfail" if every else "no tempfail (same peer)"
                    sample = injected_sample(label, mtad, sink, args, messages=args.tempfail_messages,
                                             tempfail_every=every)
                    samples.append(sample)
                    print_injected(sample, f"deferred {sample['deferred_events']}  ")
            deferred_now = sum(r.get("deferred", 0) for r in _summary(mtad))
        finally:
            mtad.stop()
    finally:
        sink.stop()
    return {"samples": samples, "deferred_in_queue_at_end": deferred_now,
            **{label: {k: median([s[k] for s in samples if s["label"] == label])
                       for k in ("msgs_per_s", "deferred_events", "cpu_ms_per_msg")}
               for label in dict.fromkeys(s["label"] for s in samples)}}


def _summary(mtad: MtadProcess) -> list[dict[str, Any]]:
    from relay_setup import queue_summary

    return queue_summary(mtad)


# --- orchestration ------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent, check=False).stdout.strip()
    import platform

    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(), "mtad_git": rev,
            "postfix": postfix_version(), "loadavg_start": loadavg()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = begin_run("bench_relay", ("smtp-source", "smtp-sink", args.mtad.split()[0]), args.workdir, "mtad-relay-")
    if base is None:
        return 1
    result: dict[str, Any] = {"environment": environment()}
    env = result["environment"]
    print(f"mtad relay benchmark  {env['when']}  {env['host']} ({env['cpus']} CPUs, kernel {env['kernel']}, "
          f"Python {env['python']}, mtad {env['mtad_git']}, Postfix {env['postfix']})  load {env['loadavg_start']}",
          flush=True)
    runners = {"relay": relay_scenario, "domains": domains_scenario, "tempfail": tempfail_scenario,
               "deferred": deferred_scenario}
    started = time.monotonic()
    try:
        for name in args.scenarios:
            print(f"\n== {name} ==  (load {loadavg()})", flush=True)
            result[name] = runners[name](args, base)
            result[name]["loadavg_end"] = loadavg()
    except (PostfixError, MtadError, RuntimeError) as exc:
        print(f"bench_relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_relay: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    result["total_seconds"] = round(time.monotonic() - started, 1)
    print()
    for line in summary_lines(result):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"relay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return 0


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if r := result.get("relay"):
        m, p, ratio = r["mtad"], r["postfix"], r["ratio"]
        met = "" if ratio is None else ("  (target met)" if ratio >= TARGET_RATIO else "  (target MISSED)")
        lines.append(f"relay ({r['job']}): mtad {m['msgs_per_s'] or 0:,.0f} msg/s, Postfix "
                     f"{p['msgs_per_s'] or 0:,.0f} msg/s, ratio {ratio}x{met} (target >= {TARGET_RATIO}x)")
        lines.append(f"  mtad CPU {m['cpu_ms_per_msg']} ms/msg; busy ms/msg (all cores) mtad {m['busy_ms_per_msg']}, "
                     f"Postfix {p['busy_ms_per_msg']}; mtad peak RSS {r['mtad_peak_rss_kb'] / 1024:.1f} MB")
    for name in ("domains", "tempfail"):
        for label, figures in result.get(name, {}).items():
            if isinstance(figures, dict) and "msgs_per_s" in figures:
                lines.append(f"{name}: {label}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if d := result.get("deferred"):
        lines += d.get("summary", [])
    lines.append(f"benchmark wall time: {result.get('total_seconds', 0):.0f} s")
    return lines


if __name__ == "__main__":
    sys.exit(main())
