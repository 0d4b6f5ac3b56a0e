"""Acknowledgements: rendering, the rules that suppress them, template checks, and the
out-of-office ping-pong, against a real SQLite database and a real SMTP server."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, select

from router import settings as config
from router import turnaround
from router.ack import (
    AckOutcome,
    plan_ack,
    record_first_response,
    reply_subject,
    resolve_template,
    template_problems,
)
from router.clock import FakeClock
from router.db import make_engine, session_scope
from router.mail import normalize_address, parse
from router.models import (
    Article,
    ArticleKind,
    Customer,
    Event,
    Outbox,
    OutboxStatus,
    ThreadKey,
    Ticket,
)
from router.outbox import OutboxWorker
from tests.conftest import REPO, write_config
from tests.smtp_sink import Received, SmtpSink, smtp_sink  # noqa: F401

MONDAY = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)          # 11:00 in Istanbul
FRIDAY_EVENING = datetime(2025, 6, 6, 16, 0, tzinfo=UTC)  # 19:00 in Istanbul, closed


@dataclass
class Desk:
    """A minimal stand-in for the pipeline: thread or open a ticket, then plan the ack."""

    engine: Engine
    settings: config.Settings
    clock: FakeClock

    def receive(self, raw: bytes, *, envelope_sender: str | None = None,
                language: str | None = None) -> tuple[AckOutcome, int]:
        parsed = parse(raw)
        now = self.clock()
        with session_scope(self.engine) as s:
            email = normalize_address(parsed.sender_email or "unknown@invalid")
            customer = s.exec(select(Customer).where(Customer.email == email)).first()
            if customer is None:
                customer = Customer(email=email, name=parsed.sender_name, language=language,
                                    created_at=now, last_seen_at=now)
                s.add(customer)
                s.flush()
            ticket = None
            for mid in [*parsed.in_reply_to, *reversed(parsed.references)]:
                key = s.get(ThreadKey, mid)
                if key is not None:
                    ticket = s.get(Ticket, key.ticket_id)
                    break
            if ticket is None:
                rcpt = next(a for _n, a in parsed.to)
                team = self.settings.address_map()[rcpt.lower()]
                assert customer.id is not None
                ticket = Ticket(team=team, subject=parsed.subject, customer_id=customer.id,
                                address=rcpt.lower(), language=language, created_at=now,
                                updated_at=now, last_customer_at=now)
                s.add(ticket)
                s.flush()
            assert ticket.id is not None
            article = Article(ticket_id=ticket.id, kind=ArticleKind.IN,
                              message_id=parsed.message_id, sender=email,
                              subject=parsed.subject, body_text=parsed.text, created_at=now)
            s.add(article)
            if parsed.message_id and s.get(ThreadKey, parsed.message_id) is None:
                s.add(ThreadKey(message_id=parsed.message_id, ticket_id=ticket.id))
            s.flush()
            team_cfg = self.settings.team_by_name(ticket.team)
            assert team_cfg is not None
            outcome = plan_ack(s.connection(), settings=self.settings, team=team_cfg, ticket=ticket,
                               article=article, customer=customer, parsed=parsed,
                               envelope_sender=envelope_sender, now=now, clock=self.clock,
                               language=language)
            return outcome, ticket.id

    def outbox(self, kind: str = "ack") -> list[Outbox]:
        with Session(self.engine) as s:
            return list(s.exec(select(Outbox).where(Outbox.kind == kind)
                               .order_by(Outbox.id)).all())  # type: ignore[arg-type]

    def ticket(self, ticket_id: int) -> Ticket:
        with Session(self.engine) as s:
            t = s.get(Ticket, ticket_id)
            assert t is not None
            return t

    def events(self, kind: str) -> list[Event]:
        with Session(self.engine) as s:
            return list(s.exec(select(Event).where(Event.kind == kind)
                               .order_by(Event.id)).all())  # type: ignore[arg-type]

    def with_settings(self, **ack: object) -> Desk:
        s = self.settings.model_copy(update={"ack": self.settings.ack.model_copy(update=ack)})
        return Desk(self.engine, s, self.clock)


def customer_mail(subject: str = "Printer on fire", *, sender: str = "Ann Smith <ann@example.com>",
                  to: str = "support@acme.test", body: str = "Our printer is on fire.\n",
                  headers: tuple[str, ...] = (), message_id: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="example.com")
    msg["References"] = "<root@example.com>"
    for h in headers:
        name, _, value = h.partition(": ")
        msg[name] = value
    msg.set_content(body)
    return msg.as_bytes()


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    e = make_engine(sqlite_url)
    SQLModel.metadata.create_all(e)
    yield e
    e.dispose()


def load(tmp_path: Path, sqlite_url: str, relay_port: int | None = None, extra: str = ""
         ) -> config.Settings:
    return config.load(write_config(tmp_path / "etc", db_url=sqlite_url, relay_port=relay_port,
                                    extra=extra), env={})


@pytest.fixture
def desk(engine: Engine, tmp_path: Path, sqlite_url: str) -> Desk:
    return Desk(engine, load(tmp_path, sqlite_url), FakeClock(MONDAY))


def ack_message(row: Outbox) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(row.raw)
    assert isinstance(msg, EmailMessage)
    return msg


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- rendering


def test_english_ack(desk: Desk) -> None:
    raw = customer_mail(message_id="<q1@example.com>")
    outcome, ticket_id = desk.receive(raw, envelope_sender="ann@example.com")
    assert outcome.sent, outcome.reason
    [row] = desk.outbox()
    assert outcome.outbox_id == row.id
    assert row.mail_from == "support@acme.test" and row.rcpt_to == ["ann@example.com"]
    assert row.ticket_id == ticket_id and row.status == OutboxStatus.QUEUED
    msg = ack_message(row)
    assert msg["From"].addresses[0].addr_spec == "support@acme.test"
    assert msg["From"].addresses[0].display_name == "support"   # the team label
    assert msg["To"].addresses[0].addr_spec == "ann@example.com"
    assert str(msg["Subject"]) == f"Re: Printer on fire [#{ticket_id}]"
    assert str(msg["In-Reply-To"]) == "<q1@example.com>"
    assert str(msg["References"]) == "<root@example.com> <q1@example.com>"
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["X-Auto-Response-Suppress"]) == "All"
    assert msg["Precedence"] is None
    assert str(msg["Content-Language"]) == "en"
    assert msg["Message-ID"] is not None and str(msg["Message-ID"]) == row.message_id
    text = body(msg)
    assert text.startswith("Hello Ann Smith,\n")
    assert f"ticket [#{ticket_id}]" in text
    assert "our support team" in text
    # The support team keeps the default 4 h SLA around the clock; no history yet.
    assert outcome.promise is not None and outcome.promise.basis == "sla_fallback"
    assert "will answer you within about 4 hours." in text
    assert "http" not in text and "www." not in text
    # The promise is on the ticket, the ack is in the thread and replies to it thread back.
    t = desk.ticket(ticket_id)
    assert t.promised_at == MONDAY + timedelta(hours=4) and t.promise_basis == "sla_fallback"
    with Session(desk.engine) as s:
        assert s.get(ThreadKey, row.message_id) is not None
        out = s.exec(select(Article).where(Article.kind == ArticleKind.OUT)).one()
        assert out.automatic and out.message_id == row.message_id and out.body_text == text
    [queued] = desk.events("ack_queued")
    assert queued.data["template"] == "ack/default.en.txt.j2"


def test_turkish_ack_with_a_clock_time_promise(desk: Desk) -> None:
    desk.clock.now = FRIDAY_EVENING
    raw = customer_mail("Fatura hatası", sender="Ayşe Yılmaz <ayse@example.com.tr>",
                        to="billing@acme.test", body="Faturamda bir hata var.\n")
    outcome, ticket_id = desk.receive(raw, envelope_sender="ayse@example.com.tr",
                                      language="tr")
    assert outcome.sent, outcome.reason
    [row] = desk.outbox()
    msg = ack_message(row)
    assert str(msg["Subject"]) == f"Re: Fatura hatası [#{ticket_id}]"
    assert msg["From"].addresses[0].addr_spec == "billing@acme.test"
    assert str(msg["Content-Language"]) == "tr"
    text = body(msg)
    assert text.startswith("Merhaba Ayşe Yılmaz,\n")
    assert "Mesajınız bize ulaştı" in text
    assert f"[#{ticket_id}] numaralı\ntalep olarak billing ekibimize iletildi." in text
    # Friday 19:00 in Istanbul is after hours: 4 business hours from Monday 09:00.
    assert outcome.promise is not None
    assert outcome.promise.deadline == datetime(2025, 6, 9, 10, 0, tzinfo=UTC)
    words = turnaround.describe(outcome.promise, FRIDAY_EVENING, "Europe/Istanbul", "tr")
    assert "Pazartesi" in words
    assert f"Ekibimizden bir kişi size {words} yanıt verecektir." in text
    # Non-ASCII survives: headers RFC 2047-encoded, body quoted-printable, 7-bit on the wire.
    assert max(row.raw) < 128


def test_unknown_language_falls_back_to_default(desk: Desk) -> None:
    outcome, _ = desk.receive(customer_mail(), language="de")
    assert outcome.sent
    assert str(ack_message(desk.outbox()[0])["Content-Language"]) == "en"


def test_ops_team_promises_its_short_sla(desk: Desk) -> None:
    outcome, _ = desk.receive(customer_mail("Site down", to="oops@acme.test"))
    assert outcome.sent
    assert "will answer you within about 15 minutes." in body(ack_message(desk.outbox()[0]))


def test_promise_from_history(desk: Desk) -> None:
    # Twenty-five tickets answered in 20 to 44 minutes: the promise follows the 90th
    # percentile of what the team really does, not the 4 h SLA.
    with session_scope(desk.engine) as s:
        c = Customer(email="old@example.com", created_at=MONDAY, last_seen_at=MONDAY)
        s.add(c)
        s.flush()
        assert c.id is not None
        for i in range(25):
            created = MONDAY - timedelta(days=1, hours=i)
            s.add(Ticket(team="support", customer_id=c.id, address="support@acme.test",
                         status="solved", created_at=created, updated_at=created,
                         last_customer_at=created,
                         first_response_at=created + timedelta(minutes=20 + i)))
    outcome, ticket_id = desk.receive(customer_mail())
    assert outcome.promise is not None and outcome.promise.basis == "history"
    assert desk.ticket(ticket_id).promise_basis == "history"
    assert outcome.promise.deadline - MONDAY <= timedelta(hours=1)


def test_subject_prefix_and_token_are_not_doubled() -> None:
    assert reply_subject("Printer on fire", "[#7]") == "Re: Printer on fire [#7]"
    assert reply_subject("RE: Printer on fire", "[#7]") == "RE: Printer on fire [#7]"
    assert reply_subject("Re: Printer [#7]", "[#7]") == "Re: Printer [#7]"
    assert reply_subject("Ynt: Fatura", "[#7]") == "Ynt: Fatura [#7]"
    assert reply_subject("Fwd:  long   spaces", "[#7]") == "Re: Fwd: long spaces [#7]"
    assert reply_subject("", "[#7]") == "Re: [#7]"


def test_html_alternative_is_escaped_and_text_is_not(engine: Engine, tmp_path: Path,
                                                     sqlite_url: str) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "ack" / "default.en.html.j2").write_text(
        "<p>Hello {{ customer_name }}, ticket {{ token }}</p>\n")
    settings = load(tmp_path, sqlite_url).model_copy(update={"templates": str(templates)})
    d = Desk(engine, settings, FakeClock(MONDAY))
    outcome, _ = d.receive(customer_mail(sender="Tom & Jerry <tj@example.com>"))
    assert outcome.sent
    msg = ack_message(d.outbox()[0])
    html = msg.get_body(("html",))
    assert html is not None
    assert "Tom &amp; Jerry" in html.get_content()  # type: ignore[attr-defined]
    assert body(msg).startswith("Hello Tom & Jerry,")


def test_template_lookup_order(tmp_path: Path, sqlite_url: str) -> None:
    templates = tmp_path / "templates"
    (templates / "ack").mkdir(parents=True)
    for name in ("default.en", "support.en", "support.tr", "vip", "vip.tr"):
        (templates / "ack" / f"{name}.txt.j2").write_text(name)
    settings = load(tmp_path, sqlite_url).model_copy(update={"templates": str(templates)})
    support = settings.team_by_name("support")
    ops = settings.team_by_name("ops")
    assert support is not None and ops is not None
    assert resolve_template(settings, support, "tr") == ("ack/support.tr.txt.j2", "tr")
    assert resolve_template(settings, support, "de") == ("ack/support.en.txt.j2", "en")
    assert resolve_template(settings, ops, "tr") == ("ack/default.en.txt.j2", "en")
    vip = ops.model_copy(update={"ack_template": "ack/vip.txt.j2"})
    assert resolve_template(settings, vip, "tr") == ("ack/vip.tr.txt.j2", "tr")
    assert resolve_template(settings, vip, "en") == ("ack/vip.txt.j2", "en")


# ---------------------------------------------------------------------------- suppression


def suppressed(desk: Desk, outcome: AckOutcome, code: str, text: str) -> None:
    assert not outcome.sent and outcome.outbox_id is None
    assert outcome.code == code
    assert text in outcome.reason
    last = desk.events("ack_suppressed")[-1]
    assert last.data["rule"] == code and last.data["reason"] == outcome.reason


def test_disabled_still_stores_the_promise(desk: Desk) -> None:
    off = desk.with_settings(enabled=False)
    outcome, ticket_id = off.receive(customer_mail())
    suppressed(off, outcome, "disabled", "ack disabled")
    assert outcome.promise is not None
    assert desk.ticket(ticket_id).promised_at == outcome.promise.deadline
    assert desk.outbox() == []


def test_loop_guard_suppresses_and_still_promises(desk: Desk) -> None:
    outcome, ticket_id = desk.receive(customer_mail(headers=("Auto-Submitted: auto-generated",)))
    suppressed(desk, outcome, "loop_guard", "Auto-Submitted: auto-generated")
    assert desk.ticket(ticket_id).promised_at is not None
    outcome, _ = desk.receive(customer_mail("Hi"), envelope_sender="")
    suppressed(desk, outcome, "loop_guard", "empty envelope sender")
    outcome, _ = desk.receive(customer_mail("Hi", sender="sam@acme.test"))
    suppressed(desk, outcome, "loop_guard", "our own addresses")
    assert desk.outbox() == []


def test_one_ack_per_ticket(desk: Desk) -> None:
    first, ticket_id = desk.receive(customer_mail(message_id="<a1@example.com>"))
    assert first.sent
    promised = desk.ticket(ticket_id).promised_at
    desk.clock.advance(timedelta(days=3))  # even after the grace period
    reply = customer_mail("Re: Printer on fire", headers=("In-Reply-To: <a1@example.com>",))
    second, same = desk.receive(reply)
    assert same == ticket_id
    suppressed(desk, second, "ticket_acked", "one ack per ticket")
    assert second.promise is None
    assert desk.ticket(ticket_id).promised_at == promised, "the promise is not moved"
    assert len(desk.outbox()) == 1


def test_grace_period_per_sender_and_address(desk: Desk) -> None:
    assert desk.receive(customer_mail("one"))[0].sent
    desk.clock.advance(timedelta(hours=2))
    outcome, _ = desk.receive(customer_mail("two, a new matter"))
    suppressed(desk, outcome, "grace_period", "within the grace period (24h)")
    # Another role address is another conversation.
    assert desk.receive(customer_mail("three", to="billing@acme.test"))[0].sent
    # Another customer is not affected.
    assert desk.receive(customer_mail("four", sender="bob@example.com"))[0].sent
    desk.clock.advance(timedelta(hours=23))
    assert desk.receive(customer_mail("five"))[0].sent
    assert len(desk.outbox()) == 4


def test_daily_cap_counts_every_automatic_mail(desk: Desk) -> None:
    capped = desk.with_settings(daily_cap=2)
    assert capped.receive(customer_mail("a", to="oops@acme.test"))[0].sent
    assert capped.receive(customer_mail("b", to="billing@acme.test"))[0].sent
    outcome, _ = capped.receive(customer_mail("c", to="support@acme.test"))
    suppressed(capped, outcome, "daily_cap", "daily cap of automatic mail reached")
    # A person's reply is not automatic and does not count.
    with session_scope(desk.engine) as s:
        for row in s.exec(select(Outbox)).all():
            row.kind = "reply"
            s.add(row)
    assert capped.receive(customer_mail("d", to="sales@acme.test"))[0].sent
    capped.clock.advance(timedelta(hours=25))
    assert capped.receive(customer_mail("e", to="support@acme.test"))[0].sent


def test_broken_template_suppresses_without_losing_the_ticket(
        engine: Engine, tmp_path: Path, sqlite_url: str) -> None:
    templates = tmp_path / "templates"
    (templates / "ack").mkdir(parents=True)
    (templates / "ack" / "default.en.txt.j2").write_text("Hello {{ no_such_thing }}\n")
    settings = load(tmp_path, sqlite_url).model_copy(update={"templates": str(templates)})
    d = Desk(engine, settings, FakeClock(MONDAY))
    outcome, ticket_id = d.receive(customer_mail())
    suppressed(d, outcome, "template_error", "no_such_thing")
    assert d.ticket(ticket_id).promised_at is not None


def test_calendar_that_is_never_open_suppresses_but_keeps_the_ticket(desk: Desk) -> None:
    teams = [t.model_copy(update={"business_hours": {"mon-sun": "closed"}})
             if t.name == "support" else t for t in desk.settings.team]
    closed = Desk(desk.engine, desk.settings.model_copy(update={"team": teams}), desk.clock)
    outcome, ticket_id = closed.receive(customer_mail())
    suppressed(closed, outcome, "promise_error", "never open")
    assert desk.ticket(ticket_id).promised_at is None


def test_record_first_response(desk: Desk) -> None:
    outcome, ticket_id = desk.receive(customer_mail())
    assert outcome.promise is not None
    with session_scope(desk.engine) as s:
        t = s.get(Ticket, ticket_id)
        assert t is not None
        record_first_response(s, t, MONDAY + timedelta(hours=1))
        record_first_response(s, t, MONDAY + timedelta(hours=9))  # only the first counts
    t = desk.ticket(ticket_id)
    assert t.first_response_at == MONDAY + timedelta(hours=1) and t.promise_kept is True
    late, late_id = desk.receive(customer_mail("late", to="oops@acme.test"))
    assert late.promise is not None
    with session_scope(desk.engine) as s:
        t = s.get(Ticket, late_id)
        assert t is not None
        record_first_response(s, t, late.promise.deadline + timedelta(seconds=1))
    assert desk.ticket(late_id).promise_kept is False


# ---------------------------------------------------------------------------- router check


def checked(tmp_path: Path, sqlite_url: str, files: dict[str, str]) -> list[config.Problem]:
    templates = tmp_path / "tpl"
    for name, text in files.items():
        (templates / name).parent.mkdir(parents=True, exist_ok=True)
        (templates / name).write_text(text)
    templates.mkdir(exist_ok=True)
    settings = load(tmp_path, sqlite_url).model_copy(update={"templates": str(templates)})
    return template_problems(settings)


def test_shipped_templates_are_clean(tmp_path: Path, sqlite_url: str) -> None:
    assert template_problems(load(tmp_path, sqlite_url)) == []


def test_missing_default_template(tmp_path: Path, sqlite_url: str) -> None:
    [p] = checked(tmp_path, sqlite_url, {"ack/support.en.txt.j2": "hi"})
    assert p.severity == "error" and "ack/default.en.txt.j2 is missing" in p.message


def test_syntax_error_names_file_and_line(tmp_path: Path, sqlite_url: str) -> None:
    problems = checked(tmp_path, sqlite_url, {
        "ack/default.en.txt.j2": "Hello {{ customer_name }},\n\n{% if token %}\nno end\n"})
    [p] = problems
    assert p.severity == "error" and p.file.endswith("ack/default.en.txt.j2")
    assert p.line is not None and p.line >= 3
    assert "syntax error" in p.message
    assert f"{p.file}:{p.line}: error" in str(p)


def test_unknown_variable_is_an_error(tmp_path: Path, sqlite_url: str) -> None:
    [p] = checked(tmp_path, sqlite_url, {"ack/default.en.txt.j2": "a\nHi {{ first_name }}\n"})
    assert p.severity == "error" and "first_name" in p.message and p.line == 2


def test_template_for_an_unknown_team_is_warned_about(tmp_path: Path, sqlite_url: str) -> None:
    [p] = checked(tmp_path, sqlite_url, {"ack/default.en.txt.j2": "hi",
                                         "ack/suport.en.txt.j2": "hi",
                                         "ack/support.tr.txt.j2": "merhaba"})
    assert p.severity == "warning" and '"suport" is not a team' in p.message


def test_links_are_warned_about(tmp_path: Path, sqlite_url: str) -> None:
    problems = checked(tmp_path, sqlite_url, {"ack/default.en.txt.j2": (
        "Hello,\nsee https://help.acme.test/faq or www.acme.test\n"
        "or mailto:support@acme.test or mailto:forum@acme.test\n")})
    assert all(p.severity == "warning" for p in problems)
    assert [(p.line, p.message.split()[1]) for p in problems] == [
        (2, "https://help.acme.test/faq"), (2, "www.acme.test"),
        (3, "mailto:forum@acme.test")]
    assert "reassurance, not deflection" in problems[0].message


# ---------------------------------------------------------------------------- ping-pong


def out_of_office(well_behaved: bool) -> Callable[[Received], bytes]:
    """A vacation responder: answers every mail it receives. The well-behaved one follows
    RFC 3834; the rude one sets no header at all and breaks the thread."""

    def respond(got: Received) -> bytes:
        reply = EmailMessage()
        reply["From"] = got.message["To"]
        reply["To"] = got.message["From"]
        reply["Message-ID"] = make_msgid(domain="example.com")
        if well_behaved:
            reply["Subject"] = f"Automatic reply: {got.message['Subject']}"
            reply["In-Reply-To"] = got.message["Message-ID"]
            reply["Auto-Submitted"] = "auto-replied"
        else:
            reply["Subject"] = f"I am on holiday {random.randint(0, 10**6)}"
        reply.set_content("I am out of the office until Monday.\n")
        return reply.as_bytes()

    return respond


@pytest.mark.parametrize("well_behaved", [True, False])
async def test_out_of_office_ping_pong_ends_after_one_ack(
        engine: Engine, tmp_path: Path, sqlite_url: str, smtp_sink: SmtpSink,  # noqa: F811
        well_behaved: bool) -> None:
    settings = load(tmp_path, sqlite_url, relay_port=smtp_sink.port)
    clock = FakeClock(MONDAY)
    d = Desk(engine, settings, clock)
    smtp_sink.responder = out_of_office(well_behaved)
    worker = OutboxWorker(engine, lambda: settings, clock)

    d.receive(customer_mail(), envelope_sender="ann@example.com")
    fed = 0
    for _round in range(5):
        await worker.send_due()
        clock.advance(timedelta(minutes=10))
        for reply in smtp_sink.replies[fed:]:
            fed += 1
            # The responder's mail comes back in as a new message from the customer.
            d.receive(reply, envelope_sender="" if well_behaved else "ann@example.com")
    assert len(smtp_sink.messages) == 1
    assert len(d.outbox()) == 1
    assert fed == 1
    [event] = d.events("ack_suppressed")
    assert event.data["rule"] == ("loop_guard" if well_behaved else "grace_period")


# ---------------------------------------------------------------------------- pipeline hook


def test_ack_hook_in_the_pipeline_transaction(engine: Engine, tmp_path: Path,
                                              sqlite_url: str) -> None:
    from router.ack import ack_hook
    from router.models import Inbound, InboundRaw
    from router.pipeline import Pipeline

    settings = load(tmp_path, sqlite_url)

    def arrive(raw: bytes, key: str) -> None:
        with session_scope(engine) as s:
            row = Inbound(received_at=MONDAY, channel="smtp", mail_from="ann@example.com",
                          rcpt_to=["support@acme.test"], size=len(raw), dedupe_key=key)
            s.add(row)
            s.flush()
            assert row.id is not None
            s.add(InboundRaw(inbound_id=row.id, raw=raw))

    pipeline = Pipeline(sqlite_url, lambda: settings, hooks=[ack_hook])
    try:
        arrive(customer_mail(message_id="<p1@example.com>"), "k1")
        assert pipeline.drain() == 1
        [ack] = Desk(engine, settings, FakeClock(MONDAY)).outbox()
        arrive(customer_mail("Re: Printer on fire",
                             headers=(f"In-Reply-To: {ack.message_id}",)), "k2")
        assert pipeline.drain() == 1
    finally:
        pipeline.close()
    desk = Desk(engine, settings, FakeClock(MONDAY))
    assert len(desk.outbox()) == 1
    [suppressed_event] = desk.events("ack_suppressed")
    assert suppressed_event.data["rule"] == "ticket_acked"
    assert suppressed_event.ticket_id == ack.ticket_id
    assert desk.ticket(ack.ticket_id or 0).promised_at is not None
