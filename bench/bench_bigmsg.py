"""Big messages: does a tens-of-MB message block the loop or blow mtad's memory?

Starts mtad as a real process, sends one message of each size (10, 25 MB by default; the
shipped max_message_size is 25 MiB) through smtplib while a second process measures the
round-trip time of NOOP over its own session the whole time. Prints, per size: seconds to the
250, the worst and median NOOP round trip during the transfer (the event loop's stall as a
peer sees it), and mtad's RSS before and its peak (VmHWM) after. A benchmark that prints
figures; it asserts nothing.

    python3 bench/bench_bigmsg.py [--sizes-mb 10,25] [--max-size-mb 40]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtad_process import MtadProcess


def noop_prober(port: int, stop: Any, out: Any) -> None:
    """In its own process, so the sender's work on the message does not hold its GIL."""
    samples = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("prober.bench")
        while not stop.is_set():
            started = time.perf_counter()
            client.noop()
            samples.append(time.perf_counter() - started)
    out.put(samples)


def message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = b"From: big@origin.test\r\nTo: sink@bench.test\r\nSubject: big\r\n\r\n"
    return head + line * (size // len(line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="10,25")
    parser.add_argument("--max-size-mb", type=int, default=40, help="limits.max_message_size for this run")
    args = parser.parse_args()
    sizes = [int(float(s) * 1024 * 1024) for s in args.sizes_mb.split(",")]
    mtad = shutil.which("mtad") or "mtad"
    mtactl = shutil.which("mtactl") or "mtactl"
    with tempfile.TemporaryDirectory(prefix="mtad-bigmsg-") as tmp:
        proc = MtadProcess(Path(tmp), [mtad], [mtactl], "bench.test")
        # The prober idles with NOOP on purpose: lift the junk-command limit that would cut it off.
        limits = (f"[limits]\nmax_message_size = {args.max_size_mb * 1024 * 1024}\n"
                  "max_junk_commands = 100000\nmax_bad_commands = 1000\n")
        text = proc.config.read_text().replace("[limits]\n", limits, 1)
        proc.config.write_text(text)
        proc.start()
        try:
            print(f"{'size':>8} {'to 250 s':>9} {'NOOP max ms':>12} {'NOOP p50 ms':>12} {'probes':>7} {'RSS MB':>7} {'peak MB':>8}")
            for size in sizes:
                body = message(size)
                rss_before = proc.rss_kb() / 1024
                stop = multiprocessing.Event()
                out: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
                prober = multiprocessing.Process(target=noop_prober, args=(proc.port, stop, out))
                prober.start()
                started = time.perf_counter()
                with smtplib.SMTP("127.0.0.1", proc.port, timeout=300) as client:
                    client.sendmail("big@origin.test", ["sink@bench.test"], body)
                elapsed = time.perf_counter() - started
                stop.set()
                samples: list[float] = out.get(timeout=60)
                prober.join()
                peak = proc.peak_rss_kb() / 1024
                print(f"{size / 2**20:>6.0f}MB {elapsed:>9.2f} {max(samples) * 1000:>12.1f} "
                      f"{statistics.median(samples) * 1000:>12.2f} {len(samples):>7} {rss_before:>7.0f} {peak:>8.0f}")
        finally:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
