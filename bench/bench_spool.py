"""Benchmark of the LMDB spool (a script, not a test): prints figures, asserts nothing.

    python3 bench/bench_spool.py [--messages 100000] [--seconds 3] [--no-uvloop]

1. store throughput of 1 KB messages with 1, 20 and 100 concurrent asyncio producers, and the
   writes each synced commit carried (group commit at work);
2. recover() time and the process RSS for --messages queued 1 KB messages, measured in a fresh
   child process that only opens the spool, recovers it and lists it (messages()), and the
   sizes of the two LMDB files (meta/: envelopes, recipients, due index; data/: bodies);
3. the store of one 30 MB body, and the longest the event loop went without running meanwhile
   (a 1 ms ticker task measures it).

Every spool lives in a temporary directory on the same filesystem as /tmp (or --dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool

KB_BODY = (b"Subject: bench\r\nFrom: a@example.test\r\n\r\n" + b"x" * 78 + b"\r\n") * 8
KB_BODY = KB_BODY[:1024]
MB = 1024 * 1024


def message(body: bytes = KB_BODY) -> tuple[Envelope, list[Recipient], bytes]:
    env = Envelope(id=new_queue_id(), sender="sender@example.test", arrival_time=time.time(),
                   size=len(body), message_id="<bench@example.test>", client_address="127.0.0.1",
                   listener="mx")
    return env, [Recipient(address="rcpt@example.net")], body


async def throughput(directory: str, producers: int, seconds: float) -> dict[str, float]:
    spool = Spool.open(directory, map_size=8 * 1024**3)
    stored = 0
    deadline = time.perf_counter() + seconds

    async def producer() -> None:
        nonlocal stored
        while time.perf_counter() < deadline:
            await spool.store(*message())
            stored += 1

    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(producer() for _ in range(producers)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    commits = spool.commits
    await spool.close()
    return {"producers": producers, "msgs_per_s": stored / elapsed, "per_commit": stored / max(commits, 1),
            "cpu_ms_per_msg": 1000 * cpu / max(stored, 1)}


async def fill(directory: str, count: int) -> float:
    spool = Spool.open(directory, map_size=8 * 1024**3)
    started = time.perf_counter()
    remaining = count

    async def producer() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await spool.store(*message())

    await asyncio.gather(*(producer() for _ in range(100)))
    elapsed = time.perf_counter() - started
    await spool.close()
    return elapsed


RECOVER_CHILD = """
import json, resource, sys, time
def rss(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
from mtad.spool import Spool
imported = rss()
spool = Spool.open(sys.argv[1], map_size=8 * 1024**3)
report = spool.recover()
listed = sum(1 for _ in spool.messages())
figures = {"messages": report.messages, "corrupt": report.corrupt, "seconds": report.seconds,
           "listed": listed, "rss_after_import": imported, "rss_now": rss(),
           "rss_anon": rss("RssAnon"), "rss_file": rss("RssFile")}
import asyncio
asyncio.run(spool.close())
figures["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(figures))
"""


def recover_in_child(directory: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", RECOVER_CHILD, directory], check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


async def big_body(directory: str) -> dict[str, float]:
    spool = Spool.open(directory, map_size=1024**3)
    body = os.urandom(30 * MB)
    stalls: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    stalls.clear()
    started = time.perf_counter()
    await spool.store(*message(body))
    took = time.perf_counter() - started
    done.set()
    await tick
    await spool.close()
    return {"store_s": took, "max_stall_ms": 1000 * max(stalls), "ticks": len(stalls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="parent directory of the temporary spools")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print("== store throughput, 1 KB messages (synced group commit)")
        for producers in (1, 20, 100):
            r = asyncio.run(throughput(os.path.join(tmp, f"t{producers}"), producers, args.seconds))
            print(f"  {producers:4d} producers: {r['msgs_per_s']:8.0f} msgs/s, {r['per_commit']:6.1f} msgs/commit, "
                  f"{r['cpu_ms_per_msg']:.3f} ms CPU/msg (this process)")

        print(f"== recover() of {args.messages} queued 1 KB messages (fresh process)")
        directory = os.path.join(tmp, "recover")
        filled = asyncio.run(fill(directory, args.messages))
        print(f"  filled in {filled:.1f} s ({args.messages / filled:.0f} msgs/s, 100 producers)")
        r = recover_in_child(directory)
        print(f"  recover: {r['seconds']:.2f} s, {r['messages']} messages, {r['corrupt']} corrupt; "
              f"messages() listed {r['listed']}")
        print(f"  RSS: {r['rss_after_import'] / MB:.0f} MB after imports; after recover and a full listing "
              f"{r['rss_now'] / MB:.0f} MB = {r['rss_anon'] / MB:.0f} MB anonymous + {r['rss_file'] / MB:.0f} MB "
              f"mapped spool pages (page cache); peak {r['max_rss'] / MB:.0f} MB")
        sizes = {where: sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
                 for where, path in (("total", directory), ("meta", os.path.join(directory, "meta")),
                                     ("data", os.path.join(directory, "data")))}
        print(f"  spool on disk: {sizes['total'] / MB:.0f} MB = meta/ {sizes['meta'] / MB:.0f} MB "
              f"(envelopes, recipients, due index) + data/ {sizes['data'] / MB:.0f} MB (bodies)")

        print("== one 30 MB body")
        r = asyncio.run(big_body(os.path.join(tmp, "big")))
        print(f"  store took {r['store_s'] * 1000:.0f} ms; longest loop stall meanwhile {r['max_stall_ms']:.1f} ms "
              f"({r['ticks']:.0f} ticks of 1 ms)")


if __name__ == "__main__":
    main()
