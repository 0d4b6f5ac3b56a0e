"""Composition root: config, database, servers and workers; signals; graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from router import db, log
from router import settings as config
from router.clock import system_clock
from router.intake.accept import Acceptor, intake_engine
from router.intake.smtp import IntakeHandler, start_server
from router.outbox import OutboxWorker
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

        workers = [PipelineProcess(self.path, nice=s.pipeline.nice, log_level=self.log_level,
                                   log_json=self.log_json)
                   for _ in range(s.pipeline.workers)]
        for w in workers:
            w.start()

        def committed(_n: int) -> None:
            for w in workers:
                w.notify()

        engine = intake_engine(url)
        acceptor = Acceptor(engine, on_commit=committed)
        await acceptor.start()
        outbox_engine = db.make_engine(url)
        outbox = OutboxWorker(outbox_engine, self.current_settings, system_clock)
        outbox_task = asyncio.create_task(outbox.run(self.stop), name="outbox")
        server = None
        if s.smtp.enabled:
            handler = IntakeHandler(acceptor, self.owns_address, channel=s.smtp.protocol)
            server = await start_server(handler, s.smtp.host, s.smtp.port,
                                        hostname=s.smtp.hostname,
                                        max_size=s.smtp.max_message_size)
        self._log.info(
            "router_started", config=s.source, database=redact(url),
            smtp=f"{s.smtp.protocol}://{s.smtp.listen}" if server else "off",
            teams={t.name: t.addresses for t in s.team}, imap=[a.name for a in s.imap],
            relay=f"{s.relay.host}:{s.relay.port}")
        await self.stop.wait()
        self._log.info("router_stopping")
        if server is not None:
            server.close()
            await server.wait_closed()
        await acceptor.stop()
        exits = [await asyncio.to_thread(w.stop) for w in workers]
        await outbox_task
        outbox_engine.dispose()
        engine.dispose()
        self._log.info("router_stopped", accepted=acceptor.accepted, pipeline_exit=exits)


def serve(path: Path, *, log_level: str = "info", log_json: bool | None = None) -> int:
    logger = log.get("router")
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
