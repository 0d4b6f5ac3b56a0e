"""Threading: a reply lands on its ticket by subject token, In-Reply-To or References, also
when the id is one of our outbound mails; it reopens solved tickets and never opens a new one
when any key matches."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from router.models import (
    Article,
    Decision,
    Event,
    Inbound,
    InboundStatus,
    ThreadKey,
    Ticket,
)
from tests.daemon import Store, make_mail, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "etc") as s:
        yield s


def all_of(store: Store, model: Any) -> list[Any]:
    with store.session() as s:
        key = model.message_id if model is ThreadKey else model.id
        return list(s.exec(select(model).order_by(key)).all())


def open_one(store: Store, *, message_id: str = "<orig@example.org>",
             subject: str = "printer on fire") -> Ticket:
    store.accept(make_mail(subject=subject, message_id=message_id))
    store.drain()
    tickets = [t for t in all_of(store, Ticket) if t.subject == subject]
    assert len(tickets) == 1
    return tickets[0]


def thread_decision(store: Store) -> Decision:
    decisions = [d for d in all_of(store, Decision) if d.kind == "thread"]
    assert len(decisions) == 1
    return decisions[0]


def reply(store: Store, **kw: Any) -> None:
    store.accept(make_mail(**{"subject": "Re: printer on fire", **kw}))
    store.drain()


def test_subject_token_threads(store: Store) -> None:
    t = open_one(store)
    reply(store, subject=f"Re: [#{t.id}] printer on fire", message_id="<r1@example.org>")
    assert [x.id for x in all_of(store, Ticket)] == [t.id]
    d = thread_decision(store)
    assert d.ticket_id == t.id and d.hits[0]["key"] == "subject-token"
    assert f"[#{t.id}]" in d.reason
    assert [e.kind for e in all_of(store, Event)] == ["created", "customer_reply"]
    assert {x.ticket_id for x in all_of(store, Inbound)} == {t.id}


def test_in_reply_to_threads(store: Store) -> None:
    t = open_one(store)
    reply(store, in_reply_to="<orig@example.org>")
    assert [x.id for x in all_of(store, Ticket)] == [t.id]
    assert thread_decision(store).hits[0]["key"] == "in-reply-to"


def test_references_with_only_an_older_id_threads(store: Store) -> None:
    t = open_one(store)
    reply(store, references="<orig@example.org> <lost-in-between@example.org>")
    assert [x.id for x in all_of(store, Ticket)] == [t.id]
    d = thread_decision(store)
    assert (d.hits[0]["key"], d.hits[0]["value"]) == ("references", "<orig@example.org>")


def test_reply_in_the_same_batch_threads(store: Store) -> None:
    store.accept(make_mail(subject="same batch", message_id="<sb@example.org>"))
    store.accept(make_mail(subject="Re: same batch", in_reply_to="<sb@example.org>"))
    assert store.drain() == 2
    [t] = all_of(store, Ticket)
    assert t.subject == "same batch"


def test_reply_to_solved_ticket_reopens_it(store: Store) -> None:
    t = open_one(store)
    with store.session() as s:
        row = s.get(Ticket, t.id)
        assert row is not None
        row.status = "solved"
        row.solved_at = datetime.now(UTC)
        s.add(row)
        s.commit()
    reply(store, in_reply_to="<orig@example.org>")
    [after] = all_of(store, Ticket)
    assert (after.id, after.status, after.reopened, after.solved_at) == (t.id, "open", 1, None)
    events = all_of(store, Event)
    assert [e.kind for e in events] == ["created", "reopened"]
    assert events[-1].data["previous_status"] == "solved"


def test_token_of_missing_ticket_opens_a_new_ticket(store: Store) -> None:
    t = open_one(store)
    reply(store, subject="Re: [#4242] something else")
    tickets = all_of(store, Ticket)
    assert len(tickets) == 2 and tickets[1].id != t.id
    assert tickets[1].subject == "Re: [#4242] something else"
    assert [d.kind for d in all_of(store, Decision)] == ["route", "route"]


def test_in_reply_to_an_outbound_message_threads(store: Store) -> None:
    t = open_one(store)
    with store.session() as s:  # what the outbox records for every mail it sends
        s.add(ThreadKey(message_id="<ack-77@router.test>", ticket_id=t.id))
        s.commit()
    reply(store, subject="Re: We received your message", in_reply_to="<ack-77@router.test>")
    assert [x.id for x in all_of(store, Ticket)] == [t.id]
    d = thread_decision(store)
    assert (d.hits[0]["key"], d.hits[0]["value"]) == ("in-reply-to", "<ack-77@router.test>")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store on SQLite, then on PostgreSQL (its upsert of a thread key differs)."""
    db_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with open_store(tmp_path / "etc", db_url=db_url) as s:
        yield s


def _articles(store: Store, ticket_id: int) -> list[str | None]:
    with store.session() as s:
        return [a.message_id for a in s.exec(select(Article).where(
            Article.ticket_id == ticket_id).order_by(Article.id)).all()]


@pytest.mark.parametrize("one_batch", [False, True], ids=["apart", "one-batch"])
def test_an_original_arriving_after_its_reply_joins_the_replys_ticket(
        either_store: Store, one_batch: bool) -> None:
    """Alice writes to support with Bob in Cc; Bob replies to all at once, and his answer
    reaches us first (Alice's mail was held up on the way). Alice's mail, when it comes,
    is part of the conversation Bob's answer opened, not a ticket of its own."""
    store = either_store
    late = "<late@example.org>"
    store.accept(make_mail(subject="Re: printer on fire", frm="Bob <bob@example.org>",
                           message_id="<bob@example.org>", in_reply_to=late,
                           references=late))
    if not one_batch:
        store.drain()
    store.accept(make_mail(subject="printer on fire", message_id=late))
    store.drain()
    [t] = all_of(store, Ticket)
    assert t.subject == "Re: printer on fire"
    assert _articles(store, t.id) == ["<bob@example.org>", late]
    d = thread_decision(store)
    assert (d.hits[0]["key"], d.hits[0]["value"]) == ("message-id", late)
    assert d.hits[0]["reason"] == (f"a reply to this message ({late}) arrived before it and "
                                   f"opened ticket {t.id}")
    # Alice's mail is a message of the ticket now: a reply to it threads by it.
    reply(store, frm="Carol <carol@example.org>", in_reply_to=late)
    assert [x.id for x in all_of(store, Ticket)] == [t.id]
    assert len(_articles(store, t.id)) == 3
    assert {k.message_id: (k.ticket_id, k.awaited) for k in all_of(store, ThreadKey)} == {
        "<bob@example.org>": (t.id, False), late: (t.id, False),
        next(m for m in _articles(store, t.id) if m not in (late, "<bob@example.org>")):
            (t.id, False)}


def test_answers_to_one_unknown_mail_do_not_share_a_ticket(either_store: Store) -> None:
    """Two customers answer the same newsletter, which never passed through us: two
    conversations, two tickets. Only the newsletter itself would join the first one."""
    store = either_store
    newsletter = "<news-2026-11@mailer.example.com>"
    for who in ("Ann <ann@example.org>", "Ben <ben@example.org>"):
        store.accept(make_mail(subject="Re: our November news", frm=who,
                               in_reply_to=newsletter, references=newsletter))
        store.drain()
    first, second = all_of(store, Ticket)
    assert first.id != second.id
    assert [d.kind for d in all_of(store, Decision)] == ["route", "route"]
    awaited = {k.message_id: k.ticket_id for k in all_of(store, ThreadKey) if k.awaited}
    assert awaited == {newsletter: first.id}


@pytest.mark.parametrize("keys", [
    {"subject": "Re: [#999] wrong token", "references": "<x@nowhere> <orig@example.org>"},
    {"in_reply_to": "<unknown@nowhere>", "references": "<orig@example.org>"},
    {"subject": "no token", "references": "<orig@example.org> <a@nowhere> <b@nowhere>"},
], ids=["bad-token+refs", "unknown-irt+refs", "refs-oldest-only"])
def test_reply_never_opens_a_ticket_when_any_key_matches(store: Store,
                                                         keys: dict[str, str]) -> None:
    t = open_one(store)
    reply(store, **keys)
    assert [x.id for x in all_of(store, Ticket)] == [t.id]
    assert {x.status for x in all_of(store, Inbound)} == {InboundStatus.DONE}
    assert {x.ticket_id for x in all_of(store, Inbound)} == {t.id}
