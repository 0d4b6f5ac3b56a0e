"""`router tickets ...`: the queues from the command line.

JSON shapes (stable; fields are only ever added):
- list: ``{"tickets": [TICKET, ...], "count": N}``
- TICKET: ``{"id", "team", "status", "priority", "subject", "customer": {"id", "email",
  "name"}, "address", "tag", "language", "assignee", "created_at", "updated_at",
  "first_response_at", "promised_at", "promise_basis", "promise_kept", "messages",
  "next_due_at"}``; with ``--overdue`` also ``"overdue": [{"clock", "deadline_at",
  "overdue_s"}]`` (running SLA clocks past their target)
- show: TICKET plus ``"messages": [MESSAGE...]``, ``"decisions": [DECISION...]``,
  ``"events": [...]``, ``"customer_tickets": [{"id", "team", "status", "subject", "address"}]``,
  ``"sla": [{"clock", "cycle", "state", "started_at", "elapsed_s", "target_s", "deadline_at",
  "stopped_at", "breached", "business_hours"}]``, ``"escalations": [{"clock", "cycle", "step",
  "team", "status", "due_at", "fired_at", "late_s", "notified", "priority", "reassigned",
  "webhook"}]``
- parked: ``{"parked": [{"inbound_id", "received_at", "channel", "mail_from", "rcpt_to",
  "attempts", "error"}]}``
Times are ISO 8601 in UTC.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from router import db, escalate, sla
from router.models import (
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
from router.settings import Settings


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    # `-c` may come before or after the subcommand; a default here would overwrite the value
    # given before it (`router tickets -c FILE list`), so the inner parsers have none.
    inner = argparse.ArgumentParser(add_help=False)
    inner.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="router.toml to use (default: $ROUTER_CONFIG or ./router.toml)")
    sub = parser.add_subparsers(dest="tickets_command", required=True)
    p = sub.add_parser("list", parents=[inner], help="tickets in the queues")
    p.add_argument("--team")
    p.add_argument("--status", choices=[*TicketStatus.ALL, "active"],
                   help="active = new, open or pending")
    p.add_argument("--customer", help="all tickets of one customer (mail address)")
    p.add_argument("--overdue", action="store_true",
                   help="only tickets with an SLA clock running past its target")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", parents=[inner], help="one ticket with its thread")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("move", parents=[inner],
                       help="move a ticket to another team (a correction the classifier "
                            "learns from)")
    p.add_argument("id", type=int)
    p.add_argument("team")
    p.add_argument("--by", help="the agent making the correction (mail address)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("parked", parents=[inner],
                       help="messages the pipeline could not process")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("retry", parents=[inner], help="put parked messages back in line")
    p.add_argument("ids", type=int, nargs="*", help="inbound ids (default: all parked)")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def ticket_dict(t: Ticket, c: Customer, messages: int) -> dict[str, Any]:
    return {
        "id": t.id, "team": t.team, "status": t.status, "priority": t.priority,
        "subject": t.subject,
        "customer": {"id": c.id, "email": c.email, "name": c.name},
        "address": t.address, "tag": t.tag, "language": t.language, "assignee": t.assignee,
        "created_at": _iso(t.created_at), "updated_at": _iso(t.updated_at),
        "first_response_at": _iso(t.first_response_at), "promised_at": _iso(t.promised_at),
        "promise_basis": t.promise_basis, "promise_kept": t.promise_kept,
        "messages": messages, "next_due_at": _iso(t.next_due_at),
    }


def list_tickets(session: Session, *, team: str | None = None, status: str | None = None,
                 customer: str | None = None, limit: int = 50, overdue: bool = False,
                 now: datetime | None = None) -> list[dict[str, Any]]:
    counts = (select(Article.ticket_id, func.count().label("n"))
              .group_by(Article.ticket_id).subquery())
    q = (select(Ticket, Customer, counts.c.n)
         .join(Customer, Customer.id == Ticket.customer_id)  # type: ignore[arg-type]
         .join(counts, counts.c.ticket_id == Ticket.id, isouter=True))
    if team:
        q = q.where(Ticket.team == team)
    if status == "active":
        q = q.where(col(Ticket.status).in_([TicketStatus.NEW, TicketStatus.OPEN,
                                            TicketStatus.PENDING]))
    elif status:
        q = q.where(Ticket.status == status)
    if customer:
        q = q.where(Customer.email == customer.strip().lower())
    late: dict[int, list[SlaClock]] = {}
    if overdue:
        now = now or datetime.now(UTC)
        late = sla.overdue_ticket_ids(session, now)
        q = q.where(col(Ticket.id).in_(sorted(late)))
    q = q.order_by(col(Ticket.id).desc()).limit(limit)
    rows = [ticket_dict(t, c, n or 0) for t, c, n in session.exec(q).all()]
    if overdue:
        assert now is not None
        for r in rows:
            r["overdue"] = [
                {"clock": c.clock, "deadline_at": _iso(c.deadline_at),
                 "overdue_s": round((now - c.deadline_at).total_seconds())}
                for c in sorted(late[r["id"]], key=lambda c: c.clock) if c.deadline_at]
        # The longest-waiting first: that is the order to work them in.
        rows.sort(key=lambda r: -max(o["overdue_s"] for o in r["overdue"]))
    return rows


def show_ticket(session: Session, ticket_id: int, settings: Settings | None = None,
                now: datetime | None = None) -> dict[str, Any] | None:
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        return None
    customer = session.get(Customer, ticket.customer_id)
    assert customer is not None
    articles = session.exec(select(Article).where(Article.ticket_id == ticket_id)
                            .order_by(col(Article.id))).all()
    out = ticket_dict(ticket, customer, len(articles))
    messages = []
    for a in articles:
        atts = session.exec(select(Attachment).where(Attachment.article_id == a.id)).all()
        messages.append({
            "id": a.id, "kind": a.kind, "automatic": a.automatic, "message_id": a.message_id,
            "from": a.sender, "from_name": a.sender_name, "to": a.recipients,
            "subject": a.subject, "text": a.body_text, "created_at": _iso(a.created_at),
            "malformed": a.malformed, "defects": a.defects,
            "attachments": [{"filename": x.filename, "content_type": x.content_type,
                             "size": x.size, "sha256": x.sha256} for x in atts]})
    out["messages"] = messages
    out["decisions"] = [
        {"kind": d.kind, "team": d.team, "priority": d.priority, "address": d.address,
         "tag": d.tag, "reason": d.reason, "hits": d.hits, "config_version": d.config_version,
         "created_at": _iso(d.created_at)}
        for d in session.exec(select(Decision).where(Decision.ticket_id == ticket_id)
                              .order_by(col(Decision.id))).all()]
    out["events"] = [
        {"at": _iso(e.at), "kind": e.kind, "data": e.data}
        for e in session.exec(select(Event).where(Event.ticket_id == ticket_id)
                              .order_by(col(Event.id))).all()]
    out["customer_tickets"] = [
        {"id": t.id, "team": t.team, "status": t.status, "subject": t.subject,
         "address": t.address}
        for t in session.exec(select(Ticket).where(Ticket.customer_id == customer.id)
                              .order_by(col(Ticket.id))).all()]
    team = settings.team_by_name(ticket.team) if settings is not None else None
    out["sla"] = [sla.view(c, team, now or datetime.now(UTC)).as_dict()
                  for c in sorted(sla.clocks(session, ticket_id).values(),
                                  key=lambda c: sla.CLOCK_ORDER.get(c.clock, 9))]
    out["escalations"] = escalate.history(session, ticket_id)
    return out


def parked(session: Session) -> list[dict[str, Any]]:
    rows = session.exec(select(Inbound).where(Inbound.status == InboundStatus.PARKED)
                        .order_by(col(Inbound.id))).all()
    return [{"inbound_id": r.id, "received_at": _iso(r.received_at), "channel": r.channel,
             "mail_from": r.mail_from, "rcpt_to": r.rcpt_to, "attempts": r.attempts,
             "error": r.error} for r in rows]


def _print_ticket_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no tickets")
        return
    print(f"{'ID':>6}  {'TEAM':<10} {'STATUS':<8} {'PRIO':<7} {'MSGS':>4}  {'CUSTOMER':<28} "
          "SUBJECT")
    for r in rows:
        print(f"{r['id']:>6}  {r['team']:<10} {r['status']:<8} {r['priority']:<7} "
              f"{r['messages']:>4}  {r['customer']['email'][:28]:<28} {r['subject'][:60]}")
        for o in r.get("overdue", []):
            print(f"{'':>8}overdue: {o['clock']} by {_duration(o['overdue_s'])} "
                  f"(target {o['deadline_at']})")


def _print_ticket(t: dict[str, Any]) -> None:
    print(f"Ticket {t['id']}: {t['subject']}")
    print(f"  team {t['team']}  status {t['status']}  priority {t['priority']}  "
          f"via {t['address']}" + (f" (tag {t['tag']})" if t["tag"] else ""))
    c = t["customer"]
    print(f"  customer {c['name'] + ' ' if c['name'] else ''}<{c['email']}>")
    if t["promised_at"]:
        kept = {True: "kept", False: "broken", None: "open"}[t["promise_kept"]]
        print(f"  promised first answer by {t['promised_at']} ({t['promise_basis']}; {kept})")
    for d in t["decisions"]:
        print(f"  decision [{d['kind']}] {d['reason']}")
    for c in t.get("sla", []):
        hours = " business" if c["business_hours"] else ""
        target = f" of {_duration(c['target_s'])}" if c["target_s"] is not None else ""
        state = c["state"] + (f" since {c['stopped_at']}" if c["stopped_at"] else "")
        due = f", target {c['deadline_at']}" if c["deadline_at"] else ""
        print(f"  sla {c['clock']}" + (f" #{c['cycle']}" if c["cycle"] else "")
              + f": {state}, {_duration(c['elapsed_s'])}{target}{hours}{due}"
              + (" BREACHED" if c["breached"] else ""))
    if t.get("escalations"):
        print("\n  escalations:")
        for e in t["escalations"]:
            did = []
            if e["notified"]:
                did.append("notified " + ", ".join(e["notified"]))
            if e["priority"]:
                did.append(f"priority {e['priority']['from']} -> {e['priority']['to']}")
            if e["reassigned"]:
                did.append(f"reassigned {e['reassigned']['from']} -> {e['reassigned']['to']}")
            if e["webhook"]:
                did.append(f"webhook {e['webhook']['status']}")
            late = f" ({_duration(e['late_s'])} late)" if e["late_s"] >= 60 else ""
            print(f"    {e['fired_at']} {e['clock']}"
                  + (f" #{e['cycle']}" if e["cycle"] else "")
                  + f" {e['step']} {e['status']}{late}"
                  + (": " + "; ".join(did) if did else ""))
    for m in t["messages"]:
        print(f"\n  --- {m['kind']} #{m['id']} {m['created_at']} from {m['from']}"
              + (" (malformed MIME)" if m["malformed"] else ""))
        for line in (m["text"] or "").splitlines()[:40]:
            print(f"  | {line}")
        for a in m["attachments"]:
            print(f"  [attachment] {a['filename']} {a['content_type']} {a['size']} bytes")
    if t["events"]:
        print("\n  events:")
        for e in t["events"]:
            print(f"    {e['at']} {e['kind']} {json.dumps(e['data'], ensure_ascii=False)}")
    others = [x for x in t["customer_tickets"] if x["id"] != t["id"]]
    if others:
        print("\n  this customer's other tickets:")
        for x in others:
            print(f"    #{x['id']} [{x['team']}/{x['status']}] {x['subject']} (via "
                  f"{x['address']})")


def _duration(seconds: float) -> str:
    secs = round(abs(seconds))
    if secs < 60:
        return f"{secs}s"
    d, rest = divmod(secs, 86400)
    h, m = rest // 3600, rest % 3600 // 60
    return "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m")) if n) or "0m"


def run(settings: Settings, args: argparse.Namespace) -> int:
    engine = db.make_engine(settings.database_url, immediate=True)  # move/retry write
    try:
        with Session(engine) as session:
            cmd = args.tickets_command
            if cmd == "list":
                rows = list_tickets(session, team=args.team, status=args.status,
                                    customer=args.customer, limit=args.limit,
                                    overdue=args.overdue)
                if args.json:
                    json.dump({"tickets": rows, "count": len(rows)}, sys.stdout, indent=2,
                              ensure_ascii=False)
                    print()
                else:
                    _print_ticket_table(rows)
            elif cmd == "show":
                t = show_ticket(session, args.id, settings)
                if t is None:
                    print(f"router: no ticket {args.id}", file=sys.stderr)
                    return 1
                if args.json:
                    json.dump(t, sys.stdout, indent=2, ensure_ascii=False)
                    print()
                else:
                    _print_ticket(t)
            elif cmd == "parked":
                rows = parked(session)
                if args.json:
                    json.dump({"parked": rows}, sys.stdout, indent=2, ensure_ascii=False)
                    print()
                elif not rows:
                    print("no parked messages")
                else:
                    for r in rows:
                        print(f"inbound {r['inbound_id']} {r['received_at']} from "
                              f"{r['mail_from'] or '<>'} to {', '.join(r['rcpt_to'])}")
                        last = (r["error"] or "").strip().splitlines()[-1:] or [""]
                        print(f"  {last[0]}")
            elif cmd == "move":
                from router.learn import move_ticket

                if settings.team_by_name(args.team) is None:
                    print(f"router: no team {args.team!r} (teams: "
                          f"{', '.join(t.name for t in settings.team)})", file=sys.stderr)
                    return 1
                try:
                    moved = move_ticket(engine, args.id, args.team, datetime.now(UTC),
                                        by=args.by)
                except LookupError as exc:
                    print(f"router: {exc}", file=sys.stderr)
                    return 1
                if args.json:
                    json.dump(moved, sys.stdout, indent=2, ensure_ascii=False)
                    print()
                else:
                    print(f"ticket {args.id}: {moved['reason']}")
            elif cmd == "retry":
                from router.pipeline import retry_parked

                n = retry_parked(engine, args.ids or None)
                print(f"{n} message(s) back in line")
        return 0
    finally:
        engine.dispose()
