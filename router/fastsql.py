"""Core statements run straight on the DB-API cursor: the pipeline's hot path.

`Connection.execute` spends 30–60 µs of Python on every statement before and after the
database's own work (an execution context, parameter processing through several layers,
result metadata, event dispatch): in a profile of routing that was a quarter of all its CPU,
twice what SQLite itself spent. `execute` here compiles a statement once per dialect and set
of parameter names and keeps what SQLAlchemy would work out each time: the SQL, the order of
its parameters, the bind processors of their types, the column defaults to fill in, and the
result processors. Each run then only converts the values (with SQLAlchemy's own processors,
so a value is stored and read back exactly as through SQLAlchemy) and runs the SQL on the
connection's DB-API cursor, inside the connection's transaction.

It is for statements built once, at import: a statement is cached by identity. What it
does not cover fails when the statement is first planned, not silently: a column default
computed from the execution context. Errors of the database are raised as SQLAlchemy's own exception
classes, so callers handle them the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, InvalidRequestError, MultipleResultsFound, NoResultFound
from sqlalchemy.sql.base import Executable

Params = dict[str, Any]
_Processor = Callable[[Any], Any] | None
# Where one parameter of the SQL comes from: (its name in the SQL, the caller's key, the
# element of that list for an expanded IN, else a default to call, the bind processor).
_Bind = tuple[str, str | None, int | None, Callable[[], Any] | None, _Processor]


class Row(tuple[Any, ...]):
    """A result row: by position, by attribute, and as `_mapping`, like SQLAlchemy's Row."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))


def _row_class(names: Sequence[str]) -> type[Row]:
    attrs: dict[str, Any] = {"__slots__": (), "_fields": tuple(names)}
    for i, name in enumerate(names):
        if name.isidentifier() and not name.startswith("_") and name not in attrs:
            attrs[name] = property(itemgetter(i))
    return type("Row", (Row,), attrs)


class Result:
    """The rows of one statement, read at once (the cursor is free again right away)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise (NoResultFound("No row was found when one was required") if not self._rows
                   else MultipleResultsFound("Multiple rows were found when exactly one "
                                             "was required"))
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]


class _Plan:
    """One statement compiled for one dialect and one set of parameter names."""

    __slots__ = (
        "binds",
        "compiled",
        "expanding",
        "expansions",
        "named",
        "result_procs",
        "result_types",
        "row_class",
        "sql",
        "stmt",
    )

    def __init__(self, conn: Connection, stmt: Executable, keys: tuple[str, ...]) -> None:
        dialect = conn.dialect
        self.stmt = stmt
        compiled: Any = stmt.compile(dialect=dialect, column_keys=list(keys))
        self.compiled = compiled
        self.sql: str = compiled.string
        # (caller's key, list in the statement itself): `x.in_([...])` of constants is an
        # expanding parameter too.
        self.expanding = [(b.key, b.effective_value) for b in compiled.binds.values()
                          if b.expanding]
        # IN lists, by their lengths: the SQL and parameter order for each.
        self.expansions: dict[tuple[int, ...], tuple[str, list[_Bind]]] = {}
        self.named = not compiled.positional
        defaults = {c.key: c.default for c in (*compiled.insert_prefetch,
                                                *compiled.update_prefetch)}
        order = compiled.positiontup if compiled.positional else list(compiled.binds)
        binds: list[_Bind] = []
        for name in order:
            bind = compiled.binds[name]
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            sql_name = compiled.escaped_bind_names.get(name, name)
            if bind.key in keys or name in keys:
                binds.append((sql_name, bind.key if bind.key in keys else name, None, None,
                              proc))
            elif name in defaults:
                binds.append((sql_name, None, None, _default(defaults[name], stmt), proc))
            elif bind.required:
                raise InvalidRequestError(f"A value is required for bind parameter "
                                          f"{bind.key!r}")
            else:
                value = bind.effective_value
                binds.append((sql_name, None, None, (lambda v=value: v), proc))
        self.binds = binds
        self.row_class: type[Row] | None = None
        self.result_types: list[Any] = []
        self.result_procs: list[_Processor] | None = None
        columns = getattr(stmt, "exported_columns", None)
        if columns is not None and len(columns):
            self.row_class = _row_class([str(k) for k in columns.keys()])  # noqa: SIM118
            self.result_types = [c.type.dialect_impl(dialect) for c in columns]

    def expand(self, params: Params) -> tuple[str, list[_Bind]]:
        """The SQL and parameters for these lengths of the IN lists."""
        lengths = tuple(len(params.get(k, v)) for k, v in self.expanding)
        got = self.expansions.get(lengths)
        if got is None:
            state = self.compiled.construct_expanded_state(params)
            elements = {}
            for name, names in state.parameter_expansion.items():
                for i, element in enumerate(names):
                    elements[element] = (self.compiled.binds[name].key, i)
            plain = {b[0]: b for b in self.binds}
            binds: list[_Bind] = []
            for name in state.positiontup or state.parameters:
                if name in elements:
                    key, i = elements[name]
                    proc = state.processors.get(name)
                    if key in params:
                        binds.append((name, key, i, None, proc))
                    else:
                        value = state.parameters[name]
                        binds.append((name, None, None, (lambda v=value: v), proc))
                else:
                    binds.append(plain[name])
            got = self.expansions[lengths] = (state.statement, binds)
        return got

    def parameters(self, params: Params, binds: list[_Bind]) -> Any:
        values = []
        for _name, key, element, default, proc in binds:
            if key is None:
                value = default()  # type: ignore[misc]
            elif element is None:
                value = params[key]
            else:
                value = params[key][element]
            values.append(proc(value) if proc is not None else value)
        if self.named:
            return {b[0]: v for b, v in zip(binds, values, strict=True)}
        return tuple(values)

    def rows(self, conn: Connection, cursor: Any) -> list[Any]:
        if self.row_class is None or cursor.description is None:
            return []
        if self.result_procs is None:
            dialect = conn.dialect
            self.result_procs = [t.result_processor(dialect, d[1]) for t, d in
                                 zip(self.result_types, cursor.description, strict=True)]
        procs = self.result_procs
        make = self.row_class
        if not any(procs):
            return [make(r) for r in cursor.fetchall()]
        return [make([p(v) if p is not None else v for p, v in zip(procs, r, strict=True)])
                for r in cursor.fetchall()]


def _default(default: Any, stmt: Executable) -> Callable[[], Any]:
    if default is not None and default.is_scalar:
        value = default.arg
        return lambda: value
    # SQLAlchemy wraps a callable of no arguments in one taking the execution context, which
    # does not exist here: only those wrapped ones can be called.
    if default is not None and default.is_callable and default.arg is not default._fn:
        fn = default.arg
        return lambda: fn(None)
    raise InvalidRequestError(f"fastsql cannot fill in the column default {default!r} of "
                              f"{stmt}: run it through Connection.execute")


_plans: dict[tuple[int, str, tuple[str, ...]], _Plan] = {}
_MAX_PLANS = 1024


def _plan_for(conn: Connection, stmt: Executable, keys: tuple[str, ...]) -> _Plan:
    cache_key = (id(stmt), conn.dialect.name, keys)
    plan = _plans.get(cache_key)
    if plan is None or plan.stmt is not stmt:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()  # statements built per call do not belong here; do not grow
        plan = _plans[cache_key] = _Plan(conn, stmt, keys)
    return plan


def execute(conn: Connection, stmt: Executable,
            params: Params | list[Params] | None = None) -> Result:
    """`conn.execute(stmt, params)`, for statements built once; a list runs executemany."""
    many = isinstance(params, list)
    if many and not params:
        return Result([], 0)
    first: Params = params[0] if many else (params or {})  # type: ignore[index,assignment]
    plan = _plan_for(conn, stmt, tuple(first))
    if not conn.in_transaction():
        conn.begin()  # as Connection.execute would: the engine's BEGIN (IMMEDIATE) runs
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    sql, binds = plan.expand(first) if plan.expanding else (plan.sql, plan.binds)
    if many:
        if plan.expanding:
            raise InvalidRequestError("fastsql: no executemany with IN lists")
        args: Any = [plan.parameters(p, binds) for p in params]  # type: ignore[union-attr]
    else:
        args = plan.parameters(first, binds)
    cursor = dbapi_conn.cursor()
    try:
        if many:
            cursor.executemany(sql, args)
        else:
            cursor.execute(sql, args)
        rows = plan.rows(conn, cursor)
        return Result(rows, cursor.rowcount)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, args, exc, conn.dialect.loaded_dbapi.Error,
                                  dialect=conn.dialect) from exc
    finally:
        cursor.close()

