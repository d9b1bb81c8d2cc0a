#!/usr/bin/env python3
"""Load generator for the relay benchmark where smtp-source cannot say what is needed.

smtp-source sends every message to one recipient address; the 1,000-domain and 10%-tempfail
runs need recipients chosen per message. This sends MESSAGES messages of ~SIZE bytes over
SESSIONS concurrent connections (one reused connection per session, like smtp-source -d),
message i to the recipient `recipient_for(i)`:

    rcpt@dNNNN.DOMAIN_SUFFIX     spread round-robin over --domains domains (0: rcpt@--domain)
    tempfail-i@...               for every message i with i % --tempfail-every == 0 (0: none)

It is mtad's own outbound client (mtad.deliver.client.SmtpConnection: PIPELINING, two round
trips per message) on uvloop, run as its own process so that its CPU is not mtad's. It prints
one JSON line: {"sent", "refused", "started", "ended", "cpu_s"} (times are time.time()).

    python3 bench/relay_inject.py --port P [--sessions 20] [--messages 5000] [--domains 1000]

Trust: none; the server is our mtad on loopback and its replies only counted.
RFCs: 5321 and 2920 through mtad's client; 5322 for the generated message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtad.deliver.client import ClientSettings, SessionFailed, SmtpConnection
from mtad.records import Envelope, Recipient

SENDER = "bench@source.test"


def recipient_for(i: int, *, domains: int, domain: str, suffix: str, tempfail_every: int) -> str:
    """The recipient of message I (pure); see the module docstring."""
    local = f"tempfail-{i}" if tempfail_every and i % tempfail_every == 0 else "rcpt"
    where = f"d{i % domains:04d}.{suffix}" if domains else domain
    return f"{local}@{where}"


def domain_names(domains: int, suffix: str) -> list[str]:
    """Every domain recipient_for() spreads over (pure): for [inbound].domains."""
    return [f"d{i:04d}.{suffix}" for i in range(domains)]


def message(size: int, i: int, recipient: str) -> bytes:
    """A message of about SIZE bytes (pure)."""
    head = (f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: relay benchmark {i}\r\n"
            f"Message-ID: <{i}.{time.time():.6f}@source.test>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def inject(args: argparse.Namespace) -> dict[str, float | int]:
    settings = ClientSettings(helo_name="source.test", tls="none", max_messages=args.messages + 1,
                              connect_timeout=10, command_timeout=60, data_timeout=60, final_timeout=120)
    counter = iter(range(args.messages))
    sent = refused = 0

    async def session() -> None:
        nonlocal sent, refused
        conn = await SmtpConnection.open("mtad", "127.0.0.1", args.port, settings)
        try:
            for i in counter:
                rcpt = recipient_for(i, domains=args.domains, domain=args.domain, suffix=args.suffix,
                                     tempfail_every=args.tempfail_every)
                body = message(args.size, i, rcpt)
                envelope = Envelope(id="inject", sender=SENDER, arrival_time=0, size=len(body))
                [outcome] = await conn.send(envelope, [Recipient(address=rcpt)], body)
                if outcome.kind == "delivered":
                    sent += 1
                else:
                    refused += 1
                    if not conn.usable:
                        conn = await SmtpConnection.open("mtad", "127.0.0.1", args.port, settings)
        finally:
            await conn.close()

    started, cpu = time.time(), time.process_time()
    results = await asyncio.gather(*(session() for _ in range(args.sessions)), return_exceptions=True)
    ended = time.time()
    failed = [r for r in results if isinstance(r, BaseException)]
    for exc in failed:
        reply = exc.outcome.reply if isinstance(exc, SessionFailed) else repr(exc)
        print(f"relay_inject: a session failed: {reply}", file=sys.stderr)
    return {"sent": sent, "refused": refused, "started": started, "ended": ended,
            "cpu_s": time.process_time() - cpu, "failed_sessions": len(failed)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--domains", type=int, default=0, help="spread recipients over this many domains")
    p.add_argument("--domain", default="example.test", help="the one domain when --domains is 0")
    p.add_argument("--suffix", default="relay.test", help="parent of the --domains domains")
    p.add_argument("--tempfail-every", type=int, default=0, help="every Nth recipient is tempfail-...")
    args = p.parse_args(argv)
    result = uvloop.run(inject(args))
    print(json.dumps(result), flush=True)
    return 0 if not result["failed_sessions"] else 1


if __name__ == "__main__":
    sys.exit(main())
