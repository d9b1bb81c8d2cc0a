"""The relay benchmark's "100,000 deferred" scenario: memory with a dead destination, then a flush.

mtad routes everything ("*") to a port on 127.0.0.1 where nothing listens. It is filled with
--deferred messages (through SMTP with smtp-source -d -s 20 while the scheduler is running, or
with --fill direct through the spool API before mtad starts); its scheduler finds the
destination dead after `suspend_after` refused connections, suspends it and defers the mail
(`suspend_time = "1h"` here, so that no retry of its own can reach the sink before the
flush). When `mtactl queue summary` counts every recipient deferred, the figures are read:
VmRSS (RssAnon: heap, RssFile: mapped LMDB pages) and VmHWM; again after mtad is stopped and
started on that queue (unless --no-restart). Then an smtp-sink starts on the
dead port and `mtactl queue flush --domain example.test` runs; the sink's counter (stamped as
it changes) gives the first delivery after the command started and the time of the last.

Trust: none; every peer is a local process this benchmark started.
RFCs: none implemented here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mtad_process import MtadProcess, free_port
from relay_setup import DOMAIN, make_mtad, queue_summary
from relay_sink import CountingSink
from spool_fill import fill_direct, fill_via_smtp

RECIPIENT = f"rcpt@{DOMAIN}"
TARGET_RSS_MB = 300
TARGET_FLUSH_S = 1.0


def wait_all_deferred(mtad: MtadProcess, count: int, timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """Poll `queue summary` until COUNT recipients are deferred; (seconds waited, last rows)."""
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    while time.monotonic() - started < timeout:
        rows = queue_summary(mtad)
        deferred = sum(int(r.get("deferred", 0)) for r in rows)
        if deferred >= count:
            break
        time.sleep(1.0)
    return time.monotonic() - started, rows


def deferred_scenario(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    n = args.deferred
    dead = free_port()
    home = base / "deferred"
    mtad = make_mtad(home, args.mtad, args.mtactl, nexthop=f"[127.0.0.1]:{dead}",
                     delivery={"suspend_time": "1h"})
    sink = CountingSink(dead)
    out: dict[str, Any] = {"messages": n, "fill": args.fill}
    try:
        print(f"  filling with {n:,} messages ({args.fill}) for a destination that is down ...", flush=True)
        if args.fill == "direct":
            out["fill_s"] = round(fill_direct(home / "spool", n, RECIPIENT), 1)
            out["startup_s"] = round(mtad.start(timeout=120), 2)
        else:
            out["startup_s"] = round(mtad.start(), 2)
            load = fill_via_smtp(mtad.port, n, RECIPIENT, cap=max(600.0, n / 100))
            out["fill_s"], out["fill_rate"] = round(load.seconds, 1), round(load.rate)
            out["fill_errors"] = len(load.errors)
        waited, rows = wait_all_deferred(mtad, n, timeout=600)
        out["wait_all_deferred_s"] = round(waited, 1)
        out["summary_rows"] = rows[:3]
        out["rss_deferred_kb"] = mtad.rss_split_kb()
        out["peak_rss_kb"] = mtad.peak_rss_kb()
        print(f"  {sum(int(r.get('deferred', 0)) for r in rows):,} deferred; RSS "
              f"{out['rss_deferred_kb']['VmRSS'] / 1024:.1f} MB (heap {out['rss_deferred_kb']['RssAnon'] / 1024:.1f},"
              f" files {out['rss_deferred_kb']['RssFile'] / 1024:.1f}), peak {out['peak_rss_kb'] / 1024:.1f} MB",
              flush=True)
        if not args.no_restart:  # the same queue in a fresh process: what a restart leaves in memory
            started = time.monotonic()
            mtad.stop(timeout=120)
            out["stop_s"] = round(time.monotonic() - started, 2)
            out["restart_s"] = round(mtad.start(timeout=120), 2)
            out["rss_restarted_kb"] = mtad.rss_split_kb()
            rss = out["rss_restarted_kb"]
            print(f"  restarted in {out['restart_s']} s: RSS {rss['VmRSS'] / 1024:.1f} MB "
                  f"(heap {rss['RssAnon'] / 1024:.1f}, files {rss['RssFile'] / 1024:.1f})", flush=True)
        sink.start()
        cpu0 = mtad.cpu_seconds()
        started = time.time()
        done = mtad.mtactl("queue", "flush", "--domain", DOMAIN, timeout=600)
        out["flush_command_s"] = round(time.time() - started, 3)
        out["flush_exit"] = done.returncode
        out["flush_output"] = done.stdout.decode(errors="replace").strip()[:200]
        first = sink.wait_messages(1, 60)
        last = sink.wait_messages(n, max(args.cap, n / 100))
        out["cpu_ms_per_msg"] = round(1000 * (mtad.cpu_seconds() - cpu0) / n, 3)
        out["delivered"] = sink.messages
        out["first_delivery_s"] = round(first - started, 3) if first else None
        if first and last:
            out["all_delivered_s"] = round(last - started, 2)
            out["rate_after_first"] = round((n - 1) / (last - first)) if last > first else None
        out["rss_after_kb"] = mtad.rss_split_kb()
        out["peak_rss_end_kb"] = mtad.peak_rss_kb()
    finally:
        mtad.stop(timeout=60)
        sink.stop()
    out["summary"] = summary(out)
    for line in out["summary"]:
        print("  " + line, flush=True)
    return out


def summary(out: dict[str, Any]) -> list[str]:
    """The scenario's figures against their targets (pure)."""
    n = f"{out['messages']:,}"
    lines = []
    if "fill_s" in out:
        how = f"{out.get('fill_rate', 0):,} msg/s" if out["fill"] == "smtp" else "spool API"
        lines.append(f"deferred: filled {n} in {out['fill_s']} s ({how}); all deferred "
                     f"{out.get('wait_all_deferred_s')} s later")
    if rss := out.get("rss_deferred_kb"):
        mb = rss["VmRSS"] / 1024
        lines.append(f"deferred: mtad RSS with {n} deferred {mb:.1f} MB (heap {rss['RssAnon'] / 1024:.1f}, mapped "
                     f"files {rss['RssFile'] / 1024:.1f})" + _met(mb <= TARGET_RSS_MB) + f" (target <= {TARGET_RSS_MB} MB)"
                     f"; peak {out['peak_rss_kb'] / 1024:.1f} MB")
    if rss := out.get("rss_restarted_kb"):
        mb = rss["VmRSS"] / 1024
        lines.append(f"deferred: after a restart (stop {out['stop_s']} s, start {out['restart_s']} s): RSS {mb:.1f} MB "
                     f"(heap {rss['RssAnon'] / 1024:.1f}, mapped files {rss['RssFile'] / 1024:.1f})"
                     + _met(mb <= TARGET_RSS_MB))
    if out.get("first_delivery_s") is not None:
        lines.append(f"deferred: flush --domain -> first delivery {out['first_delivery_s']:.3f} s"
                     + _met(out["first_delivery_s"] <= TARGET_FLUSH_S) + f" (target <= {TARGET_FLUSH_S:.0f} s); "
                     f"mtactl returned after {out['flush_command_s']} s")
    elif "flush_command_s" in out:
        lines.append("deferred: no delivery within 60 s of the flush")
    if out.get("all_delivered_s"):
        lines.append(f"deferred: all {out['delivered']:,} delivered {out['all_delivered_s']} s after the flush, "
                     f"{out.get('rate_after_first') or 0:,} msg/s after the first; mtad CPU "
                     f"{out['cpu_ms_per_msg']} ms/msg; RSS after {out['rss_after_kb']['VmRSS'] / 1024:.1f} MB")
    return lines


def _met(ok: bool) -> str:
    return "  (target met)" if ok else "  (target MISSED)"
