"""Logging: the diagnostic log (structlog) and the mail log (one JSON line per event).

The two are separate streams with separate purposes. The diagnostic log says what mtad itself
is doing (listeners opened, reloads, errors with tracebacks) and goes to stdout, as JSON lines
or, with `--log-format console`, as text for humans. The mail log is the operator contract:
one line per Event, keyed by queue id, carrying what an operator greps for (client address,
sender, recipients, size, the reply). It goes to stdout beside the diagnostic lines (marked
`"log": "mail"`) or to the file named by `log.mail_log`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any, TextIO

import msgspec
import structlog

from mtad.events import Event

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the diagnostic log. Safe to call again (SIGHUP, tests)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_logger_name,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    # Libraries that use the stdlib logging module (aiosmtpd, aiohttp) get warnings only,
    # rendered through the same stream; their info chatter would drown the mail log.
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter('{"log":"lib","logger":"%(name)s","level":"%(levelname)s","event":%(message)r}'))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _add_logger_name(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    # Fixed leading keys, so a line reads "when, how bad, which log, what" before the details.
    ordered = {
        "timestamp": event_dict.pop("timestamp", None),
        "level": event_dict.pop("level", None),
        "log": event_dict.pop("log", "diag"),
        "event": event_dict.pop("event", None),
    }
    ordered.update(event_dict)
    return ordered


_encoder = msgspec.json.Encoder()


def _json_dumps(obj: Any, **_kw: Any) -> str:
    return _encoder.encode(obj).decode()


class MailLog:
    """Event subscriber writing one JSON line per event: the operator's mail log."""

    def __init__(self, stream: IO[str] | None = None, path: str = "") -> None:
        self._path = path
        self._own = bool(path)
        # A long-lived handle, closed in close() (and swapped in reopen()).
        self._stream: IO[str] = open(path, "a", buffering=1, encoding="utf-8") if path else (stream or sys.stdout)  # noqa: SIM115

    def __call__(self, event: Event) -> None:
        line = _encoder.encode(event)
        # {"log":"mail", ...event fields}: the marker first so `grep '"log":"mail"'` works.
        self._stream.write('{"log":"mail",' + line[1:].decode("utf-8", "replace") + "\n")
        if not self._own:
            self._stream.flush()

    def reopen(self) -> None:
        """After log rotation (SIGHUP): reopen the file by name."""
        if self._own:
            old = self._stream
            self._stream = open(self._path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            old.close()

    def close(self) -> None:
        if self._own:
            self._stream.close()
