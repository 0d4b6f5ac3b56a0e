"""The honest ETA: estimate, history from the database, wording, and the promise check."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import Session, SQLModel

from router import turnaround
from router.calendar import BusinessCalendar
from router.db import make_engine
from router.models import Customer, Ticket, TicketStatus
from router.turnaround import Promise, describe, estimate, history, promise_kept

BERLIN = ZoneInfo("Europe/Berlin")
CAL = BusinessCalendar("Europe/Berlin", {d: [(time(9), time(18))] for d in range(5)})
MON_10 = datetime(2025, 11, 24, 10, tzinfo=BERLIN)
SLA = timedelta(hours=4)
MIN = 60.0


def samples(n: int = 40, step: float = 2 * MIN) -> list[float]:
    return [step * (i + 1) for i in range(n)]     # 2, 4, ... 80 minutes


def test_too_few_samples_falls_back_to_the_sla() -> None:
    p = estimate(MON_10, CAL, samples(5), backlog=3, answer_rate=6.0, sla_target=SLA)
    assert p.basis == "sla_fallback"
    assert p.deadline == datetime(2025, 11, 24, 13, tzinfo=UTC)   # 14:00 Berlin
    assert p.business_seconds == 4 * 3600
    assert p.detail["samples"] == 5 and p.detail["min_samples"] == 20
    assert "fewer than 20" in p.detail["reason"]


def test_sla_fallback_in_business_time_crosses_the_weekend() -> None:
    fri = datetime(2025, 11, 21, 16, tzinfo=BERLIN)
    p = estimate(fri, CAL, [], backlog=0, answer_rate=None, sla_target=SLA)
    assert p.deadline == datetime(2025, 11, 24, 11, tzinfo=BERLIN)
    wall = estimate(fri, CAL, [], 0, None, SLA, sla_business_hours=False)
    assert wall.deadline == fri + SLA


def test_history_promise_records_its_inputs() -> None:
    p = estimate(MON_10, CAL, samples(), backlog=2, answer_rate=6.0, sla_target=SLA)
    assert p.basis == "history"
    d = p.detail
    assert d["samples"] == 40 and d["quantile"] == 0.9 and d["backlog"] == 2
    assert d["quantile_seconds"] == 72 * MIN           # nearest rank: 36th of 40
    assert d["rate_per_hour"] == 6.0
    assert d["drain_seconds"] == pytest.approx(30 * MIN)  # (2 + 1) / 6 per hour
    assert d["allowance_seconds"] == 20 * MIN             # lower quartile
    assert d["raw_seconds"] == pytest.approx(50 * MIN)
    assert d["adjustment_seconds"] == pytest.approx(50 * MIN - 72 * MIN)
    assert d["rounding"] == "15min" and d["rounded_seconds"] == 3600
    assert p.deadline == MON_10 + timedelta(hours=1)
    assert p.business_seconds == 3600


def test_quantile() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert turnaround.sample_quantile(xs, 0.9) == 90
    assert turnaround.sample_quantile(xs, 0.95) == 95
    assert turnaround.sample_quantile([5.0, 1.0, 3.0], 0.5) == 3
    assert turnaround.sample_quantile([7.0], 0.99) == 7
    # Without a rate the promise is the history quantile itself, so the knob matters there.
    p90 = estimate(MON_10, CAL, samples(), 0, None, SLA, quantile=0.9)
    p60 = estimate(MON_10, CAL, samples(), 0, None, SLA, quantile=0.6)
    assert p90.detail["quantile_seconds"] > p60.detail["quantile_seconds"]
    assert p90.business_seconds == 75 * MIN or p90.business_seconds == 2 * 3600
    assert p60.business_seconds < p90.business_seconds
    assert "no first responses" in p90.detail["reason"]


def test_backlog_increases_the_promise() -> None:
    promised = [estimate(MON_10, CAL, samples(), b, 6.0, SLA).business_seconds
                for b in (0, 5, 20, 60)]
    assert promised == sorted(promised) and promised[0] < promised[-1]
    # 60 tickets ahead at 6 an hour is ten business hours: into Tuesday.
    long = estimate(MON_10, CAL, samples(), 60, 6.0, SLA)
    assert long.deadline.astimezone(BERLIN).date().isoformat() == "2025-11-25"


def test_a_slower_team_is_promised_later() -> None:
    fast = estimate(MON_10, CAL, samples(), 10, 10.0, SLA)
    slow = estimate(MON_10, CAL, samples(), 10, 3.0, SLA)
    assert slow.business_seconds > fast.business_seconds


def test_floor() -> None:
    p = estimate(MON_10, CAL, [1.0] * 30, 0, 100.0, SLA)
    assert p.detail["raw_seconds"] == turnaround.FLOOR
    assert p.business_seconds == 15 * MIN


@pytest.mark.parametrize(("raw", "expected", "unit"), [
    (1.0, 900, "15min"), (900, 900, "15min"), (901, 1800, "15min"), (3600, 3600, "15min"),
    (3601, 7200, "1h"), (5 * 3600 + 1, 6 * 3600, "1h"), (9 * 3600, 9 * 3600, "1h"),
    (9 * 3600 + 1, 13.5 * 3600, "half_day"), (14 * 3600, 18 * 3600, "half_day"),
])
def test_humane_rounding(raw: float, expected: float, unit: str) -> None:
    assert turnaround.humane_round(raw, 9 * 3600) == (expected, unit)


def test_long_deadlines_are_whole_local_hours() -> None:
    at = datetime(2025, 11, 24, 16, 7, tzinfo=BERLIN)
    p = estimate(at, CAL, samples(), 30, 6.0, SLA)
    local = p.deadline.astimezone(BERLIN)
    assert (local.minute, local.second) == (0, 0)
    assert p.business_seconds >= p.detail["rounded_seconds"]


def test_short_wait_is_not_clock_rounded() -> None:
    at = datetime(2025, 11, 24, 10, 7, tzinfo=BERLIN)
    p = estimate(at, CAL, samples(), 0, 6.0, SLA)
    assert p.deadline - at == timedelta(minutes=30)   # 10 min drain + 20 allowance


def promise_at(deadline: datetime) -> Promise:
    return Promise(deadline=deadline.astimezone(UTC), business_seconds=0, basis="history")


def test_describe_short_waits() -> None:
    p2h = promise_at(MON_10 + timedelta(hours=2))
    p30 = promise_at(MON_10 + timedelta(minutes=30))
    assert describe(p2h, MON_10, "Europe/Berlin") == "within about 2 hours"
    assert describe(p30, MON_10, "Europe/Berlin") == "within about 30 minutes"
    assert describe(promise_at(MON_10 + timedelta(hours=1)), MON_10, "Europe/Berlin") == \
        "within about 1 hour"
    assert describe(p2h, MON_10, "Europe/Berlin", "tr") == "yaklaşık 2 saat içinde"
    assert describe(p30, MON_10, "Europe/Berlin", "tr-TR") == "yaklaşık 30 dakika içinde"
    # Odd waits are rounded up, never down.
    assert describe(promise_at(MON_10 + timedelta(minutes=20)), MON_10, "UTC") == \
        "within about 30 minutes"


def test_describe_long_waits() -> None:
    fri = datetime(2025, 11, 21, 17, tzinfo=BERLIN)
    p = promise_at(datetime(2025, 11, 24, 11, tzinfo=BERLIN))
    assert describe(p, fri, "Europe/Berlin") == "by Monday 24 November, 11:00 CET"
    assert describe(p, fri, "Europe/Berlin", "fr") == "by Monday 24 November, 11:00 CET"
    assert describe(p, fri, "Europe/Berlin", "tr") == "24 Kasım Pazartesi, 11:00'e kadar (CET)"
    summer = promise_at(datetime(2025, 7, 1, 9, 30, tzinfo=BERLIN))
    assert describe(summer, fri.replace(month=6), "Europe/Berlin") == \
        "by Tuesday 1 July, 09:30 CEST"
    assert describe(summer, fri.replace(month=6), "Europe/Berlin", "tr") == \
        "1 Temmuz Salı, 09:30'a kadar (CEST)"
    # Istanbul has no letter abbreviation; the customer's view is in the team's zone.
    assert describe(p, fri, "Europe/Istanbul", "tr") == \
        "24 Kasım Pazartesi, 13:00'e kadar (UTC+03)"


@pytest.mark.parametrize(("hh", "mm", "suffix"), [
    (9, 0, "'a"), (10, 0, "'a"), (11, 0, "'e"), (12, 0, "'ye"), (13, 0, "'e"),
    (14, 0, "'e"), (15, 0, "'e"), (16, 0, "'ya"), (17, 0, "'ye"), (18, 0, "'e"),
    (20, 0, "'ye"), (0, 0, "'a"), (9, 30, "'a"), (9, 15, "'e"), (9, 45, "'e"), (9, 50, "'ye"),
])
def test_turkish_dative(hh: int, mm: int, suffix: str) -> None:
    assert turnaround._tr_dative(hh, mm) == suffix


def test_promise_kept() -> None:
    assert promise_kept(MON_10, MON_10)
    assert promise_kept(MON_10, MON_10 - timedelta(minutes=1))
    assert not promise_kept(MON_10, MON_10 + timedelta(seconds=1))


# ---------------------------------------------------------------------------- history()

@pytest.fixture
def session(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine("sqlite:///" + str(tmp_path / "t.db"))
    SQLModel.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def add_ticket(s: Session, customer: int, team: str, created: datetime,
               first: datetime | None, status: str = TicketStatus.OPEN) -> Ticket:
    t = Ticket(team=team, status=status, customer_id=customer, address=f"{team}@acme.example",
               created_at=created, updated_at=created, last_customer_at=created,
               first_response_at=first)
    s.add(t)
    return t


def test_history_reads_the_ticket_table(session: Session) -> None:
    now = datetime(2025, 11, 24, 15, tzinfo=BERLIN)
    c = Customer(email="a@example.com", created_at=now, last_seen_at=now)
    session.add(c)
    session.commit()
    assert c.id is not None
    # Answered today: 30 and 90 business minutes; the second within the rate window.
    add_ticket(session, c.id, "support", now.replace(hour=9), now.replace(hour=9, minute=30),
               TicketStatus.SOLVED)
    add_ticket(session, c.id, "support", now.replace(hour=12), now.replace(hour=13, minute=30))
    # Friday 17:00 -> Monday 10:00 is two business hours, not 65 wall-clock hours.
    fri = datetime(2025, 11, 21, 17, tzinfo=BERLIN)
    add_ticket(session, c.id, "support", fri, now.replace(hour=10), TicketStatus.PENDING)
    # Outside the window, another team, answered after `now`: not samples.
    old = now - timedelta(days=40)
    add_ticket(session, c.id, "support", old, old + timedelta(hours=1), TicketStatus.CLOSED)
    add_ticket(session, c.id, "billing", now.replace(hour=9), now.replace(hour=11))
    add_ticket(session, c.id, "support", now.replace(hour=14), now + timedelta(hours=1))
    # Backlog: new/open without a response; pending/solved ones do not count.
    add_ticket(session, c.id, "support", now.replace(hour=14), None, TicketStatus.NEW)
    add_ticket(session, c.id, "support", now.replace(hour=14, minute=30), None)
    add_ticket(session, c.id, "support", now.replace(hour=11), None, TicketStatus.PENDING)
    mine = add_ticket(session, c.id, "support", now, None, TicketStatus.NEW)
    add_ticket(session, c.id, "billing", now.replace(hour=14), None)
    session.commit()

    got, backlog, rate = history(session, "support", now, CAL)
    assert sorted(got) == [1800.0, 5400.0, 7200.0]
    assert backlog == 3
    # Last 8 business hours: Friday 17:00-18:00 and Monday 09:00-15:00 hold three responses.
    assert rate == pytest.approx(3 / 8)
    _, backlog2, _ = history(session, "support", now, CAL, exclude_id=mine.id)
    assert backlog2 == 2
    short, _, _ = history(session, "support", now, CAL, window=timedelta(hours=4))
    assert sorted(short) == [5400.0]


def test_history_of_an_empty_team(session: Session) -> None:
    got, backlog, rate = history(session, "support", MON_10, CAL)
    assert (got, backlog, rate) == ([], 0, 0.0)
    p = estimate(MON_10, CAL, got, backlog, rate, SLA)
    assert p.basis == "sla_fallback"


def test_the_backlog_is_counted_only_when_the_promise_needs_it() -> None:
    asked: list[int] = []

    def count() -> int:
        asked.append(1)
        return 2

    fallback = estimate(MON_10, CAL, samples(5), backlog=count, answer_rate=6.0,
                        sla_target=SLA)
    assert fallback.basis == "sla_fallback" and asked == []
    assert fallback.detail["backlog"] is None
    no_rate = estimate(MON_10, CAL, samples(), backlog=count, answer_rate=None,
                       sla_target=SLA)
    assert no_rate.basis == "history" and asked == []
    p = estimate(MON_10, CAL, samples(), backlog=count, answer_rate=6.0, sla_target=SLA)
    assert asked == [1]
    assert p.detail["backlog"] == 2
    assert p.deadline == estimate(MON_10, CAL, samples(), 2, 6.0, SLA).deadline


def test_backlogs_counted_once_per_transaction_stay_exact(session: Session) -> None:
    """`Backlogs` counts a team's backlog whole once, then only the tickets opened since:
    through a run of new tickets it agrees with a full count each time; a change to an
    older ticket needs `forget`, and then it agrees again."""
    now = MON_10
    c = Customer(email="a@example.com", created_at=now, last_seen_at=now)
    session.add(c)
    session.commit()
    assert c.id is not None
    old = [add_ticket(session, c.id, "support", now, None, TicketStatus.NEW) for _ in range(5)]
    for _ in range(5):
        add_ticket(session, c.id, "billing", now, None)
    add_ticket(session, c.id, "support", now, now, TicketStatus.OPEN)  # answered
    pending = add_ticket(session, c.id, "support", now, None, TicketStatus.PENDING)
    session.commit()
    counted = turnaround.Backlogs()
    conn = session.connection()

    def both(team: str, ticket: Ticket) -> tuple[int, int]:
        session.flush()
        return (turnaround.backlog(conn, team, ticket.id, counted=counted),
                turnaround.backlog(conn, team, ticket.id))

    opened: list[Ticket] = []
    for i in range(4):
        opened.append(add_ticket(session, c.id, "support", now, None, TicketStatus.NEW))
        assert both("support", opened[-1]) == (5 + i, 5 + i)
    other = add_ticket(session, c.id, "billing", now, None)
    assert both("billing", other) == (5, 5)
    # Older tickets change: the pending one reopened by a reply, two answered.
    pending.status = TicketStatus.OPEN
    old[0].first_response_at = old[1].first_response_at = now
    opened.append(add_ticket(session, c.id, "support", now, None, TicketStatus.NEW))
    assert both("support", opened[-1]) == (9, 8)  # what `forget` is for
    counted.forget()
    assert both("support", opened[-1]) == (8, 8)
    # Asked about an older ticket, it counts afresh rather than guess.
    assert both("support", opened[1]) == (8, 8)
    assert both("support", opened[-1]) == (8, 8)
