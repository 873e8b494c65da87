"""Opening the workspace database: read-only and read-write connections that wait for a
conflicting file lock, transactions, and :func:`query` (the ``store query`` CLI).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb

from store_core.errors import StoreError
from store_core.storage.schema import ensure_schema

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


def _open(path: str, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    local = _local_path(path)
    if read_only and not os.path.exists(local):
        raise StoreError(f"DuckDB database {local} does not exist: run `store ingest` first")
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    return duckdb.connect(local, read_only=read_only)


@contextmanager
def connect(path: str, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the workspace database (created on first read-write use)."""
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
    path: str, *, read_only: bool, timeout_s: float
) -> Iterator[duckdb.DuckDBPyConnection]:
    """:func:`connect`, retrying while another process holds a conflicting file lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            con = _open(path, read_only=read_only)
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
        ensure_schema(con)
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


def query(
    path: str, sql: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one SQL statement on a read-only connection; returns (column names, rows).

    Waits up to ``timeout_s`` while a writer holds the database.
    """
    with connect_read_only_with_retry(path, timeout_s) as con:
        try:
            result = con.execute(sql)
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from None
        columns = [d[0] for d in result.description or []]
        return columns, result.fetchall()
