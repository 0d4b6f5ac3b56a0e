"""Composition root: config, database, servers and workers; signals; graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path

from sqlalchemy.engine import make_url

from router import db, log
from router import settings as config
from router.intake.accept import Acceptor
from router.intake.smtp import IntakeHandler, start_server
from router.pipeline import Pipeline
from router.rules.address import resolve_address


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
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
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

        pipeline = Pipeline(url, self.current_settings)
        pipeline_stop = threading.Event()
        pipeline_thread = threading.Thread(target=pipeline.run, args=(pipeline_stop,),
                                           name="pipeline", daemon=True)
        engine = db.make_engine(url)
        acceptor = Acceptor(engine, on_commit=lambda _n: pipeline.wake.set())
        await acceptor.start()
        pipeline_thread.start()
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
        pipeline_stop.set()
        pipeline.wake.set()
        await asyncio.to_thread(pipeline_thread.join, 30)
        pipeline.close()
        engine.dispose()
        self._log.info("router_stopped", accepted=acceptor.accepted,
                       processed=pipeline.processed, parked=pipeline.parked)


def serve(path: Path) -> int:
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
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    runner(Daemon(settings).run())
    return 0
