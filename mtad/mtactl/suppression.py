"""`mtactl suppression add|list|remove|import`: the addresses mtad never sends to again.

Each command is one call on the admin API (routes and bodies in mtad.platform.suppressviews).
`--tenant T` picks a tenant's list; without it the global list, which applies to all mail.
`import FILE.csv` reads `address[,reason[,expires]]` lines (a header row naming "address" is
skipped; blank lines too), sends the good ones in one request, prints the counts and one line
per bad line ("FILE:LINE: why") on stderr, and exits 1 when any line was bad, after importing
the good ones. Exit codes: 0 done, 1 failed (printed by main), 2 bad usage.

Trust: the CSV file is the operator's, but may be anything; every cell is checked by the daemon
(address syntax, reason length, expiry syntax) and shown back only through printable().
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterable, Iterator

from mtad.mtactl import output
from mtad.mtactl.client import open_client
from mtad.platform import suppressviews as views


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("suppression", help="addresses never sent to (bounced, complained, added)")
    commands = group.add_subparsers(dest="suppression_command", metavar="COMMAND", required=True)

    add = commands.add_parser("add", help="suppress an address (globally, or for one tenant)")
    add.add_argument("address", metavar="ADDRESS")
    _tenant_option(add)
    add.add_argument("--reason", default=views.MANUAL, help=f"why (default: {views.MANUAL})")
    add.add_argument("--expires", default="", metavar="DURATION",
                     help='lifts after this long, e.g. 30d; "never" (default: [suppression] default_expiry)')
    output.add_json_flag(add)
    add.set_defaults(func=run_add)

    listing = commands.add_parser("list", help="suppressed addresses (of one tenant's list, or every list)")
    _tenant_option(listing)
    output.add_json_flag(listing)
    listing.set_defaults(func=run_list)

    remove = commands.add_parser("remove", help="lift a suppression")
    remove.add_argument("address", metavar="ADDRESS")
    _tenant_option(remove)
    output.add_json_flag(remove)
    remove.set_defaults(func=run_remove)

    imports = commands.add_parser("import", help="add the addresses of a CSV file: address[,reason[,expires]]")
    imports.add_argument("file", metavar="FILE.csv")
    _tenant_option(imports)
    output.add_json_flag(imports)
    imports.set_defaults(func=run_import)


def _tenant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", metavar="T", help="the tenant's list (default: the global list)")


def run_add(args: argparse.Namespace) -> int:
    body = views.NewSuppression(address=args.address, tenant=args.tenant or "", reason=args.reason,
                                expires=args.expires)
    entry = open_client(args.config).send("POST", views.SUPPRESSIONS, views.Suppression, body)
    print(output.json_line(entry) if args.json else output.printable(f"suppressed {_describe(entry)}"))
    return 0


def run_list(args: argparse.Namespace) -> int:
    path = views.SUPPRESSIONS + views.tenant_query(args.tenant)
    entries = open_client(args.config).send("GET", path, list[views.Suppression])
    lines = (output.json_line(e) for e in entries) if args.json else listing(entries)
    for line in lines:
        print(line)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    path = views.suppression_path(args.address) + views.tenant_query(args.tenant or "")
    removed = open_client(args.config).send("DELETE", path, views.Removed)
    where = f"tenant {removed.tenant}" if removed.tenant else "the global list"
    print(output.json_line(removed) if args.json
          else output.printable(f"removed {removed.address} from {where}"))
    return 0


def run_import(args: argparse.Namespace) -> int:
    try:
        with open(args.file, newline="", encoding="utf-8-sig") as f:
            rows = list(read_csv(f))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"mtactl: cannot read {output.printable(args.file)}: {exc}", file=sys.stderr)
        return 1
    entries, problems, lines = [], [], []
    for line, item in rows:
        if isinstance(item, str):
            problems.append((line, item))
        else:
            entries.append(item)
            lines.append(line)
    result = views.ImportResult(added=0)
    if entries:
        request = views.ImportRequest(tenant=args.tenant or "", entries=entries)
        result = open_client(args.config).send("POST", views.IMPORT, views.ImportResult, request)
        problems += [(lines[p.index], p.message) for p in result.bad if 0 <= p.index < len(lines)]
    problems.sort()
    for line, message in problems:
        print(output.printable(f"{args.file}:{line}: {message}"), file=sys.stderr)
    summary = {"added": result.added, "bad": len(problems)}
    print(output.json_line(summary) if args.json else f"imported {result.added}, {len(problems)} bad lines")
    return 1 if problems else 0


def read_csv(lines: Iterable[str]) -> Iterator[tuple[int, views.ImportEntry | str]]:
    """(line number, entry or the reason it is bad) per non-blank line; a header row is skipped."""
    for number, row in enumerate(csv.reader(lines), 1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if number == 1 and cells[0].lower() in ("address", "email", "e-mail"):
            continue
        if len(cells) > 3:
            yield number, "too many columns (address[,reason[,expires]])"
            continue
        cells += [""] * (3 - len(cells))
        yield number, views.ImportEntry(address=cells[0], reason=cells[1], expires=cells[2])


def listing(entries: list[views.Suppression]) -> Iterator[str]:
    if not entries:
        yield "no suppressions"
        return
    rows = [("ADDRESS", "LIST", "REASON", "SOURCE", "CREATED", "EXPIRES")]
    for e in entries:
        rows.append((e.address, e.tenant or "(global)", e.reason, e.source or "-", _when(e.created),
                     _when(e.expires) if e.expires else "never"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        yield output.printable("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


def _describe(entry: views.Suppression) -> str:
    where = f"for tenant {entry.tenant}" if entry.tenant else "globally"
    until = f" until {_when(entry.expires)}" if entry.expires else ""
    return f"{entry.address} {where} ({entry.reason}){until}"


def _when(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(unix)) if unix else "-"
