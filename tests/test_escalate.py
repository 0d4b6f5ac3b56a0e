"""The escalation ladder: config checks, steps firing in simulated time (business hours too),
replies cancelling and re-arming steps, exactly-once across restarts and across two
schedulers on one database, webhooks against a local HTTP server, the mail itself through a
real SMTP server, and the tickets CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from router import settings as config
from router.escalate import EscalationScheduler, template_problems
from router.models import Escalation, Event, Outbox, Ticket, TicketStatus
from router.outbox import OutboxWorker
from tests.conftest import REPO, free_port, write_config
from tests.daemon import run_cli
from tests.smtp_sink import SmtpSink, smtp_sink  # noqa: F401
from tests.test_sla import (
    FRIDAY_1800_BERLIN,
    MONDAY,
    MONDAY_0900_BERLIN,
    TEAMS,
    Desk,
    make_desk,
    open_desk,
)


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    yield from make_desk(tmp_path / "etc", MONDAY)


def fired(desk: Desk, ticket_id: int | None = None) -> list[Escalation]:
    with Session(desk.store.engine) as s:
        q = select(Escalation).order_by(Escalation.id)  # type: ignore[arg-type]
        if ticket_id is not None:
            q = q.where(Escalation.ticket_id == ticket_id)
        return list(s.exec(q).all())


def mails(desk: Desk) -> list[Any]:
    with Session(desk.store.engine) as s:
        rows = s.exec(select(Outbox).where(Outbox.kind == "escalation")
                      .order_by(Outbox.id)).all()  # type: ignore[arg-type]
    return [BytesParser(policy=policy.default).parsebytes(r.raw) for r in rows]


# ---------------------------------------------------------------------------- router check


def problems_for(tmp_path: Path, ladder: str, sla: str = "") -> list[config.Problem]:
    extra = f"""
[[team]]
name = "esc"
addresses = ["esc@acme.test"]
lead = "lee@acme.test"
members = [{{ name = "Lee", email = "lee@acme.test" }}]
{sla}
escalation = [
{ladder}
]
"""
    path = write_config(tmp_path / "etc", extra=extra)
    _settings, problems = config.check(path, env={})
    return problems


def test_valid_ladders_have_no_problems(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", extra=TEAMS)
    _s, problems = config.check(path, env={})
    assert [str(p) for p in problems] == []


@pytest.mark.parametrize(("ladder", "path", "row", "needle"), [
    ('  { after = "15m", notify = ["leed"] },', "team[3].escalation[0].notify[0]", 0,
     'unknown notify target "leed" (did you mean "lead"?)'),
    ('  { after = "15m", notify = ["lead"] },\n  { after = "2h", reassign = "tier3" },',
     "team[3].escalation[1].reassign", 1, 'reassign to unknown team "tier3"'),
    ('  { after = "15 minutes", notify = ["lead"] },', "team[3].escalation[0].after", 0,
     "is not a duration"),
    ('  { after = "1h", notify = ["lead"] },\n  { after = "15m", notify = ["team"] },',
     "team[3].escalation[1]", 1, "steps out of order: this step fires before step 1"),
    ('  { after = "1h", notify = ["lead"] },\n  { after = "1h", notify = ["team"] },',
     "team[3].escalation[1]", 1, "at the same moment as step 1"),
    ('  { before_breach = "5h", notify = ["lead"] },', "team[3].escalation[0].before_breach",
     0, "is not shorter than the first_response target (4h)"),
    ('  { notify = ["lead"] },', "team[3].escalation[0]", 0, "exactly one of after"),
    ('  { after = "10m" },', "team[3].escalation[0]", 0, "a step must do something"),
    ('  { after = "10m", notify = ["manager"] },', "team[3].escalation[0].notify[0]", 0,
     'has no manager'),
    ('  { after = "10m", clock = "reply", notify = ["lead"] },',
     "team[3].escalation[0].clock", 0, "first_response"),
    ('  { after = "10m", notify = ["lead"], webhook = "ftp://x" },',
     "team[3].escalation[0].webhook", 0, "http:// or https://"),
    ('  { after = "10m", notify = ["lead"], set_priority = "asap" },',
     "team[3].escalation[0].set_priority", 0, "urgent"),
])
def test_ladder_mistakes_are_reported_with_path_and_line(tmp_path: Path, ladder: str, path: str,
                                                         row: int, needle: str) -> None:
    problems = problems_for(tmp_path, ladder)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1, [str(p) for p in problems]
    [p] = errors
    assert p.path == path, str(p)
    assert needle in p.message, str(p)
    text = (tmp_path / "etc" / "router.toml").read_text().splitlines()
    first_step = text.index("escalation = [") + 2        # 1-based line of the ladder's row 0
    assert p.line == first_step + row, str(p)


def test_router_check_cli_names_the_line(tmp_path: Path) -> None:
    problems_for(tmp_path, '  { after = "15m", notify = ["leed"] },')
    res = run_cli("check", "-c", str(tmp_path / "etc" / "router.toml"))
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "router.toml:" in err and "team[3].escalation[0].notify[0]" in err
    assert 'did you mean "lead"' in err


def test_escalation_template_is_clean(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path / "etc", extra=TEAMS), env={})
    assert template_problems(settings) == []


# ---------------------------------------------------------------------------- the ladder


def test_ladder_fires_each_step_at_its_time(desk: Desk) -> None:
    sched = desk.scheduler()
    start = desk.clock()
    tid = desk.mail(body="Our printer is on fire.\nPlease hurry.\n")
    assert sched.tick() == 0
    desk.later(minutes=14, seconds=59)
    assert sched.tick() == 0
    desk.later(seconds=1)
    assert sched.tick() == 1
    [e] = fired(desk, tid)
    assert (e.clock, e.step, e.status, e.due_at) == ("first_response", "desk:after=15m",
                                                    "fired", start + timedelta(minutes=15))
    assert e.actions["notified"] == ["lena@acme.test"]
    [m] = mails(desk)
    assert m["To"].addresses[0].addr_spec == "lena@acme.test"
    assert m["Auto-Submitted"] == "auto-generated"
    assert "[#" in m["Subject"] and "waiting 15m" in m["Subject"]
    body = m.get_content()
    assert "> Our printer is on fire." in body and "Please hurry." in body
    assert "Waiting:   15m since" in body and "Ann Customer <ann@example.org>" in body
    assert sched.tick() == 0                          # once
    assert desk.ticket(tid).next_due_at == start + timedelta(hours=1)

    desk.later(minutes=45)
    assert sched.tick() == 1
    t = desk.ticket(tid)
    assert t.priority == "urgent"
    last = mails(desk)[-1]
    assert [a.addr_spec for a in last["To"].addresses] == ["lena@acme.test", "max@acme.test"]
    assert "priority raised from normal to urgent" in last.get_content()

    desk.later(hours=1)
    assert sched.tick() == 1
    t = desk.ticket(tid)
    assert t.team == "tier2" and t.assignee is None
    steps = [(e.team, e.step, e.status) for e in fired(desk, tid)]
    # tier2's 1h step was already past when the ticket arrived there: recorded, not sent.
    assert steps == [("desk", "desk:after=15m", "fired"), ("desk", "desk:after=1h", "fired"),
                     ("desk", "desk:after=2h", "fired"), ("tier2", "tier2:after=1h", "skipped")]
    assert len(mails(desk)) == 2
    # tier2's warning 30m before its 4h target is next.
    assert t.next_due_at == start + timedelta(hours=3, minutes=30)
    desk.later(hours=1, minutes=30)
    assert sched.tick() == 1
    assert mails(desk)[-1]["To"].addresses[0].addr_spec == "tara@acme.test"
    desk.later(minutes=30)
    assert sched.tick() == 1                          # the breach, recorded
    assert fired(desk, tid)[-1].step == "breach"
    with Session(desk.store.engine) as s:
        kinds = [e.kind for e in s.exec(select(Event).where(Event.ticket_id == tid)
                                        .order_by(Event.id)).all()]  # type: ignore[arg-type]
    assert kinds.count("escalation") == 4 and "sla_breached" in kinds and "reassigned" in kinds
    sched.close()


def test_before_breach_warns_the_assignee_or_else_the_lead(tmp_path: Path) -> None:
    with open_desk(tmp_path / "etc", MONDAY_0900_BERLIN) as d:
        sched = d.scheduler()
        tid = d.mail(to="office@acme.test")
        d.later(minutes=15)
        assert sched.tick() == 1
        d.later(hours=1, minutes=35)                 # 2h target - 10m
        assert sched.tick() == 1
        e = fired(d, tid)[-1]
        assert e.step == "office:before_breach=10m"
        assert e.actions["notified"] == ["olaf@acme.test"]   # nobody assigned: the lead
        sched.close()


def test_business_hours_step_for_friday_evening_fires_monday(tmp_path: Path) -> None:
    with open_desk(tmp_path / "etc", FRIDAY_1800_BERLIN) as d:
        sched = d.scheduler()
        tid = d.mail(to="office@acme.test")
        d.later(minutes=15)                          # Friday 18:15: closed
        assert sched.tick() == 0
        d.clock.now = MONDAY_0900_BERLIN + timedelta(minutes=14)
        assert sched.tick() == 0
        d.clock.now = MONDAY_0900_BERLIN + timedelta(minutes=15)
        assert sched.tick() == 1
        assert fired(d, tid)[0].due_at == MONDAY_0900_BERLIN + timedelta(minutes=15)
        sched.close()


def test_agent_reply_cancels_the_pending_steps_at_once(desk: Desk) -> None:
    sched = desk.scheduler()
    tid = desk.mail()
    desk.later(minutes=10)
    desk.agent_reply(tid)
    # Only the resolution clock runs now; its breach is the next wake-up.
    assert desk.ticket(tid).next_due_at == MONDAY + timedelta(days=1)
    desk.later(hours=5)
    assert sched.tick() == 0
    assert fired(desk, tid) == []
    sched.close()


def test_customer_reply_arms_the_next_response_steps(desk: Desk) -> None:
    sched = desk.scheduler()
    tid = desk.mail()
    desk.agent_reply(tid)
    desk.later(hours=1)
    desk.mail(ticket=tid)
    desk.later(minutes=30)
    assert sched.tick() == 1
    e = fired(desk, tid)[-1]
    assert (e.clock, e.cycle, e.step) == ("next_response", 1, "desk:after=30m")
    desk.agent_reply(tid)
    desk.later(hours=1)
    desk.mail(ticket=tid)                                  # a new cycle arms the step again
    desk.later(minutes=30)
    assert sched.tick() == 1
    assert [(e.clock, e.cycle) for e in fired(desk, tid)] == [("next_response", 1),
                                                             ("next_response", 2)]
    sched.close()


def test_pending_ticket_does_not_escalate_until_the_customer_writes(desk: Desk) -> None:
    sched = desk.scheduler()
    tid = desk.mail()
    desk.later(minutes=10)
    desk.set_status(tid, TicketStatus.PENDING)
    desk.later(hours=3)
    assert sched.tick() == 0
    desk.set_status(tid, TicketStatus.OPEN)
    desk.later(minutes=4, seconds=59)
    assert sched.tick() == 0
    desk.later(seconds=1)
    assert sched.tick() == 1
    sched.close()


def test_missed_steps_fire_late_at_the_next_start(desk: Desk) -> None:
    first = desk.scheduler()
    tid = desk.mail()
    desk.later(minutes=15)
    assert first.tick() == 1
    first.close()
    # The daemon is down for 50 minutes; the 1h step is due meanwhile.
    desk.later(minutes=50)
    restarted = desk.scheduler()
    assert restarted.tick() == 1
    e = fired(desk, tid)[-1]
    assert e.step == "desk:after=1h"
    assert e.fired_at - e.due_at == timedelta(minutes=5)
    assert "5m late" in mails(desk)[-1].get_content()
    assert restarted.tick() == 0
    restarted.close()


def test_a_step_another_instance_fired_leaves_no_second_mail(
        desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Firing writes its mail before the fired-step row; when that row turns out to exist
    (another instance fired the step unseen), the ticket's savepoint takes the mail back."""
    tid = desk.mail()
    desk.later(minutes=15)
    first = desk.scheduler()
    assert first.tick() == 1
    first.close()
    assert len(mails(desk)) == 1
    # A scheduler that does not see the fired step (as if row locks had been bypassed) and
    # finds the ticket due again.
    from router import escalate

    real = escalate._Batch.__init__

    def blind(self: Any, session: Any, tickets: Any) -> None:
        real(self, session, tickets)
        for keys in self.fired.values():
            keys.clear()

    monkeypatch.setattr(escalate._Batch, "__init__", blind)
    with Session(desk.store.engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        t.next_due_at = desk.clock()
        s.add(t)
        s.commit()
    second = desk.scheduler()
    assert second.tick() == 0
    second.close()
    assert len(mails(desk)) == 1
    assert [e.step for e in fired(desk, tid)] == ["desk:after=15m"]


def test_a_long_outage_fires_every_missed_step_once(desk: Desk) -> None:
    tid = desk.mail()
    desk.later(hours=5)
    sched = desk.scheduler()
    # 15m, 1h, 2h (reassign) of desk; tier2's 1h and 3h30m are past on arrival: skipped;
    # the breach is real and recorded.
    assert sched.tick() == 4
    assert [(e.step, e.status) for e in fired(desk, tid)] == [
        ("desk:after=15m", "fired"), ("desk:after=1h", "fired"), ("desk:after=2h", "fired"),
        ("tier2:after=1h", "skipped"), ("tier2:before_breach=30m", "skipped"),
        ("breach", "fired")]
    assert sched.tick() == 0
    sched.close()


def test_changed_ladder_recomputes_due_times(desk: Desk) -> None:
    sched = desk.scheduler()
    assert sched.check_config() is True           # first start: records the ladders
    assert sched.check_config() is False
    tid = desk.mail()
    assert desk.ticket(tid).next_due_at == MONDAY + timedelta(minutes=15)
    text = desk.store.config_path.read_text().replace(
        '{ after = "15m", clock = "first_response", notify = ["lead"] }',
        '{ after = "5m", clock = "first_response", notify = ["lead"] }')
    desk.store.config_path.write_text(text)
    desk.store.settings = config.load(desk.store.config_path, env={})
    assert sched.check_config() is True
    assert desk.ticket(tid).next_due_at == MONDAY + timedelta(minutes=5)
    # Another instance, started later, sees the recorded digest and skips the full pass.
    other = desk.scheduler()
    assert other.check_config() is False
    sched.close()
    other.close()


# ---------------------------------------------------------------------------- the loop


async def test_run_goes_through_hours_of_sla_time_in_simulated_time(desk: Desk) -> None:
    async def fast_sleep(seconds: float) -> None:
        desk.clock.advance(timedelta(seconds=seconds))
        await asyncio.sleep(0)

    sched = desk.scheduler(sleep=fast_sleep, max_sleep=24 * 3600)
    tid = await asyncio.to_thread(desk.mail)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    deadline = asyncio.get_running_loop().time() + 10
    while len(fired(desk, tid)) < 6 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    stop.set()
    await task
    got = fired(desk, tid)
    assert len(got) >= 6
    # Each step fired exactly at its due time: the loop slept until then, no later.
    assert all(e.fired_at == e.due_at for e in got if e.status == "fired"), got
    sched.close()


async def test_wake_cuts_a_long_sleep_short(desk: Desk) -> None:
    sched = desk.scheduler(max_sleep=60.0)      # real sleep; the clock does not move
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    await asyncio.sleep(0.3)                    # now asleep: nothing is due
    tid = await asyncio.to_thread(desk.mail)
    with Session(desk.store.engine) as s:       # an agent makes it due now, then wakes it
        t = s.get(Ticket, tid)
        assert t is not None
        t.next_due_at = desk.clock() - timedelta(hours=2)
        s.add(t)
        s.commit()
    desk.later(minutes=20)
    sched.wake()
    for _ in range(100):
        if fired(desk, tid):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [e.step for e in fired(desk, tid)] == ["desk:after=15m"]
    sched.close()


def test_tick_with_nothing_due_leaves_the_write_lock_alone(desk: Desk) -> None:
    """While the pipeline holds the write lock (most of the time under load), a tick with
    nothing due returns at once instead of retrying for the lock; one with a step due
    waits for the lock and fires it."""
    tid = desk.mail()                                 # its first step is due in 15 minutes
    sched = desk.scheduler()
    database = desk.store.engine.url.database
    assert database is not None
    writer = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")                 # another writer, holding the lock
    try:
        assert sched.tick() == 0                      # raised "database is locked" before
        desk.later(minutes=20)
        release = threading.Timer(0.3, writer.execute, ("ROLLBACK",))
        release.start()
        assert sched.tick() == 1                      # due: waits for the lock, fires
        release.join()
    finally:
        writer.close()
        sched.close()
    assert [e.step for e in fired(desk, tid)] == ["desk:after=15m"]


# ---------------------------------------------------------------------------- exactly once


def _many_due(desk: Desk, n: int) -> list[int]:
    ids = [desk.mail(subject=f"Ticket {i}") for i in range(n)]
    desk.later(minutes=20)
    return ids


def _race(desk: Desk, schedulers: list[EscalationScheduler]) -> list[int]:
    barrier = threading.Barrier(len(schedulers))
    counts = [0] * len(schedulers)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                counts[i] += schedulers[i].tick()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(schedulers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return counts


def _assert_once(desk: Desk, ids: list[int], counts: list[int]) -> None:
    assert sum(counts) == len(ids)
    rows = fired(desk, None)
    assert sorted(e.ticket_id for e in rows) == sorted(ids)
    assert len(mails(desk)) == len(ids)


def test_two_schedulers_on_sqlite_fire_each_step_once(desk: Desk) -> None:
    ids = _many_due(desk, 40)
    schedulers = [desk.scheduler(batch=7) for _ in range(2)]
    _assert_once(desk, ids, _race(desk, schedulers))
    for s in schedulers:
        s.close()


@pytest.mark.postgres
def test_two_schedulers_on_postgres_fire_each_step_once(tmp_path: Path, pg_url: str) -> None:
    with open_desk(tmp_path / "etc", MONDAY, db_url=pg_url) as d:
        ids = _many_due(d, 120)
        schedulers = [d.scheduler(batch=10) for _ in range(2)]
        counts = _race(d, schedulers)
        _assert_once(d, ids, counts)
        # SKIP LOCKED shared the work rather than one instance doing it all.
        assert all(c > 0 for c in counts), counts
        for s in schedulers:
            s.close()


@pytest.mark.postgres
def test_two_scheduler_processes_on_postgres(tmp_path: Path, pg_url: str) -> None:
    with open_desk(tmp_path / "etc", MONDAY, db_url=pg_url) as d:
        ids = _many_due(d, 60)
        script = (
            "import sys\n"
            "from datetime import datetime\n"
            "from router import settings as config\n"
            "from router.clock import FakeClock\n"
            "from router.db import make_engine\n"
            "from router.escalate import EscalationScheduler\n"
            "s = config.load(sys.argv[1], env={})\n"
            "e = make_engine(sys.argv[2])\n"
            "sch = EscalationScheduler(e, lambda: s, FakeClock(datetime.fromisoformat("
            "sys.argv[3])), batch=5)\n"
            "print(sum(sch.tick() for _ in range(5)))\n")
        env = {"PYTHONPATH": str(REPO)}
        procs = [subprocess.Popen([sys.executable, "-c", script, str(d.store.config_path),
                                   pg_url, d.clock().isoformat()], stdout=subprocess.PIPE,
                                  env={**_env(), **env}) for _ in range(2)]
        counts = [int(p.communicate(timeout=120)[0]) for p in procs]
        _assert_once(d, ids, counts)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


# ---------------------------------------------------------------------------- webhooks


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    status = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"json": json.loads(body),
                                    "type": self.headers["Content-Type"]})
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[_Hook]]]:
    handler = type("Hook", (_Hook,), {"received": [], "status": 204})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


HOOK_TEAM = """
[[team]]
name = "hooked"
addresses = ["hooked@acme.test"]
lead = "hana@acme.test"
members = [{{ name = "Hana", email = "hana@acme.test" }}]
sla = {{ first_response = "1h", business_hours = false }}
escalation = [ {{ after = "15m", webhook = "{url}" }} ]
"""


def test_webhook_is_posted_once_and_retried_when_it_fails(
        tmp_path: Path, webhook: tuple[str, type[_Hook]]) -> None:
    url, handler = webhook
    with open_desk(tmp_path / "etc", MONDAY, teams=TEAMS + HOOK_TEAM.format(url=url)) as d:
        sched = d.scheduler()
        handler.status = 503
        tid = d.mail(to="hooked@acme.test")
        d.later(minutes=15)
        assert sched.tick() == 1
        assert len(handler.received) == 1
        [e] = fired(d, tid)
        assert (e.webhook_status, e.webhook_attempts, e.webhook_error) == ("pending", 1,
                                                                           "HTTP 503")
        handler.status = 204
        assert sched.tick() == 0
        assert len(handler.received) == 1          # not before the backoff
        d.later(seconds=31)
        sched.tick()
        assert len(handler.received) == 2
        [e] = fired(d, tid)
        assert (e.webhook_status, e.webhook_attempts, e.webhook_error) == ("sent", 2, None)
        body = handler.received[-1]["json"]
        assert handler.received[-1]["type"] == "application/json"
        assert (body["event"], body["ticket_id"], body["step"], body["clock"]) == (
            "escalation", tid, "hooked:after=15m", "first_response")
        assert body["waited_s"] == 15 * 60           # as it was when the step fired
        d.later(hours=1)
        sched.tick()
        assert len(handler.received) == 2
        sched.close()


# ---------------------------------------------------------------------------- the mail, sent


async def test_notification_reaches_the_relay(tmp_path: Path, smtp_sink: SmtpSink) -> None:  # noqa: F811
    with open_desk(tmp_path / "etc", MONDAY) as d:
        base = d.store.settings
        settings = base.model_copy(update={"relay": base.relay.model_copy(
            update={"port": smtp_sink.port})})
        sched = d.scheduler()
        await asyncio.to_thread(d.mail)
        d.later(minutes=15)
        assert await asyncio.to_thread(sched.tick) == 1
        worker = OutboxWorker(d.store.engine, lambda: settings, d.clock)
        assert await worker.send_due() == 1
        [got] = await smtp_sink.wait_for(1)
        assert got.rcpt_tos == ["lena@acme.test"]
        assert got.message["Auto-Submitted"] == "auto-generated"
        assert "Printer on fire" in got.message["Subject"]
        sched.close()


# ---------------------------------------------------------------------------- the CLI


def test_tickets_cli_overdue_and_history(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with open_desk(tmp_path / "etc", now - timedelta(minutes=50)) as d:
        late = d.mail(subject="Nobody answered")
        fine = d.mail(subject="Answered", to="oops@acme.test")
        d.agent_reply(fine)
        d.clock.now = now
        sched = d.scheduler()
        assert sched.tick() == 1                    # desk's 15m step, 35m late
        sched.close()
        cfg = str(d.store.config_path)

        res = run_cli("tickets", "show", str(late), "--json", "-c", cfg)
        assert res.returncode == 0, res.stderr.decode()
        shown = json.loads(res.stdout)
        [esc] = shown["escalations"]
        assert (esc["step"], esc["status"], esc["notified"]) == ("desk:after=15m", "fired",
                                                                 ["lena@acme.test"])
        assert esc["late_s"] == pytest.approx(35 * 60, abs=1)
        clocks = {c["clock"]: c for c in shown["sla"]}
        assert clocks["first_response"]["state"] == "running"
        assert clocks["first_response"]["target_s"] == 4 * 3600

        text = run_cli("tickets", "show", str(late), "-c", cfg).stdout.decode()
        assert "escalations:" in text and "desk:after=15m fired (35m late)" in text
        assert "sla first_response: running" in text


def test_tickets_list_overdue(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with open_desk(tmp_path / "etc", now - timedelta(minutes=30)) as d:
        late = d.mail(to="oops@acme.test", subject="Site down")     # 15m target
        d.mail(to="desk@acme.test", subject="Not yet late")          # 4h target
        answered = d.mail(to="oops@acme.test", subject="Answered")
        d.agent_reply(answered)
        cfg = str(d.store.config_path)
        res = run_cli("tickets", "list", "--overdue", "--json", "-c", cfg)
        assert res.returncode == 0, res.stderr.decode()
        data = json.loads(res.stdout)
        assert [t["id"] for t in data["tickets"]] == [late]
        [o] = data["tickets"][0]["overdue"]
        assert o["clock"] == "first_response"
        assert o["overdue_s"] == pytest.approx(15 * 60, abs=30)
        text = run_cli("tickets", "list", "--overdue", "-c", cfg).stdout.decode()
        assert "Site down" in text and "overdue: first_response by 15m" in text
        assert "Not yet late" not in text


# ---------------------------------------------------------------------------- the bench


@pytest.mark.slow
def test_bench_runs_with_small_numbers(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "bench" / "escalation.py"), "--small",
                          "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, check=False, env={**_env(), "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert "tick" in res.stdout and "lateness" in res.stdout

