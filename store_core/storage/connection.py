"""Opening the workspace database: read-only and read-write connections that wait for a
conflicting file lock, transactions, and :func:`query` (the ``store query`` CLI).

:func:`query` runs SQL it did not write, so it runs it in a sandbox made of DuckDB's own
controls (https://duckdb.org/docs/2.0/operations_manual/securing_duckdb/overview.html):
the file is opened read-only with :data:`QUERY_SANDBOX_CONFIG` set at connect (no file,
network or ATTACH access besides the database file itself, no extension install or load,
configuration locked so no statement can turn any of it back on), and only one statement
of type SELECT is accepted (checked on DuckDB's own parse, then that parsed statement is
what runs). Views and macros live in the database file, so they keep working.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb

from store_core.errors import MissingInputError, StoreError
from store_core.storage.schema import UPGRADE_HINT, ensure_schema, outdated_columns

#: The logger of the whole package (the name it had as one module).
logger = logging.getLogger("store_core.storage")

#: How long writers and readers wait for a conflicting lock on the database file.
DEFAULT_LOCK_TIMEOUT_S = 60.0

#: How long :func:`query` (the ``store query`` CLI) waits for a writer to finish.
QUERY_LOCK_TIMEOUT_S = 30.0


def _local_path(path: str) -> str:
    if "://" in path and not path.startswith("file://"):
        raise StoreError(
            f"DuckDB database {path}: the workspace database must be on a local filesystem"
        )
    return path.removeprefix("file://")


#: DuckDB settings passed to ``duckdb.connect(config=...)``.
DuckDBConfig = dict[str, str | bool | int | float | list[str]]

#: DuckDB settings of the connection :func:`query` runs user SQL on, applied at connect.
#: ``enable_external_access`` off: no file but the database (and its WAL and spill
#: directory) can be read or written, no ATTACH of a file, no network; extensions are
#: neither installed nor loaded; ``lock_configuration`` last, so no ``SET``/``RESET`` can
#: undo any of it. (Python replacement scans of local variables are off too.)
QUERY_SANDBOX_CONFIG: DuckDBConfig = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "python_enable_replacements": False,
    "lock_configuration": True,
}


def _open(
    path: str,
    *,
    read_only: bool,
    config: DuckDBConfig | None = None,
) -> duckdb.DuckDBPyConnection:
    local = _local_path(path)
    if read_only and not os.path.exists(local):
        raise MissingInputError(f"DuckDB database {local}", "ingest", problem="does not exist")
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    if os.path.isdir(local):
        raise StoreError(f"DuckDB database {local} is a directory, not a database file")
    try:
        if config is None:
            return duckdb.connect(local, read_only=read_only)
        return duckdb.connect(local, read_only=read_only, config=config)
    except duckdb.IOException as exc:
        if _is_lock_error(exc):
            raise  # another process holds it: the callers wait and retry
        raise StoreError(
            f"DuckDB database {local} cannot be opened, it is damaged or not a DuckDB "
            f"database ({_one_line(exc)}): restore it from a backup, or move it aside and "
            "run `store ingest` to start a new one"
        ) from None


@contextmanager
def connect(path: str, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the workspace database (created on first read-write use).

    Raises :class:`StoreError` when the file is missing (read-only) or is not a usable
    DuckDB database (random bytes, truncated).
    """
    con = _open(path, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


def _first(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of a result, fetching all of it (DuckDB 2.0 refuses most work on a
    connection with an unfinished result)."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _is_lock_error(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


@contextmanager
def _connect_with_retry(
    path: str,
    *,
    read_only: bool,
    timeout_s: float,
    config: DuckDBConfig | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """:func:`connect`, retrying while another process holds a conflicting file lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            con = _open(path, read_only=read_only, config=config)
            break
        except duckdb.Error as exc:
            if not _is_lock_error(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                mode = "read-only" if read_only else "read-write"
                raise StoreError(
                    f"DuckDB database {path} stayed locked by another process for "
                    f"{timeout_s:g} s, could not open it {mode}: {exc}"
                ) from None
            logger.debug("database %s is locked, retrying in %.2f s", path, delay)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def connect_read_only_with_retry(
    path: str, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection, waiting up to ``timeout_s`` for a writer to let go.

    Raises :class:`StoreError` when the file does not exist or stays locked.
    """
    with _connect_with_retry(path, read_only=True, timeout_s=timeout_s) as con:
        yield con


@contextmanager
def _connect_writer(path: str, timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection with every table, view and macro in place."""
    with _connect_with_retry(path, read_only=False, timeout_s=timeout_s) as con:
        try:
            ensure_schema(con)
        except duckdb.Error as exc:  # tables of the same name with another layout
            raise StoreError(
                f"DuckDB database {path} is not a STORE workspace database, or one this "
                f"version cannot migrate ({_one_line(exc)}): point `workspace` elsewhere, "
                "or move the file aside and run `store ingest` to start a new one"
            ) from None
        yield con


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = "
        "current_database() UNION ALL "
        "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND database_name = "
        "current_database()",
        [name, name],
    ).fetchall()
    return sum(int(r[0]) for r in row) > 0


#: The one statement type :func:`query` runs.
_READ_ONLY_TYPE = duckdb.StatementType.SELECT

_REFUSED = "store query runs exactly one read-only SELECT statement"
_SANDBOX_NOTE = (
    "store query reads the workspace database only: no files, other databases, network "
    "or extensions"
)


def _one_line(exc: BaseException) -> str:
    """The first line of an error (DuckDB adds the SQL, a caret and hints below it)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _one_select(sql: str) -> duckdb.Statement:
    """The single SELECT statement in ``sql``, as DuckDB parses it.

    Raises :class:`StoreError` when ``sql`` does not parse, holds no statement or more
    than one, or holds anything but a SELECT (COPY, EXPORT, ATTACH, PRAGMA, CALL, SET,
    INSTALL/LOAD, CREATE, INSERT/UPDATE/DELETE, DROP, EXPLAIN, ...).
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise StoreError(f"query failed: {_one_line(exc)}") from None
    if not statements:
        raise StoreError(f"{_REFUSED}; the SQL holds none")
    if len(statements) > 1:
        raise StoreError(f"{_REFUSED}, not {len(statements)}")
    statement = statements[0]
    try:
        kind = statement.type
    except ValueError:  # a statement type the Python client has no name for
        raise StoreError(f"{_REFUSED}, not a statement of another kind") from None
    if kind != _READ_ONLY_TYPE:
        raise StoreError(f"{_REFUSED}, not {kind.name}")
    return statement


@contextmanager
def _sandboxed_connection(path: str, timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection with :data:`QUERY_SANDBOX_CONFIG` in force (checked)."""
    try:
        with _connect_with_retry(
            path, read_only=True, timeout_s=timeout_s, config=QUERY_SANDBOX_CONFIG
        ) as con:
            _check_sandbox(con)
            yield con
    except duckdb.ConnectionException as exc:  # e.g. the file is open here unsandboxed
        raise StoreError(f"DuckDB database {path}: {_one_line(exc)}") from None


def _check_sandbox(con: duckdb.DuckDBPyConnection) -> None:
    """Fail closed unless every sandbox setting reads back as set."""
    names = list(QUERY_SANDBOX_CONFIG)
    rows = con.execute(
        "SELECT name, value FROM duckdb_settings() WHERE list_contains(?, name)", [names]
    ).fetchall()
    actual = {name: value.lower() for name, value in rows}
    wanted = {name: str(value).lower() for name, value in QUERY_SANDBOX_CONFIG.items()}
    if actual != wanted:
        raise StoreError(f"DuckDB did not apply the query sandbox: wanted {wanted}, got {actual}")


def query(
    path: str, sql: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run exactly one read-only SELECT statement in a sandbox; returns (column names, rows).

    The statement sees the workspace database (tables, views, macros) and nothing else:
    no other file, no ATTACH, no network, no extension install/load, no settings change
    (see :data:`QUERY_SANDBOX_CONFIG`). Waits up to ``timeout_s`` while a writer holds the
    database.

    Raises :class:`StoreError` (one line) when ``sql`` is not exactly one
    SELECT statement, when it tries to reach outside the database, when it fails, when the
    database does not exist or stays locked, or when the sandbox cannot be set up.
    """
    statement = _one_select(sql)
    with _sandboxed_connection(path, timeout_s) as con:
        try:
            result = con.execute(statement)
            columns = [d[0] for d in result.description or []]
            rows = result.fetchall()
        except duckdb.PermissionException as exc:
            raise StoreError(f"query refused: {_one_line(exc)} ({_SANDBOX_NOTE})") from None
        except duckdb.Error as exc:
            message = _one_line(exc)
            if "extension" in message.lower():
                message += f" ({_SANDBOX_NOTE})"
            outdated = outdated_columns(con)
            if outdated:
                message += f" (this database still has {', '.join(outdated)}: {UPGRADE_HINT})"
            raise StoreError(f"query failed: {message}") from None
    return columns, rows
