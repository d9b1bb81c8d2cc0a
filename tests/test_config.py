"""Config loading: every problem named by its dotted key, normalisation, the shipped reference.

The bad-config table is the operator contract of `mtad --check`: each case is a TOML snippet
and the exact lines it must produce.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtad.config import Config, ConfigError, check_config, load_config, loads_config
from mtad.config.endpoints import (
    HostPort,
    normalize_domain,
    parse_hostport,
    parse_nameserver,
)
from mtad.config.schema import Duration, Size

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "conf" / "mtad.toml"
EXAMPLE = ROOT / "systemd" / "mtad.toml.example"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "mtad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- units ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("5d", 432000), (90, 90),
    (1.5, 1.5), ("1.5h", 5400), ("45", 45), (" 10 s ", 10), (0, 0),
])
def test_duration_forms(text: object, seconds: float) -> None:
    value = Duration.parse(text)
    assert isinstance(value, Duration)
    assert value == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "", "-5s", "5 days", "1h30m", True, -1, float("inf"), [], "5S"])
def test_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        Duration.parse(text)


@pytest.mark.parametrize(("text", "size"), [
    (1024, 1024), ("512KB", 512_000), ("512KiB", 524_288), ("25MB", 25_000_000),
    ("25MiB", 26_214_400), ("8GiB", 8 * 1024**3), ("1.5GB", 1_500_000_000), ("100", 100),
    ("100B", 100), ("2tib", 2 * 1024**4), (0, 0),
])
def test_size_forms(text: object, size: int) -> None:
    value = Size.parse(text)
    assert isinstance(value, Size)
    assert value == size


@pytest.mark.parametrize("text", ["25M", "MB", "-1", -1, 1.5, False, "25 megabytes", "1e6"])
def test_size_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        Size.parse(text)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_units_scale(number: int, unit: str) -> None:
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert Duration.parse(f"{number}{unit}") == pytest.approx(number * scale)


# --- the bad-config table ------------------------------------------------------------------

BAD = [
    ('[server]\nhostnme = "x"\n', ["server.hostnme: unknown key"]),
    ('colour = "blue"\n', ["colour: unknown key"]),
    ("[limits]\nmax_recipients = 0\n", ["limits.max_recipients: must be >= 1, got 0"]),
    ("[limits]\nmax_recipients = 100001\n", ["limits.max_recipients: must be <= 100000, got 100001"]),
    ('[limits]\nmax_recipients = "10"\n', ['limits.max_recipients: expected an integer, got "10"']),
    ("[limits]\nmax_recipients = true\n", ["limits.max_recipients: expected an integer, got true"]),
    ('[limits]\nidle_timeout = "5x"\n',
     ['limits.idle_timeout: expected a duration such as "500ms", "30s", "5m", "2h", "5d", got "5x"']),
    ('[limits]\nidle_timeout = "0s"\n', ['limits.idle_timeout: must be >= 1s, got "0s"']),
    ('[server]\nshutdown_grace = "2h"\n', ['server.shutdown_grace: must be <= 1h, got "2h"']),
    ('[limits]\nmax_message_size = "25M"\n',
     ['limits.max_message_size: expected a size in bytes or such as "512KB", "25MB", "8GiB", got "25M"']),
    ('[spool]\nmap_size = "512KiB"\n', ['spool.map_size: must be >= 1MiB, got "512KiB"']),
    ('[limits]\nbare_newline = "fix"\n',
     ['limits.bare_newline: must be one of "normalize", "reject", got "fix"']),
    ("[server]\nhostname = 5\n", ["server.hostname: expected a string, got 5"]),
    ("server = 5\n", ["server: expected a table, got 5"]),
    ('[listener]\naddress = "127.0.0.1:25"\n',
     ["listener: expected an array of tables ([[listener]]), got a table"]),
    ('[inbound]\ndomains = "example.test"\n', ['inbound.domains: expected an array, got "example.test"']),
    ('[[listener]]\naddress = "127.0.0.1:25"\n[[listener]]\naddress = "nonsense"\n',
     ['listener[1].address: expected host:port, got "nonsense"']),
    ('[[listener]]\naddress = "::1:25"\n',
     ['listener[0].address: an IPv6 address needs brackets, as in [::1]:25, got "::1:25"']),
    ('[[listener]]\naddress = "127.0.0.1:65536"\n',
     ['listener[0].address: port must be 0-65535, got "127.0.0.1:65536"']),
    ('[[listener]]\naddress = "bad_host!:25"\n',
     ['listener[0].address: not a valid host name or IP address in "bad_host!:25"']),
    ('[[listener]]\nrole = "relay"\n',
     ['listener[0].role: must be one of "mx", "submission", "submissions", got "relay"']),
    ('[[listener]]\naddress = "127.0.0.1:2525"\n[[listener]]\naddress = "127.0.0.1:2525"\n',
     ['listener[1].address: same address as listener[0].address ("127.0.0.1:2525")']),
    ('[[listener]]\naddress = "0.0.0.0:25"\n[[listener]]\naddress = "192.0.2.1:25"\n',
     ['listener[1].address: same address as listener[0].address ("192.0.2.1:25")']),
    ('[[listener]]\naddress = "127.0.0.1:8025"\n',
     ['http.address: same address as listener[0].address ("127.0.0.1:8025")']),
    ('[[listener]]\nrole = "submission"\naddress = "127.0.0.1:587"\n',
     ['listener[0].role: "submission" needs [tls] cert and key']),
    ('[http]\nadmin_address = "run/admin.sock"\n',
     ['http.admin_address: a unix socket path must be absolute, got "run/admin.sock"']),
    (f'[http]\nadmin_address = "/{"x" * 120}.sock"\n',
     [f'http.admin_address: unix socket path longer than 107 bytes: "/{"x" * 120}.sock"']),
    ('[http]\naddress = "localhost"\n', ['http.address: expected host:port, got "localhost"']),
    ('[inbound]\ndomains = ["ok.test", "a..b", "192.0.2.1", 7]\n', [
        "inbound.domains[3]: expected a string, got 7",
        'inbound.domains[1]: not a valid domain name: "a..b"',
        'inbound.domains[2]: expected a domain name, got the IP address "192.0.2.1"',
    ]),
    ('[inbound]\ndomains = ["-bad.test", "x.123"]\n', [
        'inbound.domains[0]: not a valid domain name: "-bad.test"',
        'inbound.domains[1]: not a valid domain name: "x.123"',
    ]),
    ('[server]\nhostname = "mail host"\n', ['server.hostname: not a valid domain name: "mail host"']),
    ('[server]\nspool_dir = ""\n', ["server.spool_dir: must not be empty"]),
    ('[[route]]\ndomain = "example.net"\n', ["route[0].nexthop: required key missing"]),
    ('[[route]]\ndomain = "*"\nnexthop = "relay.test:0"\n',
     ['route[0].nexthop: port must be 1-65535, got "relay.test:0"']),
    ('[[route]]\ndomain = "*.test"\nnexthop = "[relay.test]:587"\n',
     ['route[0].domain: not a valid domain name: "*.test"']),
    (('[[route]]\ndomain = "Example.NET"\nnexthop = "a.test:25"\n'
      '[[route]]\ndomain = "example.net."\nnexthop = "b.test:25"\n'),
     ['route[1].domain: "example.net" is already routed by route[0]']),
    ('[dns]\nnameservers = ["192.0.2.53", "ns1.test", "192.0.2.53:99999"]\n', [
        'dns.nameservers[1]: expected an IP address or IP:port, got "ns1.test"',
        'dns.nameservers[2]: port must be 1-65535, got "192.0.2.53:99999"',
    ]),
    ('[tls]\ncert = "/nonexistent/cert.pem"\n', ["tls.key: must be set when tls.cert is set"]),
    ('[tls]\ncert = "/x.pem"\nkey = "/x.key"\n',
     ["tls.cert: file not found: /x.pem", "tls.key: file not found: /x.key"]),
    ('[limits]\nmax_message_size = "2GiB"\n[spool]\nmap_size = "1GiB"\n',
     ["limits.max_message_size: 2147483648 bytes does not fit in spool.map_size (1073741824 bytes)"]),
    ("[server]\nhostname = \"a\"\nhostname = \"b\"\n",
     ["{file}: line 3, column 15: cannot overwrite a value"]),
    ("[server\n", ["{file}: line 1, column 8: expected ']' at the end of a table declaration"]),
    ('[log]\nlevel = "loud"\nformat = "xml"\n', [
        'log.format: must be one of "json", "console", got "xml"',
        'log.level: must be one of "debug", "info", "warning", "error", got "loud"',
    ]),
]


@pytest.mark.parametrize(("snippet", "expected"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_names_the_key(tmp_path: Path, snippet: str, expected: list[str]) -> None:
    path = write(tmp_path, snippet)
    assert problems_of(path) == [line.format(file=path) for line in expected]
    assert check_config(path) == [line.format(file=path) for line in expected]


def test_every_problem_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
hostnme = "typo"
hostname = "Mail Host"
[[listener]]
address = 25
[[listener]]
address = "127.0.0.1:8025"
role = "submissions"
max_connections = 0
[limits]
max_recipients = 0
idle_timeout = "never"
[inbound]
domains = ["example.test", "bad..domain"]
[dns]
nameservers = ["resolver"]
[spool]
map_size = "1KB"
""")
    assert problems_of(path) == [
        "server.hostnme: unknown key",
        "listener[0].address: expected a string, got 25",
        "listener[1].max_connections: must be >= 1, got 0",
        "limits.max_recipients: must be >= 1, got 0",
        'limits.idle_timeout: expected a duration such as "500ms", "30s", "5m", "2h", "5d", got "never"',
        'spool.map_size: must be >= 1MiB, got "1KB"',
        'server.hostname: not a valid domain name: "Mail Host"',
        'http.address: same address as listener[1].address ("127.0.0.1:8025")',
        'listener[1].role: "submissions" needs [tls] cert and key',
        'inbound.domains[1]: not a valid domain name: "bad..domain"',
        'dns.nameservers[0]: expected an IP address or IP:port, got "resolver"',
    ]


def test_broken_field_does_not_raise_false_alarms(tmp_path: Path) -> None:
    # listener[0].address is broken; its stand-in must not "clash" with listener[1], and the
    # broken map_size must not make max_message_size look too big.
    path = write(tmp_path, '[[listener]]\naddress = 1\n[[listener]]\naddress = "127.0.0.1:2525"\n'
                           '[spool]\nmap_size = "tiny"\n[[route]]\nnexthop = "a.test:25"\n')
    assert problems_of(path) == [
        "listener[0].address: expected a string, got 1",
        "route[0].domain: required key missing",
        'spool.map_size: expected a size in bytes or such as "512KB", "25MB", "8GiB", got "tiny"',
    ]


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert check_config(missing) == [f"{missing}: cannot read: no such file or directory"]
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'[server]\nhostname = "\xff"\n')
    assert check_config(binary) == [f"{binary}: line 2, column 13: not UTF-8 text"]


def test_config_error_text_lists_problems() -> None:
    with pytest.raises(ConfigError) as info:
        loads_config("[limits]\nmax_recipients = 0\nmax_bad_commands = 0\n", base_dir="/")
    assert str(info.value).splitlines() == info.value.problems
    assert len(info.value.problems) == 2


# --- what a good config turns into ---------------------------------------------------------

def test_normalises_names_and_resolves_paths(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    cfg = load_config(write(conf, """
[server]
hostname = "MX1.Example.TEST."
spool_dir = "../spool"
[inbound]
domains = ["Example.TEST.", "bücher.test", "example.test", "xn--bcher-kva.test"]
[[route]]
domain = "Relay.Example."
nexthop = "[smarthost.test]:587"
[[route]]
domain = "*"
nexthop = "[2001:db8::1]:25"
[log]
mail_log = "logs/mail.log"
"""))
    assert cfg.server.hostname == "mx1.example.test"
    assert cfg.server.spool_dir == str(tmp_path / "spool")
    assert cfg.inbound.domains == ["example.test", "xn--bcher-kva.test"]
    assert [r.domain for r in cfg.route] == ["relay.example", "*"]
    assert cfg.log.mail_log == str(conf / "logs" / "mail.log")
    assert cfg.tls.cert == "" and cfg.tls.key == ""


def test_absolute_paths_and_empty_mail_log_kept(tmp_path: Path) -> None:
    cfg = loads_config('[server]\nspool_dir = "/var/lib/mtad"\n', base_dir=tmp_path)
    assert cfg.server.spool_dir == "/var/lib/mtad"
    assert cfg.log.mail_log == ""


def test_defaults_and_types() -> None:
    cfg = loads_config('[limits]\nmax_message_size = "10MB"\nidle_timeout = 90\n', base_dir="/etc/mtad")
    assert isinstance(cfg, Config)
    assert cfg.limits.max_message_size == 10_000_000 and isinstance(cfg.limits.max_message_size, Size)
    assert cfg.limits.idle_timeout == 90 and isinstance(cfg.limits.idle_timeout, Duration)
    assert isinstance(cfg.server.shutdown_grace, Duration)
    assert cfg.server.spool_dir == "/etc/mtad/spool"
    assert cfg.listener == []


def test_sockets_that_may_coexist() -> None:
    cfg = loads_config("""
[[listener]]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:0"
[[listener]]
address = "[::1]:2525"
[[listener]]
address = "127.0.0.1:2525"
[[listener]]
address = "0.0.0.0:25"
[[listener]]
address = "[::]:25"
[http]
address = "localhost:0"
admin_address = "/run/mtad/admin.sock"
""", base_dir="/")
    assert len(cfg.listener) == 6


def test_endpoint_parsers() -> None:
    assert parse_hostport("[::1]:25") == HostPort("::1", 25)
    assert parse_hostport("[Relay.Test]:587") == HostPort("relay.test", 587)
    assert str(parse_hostport("[2001:DB8::1]:25")) == "[2001:db8::1]:25"
    assert parse_nameserver("::1") == HostPort("::1", 53)
    assert parse_nameserver("[::1]:5353") == HostPort("::1", 5353)
    assert parse_nameserver("127.0.0.1:5353") == HostPort("127.0.0.1", 5353)
    assert normalize_domain("Bücher.Test.") == "xn--bcher-kva.test"
    with pytest.raises(ValueError):
        normalize_domain("x" * 64 + ".test")
    with pytest.raises(ValueError):
        normalize_domain(".".join(["a" * 60] * 5))


# --- TLS files -----------------------------------------------------------------------------

def make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-subj", f"/CN={name}.test", "-days", "2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    directory = tmp_path_factory.mktemp("tls")
    return make_pair(directory, "one"), make_pair(directory, "two")


def test_tls_pair_accepted_with_relative_paths(tmp_path: Path, pairs) -> None:
    (cert, key), _ = pairs
    shutil.copy(cert, tmp_path / "cert.pem")
    shutil.copy(key, tmp_path / "key.pem")
    cfg = load_config(write(tmp_path, '[tls]\ncert = "cert.pem"\nkey = "key.pem"\n'
                                      '[[listener]]\nrole = "submission"\naddress = "127.0.0.1:0"\n'))
    assert cfg.tls.cert == str(tmp_path / "cert.pem")
    assert cfg.tls.key == str(tmp_path / "key.pem")


def test_tls_mismatched_or_not_pem(tmp_path: Path, pairs) -> None:
    (cert, _), (_, other_key) = pairs
    path = write(tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{other_key}"\n')
    [problem] = problems_of(path)
    assert problem.startswith("tls.key: cannot be used with tls.cert (")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    path = write(tmp_path, f'[tls]\ncert = "{junk}"\nkey = "{cert}"\n')
    assert problems_of(path) == [f"tls.cert: no PEM certificate in {junk}", f"tls.key: no PEM private key in {cert}"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_tls_unreadable(tmp_path: Path, pairs) -> None:
    (cert, key), _ = pairs
    locked = tmp_path / "locked.key"
    shutil.copy(key, locked)
    locked.chmod(0)
    assert problems_of(write(tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{locked}"\n')) == [
        f"tls.key: cannot read {locked}: permission denied"
    ]


# --- the shipped reference -----------------------------------------------------------------

_COMMENTED_SETTING = re.compile(r"^# (\[\[?[a-z_]+\]\]?|[a-z_]+ = .*)$")


def _uncommented(text: str) -> dict[str, typing.Any]:
    """The shipped file with its commented-out settings switched on."""
    lines = [m[1] if (m := _COMMENTED_SETTING.match(line)) else line for line in text.splitlines()]
    return tomllib.loads("\n".join(lines))


def _missing_fields(value: typing.Any, cls: type[msgspec.Struct], key: str) -> list[str]:
    missing = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in msgspec.structs.fields(cls):
        dotted = f"{key}.{field.name}" if key else field.name
        if field.name not in value:
            missing.append(dotted)
            continue
        hint = hints[field.name]
        if typing.get_origin(hint) is list:
            (hint,) = typing.get_args(hint)
        if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            tables = value[field.name] if isinstance(value[field.name], list) else [value[field.name]]
            # an array of tables counts as complete when its tables together name every field
            merged = {name: v for table in tables for name, v in table.items()}
            missing += _missing_fields(merged, hint, dotted)
    return missing


def test_shipped_config_loads_as_documented() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.server.hostname == "localhost"
    assert cfg.server.spool_dir == str(ROOT / "spool")
    assert [(li.role, li.address) for li in cfg.listener] == [
        ("mx", "127.0.0.1:2525"), ("submission", "127.0.0.1:5587"), ("submissions", "127.0.0.1:5465")]
    assert (cfg.http.address, cfg.http.admin_address) == ("127.0.0.1:8025", "127.0.0.1:8026")
    assert cfg.inbound.domains == ["localhost", "example.test"]
    assert cfg.tls.cert == cfg.tls.key == ""
    assert cfg.tls.self_signed  # the development certificate, made at start


def test_shipped_config_mentions_every_key() -> None:
    full = _uncommented(SHIPPED.read_text())
    assert _missing_fields(full, Config, "") == []
    # the commented-out examples are valid too; the submission listeners need a certificate
    roles = [table["role"] for table in full["listener"]]
    assert roles == ["mx", "submission", "submissions"]
    loads_config(_to_toml(full), base_dir=ROOT / "conf")
    full["tls"]["self_signed"] = False
    with pytest.raises(ConfigError) as info:
        loads_config(_to_toml(full), base_dir=ROOT / "conf")
    assert info.value.problems and all("needs [tls]" in p for p in info.value.problems), info.value.problems


def _to_toml(doc: dict[str, typing.Any]) -> str:
    """Back to TOML for the tables the shipped file uses (no TOML writer in the stdlib)."""
    import json

    out = []
    for name, value in doc.items():
        for table in value if isinstance(value, list) else [value]:
            out.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            out += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def test_shipped_values_equal_schema_defaults_where_not_dev_specific() -> None:
    # The file says "Default: ..." for every key; the values it sets must be those defaults
    # unless the brief asks for a dev-specific value.
    dev_specific = {"server.spool_dir", "inbound.domains", "tls.self_signed", "delivery.paused"}
    shipped = loads_config(SHIPPED.read_text(), base_dir=ROOT / "conf")
    default = loads_config("", base_dir=ROOT / "conf")
    for table in msgspec.structs.fields(Config):
        if table.name in ("listener", "route", "tls_policy"):
            continue
        ours, defaults = getattr(shipped, table.name), getattr(default, table.name)
        for field in msgspec.structs.fields(type(defaults)):
            key = f"{table.name}.{field.name}"
            if key not in dev_specific:
                assert getattr(ours, field.name) == getattr(defaults, field.name), key


def test_production_example_is_valid_apart_from_its_certificate() -> None:
    cfg = loads_config(EXAMPLE.read_text(), base_dir=EXAMPLE.parent)
    assert [li.address for li in cfg.listener] == ["0.0.0.0:25", "[::]:25", "0.0.0.0:587", "0.0.0.0:465"]
    assert cfg.server.spool_dir == "/var/lib/mtad"
    assert problems_of(EXAMPLE) == [
        "tls.cert: file not found: /etc/mtad/tls/fullchain.pem",
        "tls.key: file not found: /etc/mtad/tls/privkey.pem",
    ] or Path("/etc/mtad/tls/fullchain.pem").exists()


# --- mtad --check as a process -------------------------------------------------------------

def _daemon_has_main() -> bool:
    try:
        return hasattr(importlib.import_module("mtad.daemon"), "main")
    except ImportError:
        return False


@pytest.mark.skipif(not _daemon_has_main(), reason="mtad.daemon.main not importable yet")
def test_mtad_check_process(tmp_path: Path) -> None:
    bad = write(tmp_path, '[server]\nhostnme = "x"\n[[listener]]\naddress = "nonsense"\n', "bad.toml")
    run = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(bad), "--check"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout.splitlines() == [
        "server.hostnme: unknown key",
        'listener[0].address: expected host:port, got "nonsense"',
    ]
    good = subprocess.run([sys.executable, "-m", "mtad.daemon", "--config", str(SHIPPED), "--check"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr


def test_tls_file_problems_reported_with_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, '[limits]\nmax_recipients = 0\n[tls]\ncert = "c.pem"\nkey = "k.pem"\n')
    assert problems_of(path) == [
        "limits.max_recipients: must be >= 1, got 0",
        f"tls.cert: file not found: {tmp_path / 'c.pem'}",
        f"tls.key: file not found: {tmp_path / 'k.pem'}",
    ]
