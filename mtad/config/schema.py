"""The schema of mtad.toml: msgspec Structs with their defaults and bounds.

Every setting mtad reads lives here, with its default. `conf/mtad.toml` is the commented
reference of this file; `mtad.config.load` decodes TOML into `Config` and reports every
problem by its dotted key. Durations are strings ("30s", "5m", "2h", "5d") decoded into
`Duration`; sizes are integers (bytes) or strings ("25MB", "512KiB") decoded into `Size`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

import msgspec

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class Duration(float):
    """Seconds, written in the config as "90s", "5m", "2h", "5d" (or a bare number of seconds)."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        """Decode a config value; ValueError (naming the accepted forms) when it is not one."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value) and value >= 0:
                return cls(value)
        elif isinstance(value, str):
            match = _DURATION.fullmatch(value.strip())
            if match:
                return cls(float(match[1]) * _DURATION_UNITS[match[2] or "s"])
        raise ValueError(f'expected a duration such as "500ms", "30s", "5m", "2h", "5d", got {show(value)}')


class Size(int):
    """Bytes, written in the config as an integer or "512KB", "25MB", "8GiB"."""

    @classmethod
    def parse(cls, value: object) -> Size:
        """Decode a config value (KB = 1000 bytes, KiB = 1024); ValueError when it is not one."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value >= 0:
                return cls(value)
        elif isinstance(value, str):
            match = _SIZE.fullmatch(value.strip())
            if match:
                return cls(round(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]))
        raise ValueError(f'expected a size in bytes or such as "512KB", "25MB", "8GiB", got {show(value)}')


class Within:
    """Bounds of a Duration or Size field (msgspec.Meta only bounds builtin types)."""

    def __init__(self, ge: float, le: float) -> None:
        self.ge = ge
        self.le = le


def show(value: object) -> str:
    """A config value as the operator wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


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
    shutdown_grace: Annotated[Duration, Within(0, 3600)] = Duration(30)
    """How long SIGTERM waits for open SMTP sessions to finish before closing them."""


class Listener(_Table):
    role: Role = "mx"
    """mx: inbound, no relay; submission: 587, STARTTLS + AUTH; submissions: 465, implicit TLS."""
    address: str = "127.0.0.1:2525"
    """host:port, [v6]:port. Port 0 picks a free port (tests)."""
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    """Concurrent sessions on this listener; past it new connections get 421 4.3.2."""


class Limits(_Table):
    max_message_size: Annotated[Size, Within(1024, 2**31)] = Size(25 * 1024 * 1024)
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
    idle_timeout: Annotated[Duration, Within(1, 86400)] = Duration(300)
    """A session that sends nothing for this long is closed with 421 4.4.2 (RFC 5321 4.5.3.2.7)."""
    data_timeout: Annotated[Duration, Within(1, 86400)] = Duration(600)
    """Longest wait for the next chunk of message data during DATA."""
    data_deadline: Annotated[Duration, Within(1, 86400)] = Duration(1800)
    """Longest a whole DATA transfer may take, however steadily it trickles in; past it 421 4.4.2."""
    max_junk_commands: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 100
    """HELO/EHLO, NOOP, RSET, VRFY, EXPN, HELP between accepted messages; past it each is an error."""
    max_received_headers: Annotated[int, msgspec.Meta(ge=5, le=1000)] = 100
    """Hop limit: a message with more Received headers is refused as a loop (554 5.4.6)."""
    bare_newline: Literal["normalize", "reject"] = "normalize"
    """A bare LF or bare CR in message data: rewrite it as CRLF, or refuse the message (550 5.6.0)."""
    auth_window: Annotated[Duration, Within(1, 86400)] = Duration(300)
    """Failed SMTP AUTH attempts are counted, per client address and per username, over this window."""
    auth_delay_after: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 5
    """Failures in the window after which every further attempt waits auth_tarpit before its answer."""
    auth_lock_after: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 10
    """Failures in the window after which the client or username is refused (454 4.7.0) for auth_lockout."""
    auth_tarpit: Annotated[Duration, Within(0, 60)] = Duration(2)
    """The wait imposed on each attempt past auth_delay_after (the session waits; others run on)."""
    auth_lockout: Annotated[Duration, Within(1, 7 * 86400)] = Duration(900)
    """How long a locked client address or username is refused, even with the right password."""
    auth_tracked: Annotated[int, msgspec.Meta(ge=100, le=10_000_000)] = 100_000
    """Client addresses and usernames whose failures are remembered (each; least recent dropped first)."""


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
    self_signed: bool = False
    """Development only: with cert and key empty, mtad makes a self-signed certificate for
    server.hostname in <spool_dir>/tls/ on first start and uses it. Never in production."""


class Inbound(_Table):
    domains: list[str] = []
    """Domains whose mail the mx role accepts. Everything else is relay, refused 550 5.7.1."""


class Route(_Table):
    domain: str
    """Recipient domain, or "*" for every domain."""
    nexthop: str
    """host:port or [host]:port of the next hop (no MX lookup)."""


OutboundTlsMode = Literal["none", "opportunistic", "require", "verify"]


class TlsPolicy(_Table):
    domain: str
    """Recipient domain, or "*" for every domain without a policy of its own (and without an
    MTA-STS policy in enforce mode)."""
    mode: OutboundTlsMode
    """none: never STARTTLS; opportunistic: STARTTLS when offered, plaintext when it fails;
    require: STARTTLS must succeed (any certificate); verify: and the certificate must chain to a
    trusted CA (delivery.tls_ca_file, or the system's) and name the next hop (RFC 6125)."""


class MtaSts(_Table):
    enabled: bool = True
    """Look up and apply MTA-STS policies (RFC 8461) for MX deliveries to domains without a
    [[tls_policy]] of their own."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 443
    """HTTPS port of mta-sts.<domain>. Only tests and private setups change it."""
    ca_file: str = ""
    """PEM file of CAs trusted for the policy servers instead of the system's (tests, private CAs)."""
    timeout: Annotated[Duration, Within(1, 300)] = Duration(10)
    """Longest a policy fetch (connect, TLS, the whole response) may take."""


class Dns(_Table):
    nameservers: list[str] = []
    """ip or ip:port; empty uses the system resolver."""
    timeout: Annotated[Duration, Within(0.01, 300)] = Duration(5)
    """Per DNS query, before trying the next nameserver."""


class Delivery(_Table):
    max_queue_lifetime: Annotated[Duration, Within(60, 90 * 86400)] = Duration(5 * 86400)
    """Recipients still undelivered after this long expire and bounce."""
    paused: bool = False
    """Receive and queue, but start no delivery (maintenance, a receive-only node). SIGHUP applies
    a change; attempts already running finish."""
    helo_name: str = ""
    """Name we give in EHLO/HELO to other servers; empty: server.hostname."""
    mx_port: Port = 25
    """TCP port of next hops found through MX (or implicit MX) records. Only tests and
    unusual private setups change it; static [[route]] next hops name their own port."""
    source_address: str = ""
    """Local IPv4 address outbound connections come from; empty: the kernel chooses."""
    source_address6: str = ""
    """Local IPv6 address outbound connections come from; empty: the kernel chooses."""
    min_backoff: Annotated[Duration, Within(1, 86400)] = Duration(300)
    """First retry delay after a temporary failure; it doubles per attempt (with jitter)."""
    max_backoff: Annotated[Duration, Within(1, 7 * 86400)] = Duration(4 * 3600)
    """Longest delay between two attempts."""
    delay_warning: Annotated[Duration, Within(0, 90 * 86400)] = Duration(0)
    """Send the sender one "delayed" DSN once a recipient has waited this long; 0 disables."""
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    """Outbound SMTP connections open at once, over all destinations."""
    initial_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    """Connections a destination starts with; the window grows on success, shrinks on failure."""
    destination_concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    """Most connections to one destination at once (the largest window)."""
    max_recipients_per_transaction: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    """Recipients of one message sent in one SMTP transaction (RFC 5321 4.5.3.1.8: servers take 100)."""
    max_messages_per_connection: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    """Transactions over one connection before it is closed and a new one opened."""
    connection_idle_timeout: Annotated[Duration, Within(0, 3600)] = Duration(5)
    """How long an idle outbound connection is kept for reuse; 0 closes it after each message."""
    suspend_after: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 5
    """Consecutive failed connections to a destination, with no success, before it counts as
    dead: its queue is suspended and its mail deferred until suspend_time has passed."""
    suspend_time: Annotated[Duration, Within(1, 86400)] = Duration(300)
    """How long a dead destination rests before the next try (`mtactl queue flush` ends it early)."""
    active_limit: Annotated[int, msgspec.Meta(ge=10, le=1_000_000)] = 20000
    """Messages the scheduler holds in memory (due now, waiting for a connection); the rest stay
    in the spool's due index until there is room."""
    connect_timeout: Annotated[Duration, Within(0.1, 3600)] = Duration(30)
    """TCP connect to one address of a next hop."""
    greeting_timeout: Annotated[Duration, Within(0.1, 3600)] = Duration(300)
    """The server's 220 banner (RFC 5321 4.5.3.2.1: 5 minutes)."""
    command_timeout: Annotated[Duration, Within(0.1, 3600)] = Duration(300)
    """Each reply to EHLO, STARTTLS, MAIL, RCPT, RSET (RFC 5321 4.5.3.2.2-3: 5 minutes)."""
    data_timeout: Annotated[Duration, Within(0.1, 3600)] = Duration(120)
    """The 354 reply to DATA (RFC 5321 4.5.3.2.4: 2 minutes)."""
    data_block_timeout: Annotated[Duration, Within(0.1, 3600)] = Duration(180)
    """Each block of message data written (RFC 5321 4.5.3.2.5: 3 minutes)."""
    final_timeout: Annotated[Duration, Within(0.1, 3600)] = Duration(600)
    """The reply to the final dot (RFC 5321 4.5.3.2.6: 10 minutes)."""
    tls_ca_file: str = ""
    """PEM file of CAs trusted by outbound TLS in verify mode (and MTA-STS enforce) instead of the
    system's: a private CA, tests."""


class Spool(_Table):
    map_size: Annotated[Size, Within(2**20, 2**50)] = Size(8 * 1024**3)
    """LMDB map size: the most the spool may hold. When full, new mail gets 452 4.3.1."""
    commit_linger: Annotated[Duration, Within(0, 1)] = Duration(0.002)
    """Upper bound on how long the writer waits for more writes to share one synced commit: it
    commits at once when nothing else is waiting, and lingers only while the previous commit
    showed several writers at work."""
    commit_max_batch: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 256
    """Most writes in one commit."""


class Log(_Table):
    format: Literal["json", "console"] = "json"
    """json: one JSON object per line (for the journal and log shippers); console: for humans."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe record written to the process log."""
    mail_log: str = ""
    """Where the mail log (one line per event) goes: empty for stdout, or a file path."""


DkimSource = Literal["mx", "submission", "submissions", "http", "dsn"]


class Dkim(_Table):
    key_dir: str = ""
    """Signing keys, <key_dir>/<domain>/<selector>.key; "" is <spool_dir>/dkim. Relative paths
    are relative to the config file."""
    sign: list[DkimSource] = msgspec.field(default_factory=lambda: ["submission", "submissions", "http", "dsn"])
    """Where the mail that gets signed came in: listener roles, "http" (the API), "dsn" (our
    bounces). Mail taken on mx is inbound, for our own domains: leave "mx" out in production."""
    headers: list[str] = msgspec.field(default_factory=lambda: [
        "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References",
        "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "List-Unsubscribe",
        "List-Unsubscribe-Post", "List-Id", "Feedback-ID", "Sender",
    ])
    """Header fields signed when present (From must be one)."""
    oversign: list[str] = msgspec.field(default_factory=lambda: ["From", "To", "Subject"])
    """Fields signed once more than present, so that none can be added (RFC 6376 8.15)."""


class Bounces(_Table):
    domain: str = ""
    """Bounce domain of the VERP return path (bounces+<token>@domain) given to tenants' mail;
    the mx listener takes mail for it, for valid tokens only. Empty: VERP off."""
    secret: Annotated[str, msgspec.Meta(pattern=r"^(|.{16,})$")] = ""
    """HMAC key signing the tokens (16 characters or more); empty: 32 random bytes made once
    and kept (0600) in <spool_dir>/verp.key."""
    keep_sent: Annotated[Duration, Within(86400, 365 * 86400)] = Duration(30 * 86400)
    """How long a sent message's tenant, Message-ID and recipients are kept for bounce attribution."""


class Suppression(_Table):
    hard_bounce: bool = True
    """Suppress a recipient after one hard bounce (user unknown, no such domain, moved)."""
    soft_bounces: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3
    """Suppress a recipient after this many soft bounces within soft_window; 0 disables."""
    soft_window: Annotated[Duration, Within(60, 365 * 86400)] = Duration(7 * 86400)
    """The window soft bounces are counted over."""
    complaint: bool = True
    """Suppress a recipient who complained (ARF feedback report)."""
    default_expiry: Annotated[Duration, Within(0, 10 * 365 * 86400)] = Duration(0)
    """How long a suppression lasts when none is given; 0: forever."""


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
    dkim: Dkim = msgspec.field(default_factory=Dkim)
    bounces: Bounces = msgspec.field(default_factory=Bounces)
    suppression: Suppression = msgspec.field(default_factory=Suppression)
    tls_policy: list[TlsPolicy] = msgspec.field(default_factory=list)
    mta_sts: MtaSts = msgspec.field(default_factory=MtaSts)
