"""The one way out: mail is written to the `outbox` table in the transaction that caused it,
and a worker sends it to the relay, retrying with backoff and parking what cannot be sent.

Delivery is at-least-once. A row is claimed with a lease (`claimed_until`) before it is sent;
if the daemon dies after the relay said 250 but before the row was marked sent, the lease runs
out and the row is sent again, with the same bytes and therefore the same Message-ID. Relays do
not promise to drop such duplicates (some dedupe on Message-ID, most do not); the recipient's
mail client usually collapses them because the Message-ID is identical. The window is the few
milliseconds between the relay's answer and our commit.
"""

from __future__ import annotations

import asyncio
import email.policy
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
from sqlalchemy import Connection, Engine, insert, or_, select, update
from sqlmodel import Session

from router import fastsql, log
from router.clock import Clock
from router.mail import msgid_normalize
from router.models import T_OUTBOX, T_THREAD_KEY, Outbox, OutboxStatus, ThreadKey
from router.settings import RelaySection, Settings
from router.wakeup import Wakeup

# Kinds of mail a person writes; every other kind addressed to a customer is automatic and
# counts against the customer's daily cap (router.ack).
HUMAN_KINDS = frozenset({"reply"})

# Serialised once with CRLF line ends: the bytes on the wire, byte for byte, on every attempt.
_WIRE_POLICY = email.policy.SMTP


def _addresses(values: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for _name, addr in getaddresses([str(v) for v in values or ()]):
        addr = addr.strip()
        if addr and "@" in addr and addr not in out:
            out.append(addr)
    return out


def _outbox_values(*, kind: str, msg: EmailMessage, ticket_id: int | None,
                   customer_id: int | None, now: datetime, hostname: str) -> dict[str, Any]:
    """The outbox row for `msg` (see `enqueue`); sets its Message-ID and Date, drops Bcc."""
    if msg["Message-ID"] is None:
        msg["Message-ID"] = make_msgid(domain=hostname)
    if msg["Date"] is None:
        msg["Date"] = format_datetime(now)
    message_id = msgid_normalize(str(msg["Message-ID"]))
    if message_id is None:
        raise ValueError(f"unusable Message-ID {msg['Message-ID']!r}")
    senders = _addresses(msg.get_all("From"))
    if not senders:
        raise ValueError("outgoing mail needs a From address")
    rcpt = _addresses([*(msg.get_all("To") or ()), *(msg.get_all("Cc") or ()),
                       *(msg.get_all("Bcc") or ())])
    if not rcpt:
        raise ValueError("outgoing mail needs at least one recipient (To, Cc or Bcc)")
    del msg["Bcc"]
    return {"created_at": now, "ticket_id": ticket_id, "customer_id": customer_id,
            "kind": kind, "mail_from": senders[0], "rcpt_to": rcpt, "message_id": message_id,
            "raw": msg.as_bytes(policy=_WIRE_POLICY), "status": OutboxStatus.QUEUED,
            "attempts": 0, "next_attempt_at": now}


def enqueue(session: Session, *, kind: str, msg: EmailMessage, ticket_id: int | None,
            customer_id: int | None, now: datetime, hostname: str) -> Outbox:
    """Add `msg` to the outbox in the caller's transaction (the caller commits).

    Gives the message a Message-ID and a Date if it has none, takes the envelope from the
    headers (From; To + Cc + Bcc, with Bcc removed from the sent copy), and records the
    Message-ID as a thread key of the ticket so that replies to it thread onto the ticket.
    After the commit, call `OutboxWorker.wake()` to send at once rather than at the next poll.
    """
    values = _outbox_values(kind=kind, msg=msg, ticket_id=ticket_id, customer_id=customer_id,
                            now=now, hostname=hostname)
    row = Outbox(**values)
    session.add(row)
    if ticket_id is not None:
        session.add(ThreadKey(message_id=values["message_id"], ticket_id=ticket_id))
    # The caller (ack, pipeline) wants the id for its decision record before it commits.
    session.flush()
    return row


# Built once: these run once per mail on the escalation scheduler's hot path.
_INSERT_OUTBOX = insert(T_OUTBOX).returning(T_OUTBOX.c.id)
_INSERT_THREAD_KEY = insert(T_THREAD_KEY)


def enqueue_core(conn: Connection, *, kind: str, msg: EmailMessage, ticket_id: int | None,
                 customer_id: int | None, now: datetime, hostname: str) -> int:
    """`enqueue` on a Core connection (e.g. `session.connection()`): the same rows, written
    at once rather than at the session's next flush, and no ORM unit of work, which costs
    more than the inserts themselves. Returns the outbox row's id."""
    return enqueue_row(conn, kind=kind, msg=msg, ticket_id=ticket_id, customer_id=customer_id,
                       now=now, hostname=hostname)[0]


def enqueue_row(conn: Connection, *, kind: str, msg: EmailMessage, ticket_id: int | None,
                customer_id: int | None, now: datetime, hostname: str
                ) -> tuple[int, dict[str, Any]]:
    """`enqueue_core`, returning the row's id and its values (Message-ID, recipients ...)."""
    values = _outbox_values(kind=kind, msg=msg, ticket_id=ticket_id, customer_id=customer_id,
                            now=now, hostname=hostname)
    row_id: int = fastsql.execute(conn, _INSERT_OUTBOX, values).scalar_one()
    if ticket_id is not None:
        fastsql.execute(conn, _INSERT_THREAD_KEY, {"message_id": values["message_id"],
                                          "ticket_id": ticket_id})
    return row_id, values


# ---------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class Result:
    """What the relay made of one attempt."""

    outcome: str          # "sent" | "retry" | "park"
    detail: str
    refused: str | None = None   # sent, but some recipients were refused


def _smtp_code(exc: BaseException) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        # Any temporary refusal means a later attempt may reach that recipient.
        return min(codes) if codes else None
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and code >= 200 else None


def classify_error(exc: BaseException) -> Result:
    """4xx, timeouts and connection trouble are worth retrying; 5xx is final.

    Authentication failures are retried although the relay answers 5xx: they are a
    configuration problem the admin can fix (password file, user), not a verdict on the mail.
    """
    detail = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Result("retry", detail)
    code = _smtp_code(exc)
    if code is not None and 500 <= code < 600:
        return Result("park", detail)
    return Result("retry", detail)


def _read_password(relay: RelaySection, base_dir: str) -> str | None:
    if not relay.password_file:
        return None
    path = Path(relay.password_file)
    if not path.is_absolute():
        path = Path(base_dir) / path
    return path.read_text(encoding="utf-8").strip()


async def deliver(relay: RelaySection, base_dir: str, *, mail_from: str, rcpt_to: list[str],
                  raw: bytes, local_hostname: str | None = None) -> Result:
    """One attempt at handing `raw` to the relay."""
    try:
        password = _read_password(relay, base_dir)
    except OSError as exc:
        return Result("retry", f"cannot read relay password_file: {exc}")
    try:
        errors, response = await aiosmtplib.send(
            raw, sender=mail_from, recipients=rcpt_to, hostname=relay.host, port=relay.port,
            username=relay.username or None, password=password if relay.username else None,
            start_tls=relay.starttls, timeout=relay.timeout.total_seconds(),
            local_hostname=local_hostname,
        )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return classify_error(exc)
    if errors:
        # Some recipients were refused; the mail went to the rest and cannot be unsent.
        refused = "refused: " + ", ".join(f"{r} ({e.code} {e.message})"
                                          for r, e in errors.items())
        return Result("sent", f"{response}; {refused}", refused)
    return Result("sent", response)


def backoff(attempts: int, *, base: timedelta, cap: timedelta,
            rng: random.Random | None = None) -> timedelta:
    """Exponential delay after the `attempts`-th failure, with "equal jitter": between half
    and all of the exponential value, so many rows failing together do not retry together."""
    exp = min(cap.total_seconds(), base.total_seconds() * 2 ** max(attempts - 1, 0))
    r = (rng or random).random()
    return timedelta(seconds=exp / 2 + r * exp / 2)


@dataclass(frozen=True)
class _Claimed:
    id: int
    message_id: str
    ticket_id: int | None
    kind: str
    mail_from: str
    rcpt_to: list[str]
    raw: bytes
    attempts: int
    lease: datetime


class OutboxWorker:
    """Sends due outbox rows; safe to run in several processes against one database."""

    def __init__(self, engine: Engine, settings_provider: Callable[[], Settings], clock: Clock,
                 *, poll: float = 0.5, batch: int = 10,
                 backoff_base: timedelta = timedelta(seconds=30),
                 backoff_cap: timedelta = timedelta(hours=1),
                 lease: timedelta | None = None, rng: random.Random | None = None) -> None:
        self.engine = engine
        self.settings_provider = settings_provider
        self.clock = clock
        self.poll = poll
        self.batch = batch
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._lease = lease
        self._rng = rng or random.Random()
        self._wake = Wakeup()
        self._postgres = engine.dialect.name == "postgresql"

    def lease_for(self, relay: RelaySection) -> timedelta:
        """Long enough that a slow but live send never loses its claim: aiosmtplib applies the
        timeout per step (connect, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA), so allow them all."""
        if self._lease is not None:
            return self._lease
        return max(timedelta(minutes=2), relay.timeout * 10)

    # -- wake-up ------------------------------------------------------------------------

    def wake(self) -> None:
        """Send now rather than after the poll interval. Callable from any thread (the
        pipeline commits in a worker thread)."""
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._wake.bind(asyncio.get_running_loop())
        logger = log.get("router.outbox")
        logger.info("outbox worker started")
        pause = self.poll
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    handled = await self.send_due()
                    pause = self.poll
                except Exception as exc:
                    # A database outage must not kill the worker (the rows stay queued), nor
                    # fill the log twice a second while it lasts.
                    logger.error("outbox pass failed", error=f"{type(exc).__name__}: {exc}",
                                 retry_in=pause)
                    await Wakeup().wait(stop, pause)
                    pause = min(pause * 2, 30.0)
                    continue
                if handled >= self.batch:
                    continue  # there may be more due right now
                await self._wake.wait(stop, self.poll)
        finally:
            self._wake.bind(None)
            logger.info("outbox worker stopped")

    async def send_due(self) -> int:
        """Claim what is due, send it, record each outcome; the number of rows handled."""
        settings = self.settings_provider()
        claimed = await asyncio.to_thread(self._claim, self.lease_for(settings.relay))
        if not claimed:
            return 0
        results = await asyncio.gather(*(self._send_one(row, settings) for row in claimed),
                                       return_exceptions=True)
        for row, res in zip(claimed, results, strict=True):
            if isinstance(res, BaseException):
                # The row keeps its lease and is retried when it expires.
                log.get("router.outbox").error("outbox send failed", outbox_id=row.id,
                                               message_id=row.message_id,
                                               error=f"{type(res).__name__}: {res}")
        return len(claimed)

    async def _send_one(self, row: _Claimed, settings: Settings) -> None:
        logger = log.get("router.outbox").bind(message_id=row.message_id, ticket=row.ticket_id,
                                               outbox_id=row.id, kind=row.kind)
        if not row.rcpt_to:
            result = Result("park", "no recipients")
        else:
            result = await deliver(settings.relay, settings.base_dir, mail_from=row.mail_from,
                                   rcpt_to=row.rcpt_to, raw=row.raw,
                                   local_hostname=settings.smtp.hostname)
        attempts = row.attempts + 1
        if result.outcome == "retry" and attempts >= settings.relay.max_attempts:
            result = Result("park", f"gave up after {attempts} attempts: {result.detail}")
        delay = (backoff(attempts, base=self.backoff_base, cap=self.backoff_cap, rng=self._rng)
                 if result.outcome == "retry" else None)
        recorded = await asyncio.to_thread(self._record, row, result, attempts, delay)
        fields: dict[str, Any] = {"attempts": attempts, "detail": result.detail}
        if not recorded:
            fields["lease_lost"] = True
        if result.outcome == "sent":
            logger.info("outbox sent", **fields)
        elif result.outcome == "retry":
            logger.warning("outbox retry", retry_in=delay.total_seconds() if delay else None,
                           **fields)
        else:
            logger.error("outbox parked", **fields)

    # -- database work (runs in a thread) ------------------------------------------------

    def _claim(self, lease: timedelta) -> list[_Claimed]:
        now = self.clock()
        until = now + lease
        free = or_(T_OUTBOX.c.claimed_until.is_(None), T_OUTBOX.c.claimed_until < now)
        due = ((T_OUTBOX.c.status == OutboxStatus.QUEUED) & (T_OUTBOX.c.next_attempt_at <= now)
               & free)
        pick = (select(T_OUTBOX.c.id).where(due)
                .order_by(T_OUTBOX.c.next_attempt_at, T_OUTBOX.c.id).limit(self.batch))
        if self._postgres:
            # Rows another instance is claiming right now are skipped, not waited for.
            pick = pick.with_for_update(skip_locked=True)
        # One statement: on SQLite it takes the write lock before it reads, so two claimers
        # serialise instead of both reading the same rows (and one failing to upgrade its
        # read lock); the repeated `due` makes PostgreSQL re-check a row it waited for.
        stmt = (update(T_OUTBOX).where(T_OUTBOX.c.id.in_(pick), due).values(claimed_until=until)
                .returning(T_OUTBOX.c.id, T_OUTBOX.c.message_id, T_OUTBOX.c.ticket_id,
                           T_OUTBOX.c.kind, T_OUTBOX.c.mail_from, T_OUTBOX.c.rcpt_to,
                           T_OUTBOX.c.raw, T_OUTBOX.c.attempts))
        # Nothing due is the common case: find that out by reading, which on SQLite waits
        # for no one, rather than by an UPDATE that queues for the write lock (behind the
        # pipeline's transactions) twice a second to change nothing.
        with self.engine.connect() as conn:
            if conn.execute(select(T_OUTBOX.c.id).where(due).limit(1)).first() is None:
                return []
        with self.engine.begin() as conn:
            claimed = conn.execute(stmt).all()
        out = [_Claimed(id=r.id, message_id=r.message_id, ticket_id=r.ticket_id, kind=r.kind,
                        mail_from=r.mail_from, rcpt_to=list(r.rcpt_to or []), raw=bytes(r.raw),
                        attempts=r.attempts, lease=until) for r in claimed]
        return sorted(out, key=lambda c: c.id)

    def _record(self, row: _Claimed, result: Result, attempts: int,
                delay: timedelta | None) -> bool:
        now = self.clock()
        if result.outcome == "sent":
            # Recorded even if our lease was taken over: the mail is out, and marking it sent
            # stops the other claimer's retry from sending it a third time.
            cond = (T_OUTBOX.c.id == row.id) & (T_OUTBOX.c.status == OutboxStatus.QUEUED)
            values: dict[str, Any] = {"status": OutboxStatus.SENT, "sent_at": now,
                                      "attempts": attempts, "claimed_until": None,
                                      "last_error": result.refused}
        else:
            # A failure only counts if we still hold the lease; otherwise another worker owns
            # the row and its outcome wins.
            cond = ((T_OUTBOX.c.id == row.id) & (T_OUTBOX.c.status == OutboxStatus.QUEUED)
                    & (T_OUTBOX.c.claimed_until == row.lease))
            values = {"attempts": attempts, "claimed_until": None,
                      "last_error": result.detail[:4000]}
            if result.outcome == "retry":
                assert delay is not None
                values["next_attempt_at"] = now + delay
            else:
                values["status"] = OutboxStatus.PARKED
        with self.engine.begin() as conn:
            return conn.execute(update(T_OUTBOX).where(cond).values(**values)).rowcount == 1


def requeue(session: Session, outbox_id: int, now: datetime) -> bool:
    """Put a parked or failed row back in the queue (admin action after fixing the cause)."""
    row = session.get(Outbox, outbox_id)
    if row is None or row.status == OutboxStatus.QUEUED:
        return False
    row.status = OutboxStatus.QUEUED
    row.attempts = 0
    row.next_attempt_at = now
    row.claimed_until = None
    session.add(row)
    return True
