"""`GET /metrics`: the Prometheus text exposition of what mtad counts.

Pure rendering (`render`) of a snapshot the daemon takes on each scrape: event counters since
start (the same ones `mtactl stats` reads), the queue, the spool's group commits, and the
delivery side's connections and destinations. No authentication (CONTRACT.md): bind
`http.address` where only your scraper reaches, or put a proxy in front of it.
Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (text 0.0.4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from mtad.events import EVENT_TYPES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Snapshot(msgspec.Struct, kw_only=True):
    events: Mapping[str, int]
    queued_messages: int
    uptime: float
    spool_commits: int = 0
    spool_writes: int = 0
    delivery_connections: int = 0
    active_messages: int = 0
    destinations: int = 0
    suspended_destinations: int = 0


Source = Callable[[], Snapshot]


def render(snap: Snapshot) -> str:
    """The exposition text of one snapshot: HELP and TYPE lines, then the samples."""
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    metric("mtad_events_total", "counter", "Mail events since start, by type (the mail log's vocabulary).",
           [(f'{{type="{kind}"}}', snap.events.get(kind, 0)) for kind in EVENT_TYPES])
    metric("mtad_queue_messages", "gauge", "Messages in the spool now.", [("", snap.queued_messages)])
    metric("mtad_spool_commits_total", "counter", "Synced group commits of the spool since start.",
           [("", snap.spool_commits)])
    metric("mtad_spool_writes_total", "counter", "Spool writes made durable since start.", [("", snap.spool_writes)])
    metric("mtad_delivery_connections", "gauge", "Outbound SMTP attempts (connections) running now.",
           [("", snap.delivery_connections)])
    metric("mtad_delivery_active_messages", "gauge", "Messages the scheduler holds in memory now.",
           [("", snap.active_messages)])
    metric("mtad_delivery_destinations", "gauge", "Destination queues the scheduler knows, and how many rest.",
           [("", snap.destinations), ('{state="suspended"}', snap.suspended_destinations)])
    metric("mtad_uptime_seconds", "gauge", "Seconds since mtad started.", [("", snap.uptime)])
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"
