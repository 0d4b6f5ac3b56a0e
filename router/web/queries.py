"""Read side of the console and the API: queues by keyset, one ticket, one customer.

Queue pages never OFFSET and never count the whole table. A page is the merge of one small
index range scan per (team, status) pair: ``WHERE team = ? AND status = ? [AND key < cursor]
ORDER BY key LIMIT n+1`` on ``ix_ticket_team_status_id`` / ``ix_ticket_team_status_updated``,
so its cost depends on the page size, not on the number of tickets. Counts per status come
from one GROUP BY over the (team, status) index restricted to the principal's teams.
Filters other than team and status (priority, assignee, tag) are applied inside those scans.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nh3
from sqlalchemy import func, tuple_
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from router.accounts import Principal
from router.models import (
    Article,
    Attachment,
    Customer,
    Decision,
    Event,
    SlaClock,
    Ticket,
    TicketStatus,
)
from router.queues import ticket_dict
from router.settings import Settings

ACTIVE = (TicketStatus.NEW, TicketStatus.OPEN, TicketStatus.PENDING)
SORTS = ("newest", "oldest", "updated")
MAX_PAGE = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------- sanitising

_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "code", "dd", "del", "div", "dl", "dt",
    "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "ins", "kbd", "li", "ol", "p",
    "pre", "q", "s", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td",
    "tfoot", "th", "thead", "tr", "tt", "u", "ul",
}
_ATTRS: dict[str, set[str]] = {
    "a": {"href", "title"}, "td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"},
    "ol": {"start"},
}


def sanitize_html(html: str) -> str:
    """Customer HTML made inert: an allow-list of formatting tags, no scripts, no event
    handlers, no styles, no images (remote images are tracking pixels), only http(s) and
    mailto links, which open in a new context without referrer or opener."""
    return nh3.clean(html, tags=_TAGS, attributes=_ATTRS, url_schemes={"http", "https", "mailto"},
                     link_rel="noopener noreferrer nofollow", strip_comments=True,
                     clean_content_tags={"script", "style", "title", "head"})


# ---------------------------------------------------------------------------- queues

@dataclass(frozen=True)
class QueueFilter:
    teams: tuple[str, ...]
    statuses: tuple[str, ...] = ACTIVE
    priority: str | None = None
    assignee: str | None = None        # an address, "none" for unassigned
    tag: str | None = None             # plus-address tag or campaign
    sort: str = "newest"
    limit: int = 50


@dataclass(frozen=True)
class Cursor:
    id: int
    updated_at: datetime | None = None

    def encode(self) -> str:
        # URL-safe as it is: microseconds since the epoch, "~", the id.
        if self.updated_at is None:
            return str(self.id)
        micros = (self.updated_at - _EPOCH) // timedelta(microseconds=1)
        return f"{micros}~{self.id}"

    @staticmethod
    def decode(text: str | None) -> Cursor | None:
        if not text:
            return None
        try:
            if "~" in text:
                when, _, ident = text.partition("~")
                return Cursor(int(ident), _EPOCH + timedelta(microseconds=int(when)))
            return Cursor(int(text))
        except (ValueError, OverflowError):
            return None


def _scan(session: Session, team: str, status: str, f: QueueFilter, after: Cursor | None,
          n: int) -> list[Ticket]:
    q = select(Ticket).where(Ticket.team == team, Ticket.status == status)
    if f.priority:
        q = q.where(Ticket.priority == f.priority)
    if f.assignee == "none":
        q = q.where(col(Ticket.assignee).is_(None))
    elif f.assignee:
        q = q.where(Ticket.assignee == f.assignee)
    if f.tag:
        q = q.where((Ticket.tag == f.tag) | (Ticket.campaign == f.tag))
    if f.sort == "updated":
        if after is not None and after.updated_at is not None:
            q = q.where(tuple_(col(Ticket.updated_at), col(Ticket.id))
                        < tuple_(after.updated_at, after.id))
        q = q.order_by(col(Ticket.updated_at).desc(), col(Ticket.id).desc())
    elif f.sort == "oldest":
        if after is not None:
            q = q.where(col(Ticket.id) > after.id)
        q = q.order_by(col(Ticket.id))
    else:
        if after is not None:
            q = q.where(col(Ticket.id) < after.id)
        q = q.order_by(col(Ticket.id).desc())
    return list(session.exec(q.limit(n)).all())


def _key(f: QueueFilter, t: Ticket) -> tuple[Any, ...]:
    assert t.id is not None
    if f.sort == "updated":
        return (-t.updated_at.timestamp(), -t.id)
    return (t.id,) if f.sort == "oldest" else (-t.id,)


def queue(session: Session, f: QueueFilter, after: Cursor | None, now: datetime
          ) -> tuple[list[dict[str, Any]], Cursor | None]:
    """One page of tickets (TICKET dicts from router.queues plus web fields) and the cursor of
    the next page, or None at the end."""
    n = max(1, min(f.limit, MAX_PAGE))
    runs = [_scan(session, team, status, f, after, n + 1)
            for team in f.teams for status in f.statuses]
    merged = list(heapq.merge(*runs, key=lambda t: _key(f, t)))[: n + 1]
    more = len(merged) > n
    page = merged[:n]
    nxt = None
    if more and page:
        last = page[-1]
        assert last.id is not None
        nxt = Cursor(last.id, last.updated_at if f.sort == "updated" else None)
    return decorate(session, page, now), nxt


def decorate(session: Session, tickets: list[Ticket], now: datetime) -> list[dict[str, Any]]:
    """TICKET dicts for a page of tickets: three indexed IN queries, whatever the page."""
    if not tickets:
        return []
    ids = [t.id for t in tickets]
    customers = {c.id: c for c in session.exec(
        select(Customer).where(col(Customer.id).in_({t.customer_id for t in tickets}))).all()}
    counts = dict(session.exec(select(Article.ticket_id, func.count())
                               .where(col(Article.ticket_id).in_(ids))
                               .group_by(col(Article.ticket_id))).all())
    clocks: dict[int, list[SlaClock]] = {}
    for c in session.exec(select(SlaClock).where(col(SlaClock.ticket_id).in_(ids))).all():
        clocks.setdefault(c.ticket_id, []).append(c)
    out = []
    for t in tickets:
        d = ticket_dict(t, customers[t.customer_id], counts.get(t.id or 0, 0))
        d.update(web_fields(t, clocks.get(t.id or 0, []), now))
        out.append(d)
    return out


def web_fields(t: Ticket, clocks: list[SlaClock], now: datetime) -> dict[str, Any]:
    """Fields the console adds to TICKET: tags, campaign, age, SLA state and next deadline."""
    deadlines = [c.deadline_at for c in clocks if c.deadline_at is not None]
    breached = any(c.breached for c in clocks)
    due = min(deadlines) if deadlines else None
    if t.first_response_at is None and t.promised_at is not None and (
            due is None or t.promised_at < due):
        due = t.promised_at
    if t.status in (TicketStatus.SOLVED, TicketStatus.CLOSED):
        state = "done"
    elif breached or (due is not None and due < now):
        state = "breached"
    elif due is not None and due - now < timedelta(hours=1):
        state = "due soon"
    elif t.first_response_at is not None:
        state = "answered"
    elif due is not None:
        state = "on track"
    else:
        state = "no target"
    return {"tags": list(t.tags or []), "campaign": t.campaign,
            "age_seconds": max(0, int((now - t.created_at).total_seconds())),
            "sla_state": state, "sla_due_at": due.isoformat() if due else None,
            "next_due_at": t.next_due_at.isoformat() if t.next_due_at else None}


def counts(session: Session, teams: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{team: {status: n}} for the principal's teams (indexed GROUP BY)."""
    out: dict[str, dict[str, int]] = {t: dict.fromkeys(TicketStatus.ALL, 0) for t in teams}
    if not teams:
        return out
    rows = session.exec(select(Ticket.team, Ticket.status, func.count())
                        .where(col(Ticket.team).in_(teams))
                        .group_by(col(Ticket.team), col(Ticket.status))).all()
    for team, status, n in rows:
        out.setdefault(team, {})[status] = int(n)
    return out


# ---------------------------------------------------------------------------- one ticket

@dataclass
class Message:
    article: Article
    html: str | None                  # sanitised
    attachments: list[Attachment]


def ticket_view(session: Session, settings: Settings, p: Principal, ticket: Ticket,
                now: datetime) -> dict[str, Any]:
    assert ticket.id is not None
    customer = session.get(Customer, ticket.customer_id)
    assert customer is not None
    articles = list(session.exec(select(Article).where(Article.ticket_id == ticket.id)
                                 .order_by(col(Article.id))).all())
    atts: dict[int, list[Attachment]] = {}
    if articles:
        # Without the bytes: only the download reads them.
        no_bytes = defer(Attachment.data)  # type: ignore[arg-type]
        for a in session.exec(select(Attachment).options(no_bytes).where(
                col(Attachment.article_id).in_([x.id for x in articles]))).all():
            atts.setdefault(a.article_id, []).append(a)
    messages = [Message(a, sanitize_html(a.body_html) if a.body_html else None,
                        atts.get(a.id or 0, [])) for a in articles]
    decisions = list(session.exec(select(Decision).where(Decision.ticket_id == ticket.id)
                                  .order_by(col(Decision.id))).all())
    events = list(session.exec(select(Event).where(Event.ticket_id == ticket.id)
                               .order_by(col(Event.id))).all())
    clocks = list(session.exec(select(SlaClock).where(SlaClock.ticket_id == ticket.id)).all())
    try:
        from router.escalate import history
        escalations = history(session, ticket.id)
    except ImportError:  # pragma: no cover
        escalations = []
    history_rows = customer_tickets(session, p, customer.id or 0, limit=50)
    team = settings.team_by_name(ticket.team)
    campaign = next((c for c in settings.campaign
                     if c.name in (ticket.campaign, ticket.tag) or
                     (ticket.tag is not None and c.tag == ticket.tag)), None)
    return {"ticket": ticket, "customer": customer, "messages": messages,
            "decisions": decisions, "events": events, "clocks": clocks,
            "escalations": escalations, "history": history_rows,
            "team": team, "campaign": campaign,
            "sla": web_fields(ticket, clocks, now),
            "members": [m for m in team.members] if team else [],
            "teams": [t for t in settings.team]}


def customer_tickets(session: Session, p: Principal, customer_id: int, limit: int = 100
                     ) -> list[dict[str, Any]]:
    """The customer's tickets across every role address and team, newest first. Tickets of
    teams the principal is not in are listed without their subject."""
    rows = session.exec(select(Ticket).where(Ticket.customer_id == customer_id)
                        .order_by(col(Ticket.id).desc()).limit(limit)).all()
    return [{"id": t.id, "team": t.team, "status": t.status, "address": t.address,
             "created_at": t.created_at, "visible": p.can_see(t.team),
             "subject": t.subject if p.can_see(t.team) else None} for t in rows]
