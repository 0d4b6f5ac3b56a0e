"""The acknowledgement: "your message arrived, team X has it, a person answers by T".

`plan_ack` runs inside the pipeline's transaction for every routed message. It computes the
turnaround promise for a new ticket (and stores it on the ticket even when no ack is sent, so
the promise-kept metric covers every ticket), then decides whether to send, renders the
template and writes the mail to the outbox. Every ack not sent records why: in the returned
`AckOutcome` and as an `ack_suppressed` event on the ticket.

Template lookup, for the language chosen below (first existing file wins):

1. with ``team.ack_template`` set (a path relative to the templates directory, such as
   ``ack/vip.txt.j2``): its language sibling ``ack/vip.<lang>.txt.j2``, then the file itself
   (used for every language it has no sibling for);
2. ``ack/<team>.<lang>.txt.j2``;
3. ``ack/default.<lang>.txt.j2``.

The language is the customer's (`language` argument, else the ticket's, else the customer
record's) when some template in the chain exists for it, else ``router.default_language``,
else English. A ``.html.j2`` file next to the chosen ``.txt.j2`` adds an HTML alternative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import Connection, bindparam, func, insert
from sqlmodel import Session, select

from router import fastsql, log, turnaround
from router.calendar import BusinessCalendar
from router.clock import Clock
from router.loopguard import automatic_reason
from router.mail import ParsedMail, normalize_address
from router.models import (
    T_ARTICLE,
    T_EVENT,
    T_OUTBOX,
    Article,
    ArticleKind,
    Customer,
    Ticket,
)
from router.outbox import HUMAN_KINDS, enqueue_row
from router.settings import Problem, Settings, Team
from router.turnaround import Promise

if TYPE_CHECKING:
    from router.pipeline import Handled

ACK_KIND = "ack"
ACK_DIR = "ack"
TXT_SUFFIX = ".txt.j2"
HTML_SUFFIX = ".html.j2"
HISTORY_WINDOW = timedelta(days=28)
DAILY_WINDOW = timedelta(hours=24)
MAX_REFERENCES = 20

# What a template may use; `router check` flags anything else before a customer's mail would
# fail to render under StrictUndefined.
CONTEXT_KEYS = frozenset({
    "customer_name", "customer_email", "team", "team_name", "ticket_id", "token", "subject",
    "promise", "promise_deadline", "promise_basis", "company", "language", "address",
})


@dataclass
class AckOutcome:
    sent: bool
    reason: str
    outbox_id: int | None = None
    promise: Promise | None = None
    code: str = ""          # stable name of the rule that decided, for metrics and tests


# ---------------------------------------------------------------------------- templates


@lru_cache(maxsize=16)
def _environment(directory: Path, *, html: bool = False) -> SandboxedEnvironment:
    # Plain text must not be HTML-escaped ("Smith & Sons"); the HTML part must be. Cached:
    # the loader notices edited files by their mtime, so a changed template is picked up.
    return SandboxedEnvironment(loader=FileSystemLoader(str(directory)),
                                undefined=StrictUndefined, autoescape=html,
                                keep_trailing_newline=True)


def _lang(value: str | None) -> str | None:
    if not value:
        return None
    primary = value.strip().lower().replace("_", "-").split("-")[0]
    return primary if re.fullmatch(r"[a-z]{2,3}", primary) else None


def _override_base(name: str) -> str:
    """``ack/vip.txt.j2`` and ``ack/vip.en.txt.j2`` both have the base ``ack/vip``."""
    stem = name[: -len(TXT_SUFFIX)] if name.endswith(TXT_SUFFIX) else name
    head, dot, tail = stem.rpartition(".")
    return head if dot and re.fullmatch(r"[a-z]{2,3}", tail) else stem


def _candidates(team: Team, lang: str) -> list[str]:
    if team.ack_template:
        return [f"{_override_base(team.ack_template)}.{lang}{TXT_SUFFIX}"]
    return [f"{ACK_DIR}/{team.name}.{lang}{TXT_SUFFIX}",
            f"{ACK_DIR}/default.{lang}{TXT_SUFFIX}"]


def resolve_template(settings: Settings, team: Team, language: str | None
                     ) -> tuple[str, str] | None:
    """(template name relative to the templates directory, language) or None."""
    root = settings.templates_dir
    langs = list(dict.fromkeys(x for x in (_lang(language),
                                           _lang(settings.router.default_language), "en") if x))
    for lang in langs:
        for name in _candidates(team, lang):
            if (root / name).is_file():
                return name, lang
    if team.ack_template and (root / team.ack_template).is_file():
        return team.ack_template, _lang(settings.router.default_language) or "en"
    return None


_LINK = re.compile(r"(?i)\b(?:https?://[^\s\"'<>)]+|www\.[^\s\"'<>)]+|mailto:([^\s\"'<>)?]+))")


def _links(source: str, role_addresses: set[str]) -> list[tuple[int, str]]:
    found = []
    for m in _LINK.finditer(source):
        if m.group(1) and normalize_address(m.group(1)) in role_addresses:
            continue  # "write to billing@" is not deflection
        found.append((source.count("\n", 0, m.start()) + 1, m.group(0)))
    return found


def _ack_template_files(settings: Settings) -> set[Path]:
    root = settings.templates_dir
    files = set((root / ACK_DIR).glob("*.j2")) if (root / ACK_DIR).is_dir() else set()
    for team in settings.team:
        if team.ack_template:
            base = root / _override_base(team.ack_template)
            files.update(base.parent.glob(base.name + ".*.j2"))
            if (root / team.ack_template).is_file():
                files.add(root / team.ack_template)
    return files


def template_problems(settings: Settings) -> list[Problem]:
    """Problems of the mail templates, for `router check`."""
    root = settings.templates_dir
    if not root.is_dir():
        return []  # settings.semantic_problems reports the missing directory
    out: list[Problem] = []
    default_lang = _lang(settings.router.default_language) or "en"
    default = f"{ACK_DIR}/default.{default_lang}{TXT_SUFFIX}"
    english = f"{ACK_DIR}/default.en{TXT_SUFFIX}"
    if not (root / default).is_file() and not (root / english).is_file():
        out.append(Problem(
            str(root / default), "templates",
            f"the default acknowledgement template {default} is missing; every team without "
            "its own template needs it" + ("" if settings.ack.enabled else
                                          " (acks are disabled, so nothing breaks yet)"),
            severity="error" if settings.ack.enabled else "warning"))
    elif not (root / default).is_file():
        out.append(Problem(
            str(root / default), "templates",
            f"no acknowledgement template in the default language \"{default_lang}\"; "
            f"customers whose language has no template get the English {english}",
            severity="warning"))
    teams = {t.name for t in settings.team}
    overrides = {Path(_override_base(t.ack_template)).name for t in settings.team
                 if t.ack_template}
    for path in sorted((root / ACK_DIR).glob(f"*{TXT_SUFFIX}")):
        stem = path.name[: -len(TXT_SUFFIX)]
        owner = stem.rpartition(".")[0] or stem
        if owner not in teams | overrides | {"default"}:
            out.append(Problem(
                str(path), "templates",
                f"\"{owner}\" is not a team, so this template is never used; per-team "
                f"templates are named ack/<team>.<lang>{TXT_SUFFIX}", severity="warning"))

    env = _environment(root)
    role = set(settings.address_map())
    ack_files = _ack_template_files(settings)
    for path in sorted(root.rglob("*.j2")):
        name = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            out.append(Problem(str(path), "templates", f"cannot read template: {exc}"))
            continue
        try:
            ast = env.parse(source, name, str(path))
        except TemplateSyntaxError as exc:
            out.append(Problem(str(path), "templates", f"template syntax error: {exc.message}",
                               line=exc.lineno))
            continue
        if path not in ack_files:
            continue
        unknown = sorted(meta.find_undeclared_variables(ast) - CONTEXT_KEYS)
        if unknown:
            out.append(Problem(
                str(path), "templates",
                f"unknown variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"an acknowledgement can use {', '.join(sorted(CONTEXT_KEYS))}",
                line=_first_line(source, unknown[0])))
        for line, link in _links(source, role):
            out.append(Problem(
                str(path), "templates",
                f"link {link} in an acknowledgement: acknowledgements are for reassurance, "
                "not deflection; say who answers and by when, and leave self-help links out",
                line=line, severity="warning"))
    return out


def _first_line(source: str, word: str) -> int | None:
    m = re.search(rf"\b{re.escape(word)}\b", source)
    return source.count("\n", 0, m.start()) + 1 if m else None


# ---------------------------------------------------------------------------- rendering

_REPLY_PREFIX = re.compile(r"^\s*(?:re|aw|sv|vs|ynt|yan[ıi]t|antw|odp|rif)\s*(?:\[\d+\])?\s*:",
                           re.IGNORECASE)


def reply_subject(original: str, token: str) -> str:
    """``Re: <subject> [#ID]``, without a second "Re:" or a second token."""
    subject = " ".join(original.split())
    if not _REPLY_PREFIX.match(subject):
        subject = f"Re: {subject}" if subject else "Re:"
    if token not in subject:
        subject = f"{subject} {token}"
    return subject


@dataclass
class Rendered:
    template: str
    language: str
    text: str
    html: str | None


def render(settings: Settings, name: str, lang: str, context: dict[str, Any]) -> Rendered:
    """Render template `name` (and its .html.j2 sibling, if any) in the sandbox."""
    context = {**context, "language": lang}
    text = _environment(settings.templates_dir).get_template(name).render(context)
    html = None
    if name.endswith(TXT_SUFFIX):
        html_name = name[: -len(TXT_SUFFIX)] + HTML_SUFFIX
        if (settings.templates_dir / html_name).is_file():
            html = (_environment(settings.templates_dir, html=True)
                    .get_template(html_name).render(context))
    return Rendered(name, lang, text, html)


def build_message(*, settings: Settings, team: Team, ticket: Ticket, customer: Customer,
                  parsed: ParsedMail, rendered: Rendered) -> EmailMessage:
    token = settings.router.ticket_token.replace("{id}", str(ticket.id))
    msg = EmailMessage()
    msg["From"] = Address(display_name=team.label, addr_spec=ticket.address)
    msg["To"] = Address(display_name=customer.name or "", addr_spec=customer.email)
    msg["Subject"] = reply_subject(parsed.subject or ticket.subject, token)
    if parsed.message_id:
        msg["In-Reply-To"] = parsed.message_id
        refs = [r for r in parsed.references if r != parsed.message_id]
        # Keep the thread's root and the most recent ids; some MTAs reject huge headers.
        if len(refs) >= MAX_REFERENCES:
            refs = [refs[0], *refs[-(MAX_REFERENCES - 2):]]
        msg["References"] = " ".join([*refs, parsed.message_id])
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    # Quoted-printable keeps the mail 7-bit clean for relays without 8BITMIME.
    msg.set_content(rendered.text, cte="quoted-printable")
    if rendered.html is not None:
        msg.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    # After the content: set_content() clears every Content-* header.
    msg["Content-Language"] = rendered.language
    return msg


# ---------------------------------------------------------------------------- deciding


def compute_promise(conn: Connection, *, settings: Settings, team: Team, ticket: Ticket,
                    now: datetime, backlogs: turnaround.Backlogs | None = None) -> Promise:
    """The promise for `ticket`. `backlogs`: what this transaction counted before."""
    calendar = BusinessCalendar.cached_for_team(team)
    samples, rate = turnaround.answered(conn, team.name, now, calendar, HISTORY_WINDOW)

    def backlog() -> int:
        return turnaround.backlog(conn, team.name, ticket.id, counted=backlogs)

    return turnaround.estimate(now, calendar, samples, backlog, rate, team.sla.first_response,
                               settings.ack.quantile, settings.ack.min_history,
                               sla_business_hours=team.sla.business_hours)


def our_addresses(settings: Settings) -> set[str]:
    """Role addresses and every agent, lead and manager: mail from them is never acked."""
    out = set(settings.address_map())
    for team in settings.team:
        out.update(m.email for m in team.members)
        out.add(team.lead)
        if team.manager:
            out.add(team.manager)
    return out


_INS_ARTICLE = insert(T_ARTICLE)
_INS_EVENT = insert(T_EVENT)
# The rate-limit counts run for every new ticket: built once, run on the routing connection.
_ACKS_OF_TICKET = select(func.count()).select_from(T_OUTBOX).where(
    T_OUTBOX.c.ticket_id == bindparam("ticket"), T_OUTBOX.c.kind == ACK_KIND)
_ACKS_FROM_ADDRESS = select(func.count()).select_from(T_OUTBOX).where(
    T_OUTBOX.c.customer_id == bindparam("customer"), T_OUTBOX.c.kind == ACK_KIND,
    T_OUTBOX.c.mail_from == bindparam("address"), T_OUTBOX.c.created_at > bindparam("since"))
_AUTOMATIC_SINCE = select(func.count()).select_from(T_OUTBOX).where(
    T_OUTBOX.c.customer_id == bindparam("customer"),
    T_OUTBOX.c.kind.not_in(sorted(HUMAN_KINDS)), T_OUTBOX.c.created_at > bindparam("since"))


def _count(conn: Connection, stmt: Any, **params: Any) -> int:
    return int(fastsql.execute(conn, stmt, params).scalar_one())


def _suppress(conn: Connection, ticket: Ticket, article: Article | None, parsed: ParsedMail,
              now: datetime, code: str, reason: str, promise: Promise | None) -> AckOutcome:
    fastsql.execute(conn, _INS_EVENT, {
        "at": now, "ticket_id": ticket.id, "kind": "ack_suppressed",
        "data": {"rule": code, "reason": reason, "message_id": parsed.message_id,
                 "article_id": article.id if article else None}})
    log.get("router.ack").info("ack suppressed", ticket=ticket.id, team=ticket.team,
                               message_id=parsed.message_id, rule=code, reason=reason)
    return AckOutcome(False, reason, None, promise, code)


def plan_ack(conn: Connection, *, settings: Settings, team: Team, ticket: Ticket,
             article: Article | None, customer: Customer, parsed: ParsedMail,
             envelope_sender: str | None, now: datetime, clock: Clock | None = None,
             language: str | None = None, suppress: str | None = None,
             backlogs: turnaround.Backlogs | None = None) -> AckOutcome:
    """Decide about the ack for `parsed` (already threaded onto or opening `ticket`) and, if
    it goes out, write it to the outbox. Runs in the caller's transaction; the caller commits
    and then wakes the outbox worker when `outcome.outbox_id` is set. It reads and writes
    through `conn` alone: the ticket, article and customer must be written already (an ORM
    caller flushes first), and what it sets on `ticket` (the promise) is the caller's to
    write (the pipeline's `Handled.finish`; an ORM session's own flush).

    `envelope_sender`: the SMTP MAIL FROM ("" for the null sender), None when the channel has
    none (IMAP). `now`: when the message arrived (the SLA clock's start). `clock` is accepted
    for symmetry with the other services; the decision uses `now` only. `backlogs`: the
    team backlogs counted in this transaction before (the pipeline's, `turnaround.Backlogs`).
    """
    assert ticket.id is not None, "plan_ack needs the ticket written (flushed) first"
    # plan_ack has run for this ticket before (it stores a promise every time it computes
    # one), or a person already answered: this message is a follow-up, not a new request.
    follow_up = ticket.promised_at is not None or ticket.first_response_at is not None
    promise: Promise | None = None
    promise_error: str | None = None
    if not follow_up:
        try:
            promise = compute_promise(conn, settings=settings, team=team, ticket=ticket,
                                      now=now, backlogs=backlogs)
        except ValueError as exc:
            # A calendar that is never open cannot promise anything; that must not cost the
            # customer the ticket. `router check` and the event name the cause.
            promise_error = f"no promise possible: {exc}"
        else:
            ticket.promised_at = promise.deadline
            ticket.promise_basis = promise.basis[:32]

    def no(code: str, reason: str) -> AckOutcome:
        return _suppress(conn, ticket, article, parsed, now, code, reason, promise)

    if not settings.ack.enabled:
        return no("disabled", "ack disabled")
    if suppress:  # a router.toml rule said so (the routing Decision's suppress_ack)
        return no("rule", suppress)
    robot = automatic_reason(parsed, our_addresses=our_addresses(settings),
                             envelope_sender=envelope_sender)
    if robot is not None:
        return no("loop_guard", robot)
    if follow_up or _count(conn, _ACKS_OF_TICKET, ticket=ticket.id):
        return no("ticket_acked", "follow-up on an existing ticket (one ack per ticket)")
    domain = customer.email.rpartition("@")[2].lower()
    if not domain or domain == "invalid" or domain.endswith(".invalid"):
        return no("no_address", "no address to answer")
    grace = settings.ack.grace_period
    if grace and _count(conn, _ACKS_FROM_ADDRESS, customer=customer.id,
                        address=ticket.address, since=now - grace):
        return no("grace_period",
                  f"{customer.email} already got an ack from {ticket.address} within the "
                  f"grace period ({_hours(grace)})")
    sent_today = _count(conn, _AUTOMATIC_SINCE, customer=customer.id,
                        since=now - DAILY_WINDOW)
    if sent_today >= settings.ack.daily_cap:
        return no("daily_cap", f"daily cap of automatic mail reached for {customer.email} "
                  f"({sent_today} of {settings.ack.daily_cap} in 24h)")

    if promise is None:
        return no("promise_error", promise_error or "no promise")
    lang = _lang(language) or _lang(ticket.language) or _lang(customer.language)
    token = settings.router.ticket_token.replace("{id}", str(ticket.id))
    context_base = {
        "customer_name": customer.name or parsed.sender_name or "",
        "customer_email": customer.email,
        "team": team.label,
        "team_name": team.name,
        "ticket_id": ticket.id,
        "token": token,
        "subject": parsed.subject or ticket.subject,
        "promise_basis": promise.basis,
        "company": settings.router.name,
        "address": ticket.address,
    }
    try:
        found = resolve_template(settings, team, lang)
        if found is None:
            raise LookupError(f"no acknowledgement template for team {team.name!r}")
        local_deadline = promise.deadline.astimezone(ZoneInfo(team.timezone))
        context = {**context_base,
                   "promise": turnaround.describe(promise, now, team.timezone, found[1]),
                   "promise_deadline": local_deadline}
        rendered = render(settings, found[0], found[1], context)
    except (TemplateError, LookupError, OSError) as exc:
        # A broken template must not stop the ticket from being created; `router check`
        # reports it, and the event tells the admin which ticket went without an ack.
        log.get("router.ack").error("ack template failed", ticket=ticket.id,
                                    error=f"{type(exc).__name__}: {exc}")
        return no("template_error", f"template error: {type(exc).__name__}: {exc}")

    msg = build_message(settings=settings, team=team, ticket=ticket, customer=customer,
                        parsed=parsed, rendered=rendered)
    # Core, not the ORM: the unit of work for these two rows costs more than writing them.
    outbox_id, row = enqueue_row(conn, kind=ACK_KIND, msg=msg,
                                 ticket_id=ticket.id, customer_id=customer.id, now=now,
                                 hostname=settings.smtp.hostname)
    fastsql.execute(conn, _INS_ARTICLE, {
        "ticket_id": ticket.id, "inbound_id": None, "kind": ArticleKind.OUT, "automatic": True,
        "message_id": row["message_id"], "sender": ticket.address, "sender_name": team.label,
        "recipients": list(row["rcpt_to"]), "subject": str(msg["Subject"]),
        "body_text": rendered.text, "body_html": rendered.html, "author": None,
        "malformed": False, "defects": [], "created_at": now})
    fastsql.execute(conn, _INS_EVENT, {
        "at": now, "ticket_id": ticket.id, "kind": "ack_queued",
        "data": {"outbox_id": outbox_id, "message_id": row["message_id"],
                 "template": rendered.template, "language": rendered.language,
                 "promised_at": promise.deadline.isoformat(), "basis": promise.basis}})
    log.get("router.ack").info("ack queued", ticket=ticket.id, team=team.name,
                               message_id=row["message_id"], template=rendered.template)
    return AckOutcome(True, "ack queued", outbox_id, promise, "sent")


def _hours(td: timedelta) -> str:
    hours = td.total_seconds() / 3600
    return f"{hours:g}h"


def record_first_response(session: Session, ticket: Ticket, now: datetime) -> None:
    """A person answered: stop the first-response clock and settle the promise."""
    if ticket.first_response_at is not None:
        return
    ticket.first_response_at = now
    if ticket.promised_at is not None:
        ticket.promise_kept = turnaround.promise_kept(ticket.promised_at, now)
    session.add(ticket)


# ---------------------------------------------------------------------------- pipeline hook


def ack_hook(conn: Connection, handled: Handled) -> None:
    """`router.pipeline.Hook`: ack what the pipeline just routed, in its transaction.

    The outcome is kept in the events (`ack_queued` / `ack_suppressed`) and the promise on the
    ticket; call `plan_ack` directly where the `AckOutcome` itself is needed.
    """
    settings = handled.settings
    ticket = handled.get(Ticket, handled.ticket_id)
    customer = handled.get(Customer, handled.customer.id)
    article = handled.get(Article, handled.article_id)
    team = settings.team_by_name(ticket.team) if ticket is not None else None
    if ticket is None or customer is None or team is None:
        return  # e.g. the ticket's team left the config: nothing sensible to promise
    sender: str | None = handled.inbound.mail_from
    if handled.inbound.channel not in ("smtp", "lmtp") and not sender:
        # IMAP has no envelope, and `router ingest` without -f cannot tell "null sender"
        # from "not given": the Return-Path header decides then (see loopguard).
        sender = None
    plan_ack(conn, settings=settings, team=team, ticket=ticket, article=article,
             customer=customer, parsed=handled.parsed, envelope_sender=sender,
             now=handled.now, language=ticket.language or customer.language,
             suppress=handled.decision.suppress_ack if handled.decision else None,
             backlogs=handled.backlogs)
