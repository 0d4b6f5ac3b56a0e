"""`router explain FILE.eml`: what the live config would do with a message, without doing it.

A dry run of the pipeline's decision: the team, every rule's hit or miss with its reason,
priority, tags, campaign, tone, alerts, whether an acknowledgement would go out (and why
not), and the turnaround it would promise. When the configured database exists it is read
(the customer record for VIP and language, threading, the ack limits, the team's measured
history for the promise, the trained classifier) inside a transaction that is rolled back, so
nothing is ever written; without one the promise is the SLA fallback.

The JSON shape (``--json``) is ``{"file", "recipients", "at", "database", "thread",
"unroutable", "decision": {...summary...}, "hits": [...], "ack": {"sent", "code",
"reason"}, "turnaround": {...}}``; ``hits`` is the record stored in Decision.hits of a real
ticket.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url

from router import turnaround
from router.ack import DAILY_WINDOW, our_addresses
from router.calendar import BusinessCalendar
from router.classify import Decision, Unroutable, classify
from router.loopguard import automatic_reason
from router.mail import ParsedMail, normalize_address, parse
from router.models import T_CUSTOMER, T_OUTBOX
from router.outbox import HUMAN_KINDS
from router.rules import Context
from router.settings import Settings


def _database(settings: Settings) -> str | None:
    url = settings.database_url
    if url.startswith("sqlite"):
        path = make_url(url).database
        if not path or path == ":memory:" or not Path(path).is_file():
            return None
    return url


def _recipients(parsed: ParsedMail, given: list[str]) -> list[str]:
    if given:
        return [normalize_address(a) for a in given]
    return [normalize_address(a) for _, a in parsed.to + parsed.cc if a]


def explain(settings: Settings, raw: bytes, *, recipients: list[str] | None = None,
            sender: str = "", now: datetime, file: str = "-") -> dict[str, Any]:
    parsed = parse(raw)
    rcpts = _recipients(parsed, recipients or [])
    envelope_sender = sender or (parsed.sender_email or "")
    out: dict[str, Any] = {"file": file, "recipients": rcpts, "at": now.isoformat(),
                           "database": None, "thread": None, "unroutable": None}
    url = _database(settings)
    if url is None:
        return _explain(settings, parsed, rcpts, envelope_sender, now, out, None)
    from router.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                out["database"] = "read"
                return _explain(settings, parsed, rcpts, envelope_sender, now, out, conn)
            except Exception as exc:  # no schema yet, unreachable server: explain without
                trans.rollback()
                first = (str(exc).splitlines() or [""])[0][:160]
                out["database"] = f"not used: {type(exc).__name__}: {first}"
                return _explain(settings, parsed, rcpts, envelope_sender, now, out, None)
            finally:
                if trans.is_active:
                    trans.rollback()
    finally:
        engine.dispose()


def _explain(settings: Settings, parsed: ParsedMail, rcpts: list[str], envelope_sender: str,
             now: datetime, out: dict[str, Any], conn: Connection | None) -> dict[str, Any]:
    sender = normalize_address(parsed.sender_email or envelope_sender)
    customer = None
    context = Context(settings=settings, envelope_rcpts=rcpts, envelope_sender=envelope_sender,
                      now=now)
    if conn is not None:
        from router import learn
        from router.route import find_thread

        customer = conn.execute(select(T_CUSTOMER).where(T_CUSTOMER.c.email == sender)).first()
        if customer is not None:
            context.customer_vip = bool(customer.vip)
            context.customer_attributes = dict(customer.attributes or {})
        match = find_thread(conn, parsed, settings)
        if match is not None:
            out["thread"] = {"ticket": match.ticket_id, "status": match.status,
                             "key": match.key, "value": match.value}
        context.suggest = learn.suggester(conn)
    try:
        decision = classify(parsed, context, with_tone=True,
                            language_hint=customer.language if customer is not None else None)
    except Unroutable as exc:
        out["unroutable"] = f"no team: the message would be parked for an admin ({exc})"
        out["decision"], out["hits"] = None, []
        out["ack"] = {"sent": False, "code": "unroutable", "reason": "not routed"}
        out["turnaround"] = None
        return out
    out["decision"] = decision.summary()
    out["hits"] = decision.hits_json()
    out["ack"] = _ack(settings, parsed, decision, envelope_sender, now, out, conn, customer)
    out["turnaround"] = _turnaround(settings, decision, now, conn)
    return out


def _ack(settings: Settings, parsed: ParsedMail, decision: Decision, envelope_sender: str,
         now: datetime, out: dict[str, Any], conn: Connection | None, customer: Any
         ) -> dict[str, Any]:
    def no(code: str, reason: str) -> dict[str, Any]:
        return {"sent": False, "code": code, "reason": reason}

    if decision.spam:
        return no("spam", f"marked as spam ({decision.spam}): stored, not routed, no ack")
    if not settings.ack.enabled:
        return no("disabled", "ack disabled ([ack] enabled = false)")
    if decision.suppress_ack:
        return no("rule", decision.suppress_ack)
    robot = automatic_reason(parsed, our_addresses=our_addresses(settings),
                             envelope_sender=envelope_sender or None)
    if robot is not None:
        return no("loop_guard", robot)
    if out.get("thread"):
        return no("ticket_acked", f"threads onto ticket {out['thread']['ticket']} "
                  "(one ack per ticket)")
    if conn is not None and customer is not None:
        since = now - settings.ack.grace_period
        recent = conn.execute(select(func.count()).select_from(T_OUTBOX).where(
            T_OUTBOX.c.customer_id == customer.id, T_OUTBOX.c.kind == "ack",
            T_OUTBOX.c.mail_from == decision.address, T_OUTBOX.c.created_at > since)).scalar()
        if settings.ack.grace_period > timedelta(0) and recent:
            return no("grace_period", f"{customer.email} already got an ack from "
                      f"{decision.address} within the grace period")
        today = conn.execute(select(func.count()).select_from(T_OUTBOX).where(
            T_OUTBOX.c.customer_id == customer.id,
            T_OUTBOX.c.kind.not_in(sorted(HUMAN_KINDS)),
            T_OUTBOX.c.created_at > now - DAILY_WINDOW)).scalar() or 0
        if today >= settings.ack.daily_cap:
            return no("daily_cap", f"daily cap of automatic mail reached for {customer.email}")
    return {"sent": True, "code": "sent",
            "reason": "an acknowledgement would be sent" + (
                "" if conn is not None else " (no database: grace period and daily cap "
                "not checked)")}


def _turnaround(settings: Settings, decision: Decision, now: datetime,
                conn: Connection | None) -> dict[str, Any] | None:
    team = settings.team_by_name(decision.team) if decision.team else None
    if team is None:
        return None
    try:
        calendar = BusinessCalendar.for_team(team)
        samples: list[float] = []
        backlog, rate = 0, None
        if conn is not None:
            from sqlmodel import Session

            with Session(bind=conn) as session:
                samples, backlog, rate = turnaround.history(
                    session, team.name, now, calendar, timedelta(days=28))
        promise = turnaround.estimate(now, calendar, samples, backlog, rate,
                                      team.sla.first_response, settings.ack.quantile,
                                      settings.ack.min_history,
                                      sla_business_hours=team.sla.business_hours)
    except ValueError as exc:
        return {"error": f"no promise possible: {exc}"}
    lang = decision.language or settings.router.default_language
    return {"deadline": promise.deadline.isoformat(), "basis": promise.basis,
            "text": turnaround.describe(promise, now, team.timezone,
                                        lang if lang in ("en", "tr") else "en"),
            "samples": len(samples), "backlog": backlog}


def format_text(result: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"{result['file']}: to {', '.join(result['recipients']) or '(nobody)'} at "
        f"{result['at']}")
    add(f"database: {result['database'] or 'none (SLA fallback promise, no history)'}")
    if result.get("thread"):
        t = result["thread"]
        add(f"thread: would thread onto ticket {t['ticket']} ({t['key']} {t['value']}); "
            "a new ticket would be routed as below")
    if result.get("unroutable"):
        add(f"team: none: {result['unroutable']}")
        return "\n".join(lines) + "\n"
    d = result["decision"]
    if d["spam"]:
        add(f"spam: {d['spam']} (stored, not routed)")
    else:
        add(f"team: {d['team']} (by {d['routed_by']}; address {d['address']}"
            + (f", plus tag {d['tag']}" if d["tag"] else "") + ")")
    add(f"priority: {d['priority']}")
    add(f"tags: {', '.join(d['tags']) or '-'}")
    if d["campaign"]:
        c = d["campaign"]
        state = "EXPIRED" if c["expired"] else "active"
        add(f"campaign: {c['name']} ({state}): {c['description'] or '-'}")
    add(f"language: {d['language'] or 'unknown'}")
    if d["tone"]:
        tone = d["tone"]
        urgency = (f"urgent ({', '.join(tone['urgency_terms'])})" if tone["urgent"]
                   else "not urgent")
        add(f"tone: {tone['label']} ({tone['sentiment']:+.2f}, {tone['method']}), {urgency}")
    if d["suggestion"]:
        s = d["suggestion"]
        add(f"classifier: {s['team']} ({s['confidence']:.0%}, model {s['model_id']})")
    add("rules:")
    for h in result["hits"]:
        if h["rule"] == "decision":
            continue
        mark = "HIT " if h["matched"] else "miss"
        extra = f"  -> {', '.join(h['actions'])}" if h.get("actions") else ""
        stop = " [stop]" if h.get("stop") else ""
        add(f"  {mark} {h['rule']}: {h['reason']}{extra}{stop}")
    if d["alerts"]:
        for a in d["alerts"]:
            add(f"alert: {', '.join(a['to'])} now (rule {a['rule']})")
    else:
        add("alerts: none")
    ack = result["ack"]
    add("ack: would be sent" if ack["sent"] else f"ack: not sent: {ack['reason']}")
    ta = result.get("turnaround")
    if ta and "error" not in ta:
        add(f"turnaround: {ta['text']} ({ta['basis']}; {ta['samples']} recent first "
            f"responses, backlog {ta['backlog']})")
    elif ta:
        add(f"turnaround: {ta['error']}")
    return "\n".join(lines) + "\n"
