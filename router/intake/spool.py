"""SMTP intake spools: one SQLite file per intake process, so a 250 never waits for routing.

SQLite has one writer per file. While intake committed into the database the pipeline writes
to, every sender waiting for a 250 also waited whenever a pipeline worker held the write lock,
and a worker at low CPU priority holds it longest exactly when intake keeps the CPUs busy.
So on SQLite each SMTP intake process (the daemon's own listener is number 0) commits into a
file of its own next to the database, ``<name>.spool-<i><suffix>``: the same group commit and
the same durability (WAL, ``synchronous=FULL``), and no lock shared with anybody but the
mover below.

A pipeline worker moves what was spooled into ``inbound`` (`SpoolMover`): one transaction
inserts the rows and advances that spool's ``spool_cursor`` row, so a crash at any instant
moves each message exactly once. Moved rows are deleted from the spool later, in bulk. A spool
names itself with an id kept inside it, so a spool file deleted and made again starts a new
cursor instead of being taken as already moved. Spools left by a larger ``[smtp] processes``
are found by name and drained all the same.

PostgreSQL locks rows, not the database: there, and for the pipe and tools, intake writes to
``inbound`` directly.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateTable

from router import log
from router.clock import Clock, system_clock
from router.db import is_sqlite, make_engine, normalize_url
from router.intake.accept import insert_statement, intake_engine, merge_duplicates
from router.models import T_INBOUND, T_SPOOL_CURSOR, InboundStatus

# The inbound columns intake knows when it answers; the pipeline fills in the rest.
SPOOL_COLUMNS = ("received_at", "channel", "mail_from", "rcpt_to", "raw", "size",
                 "message_id", "dedupe_key", "deliveries")

_META = MetaData()
# Same column types as `inbound`, so values are stored and read back identically. No unique
# dedupe key here: duplicates are merged into one inbound row when they are moved.
# AUTOINCREMENT: ids are never reused after the moved rows are deleted (the cursor counts on
# every new row having a higher id than the ones before).
T_SPOOLED = Table("spooled", _META, Column("id", Integer, primary_key=True),
                  *(Column(n, T_INBOUND.c[n].type, nullable=T_INBOUND.c[n].nullable)
                    for n in SPOOL_COLUMNS),
                  sqlite_autoincrement=True)
T_SPOOL_META = Table("spool_meta", _META, Column("key", String(32), primary_key=True),
                     Column("value", Text, nullable=False))

_SPOOL_ID = select(T_SPOOL_META.c.value).where(T_SPOOL_META.c.key == "id")
_FIRST = select(func.min(T_SPOOLED.c.id))


def _database_file(url: str) -> Path | None:
    if not is_sqlite(url):
        return None
    name = make_url(normalize_url(url)).database
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name)


def spool_path(url: str, index: int) -> Path | None:
    """Where intake process `index` spools for the database at `url`; None where intake
    writes to the database itself (PostgreSQL, SQLite in memory)."""
    db = _database_file(url)
    if db is None:
        return None
    return db.with_name(f"{db.stem}.spool-{index}{db.suffix}")


def spool_paths(url: str) -> list[Path]:
    """Every spool of the database at `url` that exists now, of any intake process."""
    db = _database_file(url)
    if db is None or not db.parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(db.stem)}\.spool-\d+{re.escape(db.suffix)}")
    return sorted(p for p in db.parent.iterdir() if pattern.fullmatch(p.name))


def create(path: Path) -> str:
    """Make the spool at `path` ready (idempotent, safe against a mover opening it at the
    same moment) and return its id."""
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            for table in _META.sorted_tables:
                conn.execute(CreateTable(table, if_not_exists=True))
            conn.execute(sqlite.insert(T_SPOOL_META).values(key="id", value=uuid.uuid4().hex)
                         .on_conflict_do_nothing())
            return str(conn.execute(_SPOOL_ID).scalar_one())
    finally:
        engine.dispose()


class Spool:
    """The intake side of one spool: the engine and statement `Acceptor` commits with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.id = create(path)
        self.engine: Engine = intake_engine(f"sqlite:///{path}")
        self.insert: Any = insert(T_SPOOLED)

    def rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: r[k] for k in SPOOL_COLUMNS} for r in rows]

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class _Source:
    engine: Engine
    inode: tuple[int, int]        # a file made again at the same path is another spool
    id: str | None = None
    moved: int | None = None      # moved through this id (as committed in spool_cursor)


_CURSOR = select(T_SPOOL_CURSOR.c.moved_through).where(
    T_SPOOL_CURSOR.c.spool == bindparam("spool"))


class SpoolMover:
    """The pipeline side: moves spooled mail into `inbound`, in the worker's own write
    transactions, and deletes what was moved from the spools."""

    # Deleting a moved row costs about 70 µs (its overflow pages are freed one by one), and
    # the spool's intake waits meanwhile: while mail arrives, small bites once enough has
    # piled up; when the spool is caught up, bigger ones.
    CLEAN_BUSY = 64
    CLEAN_IDLE = 512
    CLEAN_FROM = 256

    def __init__(self, url: str, write_engine: Engine, *, clock: Clock = system_clock,
                 max_rows: int = 512, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.url = url
        self.write_engine = write_engine
        self.clock = clock
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._insert = insert_statement(write_engine)
        self._sources: dict[Path, _Source] = {}
        self._failing: set[Path] = set()
        self._log = log.get("router.intake.spool")
        self.moved = 0

    def close(self) -> None:
        for src in self._sources.values():
            src.engine.dispose()
        self._sources.clear()

    def move(self) -> int:
        """Move what every spool holds beyond its cursor (one batch per spool); return how
        many messages were moved."""
        paths = spool_paths(self.url)
        for gone in set(self._sources) - set(paths):
            self._sources.pop(gone).engine.dispose()
        n = 0
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            inode = (st.st_dev, st.st_ino)
            src = self._sources.get(path)
            if src is not None and src.inode != inode:
                src.engine.dispose()
                src = None
            if src is None:
                src = self._sources[path] = _Source(make_engine(f"sqlite:///{path}"), inode)
            try:
                n += self._move_one(path, src)
            except Exception as exc:
                # One spool that cannot be moved now (the database locked for long, a
                # damaged file) must not hold up the others or the mail already stored;
                # it is tried again with the next batch, and logged once until it moves.
                if path not in self._failing:
                    self._failing.add(path)
                    self._log.error("spool_move_failed", spool=str(path),
                                    error=f"{type(exc).__name__}: {exc}")
            else:
                if path in self._failing:
                    self._failing.discard(path)
                    self._log.info("spool_move_recovered", spool=str(path))
        self.moved += n
        return n

    def _move_one(self, path: Path, src: _Source) -> int:
        with src.engine.connect() as sc:
            try:
                if src.id is None:
                    src.id = sc.execute(_SPOOL_ID).scalar()
            except OperationalError:
                return 0  # being created by its intake process right now
            if src.id is None:
                return 0
            if src.moved is None:
                with self.write_engine.connect() as conn:
                    src.moved = int(conn.execute(_CURSOR, {"spool": src.id}).scalar() or 0)
            heads = sc.execute(select(T_SPOOLED.c.id, T_SPOOLED.c.size)
                               .where(T_SPOOLED.c.id > src.moved)
                               .order_by(T_SPOOLED.c.id).limit(self.max_rows)).all()
            if not heads:
                self._clean(src, caught_up=True)
                return 0
            last, size = heads[0].id, 0
            for h in heads:  # bounded in bytes as well: the batch is held in memory
                if size and size + h.size > self.max_bytes:
                    break
                last, size = h.id, size + h.size
            rows = sc.execute(select(T_SPOOLED).where(T_SPOOLED.c.id > src.moved,
                                                      T_SPOOLED.c.id <= last)
                              .order_by(T_SPOOLED.c.id)).all()
        with self.write_engine.begin() as conn:
            # Read again under the write lock: another worker may have moved them meanwhile.
            mark = conn.execute(_CURSOR, {"spool": src.id}).scalar()
            if mark is None:
                conn.execute(insert(T_SPOOL_CURSOR).values(
                    spool=src.id, path=str(path), moved_through=0, moved_at=self.clock()))
                mark = 0
            fresh = [r for r in rows if r.id > mark]
            if fresh:
                conn.execute(self._insert, merge_duplicates([
                    {**{k: getattr(r, k) for k in SPOOL_COLUMNS},
                     "status": InboundStatus.NEW, "attempts": 0} for r in fresh]))
                conn.execute(update(T_SPOOL_CURSOR)
                             .where(T_SPOOL_CURSOR.c.spool == src.id)
                             .values(moved_through=fresh[-1].id, path=str(path),
                                     moved_at=self.clock()))
        src.moved = max(int(mark), last)
        self._clean(src, caught_up=len(heads) < self.max_rows)
        return len(fresh)

    def _clean(self, src: _Source, *, caught_up: bool) -> None:
        """Delete some moved rows (see CLEAN_BUSY): the spool file would grow without end."""
        if src.moved is None:
            return
        with src.engine.connect() as sc:  # where the spool starts: another worker cleans too
            first = sc.execute(_FIRST).scalar()
        left = 0 if first is None else src.moved - first + 1
        if left <= 0 or (not caught_up and left < self.CLEAN_FROM):
            return
        upto = first - 1 + min(left, self.CLEAN_IDLE if caught_up else self.CLEAN_BUSY)
        try:
            with src.engine.begin() as sc:
                sc.execute(delete(T_SPOOLED).where(T_SPOOLED.c.id <= upto))
        except OperationalError as exc:  # busy for ten seconds: try again next time
            self._log.warning("spool_clean_failed", spool=src.id, error=str(exc))


def unmoved(url: str) -> list[Any]:
    """The spooled messages not moved into ``inbound`` yet, from every spool of the database
    at `url`, oldest first per spool (for status, tools and tests)."""
    paths = spool_paths(url)
    if not paths:
        return []
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            moved = dict(conn.execute(select(T_SPOOL_CURSOR.c.spool,
                                             T_SPOOL_CURSOR.c.moved_through)).all())
    finally:
        engine.dispose()
    out: list[Any] = []
    for path in paths:
        spool = make_engine(f"sqlite:///{path}")
        try:
            with spool.connect() as sc:
                spool_id = sc.execute(_SPOOL_ID).scalar()
                out.extend(sc.execute(select(T_SPOOLED)
                                      .where(T_SPOOLED.c.id > moved.get(spool_id, 0))
                                      .order_by(T_SPOOLED.c.id)).all())
        except OperationalError:
            continue  # being created right now: nothing in it yet
        finally:
            spool.dispose()
    return out
