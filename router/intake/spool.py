"""SMTP intake spools: SQLite files of intake's own, so a 250 never waits for routing.

SQLite has one writer per file. While intake committed into the database the pipeline writes
to, every sender waiting for a 250 also waited whenever a pipeline worker held the write lock,
and a worker at low CPU priority holds it longest exactly when intake keeps the CPUs busy.
So on SQLite each SMTP intake process (the daemon's own listener is number 0) commits into
files of its own next to the database, ``<name>.spool-<i>-<n><suffix>``: the same group
commit and the same durability (WAL, ``synchronous=FULL``), and no lock shared with anybody.

A pipeline worker moves what was spooled into ``inbound`` (`SpoolMover`): one transaction
inserts the rows and advances that file's ``spool_cursor`` row, so a crash at any instant
moves each message exactly once. Nothing is ever deleted from a spool: after `ROTATE_ROWS`
messages (or `ROTATE_BYTES`) intake switches to file ``n + 1``, made ahead beside it, and
seals file ``n`` (its last write there) aside, and a sealed file that has been moved
completely is removed whole. The moves commit without a sync of their own, as routing does;
the database's log is synced before a file is removed, so a power cut can undo a move but
never after its file is gone. A restart carries on in the newest file and seals the others.
Deleting moved rows one by one instead cost more than moving them, and held up intake.
A spool file names itself with an id kept inside it, so a file made again under the same
name starts a new cursor instead of being taken as moved. Spools left by a larger
``[smtp] processes`` are found by name and drained.

PostgreSQL locks rows, not the database: there, and for the pipe and tools, intake writes to
``inbound`` directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import QueuePool
from sqlalchemy.schema import CreateIndex, CreateTable

from router import log
from router.clock import Clock, system_clock
from router.db import make_engine, sqlite_file
from router.intake.accept import (
    InboundInsert,
    intake_engine,
    merge_duplicates,
    retry_locked,
    write_rows,
)
from router.models import T_INBOUND, T_INBOUND_RAW, T_SPOOL_CURSOR, InboundStatus

ROTATE_ROWS = 2048
ROTATE_BYTES = 32 * 1024 * 1024

# The inbound columns intake knows when it answers; the pipeline fills in the rest.
SPOOL_COLUMNS = ("received_at", "channel", "mail_from", "rcpt_to", "raw", "size",
                 "message_id", "dedupe_key", "deliveries")

_META = MetaData()
# Same column types as `inbound`, so values are stored and read back identically. No unique
# dedupe key here: duplicates are merged into one inbound row when they are moved.
# AUTOINCREMENT: the cursor counts on every new row having a higher id than the ones before,
# even if rows were ever deleted by hand.
_INBOUND_COLUMNS = {**T_INBOUND.c, "raw": T_INBOUND_RAW.c.raw}
T_SPOOLED = Table("spooled", _META, Column("id", Integer, primary_key=True),
                  *(Column(n, _INBOUND_COLUMNS[n].type, nullable=_INBOUND_COLUMNS[n].nullable)
                    for n in SPOOL_COLUMNS),
                  sqlite_autoincrement=True)
# A reply waits while its original is still spooled (`SpoolMover.holds`).
IX_SPOOLED_MESSAGE_ID = Index("ix_spooled_message_id", T_SPOOLED.c.message_id)
T_SPOOL_META = Table("spool_meta", _META, Column("key", String(32), primary_key=True),
                     Column("value", Text, nullable=False))

_SPOOL_ID = select(T_SPOOL_META.c.value).where(T_SPOOL_META.c.key == "id")
_SEALED = select(T_SPOOL_META.c.value).where(T_SPOOL_META.c.key == "sealed")
_SEAL = sqlite.insert(T_SPOOL_META).values(key="sealed", value="1").on_conflict_do_nothing()
_CURSOR = select(T_SPOOL_CURSOR.c.moved_through).where(
    T_SPOOL_CURSOR.c.spool == bindparam("spool"))
_CURSORS = select(T_SPOOL_CURSOR.c.spool, T_SPOOL_CURSOR.c.moved_through)


@dataclass(frozen=True, order=True)
class SpoolFile:
    index: int        # the intake process writing it
    number: int       # its place in that process's sequence of files
    path: Path


def spool_file(url: str, index: int, number: int) -> Path | None:
    """File `number` of intake process `index` for the database at `url`; None where intake
    writes to the database itself (PostgreSQL, SQLite in memory)."""
    db = sqlite_file(url)
    if db is None:
        return None
    return db.with_name(f"{db.stem}.spool-{index}-{number}{db.suffix}")


def spool_files(url: str) -> list[SpoolFile]:
    """Every spool file of the database at `url` that exists now, by process and number."""
    db = sqlite_file(url)
    if db is None or not db.parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(db.stem)}\.spool-(\d+)-(\d+){re.escape(db.suffix)}")
    found = []
    for p in db.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found.append(SpoolFile(int(m[1]), int(m[2]), p))
    return sorted(found)


def _create(path: Path) -> str:
    """Make the spool file at `path` ready (idempotent) and return its id."""
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            for table in _META.sorted_tables:
                conn.execute(CreateTable(table, if_not_exists=True))
            conn.execute(CreateIndex(IX_SPOOLED_MESSAGE_ID, if_not_exists=True))
            conn.execute(sqlite.insert(T_SPOOL_META).values(key="id", value=uuid.uuid4().hex)
                         .on_conflict_do_nothing())
            return str(conn.execute(_SPOOL_ID).scalar_one())
    finally:
        engine.dispose()


def _existing(path: Path) -> Engine:
    """An engine for reading a spool file, which connecting never creates: it may have been
    removed since it was listed."""
    return create_engine("sqlite://", poolclass=QueuePool, creator=lambda: _read_only(path))


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that only reads the spool file at `path`, and never creates it. It never
    checkpoints either, so the last one to close does not copy the file's whole WAL into it
    just before it is removed."""
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                           check_same_thread=False, timeout=10)


def _close_without_checkpoint(engine: Engine, path: Path) -> None:
    """Close intake's connection to a spool file and leave its WAL as it is.

    The last connection to close a WAL database copies the log into the file and syncs it:
    32 MB for a full spool, a third of a second of writes that stalled the commits of the
    file intake writes to next, and wasted, as the file is removed whole once moved. A
    read-only connection held open meanwhile makes intake's not the last, and one opened
    read-only cannot take the lock a checkpoint needs when it closes in turn. Readers
    (the mover) and a later writer read the log as before."""
    try:
        keep = _read_only(path)
    except sqlite3.Error:
        engine.dispose()  # gone or unreadable: nothing to keep, the checkpoint may run
        return
    try:
        with contextlib.suppress(sqlite3.Error):
            keep.execute("PRAGMA schema_version").fetchall()  # holds the file open
        engine.dispose()
    finally:
        keep.close()


# A spool file ready to take mail: number, path, id, engine.
_Spare = tuple[int, Path, str, Engine]


def _prepare(url: str, index: int, number: int) -> _Spare:
    path = spool_file(url, index, number)
    assert path is not None
    spool_id = _create(path)
    engine = intake_engine(f"sqlite:///{path}")
    with engine.connect():
        pass  # a connection opened and set up, waiting in the pool for the first commit
    return number, path, spool_id, engine


class Spool:
    """The intake side: the file intake process `index` commits into now (`write`), and
    the start of the next one when it is full."""

    def __init__(self, url: str, index: int) -> None:
        self.url = url
        self.index = index
        self._log = log.get("router.intake.spool")
        self._retiring: list[threading.Thread] = []
        mine = [f for f in spool_files(url) if f.index == index]
        # Carry on in the newest file. The older ones get no more mail: say so in them (a
        # predecessor may have died between starting a file and sealing the one before).
        for f in mine[:-1]:
            self._seal(make_engine(f"sqlite:///{f.path}"), f.path)
        self._open(mine[-1].number if mine else 1)

    @classmethod
    def for_database(cls, url: str, index: int) -> Spool | None:
        """Intake process `index`'s spool, or None where intake writes to the database
        itself (PostgreSQL, SQLite in memory)."""
        return cls(url, index) if sqlite_file(url) is not None else None

    def _open(self, number: int) -> None:
        self._use(_prepare(self.url, self.index, number))

    def _use(self, spare: _Spare) -> None:
        self.number, self.path, self.id, self.engine = spare
        self.rows_written = 0
        self.bytes_written = 0
        # The next file is made now, beside intake: making one (three commits, each an
        # fsync) held every sender waiting on this process for 20-100 ms at each rotation.
        self._spare: _Spare | Exception | None = None
        self._spare_thread = threading.Thread(target=self._make_spare, args=(self.number + 1,),
                                              name="spool-spare", daemon=True)
        self._spare_thread.start()

    def _make_spare(self, number: int) -> None:
        try:
            self._spare = _prepare(self.url, self.index, number)
        except Exception as exc:
            self._spare = exc

    def _next(self) -> _Spare:
        """The next file: the one made beside intake, or made now if that failed."""
        self._spare_thread.join()
        spare, self._spare = self._spare, None
        if isinstance(spare, tuple):
            return spare
        return _prepare(self.url, self.index, self.number + 1)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Commit `rows` (inbound rows; the spool keeps its columns of them) or raise
        StorageUnavailable; then start the next file if this one is full."""
        values = _spool_values(self.engine.dialect, rows)
        retry_locked(lambda: self._insert(values))
        self.rows_written += len(rows)
        self.bytes_written += sum(r["size"] for r in rows)
        if self.rows_written >= ROTATE_ROWS or self.bytes_written >= ROTATE_BYTES:
            old, old_path = self.engine, self.path
            try:
                spare = self._next()
            except Exception as exc:
                # These rows are committed and will get their 250; the next file is tried
                # again after the next commit, this one takes the mail meanwhile.
                self._log.warning("spool_rotate_failed", spool=str(self.path),
                                  error=f"{type(exc).__name__}: {exc}")
                return
            self._use(spare)
            # Sealing the old file (its last write) and closing it are not on the way to the
            # next 250; nothing else writes to it now.
            retire = threading.Thread(target=self._seal, args=(old, old_path),
                                      name="spool-close", daemon=True)
            self._retiring = [t for t in self._retiring if t.is_alive()] + [retire]
            retire.start()

    def _insert(self, values: list[tuple[Any, ...]]) -> None:
        """One commit of `values` (`_spool_values`), on the DB-API connection itself.

        This runs on intake's writer thread, which takes the GIL back from the event loop
        every time a call into SQLite returns; on a busy machine each time costs the wait
        for the loop to let go and for a core, and fifty senders wait on this commit.
        Through SQLAlchemy a commit of five mails made about fourteen such calls (BEGIN, a
        step per row, COMMIT). Here a batch is one INSERT of all its rows outside any
        transaction, so SQLite commits (and syncs) it within that one statement."""
        with self.engine.connect() as conn:
            dbapi = conn.connection.driver_connection
            if len(values) <= _ROWS_PER_INSERT:
                dbapi.execute(_insert_sql(len(values)), _flat(values))
                return
            dbapi.execute("BEGIN")
            try:
                for i in range(0, len(values), _ROWS_PER_INSERT):
                    chunk = values[i:i + _ROWS_PER_INSERT]
                    dbapi.execute(_insert_sql(len(chunk)), _flat(chunk))
                dbapi.execute("COMMIT")
            except BaseException:
                dbapi.rollback()
                raise

    def _seal(self, engine: Engine, path: Path) -> None:
        """Write a file's seal, its last write, and close it (at a rotation, beside intake;
        at a start, for the files a predecessor left)."""
        try:
            write_rows(engine, _SEAL, [{}])
        except Exception as exc:  # unsealed until the next start; the mover reports damage
            self._log.warning("spool_seal_failed", spool=str(path),
                              error=f"{type(exc).__name__}: {exc}")
        _close_without_checkpoint(engine, path)

    def settle(self) -> None:
        """Wait until the next file is made and the last full one sealed and closed."""
        self._spare_thread.join()
        for retire in self._retiring:
            retire.join()

    def close(self) -> None:
        self.settle()
        _close_without_checkpoint(self.engine, self.path)
        if isinstance(self._spare, tuple):
            self._spare[3].dispose()


# Rows per INSERT: sqlite3 keeps a statement prepared per text, so one per row count.
_ROWS_PER_INSERT = 64


def _spool_values(dialect: Any, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each row's spool columns as the DB-API takes them, converted by the columns' own
    types (SQLAlchemy's bind processors): stored exactly as an insert through SQLAlchemy
    would store them, so the mover reads them back the same."""
    procs = _bind_processors(dialect)
    return [tuple(p(r[k]) if p is not None else r[k]
                  for k, p in zip(SPOOL_COLUMNS, procs, strict=True)) for r in rows]


@lru_cache(maxsize=4)
def _bind_processors(dialect: Any) -> tuple[Any, ...]:
    return tuple(T_SPOOLED.c[k].type.dialect_impl(dialect).bind_processor(dialect)
                 for k in SPOOL_COLUMNS)


@lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_sql(n: int) -> str:
    row = "(" + ", ".join("?" * len(SPOOL_COLUMNS)) + ")"
    return (f"INSERT INTO {T_SPOOLED.name} ({', '.join(SPOOL_COLUMNS)}) VALUES "
            + ", ".join([row] * n))


def _flat(values: list[tuple[Any, ...]]) -> list[Any]:
    return [v for row in values for v in row]


@dataclass
class _Source:
    engine: Engine
    inode: tuple[int, int]        # a file made again at the same path is another spool
    id: str | None = None
    moved: int = 0                # moved through this id, as far as this worker knows


_HOLDS = select(T_SPOOLED.c.id).where(
    T_SPOOLED.c.message_id.in_(bindparam("keys", expanding=True)),
    T_SPOOLED.c.id > bindparam("moved")).limit(1)


@dataclass
class Fetched:
    """Rows read from one spool file, to be stored into `inbound`."""

    path: Path
    src: _Source
    rows: list[Any]
    mark: int = 0      # the file's cursor as the storing transaction found it


def _cursors(conn: Connection, sources: Any) -> dict[str, int]:
    """How far each of these spools was moved, as `conn` sees it."""
    ids = [s.id for s in sources if s is not None and s.id is not None]
    if not ids:
        return {}
    return {k: int(v) for k, v in conn.execute(
        _CURSORS.where(T_SPOOL_CURSOR.c.spool.in_(ids))).all()}


class SpoolMover:
    """The pipeline side: moves spooled mail into `inbound` and removes spool files that
    are done with. `fetch` reads outside any write transaction; `store` writes in the
    caller's, so moving costs the pipeline no commit (no fsync) of its own; `settle`
    records what that transaction made durable, once it has committed."""

    def __init__(self, url: str, read_engine: Engine, write_engine: Engine, *,
                 clock: Clock = system_clock, max_rows: int = 512,
                 max_bytes: int = 32 * 1024 * 1024) -> None:
        self.url = url
        # Reads go through `read_engine`: on SQLite the write engine begins IMMEDIATE, and
        # a read through it would wait for the other workers' write lock.
        self.read_engine = read_engine
        self.write_engine = write_engine
        self.clock = clock
        # What one fetch reads, over all files: every row of it is written while the
        # database's write lock is held.
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._insert = InboundInsert(write_engine)
        self._sources: dict[Path, _Source] = {}
        self._failing: set[Path] = set()
        self._log = log.get("router.intake.spool")

    def close(self) -> None:
        for src in self._sources.values():
            src.engine.dispose()
        self._sources.clear()

    def move(self) -> int:
        """Move one fetch in a transaction of its own; return how many messages moved."""
        fetched = self.fetch()
        if not fetched:
            return 0
        with self.write_engine.connect() as conn, conn.begin():
            n = self.store(conn, fetched)
        self.settle(fetched)
        return n

    def fetch(self) -> list[Fetched]:
        """What the spool files hold beyond their cursors, up to `max_rows` and `max_bytes`
        in all; removes the files sealed and moved to their last row."""
        files = self._files()
        if not files:
            return []
        sources = self._sources_of(files)
        # Where each spool stands, in one read: another worker may have moved since.
        with self.read_engine.connect() as conn:
            cursors = _cursors(conn, sources.values())
        # Each intake process's files (oldest first) get an equal share, and of what was
        # read only what arrived before any process's share ran out is moved: mail moves in
        # order of arrival across intake processes, so a reply seldom reaches `inbound`
        # before its original (it would wait for it, `holds`).
        processes = sorted({f.index for f in files})
        share_rows = max(1, self.max_rows // len(processes))
        share_bytes = max(1, self.max_bytes // len(processes))
        out: list[Fetched] = []
        horizon = None
        for index in processes:
            rows_left, bytes_left = share_rows, share_bytes
            for f in (f for f in files if f.index == index):
                src = sources[f.path]
                if src is None:
                    continue
                assert src.id is not None
                src.moved = max(src.moved, cursors.get(src.id, 0))
                if rows_left <= 0 or bytes_left <= 0:
                    continue
                try:
                    rows, sealed, more = self._read(src, rows_left, bytes_left)
                except Exception as exc:
                    self._failed(f.path, exc)
                    continue
                if f.path in self._failing:
                    self._failing.discard(f.path)
                    self._log.info("spool_move_recovered", spool=str(f.path))
                if rows:
                    out.append(Fetched(f.path, src, rows))
                    rows_left -= len(rows)
                    bytes_left -= sum(r.size for r in rows)
                    if more:
                        if horizon is None or rows[-1].received_at < horizon:
                            horizon = rows[-1].received_at
                        rows_left = 0  # this process's later files are later still
                elif sealed:
                    self._remove(f.path)
        if horizon is not None:
            for f in out:
                f.rows = [r for r in f.rows if r.received_at <= horizon]
            out = [f for f in out if f.rows]
        return out

    def _read(self, src: _Source, max_rows: int,
              max_bytes: int) -> tuple[list[Any], bool, bool]:
        """(rows beyond the cursor, at least one unless there are none; whether the file is
        sealed; whether it holds more than that)."""
        with src.engine.connect() as sc:
            # Read before the rows: nothing is written to a file after its seal.
            sealed = sc.execute(_SEALED).scalar() is not None
            start = src.moved
            heads = sc.execute(select(T_SPOOLED.c.id, T_SPOOLED.c.size)
                               .where(T_SPOOLED.c.id > start)
                               .order_by(T_SPOOLED.c.id).limit(max_rows + 1)).all()
            if not heads:
                return [], sealed, False
            more = len(heads) > max_rows
            last, size = heads[0].id, 0
            for h in heads[:max_rows]:  # bounded in bytes as well: held in memory
                if size and size + h.size > max_bytes:
                    more = True
                    break
                last, size = h.id, size + h.size
            rows = sc.execute(select(T_SPOOLED).where(T_SPOOLED.c.id > start,
                                                      T_SPOOLED.c.id <= last)
                              .order_by(T_SPOOLED.c.id)).all()
        return rows, sealed, more

    def store(self, conn: Connection, fetched: list[Fetched]) -> int:
        """Insert fetched rows into `inbound` and advance their files' cursors, in the
        caller's write transaction (rolled back with it); returns how many were new."""
        n = 0
        for f in fetched:
            # Read again under the write lock: another worker may have moved them meanwhile.
            mark = conn.execute(_CURSOR, {"spool": f.src.id}).scalar()
            if mark is None:
                conn.execute(insert(T_SPOOL_CURSOR).values(
                    spool=f.src.id, path=str(f.path), moved_through=0, moved_at=self.clock()))
                mark = 0
            f.mark = int(mark)
            fresh = [r for r in f.rows if r.id > mark]
            if fresh:
                self._insert(conn, merge_duplicates([
                    {**{k: getattr(r, k) for k in SPOOL_COLUMNS},
                     "status": InboundStatus.NEW, "attempts": 0} for r in fresh]))
                conn.execute(update(T_SPOOL_CURSOR)
                             .where(T_SPOOL_CURSOR.c.spool == f.src.id)
                             .values(moved_through=fresh[-1].id, path=str(f.path),
                                     moved_at=self.clock()))
                n += len(fresh)
        return n

    def settle(self, fetched: list[Fetched]) -> None:
        """The transaction that stored `fetched` committed: those rows are moved."""
        for f in fetched:
            f.src.moved = max(f.src.moved, f.mark, f.rows[-1].id)

    def _sources_of(self, files: list[SpoolFile]) -> dict[Path, _Source | None]:
        """Each file's source, None for one not ready or not readable now (reported)."""
        sources: dict[Path, _Source | None] = {}
        for f in files:
            try:
                sources[f.path] = self._source(f.path)
            except Exception as exc:
                sources[f.path] = None
                self._failed(f.path, exc)
        return sources

    def _files(self) -> list[SpoolFile]:
        """The spool files now; the engines of removed ones are let go (their file
        handles would otherwise keep the removed files' space)."""
        files = spool_files(self.url)
        for gone in set(self._sources) - {f.path for f in files}:
            self._sources.pop(gone).engine.dispose()
        return files

    def _failed(self, path: Path, exc: Exception) -> None:
        """One spool that cannot be read now (locked for long, damaged) must not hold up
        the others or the mail already stored: it is tried again with the next batch, and
        logged once until it moves."""
        if not path.exists():
            return  # removed by another worker a moment ago
        if path not in self._failing:
            self._failing.add(path)
            self._log.error("spool_move_failed", spool=str(path),
                            error=f"{type(exc).__name__}: {exc}")

    def _source(self, path: Path) -> _Source | None:
        """The file's engine and id; None if it is gone or not ready yet."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        inode = (st.st_dev, st.st_ino)
        src = self._sources.get(path)
        if src is not None and src.inode != inode:
            src.engine.dispose()
            src = None
        if src is None:
            src = self._sources[path] = _Source(_existing(path), inode)
        if src.id is None:
            try:
                with src.engine.connect() as sc:
                    src.id = sc.execute(_SPOOL_ID).scalar()
            except OperationalError:
                return None  # being created by its intake process, or removed, right now
        return src if src.id is not None else None

    def holds(self, conn: Connection, message_ids: list[str]) -> bool:
        """Whether a spool still holds one of these messages, not moved into `inbound` as
        `conn` sees it: a reply to it must wait, or it would open a ticket of its own.
        A spool that cannot be read a moment is moved later than the others, so a reply can
        reach `inbound` before its original. The cursors are read through `conn`: rows the
        caller's own transaction just moved count as moved, and a worker that does not move
        spools itself sees them too."""
        if not message_ids:
            return False
        sources = [s for s in self._sources_of(self._files()).values() if s is not None]
        if not sources:
            return False
        cursors = _cursors(conn, sources)
        for src in sources:
            assert src.id is not None
            try:
                with src.engine.connect() as sc:
                    if sc.execute(_HOLDS, {"keys": message_ids,
                                           "moved": cursors.get(src.id, 0)}).first():
                        return True
            except OperationalError:
                continue  # removed meanwhile: it held nothing unmoved
        return False

    def _remove(self, path: Path) -> None:
        """A sealed spool file, moved to its last row: its intake process writes to a newer
        one and never to this again. The moves committed without a sync (a power cut could
        still undo them): the database is synced first."""
        self._sync_database()
        src = self._sources.pop(path, None)
        if src is not None:
            src.engine.dispose()
        self._failing.discard(path)
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
                  path.with_name(path.name + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._log.debug("spool_removed", spool=str(path))

    def _sync_database(self) -> None:
        """Make every commit to the database so far durable: its log holds them in order,
        and what a checkpoint copied out of the log is in the database file."""
        database = sqlite_file(self.url)
        assert database is not None
        for p in (database.with_name(database.name + "-wal"), database):
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue  # no log: nothing committed since it was emptied and removed
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _unmoved(url: str, what: Any, *, ordered: bool = True) -> list[Any]:
    """`what`, a select from ``spooled``, of the rows not moved yet, from every spool file of
    the database at `url`: its rows file by file, in order of id within each (`ordered`)."""
    files = spool_files(url)
    if not files:
        return []
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            moved = dict(conn.execute(_CURSORS).all())
    finally:
        engine.dispose()
    out: list[Any] = []
    for f in files:
        spool = _existing(f.path)
        try:
            with spool.connect() as sc:
                spool_id = sc.execute(_SPOOL_ID).scalar()
                query = what.where(T_SPOOLED.c.id > moved.get(spool_id, 0))
                out.extend(sc.execute(query.order_by(T_SPOOLED.c.id) if ordered else query)
                           .all())
        except OperationalError:
            continue  # being created, or removed, right now: nothing to count in it
        finally:
            spool.dispose()
    return out


def unmoved(url: str) -> list[Any]:
    """The spooled messages not moved into ``inbound`` yet, from every spool file of the
    database at `url`, oldest first per file (for tools and tests)."""
    return _unmoved(url, select(T_SPOOLED))


def unmoved_backlog(url: str) -> tuple[int, datetime | None]:
    """How many spooled messages wait to be moved into ``inbound``, and when the oldest of
    them was received (None when none waits)."""
    per_file = _unmoved(url, select(func.count(), func.min(T_SPOOLED.c.received_at)),
                        ordered=False)
    oldest = [at for n, at in per_file if n]
    return sum(n for n, _ in per_file), min(oldest) if oldest else None


def unmoved_count(url: str) -> int:
    """How many spooled messages wait to be moved into ``inbound``."""
    return unmoved_backlog(url)[0]
