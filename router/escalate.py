"""The escalation ladder: durable timers that tell people about tickets nobody answers.

Each team declares ordered steps in router.toml::

    escalation = [
      { before_breach = "10m", clock = "first_response", notify = ["assignee", "lead"] },
      { after = "15m", clock = "first_response", notify = ["lead"] },
      { after = "1h", notify = ["lead", "manager"], set_priority = "urgent" },
      { after = "2h", reassign = "tier2", webhook = "https://chat.example/hook" },
    ]

A step fires when its SLA clock (router.sla; ``first_response`` unless ``clock`` says
otherwise) has counted ``after`` of clock time, or ``before_breach`` before the clock's
target. Clock time is business time where the team's SLA counts business hours, so a 15m
step for a mail that came in on Friday at 18:00 fires on Monday at 09:15. Every running clock
also has an implicit ``breach`` step at its target, which records the breach (event
``sla_breached``) and sends nothing.

What a step does, in this order: ``notify`` mails the targets through the outbox (who, which
ticket, how long the customer has waited, the customer's words; template
``escalation/<team>.txt.j2`` else ``escalation/notify.txt.j2``); ``set_priority`` raises the
priority (never lowers it); ``reassign`` hands the ticket to another team, clears the
assignee, and from then on the new team's ladder applies: its steps that were already past at
that moment are recorded as *skipped*, not fired in a burst; ``webhook`` POSTs a JSON
description of the step (retried with backoff, at least once). Notify targets: ``assignee``
(the lead when nobody is assigned), ``lead`` (the team's lead and members with role lead),
``manager`` (likewise), ``team`` (every member) or a mail address; all resolved against the
team whose ladder holds the step, before a reassignment.

Durability: a ticket's next due time is ``ticket.next_due_at`` (indexed). The scheduler
sleeps until the earliest one, claims due tickets (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
the write lock on SQLite), fires what is due and computes the next due time, all in one
transaction with the notification mails. A fired step is a row in ``escalation`` under a
unique (ticket, clock, cycle, step) index, so each step fires once per ticket and clock cycle,
whichever daemon instance gets there first, and a step missed while the daemon was down fires
at the next start, late rather than never. ``cycle`` distinguishes the runs of the
next_response clock; it is 0 for the other clocks.

Replies recompute at once: the pipeline hook `sla_hook` for customer mail, `on_agent_reply`
and `on_status_change` for what agents do. A config with a changed ladder, calendar or SLA
recomputes every open ticket's due time when the scheduler notices it (at start or reload).
"""

from __future__ import annotations

import asyncio
import email.policy
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import ColumnElement, Connection, Engine, bindparam, func, insert, inspect, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from router import fastsql, log, sla
from router.ack import our_addresses, record_first_response
from router.clock import Clock, system_clock
from router.db import make_engine, storage_unavailable
from router.models import (
    T_ARTICLE,
    T_CUSTOMER,
    T_ESCALATION,
    T_EVENT,
    T_TICKET,
    ArticleKind,
    Escalation,
    Event,
    SlaClock,
    Ticket,
    TicketStatus,
)
from router.outbox import enqueue_core
from router.settings import PRIORITIES, EscalationStep, Problem, Settings, Team
from router.wakeup import Wakeup

if TYPE_CHECKING:
    from router.pipeline import Handled

KIND = "escalation"
BREACH = "breach"
TEMPLATE_DIR = "escalation"
DEFAULT_TEMPLATE = f"{TEMPLATE_DIR}/notify.txt.j2"
MAX_WORDS = 2000            # characters of the customer's message quoted in a notification
RETRY_BROKEN = timedelta(minutes=5)
WEBHOOK_ATTEMPTS = 5
WEBHOOK_LEASE = timedelta(minutes=1)
WEBHOOK_BACKOFF = timedelta(seconds=30)
OPEN_STATUSES = (TicketStatus.NEW, TicketStatus.OPEN, TicketStatus.PENDING)

CONTEXT_KEYS = frozenset({
    "company", "team", "team_name", "ticket_id", "token", "subject", "priority", "status",
    "assignee", "customer_name", "customer_email", "clock", "clock_label", "step", "waited",
    "on_clock", "business_hours", "started_at", "deadline", "breached", "late_by", "actions",
    "customer_words", "recipients",
})

# Statements the scheduler runs per ticket or per step, built once: building a statement
# costs a good part of what running it does.
_FIRED_KEYS = (select(Escalation.clock, Escalation.cycle, Escalation.step)
               .where(Escalation.ticket_id == bindparam("ticket_id")))
_BATCH_IDS = bindparam("ids", expanding=True)
_BATCH_CLOCKS = select(SlaClock).where(col(SlaClock.ticket_id).in_(_BATCH_IDS))
_BATCH_FIRED = (select(T_ESCALATION.c.ticket_id, T_ESCALATION.c.clock, T_ESCALATION.c.cycle,
                       T_ESCALATION.c.step)
                .where(T_ESCALATION.c.ticket_id.in_(_BATCH_IDS)))
_BATCH_CUSTOMERS = (select(T_CUSTOMER.c.id, T_CUSTOMER.c.name, T_CUSTOMER.c.email)
                    .where(T_CUSTOMER.c.id.in_(_BATCH_IDS)))
# The last customer message of each ticket.
_BATCH_WORDS = (
    select(T_ARTICLE.c.ticket_id, T_ARTICLE.c.body_text)
    .where(T_ARTICLE.c.id.in_(
        select(func.max(T_ARTICLE.c.id))
        .where(T_ARTICLE.c.ticket_id.in_(bindparam("tickets", expanding=True)),
               T_ARTICLE.c.kind == ArticleKind.IN)
        .group_by(T_ARTICLE.c.ticket_id).scalar_subquery())))
_INSERT_EVENT = insert(T_EVENT)
# The ticket columns firing changes (`_fire`, `reschedule`).
_FIRING_COLUMNS = frozenset({"priority", "team", "assignee", "updated_at", "next_due_at"})
_UPDATE_FIRED_TICKET = (update(T_TICKET).where(T_TICKET.c.id == bindparam("ticket_id"))
                        .values({c: bindparam(f"new_{c}") for c in sorted(_FIRING_COLUMNS)}))
# Every key always given (None where unused), so each dialect compiles one statement.
_INSERT_FIRED = {name: dialect.insert(T_ESCALATION).on_conflict_do_nothing()
                 .returning(T_ESCALATION.c.id)
                 for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))}


def _human(seconds: float) -> str:
    secs = round(max(seconds, 0.0))
    if secs < 60:
        return f"{secs}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return " ".join(parts)


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Planned:
    """A step of a running clock that has not fired yet, with its due time."""

    clock: str
    cycle: int
    key: str                   # "<team>:after=15m", or "breach"
    step: EscalationStep | None    # None: the implicit breach step
    due_at: datetime
    offset_s: float


def step_key(team: Team, step: EscalationStep) -> str:
    # The team is part of the key: after a reassignment the new team's "after=15m" is
    # another step than the old team's.
    return f"{team.name}:{step.key}"


FiredKeys = set[tuple[str, int, str]]


def fired_keys(conn: Connection, ticket_id: int) -> FiredKeys:
    rows = fastsql.execute(conn, _FIRED_KEYS, {"ticket_id": ticket_id}).all()
    return {(c, n, s) for c, n, s in rows}


def plan(clocks: Mapping[str, sla.ClockState], team: Team, fired: FiredKeys) -> list[Planned]:
    """Every unfired step of the team's running clocks, earliest first."""
    meter = sla.meter_for(team)
    out: list[Planned] = []
    for c in clocks.values():
        if not sla.is_running(c):
            continue
        steps: list[tuple[str, EscalationStep | None, float]] = [
            (BREACH, None, sla.target_seconds(team, c.clock))]
        steps += [(step_key(team, s), s, s.offset(team.sla).total_seconds())
                  for s in team.escalation if s.clock == c.clock]
        for key, step, offset in steps:
            if (c.clock, c.cycle, key) in fired or offset <= 0:
                continue
            due = sla.due_at(c, meter, offset)
            if due is not None:
                out.append(Planned(c.clock, c.cycle, key, step, due, offset))
    out.sort(key=lambda p: (p.due_at, p.offset_s, p.step is not None))
    return out


def reschedule(session: Session, ticket: Ticket, settings: Settings, *,
               clocks: dict[str, SlaClock] | None = None,
               fired: FiredKeys | None = None) -> datetime | None:
    """Recompute the clocks' deadlines and `ticket.next_due_at`, in the caller's session.
    `clocks` and `fired`, when the caller has them current, save two queries."""
    assert ticket.id is not None
    team = settings.team_by_name(ticket.team)
    if clocks is None:
        clocks = sla.clocks(session, ticket.id)
    if team is None:
        # The team left the config: nothing to count against; show it, don't escalate it.
        ticket.next_due_at = None
    else:
        session.add_all(clocks.values())
        replan(ticket, team, clocks, fired_keys(session.connection(), ticket.id)
               if fired is None else fired)
    session.add(ticket)
    return ticket.next_due_at


def replan(ticket: Ticket, team: Team, clocks: Mapping[str, SlaClock],
           fired: FiredKeys) -> None:
    """Set the clocks' deadlines and `ticket.next_due_at` from them, on the objects alone:
    writing them is the caller's."""
    for c in clocks.values():
        sla.refresh_deadline(c, team)
    pending = plan(clocks, team, fired)
    ticket.next_due_at = pending[0].due_at if pending else None


# ---------------------------------------------------------------------------- entry points


def _lock(session: Session, ticket_id: int) -> None:
    """Serialise with the scheduler on PostgreSQL: it holds the row while it fires steps."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Ticket.id).where(Ticket.id == ticket_id).with_for_update())


@dataclass(frozen=True)
class Opening:
    """A new ticket's SLA clocks and its first escalation due time. They depend only on the
    team, the arrival time and whether the clocks run, so the pipeline works them out
    before its write transaction (`SlaHook.ahead`)."""

    team: Team
    at: datetime
    running: bool
    clocks: list[sla.FreshClock]
    next_due_at: datetime | None


def opening(team: Team, at: datetime, *, running: bool) -> Opening:
    clocks = sla.opening(team, at, running=running)
    # Opened now: no step fired yet.
    pending = plan({c.clock: c for c in clocks}, team, set())
    return Opening(team, at, running, clocks, pending[0].due_at if pending else None)


class SlaHook:
    """`router.pipeline.Hook`: start or update the SLA clocks of the ticket just routed, and
    its next escalation due time, in the routing transaction."""

    def ahead(self, settings: Settings, inbound: Any, decision: Any) -> Opening | None:
        """For a message about to open a ticket, before the write lock: its `Opening`. A
        ticket opens `new`, and its clocks run."""
        team = settings.team_by_name(decision.team)
        return opening(team, inbound.received_at, running=True) if team is not None else None

    def __call__(self, conn: Connection, handled: Handled) -> None:
        settings = handled.settings
        ticket = handled.get(Ticket, handled.ticket_id)
        team = settings.team_by_name(ticket.team) if ticket is not None else None
        if ticket is None or team is None:
            return
        assert ticket.id is not None
        if handled.new_ticket:
            running = ticket.status in sla.RUNNING_STATUSES
            early = handled.early.get(self)
            # Worked out for the decision prepared early: the same team object (the same
            # config), arrival and state, or again now.
            if not (isinstance(early, Opening) and early.team is team
                    and early.at == handled.now and early.running == running):
                early = opening(team, handled.now, running=running)
            # Opened in this transaction: nothing else here changes its clocks, so they
            # need no place in the ORM session.
            sla.insert_fresh(conn, ticket.id, early.clocks)
            ticket.next_due_at = early.next_due_at
        elif handled.customer.email in our_addresses(settings):
            return  # staff writing on the thread (e.g. answering a notification): no clock
        else:
            clocks = sla.customer_reply(conn, ticket, team, handled.now)
            for c in clocks.values():
                handled.hold(c)  # what is set on them is written with the ticket
            replan(ticket, team, clocks, fired_keys(conn, ticket.id))


sla_hook = SlaHook()


def on_agent_reply(session: Session, ticket: Ticket, now: datetime, *,
                   settings: Settings) -> datetime | None:
    """A person answered the customer: stop the response clocks, settle the ack's promise,
    cancel the pending response steps. In the caller's transaction; after the commit call
    `EscalationScheduler.wake()`. Returns the ticket's new next due time."""
    assert ticket.id is not None
    _lock(session, ticket.id)
    record_first_response(session, ticket, now)
    team = settings.team_by_name(ticket.team)
    if team is not None:
        sla.agent_reply(session, ticket, team, now)
    return reschedule(session, ticket, settings)


def on_status_change(session: Session, ticket: Ticket, status: str, now: datetime, *,
                     settings: Settings) -> datetime | None:
    """Set the ticket's status and pause, resume or stop its clocks accordingly (pending
    pauses, new/open runs, solved/closed stops). Caller commits, then wakes the scheduler."""
    assert ticket.id is not None
    if status not in TicketStatus.ALL:
        raise ValueError(f"unknown ticket status {status!r}")
    _lock(session, ticket.id)
    ticket.status = status
    ticket.updated_at = now
    if status == TicketStatus.SOLVED and ticket.solved_at is None:
        ticket.solved_at = now
    team = settings.team_by_name(ticket.team)
    if team is not None:
        sla.status_changed(session, ticket, team, status, now)
    return reschedule(session, ticket, settings)


# ---------------------------------------------------------------------------- notifications


@lru_cache(maxsize=8)
def _environment(directory: Path) -> SandboxedEnvironment:
    return SandboxedEnvironment(loader=FileSystemLoader(str(directory)),
                                undefined=StrictUndefined, autoescape=False,
                                keep_trailing_newline=True)


def template_for(settings: Settings, team: Team) -> str:
    own = f"{TEMPLATE_DIR}/{team.name}.txt.j2"
    return own if (settings.templates_dir / own).is_file() else DEFAULT_TEMPLATE


def template_problems(settings: Settings) -> list[Problem]:
    """Escalation templates that are missing while a ladder notifies, or use unknown names."""
    out: list[Problem] = []
    root = settings.templates_dir
    notifying = [t for t in settings.team if any(s.notify for s in t.escalation)]
    if notifying and not (root / DEFAULT_TEMPLATE).is_file():
        out.append(Problem(str(root), "templates", f"{DEFAULT_TEMPLATE} is missing; teams "
                           f"{', '.join(t.name for t in notifying)} send escalation mail "
                           "(a built-in plain text is used until it exists)", None, "warning"))
    folder = root / TEMPLATE_DIR
    for path in sorted(folder.glob("*.txt.j2")) if folder.is_dir() else []:
        try:
            ast = _environment(root).parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, TemplateError) as exc:
            out.append(Problem(str(path), "templates", f"cannot use template: {exc}"))
            continue
        unknown = sorted(meta.find_undeclared_variables(ast) - CONTEXT_KEYS)
        if unknown:
            out.append(Problem(str(path), "templates", f"unknown variable(s) "
                               f"{', '.join(unknown)}; an escalation template can use "
                               f"{', '.join(sorted(CONTEXT_KEYS))}"))
    return out


@lru_cache(maxsize=256)
def _header(name: str, value: str | tuple[tuple[str, str], ...]) -> Any:
    """A parsed header (addresses as (name, address) pairs), kept for the next mail: the
    email package parses every header it is given, at more CPU than a step's SQL, and
    senders, recipients and a tick's Date recur. Header objects are immutable."""
    if isinstance(value, tuple):
        return email.policy.default.header_factory(
            name, [Address(display_name=n, addr_spec=a) for n, a in value])
    return email.policy.default.header_factory(name, value)


def _fallback_text(ctx: dict[str, Any]) -> str:
    lines = [f"Ticket {ctx['token']} \"{ctx['subject']}\" ({ctx['team']}) has waited "
             f"{ctx['waited']} for {ctx['clock_label']}.", ""]
    lines += [f"- {a}" for a in ctx["actions"]]
    lines += ["", f"{ctx['customer_name'] or ctx['customer_email']} wrote:", "",
              *(f"> {x}" for x in str(ctx["customer_words"]).splitlines())]
    return "\n".join(lines) + "\n"


def recipients(team: Team, ticket: Ticket, targets: list[str]) -> list[tuple[str, str]]:
    """(name, address) for each notify target, in order, without duplicates."""
    names = {m.email: m.name for m in team.members}
    out: list[str] = []

    def add(addr: str | None) -> None:
        if addr and addr.lower() not in out:
            out.append(addr.lower())

    for target in targets:
        if target == "assignee":
            add(ticket.assignee or team.lead)
        elif target == "lead":
            add(team.lead)
            for m in team.members:
                if m.role == "lead":
                    add(m.email)
        elif target == "manager":
            add(team.manager)
            for m in team.members:
                if m.role == "manager":
                    add(m.email)
        elif target == "team":
            for m in team.members:
                add(m.email)
        elif "@" in target:
            add(target)
    return [(names.get(a, ""), a) for a in out]


# ---------------------------------------------------------------------------- the scheduler


Sleep = Callable[[float], Awaitable[Any]]


class _AlreadyFired(Exception):
    """The fired-steps index already holds this step for this ticket."""


@dataclass
class _Fired:
    ticket_id: int
    clock: str
    step: str
    due_at: datetime
    fired_at: datetime
    mails: int = 0
    webhooks: list[int] = field(default_factory=list)


def _write_ticket(session: Session, conn: Connection, ticket: Ticket) -> None:
    """Write what firing changed on the ticket with Core and take it out of the session:
    the unit of work for this one row costs several times the UPDATE. A ticket with other
    changes is left to the session's flush."""
    state = inspect(ticket)
    if not state.modified or set(state.attrs.keys()) - state.unmodified - _FIRING_COLUMNS:
        return
    # All of them, changed or not: one statement to compile, and the row is ours (claimed
    # FOR UPDATE, or under SQLite's write lock), so rewriting a value changes nothing.
    conn.execute(_UPDATE_FIRED_TICKET, {"ticket_id": ticket.id, **{
        f"new_{c}": getattr(ticket, c) for c in _FIRING_COLUMNS}})
    session.expunge(ticket)


class _Batch:
    """What firing needs of the tickets one tick batch claimed, read with one query each
    rather than a few per ticket. Customers and customer words are read when the first
    notification needs them: a batch of breaches sends no mail."""

    def __init__(self, session: Session, tickets: Sequence[Ticket]) -> None:
        self._conn = session.connection()
        self.tickets = tickets
        ids = [t.id for t in tickets if t.id is not None]
        self.clocks: dict[int, dict[str, SlaClock]] = {i: {} for i in ids}
        for c in session.exec(_BATCH_CLOCKS, params={"ids": ids}).all():
            self.clocks[c.ticket_id][c.clock] = c
        self.fired: dict[int, FiredKeys] = {i: set() for i in ids}
        for r in self._conn.execute(_BATCH_FIRED, {"ids": ids}):
            self.fired[r.ticket_id].add((r.clock, r.cycle, r.step))
        self._customers: dict[int, tuple[str, str]] | None = None
        self._words: dict[int, str] = {}

    def customer(self, customer_id: int) -> tuple[str, str] | None:
        """(name, email) of a customer of the batch's tickets."""
        if self._customers is None:
            self._load_mail_context()
            assert self._customers is not None
        return self._customers.get(customer_id)

    def words(self, ticket_id: int) -> str:
        """The text of the ticket's last customer message; "" if there is none."""
        if self._customers is None:
            self._load_mail_context()
        return self._words.get(ticket_id, "")

    def _load_mail_context(self) -> None:
        customers = {t.customer_id for t in self.tickets}
        self._customers = {r.id: (r.name, r.email) for r in
                           self._conn.execute(_BATCH_CUSTOMERS, {"ids": list(customers)})}
        self._words = {tid: text or "" for tid, text in self._conn.execute(
            _BATCH_WORDS, {"tickets": list(self.clocks)})}


def _due(now: datetime, seen: set[int]) -> list[ColumnElement[bool]]:
    """What a tick fires: tickets due by `now`, other than those it handled already."""
    due = [T_TICKET.c.next_due_at <= now]
    if seen:
        due.append(T_TICKET.c.id.not_in(seen))
    return due


class EscalationScheduler:
    """Fires due ladder steps. Safe to run in several processes against one database.

    `tick()` fires everything due now (sync; tests call it with a FakeClock). `run(stop)`
    ticks, then sleeps until the earliest due time, or `max_sleep` (other processes, such as
    the pipeline workers and other instances, may set earlier due times that only the
    database tells us about; asking it costs one index lookup, so a quarter second keeps a
    step routed late by a lagging pipeline within that of its routing), or until `wake()`.
    `sleep` is awaited for those pauses: inject one that advances a
    FakeClock to run hours of SLA time in milliseconds.
    """

    def __init__(self, engine: Engine, settings_provider: Callable[[], Settings],
                 clock: Clock = system_clock, *, sleep: Sleep = asyncio.sleep,
                 batch: int = 100, max_sleep: float = 0.25,
                 on_fired: Callable[[], None] | None = None,
                 webhook_timeout: float = 5.0) -> None:
        self.engine = engine
        self.settings_provider = settings_provider
        self.clock = clock
        self.sleep = sleep
        self.batch = batch
        self.max_sleep = max_sleep
        self.on_fired = on_fired
        self.webhook_timeout = webhook_timeout
        self.postgres = engine.dialect.name == "postgresql"
        # SQLite: take the write lock at BEGIN, so two schedulers serialise instead of both
        # reading the same due tickets.
        self._write = (engine if self.postgres else
                       make_engine(engine.url.render_as_string(hide_password=False),
                                   immediate=True))
        self._own_write = self._write is not engine
        # The tick fails fast on a held SQLite lock and retries in sub-millisecond steps, as
        # intake does: SQLite's busy handler sleeps in steps up to 100 ms, which a pipeline
        # committing every few milliseconds would turn into late steps.
        self._tick_engine = (engine if self.postgres else
                             make_engine(engine.url.render_as_string(hide_password=False),
                                         immediate=True, busy_ms=0))
        self._wake = Wakeup()
        self._ladders: str | None = None
        self._log = log.get("router.escalate")
        self.fired = 0
        self.last_fired: list[_Fired] = []

    def close(self) -> None:
        if self._own_write:
            self._write.dispose()
            self._tick_engine.dispose()

    # -- wake-up ------------------------------------------------------------------------

    def wake(self) -> None:
        """A due time may have moved earlier: re-read it now. Callable from any thread."""
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._wake.bind(asyncio.get_running_loop())
        self._log.info("escalation scheduler started")
        pause = 0.5
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await asyncio.to_thread(self.check_config)
                    fired = await asyncio.to_thread(self.tick)
                    due = await asyncio.to_thread(self.next_due)
                    pause = 0.5
                except Exception as exc:
                    # The timers are in the database; an outage only delays them.
                    self._log.error("escalation pass failed",
                                    error=f"{type(exc).__name__}: {exc}", retry_in=pause)
                    await self._wait(stop, pause)
                    pause = min(pause * 2, 30.0)
                    continue
                delay = self.max_sleep
                if due is not None:
                    delay = min(delay, max((due - self.clock()).total_seconds(), 0.0))
                if delay <= 0 and not fired:
                    # Due but not ours to fire (another instance holds it): don't spin.
                    delay = min(0.05, self.max_sleep)
                await self._wait(stop, delay)
        finally:
            self._wake.bind(None)
            self._log.info("escalation scheduler stopped", fired=self.fired)

    async def _wait(self, stop: asyncio.Event, delay: float) -> None:
        await self._wake.wait(stop, sleep=self.sleep(delay))

    def next_due(self) -> datetime | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(T_TICKET.c.next_due_at))).scalar()

    # -- config changes -------------------------------------------------------------------

    def check_config(self) -> bool:
        """Recompute every open ticket's due time when the ladders, SLAs or calendars differ
        from those the stored due times were computed with. True if it did."""
        settings = self.settings_provider()
        digest = ladder_digest(settings)
        if digest == self._ladders:
            return False
        with Session(self.engine) as session:
            last = session.exec(select(Event.data).where(Event.kind == "escalation_config")
                                .order_by(col(Event.id).desc()).limit(1)).first()
        if last is not None and last.get("digest") == digest:
            self._ladders = digest
            return False
        started = time.monotonic()
        n = self.reschedule_all(settings)
        with Session(self._write) as session:
            session.add(Event(at=self.clock(), ticket_id=None, kind="escalation_config",
                              data={"digest": digest, "rescheduled": n}))
            session.commit()
        self._ladders = digest
        self._log.info("escalation due times recomputed", tickets=n,
                       seconds=round(time.monotonic() - started, 3))
        return True

    def reschedule_all(self, settings: Settings, chunk: int = 500) -> int:
        done, last_id = 0, 0
        while True:
            with Session(self._write, expire_on_commit=False) as session:
                q = (select(Ticket).where(col(Ticket.status).in_(OPEN_STATUSES))
                     .where(col(Ticket.id) > last_id).order_by(col(Ticket.id)).limit(chunk))
                if self.postgres:
                    # A ticket locked right now is being changed by someone who reschedules it.
                    q = q.with_for_update(skip_locked=True)
                tickets = session.exec(q).all()
                for t in tickets:
                    reschedule(session, t, settings)
                session.commit()
            if not tickets:
                return done
            done += len(tickets)
            last_id = max(t.id or 0 for t in tickets)

    # -- firing ---------------------------------------------------------------------------

    def tick(self) -> int:
        """Fire every step due now; the number of steps fired (skipped ones not counted)."""
        settings = self.settings_provider()
        now = self.clock()
        fired: list[_Fired] = []
        seen: set[int] = set()
        while True:
            claimed = self._tick_batch(settings, now, fired, seen)
            if claimed < self.batch:
                break
        self.last_fired = fired
        self.fired += len(fired)
        if any(f.webhooks for f in fired) or self._webhooks_waiting(now):
            self.post_webhooks()
        if fired and self.on_fired is not None:
            self.on_fired()
        return len(fired)

    def _tick_batch(self, settings: Settings, now: datetime, fired: list[_Fired],
                    seen: set[int]) -> int:
        if not self._any_due(now, seen):
            # Nothing to fire (nearly every tick): no write lock. On SQLite, taking it four
            # times a second fails while the pipeline writes and is retried every few ms,
            # which cost the intake process it shares an event loop's CPU with.
            return 0
        deadline = time.monotonic() + 10.0
        pause = 0.0002
        while True:
            # What a batch fired counts once its transaction committed, not before.
            batch_fired: list[_Fired] = []
            batch_seen: set[int] = set()
            try:
                claimed = self._tick_batch_once(settings, now, batch_fired, seen, batch_seen)
                fired.extend(batch_fired)
                seen.update(batch_seen)
                return claimed
            except OperationalError as exc:
                if self.postgres or "locked" not in str(exc.orig).lower() or (
                        time.monotonic() > deadline):
                    raise
                time.sleep(pause)
                pause = min(pause * 1.5, 0.002)

    def _any_due(self, now: datetime, seen: set[int]) -> bool:
        """A ticket due by `now`, other than those `seen`: read without the write lock,
        which `_tick_batch_once` then takes to fire them (and finds them again, or not, if
        another scheduler got there first)."""
        q = select(T_TICKET.c.id).where(*_due(now, seen)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    def _tick_batch_once(self, settings: Settings, now: datetime, fired: list[_Fired],
                         seen: set[int], batch_seen: set[int]) -> int:
        with Session(self._tick_engine, expire_on_commit=False) as session:
            q = (select(Ticket).where(*_due(now, seen))
                 .order_by(col(Ticket.next_due_at), col(Ticket.id)).limit(self.batch))
            if self.postgres:
                q = q.with_for_update(skip_locked=True)
            tickets = session.exec(q).all()
            batch = _Batch(session, tickets) if tickets else None
            for ticket in tickets:
                assert ticket.id is not None and batch is not None
                batch_seen.add(ticket.id)
                savepoint = session.begin_nested()
                try:
                    # Flush once per ticket, not before each of its queries.
                    with session.no_autoflush:
                        done = self._process(session, batch, ticket, settings, now)
                    savepoint.commit()
                    fired.extend(done)
                except _AlreadyFired as exc:
                    # Another instance got there first (only possible if row locks were
                    # bypassed); its work stands, ours is rolled back, mail included.
                    savepoint.rollback()
                    self._log.warning("escalation already fired", ticket=ticket.id,
                                      step=str(exc))
                except Exception as exc:
                    if storage_unavailable(exc):
                        # Not this ticket's fault: the pass fails and is tried again with
                        # `run`'s back-off, rather than this ticket waiting RETRY_BROKEN.
                        raise
                    # One broken ticket must not hold up the others' escalations.
                    savepoint.rollback()
                    session.execute(update(T_TICKET).where(T_TICKET.c.id == ticket.id)
                                    .values(next_due_at=now + RETRY_BROKEN))
                    self._log.error("escalation failed", ticket=ticket.id,
                                    error=f"{type(exc).__name__}: {exc}",
                                    retry_at=(now + RETRY_BROKEN).isoformat())
            session.commit()
        return len(tickets)

    def _process(self, session: Session, batch: _Batch, ticket: Ticket, settings: Settings,
                 now: datetime) -> list[_Fired]:
        assert ticket.id is not None
        out: list[_Fired] = []
        reassigned = False
        # The ticket's writes go to this connection, past the session; asking the session
        # for it also emits the ticket's SAVEPOINT, which the session would otherwise leave
        # until its own first statement, after ours, out of reach of the rollback.
        conn = session.connection()
        clocks = batch.clocks[ticket.id]
        fired = batch.fired[ticket.id]
        for _ in range(len(settings.team) + 1):
            team = settings.team_by_name(ticket.team)
            if team is None:
                break
            due = [p for p in plan(clocks, team, fired) if p.due_at <= now]
            if not due:
                break
            moved = False
            for p in due:
                fired.add((p.clock, p.cycle, p.key))
                if reassigned and p.step is not None:
                    # Past already when the ticket reached this team: recorded, not fired.
                    if self._record(conn, ticket, team, p, now, "skipped", {}) is None:
                        raise _AlreadyFired(p.key)
                    continue
                out.append(self._fire(session, conn, batch, ticket, team, clocks, p, now,
                                      settings))
                if ticket.team != team.name:
                    reassigned = moved = True
                    break
            if not moved:
                break
        when = reschedule(session, ticket, settings, clocks=clocks, fired=fired)
        if when is not None and when <= now:
            # Nothing left due should be due; never let one ticket spin the scheduler.
            self._log.error("escalation due time did not advance", ticket=ticket.id,
                            due=when.isoformat())
            ticket.next_due_at = now + RETRY_BROKEN
            session.add(ticket)
        _write_ticket(session, conn, ticket)
        return out

    def _record(self, conn: Connection, ticket: Ticket, team: Team, p: Planned,
                now: datetime, status: str, actions: dict[str, Any], *,
                webhook_url: str | None = None, webhook_status: str | None = None,
                webhook_next_at: datetime | None = None) -> int | None:
        """Insert the fired-step row; None if it exists already (another instance fired it)."""
        stmt = _INSERT_FIRED["postgresql" if self.postgres else "sqlite"]
        row_id: int | None = conn.execute(stmt, {
            "ticket_id": ticket.id, "clock": p.clock, "cycle": p.cycle, "step": p.key,
            "team": team.name, "status": status, "due_at": p.due_at, "fired_at": now,
            "actions": actions, "webhook_attempts": 0, "webhook_url": webhook_url,
            "webhook_status": webhook_status, "webhook_next_at": webhook_next_at}).scalar()
        return row_id

    def _fire(self, session: Session, conn: Connection, batch: _Batch, ticket: Ticket,
              team: Team, clocks: dict[str, SlaClock], p: Planned, now: datetime,
              settings: Settings) -> _Fired:
        """Do what step `p` says and record it; raises _AlreadyFired (the caller rolls the
        ticket's savepoint back, mail included) if the unique index says it fired before."""
        assert ticket.id is not None
        c = clocks[p.clock]
        meter = sla.meter_for(team)
        late = (now - p.due_at).total_seconds()
        result = _Fired(ticket.id, p.clock, p.key, p.due_at, now)
        actions: dict[str, Any] = {"late_s": round(late, 3)}
        bound = self._log.bind(ticket=ticket.id, team=team.name, clock=p.clock, step=p.key)
        if p.step is None:
            c.breached = True
            session.add(c)
            if self._record(conn, ticket, team, p, now, "fired", actions) is None:
                raise _AlreadyFired(p.key)
            conn.execute(_INSERT_EVENT, {
                "at": now, "ticket_id": ticket.id, "kind": "sla_breached",
                "data": {"clock": p.clock, "cycle": p.cycle, "target_s": p.offset_s,
                         "due_at": p.due_at.isoformat()}})
            bound.info("sla breached", late_s=round(late, 3))
            return result
        step = p.step
        to = recipients(team, ticket, step.notify)
        done: list[str] = []
        if step.set_priority and _rank(step.set_priority) > _rank(ticket.priority):
            actions["priority"] = {"from": ticket.priority, "to": step.set_priority}
            done.append(f"priority raised from {ticket.priority} to {step.set_priority}")
            ticket.priority = step.set_priority
        if step.reassign:
            new_team = settings.team_by_name(step.reassign)
            if new_team is None:
                actions["reassign_error"] = f"no team {step.reassign!r} in the config"
            else:
                actions["reassigned"] = {"from": team.name, "to": new_team.name,
                                         "assignee": ticket.assignee}
                done.append(f"handed over from {team.label} to {new_team.label}"
                            + (f" (was assigned to {ticket.assignee})" if ticket.assignee
                               else ""))
                sla.team_changed(session, ticket, team, new_team, now)
                ticket.team = new_team.name
                ticket.assignee = None
                conn.execute(_INSERT_EVENT, {
                    "at": now, "ticket_id": ticket.id, "kind": "reassigned",
                    "data": {"from": team.name, "to": new_team.name,
                             "by": f"escalation {p.key}"}})
        ticket.updated_at = now
        session.add(ticket)
        if to:
            ctx = self._context(batch, settings, team, ticket, c, p, meter, now, late, done,
                                to)
            msg = self._message(settings, team, ticket, ctx, to, now)
            actions["notified"] = [a for _n, a in to]
            actions["outbox_id"] = enqueue_core(
                conn, kind=KIND, msg=msg, ticket_id=ticket.id, customer_id=None,
                now=now, hostname=settings.smtp.hostname)
            result.mails = 1
        values: dict[str, Any] = {}
        if step.webhook:
            actions["webhook_body"] = {
                "event": "escalation", "ticket_id": ticket.id, "team": team.name,
                "clock": p.clock, "cycle": p.cycle, "step": p.key,
                "due_at": p.due_at.isoformat(), "fired_at": now.isoformat(),
                "waited_s": round((now - c.started_at).total_seconds()),
                "on_clock_s": round(sla.elapsed(c, meter, now)), "subject": ticket.subject,
                "priority": ticket.priority, "assignee": ticket.assignee,
                "notified": [a for _n, a in to], "actions": done}
            values.update(webhook_url=step.webhook, webhook_status="pending",
                          webhook_next_at=now)
        row_id = self._record(conn, ticket, team, p, now, "fired", actions, **values)
        if row_id is None:
            raise _AlreadyFired(p.key)
        if step.webhook:
            result.webhooks.append(row_id)
        conn.execute(_INSERT_EVENT, {
            "at": now, "ticket_id": ticket.id, "kind": "escalation",
            "data": {"clock": p.clock, "cycle": p.cycle, "step": p.key,
                     "due_at": p.due_at.isoformat(), "late_s": round(late, 3),
                     "notified": [a for _n, a in to], "actions": done}})
        bound.info("escalation fired", late_s=round(late, 3), notified=[a for _n, a in to],
                   actions=done)
        return result

    def _context(self, batch: _Batch, settings: Settings, team: Team, ticket: Ticket,
                 c: SlaClock, p: Planned, meter: sla.Meter, now: datetime, late: float,
                 done: list[str], to: list[tuple[str, str]]) -> dict[str, Any]:
        assert ticket.id is not None
        customer = batch.customer(ticket.customer_id)
        words = batch.words(ticket.id)
        if len(words) > MAX_WORDS:
            words = words[:MAX_WORDS].rstrip() + " [...]"
        zone = ZoneInfo(team.timezone)
        target = sla.target_seconds(team, c.clock)
        deadline = sla.due_at(c, meter, target)
        label = p.clock.replace("_", " ")
        if p.step is not None and p.step.before_breach is not None:
            desc = f"{_human(p.step.before_breach.total_seconds())} before the {label} target"
        else:
            desc = f"{_human(p.offset_s)} on the {label} clock"
        return {
            "company": settings.router.name, "team": team.label, "team_name": team.name,
            "ticket_id": ticket.id,
            "token": settings.router.ticket_token.replace("{id}", str(ticket.id)),
            "subject": ticket.subject, "priority": ticket.priority, "status": ticket.status,
            "assignee": ticket.assignee or "",
            "customer_name": customer[0] if customer else "",
            "customer_email": customer[1] if customer else "",
            "clock": p.clock, "clock_label": label, "step": desc,
            "waited": _human((now - c.started_at).total_seconds()),
            "on_clock": _human(sla.elapsed(c, meter, now)),
            "business_hours": meter.business,
            "started_at": c.started_at.astimezone(zone).strftime("%a %d %b %Y %H:%M %Z"),
            "deadline": (deadline.astimezone(zone).strftime("%a %d %b %Y %H:%M %Z")
                         if deadline else ""),
            "breached": sla.elapsed(c, meter, now) >= target,
            "late_by": _human(late) if late >= 60 else "",
            "actions": done, "customer_words": words,
            "recipients": [n or a for n, a in to],
        }

    def _message(self, settings: Settings, team: Team, ticket: Ticket, ctx: dict[str, Any],
                 to: list[tuple[str, str]], now: datetime) -> EmailMessage:
        try:
            text = (_environment(settings.templates_dir)
                    .get_template(template_for(settings, team)).render(ctx))
        except (TemplateError, OSError) as exc:
            # A broken template must not silence an escalation: send the plain version.
            self._log.error("escalation template failed", ticket=ticket.id,
                            error=f"{type(exc).__name__}: {exc}")
            text = _fallback_text(ctx)
        msg = EmailMessage()
        msg["From"] = _header("From", ((f"{team.label} escalations", ticket.address),))
        msg["To"] = _header("To", tuple(to))
        msg["Subject"] = (f"[Escalation] {ctx['token']} {ticket.subject} — waiting "
                          f"{ctx['waited']} for {ctx['clock_label']}")
        # RFC 3834: automatic mail; out-of-office robots must not answer it.
        msg["Auto-Submitted"] = _header("Auto-Submitted", "auto-generated")
        msg["X-Auto-Response-Suppress"] = _header("X-Auto-Response-Suppress", "All")
        msg["X-Router-Ticket"] = str(ticket.id)
        msg.set_content(text, cte="quoted-printable")
        # What the outbox would add, in its order, but with the tick's Date parsed once.
        msg["Message-ID"] = make_msgid(domain=settings.smtp.hostname)
        msg["Date"] = _header("Date", format_datetime(now))
        return msg

    # -- webhooks -------------------------------------------------------------------------

    def _webhooks_waiting(self, now: datetime) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(T_ESCALATION.c.id).where(
                T_ESCALATION.c.webhook_status == "pending", T_ESCALATION.c.webhook_next_at <= now)
                .limit(1)).first() is not None

    def post_webhooks(self) -> int:
        """POST the due webhook calls; at least once, retried with backoff. Posted count."""
        now = self.clock()
        due = ((T_ESCALATION.c.webhook_status == "pending")
               & (T_ESCALATION.c.webhook_next_at <= now))
        pick = (select(T_ESCALATION.c.id).where(due)
                .order_by(T_ESCALATION.c.webhook_next_at).limit(50))
        if self.postgres:
            pick = pick.with_for_update(skip_locked=True)
        # Claim with a lease first, post outside the transaction: a slow endpoint must not
        # hold the database, and a crash mid-post retries when the lease runs out.
        with self._write.begin() as conn:
            rows = conn.execute(update(T_ESCALATION).where(T_ESCALATION.c.id.in_(pick), due)
                                .values(webhook_next_at=now + WEBHOOK_LEASE)
                                .returning(T_ESCALATION.c.id, T_ESCALATION.c.webhook_url,
                                           T_ESCALATION.c.actions,
                                           T_ESCALATION.c.webhook_attempts,
                                           T_ESCALATION.c.ticket_id)).all()
        sent = 0
        for r in rows:
            error = _post(r.webhook_url, (r.actions or {}).get("webhook_body", {}),
                          self.webhook_timeout)
            attempts = r.webhook_attempts + 1
            values: dict[str, Any] = {"webhook_attempts": attempts, "webhook_error": error}
            if error is None:
                values.update(webhook_status="sent", webhook_next_at=None)
                sent += 1
            elif attempts >= WEBHOOK_ATTEMPTS:
                values.update(webhook_status="failed", webhook_next_at=None)
            else:
                values["webhook_next_at"] = self.clock() + WEBHOOK_BACKOFF * 2 ** (attempts - 1)
            with self._write.begin() as conn:
                conn.execute(update(T_ESCALATION).where(T_ESCALATION.c.id == r.id).values(**values))
            report = self._log.info if error is None else self._log.warning
            report("escalation webhook", ticket=r.ticket_id, url=r.webhook_url,
                   attempts=attempts, error=error)
        return sent


def _post(url: str, body: dict[str, Any], timeout: float) -> str | None:
    """One POST; None on a 2xx answer, else what went wrong."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "router-escalation"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _rank(priority: str) -> int:
    return PRIORITIES.index(priority) if priority in PRIORITIES else -1


def ladder_digest(settings: Settings) -> str:
    """What the stored due times depend on: each team's SLA, calendar and ladder."""
    data = [[t.name, t.timezone, t.business_hours, t.holidays.model_dump(mode="json"),
             t.sla.model_dump(mode="json"), [s.model_dump(mode="json") for s in t.escalation]]
            for t in settings.team]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def history(session: Session, ticket_id: int) -> list[dict[str, Any]]:
    """The ticket's fired and skipped steps, oldest first (for `router tickets show`)."""
    rows = session.exec(select(Escalation).where(Escalation.ticket_id == ticket_id)
                        .order_by(col(Escalation.fired_at), col(Escalation.id))).all()
    return [{"clock": r.clock, "cycle": r.cycle, "step": r.step, "team": r.team,
             "status": r.status, "due_at": r.due_at.isoformat(),
             "fired_at": r.fired_at.isoformat(),
             "late_s": (r.fired_at - r.due_at).total_seconds(),
             "notified": r.actions.get("notified", []),
             "priority": r.actions.get("priority"), "reassigned": r.actions.get("reassigned"),
             "webhook": ({"url": r.webhook_url, "status": r.webhook_status,
                          "attempts": r.webhook_attempts, "error": r.webhook_error}
                         if r.webhook_url else None)}
            for r in rows]
