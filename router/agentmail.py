"""Replies by email: agents answer a ticket from their own mail client.

For a team with ``notify_agents = true`` every new ticket mails a notification (kind
``agent_notify``) to its assignee, or to every agent and lead of the team while nobody is
assigned. The notification's Reply-To is a per-ticket, per-agent reply address::

    <role-local>+r-<ticket>-<mac>@<role-domain>
    mac = HMAC-SHA256(key, f"{ticket}:{agent}")[:16 hex]

The key is derived from the web console's secret in the database (`WebSecret`), never from
router.toml: anyone who can read the config must not be able to mint reply addresses.

`handle_reply` runs in the pipeline before threading and classification, because the same
address would otherwise route as an ordinary plus-address of the team and the agent's words
would land on the ticket as if the customer had written them. A mail to a reply address is
relayed to the customer only when all of this holds: the ticket exists, From is a member of
the ticket's team (or an enabled admin account), the mac matches that From address, and the
mail is not automatic (an out-of-office answering a notification must never reach a
customer). Anything else is refused: an ``agent_reply_refused`` event with the reason, the
inbound row marked ``refused``, nothing relayed, no ticket opened.

A mac binds a reply to one agent and one ticket, so a forwarded notification answered by
someone else, or a token copied onto another ticket, is refused. From can be forged, but the
forger would also need the mac, which only ever went to that agent's mailbox.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, update
from sqlmodel import Session, col, select

from router import log
from router.loopguard import automatic_reason
from router.mail import ParsedMail, normalize_address, split_plus
from router.models import T_INBOUND, Customer, Event, InboundStatus, Ticket, WebSecret
from router.outbox import enqueue
from router.route import format_token
from router.settings import Settings, Team

if TYPE_CHECKING:
    from router.pipeline import Handled

NOTIFY_KIND = "agent_notify"
REFUSED_EVENT = "agent_reply_refused"
MAC_HEX = 16
NOTIFY_ROLES = ("agent", "lead")
MAX_EXCERPT = 4000
_TAG = re.compile(rf"^r-(\d{{1,12}})-([0-9a-f]{{{MAC_HEX}}})$")
# "On <date>, <someone> wrote:" (and the common localised forms) opens the quoted original.
_QUOTE_INTRO = re.compile(r"^\s*(?:on\b.*\bwrote|am\b.*\bschrieb|le\b.*\ba écrit)\s*:\s*$",
                          re.IGNORECASE)

_log = log.get("router.agentmail")


# ---------------------------------------------------------------------------- the token

def reply_key(session: Session, now: datetime) -> bytes:
    """The mac key: derived from the console's secret (made here when the console never ran),
    under its own label so a reply mac and a session cookie can never stand in for each
    other."""
    row = session.exec(select(WebSecret).order_by(col(WebSecret.id))).first()
    if row is None:
        from router.accounts import session_secret

        secret = session_secret(session, now)
    else:
        secret = row.secret
    return hmac.new(secret.encode(), b"router.agentmail.reply-token", hashlib.sha256).digest()


def mac(key: bytes, ticket_id: int, agent: str) -> str:
    msg = f"{ticket_id}:{normalize_address(agent)}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:MAC_HEX]


def reply_address(key: bytes, role_address: str, ticket_id: int, agent: str) -> str:
    base, _tag = split_plus(role_address)
    local, _, domain = base.rpartition("@")
    return f"{local}+r-{ticket_id}-{mac(key, ticket_id, agent)}@{domain}"


@dataclass(frozen=True)
class Token:
    address: str      # the reply address as written
    ticket_id: int
    mac: str


def find_token(settings: Settings, rcpts: list[str], parsed: ParsedMail) -> Token | None:
    """The first reply address among the envelope recipients, then To and Cc, whose base is
    one of our role addresses (``+r-`` on anyone else's address is not ours to judge)."""
    ours = settings.address_map()
    for addr in [*rcpts, *(a for _, a in parsed.to), *(a for _, a in parsed.cc)]:
        base, tag = split_plus(normalize_address(addr))
        if tag is None or base not in ours:
            continue
        m = _TAG.match(tag.lower())
        if m is not None:
            return Token(addr, int(m.group(1)), m.group(2))
    return None


# ---------------------------------------------------------------------------- notification

def notify_hook(conn: Connection, handled: Handled) -> None:
    """`router.pipeline.Hook`: tell the team's people about a new ticket, in the routing
    transaction. Runs after assignment, so an assigned ticket only mails its assignee."""
    if not handled.new_ticket:
        return
    settings = handled.settings
    ticket = handled.get(Ticket, handled.ticket_id)
    team = settings.team_by_name(ticket.team) if ticket is not None else None
    if ticket is None or team is None or not team.notify_agents:
        return
    session = handled.session()
    customer = handled.get(Customer, ticket.customer_id)
    assert ticket.id is not None and customer is not None
    if ticket.assignee:
        targets = [ticket.assignee]
    else:
        targets = list(dict.fromkeys(m.email for m in team.members
                                     if m.role in NOTIFY_ROLES))
    key = reply_key(session, handled.now)
    for agent in targets:
        msg = _notification(settings, team, ticket, customer, handled.parsed, agent, key)
        row = enqueue(session, kind=NOTIFY_KIND, msg=msg, ticket_id=ticket.id,
                      customer_id=None, now=handled.now, hostname=settings.smtp.hostname)
        _log.info("agent notified", ticket=ticket.id, team=team.name, agent=agent,
                  outbox_id=row.id)


def _notification(settings: Settings, team: Team, ticket: Ticket, customer: Customer,
                  parsed: ParsedMail, agent: str, key: bytes) -> EmailMessage:
    assert ticket.id is not None
    token = format_token(settings, ticket.id)
    member = team.member(agent)
    msg = EmailMessage()
    msg["From"] = Address(display_name=f"{team.label} ({settings.router.name})",
                          addr_spec=ticket.address)
    msg["To"] = Address(display_name=member.name if member else "", addr_spec=agent)
    msg["Reply-To"] = reply_address(key, ticket.address, ticket.id, agent)
    msg["Subject"] = f"New ticket {token} for {team.label}: {ticket.subject}"
    # Automatic mail: no robot answers it, and the agent's own autoresponder is refused
    # on the way back (handle_reply) even if it ignores this header.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    text = (parsed.text or "").strip()
    if len(text) > MAX_EXCERPT:
        text = text[:MAX_EXCERPT] + "\n[...]"
    who = f"{customer.name} <{customer.email}>" if customer.name else customer.email
    body = (f"A new ticket {token} arrived for {team.label} (priority {ticket.priority}).\n"
            f"From: {who}\nTo: {ticket.address}\nSubject: {ticket.subject}\n"
            f"Assigned to: {ticket.assignee or 'nobody yet'}\n\n{text}\n\n-- \n"
            "Reply to this mail to answer the customer from the team's address; your reply\n"
            "is the first response. The reply address works for you and this ticket only.\n"
            "Text below a line such as \"On ... wrote:\" is not sent.\n")
    msg.set_content(body, cte="quoted-printable")
    return msg


# ---------------------------------------------------------------------------- the reply

def strip_quoted(text: str) -> str:
    """The agent's own words: cut at the quoted original ("On ... wrote:", or a trailing
    block of "> " lines), which would otherwise send the notification to the customer."""
    lines = text.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if _QUOTE_INTRO.match(line) or line.strip() == "-----Original Message-----":
            lines = lines[:i]
            break
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith(">")):
        lines.pop()
    return "\n".join(lines).strip("\n")


def _refuse(session: Session, conn: Connection, inbound: Any, token: Token, sender: str,
            reason: str, ticket: Ticket | None, at: datetime, now: datetime) -> None:
    session.add(Event(at=at, ticket_id=ticket.id if ticket is not None else None,
                      kind=REFUSED_EVENT,
                      data={"inbound_id": inbound.id, "reason": reason, "from": sender,
                            "address": token.address, "ticket": token.ticket_id}))
    session.commit()
    conn.execute(update(T_INBOUND).where(T_INBOUND.c.id == inbound.id).values(
        status=InboundStatus.REFUSED, error=reason[:2000], processed_at=now))
    _log.warning("agent reply refused", inbound_id=inbound.id, ticket=token.ticket_id,
                 sender=sender, reason=reason)


def _principal(session: Session, settings: Settings, team: Team, sender: str) -> Any:
    """The sender as the console's services see them: a member of the team, or an enabled
    admin account; None for anyone else."""
    from router.accounts import Principal, by_email

    member = team.member(sender)
    account = by_email(session, sender)
    if member is not None:
        role = "lead" if member.role in ("lead", "manager") else "agent"
        # The services read only the email, the role and the teams; an agent who never
        # logged in to the console has no account id.
        return Principal(account.id if account and account.id else 0, sender, role,
                         (team.name,))
    if account is not None and account.role == "admin" and not account.disabled:
        assert account.id is not None
        return Principal(account.id, sender, "admin", tuple(t.name for t in settings.team))
    return None


def handle_reply(conn: Connection, inbound: Any, parsed: ParsedMail, settings: Settings,
                 now: datetime) -> bool:
    """Relay or refuse a mail sent to a reply address; False when it names none (the
    pipeline goes on as usual). In the pipeline's transaction."""
    token = find_token(settings, list(inbound.rcpt_to or []), parsed)
    if token is None:
        return False
    at = inbound.received_at
    sender = normalize_address(parsed.sender_email or "")
    with Session(bind=conn, join_transaction_mode="create_savepoint",
                 expire_on_commit=False) as session:
        ticket = session.get(Ticket, token.ticket_id)
        team = settings.team_by_name(ticket.team) if ticket is not None else None
        p = _principal(session, settings, team, sender) if team and sender else None
        robot = automatic_reason(parsed, our_addresses=set(),
                                 envelope_sender=inbound.mail_from
                                 if inbound.channel in ("smtp", "lmtp") else None)
        reason: str | None = None
        if ticket is None or team is None:
            reason = f"no ticket {token.ticket_id} (or its team left the config)"
        elif p is None:
            reason = f"{sender or 'the sender'} is not a member of team {team.name} nor an admin"
        elif not hmac.compare_digest(token.mac, mac(reply_key(session, at), token.ticket_id,
                                                     sender)):
            reason = f"the reply token is not valid for {sender} on ticket {token.ticket_id}"
        elif robot is not None:
            reason = f"automatic mail: {robot}"
        text = strip_quoted(parsed.text or "") if reason is None else ""
        if reason is None and not text.strip():
            reason = "the reply has no text of its own"
        if reason is not None:
            _refuse(session, conn, inbound, token, sender, reason, ticket, at, now)
            return True
        assert ticket is not None and p is not None
        from router.web import services  # the console's service: both channels record alike

        result = services.reply(session, settings, p, ticket, text, at)
        session.add(Event(at=at, ticket_id=ticket.id, kind="agent_reply_mail",
                          data={"inbound_id": inbound.id, "by": sender,
                                "article_id": result.article_id, "outbox_id": result.outbox_id,
                                "attachments_dropped": len(parsed.attachments)}))
        session.commit()
    conn.execute(update(T_INBOUND).where(T_INBOUND.c.id == inbound.id).values(
        status=InboundStatus.DONE, ticket_id=token.ticket_id, processed_at=now))
    _log.info("agent reply relayed", inbound_id=inbound.id, ticket=token.ticket_id,
              sender=sender, outbox_id=result.outbox_id)
    return True
