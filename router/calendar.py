"""Business hours and holidays: when a team is open, and how much open time lies between two
moments.

Opening hours are local wall time in the team's zone, so a 09:00-18:00 day is 9 hours of open
time on most days and still 09:00-18:00 on the day the clocks change. All public methods take
aware datetimes and return aware UTC datetimes.

Internally moments are POSIX timestamps (floats): the arithmetic is a few additions per day
instead of datetime objects, and a day's open spans are computed once and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from router.settings import Team

Week = dict[int, list[tuple[time, time]]]
HolidayTest = Callable[[date], bool]

END_OF_DAY = time(23, 59, 59, 999999)   # how settings stores "24:00"
# Longer than any real closure (a year of holidays would be a misconfiguration); bounds the
# search so a calendar that is never open fails with a message instead of looping.
MAX_CLOSED_DAYS = 400
_ONE_DAY = timedelta(days=1)


class NeverOpenError(ValueError):
    """The calendar has no open time where some was needed."""


def _merge(spans: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return tuple(out)


def _aware(dt: datetime, what: str) -> float:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got naive {dt.isoformat()}")
    return dt.timestamp()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


_TEAM_CALENDARS: dict[str, BusinessCalendar] = {}


class BusinessCalendar:
    """Open time of one team.

    `week` maps weekday (0 = Monday) to sorted local spans; a missing weekday is closed;
    ``None`` means open around the clock. `holidays` is a set of local dates or a predicate;
    a holiday is closed all day, also for a 24/7 week (a team that lists holidays means it).
    """

    def __init__(self, tz: str, week: Week | None = None,
                 holidays: Iterable[date] | HolidayTest | None = None,
                 *, name: str = "") -> None:
        self.tz_name = tz
        self.tz = ZoneInfo(tz)
        self.name = name or tz
        self.week: Week | None = None if week is None else {
            d: sorted(week.get(d, [])) for d in range(7)}
        for d, spans in (self.week or {}).items():
            for s, e in spans:
                if e <= s:
                    raise ValueError(f"{self.name}: weekday {d} span {s}-{e} ends before it "
                                     "starts")
        if self.week is not None and not any(self.week.values()):
            raise NeverOpenError(f"calendar {self.name!r} is never open: its business hours "
                                 "have no open span on any weekday")
        self._holiday: HolidayTest
        if holidays is None:
            self._holiday = lambda d: False
        elif callable(holidays):
            self._holiday = holidays
        else:
            days = frozenset(holidays)
            self._holiday = days.__contains__
        self._spans = lru_cache(maxsize=4096)(self._compute_spans)
        # What makes two calendars count time alike; None when the holidays are an opaque
        # predicate. `for_team` sets it from the config.
        self._cache_key: str | None = (
            None if callable(holidays)
            else f"{tz}|{self.week}|{sorted(holidays or ())}")

    def cache_key(self) -> str | None:
        return self._cache_key

    @classmethod
    def cached_for_team(cls, team: Team) -> BusinessCalendar:
        """`for_team`, kept per calendar definition: every routed message asks (promise,
        rules), building one loads holiday tables, and a calendar keeps its days' spans."""
        key = (f"{team.name}|{team.timezone}|{team.business_hours!r}|"
               f"{team.holidays.model_dump_json()}")
        calendar = _TEAM_CALENDARS.get(key)
        if calendar is None:
            calendar = cls.for_team(team)  # a calendar that is never open raises, uncached
            if len(_TEAM_CALENDARS) > 256:
                _TEAM_CALENDARS.clear()
            _TEAM_CALENDARS[key] = calendar
        return calendar

    @classmethod
    def for_team(cls, team: Team) -> BusinessCalendar:
        """The team's calendar; raises ValueError naming the team if it would never be open."""
        extra = frozenset(team.holidays.extra)
        test: HolidayTest
        if team.holidays.country:
            import holidays as holidays_lib

            public = holidays_lib.country_holidays(team.holidays.country,
                                                   subdiv=team.holidays.subdivision)

            def test(d: date) -> bool:
                return d in extra or d in public
        else:
            test = extra.__contains__
        try:
            calendar = cls(team.timezone, team.weekly_hours(), test, name=team.name)
        except NeverOpenError as exc:
            raise NeverOpenError(f"team {team.name!r}: {exc}; set business_hours to open "
                                 "spans such as { mon-fri = \"09:00-17:00\" } or \"24/7\""
                                 ) from exc
        calendar._cache_key = (f"{team.timezone}|{calendar.week}|{team.holidays.country}|"
                               f"{team.holidays.subdivision}|{sorted(extra)}")
        return calendar

    # ------------------------------------------------------------------ days

    def is_holiday(self, d: date) -> bool:
        return bool(self._holiday(d))

    def _compute_spans(self, d: date) -> tuple[tuple[float, float], ...]:
        if self._holiday(d):
            return ()
        spans = [(time(0), END_OF_DAY)] if self.week is None else self.week[d.weekday()]
        out = []
        for s, e in spans:
            # fold=0 throughout: a start in the spring-forward gap maps to the moment the clocks
            # jump, so the vanished hour is simply not open time.
            start = datetime.combine(d, s, tzinfo=self.tz).timestamp()
            if e == END_OF_DAY:
                end = datetime.combine(d + _ONE_DAY, time(0), tzinfo=self.tz).timestamp()
            else:
                end = datetime.combine(d, e, tzinfo=self.tz).timestamp()
            out.append((start, end))
        return _merge(out)

    def _local_date(self, ts: float) -> date:
        return datetime.fromtimestamp(ts, self.tz).date()

    def _never_open(self, since: float, backwards: bool = False) -> NeverOpenError:
        where = "before" if backwards else "after"
        return NeverOpenError(
            f"calendar {self.name!r} has no open time in the {MAX_CLOSED_DAYS} days {where} "
            f"{_utc(since).isoformat()}; check its business hours and holidays")

    def open_seconds(self, d: date) -> float:
        """Open time on local date `d` (0 on holidays and closed weekdays)."""
        return sum(e - s for s, e in self._spans(d))

    def typical_day_seconds(self) -> float:
        """Open time of an ordinary open day, ignoring holidays and DST: the unit in which
        people think of "one business day"."""
        if self.week is None:
            return 86400.0
        lengths = []
        for spans in self.week.values():
            secs = sum(
                (86400.0 if e == END_OF_DAY else e.hour * 3600 + e.minute * 60 + e.second)
                - (s.hour * 3600 + s.minute * 60 + s.second) for s, e in spans)
            if secs > 0:
                lengths.append(secs)
        return sum(lengths) / len(lengths)

    # ------------------------------------------------------------------ public API

    def is_open(self, dt: datetime) -> bool:
        t = _aware(dt, "dt")
        return any(s <= t < e for s, e in self._spans(self._local_date(t)))

    def next_open(self, dt: datetime) -> datetime:
        """`dt` itself if open, else the start of the next open span."""
        t = _aware(dt, "dt")
        d = self._local_date(t)
        for _ in range(MAX_CLOSED_DAYS):
            for s, e in self._spans(d):
                if t < e:
                    return _utc(max(t, s))
            d += _ONE_DAY
        raise self._never_open(t)

    def business_seconds(self, start: datetime, end: datetime) -> float:
        """Open time in [start, end); 0 when end is not after start."""
        t0, t1 = _aware(start, "start"), _aware(end, "end")
        if t1 <= t0:
            return 0.0
        total = 0.0
        d, last = self._local_date(t0), self._local_date(t1)
        while d <= last:
            for s, e in self._spans(d):
                lo, hi = max(s, t0), min(e, t1)
                if hi > lo:
                    total += hi - lo
            d += _ONE_DAY
        return total

    def add_business(self, start: datetime, seconds: float) -> datetime:
        """The earliest moment by which `seconds` of open time have passed since `start`.

        Closed time at the start is skipped (a Friday 18:00 start for a Mon-Fri 09-18 team
        counts from Monday 09:00); a result that completes exactly at closing time is that
        closing time. Negative `seconds` count backwards: the latest moment from which that
        much open time leads up to `start`.
        """
        t = _aware(start, "start")
        if seconds == 0:
            return _utc(t)
        if seconds < 0:
            return self._sub_business(t, -seconds)
        remaining = float(seconds)
        d = self._local_date(t)
        closed_days = 0
        while True:
            spans = self._spans(d)
            progressed = False
            for s, e in spans:
                if e <= t:
                    continue
                lo = max(s, t)
                avail = e - lo
                progressed = True
                if avail >= remaining:
                    return _utc(lo + remaining)
                remaining -= avail
            closed_days = 0 if progressed else closed_days + 1
            if closed_days >= MAX_CLOSED_DAYS:
                raise self._never_open(t)
            d += _ONE_DAY

    def _sub_business(self, t: float, seconds: float) -> datetime:
        remaining = seconds
        d = self._local_date(t)
        closed_days = 0
        while True:
            progressed = False
            for s, e in reversed(self._spans(d)):
                if s >= t:
                    continue
                hi = min(e, t)
                avail = hi - s
                progressed = True
                if avail >= remaining:
                    return _utc(hi - remaining)
                remaining -= avail
            closed_days = 0 if progressed else closed_days + 1
            if closed_days >= MAX_CLOSED_DAYS:
                raise self._never_open(t, backwards=True)
            d -= _ONE_DAY

    def __repr__(self) -> str:
        hours = "24/7" if self.week is None else "weekly"
        return f"BusinessCalendar({self.name!r}, tz={self.tz_name!r}, {hours})"
