"""Engines, sessions and migrations, for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlmodel import Session

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL; None for PostgreSQL, memory and `file:` URIs."""
    if not is_sqlite(url):
        return None
    name = make_url(normalize_url(url)).database
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here; SQLAlchemy would otherwise look for psycopg2."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _sqlite_pragmas(busy_ms: int, autocheckpoint: bool, synchronous: str) -> Any:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets readers run beside the writer; FULL makes a commit survive power loss,
        # which is what a 250 promises the sending MTA.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        if not autocheckpoint:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()
    return apply


def _sqlite_manual_transactions(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None


def make_engine(url: str, *, immediate: bool = False, busy_ms: int = 10000,
                autocheckpoint: bool = True, synchronous: str = "FULL", **kw: Any) -> Engine:
    """An engine with our SQLite settings; `immediate` engines take SQLite's write lock at
    BEGIN, so a read-then-write transaction cannot fail half-way on a stale snapshot.
    `busy_ms` and `autocheckpoint` let the intake writer wait for the lock its own way and
    leave WAL checkpoints to the other connections (see intake/accept.py). `synchronous`
    NORMAL is for writes that can be redone from what is durable already (the pipeline's
    routing and its moves of spooled mail, see `Pipeline._writing`)."""
    url = normalize_url(url)
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10},
                               **kw)
        event.listen(engine, "connect", _sqlite_pragmas(busy_ms, autocheckpoint, synchronous))
        # pysqlite's own transaction handling breaks SAVEPOINT and hides BEGIN; SQLAlchemy's
        # documented remedy is to switch it off and emit BEGIN ourselves.
        event.listen(engine, "connect", _sqlite_manual_transactions)
        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
        return engine
    kw.setdefault("pool_pre_ping", True)
    if "poolclass" not in kw:
        kw.setdefault("pool_size", 10)
    return create_engine(url, **kw)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


# SQLite's result codes (primary, as in `sqlite_errorname` without the extended part) and
# PostgreSQL's SQLSTATE classes that say the store could not do its part just now: the
# disk is full or failing, a lock or a statement timed out, the connection went, the server
# is shutting down, a deadlock or serialisation failure. None of them is a message's fault.
_SQLITE_UNAVAILABLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED",
                       "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_NOMEM", "SQLITE_PROTOCOL")
_PG_UNAVAILABLE = ("08", "53", "57", "58", "40001", "40P01", "55P03")


def storage_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is the database being unable to work
    right now, rather than something about the data: what such an error hit should be
    tried again later, not set aside as broken. Only explicit causes are followed (`raise
    ... from`, SQLAlchemy's `orig`): an error raised while handling a storage error that
    was dealt with is an error of its own, and taken for the storage's it could hold up
    the pipeline for good."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "connection_invalidated", False):
            return True
        name = getattr(e, "sqlite_errorname", None)
        if isinstance(name, str) and name.startswith(_SQLITE_UNAVAILABLE):
            return True
        state = getattr(e, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_PG_UNAVAILABLE):
            return True
        e = getattr(e, "orig", None) or e.__cause__
    return False
