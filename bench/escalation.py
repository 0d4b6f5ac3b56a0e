"""Escalation scheduler benchmark: tick cost against the number of open tickets, and how late
steps fire while mail is coming in.

    python bench/escalation.py [--tickets 100000] [--baseline 1000] [--due 100]
                               [--load-seconds 10] [--pg URL] [--dir DIR] [--small] [--json]

1. *Tick cost.* Two databases, one with `--baseline` open tickets and one with `--tickets`,
   bulk-inserted with Core executemany (a ticket, its running first_response and resolution
   clocks, its next due time). In both exactly `--due` tickets are due; the rest are due
   later. We time `tick()` (which fires the `--due` steps: notification rendered, outbox row,
   fired-step row, next due time) and `next_due()` (what the loop asks before it sleeps),
   median of several rounds. Both should cost the same at either size: the scheduler reads
   the `ticket.next_due_at` index, never the open tickets.
2. *Lateness under load.* A real clock and `EscalationScheduler.run()` on an event loop,
   while a thread accepts mail as fast as `accept_sync` commits it (each a new ticket, one
   transaction per message, as the pipe channel does) and pipeline worker processes route
   it with every hook, as `router serve` runs them (`--workers`, default 2). Every ticket
   has a step `--after` (default 2s) after its arrival: shorter than routing takes under
   heavy load, on purpose, so the pipeline's lag shows.
   Printed: lateness of each fired step (fired_at - due_at) and the pipeline's lag
   (processed - received), which a step inherits when routing is slower than the step's
   delay, and the scheduler's own lateness, fired_at - max(due_at, routed_at). `--rate`
   caps intake. Intake and the scheduler share this process and its GIL, as they share the
   daemon's.

Figures from a shared machine are noisy; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, delete, func, insert, select, update  # noqa: E402

from router import db, log  # noqa: E402
from router import settings as config  # noqa: E402
from router.clock import FakeClock, system_clock  # noqa: E402
from router.escalate import EscalationScheduler  # noqa: E402
from router.intake.accept import Envelope, accept_sync, intake_engine  # noqa: E402
from router.models import (  # noqa: E402
    T_CUSTOMER,
    T_ESCALATION,
    T_EVENT,
    T_INBOUND,
    T_OUTBOX,
    T_SLA_CLOCK,
    T_THREAD_KEY,
    T_TICKET,
)
from router.worker import PipelineProcess  # noqa: E402

CONFIG = """
templates = "{templates}"

[router]
name = "Bench Co"

[smtp]
hostname = "router.bench"

[database]
url = "{url}"

[[team]]
name = "desk"
addresses = ["desk@bench.example"]
lead = "lena@bench.example"
members = [{{ name = "Lena Lead", email = "lena@bench.example" }}]
sla = {{ first_response = "4h", resolution = "3d", business_hours = false }}
escalation = [ {{ after = "{after}", notify = ["lead"] }} ]
"""


def make_settings(directory: Path, url: str, after: str) -> config.Settings:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "router.toml"
    path.write_text(CONFIG.format(templates=REPO / "templates", url=url, after=after))
    return config.load(path, env={})


def fresh_database(url: str) -> None:
    """An empty, migrated database (a PostgreSQL URL is emptied first: bench databases only)."""
    if not db.is_sqlite(url):
        engine = db.make_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        engine.dispose()
    db.upgrade(url)


# ---------------------------------------------------------------------------- 1. tick cost


def populate(engine: Engine, n: int, due: int, now: datetime, chunk: int = 10_000) -> list[int]:
    """`n` open tickets with running clocks; the first `due` have their 15m step due now."""
    rng = random.Random(7)
    with engine.begin() as conn:
        cid = conn.execute(insert(T_CUSTOMER).returning(T_CUSTOMER.c.id), {
            "email": "ann@example.org", "name": "Ann", "language": None, "vip": False,
            "created_at": now, "last_seen_at": now, "attributes": {}}).scalar_one()
    due_ids: list[int] = []
    next_id = 1
    for start in range(0, n, chunk):
        tickets, clocks = [], []
        for i in range(start, min(n, start + chunk)):
            if i < due:
                created = now - timedelta(minutes=16)
            else:  # arrived within the last 14 minutes: the 15m step is still ahead
                created = now - timedelta(seconds=rng.uniform(0, 14 * 60))
            tickets.append({
                "id": next_id, "team": "desk", "status": "new", "priority": "normal",
                "subject": f"Ticket {i}", "customer_id": cid, "address": "desk@bench.example",
                "created_at": created, "updated_at": created, "last_customer_at": created,
                "reopened": 0, "tags": [], "next_due_at": created + timedelta(minutes=15)})
            for name, target in (("first_response", timedelta(hours=4)),
                                 ("resolution", timedelta(days=3))):
                clocks.append({"ticket_id": next_id, "clock": name, "cycle": 0,
                               "started_at": created, "running_since": created, "elapsed": 0.0,
                               "deadline_at": created + target, "breached": False})
            if i < due:
                due_ids.append(next_id)
            next_id += 1
        with engine.begin() as conn:
            conn.execute(insert(T_TICKET), tickets)
            conn.execute(insert(T_SLA_CLOCK), clocks)
    return due_ids


def rearm(engine: Engine, due_ids: list[int], now: datetime) -> None:
    """Undo a tick's work so the next round fires the same steps again."""
    with engine.begin() as conn:
        conn.execute(delete(T_ESCALATION))
        conn.execute(delete(T_THREAD_KEY).where(T_THREAD_KEY.c.ticket_id.in_(due_ids)))
        conn.execute(delete(T_OUTBOX))
        conn.execute(delete(T_EVENT))
        conn.execute(update(T_TICKET).where(T_TICKET.c.id.in_(due_ids))
                     .values(next_due_at=now - timedelta(minutes=1), priority="normal"))


def measure_ticks(directory: Path, url: str, n: int, due: int, rounds: int) -> dict[str, Any]:
    fresh_database(url)
    settings = make_settings(directory, url, "15m")
    engine = db.make_engine(url)
    now = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
    t0 = time.perf_counter()
    due_ids = populate(engine, n, due, now)
    insert_s = time.perf_counter() - t0
    sched = EscalationScheduler(engine, lambda: settings, FakeClock(now), batch=100)
    ticks, probes = [], []
    try:
        for _ in range(rounds):
            rearm(engine, due_ids, now)
            t = time.perf_counter()
            fired = sched.tick()
            ticks.append(time.perf_counter() - t)
            assert fired == due, (fired, due)
            t = time.perf_counter()
            for _ in range(100):
                sched.next_due()
            probes.append((time.perf_counter() - t) / 100)
            with engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(T_ESCALATION)).scalar() == due
    finally:
        sched.close()
        engine.dispose()
    return {"open_tickets": n, "due": due, "insert_s": round(insert_s, 2),
            "tick_ms_median": round(statistics.median(ticks) * 1000, 2),
            "tick_ms_min": round(min(ticks) * 1000, 2),
            "per_step_ms": round(statistics.median(ticks) * 1000 / due, 3),
            "next_due_us": round(statistics.median(probes) * 1e6, 1)}


# ---------------------------------------------------------------------------- 2. lateness


def _mail(i: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Customer {i} <c{i}@example.org>"
    msg["To"] = "desk@bench.example"
    msg["Subject"] = f"Load {i}"
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg.set_content("Our printer is on fire.\n" * 20)
    return msg.as_bytes()


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(T_INBOUND)
                                .where(T_INBOUND.c.status == "new")).scalar() or 0)


def measure_lateness(directory: Path, url: str, seconds: float,
                     rate: float | None = None, workers: int = 2,
                     after: str = "2s") -> dict[str, Any]:
    fresh_database(url)
    settings = make_settings(directory, url, after)
    engine = db.make_engine(url)
    acceptor_engine = intake_engine(url)
    # The pipeline runs as `router serve` runs it: its own process, all hooks, niced.
    pool = [PipelineProcess(directory / "router.toml", nice=settings.pipeline.nice,
                            log_level="warning", log_json=True, part=(i, workers))
            for i in range(workers)]
    for worker in pool:
        worker.start()
        worker.update(settings)
    stop_load = threading.Event()
    accepted = [0]

    def load() -> None:
        i = 0
        began = time.monotonic()
        while not stop_load.is_set():
            if rate and i >= rate * (time.monotonic() - began):
                time.sleep(0.001)
                continue
            accept_sync(acceptor_engine, Envelope("smtp", f"c{i}@example.org",
                                                  ["desk@bench.example"], _mail(i)))
            for worker in pool:
                worker.notify()
            i += 1
            accepted[0] = i

    async def main() -> None:
        sched = EscalationScheduler(engine, lambda: settings, system_clock)
        stop = asyncio.Event()
        task = asyncio.create_task(sched.run(stop))
        loader = threading.Thread(target=load)
        loader.start()
        await asyncio.sleep(seconds)
        stop_load.set()
        await asyncio.to_thread(loader.join)
        deadline = time.monotonic() + 300
        while await asyncio.to_thread(_pending, engine) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # The last tickets' steps.
        await asyncio.sleep(settings.team[0].escalation[0].offset(
            settings.team[0].sla).total_seconds() + 1.5)
        stop.set()
        await task
        sched.close()

    # As `router serve` does: intake's commits otherwise wait on 5 ms GIL handoffs.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        asyncio.run(main())
    finally:
        sys.setswitchinterval(previous)
    for worker in pool:
        worker.stop()
    with engine.connect() as conn:
        rows = conn.execute(
            select(T_ESCALATION.c.fired_at, T_ESCALATION.c.due_at, T_INBOUND.c.processed_at)
            .join(T_INBOUND, T_INBOUND.c.ticket_id == T_ESCALATION.c.ticket_id)
            .where(T_ESCALATION.c.step != "breach")).all()
        late = [(r.fired_at - r.due_at).total_seconds() for r in rows]
        # The scheduler cannot fire a step before the pipeline has given the ticket its
        # due time: this is its own share of the lateness.
        own = [(r.fired_at - max(r.due_at, r.processed_at)).total_seconds() for r in rows]
        lag = [(r.processed_at - r.received_at).total_seconds() for r in conn.execute(
            select(T_INBOUND.c.received_at, T_INBOUND.c.processed_at))]
        tickets = conn.execute(select(func.count()).select_from(T_TICKET)).scalar() or 0
    engine.dispose()
    acceptor_engine.dispose()
    late.sort()
    own.sort()
    lag.sort()

    def pct(xs: list[float], q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else float("nan")

    return {"load_seconds": seconds, "accepted": accepted[0],
            "accepted_per_s": round(accepted[0] / seconds, 1), "tickets": tickets,
            "steps_fired": len(late), "late_p50_s": pct(late, 0.5),
            "late_p99_s": pct(late, 0.99), "late_max_s": round(max(late), 3) if late else None,
            "within_1s": sum(1 for x in late if x <= 1.0),
            "own_p50_s": pct(own, 0.5), "own_p99_s": pct(own, 0.99),
            "own_max_s": round(max(own), 3) if own else None,
            "own_within_1s": sum(1 for x in own if x <= 1.0),
            "pipeline_lag_p50_s": pct(lag, 0.5), "pipeline_lag_p99_s": pct(lag, 0.99)}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tickets", type=int, default=100_000)
    p.add_argument("--baseline", type=int, default=1_000)
    p.add_argument("--due", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--load-seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=None,
                   help="cap intake at this many mails/s (default: as fast as it commits)")
    p.add_argument("--skip-ticks", action="store_true", help="only the lateness part")
    p.add_argument("--after", default="2s", help="the ladder step's delay, e.g. 2s, 10s")
    p.add_argument("--workers", type=int, default=2,
                   help="pipeline worker processes in the lateness part (as router.toml's)")
    p.add_argument("--pg", help="PostgreSQL URL of a scratch database (it is emptied)")
    p.add_argument("--dir", help="where to put the SQLite files (default: a temp dir)")
    p.add_argument("--small", action="store_true", help="tiny numbers, to check it runs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.small:
        args.tickets, args.baseline, args.due, args.rounds = 2_000, 200, 20, 2
        args.load_seconds = 2.0
    log.setup("warning", json=True)
    base = Path(args.dir or tempfile.mkdtemp(prefix="router-bench-"))

    def url(name: str) -> str:
        return args.pg or f"sqlite:///{base / name / 'router.db'}"

    report: dict[str, Any] = {"database": "postgresql" if args.pg else "sqlite"}
    out: Callable[[str], None] = (lambda s: None) if args.json else print
    out(f"tick cost, {args.due} due tickets, median of {args.rounds} rounds "
        f"({report['database']}):")
    rows = []
    for n in () if args.skip_ticks else (args.baseline, args.tickets):
        r = measure_ticks(base / f"ticks{n}", url(f"ticks{n}"), n, args.due, args.rounds)
        rows.append(r)
        out(f"  {n:>7} open tickets: tick {r['tick_ms_median']:8.2f} ms "
            f"({r['per_step_ms']:.3f} ms/step), next_due {r['next_due_us']:6.1f} us "
            f"[inserted in {r['insert_s']} s]")
    if rows:
        ratio = rows[1]["tick_ms_median"] / rows[0]["tick_ms_median"]
        out(f"  tick ratio {args.tickets}/{args.baseline} open tickets: {ratio:.2f}")
        report["ticks"] = rows
        report["tick_ratio"] = round(ratio, 2)
    lat = measure_lateness(base / "load", url("load"), args.load_seconds, args.rate,
                           args.workers, args.after)
    report["lateness"] = lat
    out(f"lateness under load ({lat['accepted_per_s']} mails/s accepted for "
        f"{lat['load_seconds']} s, each a new ticket with a step {args.after} after arrival):")
    out(f"  {lat['steps_fired']} steps fired, {lat['within_1s']} within 1 s of due; lateness "
        f"p50 {lat['late_p50_s']} s, p99 {lat['late_p99_s']} s, max {lat['late_max_s']} s")
    out(f"  pipeline lag p50 {lat['pipeline_lag_p50_s']} s, p99 {lat['pipeline_lag_p99_s']} s")
    out(f"  scheduler's own lateness (fired - max(due, routed)): p50 {lat['own_p50_s']} s, "
        f"p99 {lat['own_p99_s']} s, max {lat['own_max_s']} s, {lat['own_within_1s']} within 1 s")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
