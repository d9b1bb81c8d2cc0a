"""`mtactl stats`: counters since mtad started (received, delivered, ...) and queued now."""

from __future__ import annotations

import argparse

from mtad.http import adminapi
from mtad.mtactl import output
from mtad.mtactl.client import open_client


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("stats", help="counters since start and messages queued now")
    output.add_json_flag(parser)
    parser.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    stats = open_client(args.config).get(adminapi.STATS, adminapi.Stats)
    if args.json:
        print(output.json_line(stats))
    else:
        print("\n".join(output.stats_lines(stats)))
    return 0
