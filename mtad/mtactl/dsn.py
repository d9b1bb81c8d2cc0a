"""`mtactl dsn [--json] FILE...`: parse bounces, complaints and auto-replies offline.

No daemon and no config: reads each FILE ("-" for stdin) and prints one line per
recipient record, as JSON objects (`--json`) or a readable table. Imports only the pure
parser so the command starts fast. Exit 0 when every file was read (whether or not it
held a bounce), 1 when a file could not be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

import msgspec

from mtad.dsn import DsnRecord, parse
from mtad.mtactl.output import printable

_encoder = msgspec.json.Encoder()
_COLUMNS = (("recipient", 34), ("action", 9), ("status", 8), ("reason", 15), ("class", 10))


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "dsn",
        help="parse delivery-status notifications and complaint reports (offline)",
        description="Parse bounces (RFC 3464 and non-standard), ARF complaints and auto-replies; "
        "one line per recipient.",
    )
    _add_arguments(parser, suppress_json=True)
    parser.set_defaults(func=run)


def _add_arguments(parser: argparse.ArgumentParser, *, suppress_json: bool) -> None:
    # SUPPRESS keeps a global `mtactl --json dsn ...` from being reset by the subparser.
    default = argparse.SUPPRESS if suppress_json else False
    parser.add_argument("--json", action="store_true", default=default, help="one JSON object per line")
    parser.add_argument("files", nargs="+", metavar="FILE", help='message files ("-" reads stdin)')


def run(args: argparse.Namespace) -> int:
    as_json = bool(getattr(args, "json", False))
    status = 0
    out = sys.stdout
    many = len(args.files) > 1
    for index, name in enumerate(args.files):
        try:
            data = _read(name)
        except OSError as exc:
            print(f"mtactl: {name}: {exc.strerror or 'cannot read'}", file=sys.stderr)
            status = 1
            continue
        records = parse(data)
        if as_json:
            for record in records:
                out.write(json_line(record, name if many else None))
                out.write("\n")
        else:
            if many:
                out.write(("\n" if index else "") + f"==> {name} <==\n")
            # A bounce is a stranger's text: its controls are shown, not sent to the terminal.
            out.write("\n".join(map(printable, table(records))) + "\n")
    out.flush()
    return status


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    with open(name, "rb") as fh:
        return fh.read()


def json_line(record: DsnRecord, file: str | None = None) -> str:
    data = msgspec.to_builtins(record)
    if file is not None:
        data["file"] = file
    return _encoder.encode(data).decode()


def table(records: Sequence[DsnRecord]) -> Iterable[str]:
    if not records:
        yield "(no bounce records)"
        return
    yield " ".join(f"{name.upper():<{width}}" for name, width in _COLUMNS) + " DIAGNOSTIC"
    for r in records:
        cells = (r.recipient, r.action or "-", r.status or "-", r.reason, r.class_)
        line = " ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, _COLUMNS))
        yield f"{line} {r.diagnostic[:80]}".rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtactl dsn", description="Parse bounces and complaint reports.")
    _add_arguments(parser, suppress_json=False)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
