"""A small authoritative DNS server on loopback for tests and benchmarks (UDP and TCP).

It answers from a plain dict that a test may change while the server runs, so that
aiodns/c-ares do real lookups over real sockets against known answers:

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"], "TTL": 60},
        "nullmx.test": {"MX": [(0, ".")]},             # RFC 7505 null MX
        "alias.test": {"CNAME": "mx1.example.test"},   # followed within the zone
        "broken.test": {"RCODE": "SERVFAIL"},          # or "REFUSED", or "DROP" (never answers)
        "half.test": {"A": ["127.0.0.2"], "AAAA": "DROP"},  # a mode for one type only
    }
    with DnsServer(zone) as server:
        server.address           # "127.0.0.1:40123", as [dns].nameservers takes it
        server.count("example.test", "MX")

A name missing from the zone is NXDOMAIN; a name present without the asked type is NODATA
(NOERROR, no answer). Negative answers carry an SOA in the authority section, as real servers
send (`server.soa = False` leaves it out). TTL is per name (default 300). The server runs in a thread of its own, so it serves
sync and async tests alike; `queries` counts every query received per (name, type).

Standalone, for benchmarks: `python3 tests/dnsserver.py --port 0 --wildcard-mx-to 127.0.0.1`
prints the port and answers until SIGINT/SIGTERM: every name's MX is one host that resolves
to the given address (and every name's A or AAAA is that address).

RFCs: 1035 4.1 (message format), 1035 4.2.2 (TCP length prefix), 2308 (negative answers
with SOA), 3596 (AAAA), 7505 (null MX).
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import selectors
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any, Self

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}
TYPE_NAMES = {code: name for name, code in TYPES.items()}
RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}
WILDCARD_HOST = "mx.wildcard.test"
NEGATIVE_TTL = 60

Zone = dict[str, dict[str, Any]]


class Query:
    """The parts of a DNS query the server needs."""

    def __init__(self, ident: int, flags: int, name: str, qtype: int, question: bytes) -> None:
        self.ident = ident
        self.flags = flags
        self.name = name
        self.qtype = qtype
        self.question = question


def parse_query(data: bytes) -> Query | None:
    """The first question of a query message; None when it cannot be read."""
    if len(data) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", data[:6])
    if flags & 0x8000 or qdcount < 1:
        return None
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(data):
            return None
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63 or pos + 1 + length > len(data):
            return None
        labels.append(data[pos + 1:pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    if pos + 4 > len(data):
        return None
    qtype = struct.unpack("!H", data[pos:pos + 2])[0]
    return Query(ident, flags, ".".join(labels).lower(), qtype, data[12:pos + 4])


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\x00"


def _rr(owner: bytes, qtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", qtype, 1, ttl, len(rdata)) + rdata


def _rdata(qtype: int, value: Any) -> bytes:
    if qtype == TYPES["A"]:
        return ipaddress.IPv4Address(value).packed
    if qtype == TYPES["AAAA"]:
        return ipaddress.IPv6Address(value).packed
    if qtype == TYPES["MX"]:
        preference, host = value
        return struct.pack("!H", int(preference)) + encode_name(str(host))
    if qtype == TYPES["CNAME"]:
        return encode_name(str(value))
    if qtype == TYPES["TXT"]:
        # One TXT record; text over 255 octets goes out as several character-strings
        # (RFC 1035 3.3.14), as a DKIM RSA key record must (RFC 6376 3.6.2.2).
        raw = str(value).encode()
        return b"".join(bytes([len(raw[i:i + 255])]) + raw[i:i + 255] for i in range(0, max(len(raw), 1), 255))
    raise ValueError(f"unsupported type {qtype}")


def _soa(name: str) -> bytes:
    rdata = encode_name(f"ns.{name}") + encode_name(f"hostmaster.{name}") + struct.pack(
        "!IIIII", 1, 3600, 600, 86400, NEGATIVE_TTL)
    return _rr(encode_name(name), TYPES["SOA"], NEGATIVE_TTL, rdata)


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a listening TCP socket on one port (port 0: a free one, found by trying:
    a port free for UDP may be some client's TCP port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50 if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(64)
        except OSError:
            udp.close()
            tcp.close()
            if port:
                raise
            continue
        return udp, tcp
    raise OSError(f"no port free for both UDP and TCP on {host}")


class DnsServer:
    """An authoritative server on `host`, UDP and TCP on one port, in a daemon thread."""

    def __init__(self, zone: Zone | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 wildcard_to: str | None = None) -> None:
        self.zone: Zone = zone if zone is not None else {}
        self.wildcard_to = wildcard_to
        self.soa = True
        """Negative answers carry an SOA (RFC 2308); False leaves it out, so that resolvers do
        not cache them (c-ares caches negative answers only with one)."""
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._udp, self._tcp = _bind_pair(host, port)
        bound_port = self._udp.getsockname()[1]
        self.host = host
        self.port = bound_port
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"dnsserver:{bound_port}", daemon=True)

    @property
    def address(self) -> str:
        """The server as a [dns].nameservers entry: "127.0.0.1:port" or "[::1]:port"."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def count(self, name: str, qtype: str | None = None) -> int:
        """Queries received for a name (of one type, or of every type)."""
        name = name.lower().rstrip(".")
        with self._lock:
            return sum(n for (qname, t), n in self.queries.items() if qname == name and qtype in (None, t))

    def reset_counts(self) -> None:
        with self._lock:
            self.queries.clear()

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop_w.send(b"x")
            self._thread.join(5)
        for sock in (self._udp, self._tcp, self._stop_r, self._stop_w):
            sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answering --------------------------------------------------------------------------

    def answer(self, data: bytes, *, max_size: int = 65535) -> bytes | None:
        """The response to one query message; None to stay silent (drop mode, garbage).

        A response longer than max_size (512 over UDP, RFC 1035 4.2.1) is cut to its question
        with TC set, and the client retries over TCP."""
        query = parse_query(data)
        if query is None:
            return None
        type_name = TYPE_NAMES.get(query.qtype, str(query.qtype))
        with self._lock:
            self.queries[(query.name, type_name)] += 1
        rcode, answers, authority = self._lookup(query.name, query.qtype)
        if rcode is None:
            return None
        flags = 0x8400 | (query.flags & 0x0100) | RCODES[rcode]  # QR, AA, RD copied
        header = struct.pack("!HHHHHH", query.ident, flags, 1, len(answers), len(authority), 0)
        reply = header + query.question + b"".join(answers) + b"".join(authority)
        if len(reply) > max_size:
            reply = struct.pack("!HHHHHH", query.ident, flags | 0x0200, 1, 0, 0, 0) + query.question
        return reply

    def _entry(self, name: str) -> dict[str, Any] | None:
        entry = self.zone.get(name)
        if entry is None and self.wildcard_to is not None:
            family = "AAAA" if ":" in self.wildcard_to else "A"
            entry = {family: [self.wildcard_to]}
            if name != WILDCARD_HOST:
                entry["MX"] = [(10, WILDCARD_HOST)]
        return entry

    def _lookup(self, name: str, qtype: int) -> tuple[str | None, list[bytes], list[bytes]]:
        answers: list[bytes] = []
        owner = b"\xc0\x0c"  # a pointer to the question's name
        for _ in range(8):  # CNAME chain limit
            entry = self._entry(name)
            if entry is None:
                # RFC 6604: after a CNAME the rcode speaks of the last name in the chain.
                return "NXDOMAIN", answers, self._negative(name)
            mode = entry.get("RCODE")
            if mode is None:
                mode = entry.get(TYPE_NAMES.get(qtype, ""))
                mode = mode if isinstance(mode, str) and qtype != TYPES["CNAME"] else None
            if mode == "DROP":
                return None, [], []
            if mode is not None:
                return str(mode), [], []
            ttl = int(entry.get("TTL", 300))
            cname = entry.get("CNAME")
            if cname and qtype != TYPES["CNAME"]:
                answers.append(_rr(owner, TYPES["CNAME"], ttl, _rdata(TYPES["CNAME"], cname)))
                name = str(cname).lower().rstrip(".")
                owner = encode_name(name)
                continue
            values = entry.get(TYPE_NAMES.get(qtype, ""), [])
            if qtype == TYPES["CNAME"] and cname:
                values = [cname]
            for value in values:
                answers.append(_rr(owner, qtype, ttl, _rdata(qtype, value)))
            return "NOERROR", answers, ([] if answers else self._negative(name))
        return "SERVFAIL", [], []

    def _negative(self, name: str) -> list[bytes]:
        return [_soa(name)] if self.soa else []

    # -- the socket loop ---------------------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "accept")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if key.data == "stop":
                        return
                    if key.data == "udp":
                        self._serve_udp()
                    elif key.data == "accept":
                        conn, _ = self._tcp.accept()
                        conn.setblocking(False)
                        buffers[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ, "tcp")
                    elif not self._serve_tcp(sock, buffers[sock]):
                        sel.unregister(sock)
                        del buffers[sock]
                        sock.close()
        finally:
            for conn in buffers:
                conn.close()
            sel.close()

    def _serve_udp(self) -> None:
        try:
            data, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self.answer(data, max_size=512)
        if reply is not None:
            self._udp.sendto(reply, peer)

    def _serve_tcp(self, conn: socket.socket, buffer: bytearray) -> bool:
        try:
            chunk = conn.recv(65535)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not chunk:
            return False
        buffer += chunk
        while len(buffer) >= 2:
            length = struct.unpack("!H", buffer[:2])[0]
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            reply = self.answer(message)
            if reply is not None:
                try:
                    conn.setblocking(True)
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                    conn.setblocking(False)
                except OSError:
                    return False
        return True


def _records(pairs: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    return {key.upper(): value for key, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A small authoritative DNS server for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--wildcard-mx-to", metavar="IP",
                        help=f"every name's MX is {WILDCARD_HOST}, and every name resolves to IP")
    parser.add_argument("--zone", metavar="FILE", help='a JSON zone: {"name": {"MX": [[10, "host"]], "A": [...]}}')
    args = parser.parse_args(argv)
    zone: Zone = {}
    if args.zone:
        with open(args.zone, encoding="utf-8") as f:
            raw = json.load(f)
        zone = {name.lower().rstrip("."): _records(iter(entry.items())) for name, entry in raw.items()}
    if args.wildcard_mx_to:
        ipaddress.ip_address(args.wildcard_mx_to)
    server = DnsServer(zone, host=args.host, port=args.port, wildcard_to=args.wildcard_mx_to)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with server:
        print(server.port, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
