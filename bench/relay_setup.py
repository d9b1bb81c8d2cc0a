"""The relay benchmark's set-up: mtad's config, Postfix as a relay with connection reuse, loads.

`make_mtad()` writes the mtad.toml (bench/mtad_process.py's `mtad_config()`): the ingest
benchmark's instance (fresh spool, one mx listener, shipped defaults, durable) plus where mail
goes: a `[[route]]` for "*" to a next hop, or MX lookups through `[dns].nameservers` with
`[delivery] mx_port`, and any other `[delivery]` keys a scenario sets.

`RelayPostfix` is the ingest benchmark's private Postfix (bench/postfix_peer.py) in relay mode,
delivering to a sink this benchmark starts and counts, with SMTP connection caching on for the
relayhost (`smtp_connection_cache_destinations`, on top of the default
`smtp_connection_cache_on_demand = yes`), as mtad's pool reuses connections.

`run_injector()` runs bench/relay_inject.py (recipients chosen per message) as a process and
returns what it printed.

Trust: none; every peer is a local process this benchmark started.
RFCs: none implemented here.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtad_process import MtadProcess, free_port, mtad_config
from postfix_peer import POSTCONF, PostfixPeer, run_postfix_command

DOMAIN = "example.test"
HERE = Path(__file__).resolve().parent


def make_mtad(base: Path, mtad: str, mtactl: str, *, domains: list[str] | None = None, nexthop: str = "",
              nameserver: str = "", delivery: dict[str, object] | None = None) -> MtadProcess:
    """An MtadProcess (not started) for one relay scenario: mtad_config() with where mail goes."""
    proc = MtadProcess(base, shlex.split(mtad), shlex.split(mtactl), DOMAIN)
    proc.config.write_text(mtad_config(base, generator="bench/relay_setup.py", listeners={"mx": proc.port},
                                       http_port=free_port(), admin_port=free_port(), domains=domains or [DOMAIN],
                                       nameserver=nameserver, delivery=delivery, nexthop=nexthop))
    return proc


def mail_log_counts(path: Path) -> dict[str, int]:
    """Events on an mtad mail log by type (delivered, deferred, ...)."""
    counts: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    kind = json.loads(line).get("type", "?")
                except ValueError:
                    continue
                counts[kind] = counts.get(kind, 0) + 1
    except OSError:
        pass
    return counts


def queue_summary(mtad: MtadProcess, timeout: float = 120.0) -> list[dict[str, Any]]:
    """`mtactl queue summary --json`: one dict per destination ([] when it failed)."""
    done = mtad.mtactl("queue", "summary", "--json", timeout=timeout)
    if done.returncode != 0:
        return []
    rows = []
    for line in done.stdout.decode(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class RelayPostfix(PostfixPeer):
    """The private Postfix relaying everything to 127.0.0.1:SINK_PORT, connections cached."""

    def __init__(self, port: int, *, sink_port: int, base: Path) -> None:
        super().__init__(port, mode="relay", sink_port=sink_port, base=base)
        self.sink = None  # the benchmark starts and counts its own sink on sink_port
        self.sink_port = sink_port

    def _write_config(self) -> None:
        super()._write_config()
        relayhost = f"[127.0.0.1]:{self.sink_port}"
        run_postfix_command([POSTCONF, "-c", str(self.config_dir), f"relayhost = {relayhost}",
                             "smtp_connection_cache_on_demand = yes",
                             f"smtp_connection_cache_destinations = {relayhost}"])

    def describe(self) -> str:
        return (super().describe() + f"; relayhost [127.0.0.1]:{self.sink_port}, "
                "smtp_connection_cache_destinations = relayhost")


@dataclass(frozen=True)
class Injected:
    sent: int
    refused: int
    started: float
    ended: float
    cpu_s: float
    error: str


def run_injector(port: int, *, sessions: int, messages: int, size: int = 1024, domains: int = 0,
                 tempfail_every: int = 0, timeout: float = 600.0) -> Injected:
    """Run bench/relay_inject.py against PORT until it exits; what it reported."""
    argv = [sys.executable, str(HERE / "relay_inject.py"), "--port", str(port), "--sessions", str(sessions),
            "--messages", str(messages), "--size", str(size), "--domains", str(domains),
            "--tempfail-every", str(tempfail_every)]
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    err = done.stderr.decode(errors="replace").strip()
    try:
        out = json.loads(done.stdout.decode().splitlines()[-1])
    except (ValueError, IndexError):
        return Injected(0, 0, 0.0, 0.0, 0.0, err or f"relay_inject exited {done.returncode}")
    return Injected(out["sent"], out["refused"], out["started"], out["ended"], out["cpu_s"], err[:500])
