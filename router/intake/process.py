"""More SMTP intake processes on the daemon's port (``[smtp] processes``).

One event loop accepts on one core: aiosmtpd's protocol handling, not the database, is what
limits a single process (PERF-NOTES). With ``processes = N`` the daemon and N-1 children
listen on the same port with SO_REUSEPORT and the kernel spreads connections over them.
Each child has its own group-committing writer and, on SQLite, its own spool file
(router.intake.spool); every one answers ``250`` only after its commit, exactly as the daemon
does, so a child killed at any instant loses nothing it accepted. Children die with the
daemon, follow its config reloads (which addresses exist) and wake the pipeline workers when
they commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from router import log
from router.child import ChildProcess
from router.intake.accept import Acceptor, intake_engine
from router.intake.smtp import IntakeHandler, start_server
from router.intake.spool import Spool
from router.reload import LiveConfig
from router.rules.address import resolve_address
from router.signals import Doorbell, Flag
from router.worker import die_with_parent, first_settings, forward_hup


async def _serve(live: LiveConfig, stop: threading.Event, wakes: list[Doorbell],
                 index: int) -> int:
    s = live.current()
    spool = Spool.for_database(s.database_url, index)
    engine = intake_engine(s.database_url) if spool is None else None

    def committed(_n: int) -> None:
        for w in wakes:
            w.ring()

    acceptor = Acceptor(engine, on_commit=committed, spool=spool)
    await acceptor.start()
    handler = IntakeHandler(acceptor,
                            lambda address: resolve_address(live.current(), address) is not None,
                            channel=s.smtp.protocol)
    server = await start_server(handler, s.smtp.host, s.smtp.port, hostname=s.smtp.hostname,
                                max_size=s.smtp.max_message_size, reuse_port=True)
    logger = log.get("router.intake")
    logger.info("intake_process_started", index=index, pid=os.getpid(), smtp=s.smtp.listen)
    try:
        await asyncio.to_thread(stop.wait)
    finally:
        server.close()
        await server.wait_closed()
        await acceptor.stop()
        if engine is not None:
            engine.dispose()
        if spool is not None:
            spool.close()
    logger.info("intake_process_stopped", index=index, pid=os.getpid(),
                accepted=acceptor.accepted)
    return acceptor.accepted


def intake_main(config_path: str, stop_event: Flag, wakes: list[Doorbell], updates: Any,
                parent: int, index: int, log_level: str,
                log_json: bool | None) -> None:
    die_with_parent()
    if os.getppid() != parent:
        return  # the daemon died before we could tie our life to it
    # The daemon decides when we stop (after its own listener closed, answering every
    # sender still waiting), not systemd's SIGTERM to every process of the unit at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda *_: forward_hup(parent))
    log.setup(log_level, json=log_json)
    live = LiveConfig(first_settings(config_path, updates))
    stop = threading.Event()

    logger = log.get("router.intake")

    def follow() -> None:
        # Config from the daemon (validated and recorded there), and the signal to stop.
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                new = updates.get(timeout=0.2)
                live.swap(new, trigger="daemon")
                logger.info("intake_config_applied", version=new.digest[:16], index=index,
                            pid=os.getpid())
            if stop_event.is_set() or os.getppid() != parent:
                stop.set()

    threading.Thread(target=follow, name="intake-config", daemon=True).start()
    sys.setswitchinterval(0.0005)  # as the daemon's: the writer thread and the loop trade
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    runner(_serve(live, stop, wakes, index))


class IntakeProcess(ChildProcess):
    """A child accepting SMTP on the daemon's port; `index` numbers its spool. Its `stop`
    closes the listener and answers the senders still waiting for a commit."""

    kind = "intake"

    def __init__(self, config_path: Path, *, index: int, wakes: list[Doorbell],
                 log_level: str = "info", log_json: bool | None = None) -> None:
        super().__init__()
        self._args = (str(config_path), wakes, index, log_level, log_json)

    def _new_process(self) -> Any:
        path, wakes, index, log_level, log_json = self._args
        return self._ctx.Process(
            target=intake_main, name=f"router-intake-{index}",
            args=(path, self.stop_event, wakes, self.updates, os.getpid(), index,
                  log_level, log_json))
