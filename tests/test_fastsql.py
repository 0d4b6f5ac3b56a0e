"""router.fastsql runs the pipeline's statements on the DB-API cursor: what it stores and
reads back must be exactly what SQLAlchemy's Connection.execute would, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Connection, DateTime, bindparam, exc, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from router import fastsql
from router.db import make_engine, upgrade
from router.models import T_EVENT, T_THREAD_KEY, T_TICKET, UTCDateTime
from router.route import _SEL_THREAD, _UPD_REPLIED, _insert_ignore, _upsert_customer

NOW = datetime(2026, 11, 23, 9, 30, 15, 123456, tzinfo=UTC)
TICKET = {"team": "billing", "status": "new", "subject": "Invoice 4471", "customer_id": None,
          "address": "billing@example.com", "created_at": NOW, "updated_at": NOW,
          "last_customer_at": NOW}
_INS_TICKET = insert(T_TICKET).returning(T_TICKET.c.id)
_SEL_TICKET = select(T_TICKET).where(T_TICKET.c.id == bindparam("tid"))
_INS_EVENT = insert(T_EVENT)
_EVENTS = select(T_EVENT.c.kind, T_EVENT.c.data, T_EVENT.c.at).order_by(T_EVENT.c.id)
_COUNT = select(func.count(), func.max(T_EVENT.c.at)).where(T_EVENT.c.kind == bindparam("k"))
_RENAME = update(T_TICKET).where(T_TICKET.c.id == bindparam("tid")).values(
    subject=bindparam("subject"))


@pytest.fixture(params=["sqlite", "postgresql"])
def conn(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Connection]:
    url = (request.getfixturevalue("pg_url") if request.param == "postgresql"
           else request.getfixturevalue("sqlite_url"))
    upgrade(url)
    engine = make_engine(url, immediate=True)
    with engine.begin() as c:
        customer = c.execute(_upsert_customer(c.dialect.name), {
            "email": "ada@example.net", "name": "Ada", "language": None, "vip": False,
            "created_at": NOW, "last_seen_at": NOW, "attributes": {"plan": "gold"}}).one()
        TICKET["customer_id"] = customer.id
    with engine.connect() as c:
        yield c
    engine.dispose()


def test_rows_written_read_back_as_through_sqlalchemy(conn: Connection) -> None:
    # Column defaults the statement fills in (priority, reopened, tags) included.
    tid = fastsql.execute(conn, _INS_TICKET, TICKET).scalar_one()
    ref = conn.execute(_INS_TICKET, TICKET).scalar_one()
    mine = fastsql.execute(conn, _SEL_TICKET, {"tid": tid}).one()
    theirs = conn.execute(_SEL_TICKET, {"tid": ref}).one()
    assert mine.id == tid and theirs.id == ref
    assert mine[1:] == tuple(theirs)[1:]
    assert mine.created_at == NOW and mine.tags == [] and mine.priority == "normal"
    assert {k: v for k, v in mine._mapping.items() if k != "id"} == \
        {k: v for k, v in theirs._mapping.items() if k != "id"}


def test_upsert_and_update_returning_match_sqlalchemy(conn: Connection) -> None:
    upsert = _upsert_customer(conn.dialect.name)
    values = {"email": "ada@example.net", "name": "Other", "language": None, "vip": False,
              "created_at": NOW, "last_seen_at": NOW, "attributes": {}}
    assert fastsql.execute(conn, upsert, values).one()._mapping == \
        dict(conn.execute(upsert, values).one()._mapping)
    tid = fastsql.execute(conn, _INS_TICKET, TICKET).scalar_one()
    row = fastsql.execute(conn, _UPD_REPLIED, {"tid": tid, "at": NOW}).one()
    assert row.status == "new" and row.last_customer_at == NOW and row.reopened == 0
    assert fastsql.execute(conn, _RENAME, {"tid": tid, "subject": "Re: 4471"}).rowcount == 1
    assert conn.execute(_SEL_TICKET, {"tid": tid}).one().subject == "Re: 4471"


def test_json_and_datetimes_and_executemany(conn: Connection) -> None:
    rows = [{"at": NOW, "ticket_id": None, "kind": f"k{i}", "data": {"n": i, "ü": [1, "ß"]}}
            for i in range(3)]
    assert fastsql.execute(conn, _INS_EVENT, rows).rowcount in (3, -1)
    mine = fastsql.execute(conn, _EVENTS).all()
    assert [tuple(r) for r in mine] == [tuple(r) for r in conn.execute(_EVENTS).all()]
    assert mine[2].data == {"n": 2, "ü": [1, "ß"]} and mine[2].at == NOW
    count, latest = fastsql.execute(conn, _COUNT, {"k": "k1"}).one()
    assert (count, latest) == (1, NOW)
    assert fastsql.execute(conn, _COUNT, {"k": "none"}).one() == (0, None)


def test_expanding_in_lists_of_any_length(conn: Connection) -> None:
    tid = fastsql.execute(conn, _INS_TICKET, TICKET).scalar_one()
    keys = _insert_ignore(conn.dialect.name, T_THREAD_KEY)
    for mid in ("<a@x>", "<b@x>", "<a@x>"):  # the repeat is ignored, not an error
        fastsql.execute(conn, keys, {"message_id": mid, "ticket_id": tid})
    for asked in (["<a@x>"], ["<b@x>", "<zz@x>", "<a@x>"], ["<none@x>"]):
        mine = sorted(tuple(r) for r in fastsql.execute(conn, _SEL_THREAD, {"mids": asked}))
        theirs = sorted(tuple(r) for r in conn.execute(_SEL_THREAD, {"mids": asked}))
        assert mine == theirs
    assert [r.message_id for r in fastsql.execute(conn, _SEL_THREAD, {"mids": ["<b@x>"]})] \
        == ["<b@x>"]


def test_errors_are_sqlalchemys_and_name_the_problem(conn: Connection) -> None:
    with pytest.raises(exc.IntegrityError, match="address"):
        fastsql.execute(conn, _INS_TICKET, {**TICKET, "address": None})
    conn.rollback()
    with pytest.raises(exc.InvalidRequestError, match="tid"):
        fastsql.execute(conn, _SEL_TICKET, {})
    with pytest.raises(exc.NoResultFound):
        fastsql.execute(conn, _SEL_TICKET, {"tid": 10**9}).one()
    # A default computed from SQLAlchemy's execution context is refused when planned.
    from sqlalchemy import Column, Integer, MetaData, Table

    odd = Table("odd", MetaData(), Column("id", Integer, primary_key=True),
                Column("n", Integer, default=lambda context: context.current_parameters["id"]))
    with pytest.raises(exc.InvalidRequestError, match="column default"):
        fastsql.execute(conn, insert(odd), {"id": 1})


def test_runs_in_the_connections_transaction(conn: Connection) -> None:
    fastsql.execute(conn, _INS_EVENT, {"at": NOW, "ticket_id": None, "kind": "gone",
                                       "data": {}})
    assert conn.in_transaction()
    conn.rollback()
    assert fastsql.execute(conn, _COUNT, {"k": "gone"}).one()[0] == 0
    fastsql.execute(conn, _INS_EVENT, {"at": NOW, "ticket_id": None, "kind": "kept",
                                       "data": {}})
    conn.commit()
    assert conn.execute(_COUNT, {"k": "kept"}).one()[0] == 1


@pytest.mark.parametrize("value", [
    NOW,
    datetime(2026, 1, 1, tzinfo=UTC),                                   # no microseconds
    datetime(5, 3, 4, 1, 2, 3, 7, tzinfo=UTC),                           # a short year
    datetime(2026, 6, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=3))),
    datetime(2026, 3, 29, 1, 30, tzinfo=ZoneInfo("Europe/Istanbul")),
])
def test_sqlite_datetimes_are_stored_as_sqlalchemys_own_text(value: datetime) -> None:
    """`UTCDateTime` binds on SQLite in one step instead of SQLAlchemy's two: the text stored
    must be the same, character for character, or ordering and equality against rows
    written before would break."""
    dialect = sqlite.dialect()
    one_step = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert one_step is not None and "UTCDateTime" in one_step.__qualname__
    two_steps = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert one_step(value) == two_steps(UTCDateTime().process_bind_param(value, dialect))
    assert one_step(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        one_step(datetime(2026, 1, 1))


def test_postgresql_datetimes_keep_sqlalchemys_binding() -> None:
    dialect = postgresql.psycopg.dialect()
    process = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert process is None or "UTCDateTime" not in process.__qualname__
