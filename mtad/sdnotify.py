"""Tell systemd how the daemon is doing: the sd_notify protocol, without libsystemd.

With `Type=notify`, systemd passes an AF_UNIX datagram socket in $NOTIFY_SOCKET (a path, or
an abstract name written with a leading "@") and waits for "READY=1" before it counts the
service as started. mtad sends READY=1 once every listener is open, STOPPING=1 when SIGTERM
starts the ordered shutdown, and RELOADING=1 / READY=1 around a SIGHUP reload. Without
$NOTIFY_SOCKET (a terminal, a test, another supervisor) every call is a no-op.

Trust: $NOTIFY_SOCKET comes from our supervisor; we only ever send to it.
Spec: sd_notify(3) and the "Notify socket" section of systemd's service protocol.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

# A datagram to the notify socket normally goes out at once; never hold the event loop
# longer than this if systemd is slow to drain its queue.
SEND_TIMEOUT = 1.0


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send newline-separated KEY=VALUE assignments; True when the datagram was sent.

    False without $NOTIFY_SOCKET or when the socket cannot be reached: losing a status
    update must never take the daemon down.
    """
    address = _address((os.environ if environ is None else environ).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def _address(value: str) -> str | None:
    """The connect() address of $NOTIFY_SOCKET: a path, or "@name" for the abstract namespace."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a form we do not speak (e.g. vsock:): behave as if unset


def ready(status: str = "") -> bool:
    """Every listener is open: systemd may start what depends on us."""
    return notify(_with_status("READY=1", status))


def stopping(status: str = "") -> bool:
    """Ordered shutdown has begun (SIGTERM)."""
    return notify(_with_status("STOPPING=1", status))


def reloading(status: str = "") -> bool:
    """A reload (SIGHUP) has begun; send ready() when it is done."""
    # MONOTONIC_USEC lets systemd (253+) match this reload with the READY=1 that ends it.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(_with_status(f"RELOADING=1\nMONOTONIC_USEC={usec}", status))


def status(text: str) -> bool:
    """A one-line status that `systemctl status mtad` shows."""
    return notify(_with_status("", text))


def _with_status(state: str, text: str) -> str:
    line = " ".join(text.split())  # one line: a newline would start a new assignment
    if not line:
        return state
    return f"{state}\nSTATUS={line}" if state else f"STATUS={line}"
