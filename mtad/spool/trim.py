"""Keep message bodies out of the process's resident set once they are written.

LMDB reads the page it appends to through its memory map (copy on write, then pwrite), so an
ingest that appends gigabytes of bodies slowly maps the whole data file: clean, file-backed
pages that the kernel could drop at any time, but that `ps` and systemd count as mtad's RSS
(about 170 MB for 100,000 queued 2 KB messages), and delivery, which reads every body through
the map, does the same. `Trimmer` drops those page-table entries with madvise(MADV_DONTNEED)
once enough new data has been written or some seconds have passed; a later read of a body
faults its pages back in from the page cache. On a read-only shared file mapping (LMDB without
writemap) that loses nothing and is invisible to readers in other threads. Linux only; a
no-op elsewhere, or when the mapping cannot be found.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

import structlog

log = structlog.get_logger("mtad.spool")

MADV_DONTNEED = 4
TRIM_EVERY = 64 * 1024 * 1024
"""Bytes the data file grows by between two trims."""
TRIM_INTERVAL = 10.0
"""Seconds between two trims while bodies are written or deleted (delivery reads each body
through the map, then deletes it: the file does not grow, but its pages pile up all the same)."""


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def mappings(path: str) -> list[tuple[int, int]]:
    """(start, length) of every mapping of the file `path` in this process."""
    real = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append((start, end - start))
    except OSError:
        return []
    return found


class Trimmer:
    """Called by the writer thread after each commit with the data file's size."""

    def __init__(self, path: str, every: int = TRIM_EVERY, interval: float = TRIM_INTERVAL) -> None:
        self.path = path
        self.every = every
        self.interval = interval
        self._madvise = _madvise()
        self._last = 0
        self._last_time = time.monotonic()
        self.trims = 0

    def after_commit(self, file_bytes: int) -> None:
        """After a commit that wrote or deleted bodies: trim when the file grew by `every`
        bytes, or `interval` seconds have passed, since the last trim."""
        now = time.monotonic()
        if self._madvise is None or (file_bytes - self._last < self.every and now - self._last_time < self.interval):
            return
        self._last, self._last_time = file_bytes, now
        self.trim()

    def trim(self) -> None:
        if self._madvise is None:
            return
        for start, length in mappings(self.path):
            if self._madvise(start, length, MADV_DONTNEED) != 0:
                log.warning("spool.trim_failed", error=os.strerror(ctypes.get_errno()))
                return
        self.trims += 1
