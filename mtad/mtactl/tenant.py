"""`mtactl tenant|apikey|smtp-user ...`: manage tenants, their API keys and SMTP credentials.

Each command is one call on the admin API (routes and bodies in mtad.platform.views); this
module parses the command line, reads a password when one is needed, and prints. Exit codes:
0 done, 1 failed (unknown tenant, domain taken, daemon down: printed by main), 2 bad usage
(argparse, or a password that is empty or too short).

Trust: passwords come from stdin (one line) or, on a terminal, from getpass without echo; they
are sent to the daemon once and never printed. An API key is printed once, when created.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from mtad.config.schema import Size
from mtad.mtactl import output
from mtad.mtactl.client import AdminClient, open_client
from mtad.platform import views
from mtad.platform.model import MIN_PASSWORD_LENGTH, ApiKeyInfo, Quota, SmtpUserInfo

_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?")
_PER = {"s": 1, "m": 60, "h": 3600}


def rate(text: str) -> float:
    """`10`, `10/s`, `600/m`, `3600/h` -> messages per second."""
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a rate such as 10/s or 600/m, got {text!r}")
    return float(match[1]) / _PER[match[2] or "s"]


def size(text: str) -> int:
    try:
        return int(Size.parse(int(text) if text.isdigit() else text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_tenant(subparsers)
    _register_apikey(subparsers)
    _register_smtp_user(subparsers)


def _quota_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=rate, metavar="N/s", help="messages per second (0: unlimited)")
    parser.add_argument("--hourly", type=count, metavar="N", help="messages per UTC hour (0: unlimited)")
    parser.add_argument("--daily", type=count, metavar="N", help="messages per UTC day (0: unlimited)")
    parser.add_argument("--max-size", type=size, metavar="SIZE", help="largest message, e.g. 10MB (0: server limit)")
    parser.add_argument("--max-recipients", type=count, metavar="N", help="recipients per message (0: server limit)")
    output.add_json_flag(parser)


def _register_tenant(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenant = subparsers.add_parser("tenant", help="customers sending through mtad and their domains")
    commands = tenant.add_subparsers(dest="tenant_command", metavar="COMMAND", required=True)

    add = commands.add_parser("add", help="add a tenant with its sending domains")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--domain", action="extend", nargs="+", required=True, metavar="D",
                     help="a sending domain (repeat or list several)")
    _quota_options(add)
    add.set_defaults(func=run_add)

    change = commands.add_parser("set", help="change a tenant's quotas or domains")
    change.add_argument("name", metavar="NAME")
    change.add_argument("--domain", action="extend", nargs="+", metavar="D",
                        help="replace the domain list with these")
    change.add_argument("--add-domain", action="extend", nargs="+", default=[], metavar="D")
    change.add_argument("--remove-domain", action="extend", nargs="+", default=[], metavar="D")
    _quota_options(change)
    change.set_defaults(func=run_set)

    listing = commands.add_parser("list", help="every tenant: domains, state, quotas, usage")
    output.add_json_flag(listing)
    listing.set_defaults(func=run_list)

    for action, text in (("disable", "refuse the tenant's SMTP logins and API keys"),
                         ("enable", "let a disabled tenant send again"),
                         ("delete", "delete a tenant with its domains, SMTP users and API keys")):
        parser = commands.add_parser(action, help=text)
        parser.add_argument("name", metavar="NAME")
        output.add_json_flag(parser)
        parser.set_defaults(func=run_state, action=action)


def _register_apikey(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apikey = subparsers.add_parser("apikey", help="API keys of a tenant (HTTP API)")
    commands = apikey.add_subparsers(dest="apikey_command", metavar="COMMAND", required=True)
    create = commands.add_parser("create", help="print a new API key (shown once, stored hashed)")
    create.add_argument("tenant", metavar="TENANT")
    output.add_json_flag(create)
    create.set_defaults(func=run_apikey_create)
    listing = commands.add_parser("list", help="a tenant's API keys: ids and dates, never secrets")
    listing.add_argument("tenant", metavar="TENANT")
    output.add_json_flag(listing)
    listing.set_defaults(func=run_apikey_list)
    revoke = commands.add_parser("revoke", help="revoke an API key by its id")
    revoke.add_argument("id", metavar="ID")
    output.add_json_flag(revoke)
    revoke.set_defaults(func=run_apikey_revoke)


def _register_smtp_user(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = subparsers.add_parser("smtp-user", help="SMTP AUTH credentials of a tenant")
    commands = user.add_subparsers(dest="smtp_user_command", metavar="COMMAND", required=True)
    add = commands.add_parser("add", help="create credentials; the password is read from stdin")
    add.add_argument("tenant", metavar="TENANT")
    add.add_argument("username", metavar="USER")
    output.add_json_flag(add)
    add.set_defaults(func=run_user_add)
    listing = commands.add_parser("list", help="SMTP users (of one tenant, or all)")
    listing.add_argument("tenant", metavar="TENANT", nargs="?")
    output.add_json_flag(listing)
    listing.set_defaults(func=run_user_list)
    delete = commands.add_parser("delete", help="delete an SMTP user")
    delete.add_argument("username", metavar="USER")
    output.add_json_flag(delete)
    delete.set_defaults(func=run_user_delete)
    for action in ("disable", "enable"):
        parser = commands.add_parser(action, help=f"{action} an SMTP user")
        parser.add_argument("username", metavar="USER")
        output.add_json_flag(parser)
        parser.set_defaults(func=run_user_state, action=action)


def _quota_change(args: argparse.Namespace) -> views.QuotaChange:
    return views.QuotaChange(per_second=args.rate, per_hour=args.hourly, per_day=args.daily,
                             max_message_size=args.max_size, max_recipients=args.max_recipients)


def _print_tenant(args: argparse.Namespace, tenant: views.TenantView, text: str) -> None:
    print(output.json_line(tenant) if args.json else output.printable(text))


def run_add(args: argparse.Namespace) -> int:
    quota = _quota_change(args).applied_to(Quota())
    body = views.NewTenant(name=args.name, domains=args.domain, quota=quota)
    tenant = open_client(args.config).send("POST", views.TENANTS, views.TenantView, body)
    _print_tenant(args, tenant, f"added tenant {tenant.name}: {', '.join(tenant.domains)}")
    return 0


def run_set(args: argparse.Namespace) -> int:
    change = views.TenantChange(quota=_quota_change(args), domains=args.domain,
                                add_domains=args.add_domain, remove_domains=args.remove_domain)
    tenant = open_client(args.config).send("PATCH", views.tenant_path(args.name), views.TenantView, change)
    _print_tenant(args, tenant, f"changed tenant {tenant.name}")
    return 0


def run_state(args: argparse.Namespace) -> int:
    client = open_client(args.config)
    if args.action == "delete":
        deleted = client.send("DELETE", views.tenant_path(args.name), views.Deleted)
        print(output.json_line(deleted) if args.json else output.printable(f"deleted tenant {deleted.deleted}"))
        return 0
    tenant = client.send("POST", views.tenant_path(args.name, f"/{args.action}"), views.TenantView)
    _print_tenant(args, tenant, f"{args.action}d tenant {tenant.name}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    tenants = open_client(args.config).send("GET", views.TENANTS, list[views.TenantView])
    lines = (output.json_line(t) for t in tenants) if args.json else tenant_listing(tenants)
    for line in lines:
        print(line)
    return 0


def tenant_listing(tenants: Iterable[views.TenantView]) -> Iterator[str]:
    """A table: one line per tenant, usage shown as used/limit ("-" for no limit)."""
    rows = [("NAME", "STATE", "RATE", "HOUR", "DAY", "MAX-SIZE", "MAX-RCPT", "USERS", "KEYS", "DOMAINS")]
    for t in tenants:
        q = t.quota
        rows.append((
            t.name, "disabled" if t.disabled else "enabled",
            f"{q.per_second:g}/s" if q.per_second else "-",
            f"{t.usage.hour}/{q.per_hour or '-'}", f"{t.usage.day}/{q.per_day or '-'}",
            _size_text(q.max_message_size), str(q.max_recipients or "-"),
            str(t.smtp_users), str(t.api_keys), ",".join(t.domains),
        ))
    if len(rows) == 1:
        yield "no tenants"
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        yield output.printable("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


def _size_text(value: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value) if value else "-"


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(unix)) if unix else "-"


def run_apikey_create(args: argparse.Namespace) -> int:
    path = views.tenant_path(args.tenant, "/apikeys")
    created = open_client(args.config).send("POST", path, views.NewApiKey)
    if args.json:
        print(output.json_line(created))
    else:
        print(created.key)
    print(f"mtactl: API key {created.id} for tenant {output.printable(created.tenant)}: "
          "this is the only time it is shown; store it now", file=sys.stderr)
    return 0


def run_apikey_list(args: argparse.Namespace) -> int:
    path = views.tenant_path(args.tenant, "/apikeys")
    keys = open_client(args.config).send("GET", path, list[ApiKeyInfo])
    for key in keys:
        if args.json:
            print(output.json_line(key))
        else:
            state = f"revoked {_when(key.revoked)}" if key.revoked else "active"
            print(f"{key.id}  {output.printable(key.tenant)}  created {_when(key.created)}  {state}")
    return 0


def run_apikey_revoke(args: argparse.Namespace) -> int:
    key = open_client(args.config).send("DELETE", views.apikey_path(args.id), ApiKeyInfo)
    print(output.json_line(key) if args.json else f"revoked API key {key.id}")
    return 0


def read_password(username: str) -> str | None:
    """The new password: getpass twice on a terminal, else one line of stdin; None on mismatch."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {username}: ")
        if getpass.getpass("Again: ") != first:
            return None
        return first
    return sys.stdin.readline().removesuffix("\n").removesuffix("\r")


def run_user_add(args: argparse.Namespace) -> int:
    client: AdminClient = open_client(args.config)
    password = read_password(output.printable(args.username))
    if password is None:
        print("mtactl: the passwords do not match", file=sys.stderr)
        return 2
    if not password:
        print("mtactl: no password given (write it on stdin, one line)", file=sys.stderr)
        return 2
    if len(password) < MIN_PASSWORD_LENGTH:
        print(f"mtactl: password too short: at least {MIN_PASSWORD_LENGTH} characters", file=sys.stderr)
        return 2
    body = views.NewSmtpUser(tenant=args.tenant, username=args.username, password=password)
    user = client.send("POST", views.SMTP_USERS, SmtpUserInfo, body)
    if args.json:
        print(output.json_line(user))
    else:
        print(output.printable(f"added SMTP user {user.username} for tenant {user.tenant}"))
    return 0


def run_user_list(args: argparse.Namespace) -> int:
    path = views.SMTP_USERS + (f"?tenant={quote(args.tenant, safe='')}" if args.tenant else "")
    users = open_client(args.config).send("GET", path, list[SmtpUserInfo])
    for user in users:
        if args.json:
            print(output.json_line(user))
        else:
            state = "disabled" if user.disabled else "enabled"
            print(output.printable(f"{user.username}  {user.tenant}  created {_when(user.created)}  {state}"))
    return 0


def run_user_delete(args: argparse.Namespace) -> int:
    deleted = open_client(args.config).send("DELETE", views.smtp_user_path(args.username), views.Deleted)
    print(output.json_line(deleted) if args.json else output.printable(f"deleted SMTP user {deleted.deleted}"))
    return 0


def run_user_state(args: argparse.Namespace) -> int:
    path = views.smtp_user_path(args.username) + f"/{args.action}"
    user = open_client(args.config).send("POST", path, SmtpUserInfo)
    print(output.json_line(user) if args.json else output.printable(f"{args.action}d SMTP user {user.username}"))
    return 0
