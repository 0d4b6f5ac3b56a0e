"""BusinessCalendar: open/closed, holidays, DST, and the business-time arithmetic."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.calendar import BusinessCalendar, NeverOpenError
from router.settings import Member, Team

BERLIN = ZoneInfo("Europe/Berlin")
NINE_SIX = {d: [(time(9), time(18))] for d in range(5)}


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)  # type: ignore[misc]


def team(**kw: object) -> Team:
    base: dict[str, object] = dict(
        name="support", addresses=["support@acme.example"], lead="ana@acme.example",
        members=[Member(name="Ana", email="ana@acme.example")], timezone="Europe/Berlin",
        business_hours={"mon-fri": "09:00-18:00"})
    base.update(kw)
    return Team.model_validate(base)


@pytest.fixture
def cal() -> BusinessCalendar:
    return BusinessCalendar("Europe/Berlin", NINE_SIX, {date(2025, 12, 25)})


def test_open_and_closed(cal: BusinessCalendar) -> None:
    assert cal.is_open(berlin(2025, 11, 24, 9))
    assert cal.is_open(berlin(2025, 11, 24, 17, 59))
    assert not cal.is_open(berlin(2025, 11, 24, 18))          # spans are [start, end)
    assert not cal.is_open(berlin(2025, 11, 24, 8, 59))
    assert not cal.is_open(berlin(2025, 11, 22, 12))          # Saturday
    assert not cal.is_open(berlin(2025, 12, 25, 12))          # holiday
    assert cal.is_open(datetime(2025, 11, 24, 10, tzinfo=UTC))  # 11:00 in Berlin


def test_naive_datetimes_are_refused(cal: BusinessCalendar) -> None:
    with pytest.raises(ValueError, match="aware"):
        cal.is_open(datetime(2025, 11, 24, 10))


def test_next_open(cal: BusinessCalendar) -> None:
    assert cal.next_open(berlin(2025, 11, 24, 10)) == berlin(2025, 11, 24, 10)
    assert cal.next_open(berlin(2025, 11, 21, 18)) == berlin(2025, 11, 24, 9)
    assert cal.next_open(berlin(2025, 12, 24, 19)) == berlin(2025, 12, 26, 9)
    assert cal.next_open(berlin(2025, 11, 24, 10)).tzinfo == UTC


def test_friday_evening_lands_on_monday(cal: BusinessCalendar) -> None:
    assert cal.add_business(berlin(2025, 11, 21, 18), 3600) == berlin(2025, 11, 24, 10)
    assert cal.add_business(berlin(2025, 11, 21, 17), 2 * 3600) == berlin(2025, 11, 24, 10)
    # Ending exactly at closing time is closing time, not the next opening.
    assert cal.add_business(berlin(2025, 11, 21, 9), 9 * 3600) == berlin(2025, 11, 21, 18)


def test_add_business_skips_holidays_and_long_gaps(cal: BusinessCalendar) -> None:
    assert cal.add_business(berlin(2025, 12, 24, 17), 2 * 3600) == berlin(2025, 12, 26, 10)
    # Ten business days = two calendar weeks.
    assert cal.add_business(berlin(2025, 11, 3, 9), 10 * 9 * 3600) == berlin(2025, 11, 14, 18)


def test_backwards(cal: BusinessCalendar) -> None:
    assert cal.add_business(berlin(2025, 11, 24, 10), -2 * 3600) == berlin(2025, 11, 21, 17)


def test_business_seconds(cal: BusinessCalendar) -> None:
    assert cal.business_seconds(berlin(2025, 11, 21, 17), berlin(2025, 11, 24, 10)) == 7200
    assert cal.business_seconds(berlin(2025, 11, 22, 1), berlin(2025, 11, 23, 23)) == 0
    assert cal.business_seconds(berlin(2025, 11, 24, 10), berlin(2025, 11, 24, 9)) == 0


def test_public_holidays_from_team_settings() -> None:
    c = BusinessCalendar.for_team(team(holidays={"country": "DE", "subdivision": "BE",
                                                 "extra": [date(2025, 12, 24)]}))
    assert not c.is_open(berlin(2025, 10, 3, 12))     # Tag der Deutschen Einheit
    assert not c.is_open(berlin(2025, 3, 8, 12))      # Saturday anyway
    assert not c.is_open(berlin(2025, 12, 24, 12))    # extra
    assert c.is_open(berlin(2025, 12, 23, 12))
    assert c.add_business(berlin(2025, 12, 23, 17), 2 * 3600) == berlin(2025, 12, 29, 10)


def test_twenty_four_seven() -> None:
    c = BusinessCalendar.for_team(team(business_hours="24/7"))
    assert c.is_open(berlin(2025, 11, 22, 3))
    start = berlin(2025, 11, 22, 3)
    assert c.add_business(start, 86400) == start + timedelta(days=1)


def test_dst_spring_forward() -> None:
    # 30 March 2025: 02:00 CET becomes 03:00 CEST. A 24/7 day is 23 real hours long.
    c = BusinessCalendar("Europe/Berlin", None)
    assert c.business_seconds(berlin(2025, 3, 30, 0), berlin(2025, 3, 31, 0)) == 23 * 3600
    assert c.add_business(berlin(2025, 3, 30, 1), 3600) == berlin(2025, 3, 30, 3)
    # Business hours stay wall-clock hours: Friday 17:00 + 2h is Monday 10:00 CEST.
    w = BusinessCalendar("Europe/Berlin", NINE_SIX)
    out = w.add_business(berlin(2025, 3, 28, 17), 2 * 3600)
    assert out == berlin(2025, 3, 31, 10)
    assert out == datetime(2025, 3, 31, 8, tzinfo=UTC)


def test_dst_fall_back() -> None:
    # 26 October 2025: 03:00 CEST becomes 02:00 CET; the day has 25 hours.
    c = BusinessCalendar("Europe/Berlin", None)
    assert c.business_seconds(berlin(2025, 10, 26, 0), berlin(2025, 10, 27, 0)) == 25 * 3600
    night = BusinessCalendar("Europe/Berlin", {6: [(time(1), time(4))]})
    assert night.business_seconds(berlin(2025, 10, 26, 0), berlin(2025, 10, 27, 0)) == 4 * 3600
    w = BusinessCalendar("Europe/Berlin", NINE_SIX)
    assert w.add_business(berlin(2025, 10, 24, 17), 2 * 3600) == berlin(2025, 10, 27, 10)
    assert w.business_seconds(berlin(2025, 10, 24, 9), berlin(2025, 10, 27, 18)) == 18 * 3600


def test_end_of_day_is_midnight() -> None:
    t = BusinessCalendar.for_team(team(business_hours={"mon-fri": "20:00-24:00"}))
    assert t.is_open(berlin(2025, 11, 24, 23, 59, 59, 999999))
    assert t.business_seconds(berlin(2025, 11, 24, 0), berlin(2025, 11, 25, 0)) == 4 * 3600
    assert t.add_business(berlin(2025, 11, 24, 20), 4 * 3600) == berlin(2025, 11, 25, 0)


def test_never_open_weekly_hours() -> None:
    with pytest.raises(NeverOpenError, match="never open"):
        BusinessCalendar("Europe/Berlin", {d: [] for d in range(7)})
    with pytest.raises(ValueError, match=r"team 'support'.*never open"):
        BusinessCalendar.for_team(team(business_hours={"mon-sun": "closed"}))


def test_never_open_because_of_holidays() -> None:
    c = BusinessCalendar("Europe/Berlin", NINE_SIX, lambda d: True)
    with pytest.raises(ValueError, match="no open time"):
        c.add_business(berlin(2025, 11, 24, 10), 60)
    with pytest.raises(ValueError, match="no open time"):
        c.next_open(berlin(2025, 11, 24, 10))


def test_typical_day() -> None:
    assert BusinessCalendar("UTC", NINE_SIX).typical_day_seconds() == 9 * 3600
    assert BusinessCalendar("UTC", None).typical_day_seconds() == 86400


SPLIT = BusinessCalendar("Europe/Berlin", {
    **{d: [(time(8), time(12)), (time(13), time(17, 30))] for d in range(5)},
    5: [(time(10), time(14))]}, {date(2025, 10, 3), date(2025, 12, 25)})
moments = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2026, 12, 31),
                       timezones=st.just(BERLIN))


@settings(max_examples=300, deadline=None)
@given(start=moments, seconds=st.floats(min_value=1, max_value=40 * 9.5 * 3600))
def test_add_then_measure_is_identity(start: datetime, seconds: float) -> None:
    end = SPLIT.add_business(start, seconds)
    assert end >= start
    assert SPLIT.business_seconds(start, end) == pytest.approx(seconds, abs=1e-3)
    assert SPLIT.is_open(end - timedelta(microseconds=1)) or SPLIT.is_open(end)


@settings(max_examples=300, deadline=None)
@given(start=moments, span=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=60)))
def test_measure_then_add_never_overshoots(start: datetime, span: timedelta) -> None:
    end = start + span
    secs = SPLIT.business_seconds(start, end)
    if secs > 0:
        back = SPLIT.add_business(start, secs)
        assert back <= end + timedelta(microseconds=2)
        assert SPLIT.business_seconds(start, back) == pytest.approx(secs, abs=1e-3)
        assert SPLIT.add_business(end, -secs) >= start - timedelta(microseconds=2)
