"""The composition root: config, spool, listeners, HTTP, signals, ordered shutdown.

Lifecycle: load config -> open and recover the spool -> start HTTP (public, admin) -> open
SMTP listeners -> READY=1 -> run until SIGTERM/SIGINT -> STOPPING=1 -> stop listening ->
let sessions finish within server.shutdown_grace -> stop HTTP -> close the spool -> exit 0.
SIGHUP re-reads the config file and applies what can change in flight (limits, inbound
domains, TLS certificate, log level, mail log file, [dkim] and the DKIM keys); it logs the
keys that need a restart.
Nothing imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
import time
from typing import Any

import msgspec
import structlog

from mtad import sdnotify
from mtad.config import ConfigError, load_config
from mtad.config.schema import Config
from mtad.deliver.service import Delivery
from mtad.dkim import DkimSigner, key_dir_of, policy_of
from mtad.events import Counters, Event, EventBus, EventType
from mtad.http.admin import build_admin_app, ensure_admin_token
from mtad.http.adminapi import DkimReloaded
from mtad.http.metrics import Snapshot
from mtad.http.public import build_public_app
from mtad.http.server import HttpServer, HttpServerError
from mtad.ingest import Ingest
from mtad.maillog import MailLog, configure_logging
from mtad.platform.feedback import BounceHandling
from mtad.platform.tenants import StateDbError, TenantDirectory
from mtad.receive.listeners import Receiver
from mtad.receive.tls import ensure_self_signed, server_context
from mtad.spool import Spool, SpoolError

log = structlog.get_logger("mtad.daemon")

# Keys SIGHUP cannot change in a running process; a change is logged, then needs a restart.
_RESTART_KEYS = ("server.spool_dir", "server.hostname", "listener", "http", "spool", "dns", "log.mail_log",
                 "bounces", "suppression", "route", "tls_policy", "mta_sts")


class OperatorEvents:
    """The admin API's queue hooks: every operator action becomes an event on the mail log,
    and the delivery scheduler hears of it."""

    def __init__(self, bus: EventBus, delivery: Delivery | None = None) -> None:
        self._bus = bus
        self._delivery = delivery

    def _publish(self, kind: EventType, queue_id: str, reason: str) -> None:
        self._bus.publish(Event(type=kind, time=time.time(), queue_id=queue_id, reason=reason))

    def held(self, queue_id: str) -> None:
        self._publish("held", queue_id, "operator: queue hold")
        if self._delivery is not None:
            self._delivery.held(queue_id)

    def released(self, queue_id: str) -> None:
        self._publish("released", queue_id, "operator: queue release")
        if self._delivery is not None:
            self._delivery.released(queue_id)

    def deleted(self, queue_id: str) -> None:
        self._publish("dropped", queue_id, "operator: queue delete")
        if self._delivery is not None:
            self._delivery.deleted(queue_id)


def build_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The server-side context for STARTTLS and implicit TLS, or None when [tls] is empty.
    With `[tls] self_signed` (development only) the certificate is made under the spool."""
    if cfg.tls.self_signed and not cfg.tls.cert:
        cert, key = ensure_self_signed(os.path.join(cfg.server.spool_dir, "tls"), cfg.server.hostname)
        return server_context(cert, key)
    if not cfg.tls.cert:
        return None
    return server_context(cfg.tls.cert, cfg.tls.key)


class Daemon:
    def __init__(self, cfg: Config, config_path: str, *, log_format: str | None = None) -> None:
        self.cfg = cfg
        self.log_format = log_format
        self.config_path = config_path
        self.stopping = asyncio.Event()
        self.bus = EventBus()
        self.counters = Counters()
        self.maillog = MailLog(path=cfg.log.mail_log)
        self.bus.subscribe(self.counters)
        self.bus.subscribe(self.maillog)
        self.spool: Spool | None = None
        self.receiver: Receiver | None = None
        self.tenants: TenantDirectory | None = None
        """Tenants, SMTP users, API keys (state.db), opened after the spool."""
        self.bounces: BounceHandling | None = None
        """VERP, the sent log, the suppression list and bounce/complaint feedback (state.db)."""
        self.delivery: Delivery | None = None
        self.own_addresses: set[str] = set()
        """Addresses our listeners bound ("ip:port"), filled once they are open: the router's loop check."""
        self.http: list[HttpServer] = []
        self.started = time.time()
        self.dkim = DkimSigner(key_dir_of(cfg), policy_of(cfg))
        self._reloads: set[asyncio.Task[Any]] = set()

    def health(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self.spool is None or not self.spool.writable():
            reasons.append("spool not writable")
        if self.receiver is None or not self.receiver.bound():
            reasons.append("listeners not open")
        if self.stopping.is_set():
            reasons.append("shutting down")
        return (not reasons, {"reasons": reasons, "uptime": round(time.time() - self.started, 3)})

    def metrics(self) -> Snapshot:
        """What /metrics reports, read now (cheap: counters and O(1) reads)."""
        snap = Snapshot(events=dict(self.counters.by_type), uptime=round(time.time() - self.started, 3),
                        queued_messages=self.spool.count() if self.spool is not None else 0)
        if self.spool is not None:
            snap.spool_commits, snap.spool_writes = self.spool.commits, self.spool.committed_writes
        if self.delivery is not None:
            scheduler = self.delivery.scheduler
            now = time.time()
            snap.delivery_connections = scheduler.connections
            snap.active_messages = len(scheduler.active)
            snap.destinations = len(scheduler.queues)
            snap.suspended_destinations = sum(q.suspended(now) for q in scheduler.queues.values())
        return snap

    async def run(self) -> int:
        cfg = self.cfg
        asyncio.get_running_loop().set_exception_handler(_log_loop_exception)
        try:
            self.spool = Spool.open(
                cfg.server.spool_dir,
                map_size=int(cfg.spool.map_size),
                commit_linger=float(cfg.spool.commit_linger),
                commit_max_batch=cfg.spool.commit_max_batch,
            )
        except SpoolError as exc:
            log.error("spool.open_failed", spool_dir=cfg.server.spool_dir, error=str(exc))
            return 1
        try:
            report = await asyncio.get_running_loop().run_in_executor(None, self.spool.recover)
            log.info("spool.recovered", spool_dir=cfg.server.spool_dir, messages=report.messages,
                     recipients=report.recipients, corrupt=report.corrupt, orphan_bodies=report.orphan_bodies,
                     seconds=round(report.seconds, 3))
            self.tenants = await TenantDirectory.open(os.path.join(cfg.server.spool_dir, "state.db"))
            log.info("tenants.loaded", tenants=len(self.tenants.tenants()))
            self.bounces = await BounceHandling.open(cfg, self.bus)
            self.bounces.start()
            token = ensure_admin_token(cfg.server.spool_dir)
            tls_context = build_tls_context(cfg)
            await self.reload_dkim()
            ingest = Ingest(self.spool, self.bus, cfg.server.hostname, signer=self.dkim,
                            feedback=self.bounces.feedback, suppressions=self.bounces.suppressions)
            self.receiver = Receiver(
                listeners=cfg.listener, limits=cfg.limits, inbound_domains=cfg.inbound.domains,
                hostname=cfg.server.hostname, ingest=ingest, bus=self.bus, tls_context=tls_context,
                tenants=self.tenants, quotas=self.tenants.quotas, bounces=self.bounces.verp,
            )
            self.delivery = Delivery(cfg, self.spool, self.bus, ingest)
            public = HttpServer()
            await public.start(build_public_app(health=self.health, metrics_source=self.metrics),
                               cfg.http.address)
            self.http.append(public)
            admin = HttpServer()
            await admin.start(
                build_admin_app(spool=self.spool, counters=self.counters, token=token, started=self.started,
                                queue_hooks=OperatorEvents(self.bus, self.delivery),
                                delivery=self.delivery.control,
                                tenants=self.tenants, dkim_reload=self.reload_dkim,
                                suppressions=self.bounces.suppressions),
                cfg.http.admin_address,
            )
            self.http.append(admin)
            await self.receiver.start()
        except (OSError, ssl.SSLError, HttpServerError, StateDbError) as exc:
            log.error("daemon.start_failed", error=str(exc))
            await self._shutdown()
            return 1
        for role, host, port in self.receiver.bound():
            log.info("listener.open", role=role, address=f"{host}:{port}")
            self.own_addresses.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.delivery.start(self.own_addresses)
        log.info("http.open", public=public.bound(), admin=admin.bound())
        self._install_signals()
        sdnotify.notify("READY=1\nSTATUS=accepting mail")
        log.info("daemon.ready", pid=os.getpid(), queued=self.spool.count())
        await self.stopping.wait()
        sdnotify.notify("STOPPING=1")
        await self._shutdown()
        return 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

    def _on_stop(self, sig: signal.Signals) -> None:
        log.info("daemon.stopping", signal=sig.name)
        self.stopping.set()

    def _on_reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems)
            return
        except OSError as exc:
            log.error("config.reload_failed", problems=[str(exc)])
            return
        try:
            tls_context = build_tls_context(new)
        except (OSError, ssl.SSLError) as exc:
            log.error("config.reload_failed", problems=[f"tls: {exc}"])
            return
        old = self.cfg
        changed_restart = [key for key in _RESTART_KEYS if _lookup(old, key) != _lookup(new, key)]
        if msgspec.structs.replace(old.delivery, paused=new.delivery.paused) != new.delivery:
            changed_restart.append("delivery")  # all but delivery.paused
        if self.delivery is not None:
            self.delivery.reload(new)
        if self.receiver is not None:
            self.receiver.reload(limits=new.limits, inbound_domains=new.inbound.domains, tls_context=tls_context)
        configure_logging(fmt=self.log_format or new.log.format, level=new.log.level)
        self.maillog.reopen()
        # What needs a restart stays as running, so the next SIGHUP still reports it pending.
        self.cfg = _keep_running(new, old)
        if changed_restart:
            log.warning("config.reload_needs_restart", keys=changed_restart)
        log.info("config.reloaded", applied=["limits", "inbound.domains", "tls", "log", "delivery.paused"])
        task = asyncio.get_running_loop().create_task(self.reload_dkim())  # the running config's key_dir
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload_dkim(self, cfg: Config | None = None) -> DkimReloaded:
        """Read the DKIM keys again (at start, SIGHUP, `mtactl dkim genkey`), off the loop."""
        settings = cfg or self.cfg
        domains, keys, problems = await asyncio.to_thread(self.dkim.reload, key_dir_of(settings), policy_of(settings))
        return DkimReloaded(domains=domains, keys=keys, problems=problems)

    async def _shutdown(self) -> None:
        grace = float(self.cfg.server.shutdown_grace)
        if self.receiver is not None:
            await self.receiver.stop_accepting()
            await self.receiver.drain(grace)
        if self.delivery is not None:
            await self.delivery.stop(grace)
        if self.bounces is not None:
            await self.bounces.stop()  # after delivery: its last bounced events are applied
        for server in reversed(self.http):
            await server.stop()
        if self.tenants is not None:
            await self.tenants.close()
        if self.spool is not None:
            await self.spool.close()
        await asyncio.to_thread(self.dkim.close)
        self.maillog.close()
        log.info("daemon.stopped")


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Errors nobody awaited (a callback, a forgotten task): into the diagnostic log, with traceback."""
    error = context.get("exception")
    log.error("loop.unhandled", message=context.get("message", ""), exc_info=error)


def _keep_running(new: Config, running: Config) -> Config:
    """NEW with every _RESTART_KEYS value taken from RUNNING: the config the process now runs on."""
    server = msgspec.structs.replace(new.server, spool_dir=running.server.spool_dir,
                                     hostname=running.server.hostname)
    log_settings = msgspec.structs.replace(new.log, mail_log=running.log.mail_log)
    delivery = msgspec.structs.replace(running.delivery, paused=new.delivery.paused)
    return msgspec.structs.replace(new, server=server, listener=running.listener, http=running.http,
                                   spool=running.spool, dns=running.dns, log=log_settings, delivery=delivery,
                                   bounces=running.bounces, suppression=running.suppression,
                                   route=running.route, tls_policy=running.tls_policy, mta_sts=running.mta_sts)


def _lookup(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtad", description="mtad mail transfer agent")
    parser.add_argument("--config", required=True, help="path to mtad.toml")
    parser.add_argument("--check", action="store_true", help="validate the config and exit (0 ok, 2 problems)")
    parser.add_argument("--log-format", choices=("json", "console"), help="override log.format")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr if not args.check else sys.stdout)
        return 2
    if args.check:
        print(f"{args.config}: ok")
        return 0
    configure_logging(fmt=args.log_format or cfg.log.format, level=cfg.log.level)
    import uvloop

    code = uvloop.run(Daemon(cfg, args.config, log_format=args.log_format).run())
    return code


if __name__ == "__main__":
    sys.exit(main())
