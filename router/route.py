"""Thread a message onto its ticket or open one, in the caller's transaction.

Threading keys, tried in this order; the first that names an existing ticket wins:
1. the ticket token in the subject (``[#1234]``, format from ``router.ticket_token``);
2. In-Reply-To, then References from newest to oldest, looked up in `ThreadKey`, which
   holds every Message-ID of a ticket: the customer's and every mail we sent.
A reply never opens a new ticket when one of these matches; a reply to a solved or closed
ticket reopens it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, select

from router.classify import Decision
from router.mail import ParsedMail
from router.models import (
    Article,
    ArticleKind,
    Attachment,
    Customer,
    Decision as DecisionRow,
    Event,
    Inbound,
    ThreadKey,
    Ticket,
    TicketStatus,
)
from router.settings import Settings

_token_cache: dict[str, re.Pattern[str]] = {}


def token_pattern(fmt: str) -> re.Pattern[str]:
    pat = _token_cache.get(fmt)
    if pat is None:
        before, _, after = fmt.partition("{id}")
        pat = re.compile(re.escape(before) + r"\s*(\d{1,12})\s*" + re.escape(after))
        _token_cache[fmt] = pat
    return pat


def format_token(settings: Settings, ticket_id: int) -> str:
    return settings.router.ticket_token.replace("{id}", str(ticket_id))


@dataclass
class ThreadMatch:
    ticket: Ticket
    key: str        # subject-token | in-reply-to | references
    value: str


def find_thread(session: Session, parsed: ParsedMail, settings: Settings) -> ThreadMatch | None:
    for m in token_pattern(settings.router.ticket_token).finditer(parsed.subject):
        ticket = session.get(Ticket, int(m.group(1)))
        if ticket is not None:
            return ThreadMatch(ticket, "subject-token", m.group(0))
    keyed = [("in-reply-to", mid) for mid in parsed.in_reply_to]
    keyed += [("references", mid) for mid in reversed(parsed.references)]
    for key, mid in keyed:
        tk = session.get(ThreadKey, mid)
        if tk is not None:
            ticket = session.get(Ticket, tk.ticket_id)
            if ticket is not None:
                return ThreadMatch(ticket, key, mid)
    return None


def customer_for(session: Session, email: str, name: str, now: datetime) -> Customer:
    """One customer record per mail address, whichever role address or channel it used."""
    customer = session.exec(select(Customer).where(Customer.email == email)).first()
    if customer is None:
        customer = Customer(email=email, name=name, created_at=now, last_seen_at=now)
        session.add(customer)
        session.flush()
    else:
        customer.last_seen_at = now
        if name and not customer.name:
            customer.name = name
    return customer


def add_article(session: Session, ticket: Ticket, inbound: Inbound, parsed: ParsedMail,
                now: datetime) -> Article:
    article = Article(
        ticket_id=ticket.id, inbound_id=inbound.id, kind=ArticleKind.IN,
        message_id=parsed.message_id, sender=parsed.sender_email or inbound.mail_from,
        sender_name=parsed.sender_name,
        recipients=[a for _, a in parsed.to] + [a for _, a in parsed.cc],
        subject=parsed.subject, body_text=parsed.text, body_html=parsed.html,
        malformed=parsed.malformed, defects=parsed.defects[:50], created_at=now)
    session.add(article)
    session.flush()
    for att in parsed.attachments:
        session.add(Attachment(article_id=article.id, filename=att.filename,
                               content_type=att.content_type, size=att.size, sha256=att.sha256,
                               inline=att.inline, data=att.data))
    if parsed.message_id and session.get(ThreadKey, parsed.message_id) is None:
        session.add(ThreadKey(message_id=parsed.message_id, ticket_id=ticket.id))
    return article


def open_ticket(session: Session, *, decision: Decision, customer: Customer, parsed: ParsedMail,
                inbound: Inbound, language: str | None, config_version: str | None,
                now: datetime) -> tuple[Ticket, Article]:
    ticket = Ticket(team=decision.team, priority=decision.priority,
                    subject=parsed.subject or "(no subject)", customer_id=customer.id,
                    address=decision.address, tag=decision.tag, language=language,
                    created_at=now, updated_at=now, last_customer_at=now,
                    config_version=config_version)
    session.add(ticket)
    session.flush()
    article = add_article(session, ticket, inbound, parsed, now)
    session.add(DecisionRow(ticket_id=ticket.id, inbound_id=inbound.id, kind="route",
                            team=decision.team, priority=decision.priority,
                            address=decision.address, tag=decision.tag, reason=decision.reason,
                            hits=decision.hits_json(), config_version=config_version,
                            created_at=now))
    session.add(Event(at=now, ticket_id=ticket.id, kind="created",
                      data={"team": decision.team, "address": decision.address,
                            "tag": decision.tag, "inbound_id": inbound.id}))
    return ticket, article


def thread_onto(session: Session, match: ThreadMatch, *, parsed: ParsedMail, inbound: Inbound,
                config_version: str | None, now: datetime) -> Article:
    ticket = match.ticket
    article = add_article(session, ticket, inbound, parsed, now)
    reopened = ticket.status in (TicketStatus.SOLVED, TicketStatus.CLOSED)
    previous = ticket.status
    if reopened:
        ticket.reopened += 1
        ticket.solved_at = None
    if ticket.status != TicketStatus.NEW:
        ticket.status = TicketStatus.OPEN
    ticket.updated_at = now
    ticket.last_customer_at = now
    session.add(DecisionRow(ticket_id=ticket.id, inbound_id=inbound.id, kind="thread",
                            team=ticket.team, priority=ticket.priority, address=ticket.address,
                            tag=ticket.tag,
                            reason=f"threaded by {match.key} {match.value}",
                            hits=[{"rule": "thread", "matched": True, "key": match.key,
                                   "value": match.value,
                                   "reason": f"{match.key} {match.value} names ticket "
                                             f"{ticket.id}"}],
                            config_version=config_version, created_at=now))
    session.add(Event(at=now, ticket_id=ticket.id,
                      kind="reopened" if reopened else "customer_reply",
                      data={"inbound_id": inbound.id, "by": match.key,
                            "previous_status": previous}))
    return article
