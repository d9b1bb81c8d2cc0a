"""Parse the network names in mtad.toml: host:port endpoints, nameservers, domain names.

Pure functions on strings: each returns the normalised value or raises ValueError whose text
completes "<dotted key>: ...". The daemon, the DNS adapter and the delivery side call these
same functions on the validated Config, so a value that passed `--check` parses the same way
at run time.

Trust: config text is the operator's, but it is checked as if it were hostile (no value
reaches a socket call unchecked).
RFCs: RFC 1035 2.3.1 and RFC 1123 2.1 (host name syntax), RFC 5890-5891 (IDNA 2008 A-labels,
via mtad.address), RFC 3986 3.2.2 ([v6] literals).
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

from mtad import address
from mtad.config.schema import show

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"\d{1,5}")
# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
UNIX_PATH_MAX = 107


class HostPort(NamedTuple):
    """A parsed endpoint: host is an IP address (compressed form) or a lowercase A-label name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def normalize_domain(text: str) -> str:
    """A domain name in its lookup form: lowercase, IDNA A-labels, no trailing dot.

    The same normalisation the SMTP receiver applies (mtad.address), so a domain configured
    here compares equal to the one a client sends.
    """
    name = text.strip()
    if is_ip(name.removesuffix(".")):
        raise ValueError(f"expected a domain name, got the IP address {show(text)}")
    try:
        return address.normalize_domain(name, smtputf8=True)
    except address.AddressError:
        raise ValueError(f"not a valid domain name: {show(text)}") from None


def _host(text: str, original: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return normalize_domain(text)
    except ValueError:
        raise ValueError(f"not a valid host name or IP address in {show(original)}") from None


def parse_hostport(text: str, *, allow_port_zero: bool = True) -> HostPort:
    """host:port, [v6]:port or [name]:port; port 0 (pick a free port) only where allowed."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"expected host:port or [host]:port, got {show(text)}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {show(text)}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in [::1]:25, got {show(text)}")
    return HostPort(_host(host, text), _port(port, text, allow_port_zero))


def _port(port: str, original: str, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not _PORT.fullmatch(port) or not low <= int(port) <= 65535:
        raise ValueError(f"port must be {low}-65535, got {show(original)}")
    return int(port)


def parse_nameserver(text: str) -> HostPort:
    """ip, ip:port, bare v6 or [v6]:port; the port defaults to 53."""
    try:
        return HostPort(str(ipaddress.ip_address(text)), 53)
    except ValueError:
        pass
    message = f"expected an IP address or IP:port, got {show(text)}"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not is_ip(host):
        raise ValueError(message)
    return HostPort(str(ipaddress.ip_address(host)), _port(port, text, allow_zero=False))


def is_unix_path(text: str) -> bool:
    """True when an address is meant as a unix socket path rather than host:port."""
    return "/" in text


def check_unix_path(text: str) -> str:
    """An absolute unix socket path that fits in sockaddr_un."""
    if not text.startswith("/"):
        raise ValueError(f"a unix socket path must be absolute, got {show(text)}")
    if len(text.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"unix socket path longer than {UNIX_PATH_MAX} bytes: {show(text)}")
    return text
