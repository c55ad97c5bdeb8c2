"""Statements that write many rows at once, and a lean way to send them.

``UPDATE t SET c = CASE WHEN k = :k_0 THEN :c_0 … ELSE c END, … WHERE k IN (:k_0, …)`` rewrites
several rows of one table, each with its own values, in one round trip (pymysql sends
``executemany`` of an UPDATE as one statement per row). Rows go in chunks of at most
:data:`MAX_ROWS`: the statement for each number of rows is built and compiled once, and a large
batch never becomes one huge statement.

:func:`write` sends such a statement (built once, kept) without SQLAlchemy's per-execution work
on the parameters, which for a multi-row write costs about a third of the driver's own: the
statement is rendered for the dialect once per set of parameter names and handed to the driver
with the values as they are (``exec_driver_sql``: errors, events and transactions stay
SQLAlchemy's). Only on MySQL/MariaDB, whose driver takes our values as they are (strings,
numbers, bytes, datetimes, booleans, None); SQLite, whose dates go through SQLAlchemy's own
conversion, gets the ordinary execution.

:func:`held` sends the writes made inside it together, at its end, as **one round trip**
(several statements separated by ``;``): the last writes of a push (records, log rows,
counters, outcomes, device seqs) cost one wait for the database instead of seven, while the
scope counters are locked. MySQL/MariaDB run such a batch in order and stop at the first
statement that fails; its error is raised as the statement's own would be (SQLAlchemy wraps
it, a lost connection is detected) and the caller rolls the transaction back. This needs the
connection's multi-statement capability, which :func:`allow_statement_batches` turns on; the
values in a batch are escaped by the driver exactly as in a single statement (pymysql always
interpolates them client-side), and no SQL of Galley is built from input text.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from pymysql.constants import CLIENT  # type: ignore[import-untyped]
from pymysql.cursors import RE_INSERT_VALUES as _INSERT_VALUES  # type: ignore[import-untyped]
from sqlalchemy import Table, Update, bindparam, case, event, tuple_, update
from sqlalchemy.engine import Connection, Dialect, Engine, Result
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable, sqltypes
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

T = TypeVar("T")

#: Rows per statement, at most.
MAX_ROWS = 64


def chunked(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of at most :data:`MAX_ROWS`."""
    for start in range(0, len(items), MAX_ROWS):
        yield items[start : start + MAX_ROWS]


def update_rows(
    conn: Connection,
    table: Table,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any] | None = None,
) -> None:
    """Rewrite ``rows`` of ``table`` (each a mapping with ``key`` and the same other columns),
    plus the ``shared`` column values given to every one of them."""
    if not rows:
        return
    shared = shared or {}
    columns = tuple(name for name in rows[0] if name != key)
    for chunk in chunked(rows):
        params = dict(shared)
        for i, row in enumerate(chunk):
            for name, value in row.items():
                params[f"{name}_{i}"] = value
        write(conn, _case_update(table, key, columns, tuple(shared), len(chunk)), params)


@lru_cache(maxsize=512)
def _case_update(
    table: Table, key: str, columns: tuple[str, ...], shared: tuple[str, ...], count: int
) -> Update:
    keys = [bindparam(f"{key}_{i}", type_=table.c[key].type) for i in range(count)]
    values: dict[str, Any] = {
        name: case(
            *[
                (table.c[key] == keys[i], bindparam(f"{name}_{i}", type_=table.c[name].type))
                for i in range(count)
            ],
            else_=table.c[name],
        )
        for name in columns
    }
    for name in shared:
        values[name] = bindparam(name, type_=table.c[name].type)
    return update(table).where(table.c[key].in_(keys)).values(values)


def write(
    conn: Connection,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> None:
    """Execute ``statement`` (an INSERT or UPDATE built once and kept) with ``params``: one
    mapping, or a list of mappings with the same names (sent as one multi-row statement)."""
    first = params if isinstance(params, Mapping) else (params[0] if params else None)
    if first is None:
        return
    sql = _rendered(statement, tuple(first), conn.dialect) if _lean(conn) else None
    batch: list[str] | None = conn.info.get(_HELD)
    if sql is None:
        if batch:  # the writes held so far go first: the order is the caller's
            _send(conn, batch)
            batch.clear()
        conn.execute(statement, params)
    elif batch is not None:
        batch.extend(_interpolated(conn, sql, params))
    elif isinstance(params, Mapping):
        conn.exec_driver_sql(sql, dict(params))
    else:
        conn.exec_driver_sql(sql, [dict(p) for p in params])


#: ``Connection.info`` key of the statements :func:`held` is holding.
_HELD = "galley_held_writes"
#: Execution option marking a batch of statements (see :func:`allow_statement_batches`).
_BATCH = "galley_statement_batch"
_BATCH_OPTIONS = {_BATCH: True, "no_parameters": True}
#: Characters of a failed batch quoted in its error.
_QUOTED = 2_000
#: Bytes of SQL per round trip, at most (pymysql's own limit for one multi-row insert): a
#: large group's batch goes in several.
MAX_BATCH_BYTES = 1_024_000


@contextmanager
def held(conn: Connection) -> Iterator[None]:
    """Hold the writes made through :func:`write` and :func:`update_rows` inside the block
    and send them, in order, in one round trip when it ends (see the module docstring).

    Nothing inside may read what they change, nor expect a write's error at its call: it comes
    at the end of the block. Where batches are not possible (SQLite, another driver, a
    connection without the capability), writes go out at once, as without the block; inside
    another held block they join its batch (and go out at its end). When the block raises, the
    held writes are dropped: the transaction is being abandoned.
    """
    if not _lean(conn) or _HELD in conn.info or not _batches_allowed(conn):
        yield
        return
    batch: list[str] = []
    # Kept: once a lost connection is invalidated, ``conn.info`` itself raises.
    info = conn.info
    info[_HELD] = batch
    try:
        yield
    finally:
        info.pop(_HELD, None)
    _send(conn, batch)


def _send(conn: Connection, statements: Sequence[str]) -> None:
    for chunk in _by_size(statements):
        try:
            conn.exec_driver_sql(";".join(chunk), execution_options=_BATCH_OPTIONS)
        except DBAPIError as exc:
            # The error would quote the whole batch, values inline (up to a megabyte of the
            # devices' data in a log line): its head says which statement it was.
            if exc.statement is not None and len(exc.statement) > _QUOTED:
                exc.statement = f"{exc.statement[:_QUOTED]}… ({len(exc.statement):,} characters)"
            raise


def _by_size(statements: Sequence[str]) -> Iterator[Sequence[str]]:
    start, size = 0, 0
    for i, sql in enumerate(statements):
        if i > start and size + len(sql) > MAX_BATCH_BYTES:
            yield statements[start:i]
            start, size = i, 0
        size += len(sql) + 1
    if start < len(statements):
        yield statements[start:]


def _interpolated(
    conn: Connection, sql: str, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> list[str]:
    """``sql`` with ``params`` in it, as pymysql would send it: a list of parameter sets for
    an INSERT becomes multi-row statements of at most pymysql's ``max_stmt_length`` each, as
    its ``executemany`` builds them (one larger row goes alone), so that no statement grows
    past the server's packet limit with the number of rows."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    if isinstance(params, Mapping):
        return [cursor.mogrify(sql, params)]
    values = _INSERT_VALUES.match(sql)
    if values is None:
        return [cursor.mogrify(sql, p) for p in params]
    prefix, row = values.group(1) % (), values.group(2).rstrip()
    suffix = (values.group(3) or "") % ()
    limit = cursor.max_stmt_length - len(prefix) - len(suffix)
    statements: list[str] = []
    rows: list[str] = []
    size = 0
    for p in params:
        one = cursor.mogrify(row, p)
        if rows and size + len(one) + 1 > limit:
            statements.append(prefix + ",".join(rows) + suffix)
            rows, size = [], 0
        rows.append(one)
        size += len(one) + 1
    statements.append(prefix + ",".join(rows) + suffix)
    return statements


def allow_statement_batches(engine: Engine) -> None:
    """Let the connections of ``engine`` (MySQL/MariaDB over pymysql; others are left as they
    are) run :func:`held` batches: they are opened with the client capability for several
    statements per query, and a batch's results are all read inside SQLAlchemy's execution,
    so that an error of any of its statements is raised, wrapped and handled (a lost
    connection invalidated) as a single statement's is."""
    if not (engine.dialect.name in ("mysql", "mariadb") and engine.dialect.driver == "pymysql"):
        return

    @event.listens_for(engine, "do_connect")
    def _with_batches(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["client_flag"] = cparams.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS

    @event.listens_for(engine, "do_execute_no_params")
    def _run_batch(cursor: Any, statement: str, context: Any) -> bool:
        if not context.execution_options.get(_BATCH):
            return False
        cursor.execute(statement)
        # Each statement's result in turn: the first failing one raises here.
        while cursor.nextset():
            pass
        return True


def _batches_allowed(conn: Connection) -> bool:
    flags = getattr(conn.connection.dbapi_connection, "client_flag", 0)
    return bool(flags & CLIENT.MULTI_STATEMENTS)


def execute(conn: Connection, statement: Executable, params: Mapping[str, Any]) -> Result[Any]:
    """:func:`write`'s lean path for a statement that returns rows (a locking read built once,
    its ``IN`` lists spelled out with :func:`in_list`)."""
    sql = _rendered(statement, tuple(params), conn.dialect) if _lean(conn) else None
    if sql is None:
        return conn.execute(statement, params)
    return conn.exec_driver_sql(sql, dict(params))


#: Lengths ``IN`` lists are padded to (repeating their last value), so that a few statements
#: per query serve every length. Steps of about 1.5 rather than 2: the padding is work for the
#: database too (a locking read looks each value up), a third of it at most instead of half.
IN_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def in_length(count: int) -> int:
    """The padded length of an ``IN`` list of ``count`` values (at most 512)."""
    return next(n for n in IN_LENGTHS if n >= count)


def in_list(name: str, values: Sequence[Any]) -> dict[str, Any]:
    """Parameters ``{name}_{i}`` (or ``{name}_{i}_{j}`` for tuples) for an ``IN`` list of
    ``values`` padded to :func:`in_length`, as :func:`in_binds` names them."""
    padded = list(values) + [values[-1]] * (in_length(len(values)) - len(values))
    params: dict[str, Any] = {}
    for i, value in enumerate(padded):
        if isinstance(value, tuple):
            for j, part in enumerate(value):
                params[f"{name}_{i}_{j}"] = part
        else:
            params[f"{name}_{i}"] = value
    return params


def in_binds(name: str, columns: Sequence[Any], length: int) -> list[Any]:
    """The bound parameters of an ``IN`` list of ``length`` values of ``columns`` (several
    columns: a list of tuples), named as :func:`in_list` fills them."""
    if len(columns) == 1:
        (column,) = columns
        return [bindparam(f"{name}_{i}", type_=column.type) for i in range(length)]
    return [
        tuple_(*(bindparam(f"{name}_{i}_{j}", type_=c.type) for j, c in enumerate(columns)))
        for i in range(length)
    ]


def _lean(conn: Connection) -> bool:
    return conn.dialect.name in ("mysql", "mariadb") and conn.dialect.driver == "pymysql"


#: Column types whose values pymysql takes as they are (SQLAlchemy's own processing of them on
#: MySQL is nothing, or bool -> int and bytes -> bytes, which pymysql does alike).
_PLAIN_TYPES = (
    sqltypes.String,
    sqltypes.Integer,
    sqltypes.DateTime,
    sqltypes.Boolean,
    sqltypes._Binary,
    sqltypes.NullType,
)


@lru_cache(maxsize=1024)
def _rendered(statement: Executable, names: tuple[str, ...], dialect: Dialect) -> str | None:
    """The SQL of ``statement`` for parameters ``names``, in the driver's named style, or None
    when the driver cannot be handed the values as they are (a value SQLAlchemy would supply
    itself, such as a column default; a type SQLAlchemy converts; a positional style)."""
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=list(names))
    assert isinstance(compiled, SQLCompiler)
    if compiled.positional or set(compiled.binds) != set(names):
        return None
    if not all(isinstance(b.type, _PLAIN_TYPES) for b in compiled.binds.values()):
        return None  # a type SQLAlchemy converts (Numeric, JSON, a TypeDecorator…)
    return compiled.string
