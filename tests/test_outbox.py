"""The outbox against a real SMTP server on loopback and real databases."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, select

from router import settings as config
from router.clock import FakeClock
from router.db import make_engine, session_scope
from router.models import Outbox, OutboxStatus, ThreadKey
from router.outbox import OutboxWorker, backoff, classify_error, deliver, enqueue
from tests.conftest import write_config
from tests.smtp_sink import SmtpSink, smtp_sink  # noqa: F401

T0 = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)


def make_db(url: str) -> Engine:
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    return engine


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    e = make_db(sqlite_url)
    yield e
    e.dispose()


def load_settings(tmp_path: Path, db_url: str, relay_port: int, extra: str = ""
                  ) -> config.Settings:
    return config.load(write_config(tmp_path / "etc", db_url=db_url, relay_port=relay_port,
                                    extra=extra), env={})


def mail(n: int = 0, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", "Support <support@acme.test>")
    msg["To"] = headers.pop("To", f"customer{n}@example.com")
    msg["Subject"] = headers.pop("Subject", f"mail {n}")
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(f"body {n}\n.\nline after a lone dot\n")
    return msg


def queue(engine: Engine, now: datetime, count: int = 1) -> list[Outbox]:
    with session_scope(engine) as s:
        return [enqueue(s, kind="notify", msg=mail(i), ticket_id=None, customer_id=None,
                        now=now, hostname="router.test") for i in range(count)]


def rows(engine: Engine) -> list[Outbox]:
    with Session(engine) as s:
        return list(s.exec(select(Outbox).order_by(Outbox.id)).all())  # type: ignore[arg-type]


def worker(engine: Engine, settings: config.Settings, clock: FakeClock, **kw: object
           ) -> OutboxWorker:
    kw.setdefault("rng", random.Random(7))
    return OutboxWorker(engine, lambda: settings, clock, **kw)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, smtp_sink: SmtpSink) -> config.Settings:  # noqa: F811
    return load_settings(tmp_path, sqlite_url, smtp_sink.port)


# ---------------------------------------------------------------------------- enqueue


def test_enqueue_sets_ids_envelope_and_thread_key(engine: Engine) -> None:
    from router.models import Customer, Ticket

    with session_scope(engine) as s:
        c = Customer(email="ann@example.com", created_at=T0, last_seen_at=T0)
        s.add(c)
        s.flush()
        t = Ticket(team="support", customer_id=c.id, address="support@acme.test", created_at=T0,
                   updated_at=T0, last_customer_at=T0)
        s.add(t)
        s.flush()
        msg = mail(Cc="Boss <boss@example.com>", Bcc="audit@acme.test")
        row = enqueue(s, kind="reply", msg=msg, ticket_id=t.id, customer_id=c.id, now=T0,
                      hostname="router.test")
        assert row.id is not None
        ticket_id = t.id
    assert row.message_id.startswith("<") and row.message_id.endswith("@router.test>")
    assert row.mail_from == "support@acme.test"
    assert row.rcpt_to == ["customer0@example.com", "boss@example.com", "audit@acme.test"]
    assert b"Bcc" not in row.raw and b"audit@acme.test" not in row.raw
    assert row.raw.count(b"\r\n") > 3, "stored with CRLF, as on the wire"
    assert b"Date: " in row.raw
    with Session(engine) as s:
        key = s.get(ThreadKey, row.message_id)
        assert key is not None and key.ticket_id == ticket_id


def test_enqueue_keeps_an_existing_message_id(engine: Engine) -> None:
    with session_scope(engine) as s:
        row = enqueue(s, kind="notify", msg=mail(Message_ID="<given@x.test>"), ticket_id=None,
                      customer_id=None, now=T0, hostname="router.test")
    assert row.message_id == "<given@x.test>"
    with Session(engine) as s:
        assert s.exec(select(ThreadKey)).first() is None  # no ticket, no thread key


def test_enqueue_refuses_mail_without_recipients(engine: Engine) -> None:
    msg = EmailMessage()
    msg["From"] = "support@acme.test"
    msg.set_content("x")
    with pytest.raises(ValueError, match="recipient"), session_scope(engine) as s:
        enqueue(s, kind="notify", msg=msg, ticket_id=None, customer_id=None, now=T0,
                hostname="router.test")


# ---------------------------------------------------------------------------- outcomes


async def test_send_success(engine: Engine, settings: config.Settings,
                            smtp_sink: SmtpSink) -> None:  # noqa: F811
    clock = FakeClock(T0)
    [queued] = queue(engine, T0)
    w = worker(engine, settings, clock)
    assert await w.send_due() == 1
    [got] = await smtp_sink.wait_for(1)
    assert got.message_id == queued.message_id
    assert got.mail_from == "support@acme.test"
    assert got.rcpt_tos == ["customer0@example.com"]
    # The bytes on the wire are the stored bytes (dot-stuffing undone by the server).
    assert got.raw.replace(b"\r\n", b"\n") == queued.raw.replace(b"\r\n", b"\n")
    [row] = rows(engine)
    assert row.status == OutboxStatus.SENT and row.sent_at == T0 and row.attempts == 1
    assert row.claimed_until is None
    assert await w.send_due() == 0, "a sent row is not sent again"


async def test_partly_refused_recipients_are_noted(
        engine: Engine, settings: config.Settings, smtp_sink: SmtpSink) -> None:  # noqa: F811
    with session_scope(engine) as s:
        enqueue(s, kind="notify", msg=mail(Cc="gone@example.com"), ticket_id=None,
                customer_id=None, now=T0, hostname="router.test")
    smtp_sink.refuse_rcpt = {"gone@example.com"}
    await worker(engine, settings, FakeClock(T0)).send_due()
    [got] = await smtp_sink.wait_for(1)
    assert got.rcpt_tos == ["customer0@example.com"]
    [row] = rows(engine)
    assert row.status == OutboxStatus.SENT
    assert row.last_error and "gone@example.com (550" in row.last_error


async def test_tempfail_retries_with_backoff_then_succeeds(
        engine: Engine, settings: config.Settings, smtp_sink: SmtpSink) -> None:  # noqa: F811
    clock = FakeClock(T0)
    [queued] = queue(engine, T0)
    w = worker(engine, settings, clock, backoff_base=timedelta(seconds=30))
    smtp_sink.set_mode("tempfail")
    assert await w.send_due() == 1
    [row] = rows(engine)
    assert row.status == OutboxStatus.QUEUED and row.attempts == 1
    assert "451" in (row.last_error or "")
    delay = row.next_attempt_at - T0
    assert timedelta(seconds=15) <= delay <= timedelta(seconds=30)
    smtp_sink.set_mode("accept")
    assert await w.send_due() == 0, "not due before the backoff has passed"
    clock.advance(delay)
    assert await w.send_due() == 1
    [got] = await smtp_sink.wait_for(1)
    assert got.message_id == queued.message_id
    [row] = rows(engine)
    assert row.status == OutboxStatus.SENT and row.attempts == 2 and row.last_error is None


async def test_reject_parks_at_once(engine: Engine, settings: config.Settings,
                                    smtp_sink: SmtpSink) -> None:  # noqa: F811
    clock = FakeClock(T0)
    queue(engine, T0)
    smtp_sink.set_mode("reject")
    await worker(engine, settings, clock).send_due()
    [row] = rows(engine)
    assert row.status == OutboxStatus.PARKED and row.attempts == 1
    assert "550" in (row.last_error or "")
    clock.advance(timedelta(days=1))
    assert await worker(engine, settings, clock).send_due() == 0


async def test_relay_down_then_up(engine: Engine, settings: config.Settings,
                                  smtp_sink: SmtpSink) -> None:  # noqa: F811
    clock = FakeClock(T0)
    queue(engine, T0)
    w = worker(engine, settings, clock)
    smtp_sink.stop()
    await w.send_due()
    [row] = rows(engine)
    assert row.status == OutboxStatus.QUEUED and row.attempts == 1
    assert row.last_error and ("Connect" in row.last_error or "refused" in row.last_error)
    smtp_sink.start()
    clock.advance(timedelta(minutes=1))
    assert await w.send_due() == 1
    await smtp_sink.wait_for(1)
    assert rows(engine)[0].status == OutboxStatus.SENT


async def test_max_attempts_parks(engine: Engine, settings: config.Settings,
                                  smtp_sink: SmtpSink) -> None:  # noqa: F811
    assert settings.relay.max_attempts == 3
    clock = FakeClock(T0)
    queue(engine, T0)
    smtp_sink.set_mode("tempfail")
    w = worker(engine, settings, clock, backoff_base=timedelta(seconds=1))
    for _ in range(3):
        assert await w.send_due() == 1
        clock.advance(timedelta(minutes=5))
    [row] = rows(engine)
    assert row.status == OutboxStatus.PARKED and row.attempts == 3
    assert "gave up after 3 attempts" in (row.last_error or "")
    assert await w.send_due() == 0
    assert smtp_sink.refusals == 3 and not smtp_sink.messages


async def test_crash_after_send_resends_same_message_id_after_lease(
        engine: Engine, settings: config.Settings, smtp_sink: SmtpSink) -> None:  # noqa: F811
    clock = FakeClock(T0)
    [queued] = queue(engine, T0)
    lease = timedelta(minutes=2)
    crashed = worker(engine, settings, clock, lease=lease)
    # The first daemon claims and sends, then dies before recording the outcome.
    [claim] = crashed._claim(lease)
    result = await deliver(settings.relay, settings.base_dir, mail_from=claim.mail_from,
                           rcpt_to=claim.rcpt_to, raw=claim.raw)
    assert result.outcome == "sent"
    restarted = worker(engine, settings, clock, lease=lease)
    assert await restarted.send_due() == 0, "the lease still protects the row"
    clock.advance(lease + timedelta(seconds=1))
    assert await restarted.send_due() == 1
    first, second = await smtp_sink.wait_for(2)
    assert first.message_id == second.message_id == queued.message_id
    assert first.raw == second.raw
    assert rows(engine)[0].status == OutboxStatus.SENT


async def test_lost_lease_failure_does_not_override_new_owner(
        engine: Engine, settings: config.Settings, smtp_sink: SmtpSink) -> None:  # noqa: F811
    clock = FakeClock(T0)
    queue(engine, T0)
    lease = timedelta(minutes=2)
    slow = worker(engine, settings, clock, lease=lease)
    [claim] = slow._claim(lease)
    clock.advance(lease + timedelta(seconds=1))
    other = worker(engine, settings, clock, lease=lease)
    [claim2] = other._claim(lease)
    from router.outbox import Result

    assert not slow._record(claim, Result("retry", "451 late"), 1, timedelta(seconds=30))
    assert other._record(claim2, Result("sent", "250"), 1, None)
    [row] = rows(engine)
    assert row.status == OutboxStatus.SENT and row.last_error is None


async def test_wake_sends_without_waiting_for_the_poll(
        engine: Engine, settings: config.Settings, smtp_sink: SmtpSink) -> None:  # noqa: F811
    from router.clock import system_clock

    w = OutboxWorker(engine, lambda: settings, system_clock, poll=60)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await asyncio.sleep(0.2)  # the first pass found nothing; now it sleeps for 60 s
        queue(engine, system_clock())
        await asyncio.sleep(0.3)
        assert smtp_sink.messages == []
        # The pipeline commits in a thread and wakes from there.
        await asyncio.to_thread(w.wake)
        await smtp_sink.wait_for(1, timeout=3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_run_sends_everything_due_and_stops(
        engine: Engine, settings: config.Settings, smtp_sink: SmtpSink) -> None:  # noqa: F811
    from router.clock import system_clock

    queue(engine, system_clock(), 25)
    w = OutboxWorker(engine, lambda: settings, system_clock, poll=0.05, batch=10)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    got = await smtp_sink.wait_for(25, timeout=10)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len({g.message_id for g in got}) == 25
    assert {r.status for r in rows(engine)} == {OutboxStatus.SENT}


async def test_credentials_from_password_file(tmp_path: Path, sqlite_url: str,
                                              smtp_sink: SmtpSink) -> None:  # noqa: F811
    # The sink offers no AUTH: a configured login must fail and be retried, not crash, and
    # the password is read from the file (an unreadable file is a retryable config error).
    settings = load_settings(tmp_path, sqlite_url, smtp_sink.port,
                             extra="")
    relay = settings.relay.model_copy(update={"username": "router",
                                              "password_file": "missing-secret"})
    result = await deliver(relay, str(tmp_path), mail_from="a@acme.test",
                           rcpt_to=["b@example.com"], raw=b"Subject: x\r\n\r\nx\r\n")
    assert result.outcome == "retry" and "password_file" in result.detail
    (tmp_path / "secret").write_text("s3cret\n")
    relay = relay.model_copy(update={"password_file": "secret"})
    result = await deliver(relay, str(tmp_path), mail_from="a@acme.test",
                           rcpt_to=["b@example.com"], raw=b"Subject: x\r\n\r\nx\r\n")
    assert result.outcome == "retry"  # no AUTH on the server: a config problem, retried
    assert not smtp_sink.messages


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    base, cap = timedelta(seconds=30), timedelta(hours=1)
    for attempt, full in ((1, 30), (2, 60), (3, 120), (8, 3600), (30, 3600)):
        for _ in range(20):
            d = backoff(attempt, base=base, cap=cap, rng=rng).total_seconds()
            assert full / 2 <= d <= full


def test_classify_error() -> None:
    import aiosmtplib

    assert classify_error(aiosmtplib.SMTPDataError(451, "later")).outcome == "retry"
    assert classify_error(aiosmtplib.SMTPDataError(554, "no")).outcome == "park"
    assert classify_error(ConnectionRefusedError()).outcome == "retry"
    assert classify_error(aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(550, "unknown", "x@y")])).outcome == "park"
    assert classify_error(aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(550, "unknown", "x@y"),
         aiosmtplib.SMTPRecipientRefused(452, "full", "z@y")])).outcome == "retry"
    assert classify_error(aiosmtplib.SMTPAuthenticationError(535, "bad")).outcome == "retry"


# ---------------------------------------------------------------------------- concurrency


def _claims_are_disjoint(url: str, tmp_path: Path) -> None:
    engines = [make_db(url) for _ in range(4)]
    try:
        queue(engines[0], T0, 60)
        settings = load_settings(tmp_path, url, 1)
        clock = FakeClock(T0)
        workers = [worker(e, settings, clock, batch=7) for e in engines]
        lease = timedelta(minutes=5)
        with ThreadPoolExecutor(8) as ex:
            claims = list(ex.map(lambda w: w._claim(lease), workers * 6))
        ids = [c.id for batch in claims for c in batch]
        assert len(ids) == len(set(ids)), "a row was claimed twice"
        assert len(ids) == 60
    finally:
        for e in engines:
            e.dispose()


def test_sqlite_claims_are_disjoint(sqlite_url: str, tmp_path: Path) -> None:
    _claims_are_disjoint(sqlite_url, tmp_path)


@pytest.mark.postgres
def test_postgres_claims_are_disjoint(pg_url: str, tmp_path: Path) -> None:
    _claims_are_disjoint(pg_url, tmp_path)


@pytest.mark.postgres
async def test_postgres_two_daemons_send_each_row_once(
        pg_url: str, tmp_path: Path, smtp_sink: SmtpSink) -> None:  # noqa: F811
    from router.clock import system_clock

    first, second = make_db(pg_url), make_db(pg_url)
    try:
        settings = load_settings(tmp_path, pg_url, smtp_sink.port)
        queue(first, system_clock(), 40)
        stop = asyncio.Event()
        workers = [OutboxWorker(e, lambda: settings, system_clock, poll=0.01, batch=3)
                   for e in (first, second)]
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        got = await smtp_sink.wait_for(40, timeout=20)
        await asyncio.sleep(0.3)  # would a duplicate still arrive?
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        got = smtp_sink.messages
        assert len(got) == 40
        assert len({g.message_id for g in got}) == 40
        assert {r.status for r in rows(first)} == {OutboxStatus.SENT}
    finally:
        first.dispose()
        second.dispose()


def test_nothing_due_is_found_without_the_write_lock(engine: Engine, tmp_path: Path) -> None:
    """With nothing due the claim only reads: it neither waits for the write lock (held here
    as the pipeline's transactions hold it) nor fails when it cannot have it."""
    queue(engine, T0 + timedelta(hours=1))  # not due yet
    settings = load_settings(tmp_path, str(engine.url), 1)
    impatient = make_engine(str(engine.url), busy_ms=50)
    writer = make_engine(str(engine.url), immediate=True)
    try:
        w = worker(impatient, settings, FakeClock(T0))
        with writer.begin():  # BEGIN IMMEDIATE: the write lock, held
            assert w._claim(timedelta(minutes=5)) == []
        # Due: the claim writes, as before.
        w.clock = FakeClock(T0 + timedelta(hours=2))
        assert len(w._claim(timedelta(minutes=5))) == 1
    finally:
        impatient.dispose()
        writer.dispose()
