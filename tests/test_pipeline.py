"""The pipeline from stored message to ticket: routing with reasons, dedupe across deliveries
and channels, parking, customers, attachments, every message of two mail corpora, crashes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sysconfig
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select, update

from router import pipeline as pipeline_module
from router import settings as config
from router.bounce import is_dsn
from router.db import make_engine
from router.intake.accept import Envelope, accept_sync
from router.mail import dedupe_key, parse
from router.models import (
    T_INBOUND_RAW,
    Article,
    Attachment,
    Customer,
    Decision,
    Event,
    Inbound,
    InboundStatus,
    SlaClock,
    Ticket,
    TicketStatus,
)
from router.pipeline import Handled, Pipeline
from tests.daemon import (
    MakeRouter,
    Store,
    inbound_rows,
    inproc_routers,
    make_mail,
    open_store,
    run_cli,
    send_smtp,
    wait_until,
)

CASES = Path(__file__).parent / "mail_cases"
CORPUS = Path(sysconfig.get_path("stdlib")) / "test" / "test_email" / "data"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "etc") as s:
        yield s


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[MakeRouter]:
    async with inproc_routers(tmp_path) as make:
        yield make


def all_of(store: Store, model: Any) -> list[Any]:
    with store.session() as s:
        return list(s.exec(select(model).order_by(model.id)).all())


def cli_json(store: Store, *args: str) -> Any:
    res = run_cli(*args, "-c", str(store.config_path), "--json")
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


# ---------------------------------------------------------------------------- routing


def test_message_becomes_ticket_with_explaining_decision(store: Store) -> None:
    store.accept(make_mail(to="oops@acme.test", subject="site is down",
                           frm="Dana <dana@example.org>"), ["oops@acme.test"],
                 mail_from="dana@example.org")
    assert store.drain() == 1
    [t] = all_of(store, Ticket)
    assert (t.team, t.address, t.tag, t.status) == ("ops", "oops@acme.test", None, "new")
    assert t.subject == "site is down"
    [d] = all_of(store, Decision)
    assert (d.ticket_id, d.kind, d.team, d.address) == (t.id, "route", "ops", "oops@acme.test")
    [hit, summary] = d.hits  # every rule's hit or miss, then the decision's summary
    assert summary["rule"] == "decision" and summary["team"] == "ops"
    assert hit["rule"] == "address" and hit["matched"] is True and hit["via"] == "To"
    assert "oops@acme.test" in hit["reason"] and "team ops" in hit["reason"]
    assert d.reason == hit["reason"]
    [inb] = all_of(store, Inbound)
    assert (inb.status, inb.ticket_id, inb.error) == (InboundStatus.DONE, t.id, None)
    assert [e.kind for e in all_of(store, Event)] == ["created"]
    [a] = all_of(store, Article)
    assert (a.ticket_id, a.inbound_id, a.kind, a.sender) == (t.id, inb.id, "in",
                                                             "dana@example.org")
    assert "Please help." in a.body_text


@pytest.mark.parametrize("order", [["billing@acme.test", "support@acme.test"],
                                   ["support@acme.test", "billing@acme.test"]],
                         ids=["billing-first", "support-first"])
@pytest.mark.parametrize("drain_between", [False, True], ids=["together", "drained-between"])
async def test_two_role_addresses_one_ticket_first_to_wins(
        inproc: MakeRouter, order: list[str], drain_between: bool) -> None:
    r = await inproc()
    raw = make_mail(to="billing@acme.test", cc="support@acme.test", subject="invoice wrong",
                    message_id="<two-roles@example.org>")
    for i, rcpt in enumerate(order):
        await asyncio.to_thread(send_smtp, r.port, raw, [rcpt])
        if drain_between and i == 0:
            await r.drain()
    await r.drain()
    [row] = await asyncio.to_thread(inbound_rows, r.url)
    assert row.deliveries == 2 and row.status == InboundStatus.DONE
    # The bytes are stored once, by the first delivery.
    assert await asyncio.to_thread(_raw_rows, r.url) == [(row.id, raw)]
    store_like = await asyncio.to_thread(_tickets_and_decisions, r.url)
    tickets, decisions = store_like
    assert [(t.team, t.address) for t in tickets] == [("billing", "billing@acme.test")]
    [d] = decisions
    assert "first address wins" in d.reason and "support" in d.reason


def _raw_rows(url: str) -> list[tuple[int, bytes]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [(i, bytes(b)) for i, b in conn.execute(
                select(T_INBOUND_RAW.c.inbound_id, T_INBOUND_RAW.c.raw)).all()]
    finally:
        engine.dispose()


def _tickets_and_decisions(url: str) -> tuple[list[Ticket], list[Decision]]:
    from router import db
    from router.db import session_scope

    engine = db.make_engine(url)
    try:
        with session_scope(engine) as s:
            return (list(s.exec(select(Ticket)).all()), list(s.exec(select(Decision)).all()))
    finally:
        engine.dispose()


async def test_same_mail_by_pipe_and_smtp_is_one_ticket(inproc: MakeRouter) -> None:
    r = await inproc()
    raw = make_mail(to="support@acme.test", subject="twice by two ways")
    await asyncio.to_thread(send_smtp, r.port, raw, ["support@acme.test"])
    # The MTA's pipe hands over LF line ends and its own trace header.
    piped = b"Received: from mx by pipe; Mon, 1 Jan 2024 00:00:00 +0000\n" + raw.replace(
        b"\r\n", b"\n")
    res = await asyncio.to_thread(run_cli, "ingest", "-c", str(r.config_path),
                                  "--recipient", "support@acme.test", stdin=piped)
    assert res.returncode == 0, res.stderr.decode()
    [row] = await asyncio.to_thread(inbound_rows, r.url)
    assert row.deliveries == 2
    await r.drain()
    tickets, _ = await asyncio.to_thread(_tickets_and_decisions, r.url)
    assert len(tickets) == 1


# ---------------------------------------------------------------------------- parking


def explode_on_boom(conn: Any, handled: Handled) -> None:
    if "BOOM" in handled.parsed.subject:
        raise RuntimeError("hook exploded on purpose")


def test_failing_handler_is_parked_and_retried(store: Store) -> None:
    for subject in ("first fine", "BOOM here", "last fine"):
        store.accept(make_mail(subject=subject, frm=f"{subject.split()[0]}@example.org"))
    failing = store.new_pipeline(hooks=[explode_on_boom])
    try:
        assert failing.drain() == 3  # one batch; the failure did not block the others
    finally:
        failing.close()
    assert sorted(t.subject for t in all_of(store, Ticket)) == ["first fine", "last fine"]
    boom = next(x for x in all_of(store, Inbound) if b"BOOM" in x.raw)
    assert boom.status == InboundStatus.PARKED and boom.attempts == 1 and boom.ticket_id is None
    assert boom.error is not None
    assert "Traceback" in boom.error and "RuntimeError: hook exploded on purpose" in boom.error
    # Its savepoint rolled back: no customer, article or decision of the failed message.
    assert "BOOM@example.org" not in [c.email for c in all_of(store, Customer)]
    assert len(all_of(store, Article)) == 2

    parked = cli_json(store, "tickets", "parked")["parked"]
    assert [p["inbound_id"] for p in parked] == [boom.id]
    assert parked[0]["attempts"] == 1 and "hook exploded on purpose" in parked[0]["error"]
    assert parked[0]["rcpt_to"] == ["support@acme.test"]

    res = run_cli("tickets", "retry", "-c", str(store.config_path))
    assert res.returncode == 0 and b"1 message(s) back in line" in res.stdout
    assert next(x for x in all_of(store, Inbound) if x.id == boom.id).status == "new"

    assert store.drain() == 1  # the default pipeline has no failing hook
    assert sorted(t.subject for t in all_of(store, Ticket)) == ["BOOM here", "first fine",
                                                                 "last fine"]
    assert cli_json(store, "tickets", "parked") == {"parked": []}
    assert {x.status for x in all_of(store, Inbound)} == {InboundStatus.DONE}


def test_mail_whose_bytes_are_missing_is_parked_not_left_waiting(store: Store) -> None:
    """`inbound_raw` is written in the same transaction as `inbound`, so this takes a hand
    in the database; should it happen, the message is parked with the cause."""
    store.accept(make_mail(subject="gone"))
    store.accept(make_mail(subject="kept", frm="kim@example.org"))
    [gone, kept] = all_of(store, Inbound)
    with store.engine.begin() as conn:
        conn.execute(T_INBOUND_RAW.delete().where(T_INBOUND_RAW.c.inbound_id == gone.id))
    assert store.drain() == 2
    [gone, kept] = all_of(store, Inbound)
    assert gone.status == InboundStatus.PARKED and kept.status == InboundStatus.DONE
    assert f"inbound {gone.id}: its bytes are missing from inbound_raw" in (gone.error or "")
    assert [t.subject for t in all_of(store, Ticket)] == ["kept"]


def test_recipient_no_longer_owned_is_parked_with_clear_error(store: Store) -> None:
    store.accept(make_mail(to="sales@acme.test", subject="quote please"), ["sales@acme.test"])
    text = store.config_path.read_text().replace(
        '["support@acme.test", "sales@acme.test"]', '["support@acme.test"]')
    changed = store.config_path.with_name("changed.toml")
    changed.write_text(text)
    store.settings = config.load(changed)
    assert store.drain() == 1
    [row] = all_of(store, Inbound)
    assert row.status == InboundStatus.PARKED and all_of(store, Ticket) == []
    last = (row.error or "").strip().splitlines()[-1]
    assert "Unroutable" in last and "no recipient is a role address of any team" in last
    assert "sales@acme.test" in last


# ---------------------------------------------------------------------------- corpora


def corpus_files() -> list[Path]:
    files = sorted(CORPUS.glob("msg_*.txt"))
    if not files:
        pytest.fail(f"the CPython email test corpus is missing: nothing at {CORPUS}/msg_*.txt")
    cases = sorted(CASES.glob("*.eml"))
    assert cases, f"no .eml files in {CASES}"
    return files + cases


def test_every_message_of_the_corpora_becomes_a_ticket(store: Store) -> None:
    files = corpus_files()
    keys = set()
    for f in files:
        raw = f.read_bytes()
        keys.add(dedupe_key(raw))
        store.accept(raw, ["support@acme.test"], mail_from="mta@example.org")
    store.drain()
    rows = all_of(store, Inbound)
    assert len(rows) == len(keys)
    # Delivery reports (the corpus has some) are recorded as bounce events, never tickets
    # (issue 4); everything else becomes a ticket.
    dsn = {r.id for r in rows if is_dsn(parse(r.raw))}
    assert dsn, "the corpus holds delivery reports; they must be recognised"
    bounces = [e for e in all_of(store, Event) if e.kind == "bounce"]
    assert len(bounces) == len(dsn)
    assert all(r.status == InboundStatus.DONE for r in rows if r.id in dsn)
    rows = [r for r in rows if r.id not in dsn]
    stuck = [(r.id, r.status, (r.error or "").strip().splitlines()[-1:]) for r in rows
             if r.status != InboundStatus.DONE or r.ticket_id is None]
    assert stuck == []
    articles = {a.inbound_id: a for a in all_of(store, Article)}
    assert set(articles) == {r.id for r in rows}
    malformed = 0
    for r in rows:
        parsed = parse(r.raw)
        assert articles[r.id].malformed == parsed.malformed, r.id
        malformed += parsed.malformed
    assert malformed >= 3  # truncated, bad base64, no headers at least
    by_name = {f.name: dedupe_key(f.read_bytes()) for f in files}
    flagged = {r.dedupe_key for r in rows if articles[r.id].malformed}
    assert {by_name["truncated.eml"], by_name["no_headers.eml"]} <= flagged


def test_attachments_are_stored_with_hash_and_size(store: Store) -> None:
    raw = (CASES / "attachments.eml").read_bytes()
    store.accept(raw, ["billing@acme.test"])
    store.drain()
    expected = parse(raw).attachments
    stored = all_of(store, Attachment)
    assert len(stored) == len(expected) >= 1
    for att, exp in zip(stored, expected, strict=True):
        assert att.sha256 == hashlib.sha256(att.data).hexdigest() == exp.sha256
        assert att.size == len(att.data) == exp.size
        assert (att.filename, att.content_type) == (exp.filename, exp.content_type)
    [t] = cli_json(store, "tickets", "list")["tickets"]
    shown = cli_json(store, "tickets", "show", str(t["id"]))
    assert [(a["sha256"], a["size"]) for a in shown["messages"][0]["attachments"]] == [
        (e.sha256, e.size) for e in expected]


def test_hooks_share_the_rows_routing_wrote_and_their_changes_are_stored(
        store: Store) -> None:
    """The ticket, article and customer routing wrote are handed to the hooks without a
    query; a hook that queries the session itself gets the same objects, and what hooks
    change is written."""
    seen: list[Any] = []

    def querying(conn: Any, handled: Handled) -> None:
        ticket = handled.session().exec(
            select(Ticket).where(Ticket.id == handled.ticket_id)).one()
        ticket.priority = "high"
        seen.append(ticket)

    def getting(conn: Any, handled: Handled) -> None:
        ticket = handled.get(Ticket, handled.ticket_id)
        customer = handled.get(Customer, handled.customer.id)
        assert ticket is seen[-1] and customer is not None
        ticket.tags = ["checked"]
        customer.name = "Alice Changed"

    store.accept(make_mail(subject="rows in hand"))
    pipeline = store.new_pipeline(hooks=[querying, getting])
    try:
        assert pipeline.drain() == 1
    finally:
        pipeline.close()
    [ticket] = all_of(store, Ticket)
    assert (ticket.priority, ticket.tags) == ("high", ["checked"])
    assert [c.name for c in all_of(store, Customer)] == ["Alice Changed"]


def test_hooks_that_only_change_the_rows_routing_wrote_need_no_session(store: Store) -> None:
    """The hooks of a new ticket and of a reply (assignment, the ack's promise, the SLA
    clocks) read and set the ticket, article and customer routing wrote, and a reply's
    clocks: no ORM session is opened for them, and what they set is written all the
    same."""
    from router.hooks import default_hooks

    sessions: list[Any] = []

    def setting(conn: Any, handled: Handled) -> None:
        ticket = handled.get(Ticket, handled.ticket_id)
        customer = handled.get(Customer, handled.customer.id)
        assert ticket is not None and customer is not None
        ticket.tags = ["checked"]
        customer.name = "Alice Changed"

    def spy(conn: Any, handled: Handled) -> None:
        sessions.append(handled._session)

    store.accept(make_mail(subject="rows in hand", message_id="<held.1@example.org>"))
    pipeline = store.new_pipeline(hooks=[*default_hooks(), setting, spy])
    try:
        assert pipeline.drain() == 1
        [ticket] = all_of(store, Ticket)
        # The ack's promise and the SLA hook's next due time, set on the detached ticket.
        assert ticket.promised_at is not None and ticket.next_due_at is not None
        assert ticket.tags == ["checked"]
        assert [c.name for c in all_of(store, Customer)] == ["Alice Changed"]
        with store.session() as s:
            s.exec(update(SlaClock).where(col(SlaClock.ticket_id) == ticket.id).values(
                running_since=None, deadline_at=None))  # paused, as while pending
            s.commit()
        store.accept(make_mail(subject="Re: rows in hand", message_id="<held.2@example.org>",
                               in_reply_to="<held.1@example.org>"))
        assert pipeline.drain() == 1
    finally:
        pipeline.close()
    assert sessions == [None, None]
    # The reply resumed the clocks: set on rows of no session, written all the same.
    with store.session() as s:
        clocks = {c.clock: c for c in s.exec(select(SlaClock)).all()}
    assert {name: c.running_since is not None and c.deadline_at is not None
            for name, c in clocks.items()} == {"first_response": True, "resolution": True}


def test_a_batch_is_bounded_in_bytes_as_well_as_in_messages(store: Store) -> None:
    small = [make_mail(subject=f"small {i}", message_id=f"<small.{i}@example.org>")
             for i in range(3)]
    big = make_mail(subject="big", message_id="<big@example.org>", body="x" * 200_000)
    for raw in (small[0], big, small[1], small[2]):
        store.accept(raw, ["billing@acme.test"])
    store.pipeline.batch_bytes = 100_000
    # A message larger than the bound still goes through, alone; the others by count.
    assert store.pipeline.process_batch() == 1
    assert store.pipeline.process_batch() == 1
    assert store.pipeline.process_batch() == 2
    assert store.pipeline.process_batch() == 0
    assert len(all_of(store, Ticket)) == 4


# ---------------------------------------------------------------------------- customers


def test_one_customer_across_role_addresses(store: Store) -> None:
    store.accept(make_mail(frm="Alice <Alice@Example.org>", to="oops@acme.test",
                           subject="checkout broken"), ["oops@acme.test"])
    store.accept(make_mail(frm="alice@example.org", to="billing@acme.test",
                           subject="charged twice"), ["billing@acme.test"])
    store.accept(make_mail(frm="bob@example.org", to="billing@acme.test",
                           subject="bob's invoice"), ["billing@acme.test"])
    store.drain()
    tickets = all_of(store, Ticket)
    assert len(tickets) == 3
    customers = all_of(store, Customer)
    assert sorted(c.email for c in customers) == ["alice@example.org", "bob@example.org"]
    alice = next(c for c in customers if c.email == "alice@example.org")
    assert alice.name == "Alice"
    listed = cli_json(store, "tickets", "list", "--customer", "ALICE@example.org")
    assert listed["count"] == 2
    assert sorted((t["team"], t["subject"]) for t in listed["tickets"]) == [
        ("billing", "charged twice"), ("ops", "checkout broken")]
    assert {t["customer"]["id"] for t in listed["tickets"]} == {alice.id}


# ---------------------------------------------------------------------------- crashes


class Crash(BaseException):
    """Not an Exception: nothing in the pipeline catches it, like a process dying."""


def test_crash_mid_batch_rolls_back_and_resumes_exactly_once(store: Store) -> None:
    for i in range(5):
        store.accept(make_mail(subject=f"crash {i}", frm=f"u{i}@example.org"))
    seen: list[str] = []

    def crash_on_third(conn: Any, handled: Handled) -> None:
        seen.append(handled.parsed.subject)
        if handled.parsed.subject == "crash 2":
            raise Crash

    crashing = store.new_pipeline(hooks=[crash_on_third])
    crashing.lock_slice = 60.0  # the whole batch in one write transaction
    try:
        with pytest.raises(Crash):
            crashing.process_batch()
    finally:
        crashing.close()
    assert seen == ["crash 0", "crash 1", "crash 2"]
    assert {x.status for x in all_of(store, Inbound)} == {InboundStatus.NEW}
    assert all_of(store, Ticket) == [] and all_of(store, Customer) == []

    assert store.drain() == 5
    assert store.drain() == 0
    tickets = all_of(store, Ticket)
    assert sorted(t.subject for t in tickets) == [f"crash {i}" for i in range(5)]
    rows = all_of(store, Inbound)
    assert {x.status for x in rows} == {InboundStatus.DONE}
    assert sorted(x.ticket_id for x in rows) == sorted(t.id for t in tickets)
    assert len(all_of(store, Article)) == 5 and len(all_of(store, Decision)) == 5


def test_crash_after_committed_slices_resumes_the_rest_exactly_once(store: Store) -> None:
    """The write lock is held one time slice at most: slices committed before a crash stay
    done, the slice that crashed rolls back, and the next run finishes the rest once."""
    for i in range(5):
        store.accept(make_mail(subject=f"slice {i}", frm=f"s{i}@example.org"))

    def crash_on_third(conn: Any, handled: Handled) -> None:
        if handled.parsed.subject == "slice 2":
            raise Crash

    crashing = store.new_pipeline(hooks=[crash_on_third])
    crashing.lock_slice = 0.0  # every message in a transaction of its own
    crashing.lock_pause = 0.0
    try:
        with pytest.raises(Crash):
            crashing.process_batch()
    finally:
        crashing.close()
    status = {x.id: x.status for x in all_of(store, Inbound)}
    assert sorted(status.values()) == [InboundStatus.DONE] * 2 + [InboundStatus.NEW] * 3
    assert store.drain() == 3
    tickets = all_of(store, Ticket)
    assert sorted(t.subject for t in tickets) == [f"slice {i}" for i in range(5)]
    assert len(all_of(store, Article)) == 5


# ---------------------------------------------------------------------------- workers


def test_workers_split_the_messages_and_a_reply_waits_for_its_parent(store: Store) -> None:
    """Two workers take alternate messages; a reply that reaches its worker before the
    message it answers was routed (by the other worker) waits instead of opening a ticket."""
    store.accept(make_mail(subject="odd one", message_id="<parent@example.org>"))  # id 1
    store.accept(make_mail(subject="Re: odd one", in_reply_to="<parent@example.org>",
                           references="<parent@example.org>"))                      # id 2
    store.accept(make_mail(subject="unrelated", frm="bob@example.org"))               # id 3
    even = Pipeline(store.url, store.current_settings, part=(0, 2))
    odd = Pipeline(store.url, store.current_settings, part=(1, 2))
    try:
        assert even.process_batch() == 0 and even.deferred == 1  # the reply: parent pending
        assert {x.id: x.status for x in all_of(store, Inbound)}[2] == InboundStatus.NEW
        assert odd.process_batch() == 2  # ids 1 and 3, never id 2
        assert even.process_batch() == 1
    finally:
        even.close()
        odd.close()
    rows = {x.id: x for x in all_of(store, Inbound)}
    assert {x.status for x in rows.values()} == {InboundStatus.DONE}
    assert rows[1].ticket_id == rows[2].ticket_id != rows[3].ticket_id
    assert len(all_of(store, Ticket)) == 2


def test_a_waiting_reply_is_parsed_once_and_looked_at_again_soon(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply waiting for the other worker's original keeps its parse for the next try, and
    its worker looks again soon by itself: nobody rings it when the other worker routes the
    original, and sleeping a whole idle poll then would hold up every message behind it."""
    parsed: list[bytes] = []
    real_parse = pipeline_module.parse

    def counting(raw: bytes) -> Any:
        parsed.append(raw)
        return real_parse(raw)

    monkeypatch.setattr(pipeline_module, "parse", counting)
    store.accept(make_mail(subject="odd one", message_id="<parent@example.org>"))  # id 1
    store.accept(make_mail(subject="Re: odd one", in_reply_to="<parent@example.org>",
                           references="<parent@example.org>"))                      # id 2
    even = Pipeline(store.url, store.current_settings, part=(0, 2))
    odd = Pipeline(store.url, store.current_settings, part=(1, 2))
    stop = threading.Event()
    worker = threading.Thread(target=even.run, args=(stop,), kwargs={"idle_poll": 120})
    try:
        worker.start()
        wait_until(lambda: even.deferred >= 1, 30, what="the reply to wait")
        assert odd.process_batch() == 1
        wait_until(lambda: even.processed == 1, 30, what="the reply to be routed")
    finally:
        stop.set()
        even.wake.set()
        worker.join(30)
        even.close()
        odd.close()
    reply = [raw for raw in parsed if b"Re: odd one" in raw]
    assert len(reply) == 1, f"the waiting reply was parsed {len(reply)} times"
    rows = {x.id: x for x in all_of(store, Inbound)}
    assert rows[1].ticket_id == rows[2].ticket_id


def test_messages_are_routed_in_order_of_arrival(store: Store) -> None:
    """Mail moved from intake's spools can be stored after a reply that arrived later. Taken
    by storage order, a batch of such replies would wait for originals behind it forever;
    taken by arrival, the original comes first and the reply threads onto it."""
    now = datetime.now(UTC)
    reply = make_mail(subject="Re: lost parcel", in_reply_to="<parcel@example.org>",
                      references="<parcel@example.org>")
    accept_sync(store.engine, Envelope("smtp", "", ["support@acme.test"], reply,
                                       received_at=now))                             # id 1
    accept_sync(store.engine, Envelope(
        "smtp", "", ["support@acme.test"],
        make_mail(subject="lost parcel", message_id="<parcel@example.org>"),
        received_at=now - timedelta(seconds=1)))                                   # id 2
    pipeline = Pipeline(store.url, store.current_settings, batch_size=1)
    try:
        assert pipeline.drain(timeout=10) == 2
    finally:
        pipeline.close()
    rows = {x.id: x for x in all_of(store, Inbound)}
    assert rows[1].ticket_id == rows[2].ticket_id
    assert pipeline.deferred == 0
    assert len(all_of(store, Ticket)) == 1


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_pipeline_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """Savepoints, FOR UPDATE SKIP LOCKED and the rollback on a crash, on PostgreSQL."""
    with open_store(tmp_path / "etc", db_url=pg_url) as store:
        store.accept(make_mail(subject="pg first", message_id="<pg1@example.org>"))
        store.accept(make_mail(subject="BOOM on pg", frm="boom@example.org"))
        store.accept(make_mail(subject="Re: pg first", in_reply_to="<pg1@example.org>",
                               frm="Alice@Example.org"))
        failing = store.new_pipeline(hooks=[explode_on_boom])
        try:
            assert failing.drain() == 3
        finally:
            failing.close()
        [t] = all_of(store, Ticket)
        assert t.subject == "pg first" and len(all_of(store, Article)) == 2
        assert [c.email for c in all_of(store, Customer)] == ["alice@example.org"]
        assert [x.status for x in all_of(store, Inbound)] == ["done", "parked", "done"]

        store.accept(make_mail(subject="crash on pg"))
        crashing = store.new_pipeline(hooks=[_crash_always])
        try:
            with pytest.raises(Crash):
                crashing.process_batch()
        finally:
            crashing.close()
        assert [x.status for x in all_of(store, Inbound)][-1] == "new"
        assert store.drain() == 1
        assert len(all_of(store, Ticket)) == 2


def _crash_always(conn: Any, handled: Handled) -> None:
    raise Crash


def test_a_reopened_ticket_counts_in_the_backlog_of_the_promises_after_it(
        tmp_path: Path) -> None:
    """One write transaction counts each team's backlog once (`turnaround.Backlogs`); a reply
    that puts an older ticket back into its team's backlog makes the promises after it, in
    the same transaction, count it."""
    from router import turnaround
    from router.ack import ack_hook
    from router.calendar import BusinessCalendar

    with open_store(tmp_path / "etc", hooks=[ack_hook]) as store:
        store.accept(make_mail(subject="first", message_id="<x.1@example.org>"))
        assert store.drain() == 1
        now = datetime.now(UTC)
        with store.session() as s:
            x = s.exec(select(Ticket)).one()
            x.status = TicketStatus.PENDING
            s.add(x)
            assert x.customer_id is not None
            # 22 tickets answered in half an hour, two of them within the last eight
            # hours: a rate of 0.25 answers an hour, so each ticket waiting adds four hours.
            for i in range(22):
                created = now - timedelta(hours=3 + (i if i < 2 else 10 + i))
                s.add(Ticket(team="support", customer_id=x.customer_id, status="solved",
                             address="support@acme.test", created_at=created,
                             updated_at=created, last_customer_at=created,
                             first_response_at=created + timedelta(minutes=30)))
            s.commit()
        store.pipeline.lock_slice = 600.0  # all three in one transaction
        store.accept(make_mail(subject="A", frm="Ann <ann@example.org>",
                               message_id="<a.1@example.org>"))
        store.accept(make_mail(subject="Re: first", message_id="<x.2@example.org>",
                               in_reply_to="<x.1@example.org>"))
        store.accept(make_mail(subject="B", frm="Bob <bob@example.org>",
                               message_id="<b.1@example.org>"))
        assert store.drain() == 3
        with store.session() as s:
            b = s.exec(select(Ticket).where(Ticket.subject == "B")).one()
            assert s.get(Ticket, x.id).status == TicketStatus.OPEN  # type: ignore[union-attr]
            team = store.settings.team_by_name("support")
            assert team is not None and b.promised_at is not None
            calendar = BusinessCalendar.cached_for_team(team)
            samples, rate = turnaround.answered(s.connection(), "support", b.created_at, calendar,
                                                timedelta(days=28))

            def promised(backlog: int) -> datetime:
                assert team is not None
                return turnaround.estimate(
                    b.created_at, calendar, samples, backlog, rate, team.sla.first_response,
                    store.settings.ack.quantile, store.settings.ack.min_history,
                    sla_business_hours=team.sla.business_hours).deadline

            # Ahead of B: A, and the reopened ticket; without it the promise is hours sooner.
            assert b.promised_at == promised(2) != promised(1)
