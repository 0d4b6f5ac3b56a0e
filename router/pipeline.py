"""Everything after acceptance: parse → thread → classify → route, from the stored message.

The worker reads a batch of new inbound rows, parses them outside any write transaction
(parsing is the expensive part), then handles the batch in one short write transaction with a
savepoint per message. A message whose handling raises is *parked* with its traceback and the
rest of the batch commits; nothing is dropped, nothing blocks. A crash anywhere rolls the
batch back to "new", so a restart processes it again from the stored bytes.

On PostgreSQL the batch is claimed with ``FOR UPDATE SKIP LOCKED`` so several daemon
instances share the work; on SQLite the write transaction begins IMMEDIATE.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Engine, select as sa_select
from sqlalchemy.orm import defer
from sqlmodel import Session, select

from router import log
from router.classify import classify
from router.clock import Clock, system_clock
from router.db import is_sqlite, make_engine
from router.language import detect_language
from router.mail import ParsedMail, normalize_address, parse
from router.models import Article, Customer, Inbound, InboundStatus, Ticket
from router.route import customer_for, find_thread, open_ticket, thread_onto
from router.rules import Context
from router.settings import Settings

INBOUND = Inbound.__table__  # type: ignore[attr-defined]
UNKNOWN_SENDER = "unknown-sender@invalid"


@dataclass
class Handled:
    """What the pipeline did with one message; handed to the hooks that run after routing."""

    inbound: Inbound
    parsed: ParsedMail
    ticket: Ticket
    article: Article
    customer: Customer
    new_ticket: bool
    settings: Settings
    now: datetime


class Hook(Protocol):
    def __call__(self, session: Session, handled: Handled) -> None: ...


class Pipeline:
    def __init__(self, url: str, settings_provider: Callable[[], Settings], *,
                 clock: Clock = system_clock, batch_size: int = 64,
                 hooks: list[Hook] | None = None) -> None:
        self.read_engine: Engine = make_engine(url)
        self.write_engine: Engine = make_engine(url, immediate=True)
        self.sqlite = is_sqlite(url)
        self.settings_provider = settings_provider
        self.clock = clock
        self.batch_size = batch_size
        self.hooks: list[Hook] = list(hooks or [])
        self.wake = threading.Event()
        self._log = log.get("router.pipeline")
        self.processed = 0
        self.parked = 0

    def close(self) -> None:
        self.read_engine.dispose()
        self.write_engine.dispose()

    # ------------------------------------------------------------------ one batch

    def process_batch(self) -> int:
        with self.read_engine.connect() as conn:
            rows = conn.execute(
                sa_select(INBOUND.c.id, INBOUND.c.raw)
                .where(INBOUND.c.status == InboundStatus.NEW)
                .order_by(INBOUND.c.id).limit(self.batch_size)).all()
        if not rows:
            return 0
        parsed: dict[int, ParsedMail | BaseException] = {}
        for row in rows:
            try:
                parsed[row.id] = parse(row.raw)
            except Exception as exc:  # parse() promises not to raise; park if it ever does
                parsed[row.id] = exc
        # One config for the whole batch: a message finishes under the config it started with.
        settings = self.settings_provider()
        with Session(self.write_engine, expire_on_commit=False) as session:
            query = (select(Inbound).options(defer(Inbound.raw))  # type: ignore[arg-type]
                     .where(Inbound.id.in_(list(parsed)))  # type: ignore[union-attr]
                     .where(Inbound.status == InboundStatus.NEW)
                     .order_by(Inbound.id))  # type: ignore[arg-type]
            if not self.sqlite:
                query = query.with_for_update(skip_locked=True)
            for inbound in session.exec(query).all():
                self._handle_one(session, inbound, parsed[inbound.id], settings)
            session.commit()
        return len(rows)

    def _handle_one(self, session: Session, inbound: Inbound,
                    parsed: ParsedMail | BaseException, settings: Settings) -> None:
        inbound_id = inbound.id
        savepoint = session.begin_nested()
        try:
            if isinstance(parsed, BaseException):
                raise parsed
            self.handle(session, inbound, parsed, settings)
            savepoint.commit()
            self.processed += 1
        except Exception as exc:
            savepoint.rollback()
            tb = traceback.format_exc()
            inbound = session.get(Inbound, inbound_id)  # type: ignore[assignment]
            inbound.status = InboundStatus.PARKED
            inbound.error = tb
            inbound.attempts += 1
            inbound.processed_at = self.clock()
            self.parked += 1
            self._log.error("message_parked", inbound_id=inbound_id,
                            error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ one message

    def handle(self, session: Session, inbound: Inbound, parsed: ParsedMail,
               settings: Settings) -> Handled:
        at = inbound.received_at  # SLA clocks start when the mail arrived, not when we got to it
        sender = (parsed.sender_email or normalize_address(inbound.mail_from)
                  or UNKNOWN_SENDER)
        customer = customer_for(session, sender, parsed.sender_name, at)
        version = settings.digest[:16] or None
        match = find_thread(session, parsed, settings)
        if match is not None:
            article = thread_onto(session, match, parsed=parsed, inbound=inbound,
                                  config_version=version, now=at)
            ticket, new = match.ticket, False
        else:
            context = Context(settings=settings, envelope_rcpts=list(inbound.rcpt_to),
                              envelope_sender=inbound.mail_from, now=at)
            decision = classify(parsed, context)
            language = detect_language(parsed) or customer.language
            if language and not customer.language:
                customer.language = language
            ticket, article = open_ticket(session, decision=decision, customer=customer,
                                          parsed=parsed, inbound=inbound, language=language,
                                          config_version=version, now=at)
            new = True
        inbound.status = InboundStatus.DONE
        inbound.ticket_id = ticket.id
        inbound.processed_at = self.clock()
        handled = Handled(inbound, parsed, ticket, article, customer, new, settings, at)
        for hook in self.hooks:
            hook(session, handled)
        return handled

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, idle_poll: float = 0.2) -> None:
        """Process until `stop` is set; sleep on `wake` (or a short poll, for mail committed
        by another process) when idle; back off while the database is unreachable."""
        backoff = 0.5
        while not stop.is_set():
            try:
                n = self.process_batch()
                backoff = 0.5
            except Exception as exc:
                self._log.error("pipeline_error", error=f"{type(exc).__name__}: {exc}")
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if n == 0:
                self.wake.wait(idle_poll)
                self.wake.clear()

    def drain(self, timeout: float = 30.0) -> int:
        """Process until nothing new is left (tools and tests)."""
        deadline = time.monotonic() + timeout
        total = 0
        while time.monotonic() < deadline:
            n = self.process_batch()
            if n == 0:
                return total
            total += n
        raise TimeoutError("pipeline did not drain in time")


def retry_parked(engine: Engine, inbound_ids: list[int] | None = None) -> int:
    """Put parked messages back in line (after an admin fixed the cause)."""
    from sqlalchemy import update

    stmt = update(INBOUND).where(INBOUND.c.status == InboundStatus.PARKED)
    if inbound_ids:
        stmt = stmt.where(INBOUND.c.id.in_(inbound_ids))
    with engine.begin() as conn:
        return int(conn.execute(stmt.values(status=InboundStatus.NEW)).rowcount)
