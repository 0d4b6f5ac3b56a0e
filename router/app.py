"""Composition root: config, database, servers and workers; signals; graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from router import db, log
from router import settings as config
from router.clock import system_clock
from router.escalate import EscalationScheduler
from router.intake.accept import Acceptor, intake_engine
from router.intake.imap import ImapManager
from router.intake.process import IntakeProcess
from router.intake.smtp import IntakeHandler, start_server
from router.intake.spool import Spool
from router.outbox import OutboxWorker
from router.reload import Applied, Recorder, Reloader
from router.rules.address import resolve_address
from router.worker import PipelineProcess


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def prepare_database(settings: config.Settings) -> None:
    """SQLite is ours to migrate on start; a shared PostgreSQL is migrated on purpose, by
    `router db upgrade`, so two instances never race to change its schema."""
    url = settings.database_url
    if db.is_sqlite(url):
        db.upgrade(url)
        return
    current, head = db.current_revision(url), db.head_revision()
    if current != head:
        raise RuntimeError(f"database schema is at {current or 'nothing'}, this router needs "
                           f"{head}: run `router db upgrade`")


class Daemon:
    def __init__(self, settings: config.Settings, path: Path, *, log_level: str = "info",
                 log_json: bool | None = None) -> None:
        self.settings = settings
        self.path = path
        self.log_level = log_level
        self.log_json = log_json
        self.stop = asyncio.Event()
        self._log = log.get("router")

    def current_settings(self) -> config.Settings:
        return self.settings

    def owns_address(self, address: str) -> bool:
        return resolve_address(self.settings, address) is not None

    async def run(self) -> None:
        s = self.settings
        url = s.database_url
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        # Live config (router.reload): the reloader validates and records each edit of
        # router.toml or templates/ and swaps it into self.settings and every worker.
        reloader = Reloader(self.path, s, recorder=Recorder(url))
        self.settings = reloader.live.current()

        workers = [PipelineProcess(self.path, nice=s.pipeline.nice, log_level=self.log_level,
                                   log_json=self.log_json, part=(i, s.pipeline.workers))
                   for i in range(s.pipeline.workers)]
        for w in workers:
            w.start()
            w.update(self.settings)

        # More intake processes on the SMTP port ([smtp] processes): started once this
        # process listens, so a port that cannot be bound fails the daemon, not a child.
        intakes = [IntakeProcess(self.path, index=i, wakes=[w.wake for w in workers],
                                 log_level=self.log_level,
                                 log_json=self.log_json)
                   for i in range(1, s.smtp.processes if s.smtp.enabled else 1)]

        def config_applied(applied: Applied) -> None:
            self.settings = applied.settings
            for w in workers:
                w.update(applied.settings)
            for p in intakes:
                p.update(applied.settings)

        reloader.live.subscribe(config_applied)
        await asyncio.to_thread(reloader.start)
        loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP", 0.0)

        def committed(_n: int) -> None:
            for w in workers:
                w.notify()

        engine = intake_engine(url)
        # On SQLite this process's SMTP and IMAP intake commit into spool 0, never waiting
        # for the pipeline's write lock (router.intake.spool).
        spool = Spool.for_database(url, 0)
        acceptor = Acceptor(engine, on_commit=committed, spool=spool)
        await acceptor.start()
        # IMAP mailboxes go through the same acceptor: same durability, same dedupe, and
        # their commits wake the pipeline too. Accounts follow config reloads by themselves.
        imap = ImapManager(self.current_settings, acceptor.accept, engine)
        imap_task = asyncio.create_task(imap.run(self.stop), name="imap-intake")
        outbox_engine = db.make_engine(url)
        outbox = OutboxWorker(outbox_engine, self.current_settings, system_clock)
        outbox_task = asyncio.create_task(outbox.run(self.stop), name="outbox")
        esc_engine = db.make_engine(url)
        scheduler = EscalationScheduler(esc_engine, self.current_settings, system_clock,
                                        on_fired=outbox.wake)
        esc_task = asyncio.create_task(scheduler.run(self.stop), name="escalation")
        # A new ladder or calendar changes due times: let the scheduler recompute now.
        reloader.live.subscribe(lambda _applied: scheduler.wake())
        server = None
        if s.smtp.enabled:
            handler = IntakeHandler(acceptor, self.owns_address, channel=s.smtp.protocol)
            server = await start_server(handler, s.smtp.host, s.smtp.port,
                                        hostname=s.smtp.hostname,
                                        max_size=s.smtp.max_message_size,
                                        reuse_port=bool(intakes))
            for p in intakes:
                p.start()
                p.update(self.settings)
        self._log.info(
            "router_started", config=s.source, database=redact(url),
            smtp=f"{s.smtp.protocol}://{s.smtp.listen}" if server else "off",
            teams={t.name: t.addresses for t in s.team}, imap=[a.name for a in s.imap],
            relay=f"{s.relay.host}:{s.relay.port}")
        web = None
        if s.web.enabled:  # the agent console and REST API (router.web), on this loop
            from router import web as web_console

            web = await web_console.start(self.current_settings, url, wake_outbox=outbox.wake,
                                          wake_scheduler=scheduler.wake)
        supervisor = asyncio.create_task(self._supervise([*workers, *intakes]),
                                         name="supervisor")
        await self.stop.wait()
        self._log.info("router_stopping")
        await supervisor
        if web is not None:
            await web.stop()
        if server is not None:
            server.close()
            await server.wait_closed()
        intake_exits = [await asyncio.to_thread(p.stop) for p in intakes]
        await imap_task
        await acceptor.stop()
        exits = [await asyncio.to_thread(w.stop) for w in workers]
        await asyncio.to_thread(reloader.stop)  # after the workers: they use its snapshots
        await outbox_task
        await esc_task
        scheduler.close()
        esc_engine.dispose()
        outbox_engine.dispose()
        engine.dispose()
        if spool is not None:
            spool.close()
        self._log.info("router_stopped", accepted=acceptor.accepted, pipeline_exit=exits,
                       intake_exit=intake_exits)

    async def _supervise(self, children: list[PipelineProcess | IntakeProcess],
                         every: float = 1.0) -> None:
        """Start a pipeline worker or intake process again when it dies (killed by the OOM
        killer, say): without it, routing or a share of the port would stop unnoticed.
        Nothing is lost meanwhile: stored mail waits for a worker, and senders that reached
        the dead intake retry. A child that keeps dying is started at most three times a
        minute."""
        started: dict[int, list[float]] = {}
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), every)
            if self.stop.is_set():
                return
            for i, child in enumerate(children):
                if child.process.is_alive():
                    continue
                now = loop.time()
                recent = [t for t in started.get(i, []) if now - t < 60]
                if len(recent) >= 3:
                    continue  # a crash loop: no faster than three starts a minute
                self._log.error("child_died", kind=child.kind, pid=child.process.pid,
                                exitcode=child.process.exitcode)
                await asyncio.to_thread(child.restart, self.current_settings)
                started[i] = [*recent, now]
                self._log.warning("child_restarted", kind=child.kind, pid=child.process.pid)


def serve(path: Path, *, log_level: str = "info", log_json: bool | None = None) -> int:
    logger = log.get("router")
    # A reload (SIGHUP) before Daemon.run installs its handler must not kill us, nor a pipeline
    # worker we spawn (an ignored signal stays ignored across exec until it sets its own).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 78  # EX_CONFIG
    try:
        prepare_database(settings)
    except Exception as exc:
        logger.error("database_unavailable", database=redact(settings.database_url),
                     error=f"{type(exc).__name__}: {exc}")
        return 75  # EX_TEMPFAIL: a supervisor should try again
    # The intake writer thread hands the GIL back and forth with the event loop on every
    # SQLite call; at the default 5 ms switch interval each handoff can stall a commit that
    # fifty senders are waiting on.
    sys.setswitchinterval(0.0005)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(Daemon(settings, path, log_level=log_level, log_json=log_json).run())
    except OSError as exc:
        logger.error("cannot_listen", smtp=settings.smtp.listen, error=str(exc))
        return 71  # EX_OSERR
    return 0
