"""Thread a message onto its ticket or open one, in the caller's transaction.

Threading keys, tried in this order; the first that names an existing ticket wins:
1. the ticket token in the subject (``[#1234]``, format from ``router.ticket_token``);
2. In-Reply-To, then References from newest to oldest, looked up in `thread_key`, which
   holds every Message-ID of a ticket: the customer's and every mail we sent;
3. the message's own Message-ID, when a reply to it arrived first and opened a ticket (an
   `awaited` key of that ticket).
A reply never opens a new ticket when one of these matches; a reply to a solved or closed
ticket reopens it.

This is the pipeline's hot path, so it speaks SQLAlchemy Core on the model tables, statements
built once and run through `router.fastsql`: the ORM costs 5–15× per row here (PERF-NOTES),
`Connection.execute` still 3×, and a message touches about ten rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, bindparam, case, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from router import fastsql
from router.classify import Decision
from router.mail import ParsedMail
from router.models import (
    T_ARTICLE,
    T_ATTACHMENT,
    T_CUSTOMER,
    T_DECISION,
    T_EVENT,
    T_THREAD_KEY,
    T_TICKET,
    ArticleKind,
    TicketStatus,
)
from router.settings import Settings

# Built once: constructing a statement per call costs more than executing it.
_SEL_TICKET = select(T_TICKET).where(T_TICKET.c.id == bindparam("tid"))
_SEL_TICKET_STATUS = select(T_TICKET.c.id, T_TICKET.c.status).where(
    T_TICKET.c.id == bindparam("tid"))
_SEL_THREAD = (select(T_THREAD_KEY.c.message_id, T_THREAD_KEY.c.awaited, T_TICKET.c.id,
                      T_TICKET.c.status)
               .join(T_TICKET, T_TICKET.c.id == T_THREAD_KEY.c.ticket_id)
               .where(T_THREAD_KEY.c.message_id.in_(bindparam("mids", expanding=True))))
# A customer's reply: a new ticket stays new, any other becomes open, a solved or closed
# one counts a reopening. In SQL, so it holds against the row as it is now; the row this
# update leaves is what the hooks after routing read.
_DONE = T_TICKET.c.status.in_([TicketStatus.SOLVED, TicketStatus.CLOSED])
_UPD_REPLIED = update(T_TICKET).where(T_TICKET.c.id == bindparam("tid")).values(
    updated_at=bindparam("at"), last_customer_at=bindparam("at"),
    status=case((T_TICKET.c.status == TicketStatus.NEW, TicketStatus.NEW),
                else_=TicketStatus.OPEN),
    reopened=case((_DONE, T_TICKET.c.reopened + 1), else_=T_TICKET.c.reopened),
    solved_at=case((_DONE, None), else_=T_TICKET.c.solved_at)).returning(*T_TICKET.c)
_INS_TICKET = insert(T_TICKET).returning(T_TICKET.c.id)
_INS_ARTICLE = insert(T_ARTICLE).returning(T_ARTICLE.c.id)
_INS_ATTACH = insert(T_ATTACHMENT)
_INS_DECISION = insert(T_DECISION)
_INS_EVENT = insert(T_EVENT)

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
    ticket_id: int
    status: str
    key: str        # subject-token | in-reply-to | references | message-id
    value: str


def find_thread(conn: Connection, parsed: ParsedMail, settings: Settings) -> ThreadMatch | None:
    for m in token_pattern(settings.router.ticket_token).finditer(parsed.subject):
        row = fastsql.execute(conn, _SEL_TICKET_STATUS, {"tid": int(m.group(1))}).first()
        if row is not None:
            return ThreadMatch(row.id, row.status, "subject-token", m.group(0))
    keyed = [("in-reply-to", mid) for mid in parsed.in_reply_to]
    keyed += [("references", mid) for mid in reversed(parsed.references)]
    if parsed.message_id:
        keyed.append(("message-id", parsed.message_id))
    if not keyed:
        return None
    found = {r.message_id: r for r in fastsql.execute(
        conn, _SEL_THREAD, {"mids": [mid for _, mid in keyed]})}
    for key, mid in keyed:
        row = found.get(mid)
        # A message's own id threads only where a reply awaits it; a reply's ids only where
        # a message of the ticket has that id (not where a reply awaits it).
        if row is not None and row.awaited == (key == "message-id"):
            return ThreadMatch(row.id, row.status, key, mid)
    return None


@dataclass
class CustomerRef:
    """The customer's record as routing last wrote it: every column, in `row`."""

    row: dict[str, Any]

    @property
    def id(self) -> int:
        return int(self.row["id"])

    @property
    def email(self) -> str:
        return str(self.row["email"])

    @property
    def name(self) -> str:
        return str(self.row["name"])

    @property
    def language(self) -> str | None:
        return self.row["language"]


def customer_for(conn: Connection, email: str, name: str, now: datetime) -> CustomerRef:
    """One customer record per mail address, whichever role address or channel it used.
    One upsert: atomic when two instances meet the same new customer (PostgreSQL), and
    it returns the whole row."""
    row = fastsql.execute(conn, _upsert_customer(conn.dialect.name), {
        "email": email, "name": name, "language": None, "vip": False, "created_at": now,
        "last_seen_at": now, "attributes": {}}).one()
    return CustomerRef(dict(row._mapping))


def _dialect(name: str) -> Any:
    return postgresql if name == "postgresql" else sqlite


@lru_cache(maxsize=4)
def _upsert_customer(dialect_name: str) -> Any:
    stmt = _dialect(dialect_name).insert(T_CUSTOMER)
    return stmt.on_conflict_do_update(
        index_elements=[T_CUSTOMER.c.email],
        # A name once known stays; the first one given fills an empty one.
        set_={"last_seen_at": stmt.excluded.last_seen_at,
              "name": case((T_CUSTOMER.c.name == "", stmt.excluded.name),
                           else_=T_CUSTOMER.c.name)},
    ).returning(*T_CUSTOMER.c)


@lru_cache(maxsize=8)
def _insert_ignore(dialect_name: str, table: Any) -> Any:
    return _dialect(dialect_name).insert(table).on_conflict_do_nothing()


@lru_cache(maxsize=4)
def _insert_key(dialect_name: str) -> Any:
    """A message's thread key. Built once per dialect: every message writes one. The key of
    a message awaited by a reply's ticket becomes the message's own, on the ticket it
    joined; a key a message of a ticket already has stays as it is."""
    stmt = _dialect(dialect_name).insert(T_THREAD_KEY)
    return stmt.on_conflict_do_update(
        index_elements=[T_THREAD_KEY.c.message_id],
        set_={"ticket_id": stmt.excluded.ticket_id, "awaited": False},
        where=T_THREAD_KEY.c.awaited)


@dataclass
class Written:
    """What routing wrote: the rows' ids and every column of the ticket and the article, so
    the hooks that follow need not read them back."""

    ticket_id: int
    article_id: int
    ticket: dict[str, Any]
    article: dict[str, Any]
    previous_status: str | None = None  # of a ticket threaded onto, before this message


def add_article(conn: Connection, ticket_id: int, inbound: Any, parsed: ParsedMail,
                now: datetime) -> dict[str, Any]:
    """Store the message as an article of the ticket; returns the article's row."""
    values: dict[str, Any] = {
        "ticket_id": ticket_id, "inbound_id": inbound.id, "kind": ArticleKind.IN,
        "automatic": False, "message_id": parsed.message_id,
        "sender": parsed.sender_email or inbound.mail_from, "sender_name": parsed.sender_name,
        "recipients": [a for _, a in parsed.to] + [a for _, a in parsed.cc],
        "subject": parsed.subject, "body_text": parsed.text, "body_html": parsed.html,
        "author": None, "malformed": parsed.malformed, "defects": parsed.defects[:50],
        "created_at": now}
    article_id: int = fastsql.execute(conn, _INS_ARTICLE, values).scalar_one()
    values["id"] = article_id
    if parsed.attachments:
        fastsql.execute(conn, _INS_ATTACH, [
            {"article_id": article_id, "filename": a.filename, "content_type": a.content_type,
             "size": a.size, "sha256": a.sha256, "inline": a.inline, "data": a.data}
            for a in parsed.attachments])
    if parsed.message_id:
        fastsql.execute(conn, _insert_key(conn.dialect.name),
                        {"message_id": parsed.message_id, "ticket_id": ticket_id})
    return values


def _await_parents(conn: Connection, ticket_id: int, parsed: ParsedMail) -> None:
    """The ids a ticket's first message answered, none of them known: should one of those
    messages arrive later, it joins this ticket instead of opening one of its own."""
    named = dict.fromkeys([*parsed.in_reply_to, *parsed.references])
    named.pop(parsed.message_id, None)
    if named:
        fastsql.execute(conn, _insert_ignore(conn.dialect.name, T_THREAD_KEY),
                        [{"message_id": mid, "ticket_id": ticket_id, "awaited": True}
                         for mid in named])


def open_ticket(conn: Connection, *, decision: Decision, customer: CustomerRef,
                parsed: ParsedMail, inbound: Any, language: str | None,
                config_version: str | None, now: datetime) -> Written:
    ticket: dict[str, Any] = {
        "team": decision.team, "status": TicketStatus.NEW, "priority": decision.priority,
        "subject": parsed.subject or "(no subject)", "customer_id": customer.id,
        "address": decision.address, "tag": decision.tag, "language": language,
        "assignee": None, "created_at": now, "updated_at": now, "last_customer_at": now,
        "first_response_at": None, "solved_at": None, "reopened": 0, "promised_at": None,
        "promise_basis": None, "promise_kept": None, "next_due_at": None,
        "config_version": config_version, "tags": list(decision.tags),
        "campaign": decision.campaign.campaign.name if decision.campaign else None}
    ticket_id: int = fastsql.execute(conn, _INS_TICKET, ticket).scalar_one()
    ticket["id"] = ticket_id
    article = add_article(conn, ticket_id, inbound, parsed, now)
    _await_parents(conn, ticket_id, parsed)
    fastsql.execute(conn, _INS_DECISION, {
        "ticket_id": ticket_id, "inbound_id": inbound.id, "kind": "route",
        "team": decision.team, "priority": decision.priority, "address": decision.address,
        "tag": decision.tag, "reason": decision.reason, "hits": decision.hits_json(),
        "config_version": config_version, "created_at": now})
    fastsql.execute(conn, _INS_EVENT, {
        "at": now, "ticket_id": ticket_id, "kind": "created",
        "data": {"team": decision.team, "address": decision.address, "tag": decision.tag,
                 "inbound_id": inbound.id, "priority": decision.priority,
                 "tags": list(decision.tags), "routed_by": decision.routed_by}})
    return Written(ticket_id, article["id"], ticket, article)


def _thread_reason(match: ThreadMatch) -> str:
    if match.key == "message-id":
        return (f"a reply to this message ({match.value}) arrived before it and opened "
                f"ticket {match.ticket_id}")
    return f"{match.key} {match.value} names ticket {match.ticket_id}"


def thread_onto(conn: Connection, match: ThreadMatch, *, parsed: ParsedMail, inbound: Any,
                config_version: str | None, now: datetime) -> Written:
    ticket = fastsql.execute(conn, _SEL_TICKET, {"tid": match.ticket_id}).one()
    article = add_article(conn, ticket.id, inbound, parsed, now)
    reopened = ticket.status in (TicketStatus.SOLVED, TicketStatus.CLOSED)
    fresh = fastsql.execute(conn, _UPD_REPLIED, {"tid": ticket.id, "at": now}).one()
    fastsql.execute(conn, _INS_DECISION, {
        "ticket_id": ticket.id, "inbound_id": inbound.id, "kind": "thread",
        "team": ticket.team, "priority": ticket.priority, "address": ticket.address,
        "tag": ticket.tag, "reason": f"threaded by {match.key} {match.value}",
        "hits": [{"rule": "thread", "matched": True, "key": match.key, "value": match.value,
                  "reason": _thread_reason(match)}],
        "config_version": config_version, "created_at": now})
    fastsql.execute(conn, _INS_EVENT, {
        "at": now, "ticket_id": ticket.id,
        "kind": "reopened" if reopened else "customer_reply",
        "data": {"inbound_id": inbound.id, "by": match.key,
                 "previous_status": ticket.status}})
    return Written(ticket.id, article["id"], dict(fresh._mapping), article, ticket.status)
