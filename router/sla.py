"""SLA clocks: how long a customer has been waiting, per ticket, on three clocks.

Every clock counts *clock time*: business seconds of the team's calendar where the team's
``sla.business_hours`` is true (nights, weekends and holidays do not count), else plain
seconds. A clock is *running*, *paused* or *stopped*; it counts only while it runs.

``first_response``
    starts when the ticket's first message arrived (its ``created_at``, the arrival time,
    not the time the pipeline got to it); stops at the first reply by a person
    (`router.escalate.on_agent_reply`, which also settles the ack's promise). Customer
    follow-ups before that answer do not restart it: the customer has waited since the first.
``next_response``
    starts when a customer writes after a person has answered; one *cycle* per unanswered
    run of customer mail: a second customer mail before the answer does not restart it.
    Stops at the next reply by a person. A new customer mail after that starts cycle n+1,
    with the ladder's next_response steps armed again.
``resolution``
    starts with the ticket; stops when the ticket is solved or closed. A customer mail that
    reopens a solved ticket resumes it where it stopped (the time already counted stays).

Pauses: every running clock pauses while the ticket is ``pending`` (waiting for the
customer) and resumes when the ticket is ``new`` or ``open`` again, by a customer mail (the
pipeline reopens the ticket) or by an agent. Solving or closing a ticket stops every clock.
Mail threaded onto a ticket from one of our own addresses (a lead answering an escalation
notice) is not a customer message and does not touch the clocks.

A clock is *overdue* while it runs past its team's target (`deadline_at`); a stopped clock
that ran past its target is recorded as ``breached``.

Functions here change clock rows in the caller's session and transaction; the caller
recomputes the ticket's next escalation due time afterwards (`router.escalate.reschedule`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select

from router import fastsql, log
from router.calendar import BusinessCalendar
from router.models import T_SLA_CLOCK, SlaClock, Ticket, TicketStatus, loaded
from router.settings import SLA_CLOCKS, Team

FIRST_RESPONSE, NEXT_RESPONSE, RESOLUTION = SLA_CLOCKS
RUNNING_STATUSES = frozenset({TicketStatus.NEW, TicketStatus.OPEN})
STOPPED_STATUSES = frozenset({TicketStatus.SOLVED, TicketStatus.CLOSED})
_INS_CLOCK = insert(T_SLA_CLOCK)
_SEL_CLOCKS = select(T_SLA_CLOCK).where(T_SLA_CLOCK.c.ticket_id == bindparam("tid"))


class Meter:
    """Measures clock time for one team: business seconds or plain seconds."""

    def __init__(self, calendar: BusinessCalendar | None) -> None:
        self.calendar = calendar

    @property
    def business(self) -> bool:
        return self.calendar is not None

    def span(self, start: datetime, end: datetime) -> float:
        if self.calendar is not None:
            return self.calendar.business_seconds(start, end)
        return max(0.0, (end - start).total_seconds())

    def add(self, start: datetime, seconds: float) -> datetime:
        if self.calendar is not None:
            return self.calendar.add_business(start, seconds)
        return start + timedelta(seconds=seconds)


_WALL = Meter(None)
_meters: dict[tuple[str, ...], Meter] = {}


def meter_for(team: Team) -> Meter:
    """The team's meter; cached, as building a calendar loads its holiday tables."""
    if not team.sla.business_hours:
        return _WALL
    key = (team.name, team.timezone, repr(team.business_hours),
           team.holidays.model_dump_json())
    meter = _meters.get(key)
    if meter is None:
        try:
            meter = Meter(BusinessCalendar.cached_for_team(team))
        except ValueError as exc:
            # A calendar that is never open would make every deadline infinite; counting
            # around the clock escalates too early rather than never. `router check` names it.
            log.get("router.sla").error("sla calendar unusable, counting around the clock",
                                        team=team.name, error=str(exc))
            meter = _WALL
        if len(_meters) > 256:
            _meters.clear()
        _meters[key] = meter
    return meter


def target_seconds(team: Team, clock: str) -> float:
    target: timedelta = getattr(team.sla, clock)
    return target.total_seconds()


# ---------------------------------------------------------------------------- one clock


@dataclass(frozen=True)
class FreshClock:
    """A clock as it starts, before it has a row: plain values, which cost a fraction of an
    ORM object to make, and can be worked out before the ticket's transaction."""

    clock: str
    cycle: int
    started_at: datetime
    running_since: datetime | None
    deadline_at: datetime | None = None
    elapsed: float = 0.0
    stopped_at: datetime | None = None
    breached: bool = False

    def row(self, ticket_id: int) -> dict[str, Any]:
        return {"ticket_id": ticket_id, **vars(self)}  # the fields are the table's columns


# What planning reads of a clock: its row, or one about to be written.
ClockState = SlaClock | FreshClock


def is_running(c: ClockState) -> bool:
    return c.running_since is not None and c.stopped_at is None


def elapsed(c: SlaClock, meter: Meter, now: datetime) -> float:
    """Clock time counted so far."""
    if c.running_since is None or c.stopped_at is not None:
        return c.elapsed
    return c.elapsed + meter.span(c.running_since, now)


def due_at(c: ClockState, meter: Meter, offset: float) -> datetime | None:
    """When the running clock reaches `offset` seconds of clock time; None unless running.
    An offset already passed is due at once (`running_since`)."""
    if c.running_since is None or c.stopped_at is not None:
        return None
    remaining = offset - c.elapsed
    if remaining <= 0:
        return c.running_since
    return meter.add(c.running_since, remaining)


def refresh_deadline(c: SlaClock, team: Team) -> None:
    deadline = due_at(c, meter_for(team), target_seconds(team, c.clock))
    # Assigning an equal value would still mark the column changed, to be written.
    if deadline != c.deadline_at:
        c.deadline_at = deadline


def _pause(c: SlaClock, team: Team, now: datetime) -> None:
    if not is_running(c):
        return
    assert c.running_since is not None
    c.elapsed += meter_for(team).span(c.running_since, now)
    c.running_since = None
    c.deadline_at = None


def _resume(c: SlaClock, team: Team, now: datetime) -> None:
    if c.stopped_at is not None or c.running_since is not None:
        return
    c.running_since = now
    refresh_deadline(c, team)


def _stop(c: SlaClock, team: Team, now: datetime) -> None:
    if c.stopped_at is not None:
        return
    _pause(c, team, now)
    c.stopped_at = now
    if c.elapsed >= target_seconds(team, c.clock):
        c.breached = True


def _unstop(c: SlaClock, team: Team, now: datetime) -> None:
    c.stopped_at = None
    _resume(c, team, now)


# ---------------------------------------------------------------------------- a ticket's clocks


def clocks(session: Session, ticket_id: int) -> dict[str, SlaClock]:
    """The ticket's clocks, as objects of `session` (changes to them are flushed with it).
    Read with Core: the console and the scheduler ask, and the ORM query costs three times
    more. Clocks are only ever inserted with Core (`insert_fresh`), so nothing pending is
    missed."""
    out: dict[str, SlaClock] = {}
    for row in fastsql.execute(session.connection(), _SEL_CLOCKS, {"tid": ticket_id}):
        held = session.identity_map.get(identity_key(SlaClock, (row.ticket_id, row.clock)))
        if held is None:
            held = loaded(SlaClock, dict(row._mapping))
            session.add(held)
        out[row.clock] = held
    return out


def detached_clocks(conn: Connection, ticket_id: int) -> dict[str, SlaClock]:
    """The ticket's clocks as rows of no session: what is set on them is the caller's to
    write (the pipeline's `Handled.hold`)."""
    return {row.clock: loaded(SlaClock, dict(row._mapping))
            for row in fastsql.execute(conn, _SEL_CLOCKS, {"tid": ticket_id})}


def fresh(clock: str, team: Team, now: datetime, cycle: int = 0, *,
          running: bool = True) -> FreshClock:
    """A new clock, running from `now` or paused."""
    c = FreshClock(clock, cycle, now, now if running else None)
    return replace(c, deadline_at=due_at(c, meter_for(team), target_seconds(team, clock)))


def opening(team: Team, now: datetime, *, running: bool) -> list[FreshClock]:
    """A new ticket's clocks: first_response and resolution, from its arrival `now`."""
    return [fresh(name, team, now, running=running) for name in (FIRST_RESPONSE, RESOLUTION)]


def insert_fresh(conn: Connection, ticket_id: int, new: list[FreshClock]) -> None:
    """Write new clocks with Core, in one statement (the unit of work costs more than the
    rows)."""
    if new:
        fastsql.execute(conn, _INS_CLOCK, [c.row(ticket_id) for c in new])


def _inserted(conn: Connection, ticket_id: int, new: list[FreshClock]) -> list[SlaClock]:
    """Insert new clocks (`insert_fresh`); they are returned as rows of no session."""
    insert_fresh(conn, ticket_id, new)
    return [loaded(SlaClock, c.row(ticket_id)) for c in new]


def _restart(c: SlaClock, team: Team, now: datetime) -> None:
    """A new cycle of the same clock (next_response after each answered run of mail)."""
    c.cycle += 1
    c.started_at = now
    c.elapsed = 0.0
    c.stopped_at = None
    c.breached = False
    c.running_since = now
    refresh_deadline(c, team)


def customer_reply(conn: Connection, ticket: Ticket, team: Team,
                   now: datetime) -> dict[str, SlaClock]:
    """A customer wrote on an existing ticket (which the pipeline made new/open again).
    Returns the ticket's clocks, rows of no session (`detached_clocks`): the caller writes
    what this sets on them. Those it had to insert are written already."""
    assert ticket.id is not None
    have = detached_clocks(conn, ticket.id)
    if not have:
        # A ticket from before the clocks existed: start them now rather than never.
        started = opening(team, now, running=ticket.status in RUNNING_STATUSES)
        have = {c.clock: c for c in _inserted(conn, ticket.id, started)}
    if ticket.status not in RUNNING_STATUSES:
        return have
    res = have.get(RESOLUTION)
    if res is not None:
        _unstop(res, team, now)
    first = have.get(FIRST_RESPONSE)
    if ticket.first_response_at is None:
        if first is not None:
            _unstop(first, team, now)
        return have
    nxt = have.get(NEXT_RESPONSE)
    if nxt is None:
        [have[NEXT_RESPONSE]] = _inserted(conn, ticket.id,
                                          [fresh(NEXT_RESPONSE, team, now, cycle=1)])
    elif nxt.stopped_at is not None:
        _restart(nxt, team, now)
    else:
        _resume(nxt, team, now)   # paused (pending): resume; running: keeps its start
    return have


def agent_reply(session: Session, ticket: Ticket, team: Team, now: datetime) -> None:
    """A person answered the customer: the response clocks stop."""
    assert ticket.id is not None
    have = clocks(session, ticket.id)
    for name in (FIRST_RESPONSE, NEXT_RESPONSE):
        c = have.get(name)
        if c is not None:
            _stop(c, team, now)


def status_changed(session: Session, ticket: Ticket, team: Team, status: str,
                   now: datetime) -> None:
    """The ticket's status became `status` (the caller sets ticket.status)."""
    assert ticket.id is not None
    have = clocks(session, ticket.id)
    if status in STOPPED_STATUSES:
        for c in have.values():
            _stop(c, team, now)
    elif status == TicketStatus.PENDING:
        for c in have.values():
            _pause(c, team, now)
    elif status in RUNNING_STATUSES:
        res = have.get(RESOLUTION)
        if res is not None:
            _unstop(res, team, now)   # an agent reopening a solved ticket
        for c in have.values():
            _resume(c, team, now)


def team_changed(session: Session, ticket: Ticket, old: Team, new: Team, now: datetime) -> None:
    """Counted time stays; from `now` on the clocks count by the new team's calendar."""
    assert ticket.id is not None
    for c in clocks(session, ticket.id).values():
        if is_running(c):
            _pause(c, old, now)
            _resume(c, new, now)


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ClockView:
    clock: str
    cycle: int
    state: str              # running | paused | stopped
    started_at: datetime
    elapsed_s: float
    target_s: float | None
    deadline_at: datetime | None
    stopped_at: datetime | None
    breached: bool
    business_hours: bool

    def as_dict(self) -> dict[str, object]:
        return {"clock": self.clock, "cycle": self.cycle, "state": self.state,
                "started_at": self.started_at.isoformat(), "elapsed_s": round(self.elapsed_s),
                "target_s": self.target_s,
                "deadline_at": self.deadline_at.isoformat() if self.deadline_at else None,
                "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None,
                "breached": self.breached, "business_hours": self.business_hours}


def view(c: SlaClock, team: Team | None, now: datetime) -> ClockView:
    meter = meter_for(team) if team is not None else _WALL
    state = "stopped" if c.stopped_at else ("running" if c.running_since else "paused")
    spent = elapsed(c, meter, now)
    target = target_seconds(team, c.clock) if team is not None else None
    breached = c.breached or (target is not None and state == "running" and spent >= target)
    return ClockView(c.clock, c.cycle, state, c.started_at, spent, target, c.deadline_at,
                     c.stopped_at, breached, meter.business)


def overdue_ticket_ids(session: Session, now: datetime) -> dict[int, list[SlaClock]]:
    """Tickets with a running clock past its target: one indexed range query."""
    rows = session.exec(select(SlaClock).where(col(SlaClock.deadline_at) <= now)
                        .where(col(SlaClock.stopped_at).is_(None))).all()
    out: dict[int, list[SlaClock]] = {}
    for c in rows:
        out.setdefault(c.ticket_id, []).append(c)
    return out


CLOCK_ORDER = {name: i for i, name in enumerate(SLA_CLOCKS)}
