"""The benchmark's figures: samples, per-cell medians and ratios, the printed table and summary.

Pure: values in, text and dicts out. A cell is one (message size, sessions) job run against
both mtad and Postfix --runs times; its figure is the median of the runs for each side, and the
ratio is mtad's median over Postfix's.

Trust: none.
RFCs: none.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from smtp_source import Job, LoadResult

# Targets from issue 2 ("Targets"): ingest ratio at 1 KB for these session counts, RSS, start-up.
TARGET_RATIO = 2.0
TARGET_RATIO_SESSIONS = (20, 100)
TARGET_RSS_MB = 300
TARGET_STARTUP_S = 5.0


@dataclass(frozen=True)
class Sample:
    """One run of one job against one target."""

    target: str
    """"mtad" or "postfix"."""
    load: LoadResult
    cpu_seconds: float | None
    """CPU time of the mtad process during the run (None for Postfix: many short processes)."""
    busy_seconds: float
    """CPU time every core spent busy during the run, smtp-source included."""

    def cpu_ms_per_msg(self) -> float | None:
        if self.cpu_seconds is None or not self.load.messages:
            return None
        return 1000 * self.cpu_seconds / self.load.messages

    def busy_ms_per_msg(self) -> float | None:
        return 1000 * self.busy_seconds / self.load.messages if self.load.messages else None

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "messages": self.load.messages,
                "seconds": round(self.load.seconds, 4), "msgs_per_s": round(self.load.rate, 1),
                "capped": self.load.capped, "errors": self.load.errors[:20],
                "error_count": len(self.load.errors),
                "cpu_seconds": self.cpu_seconds, "busy_seconds": round(self.busy_seconds, 3)}


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Cell:
    job: Job
    samples: list[Sample] = field(default_factory=list)

    def of(self, target: str) -> list[Sample]:
        return [s for s in self.samples if s.target == target]

    def rate(self, target: str) -> float | None:
        return median_or_none([s.load.rate for s in self.of(target)])

    def ratio(self) -> float | None:
        mtad, postfix = self.rate("mtad"), self.rate("postfix")
        return mtad / postfix if mtad is not None and postfix else None

    def cpu_ms(self) -> float | None:
        return median_or_none([s.cpu_ms_per_msg() for s in self.of("mtad")])

    def busy_ms(self, target: str) -> float | None:
        return median_or_none([s.busy_ms_per_msg() for s in self.of(target)])

    def flags(self) -> str:
        capped = sum(s.load.capped for s in self.samples)
        errors = sum(len(s.load.errors) for s in self.samples)
        out = []
        if capped:
            out.append(f"{capped} run(s) hit the cap")
        if errors:
            out.append(f"{errors} smtp-source error line(s)")
        return "; ".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.job.size, "sessions": self.job.sessions,
                "messages": self.job.messages, "reuse": self.job.reuse,
                "mtad_msgs_per_s": self.rate("mtad"), "postfix_msgs_per_s": self.rate("postfix"),
                "ratio": self.ratio(), "mtad_cpu_ms_per_msg": self.cpu_ms(),
                "busy_ms_per_msg": {"mtad": self.busy_ms("mtad"),
                                    "postfix": self.busy_ms("postfix")},
                "samples": [s.as_dict() for s in self.samples]}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


HEADER = (f"{'size':>6} {'sess':>4} | {'mtad msg/s':>10} | {'postfix msg/s':>13} | {'ratio':>6} |"
          f" {'mtad CPU':>8} | {'busy ms/msg':>13} | notes")
SUBHEADER = (f"{'':>11} | {'':>10} | {'':>13} | {'':>6} | {'ms/msg':>8} |"
             f" {'mtad/postfix':>13} |")


def format_table(cells: list[Cell], header: bool = True) -> str:
    lines = [HEADER, SUBHEADER, "-" * len(HEADER)] if header else []
    for c in cells:
        ratio = c.ratio()
        busy = f"{_num(c.busy_ms('mtad'), '.2f')}/{_num(c.busy_ms('postfix'), '.2f')}"
        size = f"{c.job.size // 1024} KB" if c.job.size >= 1024 else f"{c.job.size} B"
        lines.append(f"{size:>6} {c.job.sessions:>4} | {_num(c.rate('mtad'), ',.0f'):>10} |"
                     f" {_num(c.rate('postfix'), ',.0f'):>13} |"
                     f" {_num(ratio, '.2f') + 'x' if ratio else '-':>6} |"
                     f" {_num(c.cpu_ms(), '.3f'):>8} | {busy:>13} | {c.flags()}")
    return "\n".join(lines)


def environment_lines(env: dict[str, Any]) -> list[str]:
    return [
        (f"mtad ingest benchmark  {env['when']}  host {env['host']} ({env['cpus']} CPUs, "
         f"kernel {env['kernel']}, Python {env['python']}, mtad {env['mtad_git'] or '?'})"),
        f"peer: {env['postfix'] or 'none (--no-postfix)'}",
        "mtad: accept and queue in the LMDB spool (group commit, synced before 250)",
        (f"load: smtp-source, {env['connections']}; median of {env['runs']} run(s); "
         f"cap {env['cap_s']:.0f}s per run; mtad CPU from /proc/PID/stat; busy = all cores"),
        "",
    ]


def _target(ok: bool | None) -> str:
    return "" if ok is None else ("  (target met)" if ok else "  (target MISSED)")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The closing summary: medians again, then memory and start-up, each against its target."""
    lines: list[str] = []
    cells = result.get("cells", [])
    for cell in cells:
        if cell["size"] <= 1024 and cell["sessions"] in TARGET_RATIO_SESSIONS:
            ratio = cell["ratio"]
            if ratio is None:
                continue
            ok = ratio >= TARGET_RATIO
            lines.append(f"ingest ratio, 1 KB, {cell['sessions']} sessions: "
                         f"{_num(ratio, '.2f')}x{_target(ok)} (target >= {TARGET_RATIO}x)")
    mb = 1024.0
    if "mtad_startup_empty_s" in result:
        lines.append(f"mtad start-up, empty spool: {result['mtad_startup_empty_s']:.2f} s")
    if "mtad_peak_rss_kb" in result:
        lines.append(f"mtad peak RSS during the ingest runs (VmHWM): "
                     f"{result['mtad_peak_rss_kb'] / mb:.1f} MB")
    q = result.get("queued")
    if q:
        n = f"{q['messages']:,}"
        if "fill_seconds" in q:
            how = ("spool API, mtad stopped" if q["fill"] == "direct"
                   else f"SMTP, smtp-source -d -s 20: {q.get('fill_rate', 0):,.0f} msg/s, "
                   f"{q.get('fill_errors', 0)} error lines")
            lines.append(f"spool filled with {n} messages in {q['fill_seconds']:.1f} s ({how})")
        if "stop_seconds" in q:
            lines.append(f"mtad stop (SIGTERM) with {n} queued: {q['stop_seconds']:.2f} s, "
                         f"exit {q['stop_exit']}")
        if "startup_s" in q:
            lines.append(f"mtad start-up with {n} queued: {q['startup_s']:.2f} s"
                         f"{_target(q['startup_s'] <= TARGET_STARTUP_S)} "
                         f"(target <= {TARGET_STARTUP_S:.0f} s)")
        if "rss_after_start_kb" in q:
            rss = max(q["rss_after_start_kb"], q.get("rss_after_list_kb", 0)) / mb
            lines.append(f"mtad RSS with {n} queued: {q['rss_after_start_kb'] / mb:.1f} MB after "
                         f"start, {q.get('rss_after_list_kb', 0) / mb:.1f} MB after queue list"
                         f"{_target(rss <= TARGET_RSS_MB)} (target <= {TARGET_RSS_MB} MB)")
        split = q.get("rss_after_list_split_kb")
        if split:
            lines.append(f"  of which heap (RssAnon) {split['RssAnon'] / mb:.1f} MB, mapped files "
                         f"(RssFile: LMDB pages, code) {split['RssFile'] / mb:.1f} MB")
        if "queue_list_json_s" in q:
            lines.append(f"mtactl queue list --json over {n}: {q['queue_list_json_s']:.2f} s, "
                         f"{q['queue_list_lines']:,} lines")
        if "queue_list_error" in q:
            lines.append(f"mtactl queue list --json failed: {q['queue_list_error']}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    if "total_seconds" in result:
        lines.append(f"benchmark wall time: {result['total_seconds']:.0f} s")
    return lines
