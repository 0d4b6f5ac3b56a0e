"""The tables. SQLModel is the schema and the ORM for the application; the intake's hot insert
uses SQLAlchemy Core on the same `Table` objects (PERF-NOTES: the ORM costs 8–15× per row).

Times are stored as naive UTC and read back as aware UTC (`UTCDateTime`), so SQLite and
PostgreSQL behave the same and no code compares naive with aware datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    LargeBinary,
    Table,
    Text,
    TypeDecorator,
    false,
    select,
)
from sqlalchemy.orm import class_mapper, column_property, make_transient_to_detached
from sqlmodel import Field, SQLModel

M = TypeVar("M", bound=SQLModel)


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use router.clock")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)

    def bind_processor(self, dialect: Any) -> Any:
        """On SQLite, `process_bind_param` and the SQLite type's own formatting in one step:
        the routing transaction binds a few dozen datetimes per message, and the two layers
        cost twice what the one does. The text is the same, character for character; a
        storage format other than SQLAlchemy's default gets the two layers."""
        impl = self.impl_instance.dialect_impl(dialect)
        if dialect.name != "sqlite" or getattr(impl, "_storage_format", None) != _SQLITE_FORMAT:
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError("naive datetime given to the database; use router.clock")
            value = value.astimezone(UTC)
            return _SQLITE_TEXT % (value.year, value.month, value.day, value.hour,
                                   value.minute, value.second, value.microsecond)

        return process


# SQLAlchemy's SQLite DATETIME text, as a named format (its own) and positionally (ours).
_SQLITE_FORMAT = ("%(year)04d-%(month)02d-%(day)02d "
                  "%(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d")
_SQLITE_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def _utc(**kw: Any) -> Any:
    nullable = kw.pop("nullable", True)
    index = kw.pop("index", False)
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable, index=index), **kw)


def _json(default: Any) -> Any:
    # The column default serves Core inserts (the pipeline's), which bypass the model.
    return Field(default_factory=default,
                 sa_column=Column(JSON, nullable=False, default=lambda: default()))


class InboundStatus:
    NEW = "new"          # committed, not yet through the pipeline
    DONE = "done"        # turned into (or threaded onto) a ticket
    PARKED = "parked"    # the pipeline raised; kept with its traceback for an admin
    SPAM = "spam"        # stored, not routed
    REFUSED = "refused"  # sent to an agent reply address, failed its checks (agentmail)


class Inbound(SQLModel, table=True):
    """A message as it was accepted: its envelope, nothing interpreted; its bytes are in
    `inbound_raw` (read-only here as `raw`)."""

    __tablename__ = "inbound"
    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = _utc(nullable=False)
    channel: str = Field(max_length=16)               # smtp | lmtp | imap | pipe
    mail_from: str = Field(default="", sa_column=Column(Text, nullable=False))
    rcpt_to: list[str] = _json(list)
    size: int
    message_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    dedupe_key: str = Field(max_length=64, unique=True)
    deliveries: int = 1                                # how often the same mail arrived
    status: str = Field(default=InboundStatus.NEW, max_length=16)
    attempts: int = 0
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    ticket_id: int | None = Field(default=None, index=True)
    processed_at: datetime | None = _utc()

    # status/received_at: the pipeline takes messages in order of arrival; message_id: a
    # reply looks for its original among the messages not routed yet.
    __table_args__ = (Index("ix_inbound_status_id", "status", "id"),
                      Index("ix_inbound_status_received", "status", "received_at", "id"),
                      Index("ix_inbound_message_id", "message_id"))


class InboundRaw(SQLModel, table=True):
    """The bytes of an inbound message, exactly as accepted, written once. Not in `inbound`,
    whose row routing updates: SQLite writes a whole row again when an update changes its
    size, and the bytes are most of the row (routing wrote each mail twice)."""

    __tablename__ = "inbound_raw"
    inbound_id: int = Field(foreign_key="inbound.id", primary_key=True,
                            sa_column_kwargs={"autoincrement": False})
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SpoolCursor(SQLModel, table=True):
    """How far the pipeline moved an SMTP intake spool into `inbound` (router.intake.spool):
    written in the transaction that inserts the moved rows, so each is moved exactly once."""

    __tablename__ = "spool_cursor"
    spool: str = Field(primary_key=True, max_length=64)    # the spool file's own id
    path: str = Field(sa_column=Column(Text, nullable=False))
    moved_through: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    moved_at: datetime = _utc(nullable=False)


class Customer(SQLModel, table=True):
    """One record per mail address, across every role address and channel."""

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    name: str = ""
    language: str | None = Field(default=None, max_length=16)
    vip: bool = False
    created_at: datetime = _utc(nullable=False)
    last_seen_at: datetime = _utc(nullable=False)
    attributes: dict[str, Any] = _json(dict)


class TicketStatus:
    NEW = "new"
    OPEN = "open"
    PENDING = "pending"      # waiting for the customer
    SOLVED = "solved"
    CLOSED = "closed"
    ALL = (NEW, OPEN, PENDING, SOLVED, CLOSED)


class Ticket(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    team: str = Field(max_length=64)
    status: str = Field(default=TicketStatus.NEW, max_length=16)
    priority: str = Field(default="normal", max_length=16)
    subject: str = Field(default="", sa_column=Column(Text, nullable=False))
    customer_id: int = Field(foreign_key="customer.id", index=True)
    address: str = Field(max_length=320)              # the role address it came in by
    tag: str | None = Field(default=None, max_length=128)  # plus-address tag (campaign)
    language: str | None = Field(default=None, max_length=16)
    assignee: str | None = Field(default=None, max_length=320)
    created_at: datetime = _utc(nullable=False)
    updated_at: datetime = _utc(nullable=False)
    last_customer_at: datetime = _utc(nullable=False)
    first_response_at: datetime | None = _utc()
    solved_at: datetime | None = _utc()
    reopened: int = 0
    promised_at: datetime | None = _utc()             # the turnaround the ack promised
    promise_basis: str | None = Field(default=None, max_length=32)
    promise_kept: bool | None = None
    next_due_at: datetime | None = _utc(index=True)   # the escalation scheduler's next wake-up
    config_version: str | None = Field(default=None, max_length=64)
    tags: list[str] = _json(list)
    campaign: str | None = Field(default=None, max_length=128)

    __table_args__ = (Index("ix_ticket_team_status", "team", "status"),)


class ArticleKind:
    IN = "in"            # from the customer
    OUT = "out"          # to the customer (agent reply or automatic mail)
    NOTE = "note"        # internal


class Article(SQLModel, table=True):
    """One message of a ticket's thread."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    inbound_id: int | None = Field(default=None, foreign_key="inbound.id")
    kind: str = Field(max_length=8)
    automatic: bool = False
    message_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    sender: str = Field(default="", max_length=320)
    sender_name: str = ""
    recipients: list[str] = _json(list)
    subject: str = Field(default="", sa_column=Column(Text, nullable=False))
    body_text: str = Field(default="", sa_column=Column(Text, nullable=False))
    body_html: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    author: str | None = Field(default=None, max_length=320)
    malformed: bool = False
    defects: list[str] = _json(list)
    created_at: datetime = _utc(nullable=False)


class Attachment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    article_id: int = Field(foreign_key="article.id", index=True)
    filename: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    content_type: str = Field(max_length=255)
    size: int
    sha256: str = Field(max_length=64, index=True)
    inline: bool = False
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ThreadKey(SQLModel, table=True):
    """Every Message-ID that belongs to a ticket, inbound or sent by us: the threading index.
    `awaited`: not a message of the ticket yet, but one that a message opening the ticket
    answered (In-Reply-To, References) before it arrived. Only that message itself, when it
    comes, threads by it (`router.route.find_thread`); replies naming it do not, or every
    customer answering one newsletter would share a ticket."""

    __tablename__ = "thread_key"
    message_id: str = Field(sa_column=Column(Text, primary_key=True))
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    awaited: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class Decision(SQLModel, table=True):
    """Why a message went where it went: every rule hit, explainable later."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    inbound_id: int | None = Field(default=None, foreign_key="inbound.id")
    kind: str = Field(default="route", max_length=16)  # route | thread | reroute
    team: str = Field(max_length=64)
    priority: str = Field(default="normal", max_length=16)
    address: str | None = Field(default=None, max_length=320)
    tag: str | None = Field(default=None, max_length=128)
    reason: str = Field(default="", sa_column=Column(Text, nullable=False))
    hits: list[dict[str, Any]] = _json(list)
    config_version: str | None = Field(default=None, max_length=64)
    created_at: datetime = _utc(nullable=False)


class OutboxStatus:
    QUEUED = "queued"
    SENT = "sent"
    PARKED = "parked"    # gave up: 5xx or too many attempts
    FAILED = "failed"    # sent, then bounced (DSN)


class Outbox(SQLModel, table=True):
    """Every mail that leaves, written in the transaction that caused it."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _utc(nullable=False)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    customer_id: int | None = Field(default=None, foreign_key="customer.id", index=True)
    kind: str = Field(max_length=32)                   # ack | reply | notify | escalation ...
    mail_from: str = Field(max_length=320)
    rcpt_to: list[str] = _json(list)
    message_id: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: str = Field(default=OutboxStatus.QUEUED, max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = _utc(nullable=False)
    claimed_until: datetime | None = _utc()
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    sent_at: datetime | None = _utc()

    __table_args__ = (Index("ix_outbox_status_next", "status", "next_attempt_at"),)


class Event(SQLModel, table=True):
    """The event log: what happened to a ticket (or the daemon), in order."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _utc(nullable=False, index=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    kind: str = Field(max_length=64)
    data: dict[str, Any] = _json(dict)


class ConfigVersion(SQLModel, table=True):
    """Each applied router.toml, so every decision can name the config it was made under."""

    __tablename__ = "config_version"
    id: int | None = Field(default=None, primary_key=True)
    digest: str = Field(max_length=64, unique=True)
    source: str = Field(default="", sa_column=Column(Text, nullable=False))
    applied_at: datetime = _utc(nullable=False)


class ImapCursor(SQLModel, table=True):
    """Where IMAP intake stopped in a folder: UIDs are only meaningful within a UIDVALIDITY."""

    __tablename__ = "imap_cursor"
    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(max_length=255)
    folder: str = Field(max_length=255)
    uidvalidity: int = Field(sa_column=Column(BigInteger, nullable=False))  # 32-bit unsigned
    last_uid: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    updated_at: datetime = _utc(nullable=False)

    __table_args__ = (Index("ux_imap_cursor_account_folder", "account", "folder",
                            unique=True),)


class ClassifierModel(SQLModel, table=True):
    """A trained team classifier (learned from routed and agent-corrected tickets)."""

    __tablename__ = "classifier_model"
    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _utc(nullable=False)
    examples: int = 0
    metrics: dict[str, Any] = _json(dict)
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SlaClock(SQLModel, table=True):
    """One SLA clock of a ticket (router.sla): running, paused or stopped.

    `elapsed` is the time counted before `running_since`, in the clock's own unit (business
    seconds where the team counts business hours, else seconds), so a clock that paused and
    resumed needs no history to know where it stands. `deadline_at` is set only while the
    clock runs, which makes "overdue now" one indexed range query.
    """

    __tablename__ = "sla_clock"
    ticket_id: int = Field(foreign_key="ticket.id", primary_key=True)
    clock: str = Field(max_length=32, primary_key=True)  # first_response | next_response | ...
    cycle: int = 0                                   # next_response: one cycle per reply
    started_at: datetime = _utc(nullable=False)
    running_since: datetime | None = _utc()
    elapsed: float = 0.0
    deadline_at: datetime | None = _utc(index=True)
    stopped_at: datetime | None = _utc()
    breached: bool = False


class Escalation(SQLModel, table=True):
    """A ladder step that fired (or was skipped) for one ticket: the proof it fired once."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id")
    clock: str = Field(max_length=32)
    cycle: int = 0
    step: str = Field(max_length=128)                # "ops:after=15m", "breach" ...
    team: str = Field(max_length=64)
    status: str = Field(default="fired", max_length=16)   # fired | skipped
    due_at: datetime = _utc(nullable=False)
    fired_at: datetime = _utc(nullable=False)
    actions: dict[str, Any] = _json(dict)
    webhook_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    webhook_status: str | None = Field(default=None, max_length=16)  # pending | sent | failed
    webhook_attempts: int = 0
    webhook_next_at: datetime | None = _utc()
    webhook_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))

    __table_args__ = (
        Index("ux_escalation_ticket_clock_cycle_step", "ticket_id", "clock", "cycle", "step",
              unique=True),
        Index("ix_escalation_webhook", "webhook_status", "webhook_next_at"),
    )


# ---------------------------------------------------------------------------- web console


class Account(SQLModel, table=True):
    """Who may log in to the web console and the API (router.accounts, router.web).

    Agents and leads must also be members of a team in router.toml; the config decides which
    queues they see, this table only proves who they are. `session_epoch` goes up on a
    password change or a "log out everywhere", which invalidates every signed session cookie.
    """

    __tablename__ = "account"
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    role: str = Field(default="agent", max_length=16)      # agent | lead | admin
    password_hash: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    session_epoch: int = 0
    disabled: bool = False
    created_at: datetime = _utc(nullable=False)
    updated_at: datetime = _utc(nullable=False)


class ApiToken(SQLModel, table=True):
    """A bearer token for the REST API, stored as its SHA-256 (the token itself is 256 random
    bits, shown once by `router user token`)."""

    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True)
    token_hash: str = Field(max_length=64, unique=True)
    name: str = Field(default="", max_length=128)
    created_at: datetime = _utc(nullable=False)
    last_used_at: datetime | None = _utc()
    revoked: bool = False


class WebSecret(SQLModel, table=True):
    """The key that signs session cookies, made on first start and shared by every instance
    on the same database, so a login survives a restart and works behind a load balancer."""

    __tablename__ = "web_secret"
    id: int | None = Field(default=None, primary_key=True)
    secret: str = Field(max_length=128)
    created_at: datetime = _utc(nullable=False)


# The web console's queue pages page by keyset (ORDER BY x, id ... WHERE (x, id) < cursor)
# within one team's status; these keep a page an index range scan at any table size.
Index("ix_ticket_team_status_id", Ticket.team, Ticket.status, Ticket.id)  # type: ignore[arg-type]
Index("ix_ticket_team_status_updated", Ticket.team, Ticket.status,  # type: ignore[arg-type]
      Ticket.updated_at, Ticket.id)
# Every new ticket's promise (router.turnaround.history) counts the team's unanswered backlog
# and summarises its answered tickets; assignment counts each agent's open tickets. Covering
# indexes keep those reads off the table rows, whose number only grows.
Index("ix_ticket_team_status_first_response", Ticket.team,  # type: ignore[arg-type]
      Ticket.status, Ticket.first_response_at)
Index("ix_ticket_team_first_response_created", Ticket.team,  # type: ignore[arg-type]
      Ticket.first_response_at, Ticket.created_at)
Index("ix_ticket_assignee_status", Ticket.assignee, Ticket.status)  # type: ignore[arg-type]


def table_of(model: type[SQLModel]) -> Table:
    """The model's `Table`, for SQLAlchemy Core statements on the hot paths."""
    return model.__table__  # type: ignore[attr-defined, no-any-return]


# The tables for Core statements: one typed name each, used by every module.
T_INBOUND = table_of(Inbound)
T_INBOUND_RAW = table_of(InboundRaw)
# `Inbound.raw` for the ORM's readers (the console, tools, tests); the hot paths join.
Inbound.raw = column_property(  # type: ignore[attr-defined]
    select(T_INBOUND_RAW.c.raw).where(T_INBOUND_RAW.c.inbound_id == T_INBOUND.c.id)
    .scalar_subquery())
T_CUSTOMER = table_of(Customer)
T_TICKET = table_of(Ticket)
T_ARTICLE = table_of(Article)
T_ATTACHMENT = table_of(Attachment)
T_THREAD_KEY = table_of(ThreadKey)
T_DECISION = table_of(Decision)
T_OUTBOX = table_of(Outbox)
T_EVENT = table_of(Event)
T_CONFIG_VERSION = table_of(ConfigVersion)
T_IMAP_CURSOR = table_of(ImapCursor)
T_SPOOL_CURSOR = table_of(SpoolCursor)
T_CLASSIFIER_MODEL = table_of(ClassifierModel)
T_SLA_CLOCK = table_of(SlaClock)
T_ESCALATION = table_of(Escalation)


def loaded(model: type[M], values: dict[str, Any]) -> M:
    """An instance holding `values` as though the ORM had just loaded that row: detached, so
    `session.add` makes it persistent with no query. Built the way the ORM builds loaded rows
    (the model's constructor validates and costs ten times more)."""
    obj = class_mapper(model).class_manager.new_instance()
    obj.__dict__.update(values)
    make_transient_to_detached(obj)
    return cast(M, obj)
