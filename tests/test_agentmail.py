"""Replies by email: notification with a reply address, relay of a valid agent reply over
real SMTP (in-process intake, outbox worker, tests/smtp_sink.py as the relay), refusals."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlmodel import col, select

from router.agentmail import NOTIFY_KIND, REFUSED_EVENT, mac, reply_address, reply_key
from router.clock import system_clock
from router.hooks import default_hooks
from router.models import Article, ArticleKind, Event, Inbound, InboundStatus, Outbox, Ticket
from router.outbox import OutboxWorker
from router.settings import RelaySection
from tests.daemon import (
    InProcessRouter,
    MakeRouter,
    Store,
    inproc_routers,
    make_mail,
    open_store,
    send_smtp,
)
from tests.smtp_sink import SmtpSink, smtp_sink  # noqa: F401

HELP_TEAM = """
[[team]]
name = "help"
display_name = "Help Desk"
addresses = ["help@acme.test"]
lead = "hana@acme.test"
notify_agents = true
sla = { first_response = "1h", business_hours = false }
members = [
  { name = "Hana Lead", email = "hana@acme.test", role = "lead" },
  { name = "Ali Agent", email = "ali@acme.test" },
  { name = "Mo Manager", email = "mo@acme.test", role = "manager" },
]
"""
CUSTOMER_MID = "<question-1@example.org>"


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[MakeRouter]:
    async with inproc_routers(tmp_path) as make:
        yield make


def _relay_to(r: InProcessRouter, port: int) -> None:
    r.settings = r.settings.model_copy(update={"relay": RelaySection(port=port)})


async def test_agent_reply_by_mail_is_relayed_and_is_the_first_response(
        inproc: MakeRouter, smtp_sink: SmtpSink) -> None:  # noqa: F811
    r = await inproc(extra=HELP_TEAM, hooks=default_hooks())
    _relay_to(r, smtp_sink.port)
    outbox = OutboxWorker(r.engine, r.current_settings, system_clock)
    question = make_mail(frm="Alice <alice@example.org>", to="help@acme.test",
                         subject="Printer on fire", message_id=CUSTOMER_MID,
                         body="It is on fire.\n")
    await asyncio.to_thread(send_smtp, r.port, question, ["help@acme.test"],
                            "alice@example.org")
    await r.drain()
    assert await outbox.send_due() == 3        # the ack and two notifications
    sent = await smtp_sink.wait_for(3)
    notes = {m.rcpt_tos[0]: m for m in sent if m.mail_from == "help@acme.test"
             and m.rcpt_tos[0] != "alice@example.org"}
    assert set(notes) == {"hana@acme.test", "ali@acme.test"}, "agents and leads, no manager"
    note = notes["ali@acme.test"].message
    assert note["Auto-Submitted"] == "auto-generated"
    reply_to = email.utils.parseaddr(str(note["Reply-To"]))[1]
    assert reply_to.startswith("help+r-") and reply_to.endswith("@acme.test")
    assert reply_to != email.utils.parseaddr(str(notes["hana@acme.test"].message["Reply-To"]))[1]
    with r.pipeline.read_engine.connect() as conn:
        kinds = conn.execute(select(Outbox.kind)).scalars().all()  # type: ignore[call-overload]
    assert kinds.count(NOTIFY_KIND) == 2
    smtp_sink.clear()

    answer = make_mail(frm="Ali Agent <ali@acme.test>", to=reply_to,
                       subject=f"Re: {note['Subject']}", in_reply_to=str(note["Message-ID"]),
                       body="Hello Alice, the fire is out.\n\nOn Mon, Help Desk wrote:\n"
                            "> A new ticket arrived\n> Reply to this mail\n")
    await asyncio.to_thread(send_smtp, r.port, answer, [reply_to], "ali@acme.test")
    await r.drain()
    assert await outbox.send_due() == 1
    [relayed] = await smtp_sink.wait_for(1)
    msg = relayed.message
    assert relayed.mail_from == "help@acme.test"
    assert relayed.rcpt_tos == ["alice@example.org"]
    assert email.utils.parseaddr(str(msg["From"])) == ("Help Desk", "help@acme.test")
    assert email.utils.parseaddr(str(msg["To"]))[1] == "alice@example.org"
    body = msg.get_content()
    assert "the fire is out" in body and "Reply to this mail" not in body
    assert "ali@acme.test" not in relayed.raw.decode(errors="replace"), "the agent stays hidden"

    with r.pipeline.read_engine.connect() as conn:
        [ticket] = conn.execute(select(Ticket)).all()  # type: ignore[call-overload]
        assert msg["Subject"] == f"Re: Printer on fire [#{ticket.id}]"
        assert msg["In-Reply-To"] == CUSTOMER_MID
        assert str(msg["References"]).split()[-1] == CUSTOMER_MID
        assert ticket.first_response_at is not None and ticket.status == "pending"
        assert ticket.assignee == "ali@acme.test"
        out = conn.execute(select(Article).where(  # type: ignore[call-overload]
            Article.kind == ArticleKind.OUT, col(Article.automatic).is_(False))).one()
        assert out.author == "ali@acme.test" and out.sender == "help@acme.test"
        assert "the fire is out" in out.body_text
        inbound = conn.execute(select(Inbound.status, Inbound.ticket_id)  # type: ignore[call-overload]
                               .order_by(col(Inbound.id).desc())).first()
        assert inbound is not None and tuple(inbound) == (InboundStatus.DONE, ticket.id)
        assert conn.execute(select(Article).where(  # type: ignore[call-overload]
            Article.kind == ArticleKind.IN)).all().__len__() == 1, "not threaded as customer mail"


# ---------------------------------------------------------------------------- refusals

@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "etc", extra=HELP_TEAM, hooks=default_hooks()) as s:
        s.accept(make_mail(frm="Alice <alice@example.org>", to="help@acme.test",
                           subject="Printer on fire", message_id=CUSTOMER_MID),
                 ["help@acme.test"], "alice@example.org")
        s.drain()
        yield s


def _ticket_and_key(store: Store) -> tuple[int, bytes]:
    with store.session() as s:
        ticket = s.exec(select(Ticket)).one()
        assert ticket.id is not None
        return ticket.id, reply_key(s, system_clock())


def _send_and_refusal(store: Store, frm: str, to: str, **headers: str) -> str:
    store.accept(make_mail(frm=frm, to=to, subject="Re: New ticket", body="Sure, done.\n",
                           headers=headers), [to], email.utils.parseaddr(frm)[1])
    store.drain()
    with store.session() as s:
        assert len(s.exec(select(Ticket)).all()) == 1, "no ticket opened"
        assert s.exec(select(Outbox).where(Outbox.kind == "reply")).all() == [], "nothing relayed"
        assert s.exec(select(Article).where(Article.kind == ArticleKind.OUT,
                                            col(Article.automatic).is_(False))).all() == []
        inbound = s.exec(select(Inbound).order_by(col(Inbound.id).desc())).first()
        assert inbound is not None and inbound.status == InboundStatus.REFUSED
        [event] = s.exec(select(Event).where(Event.kind == REFUSED_EVENT)).all()
        assert event.data["inbound_id"] == inbound.id
        ticket = s.exec(select(Ticket)).one()
        assert ticket.first_response_at is None
        return str(event.data["reason"])


def test_forged_token_is_refused(store: Store) -> None:
    tid, _key = _ticket_and_key(store)
    forged = f"help+r-{tid}-{'0' * 16}@acme.test"
    reason = _send_and_refusal(store, "Ali Agent <ali@acme.test>", forged)
    assert "not valid" in reason


def test_token_of_another_ticket_is_refused(store: Store) -> None:
    tid, key = _ticket_and_key(store)
    # ali's genuine mac for this ticket, pasted onto a ticket number that does not match
    other = f"help+r-{tid + 1}-{mac(key, tid, 'ali@acme.test')}@acme.test"
    assert "no ticket" in _send_and_refusal(store, "ali@acme.test", other)


def test_right_token_from_a_non_agent_is_refused(store: Store) -> None:
    tid, key = _ticket_and_key(store)
    addr = reply_address(key, "help@acme.test", tid, "ali@acme.test")
    reason = _send_and_refusal(store, "Mallory <mallory@example.org>", addr)
    assert "not a member of team help" in reason


def test_right_token_from_an_agent_of_another_team_is_refused(store: Store) -> None:
    tid, key = _ticket_and_key(store)
    # Even a mac made for this very sender does not help someone outside the team.
    addr = reply_address(key, "help@acme.test", tid, "sam@acme.test")
    reason = _send_and_refusal(store, "Sam Agent <sam@acme.test>", addr)
    assert "not a member of team help" in reason


def test_agent_autoresponder_is_refused(store: Store) -> None:
    tid, key = _ticket_and_key(store)
    addr = reply_address(key, "help@acme.test", tid, "ali@acme.test")
    reason = _send_and_refusal(store, "ali@acme.test", addr, **{"Auto-Submitted": "auto-replied"})
    assert "automatic" in reason


def test_valid_reply_through_the_pipeline(store: Store) -> None:
    tid, key = _ticket_and_key(store)
    addr = reply_address(key, "help@acme.test", tid, "hana@acme.test")
    store.accept(make_mail(frm="hana@acme.test", to=addr, subject="Re: whatever",
                           body="On it.\n"), [addr], "hana@acme.test")
    store.drain()
    with store.session() as s:
        [row] = s.exec(select(Outbox).where(Outbox.kind == "reply")).all()
        assert row.rcpt_to == ["alice@example.org"] and row.mail_from == "help@acme.test"
        assert s.exec(select(Event).where(Event.kind == REFUSED_EVENT)).all() == []
        ticket = s.exec(select(Ticket)).one()
        assert ticket.first_response_at is not None


def test_no_notification_unless_configured(tmp_path: Path) -> None:
    with open_store(tmp_path / "etc", hooks=default_hooks()) as s:
        s.accept(make_mail(to="support@acme.test"), ["support@acme.test"], "alice@example.org")
        s.drain()
        with s.session() as session:
            assert session.exec(select(Outbox).where(Outbox.kind == NOTIFY_KIND)).all() == []
