"""The single durable entry point: raw bytes and envelope in, committed row out.

A channel may tell its sender "accepted" (SMTP 250, IMAP flag/move, pipe exit 0) only after
`accept` returns. Messages are written by one writer with *adaptive group commit*: whatever
arrived while the previous commit ran goes into the next transaction, so one fsync serves many
messages under load and a lone message still commits at once (PERF-NOTES: a fixed wait window
collapses single-connection throughput).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from router import log
from router.clock import Clock, system_clock
from router.db import is_sqlite, make_engine
from router.mail import dedupe_key, quick_headers
from router.models import T_INBOUND, T_INBOUND_RAW, InboundStatus

if TYPE_CHECKING:
    from router.intake.spool import Spool


class StorageUnavailable(Exception):
    """The database could not commit: the sender must retry later (SMTP 451, exit 75)."""


@dataclass
class Envelope:
    channel: str
    mail_from: str
    rcpt_to: Sequence[str]
    raw: bytes
    received_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# A message waiting for its commit, and the future its sender awaits.
_Waiting = tuple[Envelope, "asyncio.Future[None]"]


def _row(env: Envelope, now: datetime) -> dict[str, Any]:
    quick = quick_headers(env.raw, subject=False)
    return {
        "received_at": env.received_at or now,
        "channel": env.channel,
        "mail_from": env.mail_from,
        "rcpt_to": list(env.rcpt_to),
        "raw": env.raw,
        "size": len(env.raw),
        "message_id": quick.message_id,
        "dedupe_key": dedupe_key(env.raw, quick),
        "deliveries": 1,
        "status": InboundStatus.NEW,
        "attempts": 0,
    }


def merge_duplicates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per dedupe key: a batch may hold the same mail twice (two RCPT deliveries
    racing), and PostgreSQL refuses to upsert one row twice in a statement."""
    by_key: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen = by_key.get(r["dedupe_key"])
        if seen is None:
            by_key[r["dedupe_key"]] = r
        else:
            seen["deliveries"] += r["deliveries"]
            seen["rcpt_to"] = list(dict.fromkeys([*seen["rcpt_to"], *r["rcpt_to"]]))
    return list(by_key.values())


_IDS_BY_KEY = select(T_INBOUND.c.dedupe_key, T_INBOUND.c.id).where(
    T_INBOUND.c.dedupe_key.in_(bindparam("keys", expanding=True)))


class InboundInsert:
    """Stores rows of `_row` (one per dedupe key: `merge_duplicates`) in the caller's
    transaction: the envelope into `inbound`, where a repeated delivery is counted instead
    of stored twice, and the bytes into `inbound_raw`, once per message."""

    def __init__(self, engine: Engine) -> None:
        dialect = sqlite if is_sqlite(str(engine.url)) else postgresql
        stmt = dialect.insert(T_INBOUND)
        self.envelope = stmt.on_conflict_do_update(
            index_elements=[T_INBOUND.c.dedupe_key],
            set_={"deliveries": T_INBOUND.c.deliveries + stmt.excluded.deliveries})
        self.raw = dialect.insert(T_INBOUND_RAW).on_conflict_do_nothing()

    def __call__(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        conn.execute(self.envelope, [{k: v for k, v in r.items() if k != "raw"} for r in rows])
        # The ids of new and repeated mail alike: a repeat's bytes are already stored.
        ids = dict(conn.execute(_IDS_BY_KEY, {"keys": [r["dedupe_key"] for r in rows]}).all())
        conn.execute(self.raw, [{"inbound_id": ids[r["dedupe_key"]], "raw": r["raw"]}
                                for r in rows])


def _locked(exc: Exception) -> bool:
    """A lock another writer holds (SQLAlchemy's error or, from a DB-API connection used
    directly, sqlite3's)."""
    if isinstance(exc, OperationalError):
        return "locked" in str(exc.orig).lower()
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def write_rows(engine: Engine, stmt: Any, rows: list[dict[str, Any]],
               lock_wait: float = 10.0) -> None:
    """Commit the rows or raise StorageUnavailable. `stmt`: a statement to execute with the
    rows, or a callable that writes them on a connection (`InboundInsert`)."""

    def attempt() -> None:
        with engine.begin() as conn:
            if callable(stmt):
                stmt(conn, rows)
            else:
                conn.execute(stmt, rows)

    retry_locked(attempt, lock_wait)


def retry_locked(attempt: Callable[[], None], lock_wait: float = 10.0) -> None:
    """Run `attempt`, one commit, or raise StorageUnavailable.

    SQLite's own busy handler sleeps in steps that grow to 100 ms, which would put up to a
    tenth of a second on every sender waiting in this batch whenever another writer holds
    the lock for a moment (the pipeline, when intake writes to the database itself). Intake
    engines therefore fail fast on a held lock and retry here in sub-millisecond steps."""
    deadline = time.monotonic() + lock_wait
    pause = 0.0002
    while True:
        try:
            attempt()
            return
        except Exception as exc:  # any failure to commit means "not accepted"
            if _locked(exc) and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 1.5, 0.002)
                continue
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from exc


def intake_engine(url: str) -> Engine:
    """The engine intake writes through: fast lock retries, no WAL checkpoints on the path
    to a 250 (on the database the pipeline's commits run them; a spool file is removed
    whole, never checkpointed)."""
    if is_sqlite(url):
        return make_engine(url, busy_ms=0, autocheckpoint=False)
    return make_engine(url)


def accept_sync(engine: Engine, env: Envelope, clock: Clock = system_clock) -> None:
    """One message, one transaction: for the pipe channel and tools."""
    write_rows(engine, InboundInsert(engine), [_row(env, clock())])


class Acceptor:
    """Group-committing writer shared by all connections of one process. With a `spool`
    (SMTP intake on SQLite, see router.intake.spool) it commits into that file; else into
    `engine`'s inbound table.

    The writer is a thread of its own, which takes everything waiting as soon as its last
    commit is done. It does not wait for the event loop between two commits: a loop busy
    with fifty connections took about 5 ms to hand it the next batch, a third of each
    commit's cycle, and every sender of that batch waited it out. The loop only answers
    the senders, once per batch."""

    def __init__(self, engine: Engine | None, *, clock: Clock = system_clock,
                 max_batch: int = 512, on_commit: Callable[[int], None] | None = None,
                 spool: Spool | None = None) -> None:
        if engine is None and spool is None:
            raise ValueError("Acceptor needs a database engine or a spool")
        self.spool = spool
        self.engine = engine
        self.clock = clock
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._insert = InboundInsert(engine) if engine is not None else None
        # (message, its sender's future); None tells the writer to stop.
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._unanswered = 0  # accepted for writing, not answered yet
        self._log = log.get("router.intake")
        self.batches = 0
        self.accepted = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="intake-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish what is pending (those senders are waiting for an answer), then stop."""
        self._stopping = True
        if self._thread is None:
            return
        self._queue.put(None)  # after everything accepted so far
        await asyncio.to_thread(self._thread.join)
        while self._unanswered:  # the last answers, scheduled on this loop by the writer
            await asyncio.sleep(0.001)
        self._thread = None

    async def accept(self, env: Envelope) -> None:
        """Return once the message is committed; raise StorageUnavailable if it was not."""
        if self._stopping:
            raise StorageUnavailable("intake is stopping")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unanswered += 1
        self._queue.put((env, fut))
        await fut

    def _run(self) -> None:
        """The writer thread: commit whatever waits, in batches, until told to stop."""
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            error: StorageUnavailable | None = None
            try:
                self._write([env for env, _ in batch])
            except Exception as exc:
                error = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(
                    f"{type(exc).__name__}: {exc}")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._answer, batch, error)

    def _write(self, envs: list[Envelope]) -> None:
        # Header parsing and hashing run here, off the event loop's hot path.
        now = self.clock()
        rows = merge_duplicates([_row(e, now) for e in envs])
        if self.spool is not None:
            self.spool.write(rows)
        else:
            assert self.engine is not None
            write_rows(self.engine, self._insert, rows)

    def _answer(self, batch: list[_Waiting], error: StorageUnavailable | None) -> None:
        """On the loop: tell the senders of one batch how its commit went."""
        self._unanswered -= len(batch)
        if error is not None:
            self._log.error("intake_commit_failed", error=str(error), batch=len(batch))
        else:
            self.batches += 1
            self.accepted += len(batch)
        for _, fut in batch:
            if fut.done():  # its sender went away meanwhile
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(None)
        if error is None and self.on_commit is not None:
            self.on_commit(len(batch))
