"""Run router for tests: the real `router serve` subprocess, or the intake and pipeline in
process on the test's event loop; plus polling helpers for eventual conditions.

In-process routers come from `inproc_routers`, wrapped in a fixture by each test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func
from sqlmodel import Session, select

from router import db
from router import settings as config
from router.intake.accept import Acceptor, Envelope, accept_sync
from router.intake.smtp import IntakeHandler, start_server
from router.intake.spool import unmoved_count
from router.models import Inbound, Ticket
from router.pipeline import Hook, Pipeline
from router.rules.address import resolve_address
from tests.conftest import REPO, write_config

T = TypeVar("T")


# ---------------------------------------------------------------------------- polling

def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll until `predicate()` is truthy; return its value or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def count_rows(db_url: str, model: Any) -> int:
    engine = db.make_engine(db_url)
    try:
        with Session(engine) as session:
            return int(session.exec(select(func.count()).select_from(model)).one())
    finally:
        engine.dispose()


def inbound_rows(db_url: str) -> list[Inbound]:
    """Every stored inbound row, in id order (raw bytes included)."""
    engine = db.make_engine(db_url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            return list(session.exec(select(Inbound).order_by(Inbound.id)).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


def stored_count(db_url: str) -> int:
    """Messages stored: in inbound, or still in an intake spool (router.intake.spool)."""
    return len(inbound_rows(db_url)) + unmoved_count(db_url)


def wait_for_tickets(db_url: str, n: int, timeout: float = 20.0) -> list[Ticket]:
    """Poll the database until it holds at least `n` tickets; return them in id order."""
    def tickets() -> list[Ticket] | None:
        engine = db.make_engine(db_url)
        try:
            with Session(engine, expire_on_commit=False) as session:
                rows = list(session.exec(select(Ticket).order_by(Ticket.id)).all())  # type: ignore[arg-type]
        except Exception:  # the schema may not exist yet while the daemon starts
            return None
        finally:
            engine.dispose()
        return rows if len(rows) >= n else None

    return wait_until(tickets, timeout, 0.1, f"{n} ticket(s) in {db_url}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def send_smtp(port: int, raw: bytes, rcpts: list[str], mail_from: str = "c@example.org",
              host: str = "127.0.0.1") -> dict[str, tuple[int, bytes]]:
    """Blocking: one SMTP transaction with smtplib; raises on any refusal."""
    with smtplib.SMTP(host, port, timeout=30) as client:
        return client.sendmail(mail_from, rcpts, raw)


# ---------------------------------------------------------------------------- mail

def make_mail(*, subject: str = "Hello", frm: str = "Alice <alice@example.org>",
              to: str = "support@acme.test", cc: str | None = None,
              body: str = "Please help.\n", message_id: str | None = None,
              in_reply_to: str | None = None, references: str | None = None,
              headers: dict[str, str] | None = None) -> bytes:
    """A well-formed message with CRLF line ends and a fresh Message-ID."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = frm
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = message_id or email.utils.make_msgid(domain="example.org")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    return msg.as_bytes()


# ---------------------------------------------------------------------------- subprocess

@dataclass
class RouterProcess:
    """`router serve` running as a child process, logging JSON lines to a file."""

    config: Path
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM; the daemon must exit 0 after logging ``router_stopped``."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"router did not stop on SIGTERM:\n{self.log}") from None
        text = self.log
        assert rc == 0, f"router exited {rc}:\n{text}"
        assert "router_stopped" in text, text
        return text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def start_router(config_path: Path, *, timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> RouterProcess:
    """Start ``router serve -c CONFIG --log-json`` and wait until SMTP accepts connections."""
    settings = config.load(config_path)
    host, port = settings.smtp.host, settings.smtp.port
    log_path = config_path.with_name(f"router-{port}.log")
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "-c", str(config_path), "--log-json"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=full_env, cwd=str(REPO))
    rp = RouterProcess(config_path, host, port, proc, log_path)
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if proc.poll() is not None:
            raise AssertionError(f"router exited {proc.returncode} on start:\n{rp.log}")
        if time.monotonic() > deadline:
            rp.kill()
            raise AssertionError(f"router did not open {host}:{port}:\n{rp.log}")
        time.sleep(0.05)
    return rp


def run_cli(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """``python -m router ARGS...`` as a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "router", *args], input=stdin,
                          capture_output=True, env=full_env, cwd=str(REPO), timeout=timeout,
                          check=False)


# ---------------------------------------------------------------------------- in process

@dataclass
class Store:
    """A migrated database and its config, without servers: accept, then drain by hand."""

    config_path: Path
    settings: config.Settings
    url: str
    engine: Any
    pipeline: Pipeline

    def current_settings(self) -> config.Settings:
        return self.settings

    def accept(self, raw: bytes, rcpts: list[str] | None = None, mail_from: str = "",
               channel: str = "smtp") -> None:
        accept_sync(self.engine, Envelope(channel, mail_from, rcpts or ["support@acme.test"],
                                          raw))

    def new_pipeline(self, hooks: list[Hook] | None = None) -> Pipeline:
        return Pipeline(self.url, self.current_settings, hooks=hooks)

    def drain(self, pipeline: Pipeline | None = None) -> int:
        return (pipeline or self.pipeline).drain()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.pipeline.close()
        self.engine.dispose()


@contextlib.contextmanager
def open_store(directory: Path, *, db_url: str | None = None, extra: str = "",
               hooks: list[Hook] | None = None) -> Iterator[Store]:
    path = write_config(directory, db_url=db_url, extra=extra)
    settings = config.load(path)
    url = settings.database_url
    db.upgrade(url)
    holder: list[Store] = []
    store = Store(path, settings, url, db.make_engine(url),
                  Pipeline(url, lambda: holder[0].settings, hooks=hooks))
    holder.append(store)
    try:
        yield store
    finally:
        store.close()


@dataclass
class InProcessRouter:
    """Acceptor + SMTP/LMTP server on the running loop, and a Pipeline to drain by hand."""

    config_path: Path
    settings: config.Settings
    url: str
    engine: Any
    acceptor: Acceptor
    handler: IntakeHandler
    server: asyncio.Server
    pipeline: Pipeline
    host: str
    port: int
    _stopped: bool = field(default=False)

    def current_settings(self) -> config.Settings:
        return self.settings

    def owns_address(self, address: str) -> bool:
        return resolve_address(self.settings, address) is not None

    async def drain(self, pipeline: Pipeline | None = None) -> int:
        return await asyncio.to_thread((pipeline or self.pipeline).drain)

    def new_pipeline(self, hooks: list[Hook] | None = None) -> Pipeline:
        return Pipeline(self.url, self.current_settings, hooks=hooks)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.close()
        await self.server.wait_closed()
        await self.acceptor.stop()
        self.pipeline.close()
        self.engine.dispose()


MakeRouter = Callable[..., Awaitable[InProcessRouter]]


async def start_inproc(directory: Path, *, db_url: str | None = None, protocol: str = "smtp",
                       max_size: str = "1MB", migrate: bool = True, extra: str = "",
                       hooks: list[Hook] | None = None) -> InProcessRouter:
    path = write_config(directory, db_url=db_url, protocol=protocol, max_size=max_size,
                        extra=extra)
    settings = config.load(path)
    url = settings.database_url
    if migrate:
        await asyncio.to_thread(db.upgrade, url)
    engine = db.make_engine(url)
    acceptor = Acceptor(engine)
    await acceptor.start()
    holder: dict[str, InProcessRouter] = {}
    handler = IntakeHandler(acceptor, lambda a: holder["r"].owns_address(a),
                            channel=settings.smtp.protocol)
    server = await start_server(handler, settings.smtp.host, settings.smtp.port,
                                hostname=settings.smtp.hostname,
                                max_size=settings.smtp.max_message_size)
    r = InProcessRouter(path, settings, url, engine, acceptor, handler, server,
                        Pipeline(url, lambda: holder["r"].settings, hooks=hooks),
                        settings.smtp.host, settings.smtp.port)
    holder["r"] = r
    return r


@contextlib.asynccontextmanager
async def inproc_routers(directory: Path) -> AsyncIterator[MakeRouter]:
    """Factory for in-process routers, all stopped on exit. Test modules wrap it in a
    fixture: ``r = await inproc(protocol="lmtp", db_url=...)``."""
    started: list[InProcessRouter] = []

    async def make(**kw: Any) -> InProcessRouter:
        r = await start_inproc(directory / f"etc{len(started)}", **kw)
        started.append(r)
        return r

    try:
        yield make
    finally:
        for r in reversed(started):
            await r.stop()
