#!/usr/bin/env python3
"""A private Postfix instance from Debian's package: the peer mtad's ingest is measured against.

Everything the instance touches lives under one directory of its own (config, queue, data,
mail log), its smtpd listens on 127.0.0.1:<port> only and its master is stopped at the end, so a
Postfix the machine already runs is never disturbed. Durability is Postfix's default: cleanup
fsyncs the queue file before smtpd answers 250, the same promise mtad makes.

Two jobs, chosen by `mode`:
  hold   accept and queue only: every message is put on hold at DATA (an access action), so
         qmgr and smtp never run and the figure is ingest alone, like mtad's.
  relay  accept, queue and relay to an smtp-sink on 127.0.0.1 (relayhost), the set-up in
         /work/shared/BENCH-NOTES.md; delivery competes with ingest for the CPU.

`begin_run()` starts a benchmark that runs beside such a Postfix (bench_ingest, bench_relay):
SIGTERM as Ctrl-C, the tools it needs present, a work directory Postfix's users can read.

Needs root (the master process starts as root and drops to `mail_owner = postfix`).
Run it on its own to poke at the peer by hand:
    python3 bench/postfix_peer.py --port 2525 [--mode relay]      (Ctrl-C stops it)

Trust: none; the only clients are the benchmark's own smtp-source processes on loopback.
RFCs: none implemented here.
"""

from __future__ import annotations

import argparse
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Self

Mode = Literal["hold", "relay"]
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTSUPER = "/usr/sbin/postsuper"
SMTP_SINK = "/usr/sbin/smtp-sink"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
COPIED_FILES = {
    "master.cf": ("/usr/share/postfix/master.cf.dist", "/etc/postfix/master.cf.proto",
                  "/etc/postfix/master.cf"),
    "dynamicmaps.cf": ("/etc/postfix/dynamicmaps.cf", "/usr/share/postfix/dynamicmaps.cf"),
}


def begin_run(name: str, tools: Iterable[str], workdir: Path | None, prefix: str) -> Path | None:
    """The start of a benchmark run: from now on SIGTERM ends it as Ctrl-C does (KeyboardInterrupt,
    so its finally blocks stop mtad and Postfix). None, said on stderr, when one of TOOLS is neither
    on PATH nor a file; else WORKDIR (or a new temporary directory named PREFIX...), made and
    readable by all users (the private Postfix's own users read below it)."""
    signal.signal(signal.SIGTERM, _interrupt)
    for tool in tools:
        if shutil.which(tool) is None and not Path(tool).exists():
            print(f"{name}: {tool} not found", file=sys.stderr)
            return None
    base = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    return base


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class PostfixError(RuntimeError):
    """The peer could not be set up, started or stopped; the message says why."""


def main_cf(base: Path, mode: Mode, sink_port: int | None) -> dict[str, str]:
    """The main.cf settings of the peer (pure): private paths, loopback, BENCH-NOTES limits."""
    settings = {
        "compatibility_level": "3.6",
        "mail_owner": "postfix",
        "queue_directory": str(base / "queue"),
        "data_directory": str(base / "data"),
        "maillog_file": str(base / "maillog"),
        "maillog_file_prefixes": str(base),
        "syslog_name": "postfix-bench",
        "myhostname": "postfix-bench.localdomain",
        "mydestination": "",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "biff": "no",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        # Debian's "Local only" answer sets both to `error`: every relayed message would bounce.
        "default_transport": "smtp",
        "relay_transport": "relay",
        "default_process_limit": "300",
        "default_destination_concurrency_limit": "100",
        "smtp_destination_concurrency_limit": "100",
        "relay_destination_concurrency_limit": "100",
        "smtp_destination_rate_delay": "0",
        "smtpd_tls_security_level": "none",
        "smtp_tls_security_level": "none",
    }
    if mode == "hold":
        # HOLD from an access table parks the message in the hold queue: cleanup still writes
        # and fsyncs it before the 250, but qmgr never schedules it.
        settings["smtpd_data_restrictions"] = "check_client_access static:HOLD"
    if sink_port is not None:
        settings["relayhost"] = f"[127.0.0.1]:{sink_port}"
    return settings


def master_cf_service(port: int) -> tuple[str, str]:
    """The master.cf entry for the peer's smtpd (pure): (service/type, full entry)."""
    name = f"127.0.0.1:{port}"
    return f"{name}/inet", f"{name} inet n - n - - smtpd"


def run_postfix_command(argv: list[str], timeout: float = 60.0) -> str:
    """Run a Postfix command with stderr on a pty and return what it printed.

    Postfix commands report errors only to syslog unless stderr is a terminal, and a
    container has no syslog; the pty is how their fatal messages reach us.
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO once every writer to the pty has gone
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(master)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").strip()
    if rc != 0:
        raise PostfixError(f"{' '.join(argv)} exited {rc}: {text or '(no output)'}")
    return text


class SmtpSink:
    """An smtp-sink on 127.0.0.1:<port>: the relay target that accepts everything, stores nothing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [SMTP_SINK, "-u", "postfix", f"127.0.0.1:{self.port}", "256"]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


class PostfixPeer:
    """One private Postfix instance; use as a context manager so it always stops."""

    def __init__(self, port: int, *, mode: Mode = "hold", sink_port: int | None = None,
                 base: Path | None = None) -> None:
        if mode == "relay" and sink_port is None:
            raise ValueError("relay mode needs a sink_port")
        self.port = port
        self.mode: Mode = mode
        self.sink = SmtpSink(sink_port) if mode == "relay" and sink_port is not None else None
        self._own_base = base is None
        self.base = base if base is not None else Path(tempfile.mkdtemp(prefix="mtad-bench-postfix-"))
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.maillog = self.base / "maillog"
        self._running = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("the Postfix peer needs root (its master drops to user postfix)")
        if not Path(POSTFIX).exists():
            raise PostfixError("Postfix is not installed (apt-get install postfix)")
        self._write_config()
        if self.sink is not None:
            self.sink.start()
        run_postfix_command([POSTFIX, "-c", str(self.config_dir), "start"])
        self._running = True
        wait_for_port(self.port, deadline=time.monotonic() + 20)

    def stop(self) -> None:
        if self._running:
            self._running = False
            try:
                run_postfix_command([POSTFIX, "-c", str(self.config_dir), "stop"])
            except PostfixError:
                self._kill_master()
        if self.sink is not None:
            self.sink.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queue -----------------------------------------------------------------------------
    def queued(self) -> int:
        """Messages in the queue now (every queue file under the queue directories)."""
        total = 0
        for queue in QUEUES:
            for _root, _dirs, files in os.walk(self.queue_dir / queue):
                total += len(files)
        return total

    def clear(self, timeout: float = 120.0) -> None:
        """Empty the queue before the next run: delete held mail, or wait for relayed mail to go."""
        if self.mode == "hold":
            run_postfix_command([POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"])
            return
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                raise PostfixError(f"Postfix queue not empty after {timeout:.0f}s of relaying")
            time.sleep(0.05)

    def describe(self) -> str:
        job = ("accept and queue on hold (ingest only)" if self.mode == "hold"
               else "accept, queue and relay to smtp-sink")
        return f"Postfix {postfix_version()} on 127.0.0.1:{self.port}: {job}; fsync before 250"

    # -- internals -------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # the postfix user must reach the queue below it
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        data = self.base / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postfix", "postfix")  # master.lock is created as mail_owner
        # The package's pristine master.cf, not the machine's (which an operator may have edited).
        for name, sources in COPIED_FILES.items():
            src = next((Path(p) for p in sources if Path(p).exists()), None)
            if src is None and name == "master.cf":
                raise PostfixError("no master.cf to start from: " + ", ".join(sources))
            if src is not None:
                shutil.copy(src, self.config_dir / name)
        (self.config_dir / "main.cf").write_text("# mtad benchmark peer; generated\n")
        conf = ["-c", str(self.config_dir)]
        settings = main_cf(self.base, self.mode, self.sink.port if self.sink else None)
        run_postfix_command([POSTCONF, *conf, *(f"{k} = {v}" for k, v in settings.items())])
        # No smtpd on port 25: the only listener is ours. No chroot: nothing is set up for one.
        run_postfix_command([POSTCONF, *conf, "-M#", "smtp/inet", "submission/inet", "smtps/inet"])
        service, entry = master_cf_service(self.port)
        run_postfix_command([POSTCONF, *conf, "-M", f"{service} = {entry}"])
        run_postfix_command([POSTCONF, *conf, "-F", "*/*/chroot = n"])

    def _kill_master(self) -> None:
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def postfix_version() -> str:
    try:
        out = subprocess.run([POSTCONF, "-h", "mail_version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.strip()


def wait_for_port(port: int, deadline: float, host: str = "127.0.0.1") -> float:
    """Poll until host:port accepts a TCP connection; return the monotonic time it did."""
    import socket

    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts on {host}:{port}") from None
            time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--mode", choices=["hold", "relay"], default="hold")
    parser.add_argument("--sink-port", type=int, default=2526)
    args = parser.parse_args()
    mode: Mode = "relay" if args.mode == "relay" else "hold"
    peer = PostfixPeer(args.port, mode=mode, sink_port=args.sink_port if mode == "relay" else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        peer.start()
        print(f"{peer.describe()}\nconfig: {peer.config_dir}  log: {peer.maillog}\nCtrl-C stops it")
        signal.pause()
    except KeyboardInterrupt:
        pass
    except PostfixError as exc:
        print(f"postfix_peer: {exc}", file=sys.stderr)
        return 1
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
