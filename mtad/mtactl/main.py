"""mtactl: the operator's command line for a running mtad (and a few offline tools).

`mtactl [--config PATH] [--json] COMMAND ...` builds one argparse tree from the command-group
modules (each exposes `register(subparsers)` and sets `func`), runs the chosen function, and
turns failures into the contract's exit codes: 0 done, 1 failed operation (one line on stderr,
"mtactl: ..."), 2 bad usage. `--json` works before or after the command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from mtad.mtactl import queue, stats, tenant
from mtad.mtactl.client import DEFAULT_CONFIG, ClientError

# Command groups that may be absent from a build: `mtactl dsn` (offline DSN parsing), `mtactl dkim`,
# `mtactl suppression`.
_OPTIONAL_GROUPS = ("mtad.mtactl.dsn", "mtad.mtactl.dkim", "mtad.mtactl.suppression")


def command_groups() -> list[ModuleType]:
    groups = [queue, stats, tenant]
    for name in _OPTIONAL_GROUPS:
        if importlib.util.find_spec(name) is not None:
            groups.append(importlib.import_module(name))
    return groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtactl", description="Control a running mtad: queue, stats and more."
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MTAD_CONFIG", DEFAULT_CONFIG),
        help=f"mtad's config file (default: $MTAD_CONFIG or {DEFAULT_CONFIG})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in command_groups():
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ClientError as exc:
        print(f"mtactl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`mtactl queue list | head`): stop quietly, as mailq does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
