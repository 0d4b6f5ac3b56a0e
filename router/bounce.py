"""Delivery status notifications (RFC 3464) about mail we sent.

The pipeline checks `is_dsn` before threading: a DSN never opens a ticket and never gets an
ack. `handle_dsn` then finds the outbox row the report is about (`match_bounce`) and records
it (`apply_bounce`): a failed delivery marks the row failed and puts a "bounce" event on its
ticket; a report that matches nothing is still kept as an event without a ticket, so an admin
can see bounces for mail that did not come from us (backscatter) or that we cannot place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from typing import Any, Protocol

from sqlmodel import Session, col, select

from router import log
from router.mail import msgid_list, msgid_normalize
from router.models import Event, Outbox, OutboxStatus


class ReportSource(Protocol):
    """What we need of a parsed message (router.mail.ParsedMail satisfies it)."""

    raw: bytes
    message_id: str | None
    in_reply_to: list[str]
    references: list[str]

    def header(self, name: str) -> str | None: ...


@dataclass
class RecipientStatus:
    recipient: str
    action: str             # failed | delayed | delivered | relayed | expanded
    status: str             # 5.1.1
    diagnostic: str
    remote_mta: str

    def as_dict(self) -> dict[str, str]:
        return {"recipient": self.recipient, "action": self.action, "status": self.status,
                "diagnostic": self.diagnostic, "remote_mta": self.remote_mta}


@dataclass
class Report:
    """What an RFC 3464 report says, and which of our Message-IDs it may be about."""

    envelope_id: str | None = None
    reporting_mta: str = ""
    recipients: list[RecipientStatus] = field(default_factory=list)
    original_ids: list[str] = field(default_factory=list)   # best candidates first

    @property
    def failed(self) -> bool:
        """Delayed, delivered or relayed reports are news, not failures."""
        if not self.recipients:
            return True   # a report without per-recipient fields: treat as the bounce it is
        return any(r.action == "failed" or r.status.startswith("5.") for r in self.recipients)

    def summary(self) -> str:
        parts = []
        for r in self.recipients:
            text = f"{r.recipient or '?'}: {r.action or '?'} {r.status}".strip()
            if r.diagnostic:
                text += f" ({r.diagnostic})"
            parts.append(text)
        return "; ".join(parts) or "delivery status notification without recipient details"


def is_dsn(parsed: ReportSource) -> bool:
    ctype = "".join((parsed.header("Content-Type") or "").lower().split()).replace('"', "")
    return ctype.startswith("multipart/report") and "report-type=delivery-status" in ctype


def _text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _typed(value: Any) -> str:
    """``rfc822; bob@example.com`` -> ``bob@example.com`` (address-type / diagnostic-type)."""
    text = _text(value)
    kind, sep, rest = text.partition(";")
    return rest.strip() if sep and kind.strip().isalnum() else text


def _field_groups(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    if isinstance(payload, str):
        # Some MTAs send the groups undecoded; split on blank lines and parse each.
        blocks = [b for b in payload.replace("\r\n", "\n").split("\n\n") if b.strip()]
        return [HeaderParser(policy=compat32).parsestr(b) for b in blocks]
    return []


def _ids_from_headers(headers: Message) -> list[str]:
    ids = []
    if headers.get("Message-ID"):
        norm = msgid_normalize(str(headers["Message-ID"]))
        if norm:
            ids.append(norm)
    return ids


def read_report(parsed: ReportSource) -> Report:
    """Everything useful in the DSN; never raises on odd structure."""
    report = Report()
    try:
        root = BytesParser(policy=compat32).parsebytes(parsed.raw)
    except Exception:
        root = None
    embedded: list[str] = []
    for part in root.walk() if root is not None else ():
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            groups = _field_groups(part)
            if groups:
                first = groups[0]
                report.reporting_mta = _typed(first.get("Reporting-MTA"))
                if first.get("Original-Envelope-Id"):
                    report.envelope_id = _text(first.get("Original-Envelope-Id"))
            for group in groups[1:] if len(groups) > 1 else groups:
                recipient = _typed(group.get("Final-Recipient") or group.get("Original-Recipient"))
                if not recipient and not group.get("Action"):
                    continue
                report.recipients.append(RecipientStatus(
                    recipient=recipient, action=_text(group.get("Action")).lower(),
                    status=_text(group.get("Status")),
                    diagnostic=_typed(group.get("Diagnostic-Code"))[:500],
                    remote_mta=_typed(group.get("Remote-MTA"))))
        elif ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message):
                embedded.extend(_ids_from_headers(inner))
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                headers = HeaderParser(policy=compat32).parsestr(
                    payload.decode("utf-8", "replace"))
                embedded.extend(_ids_from_headers(headers))
    candidates = list(embedded)
    if report.envelope_id:
        # We set no ENVID ourselves, but other senders put the Message-ID there.
        candidates.extend(msgid_list(report.envelope_id) or
                          [f"<{report.envelope_id.strip('<>')}>"])
    candidates.extend(parsed.in_reply_to)
    candidates.extend(reversed(parsed.references))
    own = parsed.message_id
    report.original_ids = [c for c in dict.fromkeys(candidates) if c != own]
    return report


def match_bounce(session: Session, parsed: ReportSource) -> Outbox | None:
    """The outbox row a DSN reports on, or None (not a DSN, or not about our mail)."""
    if not is_dsn(parsed):
        return None
    ids = read_report(parsed).original_ids
    if not ids:
        return None
    rows = {r.message_id: r for r in
            session.exec(select(Outbox).where(col(Outbox.message_id).in_(ids))).all()}
    return next((rows[i] for i in ids if i in rows), None)


def apply_bounce(session: Session, outbox: Outbox | None, parsed: ReportSource,
                 now: datetime) -> Event:
    """Record the DSN; mark the outbox row failed when the report says delivery failed."""
    report = read_report(parsed)
    data: dict[str, Any] = {
        "matched": outbox is not None,
        "dsn_message_id": parsed.message_id,
        "reporting_mta": report.reporting_mta,
        "recipients": [r.as_dict() for r in report.recipients],
        "failed": report.failed,
        "summary": report.summary(),
    }
    ticket_id = None
    if outbox is not None:
        ticket_id = outbox.ticket_id
        data.update(outbox_id=outbox.id, message_id=outbox.message_id, outbox_kind=outbox.kind)
        if report.failed:
            outbox.status = OutboxStatus.FAILED
            outbox.last_error = f"bounced: {report.summary()}"[:4000]
            # A row still queued for retry must not be sent again after a definite bounce.
            outbox.claimed_until = None
            session.add(outbox)
    else:
        data["original_ids"] = report.original_ids[:10]
    event = Event(at=now, ticket_id=ticket_id, kind="bounce", data=data)
    session.add(event)
    log.get("router.bounce").info("dsn recorded", ticket=ticket_id, matched=outbox is not None,
                                  failed=report.failed, message_id=data.get("message_id"),
                                  summary=report.summary())
    return event


def handle_dsn(session: Session, parsed: ReportSource, now: datetime) -> Event | None:
    """For the pipeline: None if `parsed` is not a DSN (route it as usual), else the event
    recording it (do not open or thread a ticket, do not ack)."""
    if not is_dsn(parsed):
        return None
    return apply_bounce(session, match_bounce(session, parsed), parsed, now)
