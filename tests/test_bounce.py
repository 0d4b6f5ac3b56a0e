"""Delivery status notifications about our mail: matched, recorded, never a ticket."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, select

from router.bounce import apply_bounce, handle_dsn, is_dsn, match_bounce, read_report
from router.db import make_engine, session_scope
from router.loopguard import automatic_reason
from router.mail import parse
from router.models import Customer, Event, Outbox, OutboxStatus, Ticket
from router.outbox import enqueue

T0 = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    e = make_engine(sqlite_url)
    SQLModel.metadata.create_all(e)
    yield e
    e.dispose()


@pytest.fixture
def sent(engine: Engine) -> Outbox:
    """An ack we sent to a customer whose mailbox does not exist."""
    with session_scope(engine) as s:
        c = Customer(email="gone@example.com", created_at=T0, last_seen_at=T0)
        s.add(c)
        s.flush()
        assert c.id is not None
        t = Ticket(team="support", customer_id=c.id, address="support@acme.test", created_at=T0,
                   updated_at=T0, last_customer_at=T0)
        s.add(t)
        s.flush()
        msg = EmailMessage()
        msg["From"] = "support <support@acme.test>"
        msg["To"] = "gone@example.com"
        msg["Subject"] = f"Re: Help [#{t.id}]"
        msg["Auto-Submitted"] = "auto-replied"
        msg.set_content("We got your message.\n")
        row = enqueue(s, kind="ack", msg=msg, ticket_id=t.id, customer_id=c.id, now=T0,
                      hostname="router.test")
        row.status = OutboxStatus.SENT
        s.add(row)
    return row


def dsn(original_id: str, *, action: str = "failed", status: str = "5.1.1",
        returned: str = "message", extra_headers: str = "", envelope_id: str = "") -> bytes:
    """A Postfix-style RFC 3464 report."""
    if returned == "message":
        third = ("Content-Type: message/rfc822\r\n\r\n"
                 f"From: support <support@acme.test>\r\nTo: gone@example.com\r\n"
                 f"Message-ID: {original_id}\r\nSubject: Re: Help\r\n\r\nWe got your message.\r\n")
    elif returned == "headers":
        third = ("Content-Type: text/rfc822-headers\r\n\r\n"
                 f"From: support <support@acme.test>\r\nTo: gone@example.com\r\n"
                 f"Message-ID: {original_id}\r\nSubject: Re: Help\r\n")
    else:
        third = "Content-Type: text/plain\r\n\r\nnothing returned\r\n"
    envid = f"Original-Envelope-Id: {envelope_id}\r\n" if envelope_id else ""
    return (
        "From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r\n"
        "To: support@acme.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn1@mx.example.com>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        f"{extra_headers}"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BB"\r\n'
        "\r\n"
        "--BB\r\nContent-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "--BB\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.com\r\n{envid}\r\n"
        "Final-Recipient: rfc822; gone@example.com\r\n"
        "Original-Recipient: rfc822;gone@example.com\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: dns; mail.example.com\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <gone@example.com>: Recipient address rejected:\r\n"
        " User unknown in virtual mailbox table\r\n"
        "\r\n"
        f"--BB\r\n{third}"
        "--BB--\r\n"
    ).encode()


def test_report_is_read(sent: Outbox) -> None:
    report = read_report(parse(dsn(sent.message_id)))
    assert report.reporting_mta == "mx.example.com"
    [r] = report.recipients
    assert (r.recipient, r.action, r.status) == ("gone@example.com", "failed", "5.1.1")
    assert r.diagnostic.startswith("550 5.1.1 <gone@example.com>: Recipient address rejected")
    assert report.original_ids[0] == sent.message_id
    assert report.failed


@pytest.mark.parametrize("returned", ["message", "headers"])
def test_match_and_apply(engine: Engine, sent: Outbox, returned: str) -> None:
    parsed = parse(dsn(sent.message_id, returned=returned))
    assert is_dsn(parsed)
    later = datetime(2025, 6, 2, 8, 5, tzinfo=UTC)
    with session_scope(engine) as s:
        row = match_bounce(s, parsed)
        assert row is not None and row.id == sent.id
        event = apply_bounce(s, row, parsed, later)
    with Session(engine) as s:
        row = s.get(Outbox, sent.id)
        assert row is not None and row.status == OutboxStatus.FAILED
        assert row.last_error and "5.1.1" in row.last_error and "User unknown" in row.last_error
        [ev] = s.exec(select(Event).where(Event.kind == "bounce")).all()
        assert ev.id == event.id and ev.ticket_id == sent.ticket_id and ev.at == later
        assert ev.data["matched"] and ev.data["outbox_id"] == sent.id
        assert ev.data["recipients"][0]["status"] == "5.1.1"


def test_match_by_references_when_nothing_is_returned(engine: Engine, sent: Outbox) -> None:
    parsed = parse(dsn("<unrelated@x>", returned="none",
                       extra_headers=f"In-Reply-To: {sent.message_id}\r\n"))
    with Session(engine) as s:
        row = match_bounce(s, parsed)
        assert row is not None and row.id == sent.id


def test_match_by_original_envelope_id(engine: Engine, sent: Outbox) -> None:
    parsed = parse(dsn("<unrelated@x>", returned="none",
                       envelope_id=sent.message_id.strip("<>")))
    with Session(engine) as s:
        row = match_bounce(s, parsed)
        assert row is not None and row.id == sent.id


def test_delay_report_is_recorded_but_not_a_failure(engine: Engine, sent: Outbox) -> None:
    parsed = parse(dsn(sent.message_id, action="delayed", status="4.4.1"))
    with session_scope(engine) as s:
        event = handle_dsn(s, parsed, T0)
        assert event is not None and event.data["failed"] is False
    with Session(engine) as s:
        row = s.get(Outbox, sent.id)
        assert row is not None and row.status == OutboxStatus.SENT


def test_unmatched_dsn_is_recorded_without_ticket(engine: Engine, sent: Outbox) -> None:
    parsed = parse(dsn("<someone-else@elsewhere.example>"))
    with session_scope(engine) as s:
        assert match_bounce(s, parsed) is None
        event = handle_dsn(s, parsed, T0)
        assert event is not None
    with Session(engine) as s:
        [ev] = s.exec(select(Event).where(Event.kind == "bounce")).all()
        assert ev.ticket_id is None and ev.data["matched"] is False
        assert "<someone-else@elsewhere.example>" in ev.data["original_ids"]
        row = s.get(Outbox, sent.id)
        assert row is not None and row.status == OutboxStatus.SENT


def test_ordinary_mail_is_not_a_dsn(engine: Engine, sent: Outbox) -> None:
    raw = (f"From: gone@example.com\r\nTo: support@acme.test\r\nSubject: Re: Help\r\n"
           f"In-Reply-To: {sent.message_id}\r\n\r\nthanks\r\n").encode()
    parsed = parse(raw)
    assert not is_dsn(parsed)
    with session_scope(engine) as s:
        assert match_bounce(s, parsed) is None
        assert handle_dsn(s, parsed, T0) is None


def test_a_dsn_is_never_acked(sent: Outbox) -> None:
    reason = automatic_reason(parse(dsn(sent.message_id)), our_addresses={"support@acme.test"},
                              envelope_sender="")
    assert reason is not None


def test_garbage_report_does_not_raise(engine: Engine) -> None:
    raw = (b"From: MAILER-DAEMON@x\r\nContent-Type: multipart/report; "
           b"report-type=delivery-status; boundary=Q\r\n\r\n--Q\r\n"
           b"Content-Type: message/delivery-status\r\n\r\n\xff\xfe garbage\r\n--Q")
    parsed = parse(raw)
    with session_scope(engine) as s:
        event = handle_dsn(s, parsed, T0)
        assert event is not None and event.ticket_id is None
