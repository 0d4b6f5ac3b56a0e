"""A rule's ``alert``: mail a person now ("a VIP writes angrily → the lead hears at once").

Written to the outbox (kind "alert") in the routing transaction, like every mail that
leaves. Alerts go to staff, not to the customer, so they do not count against the
customer's daily cap of automatic mail.
"""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage

from sqlalchemy import Connection
from sqlmodel import Session

from router.classify import Decision
from router.mail import ParsedMail
from router.outbox import enqueue
from router.settings import Settings

ALERT_KIND = "alert"


def alert_message(settings: Settings, decision: Decision, ticket_id: int, to: list[str],
                  rule: str, why: str, parsed: ParsedMail) -> EmailMessage:
    team = settings.team_by_name(decision.team)
    msg = EmailMessage()
    msg["From"] = Address(display_name=f"{settings.router.name} router",
                          addr_spec=decision.address)
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"[alert] ticket {ticket_id} for {team.label if team else decision.team}: " \
        f"{' '.join(parsed.subject.split())[:120] or '(no subject)'}"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    lines = [
        f"Rule {rule} raised an alert for ticket {ticket_id}.",
        "",
        f"From:     {parsed.sender_name} <{parsed.sender_email or ''}>".replace(" <>", ""),
        f"Subject:  {parsed.subject}",
        f"Team:     {decision.team}    Priority: {decision.priority}",
        f"Why:      {why}",
    ]
    if decision.tone is not None:
        lines.append(f"Tone:     {decision.tone.describe()}")
    if decision.tags:
        lines.append(f"Tags:     {', '.join(decision.tags)}")
    excerpt = parsed.text.strip()[:800]
    lines += ["", excerpt + ("\n[...]" if len(parsed.text.strip()) > 800 else "")]
    msg.set_content("\n".join(lines) + "\n", cte="quoted-printable")
    return msg


def send_alerts(conn: Connection, settings: Settings, decision: Decision, ticket_id: int,
                parsed: ParsedMail, now: datetime) -> list[int]:
    """Queue the decision's alerts in the caller's transaction; the outbox row ids."""
    if not decision.alerts:
        return []
    ids: list[int] = []
    with Session(bind=conn, join_transaction_mode="create_savepoint",
                 expire_on_commit=False) as session:
        for alert in decision.alerts:
            msg = alert_message(settings, decision, ticket_id, alert.to, alert.rule,
                                alert.reason, parsed)
            row = enqueue(session, kind=ALERT_KIND, msg=msg, ticket_id=ticket_id,
                          customer_id=None, now=now, hostname=settings.smtp.hostname)
            assert row.id is not None
            ids.append(row.id)
        session.commit()
    return ids
