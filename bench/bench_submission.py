#!/usr/bin/env python3
"""Submission benchmark: AUTH handshakes and TLS submissions per second against a real mtad.

mtad runs as a process (bench/mtad_process.py) with mx, submission (587: STARTTLS) and
submissions (465: implicit TLS) listeners on loopback, a certificate made here (RSA-2048 by
default, like `[tls] self_signed`; `--cert ecdsa` for P-256), one tenant and one SMTP user made
with `mtactl`, and the AUTH throttle raised (`auth_lock_after = 10000`, no tarpit) so that wrong
passwords are hashed, not locked out. Scenarios, each at --clients concurrent connections:

- `auth-587`, `auth-465`: connect + (STARTTLS) + EHLO + AUTH PLAIN + QUIT, the right password:
  after the first login the verified-secret cache answers (no scrypt).
- `auth-587-wrong`, `auth-465-wrong`: the same with a wrong password: every attempt is one
  scrypt check (what a cold cache costs; an unknown user costs the same, by design).
- `submit-587`, `submit-465`: STARTTLS / implicit TLS + EHLO + AUTH + one 1 KB message + QUIT,
  one connection per message (issue 4 target: >= 200 connections/s at 20 clients).
- `mx-plain`: the same message per connection on the mx listener without TLS or AUTH, for scale.

The clients run in separate processes (this script re-run as `client`, asyncio streams + ssl on
uvloop when installed, several processes with --client-procs), so their CPU does not count as
the server's; mtad's CPU comes from /proc/PID/stat. Beside the load, a `probe` process keeps
one authenticated session on 587 and times NOOP round trips: what the load does to a session
already in progress (an idle baseline is measured first).

    python3 bench/bench_submission.py [--runs 3] [--clients 20] [--scenarios auth-587,...]

Results: printed, and JSON in bench/results/submission-YYYYMMDD-HHMMSS.json. A benchmark, not a
test: it asserts nothing. Trust: none; every peer is a local process this script started.
RFCs: 3207, 8314, 4954, 4616 (exercised, not implemented here).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtad_process import (
    MtadError,
    MtadProcess,
    free_port,
    machine_busy_seconds,
    mtad_config,
)

DOMAIN = "bench.test"
USER = "sender@bench.test"
PASSWORD = "bench password, long enough"
RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("mx-plain", "auth-587", "auth-465", "auth-587-wrong", "auth-465-wrong", "submit-587", "submit-465")


def message(size: int = 1024) -> bytes:
    """A message of about SIZE bytes from the tenant's domain (dot-stuffing not needed)."""
    head = (f"From: <{USER}>\r\nTo: <rcpt@example.test>\r\nSubject: submission benchmark\r\n"
            "Date: Mon, 02 Jan 2006 15:04:05 +0000\r\n\r\n").encode()
    line = b"La de da de da 1. La de da de da 2.  La de da de da 3. La de da\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


# -- the server side -------------------------------------------------------------------------


def bench_config(base: Path, ports: dict[str, int], cert: Path, key: Path) -> str:
    """mtad.toml for the benchmark (pure): shipped defaults except where the bench must differ."""
    limits: dict[str, object] = {
        # Every client is 127.0.0.1: wrong passwords must be hashed, not locked out or tarpitted.
        "auth_window": "1s", "auth_delay_after": 10000, "auth_lock_after": 10000, "auth_tarpit": "0s",
        # The probe session sends NOOPs for the whole run: junk commands, on purpose.
        "max_junk_commands": 100000}
    # Submitted mail is for anywhere; should delivery run, it fails fast here (nothing listens).
    return mtad_config(base, generator="bench/bench_submission.py",
                       listeners={role: ports[role] for role in ("mx", "submission", "submissions")},
                       http_port=ports["http"], admin_port=ports["admin"], domains=["example.test"], limits=limits,
                       tls=(cert, key), nexthop="127.0.0.1:9")


def make_certificate(base: Path, kind: str) -> tuple[Path, Path]:
    cert, key = base / f"{kind}.pem", base / f"{kind}.key"
    algorithm = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    subprocess.run(["openssl", "req", "-x509", *algorithm, "-nodes", "-subj", "/CN=mtad-bench.localdomain",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def start_mtad(base: Path, cert_kind: str) -> tuple[MtadProcess, dict[str, int]]:
    mtad = MtadProcess(base, ["mtad"], ["mtactl"], "example.test")
    ports = {"mx": mtad.port, "submission": free_port(), "submissions": free_port(), "http": free_port(),
             "admin": free_port()}
    cert, key = make_certificate(base, cert_kind)
    mtad.config.write_text(bench_config(base, ports, cert, key))
    mtad.start()
    for args, stdin in ((("tenant", "add", "bench", "--domain", DOMAIN), None),
                        (("smtp-user", "add", "bench", USER), PASSWORD.encode() + b"\n")):
        done = subprocess.run([*mtad.ctl, "--config", str(mtad.config), *args], input=stdin,
                              capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            mtad.stop()
            raise MtadError(f"mtactl {' '.join(args)}: " + done.stderr.decode(errors="replace"))
    return mtad, ports


# -- the client side (run as `bench_submission.py client SPEC`, in its own process) -----------


class Smtp:
    """One client connection: asyncio streams, replies read whole (multi-line included)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> bytes:
        while True:
            line = await self.reader.readline()
            if len(line) < 4:
                raise ConnectionError(f"connection closed: {line!r}")
            if line[3:4] != b"-":
                return line

    async def ask(self, command: bytes, expect: bytes) -> bytes:
        self.writer.write(command)
        answer = await self.reply()
        if not answer.startswith(expect):
            raise ValueError(f"{command[:20]!r} -> {answer!r}")
        return answer


async def one_connection(spec: dict[str, Any], context: ssl.SSLContext, body: bytes) -> None:
    scenario = spec["scenario"]
    implicit = "465" in scenario
    port = spec["ports"]["submissions" if implicit else "mx" if scenario == "mx-plain" else "submission"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context if implicit else None,
                                                   server_hostname="mtad-bench.localdomain" if implicit else None)
    smtp = Smtp(reader, writer)
    try:
        await smtp.reply()
        await smtp.ask(b"EHLO client.bench.test\r\n", b"250")
        if "587" in scenario:
            await smtp.ask(b"STARTTLS\r\n", b"220")
            await writer.start_tls(context, server_hostname="mtad-bench.localdomain")
            await smtp.ask(b"EHLO client.bench.test\r\n", b"250")
        if scenario != "mx-plain":
            password = "a wrong password!" if scenario.endswith("wrong") else PASSWORD
            token = base64.b64encode(f"\0{USER}\0{password}".encode())
            await smtp.ask(b"AUTH PLAIN " + token + b"\r\n", b"535" if scenario.endswith("wrong") else b"235")
        if scenario.startswith(("submit", "mx")):
            await smtp.ask(f"MAIL FROM:<{USER}>\r\n".encode(), b"250")
            await smtp.ask(b"RCPT TO:<rcpt@example.test>\r\n", b"250")
            await smtp.ask(b"DATA\r\n", b"354")
            await smtp.ask(body + b".\r\n", b"250")
        await smtp.ask(b"QUIT\r\n", b"221")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    context = ssl._create_unverified_context()  # the bench certificate is self-made
    body = message(spec["size"])
    latencies: list[float] = []
    errors: list[str] = []
    remaining = spec["count"]
    delay = spec["start_at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)  # all client processes start together
    started, cpu0 = time.perf_counter(), time.process_time()

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                await one_connection(spec, context, body)
                latencies.append(time.perf_counter() - t0)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu0,
            "latencies": latencies, "errors": errors}


async def probe_main(spec: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    """One authenticated session on 587, NOOP every 10 ms until told to stop: the round trips."""
    context = ssl._create_unverified_context()
    reader, writer = await asyncio.open_connection("127.0.0.1", spec["ports"]["submission"])
    smtp = Smtp(reader, writer)
    await smtp.reply()
    await smtp.ask(b"EHLO probe.bench.test\r\n", b"250")
    await smtp.ask(b"STARTTLS\r\n", b"220")
    await writer.start_tls(context, server_hostname="mtad-bench.localdomain")
    await smtp.ask(b"EHLO probe.bench.test\r\n", b"250")
    await smtp.ask(b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n", b"235")
    print("ready", flush=True)
    rtts = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await smtp.ask(b"NOOP\r\n", b"250")
        rtts.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    await smtp.ask(b"QUIT\r\n", b"221")
    writer.close()
    return {"rtts": rtts}


def run_role(role: str, spec: dict[str, Any]) -> int:
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if role == "client":
        result = runner(client_main(spec))
    else:
        stop = threading.Event()

        def wait_for_eof() -> None:  # the parent closes our stdin to end the probe
            sys.stdin.read()
            stop.set()
        threading.Thread(target=wait_for_eof, daemon=True).start()
        result = runner(probe_main(spec, stop))
    print(json.dumps(result), flush=True)
    return 0


# -- orchestration ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Probe:
    """The probe process: started before a load, stopped after it; its NOOP round trips."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "probe", json.dumps({"ports": ports})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise MtadError("the probe session did not authenticate")

    def stop(self) -> list[float]:
        out, _ = self.proc.communicate(b"", timeout=30)
        return list(json.loads(out.decode().splitlines()[-1])["rtts"])


def run_load(mtad: MtadProcess, ports: dict[str, int], scenario: str, count: int, clients: int,
             procs: int) -> dict[str, Any]:
    """One run of SCENARIO: COUNT connections over CLIENTS concurrent ones in PROCS processes."""
    mtad.delete_all()
    probe = Probe(ports)
    start_at = time.time() + 0.5
    specs = [{"scenario": scenario, "ports": ports, "size": 1024, "start_at": start_at,
              "count": count // procs + (i < count % procs), "concurrency": clients // procs + (i < clients % procs)}
             for i in range(procs)]
    children = [subprocess.Popen([sys.executable, __file__, "client", json.dumps(spec)], stdout=subprocess.PIPE)
                for spec in specs]
    while time.time() < start_at:
        time.sleep(0.005)  # read the counters as the load starts, not while clients import
    cpu0, busy0 = mtad.cpu_seconds(), machine_busy_seconds()
    outputs = [json.loads(child.communicate(timeout=600)[0].decode().splitlines()[-1]) for child in children]
    cpu1, busy1 = mtad.cpu_seconds(), machine_busy_seconds()
    wall = max(o["seconds"] for o in outputs)  # every client process started at start_at
    rtts = probe.stop()
    latencies = [x for o in outputs for x in o["latencies"]]
    done = len(latencies)
    return {
        "scenario": scenario, "connections": done, "seconds": round(wall, 3),
        "conn_per_s": round(done / wall, 1),
        "msgs_per_s": round(done / wall, 1) if scenario.startswith(("submit", "mx")) else 0.0,
        "server_cpu_ms_per_conn": round(1000 * (cpu1 - cpu0) / max(1, done), 3),
        "server_cpu_share": round((cpu1 - cpu0) / wall, 2),
        "client_cpu_ms_per_conn": round(1000 * sum(o["cpu"] for o in outputs) / max(1, done), 3),
        "machine_busy_ms_per_conn": round(1000 * (busy1 - busy0) / max(1, done), 3),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 2), "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
        "probe_p50_ms": round(1000 * percentile(rtts, 0.5), 2), "probe_p99_ms": round(1000 * percentile(rtts, 0.99), 2),
        "probe_max_ms": round(1000 * max(rtts, default=float("nan")), 2), "probe_samples": len(rtts),
        "errors": [e for o in outputs for e in o["errors"]][:5],
        "error_count": sum(len(o["errors"]) for o in outputs),
    }


def idle_probe(ports: dict[str, int], seconds: float = 1.5) -> dict[str, float]:
    probe = Probe(ports)
    time.sleep(seconds)  # a baseline window, not synchronisation
    rtts = probe.stop()
    return {"probe_p50_ms": round(1000 * percentile(rtts, 0.5), 3), "probe_p99_ms": round(1000 * percentile(rtts, 0.99), 3),
            "probe_max_ms": round(1000 * max(rtts), 3)}


HEADER = (f"{'scenario':<15}{'conn/s':>8}{'msgs/s':>8}{'srv ms/c':>9}{'srv cpu':>8}{'cli ms/c':>9}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'probe p50/p99/max ms':>22}{'err':>5}")


def row(r: dict[str, Any]) -> str:
    probe = f"{r['probe_p50_ms']:.1f}/{r['probe_p99_ms']:.1f}/{r['probe_max_ms']:.1f}"
    return (f"{r['scenario']:<15}{r['conn_per_s']:>8.0f}{r['msgs_per_s']:>8.0f}{r['server_cpu_ms_per_conn']:>9.2f}"
            f"{r['server_cpu_share']:>8.0%}{r['client_cpu_ms_per_conn']:>9.2f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
            f"{probe:>22}{r['error_count']:>5}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["client"], ["probe"]):
        return run_role(argv[0], json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="runs per scenario; the median run (by conn/s) is shown")
    p.add_argument("--clients", type=int, default=20, help="concurrent client connections")
    p.add_argument("--client-procs", type=int, default=2, help="client processes sharing them")
    p.add_argument("--connections", type=int, default=2000, help="connections per run (cached AUTH, submit)")
    p.add_argument("--wrong", type=int, default=200, help="connections per run for the wrong-password scenarios")
    p.add_argument("--cert", choices=["rsa", "ecdsa"], default="rsa", help="server certificate key type")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--workdir", type=Path, default=None, help="keep config, spool and logs here")
    args = p.parse_args(argv)
    if shutil.which("mtad") is None:
        print("bench: mtad not on PATH (pip install -e .)", file=sys.stderr)
        return 1
    base = args.workdir or Path(tempfile.mkdtemp(prefix="mtad-bench-submission-"))
    base.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
                              "clients": args.clients, "client_procs": args.client_procs, "cert": args.cert,
                              "python": sys.version.split()[0], "scenarios": []}
    mtad: MtadProcess | None = None
    try:
        mtad, ports = start_mtad(base, args.cert)
        result["idle_probe"] = idle_probe(ports)
        print(f"mtad pid {mtad.pid}, {args.cert} certificate, {args.clients} clients in {args.client_procs} "
              f"processes; idle probe p50/p99/max {result['idle_probe']['probe_p50_ms']}/"
              f"{result['idle_probe']['probe_p99_ms']}/{result['idle_probe']['probe_max_ms']} ms")
        print(HEADER, flush=True)
        for scenario in args.scenarios.split(","):
            count = args.wrong if scenario.endswith("wrong") else args.connections
            run_load(mtad, ports, scenario, min(count, 200), args.clients, args.client_procs)  # warm-up
            runs = [run_load(mtad, ports, scenario, count, args.clients, args.client_procs) for _ in range(args.runs)]
            median = sorted(runs, key=lambda r: r["conn_per_s"])[len(runs) // 2]
            median["all_conn_per_s"] = [r["conn_per_s"] for r in runs]
            result["scenarios"].append(median)
            print(row(median), flush=True)
            for error in median["errors"]:
                print(f"    error: {error}")
        result["peak_rss_kb"] = mtad.peak_rss_kb()
    except (MtadError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if mtad is not None:
            mtad.stop()
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"submission-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"medians of {args.runs} runs; conn/s over all runs: "
          + ", ".join(f"{r['scenario']} {r['all_conn_per_s']}" for r in result["scenarios"]))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
