"""`mtactl queue ...`: list, show, cat, hold, release, delete, flush, bounce, summary.

Each command is one call on the admin API (mtad.http.admin); this module only parses the
command line and prints. Exit codes: 0 done, 1 failed (printed by main), 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from urllib.parse import quote

from mtad.http import adminapi
from mtad.mtactl import output
from mtad.mtactl.client import open_client, queue_path

LONG_TIMEOUT = 3600.0
"""Seconds mtactl waits for operations that walk the whole queue (flush, summary)."""

# Past-tense words for what a queue action did, for the text output.
_DONE = {"hold": "held", "release": "released", "delete": "deleted"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = subparsers.add_parser("queue", help="inspect and change the mail queue")
    commands = queue.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="every queued message, mailq style")
    output.add_json_flag(listing)
    listing.set_defaults(func=run_list)

    show = commands.add_parser("show", help="envelope, headers and recipients of one message")
    show.add_argument("id", metavar="ID", help="queue id")
    output.add_json_flag(show)
    show.set_defaults(func=run_show)

    cat = commands.add_parser("cat", help="the stored message, raw, to stdout")
    cat.add_argument("id", metavar="ID", help="queue id")
    cat.set_defaults(func=run_cat)

    for action, text in (
        ("hold", "park a message (or every message): no delivery until released"),
        ("release", "unpark a held message (or every message)"),
        ("delete", "remove a message (or every message) without a bounce"),
    ):
        parser = commands.add_parser(action, help=text)
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("id", metavar="ID", nargs="?", help="queue id")
        which.add_argument("--all", action="store_true", help="every queued message")
        output.add_json_flag(parser)
        parser.set_defaults(func=run_action, action=action)

    flush = commands.add_parser("flush", help="attempt deferred mail now (one message, one domain, or all)")
    which = flush.add_mutually_exclusive_group()
    which.add_argument("id", metavar="ID", nargs="?", help="queue id")
    which.add_argument("--domain", metavar="D", help="only recipients at this domain (wakes a suspended destination)")
    output.add_json_flag(flush)
    flush.set_defaults(func=run_flush)

    bounce = commands.add_parser("bounce", help="give up on a message now and return a DSN to its sender")
    bounce.add_argument("id", metavar="ID", help="queue id")
    output.add_json_flag(bounce)
    bounce.set_defaults(func=run_bounce)

    summary = commands.add_parser("summary", help="per destination: queued, deferred, connections, oldest, last error")
    output.add_json_flag(summary)
    summary.set_defaults(func=run_summary)


def run_list(args: argparse.Namespace) -> int:
    client = open_client(args.config)
    entries = client.lines(adminapi.QUEUE, adminapi.QueueEntry)
    lines: Iterator[str]
    if args.json:
        lines = (output.json_line(entry) for entry in entries)
    else:
        lines = output.queue_listing(entries)
    for line in lines:
        sys.stdout.write(line + "\n")
    return 0


def run_show(args: argparse.Namespace) -> int:
    client = open_client(args.config)
    detail = client.get(queue_path(args.id), adminapi.MessageDetail, queue_id=args.id)
    if args.json:
        print(output.json_line(detail))
    else:
        print("\n".join(output.message_details(detail)))
    return 0


def run_cat(args: argparse.Namespace) -> int:
    client = open_client(args.config)
    sys.stdout.flush()
    client.copy(queue_path(args.id, "/body"), sys.stdout.buffer, queue_id=args.id)
    sys.stdout.buffer.flush()
    return 0


def run_action(args: argparse.Namespace) -> int:
    client = open_client(args.config)
    action: str = args.action
    if args.all:
        result = client.post(f"{adminapi.QUEUE}/{action}-all", adminapi.QueueActionResult)
        text = f"{_DONE[action]} {result.count} message{'s' if result.count != 1 else ''}"
    else:
        path = queue_path(args.id, "" if action == "delete" else f"/{action}")
        method = client.delete if action == "delete" else client.post
        result = method(path, adminapi.QueueActionResult, queue_id=args.id)
        text = f"{_DONE[action]} {args.id}"
    print(output.json_line(result) if args.json else text)
    return 0


def run_flush(args: argparse.Namespace) -> int:
    # A flush of a whole queue rewrites every matching recipient before it answers (delivery
    # starts at once, while it runs): give it time on a queue of hundreds of thousands.
    client = open_client(args.config, timeout=LONG_TIMEOUT)
    if args.id:
        result = client.post(queue_path(args.id, "/flush"), adminapi.QueueActionResult, queue_id=args.id)
    elif args.domain:
        result = client.post(f"{adminapi.FLUSH}?domain={quote(args.domain, safe='')}", adminapi.QueueActionResult)
    else:
        result = client.post(adminapi.FLUSH, adminapi.QueueActionResult)
    text = f"flushed {result.count} recipient{'s' if result.count != 1 else ''}"
    print(output.json_line(result) if args.json else text)
    return 0


def run_bounce(args: argparse.Namespace) -> int:
    client = open_client(args.config)
    result = client.post(queue_path(args.id, "/bounce"), adminapi.QueueActionResult, queue_id=args.id)
    print(output.json_line(result) if args.json else f"bounced {args.id}")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    client = open_client(args.config, timeout=LONG_TIMEOUT)
    rows = client.lines(adminapi.SUMMARY, adminapi.DestinationRow)
    lines = (output.json_line(row) for row in rows) if args.json else output.summary_lines(list(rows))
    for line in lines:
        sys.stdout.write(line + "\n")
    return 0
