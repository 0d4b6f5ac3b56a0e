"""What agents do to tickets, shared by the console's forms and the REST API.

Every function works in the caller's session (one transaction per request: the caller
commits, then wakes the outbox worker and the escalation scheduler), checks the principal's
right to touch the ticket, and leaves an `Event` saying who did what.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import Any

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from router.accounts import Principal
from router.ack import reply_subject
from router.mail import msgid_list
from router.models import (
    Article,
    ArticleKind,
    Customer,
    Decision,
    Event,
    Inbound,
    Outbox,
    ThreadKey,
    Ticket,
    TicketStatus,
)
from router.outbox import enqueue
from router.route import format_token
from router.settings import Settings

PRIORITIES = ("low", "normal", "high", "urgent")
MAX_REFERENCES = 20
MAX_BODY = 200_000
MAX_TAGS = 20


class Forbidden(Exception):
    """The principal may not see or do this (HTTP 403)."""


class Invalid(Exception):
    """The request makes no sense (HTTP 400); the message is shown to the agent."""


class NotFound(Exception):
    """No such ticket (HTTP 404)."""


def load_ticket(session: Session, p: Principal, ticket_id: int) -> Ticket:
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise NotFound(f"no ticket {ticket_id}")
    if not p.can_see(ticket.team):
        raise Forbidden(f"ticket {ticket_id} belongs to a team you are not in")
    return ticket


def _event(session: Session, ticket: Ticket, kind: str, now: datetime, **data: Any) -> None:
    session.add(Event(at=now, ticket_id=ticket.id, kind=kind, data=data))


# ---------------------------------------------------------------------------- escalation glue

def _escalate() -> Any:
    try:
        from router import escalate
    except ImportError:  # pragma: no cover - escalation ships with the daemon
        return None
    return escalate


def _first_response(session: Session, ticket: Ticket, now: datetime, settings: Settings) -> None:
    esc = _escalate()
    hook = getattr(esc, "on_agent_reply", None) if esc else None
    if hook is not None:
        hook(session, ticket, now, settings=settings)
    else:
        from router.ack import record_first_response

        record_first_response(session, ticket, now)


def _set_status(session: Session, ticket: Ticket, status: str, now: datetime,
                settings: Settings) -> None:
    esc = _escalate()
    hook = getattr(esc, "on_status_change", None) if esc else None
    if hook is not None:
        hook(session, ticket, status, now, settings=settings)
        return
    ticket.status = status
    ticket.updated_at = now
    if status == TicketStatus.SOLVED and ticket.solved_at is None:
        ticket.solved_at = now
    session.add(ticket)


def _reschedule(session: Session, ticket: Ticket, settings: Settings) -> None:
    esc = _escalate()
    hook = getattr(esc, "reschedule", None) if esc else None
    if hook is not None:
        hook(session, ticket, settings)


# ---------------------------------------------------------------------------- reply

@dataclass(frozen=True)
class ReplyResult:
    article_id: int
    outbox_id: int
    message_id: str


def _threading(session: Session, ticket_id: int) -> tuple[Article | None, list[str]]:
    """The customer's last message and the References for an answer to it: its own
    References (read from the stored raw headers) followed by its Message-ID."""
    last = session.exec(select(Article).where(Article.ticket_id == ticket_id,
                                              Article.kind == ArticleKind.IN)
                        .order_by(col(Article.id).desc()).limit(1)).first()
    if last is None or not last.message_id:
        return last, []
    refs: list[str] = []
    if last.inbound_id is not None:
        inbound = session.get(Inbound, last.inbound_id)
        if inbound is not None:
            headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(inbound.raw)
            refs = msgid_list(" ".join(str(v) for v in headers.get_all("References") or []))
    refs = [r for r in refs if r != last.message_id]
    if len(refs) >= MAX_REFERENCES:
        refs = [refs[0], *refs[-(MAX_REFERENCES - 2):]]
    return last, [*refs, last.message_id]


def reply(session: Session, settings: Settings, p: Principal, ticket: Ticket, text: str,
          now: datetime, *, status_after: str = TicketStatus.PENDING) -> ReplyResult:
    """Answer the customer from the ticket's role address, threaded, through the outbox."""
    text = text.replace("\r\n", "\n").strip("\n")
    if not text.strip():
        raise Invalid("the reply is empty")
    if len(text) > MAX_BODY:
        raise Invalid(f"a reply may have at most {MAX_BODY} characters")
    if status_after not in (TicketStatus.OPEN, TicketStatus.PENDING, TicketStatus.SOLVED):
        raise Invalid("after a reply the ticket is open, pending or solved")
    assert ticket.id is not None
    customer = session.get(Customer, ticket.customer_id)
    assert customer is not None
    team = settings.team_by_name(ticket.team)
    last, references = _threading(session, ticket.id)
    token = format_token(settings, ticket.id)
    subject = reply_subject((last.subject if last and last.subject else ticket.subject), token)
    msg = EmailMessage()
    msg["From"] = Address(display_name=team.label if team else "", addr_spec=ticket.address)
    msg["To"] = Address(display_name=customer.name or "", addr_spec=customer.email)
    msg["Subject"] = subject
    if references:
        msg["In-Reply-To"] = references[-1]
        msg["References"] = " ".join(references)
    msg.set_content(text + "\n", cte="quoted-printable")
    row = enqueue(session, kind="reply", msg=msg, ticket_id=ticket.id,
                  customer_id=customer.id, now=now, hostname=settings.smtp.hostname)
    article = Article(ticket_id=ticket.id, kind=ArticleKind.OUT, automatic=False,
                      message_id=row.message_id, sender=ticket.address,
                      sender_name=team.label if team else "", recipients=[customer.email],
                      subject=subject, body_text=text, author=p.email, created_at=now)
    session.add(article)
    _first_response(session, ticket, now, settings)
    if ticket.status != status_after:
        _set_status(session, ticket, status_after, now, settings)
    ticket.updated_at = now
    if ticket.assignee is None:
        ticket.assignee = p.email      # who answers, owns (until someone reassigns)
    session.add(ticket)
    session.flush()
    assert article.id is not None and row.id is not None
    _event(session, ticket, "agent_reply", now, by=p.email, outbox_id=row.id,
           message_id=row.message_id, status=status_after)
    return ReplyResult(article.id, row.id, row.message_id)


# ---------------------------------------------------------------------------- the rest

def note(session: Session, p: Principal, ticket: Ticket, text: str, now: datetime) -> int:
    text = text.replace("\r\n", "\n").strip("\n")
    if not text.strip():
        raise Invalid("the note is empty")
    if len(text) > MAX_BODY:
        raise Invalid(f"a note may have at most {MAX_BODY} characters")
    assert ticket.id is not None
    article = Article(ticket_id=ticket.id, kind=ArticleKind.NOTE, sender=p.email,
                      subject="", body_text=text, author=p.email, created_at=now)
    session.add(article)
    ticket.updated_at = now
    session.add(ticket)
    session.flush()
    assert article.id is not None
    _event(session, ticket, "note", now, by=p.email, article_id=article.id)
    return article.id


def assign(session: Session, settings: Settings, p: Principal, ticket: Ticket,
           assignee: str | None, now: datetime) -> None:
    """Agents claim (or give back) tickets for themselves; leads and admins assign anyone of
    the ticket's team."""
    assignee = (assignee or "").strip().lower() or None
    if assignee is not None and assignee != p.email and not p.is_lead:
        raise Forbidden("only leads and admins assign tickets to someone else")
    if assignee is None and ticket.assignee not in (None, p.email) and not p.is_lead:
        raise Forbidden("only leads and admins take a ticket away from someone else")
    team = settings.team_by_name(ticket.team)
    if assignee is not None and (team is None or team.member(assignee) is None) \
            and not (assignee == p.email and p.is_admin):
        raise Invalid(f"{assignee} is not a member of team {ticket.team}")
    previous = ticket.assignee
    if previous == assignee:
        return
    ticket.assignee = assignee
    ticket.updated_at = now
    session.add(ticket)
    _event(session, ticket, "assigned", now, by=p.email, assignee=assignee, previous=previous)


def move(session: Session, settings: Settings, p: Principal, ticket: Ticket, team_name: str,
         now: datetime) -> None:
    """Hand the ticket to another team; recorded as a reroute decision (a training example
    for the classifier) and an event."""
    new = settings.team_by_name(team_name)
    if new is None:
        raise Invalid(f"no team {team_name!r}")
    old = ticket.team
    if new.name == old:
        return
    ticket.team = new.name
    if ticket.assignee and new.member(ticket.assignee) is None:
        ticket.assignee = None
    ticket.updated_at = now
    session.add(ticket)
    assert ticket.id is not None
    session.add(Decision(
        ticket_id=ticket.id, kind="reroute", team=new.name, priority=ticket.priority,
        address=ticket.address, tag=ticket.tag,
        reason=f"moved by {p.email} from {old} to {new.name}",
        hits=[{"rule": "agent", "matched": True, "reason": f"moved by {p.email}"}],
        config_version=settings.digest or None, created_at=now))
    _event(session, ticket, "moved", now, by=p.email, previous=old, team=new.name)
    _reschedule(session, ticket, settings)


def set_priority(session: Session, p: Principal, ticket: Ticket, priority: str,
                 now: datetime) -> None:
    if priority not in PRIORITIES:
        raise Invalid(f"priority must be one of {', '.join(PRIORITIES)}")
    if priority == ticket.priority:
        return
    previous = ticket.priority
    ticket.priority = priority
    ticket.updated_at = now
    session.add(ticket)
    _event(session, ticket, "priority", now, by=p.email, priority=priority, previous=previous)


def set_tags(session: Session, p: Principal, ticket: Ticket, text: str, now: datetime) -> None:
    tags: list[str] = []
    for raw in text.replace(";", ",").split(","):
        tag = " ".join(raw.split()).lower()[:64]
        if tag and tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise Invalid(f"at most {MAX_TAGS} tags")
    if tags == list(ticket.tags or []):
        return
    previous = list(ticket.tags or [])
    ticket.tags = tags
    ticket.updated_at = now
    session.add(ticket)
    _event(session, ticket, "tags", now, by=p.email, tags=tags, previous=previous)


ACTIONS = {"solve": TicketStatus.SOLVED, "close": TicketStatus.CLOSED,
           "reopen": TicketStatus.OPEN, "pending": TicketStatus.PENDING,
           "open": TicketStatus.OPEN}


def change_status(session: Session, settings: Settings, p: Principal, ticket: Ticket,
                  action: str, now: datetime) -> None:
    status = ACTIONS.get(action)
    if status is None:
        raise Invalid(f"unknown action {action!r}")
    previous = ticket.status
    if previous == status:
        return
    if action == "reopen":
        if previous not in (TicketStatus.SOLVED, TicketStatus.CLOSED):
            raise Invalid("only a solved or closed ticket can be reopened")
        ticket.reopened += 1
        ticket.solved_at = None
    _set_status(session, ticket, status, now, settings)
    ticket.updated_at = now
    session.add(ticket)
    _event(session, ticket, "status", now, by=p.email, status=status, previous=previous)


def merge(session: Session, settings: Settings, p: Principal, source: Ticket, target: Ticket,
          now: datetime) -> int:
    """Move the source's thread (articles, their attachments, thread keys) to the target and
    close the source. Replies to any mail of the source then thread onto the target."""
    if source.id == target.id:
        raise Invalid("a ticket cannot be merged into itself")
    if target.status == TicketStatus.CLOSED and target.id is not None:
        raise Invalid(f"ticket {target.id} is closed; reopen it first")
    moved = session.exec(select(func.count()).select_from(Article)
                         .where(Article.ticket_id == source.id)).one()
    session.execute(update(Article).where(col(Article.ticket_id) == source.id)
                    .values(ticket_id=target.id))
    session.execute(update(ThreadKey).where(col(ThreadKey.ticket_id) == source.id)
                    .values(ticket_id=target.id))
    # Outbox rows stay with the source: they are the record of what was sent for it.
    target.last_customer_at = max(target.last_customer_at, source.last_customer_at)
    target.updated_at = now
    session.add(target)
    _set_status(session, source, TicketStatus.CLOSED, now, settings)
    source.updated_at = now
    session.add(source)
    _event(session, source, "merged_into", now, by=p.email, target=target.id,
           articles=int(moved))
    _event(session, target, "merged", now, by=p.email, source=source.id, articles=int(moved))
    return int(moved)


def outbox_message_id(session: Session, outbox_id: int) -> str | None:
    row = session.get(Outbox, outbox_id)
    return row.message_id if row else None
