"""`mtactl dkim ...`: make signing keys, list them, and check their DNS records.

    dkim genkey DOMAIN --selector S [--algorithm rsa|ed25519] [--bits 2048] [--force]
    dkim list [--json]
    dkim check DOMAIN [--selector S] [--json]

genkey writes `<key_dir>/<domain>/<selector>.key` (0600; run as root, it hands the files to
the owner of the key directory, the daemon's user), prints the TXT record to publish, and asks
a running mtad to load it (`POST /admin/v1/dkim/reload`). list and check read the key files
only; check asks DNS ([dns].nameservers) for `<selector>._domainkey.<domain>`. Exit codes: 0
done (check: every record published and matching), 1 failed, 2 bad usage.

Trust: DNS answers are hostile and only compared and printed (control characters escaped).
RFCs: 6376 3.6.1 (key records), 3.6.2.2 (TXT strings), 8301 (key sizes), 8463 (Ed25519).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mtad.address import AddressError, normalize_domain
from mtad.http import adminapi
from mtad.mtactl import output
from mtad.mtactl.client import ClientError, load_config, open_client

if TYPE_CHECKING:
    from mtad.dkim import SigningKey

# mtad.dkim.GENKEY_RSA_BITS; mtad.dkim (cryptography, dkimpy) is imported only by the dkim
# commands themselves, so every other mtactl command starts as fast as before.
_RSA_BITS = (2048, 3072, 4096)


class KeyRow(msgspec.Struct, kw_only=True):
    """One key in `mtactl dkim list --json`."""

    domain: str
    selector: str
    algorithm: str
    bits: int
    path: str
    record: str


class CheckRow(msgspec.Struct, kw_only=True):
    """One selector in `mtactl dkim check --json`: status ok | missing | different | error."""

    domain: str
    selector: str
    name: str
    status: str
    detail: str = ""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dkim = subparsers.add_parser("dkim", help="DKIM signing keys: make, list, check DNS")
    commands = dkim.add_subparsers(dest="dkim_command", metavar="COMMAND", required=True)

    genkey = commands.add_parser("genkey", help="make a signing key and print its DNS record")
    genkey.add_argument("domain", metavar="DOMAIN")
    genkey.add_argument("--selector", required=True, metavar="S")
    genkey.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    genkey.add_argument("--bits", type=int, choices=_RSA_BITS, default=2048, help="RSA key size")
    genkey.add_argument("--force", action="store_true", help="replace an existing key of that selector")
    genkey.set_defaults(func=run_genkey)

    listing = commands.add_parser("list", help="every signing key in the key directory")
    output.add_json_flag(listing)
    listing.set_defaults(func=run_list)

    check = commands.add_parser("check", help="is each key of DOMAIN published in DNS, and the same?")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--selector", metavar="S", help="only this selector")
    output.add_json_flag(check)
    check.set_defaults(func=run_check)


def _domain(text: str) -> str:
    try:
        return normalize_domain(text.strip().rstrip("."))
    except AddressError as exc:
        raise ClientError(f"invalid domain {text!r}: {exc}") from None


def _selector(text: str) -> str:
    from mtad.dkim import check_selector

    try:
        return check_selector(text)
    except ValueError as exc:
        raise ClientError(str(exc)) from None


def run_genkey(args: argparse.Namespace) -> int:
    from mtad.dkim import SigningKey, generate_key, key_dir_of, txt_zone_line, write_key

    cfg = load_config(args.config)
    domain, selector = _domain(args.domain), _selector(args.selector)
    key_dir = key_dir_of(cfg)
    private = generate_key(args.algorithm, args.bits)
    try:
        path = write_key(key_dir, domain, selector, private, force=args.force)
    except FileExistsError:
        raise ClientError(f"{domain} already has a key for selector {selector} "
                          f"({Path(key_dir) / domain / (selector + '.key')}); --force replaces it") from None
    except OSError as exc:
        raise ClientError(f"cannot write the key under {key_dir}: {(exc.strerror or 'error').lower()}") from None
    _hand_over(path, Path(key_dir))
    key = SigningKey(domain=domain, selector=selector, private=private, path=str(path))
    print(f"; {key.algorithm} key written to {path}; publish this record:")
    print(txt_zone_line(key))
    sys.stdout.flush()
    try:
        reloaded = open_client(args.config).post(adminapi.DKIM_RELOAD, adminapi.DkimReloaded)
    except ClientError as exc:
        print(f"mtactl: mtad not reached ({exc}); it loads the key when it next starts or gets SIGHUP",
              file=sys.stderr)
    else:
        print(f"mtad reloaded its keys: {reloaded.keys} key(s) for {reloaded.domains} domain(s)", file=sys.stderr)
    return 0


def _hand_over(path: Path, key_dir: Path) -> None:
    """Run as root, give the new key and its directory to whoever owns the key directory (or the
    spool above it), so the daemon's user can read a key that root made."""
    if os.geteuid() != 0:
        return
    reference = key_dir.parent if key_dir.stat().st_uid == 0 else key_dir
    owner = reference.stat()
    if owner.st_uid == 0:
        return
    for target in (key_dir, path.parent, path):
        os.chown(target, owner.st_uid, owner.st_gid)


def run_list(args: argparse.Namespace) -> int:
    from mtad.dkim import key_dir_of, load_keys

    keys, problems = load_keys(key_dir_of(load_config(args.config)))
    for problem in problems:
        print(f"mtactl: skipped {output.printable(problem)}", file=sys.stderr)
    for domain_keys in keys.values():
        for key in domain_keys:
            row = KeyRow(domain=key.domain, selector=key.selector, algorithm=key.algorithm, bits=key.bits,
                         path=key.path, record=key.record())
            if args.json:
                print(output.json_line(row))
            else:
                print(f"{key.domain:<30} {key.selector:<20} {key.algorithm:<15} {key.bits:>5}  {key.path}")
    return 0


def compare(key: SigningKey, records: list[str]) -> tuple[str, str]:
    """(status, detail) of the TXT records published for KEY (pure)."""
    found = [parsed for parsed in map(_tags, records) if "p" in parsed]
    if not found:
        return "missing", "no DKIM key record" if records else "no TXT record"
    for tags in found:
        if tags.get("k", "rsa") == key.kind and re.sub(r"\s+", "", tags["p"]) == key.public_key_b64():
            return "ok", "published and matching"
    if all(not re.sub(r"\s+", "", tags["p"]) for tags in found):
        return "different", "the published record is revoked (empty p=)"
    return "different", "a different key is published"


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip()] = value.strip()
    return tags


async def _check(keys: list[SigningKey], nameservers: list[str], timeout: float) -> list[CheckRow]:
    from mtad.dkimverify import DnsTempError, fetch_txt

    async def one(key: SigningKey) -> CheckRow:
        name = f"{key.selector}._domainkey.{key.domain}"
        try:
            status, detail = compare(key, await fetch_txt(name, nameservers, timeout))
        except DnsTempError as exc:
            status, detail = "error", f"lookup failed: {exc}"
        return CheckRow(domain=key.domain, selector=key.selector, name=name, status=status, detail=detail)

    return list(await asyncio.gather(*(one(key) for key in keys)))


def run_check(args: argparse.Namespace) -> int:
    from mtad.dkim import key_dir_of, load_keys

    cfg = load_config(args.config)
    domain = _domain(args.domain)
    keys = load_keys(key_dir_of(cfg))[0].get(domain, [])
    if args.selector:
        selector = _selector(args.selector)
        keys = [key for key in keys if key.selector == selector]
    if not keys:
        which = f" with selector {args.selector}" if args.selector else ""
        raise ClientError(f"no signing key for {domain}{which} in {key_dir_of(cfg)}")
    rows = asyncio.run(_check(keys, list(cfg.dns.nameservers), float(cfg.dns.timeout)))
    for row in rows:
        if args.json:
            print(output.json_line(row))
        else:
            print(output.printable(f"{row.name}: {row.status}: {row.detail}"))
    return 0 if all(row.status == "ok" for row in rows) else 1
