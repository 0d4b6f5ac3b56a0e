"""Everything after acceptance: parse → thread → classify → route, from the stored message.

The worker reads a batch of new inbound rows and, outside any write transaction, parses them
and classifies those that look like new tickets (the expensive part). It then handles the
batch in short write transactions, its statements run through `router.fastsql`. A message
whose handling raises rolls its transaction back; the batch is handled again with that
message in a savepoint of its own, where it is *parked* with its traceback if it raises
again, and the rest commits: nothing is dropped, nothing blocks. A crash rolls the open
transaction back to "new", so a restart processes those messages again from the stored
bytes.

On PostgreSQL the batch is claimed with ``FOR UPDATE SKIP LOCKED`` so several daemon
instances share the work, in one transaction. On SQLite the write transaction begins
IMMEDIATE and lasts one slice of time at most, so other writers (the console, the outbox,
`router ingest`) wait little, and the workers take turns at it (router.turns). SMTP intake
never waits for it: it commits into spools, which the first worker moves into ``inbound``
(router.intake.spool) within its write transactions. Those commit without a sync of their
own and never checkpoint (`_writing`, router.checkpoint).
Several workers of one instance split the messages by id (`part`); a reply whose original is
still new waits for it (`ParentPending`), so it threads rather than opening a ticket.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from sqlalchemy import Connection, Engine, bindparam, func, insert, inspect, select, update
from sqlalchemy.orm import class_mapper
from sqlmodel import Session

from router import agentmail, fastsql, learn, log
from router.bounce import handle_dsn, is_dsn
from router.checkpoint import Checkpointer
from router.classify import Decision, classify
from router.clock import Clock, system_clock
from router.db import is_sqlite, make_engine, sqlite_file, storage_unavailable
from router.intake.spool import SpoolMover
from router.mail import ParsedMail, normalize_address, parse
from router.models import (
    T_CUSTOMER,
    T_EVENT,
    T_INBOUND,
    T_INBOUND_RAW,
    Article,
    Customer,
    InboundStatus,
    Ticket,
    loaded,
    table_of,
)
from router.route import (
    CustomerRef,
    ThreadMatch,
    customer_for,
    find_thread,
    open_ticket,
    thread_onto,
)
from router.rules import Context
from router.rules.alerts import send_alerts
from router.settings import Settings
from router.turnaround import BACKLOG_STATUSES, Backlogs
from router.turns import Turns

UNKNOWN_SENDER = "unknown-sender@invalid"
# Messages prepared at a time while another worker writes: about 1.5 ms each, so the turn
# waits a few ms at most once the other lets go.
PREPARE_STEP = 4
T = TypeVar("T")


@dataclass
class Handled:
    """What the pipeline did with one message; handed to the hooks that run after routing,
    inside the same transaction (a hook's rows commit or roll back with the ticket)."""

    inbound: Any                  # the inbound row (id, mail_from, rcpt_to, received_at ...)
    parsed: ParsedMail
    ticket_id: int
    article_id: int
    customer: CustomerRef
    new_ticket: bool
    settings: Settings
    now: datetime
    decision: Decision | None = None   # the routing decision of a new ticket (classify)
    conn: Connection | None = None
    # The team backlogs this transaction counted (for the ack's promise), while valid.
    backlogs: Backlogs | None = None
    # What hooks worked out before the write lock (`AheadHook`), by hook.
    early: dict[Any, Any] = field(default_factory=dict)
    _session: Session | None = None
    _rows: dict[tuple[type, int], Any] = field(default_factory=dict)
    _detached: list[Any] = field(default_factory=list)

    def know(self, model: type[T], values: dict[str, Any]) -> None:
        """Routing just wrote (or read back) this row: hooks get it from `values` rather than
        by a query (`get`)."""
        self.hold(loaded(model, values))

    def hold(self, obj: Any) -> None:
        """A row of no session (`models.loaded`) that hooks may change: `finish` writes
        what they set on it. It joins the session when a hook opens one."""
        identity = inspect(obj).identity
        self._rows[(type(obj), identity[0] if len(identity) == 1 else identity)] = obj
        if self._session is not None:
            self._session.add(obj)
        else:
            self._detached.append(obj)

    def session(self) -> Session:
        """One ORM session for every hook of this message, on the routing connection: the
        ticket and customer are loaded once and all hooks' rows go out in one flush."""
        if self._session is None:
            assert self.conn is not None
            # No savepoint of its own: its commit (`finish`) only flushes, the batch's
            # commit makes the rows durable, the message's savepoint rolls them back.
            self._session = Session(bind=self.conn, join_transaction_mode="rollback_only",
                                    expire_on_commit=False)
            # In the session before any hook queries it: a query would load a second copy.
            self._session.add_all(self._detached)
            self._detached.clear()
        return self._session

    def get(self, model: type[T], ident: Any) -> T | None:
        """A row routing wrote (`know`) or a hook holds (`hold`), with no session: a hook
        that only reads it and sets its columns needs none, and `finish` writes what it
        set. `ident`: the primary key (a tuple when it has several columns). Any other row
        through `session().get`, held here: the session's identity map is weak, and a row
        no hook changed would otherwise be loaded again by the next hook."""
        key = (model, ident)
        if key not in self._rows:
            self._rows[key] = self.session().get(model, ident)
        return cast("T | None", self._rows[key])

    def finish(self) -> None:
        """The hooks are done: write their rows (the routing transaction commits them)."""
        # The rows routing wrote are the ones every hook changes (the ticket's promise and
        # next due time, mostly), and a reply's SLA clocks: an UPDATE of their changed
        # columns costs a fraction of the unit of work's flush. They may never have joined
        # a session (`get`): the ORM tracks what is set on a detached row as on a
        # persistent one. Anything else the hooks did goes out in the session's flush.
        assert self.conn is not None
        session = self._session
        for (model, _ident), obj in self._rows.items():
            if obj is None:
                continue
            state = inspect(obj)
            if state.key is None or not state.committed_state:
                continue
            changes = {key: state.dict[key] for key in state.committed_state}
            update, keys = _update_by_key(model, tuple(sorted(changes)))
            fastsql.execute(self.conn, update, {
                **{f"k_{k}": v for k, v in zip(keys, state.identity, strict=True)},
                **{f"v_{k}": v for k, v in changes.items()}})
            if session is not None and state.session_id == session.hash_key:
                session.expunge(obj)  # the flush below need not look at it again
        if session is not None:
            # A flush, not commit(): in "rollback_only" mode commit() only flushes too,
            # after a walk through the session's transaction states (the flush alone is
            # cheaper).
            session.flush()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


@lru_cache(maxsize=64)
def _update_by_key(model: type, columns: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    """UPDATE of `columns` of one row by its primary key, and the key's column names (in
    the order of an identity)."""
    table = table_of(model)
    keys = tuple(c.key for c in class_mapper(model).primary_key)
    stmt = update(table).where(*(table.c[k] == bindparam(f"k_{k}") for k in keys)).values(
        {c: bindparam(f"v_{c}") for c in columns})
    return stmt, keys


CustomerFacts = tuple[bool, tuple[tuple[str, Any], ...], str | None]


def _facts(vip: Any, attributes: Any, language: str | None) -> CustomerFacts:
    """What a routing decision reads from the customer record (VIP, attributes, language),
    in a form that compares by value."""
    attrs = attributes if isinstance(attributes, dict) else {}
    return bool(vip), tuple(sorted((str(k), v) for k, v in attrs.items())), language


def sender_of(parsed: ParsedMail, inbound: Any) -> str:
    # One customer per address: Alice@Example.org and alice@example.org are one person.
    return normalize_address(parsed.sender_email or inbound.mail_from) or UNKNOWN_SENDER


@dataclass
class _Tally:
    """What one write transaction did, counted once it commits."""

    processed: int = 0
    parked: int = 0
    deferred: int = 0


class _Redo(Exception):
    """A message raised after it may have written rows: roll the slice back."""

    def __init__(self, inbound_id: int) -> None:
        super().__init__(inbound_id)
        self.inbound_id = inbound_id


class ParentPending(Exception):
    """The message answers one that arrived earlier and is still waiting for another worker
    (or instance): handled now it would open a ticket of its own instead of threading."""


# Built once: the hot path's statements cost more to build than to run.
# The messages a reply names, by Message-ID alone: the index on it then serves the query
# (with a status condition SQLite would scan every message not routed yet).
_NAMED = select(T_INBOUND.c.id, T_INBOUND.c.status, T_INBOUND.c.received_at).where(
    T_INBOUND.c.message_id.in_(bindparam("keys", expanding=True)))
# Messages are routed in order of arrival, so an original is routed before the replies
# to it that wait for it (`_check_parents`), whatever order they were stored in.
_ARRIVAL = (T_INBOUND.c.received_at, T_INBOUND.c.id)
_CUSTOMER_FACTS = select(T_CUSTOMER.c.vip, T_CUSTOMER.c.attributes,
                         T_CUSTOMER.c.language).where(T_CUSTOMER.c.email == bindparam("email"))
_CUSTOMER_LANGUAGE = update(T_CUSTOMER).where(T_CUSTOMER.c.id == bindparam("cid")).values(
    language=bindparam("language"))
_NEXT_NEW = (select(T_INBOUND.c.id, T_INBOUND.c.size)
             .where(T_INBOUND.c.status == InboundStatus.NEW,
                    T_INBOUND.c.id % bindparam("parts") == bindparam("part"))
             .order_by(*_ARRIVAL).limit(bindparam("limit")))
# The next ones after those a worker holds prepared already.
_NEXT_NEW_MORE = _NEXT_NEW.where(T_INBOUND.c.id.not_in(bindparam("held", expanding=True)))
_NEW_WAITING = select(func.count()).select_from(
    select(T_INBOUND.c.id).where(T_INBOUND.c.status == InboundStatus.NEW)
    .limit(bindparam("cap")).subquery())
# With their bytes: an outer join, so a message whose bytes are missing is parked, not
# left waiting unseen.
_BATCH = (select(*T_INBOUND.c, T_INBOUND_RAW.c.raw)
          .outerjoin(T_INBOUND_RAW, T_INBOUND_RAW.c.inbound_id == T_INBOUND.c.id)
          .where(T_INBOUND.c.id.in_(bindparam("ids", expanding=True))).order_by(*_ARRIVAL))
# On PostgreSQL, the batch's messages still new (their bytes parsed already), locked, and
# those another instance holds skipped (on SQLite: `_still_new`).
_PENDING_LOCKED = (select(*T_INBOUND.c)
                   .where(T_INBOUND.c.id.in_(bindparam("ids", expanding=True)),
                          T_INBOUND.c.status == InboundStatus.NEW).order_by(*_ARRIVAL)
                   .with_for_update(skip_locked=True))
_STILL_NEW = select(T_INBOUND.c.id).where(T_INBOUND.c.id.in_(bindparam("ids", expanding=True)),
                                          T_INBOUND.c.status == InboundStatus.NEW)
_INBOUND_DONE = update(T_INBOUND).where(T_INBOUND.c.id == bindparam("iid")).values(
    status=InboundStatus.DONE, ticket_id=bindparam("tid"), processed_at=bindparam("at"))


def _check_parents(conn: Connection, parsed: ParsedMail, inbound: Any,
                   mover: SpoolMover | None) -> None:
    keys = [*parsed.in_reply_to, *parsed.references]
    if not keys:
        return
    # Waits for an original that arrived before it (in time, then in id: a total order, so
    # two messages naming each other cannot wait for each other). Not by id alone: mail
    # moved from intake's spools can be stored after a reply that arrived later.
    me = (inbound.received_at, inbound.id)
    for row in fastsql.execute(conn, _NAMED, {"keys": keys}):
        if row.status == InboundStatus.NEW and (row.received_at, row.id) < me:
            raise ParentPending(row.id)
    # ... or for one still in a spool, moved a moment later than the reply.
    if mover is not None and mover.holds(conn, keys):
        raise ParentPending("spooled")


@dataclass
class _Batch:
    """The messages a worker prepared for its next write transactions, and the one config
    they are all handled under (a message finishes under the config it started with)."""

    settings: Settings
    prepared: dict[int, Prepared] = field(default_factory=dict)
    size: int = 0  # bytes of mail read for them


@dataclass
class Prepared:
    """A message's work done before the write lock: its parse, the ticket it threads onto,
    or, when it looked like a new ticket, its routing decision and the customer facts that
    decision rests on."""

    parsed: ParsedMail | BaseException
    inbound: Any = None  # its inbound row, as read to prepare it
    decision: Decision | BaseException | None = None
    customer: CustomerFacts | None = None
    # Found before the lock, it still holds: tickets and their thread keys are never deleted.
    match: ThreadMatch | None = None
    early: dict[Any, Any] = field(default_factory=dict)  # `AheadHook.ahead`'s, by hook


class Hook(Protocol):
    def __call__(self, conn: Connection, handled: Handled) -> None: ...


@runtime_checkable
class AheadHook(Hook, Protocol):
    """A hook with work that can be done before the write lock for a message that is about
    to open a ticket: what `ahead` returns reaches the hook as `handled.early[hook]`. It
    rests on the routing decision prepared early, which the write phase may take again:
    the hook checks that it still holds."""

    def ahead(self, settings: Settings, inbound: Any, decision: Decision) -> Any: ...


class Pipeline:
    def __init__(self, url: str, settings_provider: Callable[[], Settings], *,
                 clock: Clock = system_clock, batch_size: int = 32,
                 hooks: list[Hook] | None = None, part: tuple[int, int] = (0, 1)) -> None:
        self.read_engine: Engine = make_engine(url)
        self.sqlite = is_sqlite(url)
        # Our commits never copy the WAL back into the database file, under the write
        # lock: a thread of ours does, beside the writers (router.checkpoint).
        database = sqlite_file(url)
        self.checkpointer = Checkpointer(database) if database is not None else None
        self.write_engine: Engine = make_engine(url, immediate=True,
                                                autocheckpoint=database is None,
                                                synchronous="NORMAL")
        # Workers wait for each other's write transactions in the kernel, not in SQLite's
        # sleeping busy handler (router.turns).
        self.turns = Turns(database) if database is not None else None
        self.settings_provider = settings_provider
        self.clock = clock
        self.batch_size = batch_size
        self.batch_bytes = 32 * 1024 * 1024
        # Prepared while another worker writes, at most (`process_batch`).
        self.max_prepared = 4 * batch_size
        self.max_kept = 8 * batch_size  # parses kept for messages that wait (`_defer`)
        # Worker `part[0]` of `part[1]` in this instance takes the messages whose id leaves
        # that remainder: no two workers parse the same message.
        self.part = part
        # SQLite has one writer: the others (`router ingest`, the console, the outbox) wait
        # one slice of time at most. PostgreSQL locks rows, so a batch is one transaction.
        self.lock_slice = 0.050 if self.sqlite else float("inf")
        self.lock_pause = 0.0025  # after a slice: longer than a lock retry step of intake's
        # SMTP intake on SQLite commits into spools of its own; moving them is our job.
        self.mover = SpoolMover(url, self.read_engine, self.write_engine,
                                clock=clock) if self.sqlite else None
        self.hooks: list[Hook] = list(hooks or [])
        self.ahead = [h for h in self.hooks if isinstance(h, AheadHook)]
        self.wake = threading.Event()
        self._log = log.get("router.pipeline")
        self.processed = 0
        self.parked = 0
        self.deferred = 0
        self.last_moved = 0  # by the last batch, from spools: work done even if none routed
        self._waited = False  # the last batch had a reply wait for its original
        # The parse of a message that waits for its original, for its next try: parsing
        # is most of preparing, and the bytes never change.
        self._kept: dict[int, ParsedMail] = {}

    def warm_up(self) -> None:
        """Load the language and tone models now: the first batch would otherwise load them
        while holding the database's write lock, delaying intake commits by seconds."""
        from router import language, tone

        language.identify("warming up the language model")
        tone.analyze("hello", "warming up the tone model", "en")

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.turns is not None:
            self.turns.close()
        if self.mover is not None:
            self.mover.close()
        self.read_engine.dispose()
        self.write_engine.dispose()

    # ------------------------------------------------------------------ one batch

    def process_batch(self) -> int:
        # Mail spooled by SMTP intake is read now and stored into `inbound` by the batch's
        # first write transaction: moving then costs no commit of its own.
        fetched = self._fetch_spooled()
        self.last_moved = 0
        with self.read_engine.connect() as conn:
            ids = self._next_ids(conn)
            if not ids and fetched:
                assert self.mover is not None
                conn.rollback()  # a fresh snapshot below, with what is moved now
                with self._writing() as wconn:
                    moved = self.mover.store(wconn, fetched)
                self.mover.settle(fetched)
                self.last_moved = moved
                fetched = []
                ids = self._next_ids(conn)
            if not ids:
                return 0
            # One config for the whole batch: a message finishes under the config it
            # started with.
            settings = self.settings_provider()
            # The costly part (parsing, language, rules, the classifier) runs before the
            # write lock is taken: other writers wait for the database writes only.
            batch = _Batch(settings)
            self._prepare_rows(conn, ids, batch)
            self._prepare_while_busy(conn, batch)
        todo = list(batch.prepared)  # in order of arrival
        prepared = batch.prepared
        done_before = self.processed + self.parked
        # Messages that raised once: handled again inside a savepoint of their own.
        guarded: set[int] = set()
        waited = False
        while todo:
            if self.turns is not None and self.turns.busy():
                with self.read_engine.connect() as conn:
                    todo.extend(self._prepare_while_busy(conn, batch))
            tally = _Tally()
            handled: list[int] = []
            try:
                # On SQLite the write lock is given up after one slice of time.
                with self._writing() as conn:
                    slice_end = time.monotonic() + self.lock_slice
                    backlogs = Backlogs()
                    if fetched:
                        assert self.mover is not None
                        moved = self.mover.store(conn, fetched)
                    for inbound in self._still_new(conn, todo, prepared):
                        self._handle_one(conn, inbound, prepared[inbound.id], settings,
                                         tally, guarded=inbound.id in guarded,
                                         backlogs=backlogs)
                        handled.append(inbound.id)
                        if time.monotonic() > slice_end:
                            break
                    else:
                        handled = todo  # the whole batch
            except _Redo as redo:
                # Rolled back whole, so nothing of this slice was written: again, with the
                # message that raised in a savepoint, where it is parked if it raises again.
                guarded.add(redo.inbound_id)
                continue
            if fetched:
                assert self.mover is not None
                self.mover.settle(fetched)
                self.last_moved = moved
                fetched = []
            self.processed += tally.processed
            self.parked += tally.parked
            self.deferred += tally.deferred
            waited = waited or tally.deferred > 0
            left = set(handled)
            todo = [i for i in todo if i not in left]
            if todo:
                time.sleep(self.lock_pause)  # let a waiting writer in
        self._waited = waited
        return self.processed + self.parked - done_before

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction. On SQLite it commits without a sync of its own
        (synchronous=NORMAL): what it writes can be redone from the stored mail, and the
        next sync of the log (any FULL commit: intake, the outbox claiming an ack before
        it sends it, the console; or a checkpoint, every half second) makes it durable, as
        the log is one file written in order. That holds for moving spooled mail too: a
        spool file is removed only after a sync of the log (`SpoolMover._remove`)."""
        with self.write_engine.connect() as conn, self._turn(), conn.begin():
            yield conn

    def _still_new(self, conn: Connection, ids: list[int],
                   prepared: dict[int, Prepared]) -> list[Any]:
        """The inbound rows of those of `ids` still new, in order of arrival. On SQLite the
        rows read to prepare them: only this worker changes them (workers split them by id,
        instances do not share SQLite), so only their status is read again, in the write
        lock. On PostgreSQL read again and locked, skipping those another instance holds."""
        if not self.sqlite:
            return fastsql.execute(conn, _PENDING_LOCKED, {"ids": ids}).all()
        new = {row.id for row in fastsql.execute(conn, _STILL_NEW, {"ids": ids})}
        return sorted((prepared[i].inbound for i in ids if i in new),
                      key=lambda row: (row.received_at, row.id))

    def _turn(self) -> AbstractContextManager[None]:
        return self.turns.turn() if self.turns is not None else nullcontext()

    def _fetch_spooled(self) -> list[Any]:
        """Spooled mail to move with this batch. One worker moves (the first): two would
        read the same rows, and one of them for nothing. It moves only while fewer than a
        fetch's worth of messages wait in `inbound`: moving far ahead of routing would only
        lengthen the write transactions. Unless the last batch had a reply wait: what waits
        may be the replies to originals still spooled, and they would wait forever."""
        if self.mover is None or self.part[0] != 0:
            return []
        if not self._waited:
            with self.read_engine.connect() as conn:
                waiting = fastsql.execute(conn, _NEW_WAITING,
                                          {"cap": self.mover.max_rows}).scalar()
            if waiting >= self.mover.max_rows:
                return []
        return self.mover.fetch()

    def _prepare_rows(self, conn: Connection, ids: list[int], batch: _Batch) -> None:
        """Prepare the messages `ids` into `batch`. The read snapshot is let go every few
        messages: on SQLite the write-ahead log can only be emptied once no reader uses it
        (`checkpoint.py`), and preparing a batch takes long enough to hold that up."""
        for n, row in enumerate(fastsql.execute(conn, _BATCH, {"ids": ids}).all(), 1):
            batch.prepared[row.id] = prepared = self._prepare(conn, row, batch.settings)
            prepared.inbound = row
            batch.size += row.size
            if n % PREPARE_STEP == 0:
                conn.rollback()
        conn.rollback()

    def _prepare_while_busy(self, conn: Connection, batch: _Batch) -> list[int]:
        """While another worker writes, prepare more of ours instead of waiting for it (on
        two cores that wait was a quarter of each worker's time): a few messages at a
        time, so that the turn, once free, is not left unused for long. The ids added."""
        added: list[int] = []
        step = min(self.batch_size, PREPARE_STEP)
        while (self.turns is not None and len(batch.prepared) < self.max_prepared
               and batch.size < self.batch_bytes and self.turns.busy()):
            more = self._next_ids(conn, held=list(batch.prepared),
                                  budget=self.batch_bytes - batch.size, limit=step)
            if not more:
                break
            self._prepare_rows(conn, more, batch)
            added.extend(more)
        return added

    def _next_ids(self, conn: Connection, *, held: list[int] | None = None,
                  budget: int | None = None, limit: int | None = None) -> list[int]:
        """The ids of this worker's next batch: oldest arrivals first, after those `held`
        prepared already. The batch holds every message parsed at once: bounded in bytes
        as well (`budget`), so a few large mails do not make a worker's memory balloon."""
        index, count = self.part
        budget = self.batch_bytes if budget is None else budget
        ids: list[int] = []
        size = 0
        params: dict[str, Any] = {"parts": count, "part": index,
                                  "limit": limit or self.batch_size}
        stmt = _NEXT_NEW
        if held:
            stmt = _NEXT_NEW_MORE
            params["held"] = held
        for row in fastsql.execute(conn, stmt, params):
            if (ids or held) and size + row.size > budget:
                break
            ids.append(row.id)
            size += row.size
        return ids

    def _prepare(self, conn: Connection, inbound: Any, settings: Settings) -> Prepared:
        """Parse, and classify what looks like a new ticket, on a read connection. The
        write phase checks that what the decision rests on still holds."""
        parsed = self._kept.pop(inbound.id, None)
        if parsed is None:
            if inbound.raw is None:
                return Prepared(LookupError(f"inbound {inbound.id}: its bytes are missing "
                                            "from inbound_raw"))
            try:
                parsed = parse(inbound.raw)
            except Exception as exc:  # parse() promises not to raise; park if it ever does
                return Prepared(exc)
        out = Prepared(parsed)
        if is_dsn(parsed):
            return out  # a delivery report: nothing to classify
        out.match = find_thread(conn, parsed, settings)
        if out.match is not None:
            return out  # a reply: nothing to classify
        sender = sender_of(parsed, inbound)
        row = fastsql.execute(conn, _CUSTOMER_FACTS, {"email": sender}).first()
        out.customer = _facts(row.vip, row.attributes, row.language) if row is not None \
            else _facts(False, None, None)
        try:
            out.decision = self._classify(conn, parsed, inbound, settings, out.customer)
        except Exception as exc:
            # Raised again only if the message does open a ticket (it may yet thread).
            out.decision = exc
            return out
        if out.decision.spam is None:
            for hook in self.ahead:
                try:
                    out.early[hook] = hook.ahead(settings, inbound, out.decision)
                except Exception:
                    # The hook works it out again in the write phase, where raising parks
                    # the message with its traceback.
                    continue
        return out

    def _classify(self, conn: Connection, parsed: ParsedMail, inbound: Any,
                  settings: Settings, customer: CustomerFacts) -> Decision:
        vip, attributes, language = customer
        context = Context(settings=settings, envelope_rcpts=list(inbound.rcpt_to),
                          envelope_sender=inbound.mail_from, now=inbound.received_at,
                          customer_vip=vip, customer_attributes=dict(attributes),
                          suggest=learn.suggester(conn))
        return classify(parsed, context, language_hint=language)

    def _handle_one(self, conn: Connection, inbound: Any, prepared: Prepared,
                    settings: Settings, tally: _Tally, *, guarded: bool,
                    backlogs: Backlogs) -> None:
        """Route one message in the slice's transaction. A savepoint per message would cost
        two statements each, and messages almost never raise: one that does rolls the whole
        slice back (`_Redo`), and is handled again `guarded`, in a savepoint of its own."""
        if not guarded:
            try:
                if isinstance(prepared.parsed, BaseException):
                    raise prepared.parsed
                self.handle(conn, inbound, prepared.parsed, settings, prepared=prepared,
                            backlogs=backlogs)
            except ParentPending as wait:
                # Raised before the message wrote anything: it stays new, and a later batch
                # takes it after its parent.
                self._defer(inbound, prepared, tally, wait)
                return
            except Exception as exc:
                if storage_unavailable(exc):
                    raise  # the whole batch waits for the database (`run` backs off)
                raise _Redo(inbound.id) from exc
            tally.processed += 1
            return
        savepoint = conn.begin_nested()
        try:
            if isinstance(prepared.parsed, BaseException):
                raise prepared.parsed
            self.handle(conn, inbound, prepared.parsed, settings, prepared=prepared,
                        backlogs=backlogs)
            savepoint.commit()
            tally.processed += 1
        except ParentPending as wait:
            savepoint.rollback()
            self._defer(inbound, prepared, tally, wait)
        except Exception as exc:
            if storage_unavailable(exc):
                # A full disk or a lost connection is not this message's fault: parked, it
                # would wait for a person. SQLite may have rolled the whole transaction
                # back already, so the savepoint is not touched (its error would hide this).
                raise
            savepoint.rollback()
            backlogs.forget()  # it may have counted what the rollback took back
            conn.execute(update(T_INBOUND).where(T_INBOUND.c.id == inbound.id).values(
                status=InboundStatus.PARKED, error=traceback.format_exc(),
                attempts=inbound.attempts + 1, processed_at=self.clock()))
            tally.parked += 1
            self._log.error("message_parked", inbound_id=inbound.id,
                            error=f"{type(exc).__name__}: {exc}")

    def _defer(self, inbound: Any, prepared: Prepared, tally: _Tally,
               wait: ParentPending) -> None:
        tally.deferred += 1
        if isinstance(prepared.parsed, ParsedMail):
            if len(self._kept) >= self.max_kept:
                # Left by messages another instance routed meanwhile: start afresh.
                self._kept.clear()
            self._kept[inbound.id] = prepared.parsed
        self._log.debug("message_deferred", inbound_id=inbound.id, parent=str(wait))

    # ------------------------------------------------------------------ one message

    def handle(self, conn: Connection, inbound: Any, parsed: ParsedMail,
               settings: Settings, *, backlogs: Backlogs,
               prepared: Prepared | None = None) -> Handled | None:
        """Route one message in `conn`'s transaction. `backlogs`: the team backlogs counted
        in this transaction so far; a message that may move an older ticket into or out of
        a backlog makes it forget them."""
        at = inbound.received_at  # SLA clocks start when the mail arrived, not when we got to it
        if is_dsn(parsed):
            # A delivery report about our own mail: recorded on the ticket it concerns, never
            # a ticket of its own, never acknowledged.
            with Session(bind=conn, join_transaction_mode="create_savepoint",
                         expire_on_commit=False) as session:
                event = handle_dsn(session, parsed, at)
                session.commit()
            conn.execute(update(T_INBOUND).where(T_INBOUND.c.id == inbound.id).values(
                status=InboundStatus.DONE, processed_at=self.clock(),
                ticket_id=event.ticket_id if event is not None else None))
            backlogs.forget()
            return None
        # An agent answering by mail writes to a reply address, which is also a plus-address
        # of the team: it must be judged here, before it could thread or open a ticket.
        if agentmail.handle_reply(conn, inbound, parsed, settings, self.clock()):
            backlogs.forget()  # an answer: the ticket may have left its backlog
            return None
        match = prepared.match if prepared is not None and prepared.match is not None \
            else find_thread(conn, parsed, settings)
        if match is None:
            # Before anything is written for this message: waiting leaves nothing to undo.
            _check_parents(conn, parsed, inbound, self.mover)
        sender = sender_of(parsed, inbound)
        customer = customer_for(conn, sender, parsed.sender_name, at)
        version = settings.digest[:16] or None
        ahead: dict[Any, Any] = {}  # what hooks worked out early for `decision`
        if match is not None:
            written = thread_onto(conn, match, parsed=parsed, inbound=inbound,
                                  config_version=version, now=at)
            new = False
            if written.previous_status not in BACKLOG_STATUSES:
                backlogs.forget()  # reopened: back in its team's backlog
        else:
            facts = _facts(customer.row["vip"], customer.row["attributes"], customer.language)
            early = prepared.decision if prepared is not None else None
            if early is not None and prepared is not None and prepared.customer == facts:
                if isinstance(early, BaseException):
                    raise early
                decision = early
                ahead = prepared.early
            else:
                # Nothing prepared, or the customer record changed since: decide now.
                decision = self._classify(conn, parsed, inbound, settings, facts)
            if decision.spam is not None:
                # Stored, not routed, never acknowledged; the event keeps the decision.
                conn.execute(update(T_INBOUND).where(T_INBOUND.c.id == inbound.id).values(
                    status=InboundStatus.SPAM, error=decision.spam[:2000],
                    processed_at=self.clock()))
                conn.execute(insert(T_EVENT).values(
                    at=at, ticket_id=None, kind="spam",
                    data={"inbound_id": inbound.id, "reason": decision.spam,
                          "hits": decision.hits_json()}))
                return None
            language = decision.language or customer.language
            if language and not customer.language:
                fastsql.execute(conn, _CUSTOMER_LANGUAGE, {"cid": customer.id,
                                                           "language": language})
                customer.row["language"] = language
            written = open_ticket(
                conn, decision=decision, customer=customer, parsed=parsed, inbound=inbound,
                language=language, config_version=version, now=at)
            send_alerts(conn, settings, decision, written.ticket_id, parsed, at)
            new = True
        ticket_id = written.ticket_id
        fastsql.execute(conn, _INBOUND_DONE,
                        {"iid": inbound.id, "tid": ticket_id, "at": self.clock()})
        handled = Handled(inbound, parsed, ticket_id, written.article_id, customer, new,
                          settings, at, decision if new else None, conn, backlogs, ahead)
        handled.know(Ticket, written.ticket)
        handled.know(Article, written.article)
        handled.know(Customer, customer.row)
        try:
            for hook in self.hooks:
                hook(conn, handled)
            handled.finish()
        finally:
            handled.close()
        return handled

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, idle_poll: float = 0.2) -> None:
        """Process until `stop` is set; sleep on `wake` (or a short poll, for mail committed
        by another process) when idle; back off while the database is unreachable."""
        backoff = 0.5
        waiting = self.lock_pause
        while not stop.is_set():
            try:
                n = self.process_batch()
                backoff = 0.5
            except Exception as exc:
                self._log.error("pipeline_error", error=f"{type(exc).__name__}: {exc}")
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if n or self.last_moved:
                waiting = self.lock_pause
            elif self._waited:
                # Only replies waiting for originals another worker is routing right now:
                # not idle, so look again soon (sooner than a poll), less soon each time
                # in case the original is held up for longer.
                stop.wait(waiting)
                waiting = min(waiting * 2, idle_poll)
            else:
                self.wake.wait(idle_poll)
                self.wake.clear()

    def drain(self, timeout: float = 30.0) -> int:
        """Process until nothing new is left (tools and tests)."""
        deadline = time.monotonic() + timeout
        total = 0
        while time.monotonic() < deadline:
            n = self.process_batch()
            if n == 0 and not self.last_moved:
                return total
            total += n
        raise TimeoutError("pipeline did not drain in time")


def retry_parked(engine: Engine, inbound_ids: list[int] | None = None) -> int:
    """Put parked messages back in line (after an admin fixed the cause)."""
    stmt = update(T_INBOUND).where(T_INBOUND.c.status == InboundStatus.PARKED)
    if inbound_ids:
        stmt = stmt.where(T_INBOUND.c.id.in_(inbound_ids))
    with engine.begin() as conn:
        return int(conn.execute(stmt.values(status=InboundStatus.NEW)).rowcount)
