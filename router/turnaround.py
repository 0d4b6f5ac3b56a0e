"""The honest ETA: by when a person will answer, computed from what the team actually does.

`history` reads recent first-response times, the queue and the answer rate from the tickets
table; `estimate` turns them into a `Promise`; `describe` words it for the customer;
`promise_kept` checks it afterwards. Waits are measured in business seconds (open time of the
team's calendar), so a weekend does not count as slowness and a promise made on Friday evening
lands on Monday.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, bindparam, func, select

from router import fastsql
from router.models import T_TICKET, TicketStatus

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlmodel import Session

    from router.calendar import BusinessCalendar

BASIS_HISTORY = "history"
BASIS_SLA = "sla_fallback"

FLOOR = 10 * 60                      # never promise a faster answer than this
SHORT_WAIT = timedelta(hours=4)      # up to this far ahead, say "within about N hours"
RATE_WINDOW_HOURS = 8.0              # business hours over which the answer rate is measured
# The share of recent tickets that found (almost) no queue; their waits are the allowance on
# top of the queue's drain time. Tuned with bench/simulate.py against its targets.
ALLOWANCE_QUANTILE = 0.25


@dataclass
class Promise:
    deadline: datetime               # aware UTC
    business_seconds: float          # open time between now and the deadline
    basis: str                       # "history" | "sla_fallback"
    detail: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- numbers

def sample_quantile(samples: list[float], q: float) -> float:
    """The smallest sample that at least a share `q` of the samples do not exceed.

    Nearest rank rather than interpolation: the result is a wait that really happened, and it
    errs towards the longer wait, which is the side a promise should err on.
    """
    if not samples:
        raise ValueError("quantile of no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def humane_round(seconds: float, day_seconds: float) -> tuple[float, str]:
    """Round a business duration up to what a person would say: quarter hours up to an
    hour, whole hours up to a business day, half business days beyond."""
    if seconds <= 3600:
        step, unit = 900.0, "15min"
    elif seconds <= day_seconds:
        step, unit = 3600.0, "1h"
    else:
        step, unit = day_seconds / 2, "half_day"
    return math.ceil(seconds / step - 1e-9) * step, unit


def _ceil_local(dt: datetime, tz: ZoneInfo, step: int) -> datetime:
    """Round a moment up to a whole `step` of local wall time (so 10:52 reads 11:00)."""
    local = dt.astimezone(tz)
    offset = local.utcoffset() or timedelta(0)
    wall = local.replace(tzinfo=None) - datetime(1970, 1, 1)
    secs = wall.total_seconds()
    rounded = math.ceil(secs / step - 1e-9) * step
    out = dt + timedelta(seconds=rounded - secs)
    # Across a DST change the offset may differ at the rounded moment; never round down.
    if (out.astimezone(tz).utcoffset() or offset) != offset:
        return dt
    return out.astimezone(UTC)


# ---------------------------------------------------------------------------- estimate

def estimate(now: datetime, calendar: BusinessCalendar, samples: list[float],
             backlog: int | Callable[[], int], answer_rate: float | None,
             sla_target: timedelta, quantile: float = 0.9,
             min_samples: int = 20, *, sla_business_hours: bool = True,
             floor: float = FLOOR) -> Promise:
    """Promise a first-response time the team will beat (by default about 9 times in 10).

    The reasoning, in business seconds throughout:

    1. ``q``, the `quantile` of recent first-response times, answers "how long did slow
       tickets wait?" but not "how long will *this* one wait?". Most of its spread is the
       queue: a ticket that arrives to an empty queue at 10:00 and one that arrives behind
       the weekend's mail on Monday are both in the samples. Promised to everybody, ``q``
       gives the quiet-hour customer three to five times their real wait (bench/simulate.py
       measured median slack 3.5-4.9x the median wait), which is an honest-looking number
       that is not honest.
    2. So the queue is modelled, not sampled. In a FIFO queue a ticket waits for the backlog
       ahead to be taken and then for its own reply: ``drain = (backlog + 1) / R`` hours at
       the recent answer rate ``R`` (first responses per business hour).
    3. What history adds on top is the part the queue does not explain: the time a ticket
       takes once it is its turn (writing the reply, an agent finishing something else, the
       rate wobbling). The tickets that found the queue short are the fastest ones, so the
       lower quartile of the samples (`ALLOWANCE_QUANTILE`) estimates that allowance; it
       grows by itself in a team that is slow even when quiet.
       The promise is ``drain + allowance``. Taking ``q + backlog / R`` instead would count
       the queue twice: ``q`` already contains the queues the samples waited behind.
       ``adjustment`` in the detail is the promise minus ``q``: how far today's queue moves
       the promise from the history quantile (negative when the queue is short).
    4. No usable rate (nothing answered in the rate window): the history quantile ``q``
       unadjusted, and the detail says so.
    5. Never less than `floor`; rounded up (`humane_round`); converted to a wall-clock
       deadline with the calendar, and deadlines that will be shown as a clock time are
       rounded up to the next full local hour.

    Fewer than `min_samples` samples: the team's SLA target instead, basis "sla_fallback".
    `backlog` may be a function that counts it: it is called only when the promise needs it
    (counting reads the whole backlog, and most promises of a new team do not need it).
    """
    if now.tzinfo is None:
        raise ValueError("estimate needs an aware `now`")
    now = now.astimezone(UTC)
    detail: dict[str, Any] = {
        "samples": len(samples), "min_samples": min_samples, "quantile": quantile,
        "backlog": backlog if isinstance(backlog, int) else None,
        "rate_per_hour": answer_rate, "floor_seconds": floor,
    }
    if len(samples) < min_samples:
        detail["reason"] = (f"only {len(samples)} first responses in the history window, "
                            f"fewer than {min_samples}; promising the SLA target instead")
        detail["sla_target_seconds"] = sla_target.total_seconds()
        detail["sla_business_hours"] = sla_business_hours
        if sla_business_hours:
            deadline = calendar.add_business(now, sla_target.total_seconds())
        else:
            deadline = now + sla_target
        return _finish(now, calendar, deadline, BASIS_SLA, detail)

    ordered = sorted(samples)
    q = sample_quantile(ordered, quantile)
    detail["quantile_seconds"] = q
    if answer_rate is not None and answer_rate > 0:
        if not isinstance(backlog, int):
            backlog = detail["backlog"] = backlog()
        drain = (backlog + 1) / answer_rate * 3600.0
        allowance = sample_quantile(ordered, ALLOWANCE_QUANTILE)
        detail["drain_seconds"] = drain
        detail["allowance_quantile"] = ALLOWANCE_QUANTILE
        detail["allowance_seconds"] = allowance
        target = drain + allowance
    else:
        target = q
        detail["drain_seconds"] = None
        detail["reason"] = ("no first responses in the last business hours to measure a "
                            "rate; promising the history quantile unadjusted")
    detail["adjustment_seconds"] = target - q
    raw = max(float(floor), target)
    detail["raw_seconds"] = raw
    rounded, unit = humane_round(raw, calendar.typical_day_seconds())
    detail["rounding"] = unit
    detail["rounded_seconds"] = rounded
    return _finish(now, calendar, calendar.add_business(now, rounded), BASIS_HISTORY, detail)


def _finish(now: datetime, calendar: BusinessCalendar, deadline: datetime, basis: str,
            detail: dict[str, Any]) -> Promise:
    if deadline - now > SHORT_WAIT:
        # Shown as "by Monday, 11:00": a round clock time, later rather than earlier.
        shown = _ceil_local(deadline, calendar.tz, 3600)
        detail["clock_rounding_seconds"] = (shown - deadline).total_seconds()
        deadline = shown
    return Promise(deadline=deadline.astimezone(UTC),
                   business_seconds=calendar.business_seconds(now, deadline),
                   basis=basis, detail=detail)


def promise_kept(promised_at: datetime, first_response_at: datetime) -> bool:
    """A promise is kept when the first response is sent no later than promised."""
    return first_response_at <= promised_at


# ---------------------------------------------------------------------------- history

_HISTORY: dict[tuple[str, str], tuple[tuple[Any, ...], list[float], list[datetime]]] = {}

# Built once: every acknowledgement asks, and building a statement costs more than running it.
_ANSWERED = and_(T_TICKET.c.team == bindparam("team"),
                 T_TICKET.c.created_at >= bindparam("since"),
                 T_TICKET.c.created_at <= bindparam("now"),
                 T_TICKET.c.first_response_at.is_not(None),
                 T_TICKET.c.first_response_at <= bindparam("now"))
_SIGNATURE = select(func.count(), func.max(T_TICKET.c.first_response_at),
                    func.min(T_TICKET.c.created_at),
                    func.max(T_TICKET.c.id)).where(_ANSWERED)
_SAMPLES = select(T_TICKET.c.created_at, T_TICKET.c.first_response_at).where(_ANSWERED)
# A team's backlog: its tickets waiting for a first response.
BACKLOG_STATUSES = (TicketStatus.NEW, TicketStatus.OPEN)
_IN_BACKLOG = and_(T_TICKET.c.team == bindparam("team"),
                   T_TICKET.c.status.in_(BACKLOG_STATUSES),
                   T_TICKET.c.first_response_at.is_(None))
_BACKLOG = select(func.count()).select_from(T_TICKET).where(
    _IN_BACKLOG, T_TICKET.c.id != bindparam("exclude"))


def history(session: Session, team: str, now: datetime, calendar: BusinessCalendar,
            window: timedelta = timedelta(days=28), *, exclude_id: int | None = None,
            rate_hours: float = RATE_WINDOW_HOURS) -> tuple[list[float], int, float | None]:
    """(samples, backlog, answer_rate) for `team` as of `now`: `answered`, and `backlog`
    minus `exclude_id` (the ticket being acknowledged)."""
    session.flush()  # the queries read the tables directly
    conn = session.connection()
    samples, rate = answered(conn, team, now, calendar, window, rate_hours=rate_hours)
    return samples, backlog(conn, team, exclude_id), rate


def answered(conn: Connection, team: str, now: datetime, calendar: BusinessCalendar,
             window: timedelta = timedelta(days=28), *,
             rate_hours: float = RATE_WINDOW_HOURS) -> tuple[list[float], float | None]:
    """(samples, answer_rate) for `team` as of `now`.

    samples: first-response times in business seconds of tickets created in the window and
    answered by `now`. answer_rate: first responses per business hour over the last
    `rate_hours` business hours, counted among the window's tickets so the one query that
    filters by team and created_at serves both; None if the calendar had no open time to
    measure over.
    """
    params = {"team": team, "since": now - window, "now": now}
    # Converting each answered ticket to business seconds is the costly part, and it is the
    # same for every new ticket until an answer arrives or one leaves the window: keep it,
    # keyed by what would change it.
    signature = tuple(fastsql.execute(conn, _SIGNATURE, params).one())
    ckey = calendar.cache_key()
    key = (team, ckey or "")
    cached = _HISTORY.get(key) if ckey is not None else None
    if cached is not None and cached[0] == signature:
        samples, answered_at = cached[1], cached[2]
    else:
        samples, answered_at = [], []
        for created, first in fastsql.execute(conn, _SAMPLES, params).all():
            if first is None:
                continue
            samples.append(calendar.business_seconds(created, first))
            answered_at.append(first)
        if ckey is not None:
            if len(_HISTORY) > 256:
                _HISTORY.clear()
            _HISTORY[key] = (signature, samples, answered_at)
    rate_start = calendar.add_business(now, -rate_hours * 3600.0)
    hours = calendar.business_seconds(rate_start, now) / 3600.0
    rate: float | None = None
    if hours > 0:
        rate = sum(1 for t in answered_at if t >= rate_start) / hours
    return samples, rate


def backlog(conn: Connection, team: str, exclude_id: int | None = None, *,
            counted: Backlogs | None = None) -> int:
    """The team's new and open tickets without a first response, but `exclude_id`; with
    `counted`, from what this transaction counted before."""
    if counted is not None and exclude_id is not None:
        return counted.count(conn, team, exclude_id)
    return int(fastsql.execute(
        conn, _BACKLOG, {"team": team, "exclude": exclude_id or 0}).scalar_one())


_BACKLOG_UPTO = select(func.count()).select_from(T_TICKET).where(
    _IN_BACKLOG, T_TICKET.c.id <= bindparam("upto"))
# A seek, not a count: SQLite's index on (team, status, first_response_at) ends in the
# rowid, and PostgreSQL has one on (team, status, id).
_BACKLOG_AFTER = select(func.count()).select_from(T_TICKET).where(
    _IN_BACKLOG, T_TICKET.c.id > bindparam("after"), T_TICKET.c.id != bindparam("exclude"))


class Backlogs:
    """The teams' backlogs as one write transaction sees them, each counted whole once.

    A count reads every ticket in the backlog, and every new ticket's promise asks: in a
    flood of N mails that is N²/2 index entries, inside the write lock. Here a team's
    backlog is counted once up to the first ticket that asks, and after that only the
    tickets opened since (a seek on the index). That is exact while the transaction
    changes no older ticket's place in a backlog (its status, first response or team):
    whoever might have calls `forget`. On PostgreSQL a transaction sees what other
    instances commit meanwhile, and this does not: tickets they open with higher ids are
    counted, their answers to older tickets are not, until the transaction ends.
    """

    def __init__(self) -> None:
        self._upto: dict[str, tuple[int, int]] = {}  # team -> (count, up to this id)

    def forget(self) -> None:
        self._upto.clear()

    def count(self, conn: Connection, team: str, exclude_id: int) -> int:
        held = self._upto.get(team)
        if held is None or exclude_id <= held[1]:
            # First ask, or about an older ticket (its place in the count is unknown).
            upto = exclude_id - 1
            n = int(fastsql.execute(conn, _BACKLOG_UPTO,
                                    {"team": team, "upto": upto}).scalar_one())
            held = self._upto[team] = (n, upto)
        n, upto = held
        return n + int(fastsql.execute(conn, _BACKLOG_AFTER, {
            "team": team, "after": upto, "exclude": exclude_id}).scalar_one())


# ---------------------------------------------------------------------------- wording

_EN_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EN_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December")
_TR_DAYS = ("Pazartesi", "Salı", "Çarşamba", "Perşembe", "Cuma", "Cumartesi", "Pazar")
_TR_MONTHS = ("Ocak", "Şubat", "Mart", "Nisan", "Mayıs", "Haziran", "Temmuz", "Ağustos",
              "Eylül", "Ekim", "Kasım", "Aralık")
# The dative suffix follows the last spoken word of the number: its vowel harmony, and a
# buffer "y" after a vowel (ikiye, altıya, yediye). Indexed by the last digit, or for round
# tens by the tens digit (on'a, yirmi'ye, otuz'a, kırk'a, elli'ye; sıfır'a).
_TR_DATIVE_ONES = ("", "'e", "'ye", "'e", "'e", "'e", "'ya", "'ye", "'e", "'a")
_TR_DATIVE_TENS = ("'a", "'a", "'ye", "'a", "'a", "'ye")


def _tr_dative(hour: int, minute: int) -> str:
    n = minute if minute else hour
    if n % 10:
        return _TR_DATIVE_ONES[n % 10]
    return _TR_DATIVE_TENS[n // 10]


def _zone_label(local: datetime) -> str:
    abbr = local.tzname() or ""
    # zoneinfo gives "+03" where a zone has no letters; bare digits read like a typo.
    return f"UTC{abbr}" if abbr[:1] in "+-" else abbr


def describe(promise: Promise, now: datetime, tz: str, language: str = "en") -> str:
    """The promise in the customer's words: relative for short waits, a clock time else."""
    lang = (language or "en").lower().replace("_", "-").split("-")[0]
    wait = (promise.deadline - now).total_seconds()
    if wait <= SHORT_WAIT.total_seconds():
        if wait <= 3600:
            # Quarter hours: a customer reads "about 20 minutes" as a precise figure.
            minutes = max(15, math.ceil(wait / 900 - 1e-9) * 15)
            if minutes < 60:
                return (f"yaklaşık {minutes} dakika içinde" if lang == "tr"
                        else f"within about {minutes} minutes")
        hours = max(1, math.ceil(wait / 3600 - 1e-9))
        if lang == "tr":
            return f"yaklaşık {hours} saat içinde"
        return f"within about {hours} hour{'s' if hours != 1 else ''}"
    local = promise.deadline.astimezone(ZoneInfo(tz))
    clock = f"{local.hour:02d}:{local.minute:02d}"
    zone = _zone_label(local)
    if lang == "tr":
        return (f"{local.day} {_TR_MONTHS[local.month - 1]} {_TR_DAYS[local.weekday()]}, "
                f"{clock}{_tr_dative(local.hour, local.minute)} kadar ({zone})")
    return (f"by {_EN_DAYS[local.weekday()]} {local.day} {_EN_MONTHS[local.month - 1]}, "
            f"{clock} {zone}")
