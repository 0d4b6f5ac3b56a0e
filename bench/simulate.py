"""Discrete-event simulation of one team, to check that router's promises are honest.

Tickets arrive as a non-homogeneous Poisson process (daily and weekly cycles, random bursts,
scenario extras); agents work their shifts and take tickets first in, first out; the first
response goes out when an agent has written it. Every arriving ticket is promised a first
response by the real `router.turnaround.estimate`, fed only with what the daemon would know at
that moment: first-response times of the last 28 days' answered tickets, the current backlog and
the answer rate of the last business hours. Afterwards each promise is checked.

    python bench/simulate.py [--scenario NAME] [--days N] [--seed S] [--json]

Targets: at least 90% of promises kept, and median slack (promised - actual wait, in business
time) at most 1.5x the median actual wait, in every scenario.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import statistics
import sys
import time as wall
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router import turnaround
from router.calendar import BusinessCalendar
from router.settings import Member, Team

TZ = "Europe/Berlin"
# A Monday; the default run crosses the March DST change and the Easter holidays (DE-BE).
START = datetime(2025, 3, 3, tzinfo=BusinessCalendar(TZ).tz)
WARMUP_DAYS = 7            # history a deployed daemon would already have; not scored
HISTORY_WINDOW = 28 * 86400.0
SLA_TARGET = timedelta(hours=4)
DEFAULT_DAYS = 42
SCENARIOS = ("steady", "monday-burst", "understaffed")

TEAM = Team(
    name="support", addresses=["support@acme.example"], lead="ana@acme.example",
    members=[Member(name="Ana", email="ana@acme.example", role="lead"),
             Member(name="Ben", email="ben@acme.example"),
             Member(name="Cem", email="cem@acme.example")],
    timezone=TZ, business_hours={"mon-fri": "09:00-18:00"},
    holidays={"country": "DE", "subdivision": "BE"},  # type: ignore[arg-type]
)

# Agents' shifts inside the team's hours, with lunch breaks, so staffing varies over the day.
SHIFTS: dict[str, str] = {
    "ana": "09:00-13:00, 14:00-18:00",
    "ben": "10:00-13:00, 14:00-18:00",
    "cem": "09:00-12:00, 13:00-17:00",
}

# Arrivals per hour on an ordinary weekday, by local hour (mail comes in around the clock).
HOURLY = (0.4, 0.3, 0.2, 0.2, 0.2, 0.3, 0.6, 1.2, 3.0, 5.5, 6.0, 5.5,
          4.0, 4.5, 5.0, 4.5, 4.0, 3.0, 2.0, 1.5, 1.2, 1.0, 0.8, 0.6)
WEEKDAY = (1.2, 1.05, 1.0, 1.0, 0.9, 0.3, 0.25)   # Monday .. Sunday; holidays count as Sunday
SERVICE_MEDIAN_MIN = 10.0  # writing a first reply: lognormal, median 10 min, mean ~14 min
SERVICE_SIGMA = 0.8
BURST_CHANCE = 0.03        # per open hour: something breaks and a cluster of mail arrives
BURST_SIZE = 10


@dataclass
class Scenario:
    name: str
    load: float = 1.0                          # multiplies HOURLY
    monday_burst: float = 0.0                  # extra tickets/hour, Mondays 08:00-10:00
    absent: dict[str, tuple[int, int]] = field(default_factory=dict)  # agent: (from, to) day
    surge: tuple[int, int, float] | None = None  # (from day, to day, load factor)


SCENARIO_DEFS: dict[str, Scenario] = {
    "steady": Scenario("steady"),
    "monday-burst": Scenario("monday-burst", monday_burst=25.0),
    # A colleague off sick for two weeks while mail picks up: arrivals at or above what the
    # two remaining agents can answer, so the queue grows for days before it drains.
    "understaffed": Scenario("understaffed", absent={"ben": (14, 28)}, surge=(14, 24, 1.15)),
}


# ---------------------------------------------------------------------------- helpers

def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _agent_calendar(name: str, team_cal: BusinessCalendar) -> BusinessCalendar:
    spans = []
    for chunk in SHIFTS[name].split(","):
        a, b = chunk.strip().split("-")
        spans.append((time.fromisoformat(a), time.fromisoformat(b)))
    return BusinessCalendar(TZ, {d: spans for d in range(5)}, team_cal.is_holiday, name=name)


def arrivals(sc: Scenario, days: int, rng: random.Random, cal: BusinessCalendar) -> list[float]:
    """Arrival times: Poisson counts per wall-clock hour, uniform within the hour (exact for
    a rate that is constant over each hour)."""
    out: list[float] = []
    t0 = START.timestamp()
    for h in range(days * 24):
        ts = t0 + h * 3600
        local = datetime.fromtimestamp(ts, cal.tz)
        day = (local.date() - START.date()).days
        weekday = 6 if cal.is_holiday(local.date()) else local.weekday()
        rate = HOURLY[local.hour] * WEEKDAY[weekday] * sc.load
        if sc.surge and sc.surge[0] <= day < sc.surge[1]:
            rate *= sc.surge[2]
        if sc.monday_burst and weekday == 0 and 8 <= local.hour < 10:
            rate += sc.monday_burst
        n = _poisson(rng, rate)
        if weekday < 5 and 8 <= local.hour < 18 and rng.random() < BURST_CHANCE:
            n += _poisson(rng, BURST_SIZE)
            # A burst is one incident: its mail comes within a quarter of an hour.
            start = rng.random() * 2700
            out.extend(ts + start + rng.random() * 900 for _ in range(n))
        else:
            out.extend(ts + rng.random() * 3600 for _ in range(n))
    out.sort()
    return out


# ---------------------------------------------------------------------------- simulation

@dataclass
class Ticket:
    created: float
    promised: float = 0.0
    basis: str = ""
    answered: float | None = None


def run_scenario(name: str, days: int = DEFAULT_DAYS, seed: int = 1) -> dict[str, Any]:
    """Simulate `days` scored days (after a warm-up week) and score the promises."""
    if name not in SCENARIO_DEFS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    sc = SCENARIO_DEFS[name]
    rng = random.Random(f"{name}:{seed}")
    cal = BusinessCalendar.for_team(TEAM)
    agents = {a: _agent_calendar(a, cal) for a in SHIFTS}
    total_days = WARMUP_DAYS + days
    t0 = START.timestamp()
    scored_from = t0 + WARMUP_DAYS * 86400
    started = wall.perf_counter()

    tickets: list[Ticket] = []
    queue: deque[int] = deque()               # FIFO of ticket indices not yet taken
    unanswered = 0                            # queued or being written: the daemon's backlog
    answered_log: deque[tuple[float, float, float]] = deque()  # (answered, created, wait)
    answer_times: list[float] = []            # every first response, in time order
    # Events: (time, order, kind, payload). Arrivals are generated up front; agents schedule
    # their own wake-ups, so an event at time t only ever sees the past.
    events: list[tuple[float, int, str, str | int]] = []
    seq = 0
    for ts in arrivals(sc, total_days, rng, cal):
        events.append((ts, seq, "arrive", len(tickets)))
        tickets.append(Ticket(created=ts))
        seq += 1
    heapq.heapify(events)
    idle: set[str] = set()                   # free agents waiting for mail
    for a in agents:
        heapq.heappush(events, (t0, seq, "wake", a))
        seq += 1

    def available_from(agent: str, now: float) -> float:
        span = sc.absent.get(agent)
        if span and span[0] <= (now - t0) / 86400 < span[1]:
            now = t0 + span[1] * 86400
        return agents[agent].next_open(_dt(now)).timestamp()

    def dispatch(agent: str, now: float) -> None:
        nonlocal seq
        if not queue:
            idle.add(agent)
            return
        start = available_from(agent, now)
        if start > now:
            heapq.heappush(events, (start, seq, "wake", agent))
            seq += 1
            return
        idx = queue.popleft()
        service = SERVICE_MEDIAN_MIN * 60 * math.exp(rng.gauss(0, SERVICE_SIGMA))
        heapq.heappush(events, (now + service, seq, "done", f"{agent}:{idx}"))
        seq += 1

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, int)
            t = tickets[payload]
            while answered_log and answered_log[0][0] < now - HISTORY_WINDOW:
                answered_log.popleft()
            samples = [w for _, c, w in answered_log if c >= now - HISTORY_WINDOW]
            rate_start = cal.add_business(_dt(now), -turnaround.RATE_WINDOW_HOURS * 3600)
            hours = cal.business_seconds(rate_start, _dt(now)) / 3600
            n_recent = len(answer_times) - bisect.bisect_left(answer_times,
                                                              rate_start.timestamp())
            rate = n_recent / hours if hours > 0 else None
            p = turnaround.estimate(_dt(now), cal, samples, unanswered, rate, SLA_TARGET,
                                    TEAM_QUANTILE, TEAM_MIN_SAMPLES)
            t.promised, t.basis = p.deadline.timestamp(), p.basis
            queue.append(payload)
            unanswered += 1
            for agent in sorted(idle):
                idle.discard(agent)
                dispatch(agent, now)
        elif kind == "done":
            assert isinstance(payload, str)
            agent, idx_s = payload.split(":")
            t = tickets[int(idx_s)]
            t.answered = now
            unanswered -= 1
            wait = cal.business_seconds(_dt(t.created), _dt(now))
            answered_log.append((now, t.created, wait))
            answer_times.append(now)
            dispatch(agent, now)
        else:
            assert isinstance(payload, str)
            dispatch(payload, now)

    return score(name, days, seed, cal, tickets, scored_from, wall.perf_counter() - started)


TEAM_QUANTILE = 0.9        # the defaults of [ack] in router.toml
TEAM_MIN_SAMPLES = 20


def score(name: str, days: int, seed: int, cal: BusinessCalendar, tickets: list[Ticket],
          scored_from: float, seconds: float) -> dict[str, Any]:
    scored = [t for t in tickets if t.created >= scored_from and t.answered is not None]
    waits, slacks, wall_waits, wall_slacks, kept = [], [], [], [], 0
    fallback = 0
    for t in scored:
        assert t.answered is not None
        created, answered, promised = _dt(t.created), _dt(t.answered), _dt(t.promised)
        wait = cal.business_seconds(created, answered)
        promised_bs = cal.business_seconds(created, promised)
        waits.append(wait / 3600)
        slacks.append((promised_bs - wait) / 3600)
        wall_waits.append((t.answered - t.created) / 3600)
        wall_slacks.append((t.promised - t.answered) / 3600)
        kept += turnaround.promise_kept(promised, answered)
        fallback += t.basis == turnaround.BASIS_SLA
    n = len(scored)
    med_wait = statistics.median(waits) if waits else 0.0
    med_slack = statistics.median(slacks) if slacks else 0.0
    return {
        "scenario": name, "days": days, "seed": seed, "tickets": n,
        "kept_share": kept / n if n else 0.0,
        "median_slack_hours": med_slack,
        "median_wait_hours": med_wait,
        "slack_wait_ratio": med_slack / med_wait if med_wait > 0 else math.inf,
        "p90_wait_hours": statistics.quantiles(waits, n=10)[-1] if n >= 2 else med_wait,
        "max_wait_hours": max(waits, default=0.0),
        "wall_median_wait_hours": statistics.median(wall_waits) if n else 0.0,
        "wall_median_slack_hours": statistics.median(wall_slacks) if n else 0.0,
        "sla_fallback": fallback,
        "unanswered_at_end": sum(1 for t in tickets if t.answered is None),
        "runtime_seconds": round(seconds, 2),
        "targets_met": n > 0 and kept / n >= 0.9 and med_slack <= 1.5 * med_wait,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--days", type=int, default=DEFAULT_DAYS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = [run_scenario(n, args.days, args.seed) for n in names]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'scenario':<14}{'tickets':>8}{'kept':>8}{'med wait h':>12}"
              f"{'med slack h':>13}{'slack/wait':>12}{'p90 wait h':>12}  targets")
        for r in results:
            print(f"{r['scenario']:<14}{r['tickets']:>8}{r['kept_share']:>8.1%}"
                  f"{r['median_wait_hours']:>12.2f}{r['median_slack_hours']:>13.2f}"
                  f"{r['slack_wait_ratio']:>12.2f}{r['p90_wait_hours']:>12.2f}  "
                  f"{'met' if r['targets_met'] else 'MISSED'}")
        print(f"({args.days} scored days after a {WARMUP_DAYS}-day warm-up, seed {args.seed}; "
              "waits and slack in business hours)")
    return 0 if all(r["targets_met"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
