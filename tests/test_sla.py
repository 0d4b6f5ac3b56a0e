"""SLA clock semantics, one rule at a time (router/sla.py's docstring is the spec), through the
real pipeline with `sla_hook`, on SQLite, in simulated time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from router import settings as config
from router.clock import FakeClock
from router.db import session_scope
from router.escalate import (
    EscalationScheduler,
    Opening,
    SlaHook,
    on_agent_reply,
    on_status_change,
    opening,
    sla_hook,
)
from router.intake.accept import Envelope, accept_sync
from router.models import Inbound, SlaClock, Ticket, TicketStatus
from router.pipeline import Handled, Pipeline
from router.sla import overdue_ticket_ids
from tests.daemon import Store, make_mail, open_store

# A Monday. Berlin is UTC+2 in June.
MONDAY = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
FRIDAY_1800_BERLIN = datetime(2025, 6, 6, 16, 0, tzinfo=UTC)
MONDAY_0900_BERLIN = datetime(2025, 6, 9, 7, 0, tzinfo=UTC)

TEAMS = """
[[team]]
name = "desk"
addresses = ["desk@acme.test"]
lead = "lena@acme.test"
manager = "max@acme.test"
members = [
  { name = "Lena Lead", email = "lena@acme.test", role = "lead" },
  { name = "Max Manager", email = "max@acme.test", role = "manager" },
  { name = "Ali Agent", email = "ali@acme.test" },
]
sla = { first_response = "4h", next_response = "2h", resolution = "1d", business_hours = false }
escalation = [
  { after = "15m", clock = "first_response", notify = ["lead"] },
  { after = "1h", notify = ["lead", "manager"], set_priority = "urgent" },
  { after = "2h", reassign = "tier2" },
  { after = "30m", clock = "next_response", notify = ["assignee"] },
]

[[team]]
name = "tier2"
addresses = ["tier2@acme.test"]
lead = "tara@acme.test"
members = [{ name = "Tara Tier", email = "tara@acme.test", role = "lead" }]
sla = { first_response = "4h", business_hours = false }
escalation = [
  { after = "1h", notify = ["lead"] },
  { before_breach = "30m", notify = ["lead"] },
]

[[team]]
name = "office"
addresses = ["office@acme.test"]
lead = "olaf@acme.test"
timezone = "Europe/Berlin"
business_hours = { mon-fri = "09:00-18:00" }
members = [{ name = "Olaf Office", email = "olaf@acme.test" }]
sla = { first_response = "2h", next_response = "2h", resolution = "2d" }
escalation = [
  { after = "15m", notify = ["lead"] },
  { before_breach = "10m", notify = ["assignee", "lead"] },
]
"""


@dataclass
class Desk:
    """The pipeline with the SLA hook, a FakeClock, and the agent-side entry points."""

    store: Store
    clock: FakeClock
    pipeline: Pipeline

    @property
    def settings(self) -> config.Settings:
        return self.store.settings

    def mail(self, to: str = "desk@acme.test", *, ticket: int | None = None,
             frm: str = "Ann Customer <ann@example.org>",
             body: str = "Our printer is on fire.\n", subject: str = "Printer on fire") -> int:
        """A customer mail arriving now; a reply to `ticket` carries its token."""
        if ticket is not None:
            subject = f"Re: {subject} [#{ticket}]"
        raw = make_mail(subject=subject, frm=frm, to=to, body=body)
        accept_sync(self.store.engine, Envelope("smtp", "ann@example.org", [to], raw,
                                                received_at=self.clock()))
        self.pipeline.drain()
        with self.store.session() as s:
            last = s.exec(select(Inbound).order_by(col(Inbound.id).desc())).first()
            assert last is not None and last.ticket_id is not None, last
            return last.ticket_id

    def agent_reply(self, ticket_id: int) -> None:
        with session_scope(self.store.engine) as s:
            t = s.get(Ticket, ticket_id)
            assert t is not None
            on_agent_reply(s, t, self.clock(), settings=self.settings)

    def set_status(self, ticket_id: int, status: str) -> None:
        with session_scope(self.store.engine) as s:
            t = s.get(Ticket, ticket_id)
            assert t is not None
            on_status_change(s, t, status, self.clock(), settings=self.settings)

    def ticket(self, ticket_id: int) -> Ticket:
        with self.store.session() as s:
            t = s.get(Ticket, ticket_id)
            assert t is not None
            return t

    def clocks(self, ticket_id: int) -> dict[str, SlaClock]:
        with self.store.session() as s:
            rows = s.exec(select(SlaClock).where(SlaClock.ticket_id == ticket_id)).all()
            return {c.clock: c for c in rows}

    def later(self, **kw: float) -> datetime:
        return self.clock.advance(timedelta(**kw))

    def scheduler(self, **kw: object) -> EscalationScheduler:
        return EscalationScheduler(self.store.engine, lambda: self.settings, self.clock,
                                   **kw)  # type: ignore[arg-type]


def make_desk(directory: Path, start: datetime, db_url: str | None = None,
              teams: str = TEAMS) -> Iterator[Desk]:
    clock = FakeClock(start)
    with open_store(directory, db_url=db_url, extra=teams) as store:
        pipeline = Pipeline(store.url, lambda: store.settings, hooks=[sla_hook])
        try:
            yield Desk(store, clock, pipeline)
        finally:
            pipeline.close()


open_desk = contextlib.contextmanager(make_desk)


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    yield from make_desk(tmp_path / "etc", MONDAY)


def _secs(c: SlaClock) -> float:
    return c.elapsed


# ---------------------------------------------------------------------------- first response


def test_first_response_starts_at_arrival_not_at_processing(desk: Desk) -> None:
    arrived = desk.clock()
    raw = make_mail(to="desk@acme.test")
    accept_sync(desk.store.engine, Envelope("smtp", "a@example.org", ["desk@acme.test"], raw,
                                            received_at=arrived))
    desk.later(minutes=20)            # the pipeline was busy; the customer was waiting anyway
    desk.pipeline.drain()
    [t] = desk.store.session().exec(select(Ticket)).all()
    assert t.id is not None
    clocks = desk.clocks(t.id)
    assert set(clocks) == {"first_response", "resolution"}
    fr = clocks["first_response"]
    assert fr.started_at == arrived and fr.running_since == arrived
    assert fr.deadline_at == arrived + timedelta(hours=4)
    assert desk.ticket(t.id).next_due_at == arrived + timedelta(minutes=15)


def test_first_response_stops_at_the_first_agent_reply(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(minutes=40)
    desk.agent_reply(tid)
    fr = desk.clocks(tid)["first_response"]
    assert fr.stopped_at == desk.clock() and fr.running_since is None
    assert fr.elapsed == 40 * 60 and not fr.breached and fr.deadline_at is None
    assert desk.ticket(tid).first_response_at == desk.clock()
    # A second answer changes nothing about the first.
    desk.later(minutes=5)
    desk.agent_reply(tid)
    assert desk.clocks(tid)["first_response"].elapsed == 40 * 60
    assert desk.ticket(tid).first_response_at == desk.clock() - timedelta(minutes=5)


def test_follow_up_before_the_first_answer_does_not_restart_the_clock(desk: Desk) -> None:
    start = desk.clock()
    tid = desk.mail()
    desk.later(minutes=30)
    assert desk.mail(ticket=tid, body="Hello? Anyone?\n") == tid
    clocks = desk.clocks(tid)
    assert "next_response" not in clocks
    assert clocks["first_response"].running_since == start
    assert clocks["first_response"].deadline_at == start + timedelta(hours=4)


def test_a_reply_on_a_ticket_without_clocks_starts_them(desk: Desk) -> None:
    """A ticket from before the clocks existed gets them with its next customer mail,
    running from that mail, and its next escalation due time."""
    tid = desk.mail()
    with session_scope(desk.store.engine) as s:
        for c in s.exec(select(SlaClock).where(SlaClock.ticket_id == tid)).all():
            s.delete(c)
        t = s.get(Ticket, tid)
        assert t is not None
        t.next_due_at = None
        s.add(t)
    desk.later(hours=1)
    back = desk.clock()
    assert desk.mail(ticket=tid, body="Still waiting.\n") == tid
    clocks = desk.clocks(tid)
    assert sorted(clocks) == ["first_response", "resolution"]
    assert clocks["first_response"].running_since == back
    assert clocks["first_response"].deadline_at == back + timedelta(hours=4)
    assert desk.ticket(tid).next_due_at is not None


def test_first_response_after_breach_is_recorded_as_breached(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(hours=5)
    desk.agent_reply(tid)
    assert desk.clocks(tid)["first_response"].breached


# ---------------------------------------------------------------------------- next response


def test_next_response_starts_with_a_customer_reply_after_an_answer(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(minutes=10)
    desk.agent_reply(tid)
    assert "next_response" not in desk.clocks(tid)
    desk.later(hours=1)
    reply_at = desk.clock()
    desk.mail(ticket=tid, body="That did not help.\n")
    nr = desk.clocks(tid)["next_response"]
    assert (nr.cycle, nr.started_at, nr.running_since) == (1, reply_at, reply_at)
    assert nr.deadline_at == reply_at + timedelta(hours=2)
    # Its 30m step is armed.
    assert desk.ticket(tid).next_due_at == reply_at + timedelta(minutes=30)


def test_second_customer_mail_does_not_restart_next_response(desk: Desk) -> None:
    tid = desk.mail()
    desk.agent_reply(tid)
    desk.later(minutes=5)
    first_reply = desk.clock()
    desk.mail(ticket=tid)
    desk.later(minutes=20)
    desk.mail(ticket=tid, body="And another thing.\n")
    nr = desk.clocks(tid)["next_response"]
    assert nr.cycle == 1 and nr.started_at == first_reply


def test_agent_reply_stops_next_response_and_the_next_mail_starts_a_new_cycle(desk: Desk) -> None:
    tid = desk.mail()
    desk.agent_reply(tid)
    desk.mail(ticket=tid)
    desk.later(minutes=45)
    desk.agent_reply(tid)
    nr = desk.clocks(tid)["next_response"]
    assert nr.stopped_at == desk.clock() and nr.elapsed == 45 * 60 and nr.cycle == 1
    desk.later(hours=3)
    second = desk.clock()
    desk.mail(ticket=tid)
    nr = desk.clocks(tid)["next_response"]
    assert (nr.cycle, nr.started_at, nr.elapsed, nr.stopped_at) == (2, second, 0.0, None)


# ---------------------------------------------------------------------------- pauses and stops


def test_pending_pauses_every_clock_and_a_customer_reply_resumes(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(minutes=20)
    desk.agent_reply(tid)
    desk.set_status(tid, TicketStatus.PENDING)
    res = desk.clocks(tid)["resolution"]
    assert res.running_since is None and res.elapsed == 20 * 60 and res.deadline_at is None
    assert desk.ticket(tid).next_due_at is None
    desk.later(hours=10)              # the customer takes their time: it does not count
    back = desk.clock()
    desk.mail(ticket=tid)
    assert desk.ticket(tid).status == TicketStatus.OPEN
    res = desk.clocks(tid)["resolution"]
    assert res.running_since == back and res.elapsed == 20 * 60
    assert res.deadline_at == back + timedelta(days=1) - timedelta(minutes=20)


def test_pending_before_any_answer_pauses_first_response_too(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(minutes=10)
    desk.set_status(tid, TicketStatus.PENDING)
    desk.later(hours=6)
    desk.set_status(tid, TicketStatus.OPEN)
    fr = desk.clocks(tid)["first_response"]
    assert fr.elapsed == 600 and fr.running_since == desk.clock()
    assert fr.deadline_at == desk.clock() + timedelta(hours=4) - timedelta(minutes=10)


def test_solving_stops_every_clock_and_a_reopen_resumes_resolution(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(minutes=30)
    desk.agent_reply(tid)
    desk.later(minutes=30)
    desk.set_status(tid, TicketStatus.SOLVED)
    clocks = desk.clocks(tid)
    assert all(c.stopped_at is not None for c in clocks.values())
    assert clocks["resolution"].elapsed == 3600
    assert desk.ticket(tid).next_due_at is None
    desk.later(days=2)
    reopened = desk.clock()
    desk.mail(ticket=tid, body="It is broken again.\n")
    t = desk.ticket(tid)
    assert t.status == TicketStatus.OPEN and t.reopened == 1
    clocks = desk.clocks(tid)
    res = clocks["resolution"]
    assert res.stopped_at is None and res.elapsed == 3600 and res.running_since == reopened
    assert clocks["next_response"].running_since == reopened
    assert clocks["first_response"].stopped_at is not None


def test_staff_mail_on_the_thread_does_not_touch_the_clocks(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(minutes=20)
    desk.agent_reply(tid)
    before = desk.clocks(tid)
    desk.mail(ticket=tid, frm="Lena Lead <lena@acme.test>", body="On it.\n")
    after = desk.clocks(tid)
    assert "next_response" not in after
    assert after["resolution"].running_since == before["resolution"].running_since


# ---------------------------------------------------------------------------- business hours


def test_business_hours_clock_counts_only_open_time(tmp_path: Path) -> None:
    with open_desk(tmp_path / "etc", FRIDAY_1800_BERLIN) as d:
        tid = d.mail(to="office@acme.test")
        fr = d.clocks(tid)["first_response"]
        # Friday 18:00 is closing time: the 2h target is Monday 11:00 Berlin.
        assert fr.deadline_at == MONDAY_0900_BERLIN + timedelta(hours=2)
        assert d.ticket(tid).next_due_at == MONDAY_0900_BERLIN + timedelta(minutes=15)
        d.clock.now = MONDAY_0900_BERLIN + timedelta(minutes=30)
        d.agent_reply(tid)
        assert d.clocks(tid)["first_response"].elapsed == 30 * 60   # the weekend counted 0


def test_around_the_clock_team_counts_nights(tmp_path: Path) -> None:
    saturday_night = datetime(2025, 6, 7, 23, 50, tzinfo=UTC)
    with open_desk(tmp_path / "etc", saturday_night) as d:
        tid = d.mail(to="oops@acme.test")           # ops: 15m, business_hours = false
        assert d.clocks(tid)["first_response"].deadline_at == saturday_night + timedelta(
            minutes=15)


# ---------------------------------------------------------------------------- worked out early


class _Seen:
    """A hook after `sla_hook` that keeps what the pipeline handed it early, per ticket."""

    def __init__(self) -> None:
        self.early: dict[int, object] = {}

    def __call__(self, conn: object, handled: Handled) -> None:
        self.early[handled.ticket_id] = handled.early.get(sla_hook)


def _expect_office(d: Desk, tid: int, arrived: datetime) -> None:
    """The office team's clocks for a mail that arrived Friday at closing time."""
    assert arrived == FRIDAY_1800_BERLIN
    clocks = d.clocks(tid)
    assert set(clocks) == {"first_response", "resolution"}
    assert clocks["first_response"].deadline_at == MONDAY_0900_BERLIN + timedelta(hours=2)
    # "2d" is 48 hours of open time, 9 a day: five days and three hours.
    assert clocks["resolution"].deadline_at == MONDAY_0900_BERLIN + timedelta(days=7, hours=3)
    assert all(c.running_since == arrived and c.started_at == arrived
               for c in clocks.values())
    assert d.ticket(tid).next_due_at == MONDAY_0900_BERLIN + timedelta(minutes=15)


def test_new_ticket_clocks_are_worked_out_before_the_write_lock(tmp_path: Path) -> None:
    """The pipeline hands `sla_hook` the clocks it worked out while preparing; a decision
    taken again in the write phase (here: the customer's language, learnt from the first
    mail, changed the facts the second one was prepared on) gets none, and its clocks are
    worked out there, with the same result."""
    with open_desk(tmp_path / "etc", FRIDAY_1800_BERLIN) as d:
        seen = _Seen()
        d.pipeline = Pipeline(d.store.url, lambda: d.store.settings, hooks=[sla_hook, seen])
        try:
            for n in range(2):
                raw = make_mail(subject=f"Printer {n}", to="office@acme.test",
                                body="Our printer is on fire again, please help us.\n")
                accept_sync(d.store.engine, Envelope("smtp", "ann@example.org",
                                                     ["office@acme.test"], raw,
                                                     received_at=d.clock()))
            d.pipeline.drain()
        finally:
            d.pipeline.close()
        first, second = sorted(seen.early)
        assert isinstance(seen.early[first], Opening)
        assert seen.early[second] is None
        for tid in (first, second):
            _expect_office(d, tid, FRIDAY_1800_BERLIN)


class _Stale(SlaHook):
    """`sla_hook` whose early work is for the wrong team or the wrong time, or fails."""

    def __init__(self, wrong: str) -> None:
        self.wrong = wrong

    def ahead(self, settings: config.Settings, inbound: object, decision: object) -> Opening:
        if self.wrong == "raises":
            raise RuntimeError("worked out early, and failed")
        if self.wrong == "team":
            team = settings.team_by_name("desk")
            assert team is not None
            return opening(team, FRIDAY_1800_BERLIN, running=True)
        team = settings.team_by_name("office")
        assert team is not None
        return opening(team, FRIDAY_1800_BERLIN - timedelta(hours=3), running=True)


@pytest.mark.parametrize("wrong", ["team", "time", "raises"])
def test_early_clocks_that_do_not_fit_the_ticket_are_worked_out_again(
        tmp_path: Path, wrong: str) -> None:
    with open_desk(tmp_path / "etc", FRIDAY_1800_BERLIN) as d:
        d.pipeline = Pipeline(d.store.url, lambda: d.store.settings, hooks=[_Stale(wrong)])
        try:
            tid = d.mail(to="office@acme.test")
        finally:
            d.pipeline.close()
        _expect_office(d, tid, FRIDAY_1800_BERLIN)


# ---------------------------------------------------------------------------- overdue


def test_overdue_is_a_running_clock_past_its_target(desk: Desk) -> None:
    late = desk.mail()
    desk.later(minutes=1)
    answered = desk.mail(subject="Other")
    desk.agent_reply(answered)
    desk.later(hours=4, minutes=30)
    with Session(desk.store.engine) as s:
        over = overdue_ticket_ids(s, desk.clock())
    assert set(over) == {late}
    assert {c.clock for c in over[late]} == {"first_response"}
    desk.set_status(late, TicketStatus.PENDING)
    with Session(desk.store.engine) as s:
        assert overdue_ticket_ids(s, desk.clock()) == {}
