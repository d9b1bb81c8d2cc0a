"""The schema of mtad.toml: msgspec Structs with their defaults and bounds.

Every setting mtad reads lives here, with its default. `conf/mtad.toml` is the commented
reference of this file; `mtad.config.load` decodes TOML into `Config` and reports every
problem by its dotted key. Durations are strings ("30s", "5m", "2h", "5d") decoded into
`Duration`; sizes are integers (bytes) or strings ("25MB", "512KiB") decoded into `Size`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class Duration(float):
    """Seconds, written in the config as "90s", "5m", "2h", "5d" (or a bare number of seconds)."""


class Size(int):
    """Bytes, written in the config as an integer or "512KB", "25MB", "8GiB"."""


Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]

Role = Literal["mx", "submission", "submissions"]


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Server(_Table):
    hostname: str = "localhost"
    """Banner, EHLO, Received and Message-ID domain, DSN reporting MTA."""
    spool_dir: str = "spool"
    """LMDB spool, SQLite state and the admin token. Relative paths are relative to the config file."""
    shutdown_grace: Duration = Duration(30)
    """How long SIGTERM waits for open SMTP sessions to finish before closing them."""


class Listener(_Table):
    role: Role = "mx"
    address: str = "127.0.0.1:2525"
    """host:port, [v6]:port. Port 0 picks a free port (tests)."""
    max_connections: Positive = 1000
    """Concurrent sessions on this listener; past it new connections get 421 4.3.2."""


class Limits(_Table):
    max_message_size: Size = Size(25 * 1024 * 1024)
    """Largest message accepted (SIZE advertised; 552 5.3.4 past it)."""
    max_recipients: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 100
    """Recipients per message; past it 452 4.5.3."""
    max_line_length: Annotated[int, msgspec.Meta(ge=78, le=1_000_000)] = 2048
    """Longest text line in DATA, CRLF included (RFC 5321 4.5.3.1.6 says 1000; real mail is sloppier)."""
    max_command_length: Annotated[int, msgspec.Meta(ge=512, le=65536)] = 2048
    """Longest command line, CRLF included (RFC 5321 4.5.3.1.4 says 512, extensions add more)."""
    max_bad_commands: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    """Errors in one session before the server answers 421 and closes it."""
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 50
    """Concurrent sessions from one client address, over all listeners; past it 421 4.7.0."""
    idle_timeout: Duration = Duration(300)
    """A session that sends nothing for this long is closed with 421 4.4.2 (RFC 5321 4.5.3.2.7)."""
    data_timeout: Duration = Duration(600)
    """Longest wait for the next chunk of message data during DATA."""
    max_received_headers: Annotated[int, msgspec.Meta(ge=5, le=1000)] = 100
    """Hop limit: a message with more Received headers is refused as a loop (554 5.4.6)."""
    bare_newline: Literal["normalize", "reject"] = "normalize"
    """A bare LF or bare CR in message data: rewrite it as CRLF, or refuse the message (550 5.6.0)."""


class Http(_Table):
    address: str = "127.0.0.1:8025"
    """Public API, tracking, /healthz and /metrics."""
    admin_address: str = "127.0.0.1:8026"
    """Control port for mtactl: host:port on loopback, or an absolute unix socket path."""


class Tls(_Table):
    cert: str = ""
    """PEM certificate chain; empty disables STARTTLS."""
    key: str = ""
    """PEM private key of cert."""


class Inbound(_Table):
    domains: list[str] = []
    """Domains whose mail the mx role accepts. Everything else is relay, refused 550 5.7.1."""


class Route(_Table):
    domain: str
    """Recipient domain, or "*" for every domain."""
    nexthop: str
    """host:port or [host]:port of the next hop (no MX lookup)."""


class Dns(_Table):
    nameservers: list[str] = []
    """ip or ip:port; empty uses the system resolver."""
    timeout: Duration = Duration(5)


class Delivery(_Table):
    max_queue_lifetime: Duration = Duration(5 * 86400)
    """Recipients still undelivered after this long expire and bounce."""


class Spool(_Table):
    map_size: Size = Size(8 * 1024**3)
    """LMDB map size: the most the spool may hold. When full, new mail gets 452 4.3.1."""
    commit_linger: Duration = Duration(0.002)
    """How long the writer waits for more writes to share one synced commit."""
    commit_max_batch: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 256
    """Most writes in one commit."""


class Log(_Table):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    mail_log: str = ""
    """Where the mail log (one line per event) goes: empty for stdout, or a file path."""


class Config(_Table):
    server: Server = msgspec.field(default_factory=Server)
    listener: list[Listener] = msgspec.field(default_factory=list)
    limits: Limits = msgspec.field(default_factory=Limits)
    http: Http = msgspec.field(default_factory=Http)
    tls: Tls = msgspec.field(default_factory=Tls)
    inbound: Inbound = msgspec.field(default_factory=Inbound)
    route: list[Route] = msgspec.field(default_factory=list)
    dns: Dns = msgspec.field(default_factory=Dns)
    delivery: Delivery = msgspec.field(default_factory=Delivery)
    spool: Spool = msgspec.field(default_factory=Spool)
    log: Log = msgspec.field(default_factory=Log)
