"""DuckDB: the only module that imports duckdb.

The workspace database (``<workspace>/store.duckdb``) holds the catalogue as last ingested
(``items``), the versioned semantic IDs, the codebooks they come from, and evaluation
results. Writers open it read-write inside one transaction; queries open it read-only so
they cannot change anything.

Schema
------
``items``
    The catalogue (DDL in :mod:`store_core.schemas`), written by :func:`upsert_items`.

``codebooks`` (:data:`CODEBOOKS_DDL`)
    One row per codebook version (a trained semantic tokenizer): ``quantizer``,
    ``num_levels`` (cluster levels L as the quantizer counts them), ``codebook_size`` (K),
    ``level_sizes`` (codes per level for *every* level of an ID, the disambiguation level
    included, so an ID has ``len(level_sizes)`` codes), ``pack_bits`` (bits per level in
    ``semantic_ids.packed``), ``collision_rate``, ``stats`` (JSON), ``model_uri``
    (checkpoint dir or MLflow model URI), ``mlflow_run_id``, ``created_at``. Immutable:
    writing a version with an existing ``codebook_version`` must repeat the same layout.

``semantic_ids`` (:data:`SEMANTIC_IDS_DDL`)
    One row per item per *write version*. Every version is a complete snapshot of the
    catalogue: removed items stay in it with ``active = FALSE`` so their IDs are never
    handed to another item. Columns: ``version``, ``codebook_version``, ``item_id``,
    ``codes INTEGER[]`` (all levels), ``c0..c3`` (the first four codes as plain columns
    for ad-hoc SQL, NULL past the ID's length; ``codes[i + 1]`` reaches any level),
    ``sid`` (the token string, e.g. ``<a_12><b_5><c_200><d_0>``), ``packed`` (the codes
    packed big-endian into a BIGINT, ``pack_bits`` per level, see
    :mod:`store_core.semantic_ids`), ``method`` (``cluster`` | ``generated``), ``active``,
    ``content_hash`` (of the text the ID was made from; NULL when not given),
    ``created_at``. ``UNIQUE(version, sid)`` and ``UNIQUE(version, item_id)``. Rows of a
    version are inserted ``ORDER BY packed``, so the table is physically sorted by
    ``(version, packed)`` and DuckDB's per-row-group min/max (zone maps) answer
    ``packed = x`` and ``packed BETWEEN lo AND hi`` by skipping nearly every row group
    (~1 ms on 1M items). A plain index on ``item_id`` serves item -> ID lookups.
    (``codes INTEGER[]`` + ``c0..c3`` was chosen over fixed ``c0..c7``: an ID may have up
    to 9 levels - 8 cluster levels + disambiguation - and the macros work on ``packed``
    and ``len(codes)`` anyway.)

``semantic_id_versions`` (:data:`SEMANTIC_ID_VERSIONS_DDL`)
    One row per *complete* version: ``version``, ``codebook_version``, ``created_at``,
    ``item_count`` (active items), ``row_count`` (all rows), ``counts`` (JSON:
    new/changed/removed/unchanged), ``note``. It is inserted last in the writing
    transaction, so a version exists for readers only once all its rows do.

``eval_results`` (:data:`EVAL_RESULTS_DDL`)
    One row per (run, dataset, system, seed, split, metric, history_rule): ``value``.

Views and macros (:data:`VIEWS_AND_MACROS_SQL`; stored in the database, so every reader
of the file, the ``store query`` CLI included, can use them):

- ``current_semantic_id_version``: the newest row of ``semantic_id_versions``.
- ``current_semantic_ids``: the active rows of that version.
- ``current_codebook``: the codebook of that version.
- ``sid_of(item)`` -> sid (NULL when unknown or removed): ``SELECT sid_of('42')`` ->
  ``<a_3><b_1><c_0>``.
- ``item_of(sid)`` -> item_id: ``SELECT item_of('<a_3><b_1><c_0>')`` -> ``42``.
- ``neighbours(item, n)`` (table): the items whose first ``n`` codes equal ``item``'s,
  the item itself *excluded*, ordered by packed: ``SELECT item_id, sid FROM
  neighbours('42', 2)``. The range is computed from ``packed`` and ``pack_bits`` by shift
  arithmetic (``lo = packed >> s << s``, ``hi = lo | (2^s - 1)``, ``s = pack_bits *
  (levels - n)``), so it is one ``packed BETWEEN lo AND hi``.
- ``items_with_codes(codes)`` (table): the items whose IDs start with the given
  codes, e.g. ``SELECT * FROM items_with_codes([3, 1])`` (a packed range, includes all).
- ``items_with_prefix(prefix)`` (table): the items whose ``sid`` starts with the string
  ``prefix``, e.g. ``SELECT * FROM items_with_prefix('<a_3><b_1>')``. Pass whole tokens:
  ``'<a_1'`` also matches ``<a_12>``. (``starts_with`` rather than ``LIKE prefix || '%'``
  because ``_`` in every token is a LIKE wildcard; the results are the same for
  canonical IDs.)

Concurrency
-----------
DuckDB lets one process open a database file read-write, *or* any number of processes
open it read-only, never both at once (an OS file lock; a conflicting open fails at once
with "Could not set lock"). The pipeline lives with that as follows:

- Writers (ingest, the nightly re-tokenization, evaluation) prepare and validate
  everything first (Arrow tables in memory, checks on an in-memory DuckDB), then open the
  file read-write only for the one short transaction that writes a version, and close it.
  They wait for readers the same way readers wait for them
  (``lock_timeout_s``, default :data:`DEFAULT_LOCK_TIMEOUT_S`).
- Readers (``store query``, serving, the recommender's lookups) open the file read-only
  through :func:`connect_read_only_with_retry`, which retries on a lock error with
  backoff until ``timeout_s`` and then raises :class:`StoreError`. Readers keep their
  connection only as long as a query, so the nightly writer gets its window.
- Atomicity: a version is one transaction, its ``semantic_id_versions`` row inserted
  last; the views pick the newest version listed there. A reader therefore sees the old
  complete version or the new complete one, never a mix, and a crash (exception or killed
  process) before COMMIT leaves the previous version complete and current: DuckDB
  discards uncommitted work on rollback and on recovery.

Within one process, DuckDB refuses to open the same file with a different configuration
(read-write and read-only together); use one mode per process at a time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeAlias

import duckdb
import pyarrow as pa

from store_core.errors import StoreError
from store_core.schemas import ITEMS_TABLE_DDL

logger = logging.getLogger(__name__)

#: How long writers and readers wait for a conflicting lock on the database file.
DEFAULT_LOCK_TIMEOUT_S = 60.0

#: How long :func:`query` (the ``store query`` CLI) waits for a writer to finish.
QUERY_LOCK_TIMEOUT_S = 30.0

#: Methods that produce a semantic ID: the quantizer's clustering of the trained
#: catalogue, or generation by the trained model for a new item.
SID_METHODS = ("cluster", "generated")

#: The Arrow input of :func:`write_semantic_id_version`: one row per item of the new
#: version, removed items included with ``active = False``. ``codes`` holds every level
#: (disambiguation included); ``sid`` must equal ``format_sid(codes)`` and ``packed``
#: ``pack_codes(codes, pack_bits)`` (both are checked). ``content_hash`` (of the text
#: the ID was made from) is optional: a missing column stores NULL. Extra columns are
#: ignored.
SEMANTIC_ID_ROWS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("codes", pa.list_(pa.int32()), nullable=False),
        pa.field("sid", pa.string(), nullable=False),
        pa.field("packed", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # 'cluster' | 'generated'
        pa.field("active", pa.bool_(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=True),
    ]
)

#: The columns of :data:`SEMANTIC_ID_ROWS_SCHEMA` an input must have.
_REQUIRED_ROW_COLUMNS = ("item_id", "codes", "sid", "packed", "method", "active")

#: ``codebooks``: one row per codebook version.
CODEBOOKS_DDL = """
CREATE TABLE IF NOT EXISTS codebooks (
    codebook_version VARCHAR PRIMARY KEY,
    quantizer        VARCHAR NOT NULL,
    num_levels       INTEGER NOT NULL,   -- cluster levels L (as the quantizer counts them)
    codebook_size    INTEGER NOT NULL,   -- K
    level_sizes      INTEGER[] NOT NULL, -- codes per level, every level of an ID
    pack_bits        INTEGER NOT NULL,   -- bits per level in semantic_ids.packed
    collision_rate   DOUBLE,
    stats            JSON,
    model_uri        VARCHAR,            -- checkpoint dir or MLflow model URI
    mlflow_run_id    VARCHAR,
    created_at       TIMESTAMP NOT NULL
)
"""

#: ``semantic_ids``: one row per item per write version (a complete snapshot).
SEMANTIC_IDS_DDL = """
CREATE TABLE IF NOT EXISTS semantic_ids (
    version          INTEGER NOT NULL,
    codebook_version VARCHAR NOT NULL,
    item_id          VARCHAR NOT NULL,
    codes            INTEGER[] NOT NULL,
    c0               INTEGER,
    c1               INTEGER,
    c2               INTEGER,
    c3               INTEGER,
    sid              VARCHAR NOT NULL,
    packed           BIGINT NOT NULL,
    method           VARCHAR NOT NULL CHECK (method IN ('cluster', 'generated')),
    active           BOOLEAN NOT NULL,
    content_hash     VARCHAR,            -- of the item text the ID was made from
    created_at       TIMESTAMP NOT NULL,
    UNIQUE (version, sid),
    UNIQUE (version, item_id)
)
"""

#: A plain index on ``semantic_ids.item_id``: item -> ID lookups (``sid_of``,
#: ``neighbours``) become an index scan instead of a scan of every string.
SEMANTIC_IDS_ITEM_INDEX_DDL = """
CREATE INDEX IF NOT EXISTS semantic_ids_item_id ON semantic_ids (item_id)
"""

#: ``semantic_id_versions``: one row per complete version, inserted last.
SEMANTIC_ID_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS semantic_id_versions (
    version          INTEGER PRIMARY KEY,
    codebook_version VARCHAR NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    item_count       BIGINT NOT NULL,    -- active items
    row_count        BIGINT NOT NULL,    -- all rows, removed (inactive) items included
    counts           JSON NOT NULL,      -- {"new": .., "changed": .., "removed": .., ...}
    note             VARCHAR,
    model_uri        VARCHAR,            -- the model that tokenized this version
    mlflow_run_id    VARCHAR             -- the MLflow run that trained it
)
"""

#: Columns added after the first release, added to older databases on open.
_ADDED_COLUMNS = (
    "ALTER TABLE semantic_id_versions ADD COLUMN IF NOT EXISTS model_uri VARCHAR",
    "ALTER TABLE semantic_id_versions ADD COLUMN IF NOT EXISTS mlflow_run_id VARCHAR",
)

#: ``eval_results``: one metric value per row.
EVAL_RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS eval_results (
    run_id       VARCHAR NOT NULL,
    dataset      VARCHAR NOT NULL,
    system       VARCHAR NOT NULL,
    seed         INTEGER,
    split        VARCHAR NOT NULL,
    metric       VARCHAR NOT NULL,
    value        DOUBLE,
    history_rule VARCHAR,
    created_at   TIMESTAMP NOT NULL,
    UNIQUE (run_id, dataset, system, seed, split, metric, history_rule)
)
"""

#: The views and macros (re-created on every read-write open, so they follow the code).
#: Macro parameters are named so they cannot clash with column names.
VIEWS_AND_MACROS_SQL = (
    """
CREATE OR REPLACE VIEW current_semantic_id_version AS
SELECT * FROM semantic_id_versions
WHERE version = (SELECT max(version) FROM semantic_id_versions)
""",
    # A join (not a scalar subquery) so DuckDB pushes the version down into the scan of
    # semantic_ids as a dynamic filter and skips the row groups of older versions.
    """
CREATE OR REPLACE VIEW current_semantic_ids AS
SELECT s.*
FROM semantic_ids s
JOIN (SELECT max(version) AS current_version FROM semantic_id_versions) v
  ON s.version = v.current_version
WHERE s.active
""",
    """
CREATE OR REPLACE VIEW current_codebook AS
SELECT c.*
FROM codebooks c JOIN current_semantic_id_version v USING (codebook_version)
""",
    # Item lookups go through the item_id index (an index scan needs the item filter
    # alone on the scan, hence the MATERIALIZED CTE): ~2 ms instead of a ~30 ms full scan
    # of 1M rows.
    """
CREATE OR REPLACE MACRO sid_of(for_item) AS (
    WITH hit AS MATERIALIZED (
        SELECT version, sid FROM semantic_ids WHERE item_id = for_item AND active
    )
    SELECT min(sid) FROM hit JOIN current_semantic_id_version USING (version)
)
""",
    """
CREATE OR REPLACE MACRO item_of(for_sid) AS (
    SELECT min(item_id) FROM current_semantic_ids WHERE sid = for_sid
)
""",
    """
CREATE OR REPLACE MACRO neighbours(for_item, n) AS TABLE
WITH hit AS MATERIALIZED (
    SELECT version, packed, len(codes) AS m
    FROM semantic_ids WHERE item_id = for_item AND active
), me AS (
    SELECT hit.packed, cb.pack_bits * (hit.m - greatest(0, least(n, hit.m))) AS shift
    FROM hit
    JOIN current_semantic_id_version v USING (version)
    JOIN codebooks cb USING (codebook_version)
), bounds AS (
    SELECT (packed >> shift) << shift AS lo,
           ((packed >> shift) << shift) | ((1::HUGEINT << shift) - 1)::BIGINT AS hi
    FROM me
)
SELECT s.*
FROM current_semantic_ids s, bounds b
WHERE s.packed BETWEEN b.lo AND b.hi AND s.item_id <> for_item
ORDER BY s.packed
""",
    """
CREATE OR REPLACE MACRO items_with_codes(prefix_codes) AS TABLE
WITH layout AS (
    SELECT pack_bits AS bits, len(level_sizes) AS m,
           pack_bits * (len(level_sizes) - len(prefix_codes)) AS shift
    FROM current_codebook
    WHERE len(prefix_codes) <= len(level_sizes)
      AND coalesce(list_min(prefix_codes), 0) >= 0
      AND coalesce(list_max(prefix_codes), 0) < (1 << pack_bits)
), bounds AS (
    SELECT coalesce(list_sum(list_transform(prefix_codes,
               lambda c, i: c::BIGINT << (bits * (m - i)))), 0)::BIGINT AS lo, shift
    FROM layout
)
SELECT s.*
FROM current_semantic_ids s, bounds b
WHERE s.packed BETWEEN b.lo AND b.lo | ((1::HUGEINT << b.shift) - 1)::BIGINT
ORDER BY s.packed
""",
    """
CREATE OR REPLACE MACRO items_with_prefix(prefix_sid) AS TABLE
SELECT * FROM current_semantic_ids
WHERE starts_with(sid, prefix_sid)
ORDER BY packed
""",
)

_CODEBOOK_REQUIRED = (
    "codebook_version",
    "quantizer",
    "num_levels",
    "codebook_size",
    "level_sizes",
    "pack_bits",
)
_CODEBOOK_OPTIONAL = ("collision_rate", "stats", "model_uri", "mlflow_run_id", "created_at")
#: Columns that must match when a codebook version is written again.
_CODEBOOK_LAYOUT = ("quantizer", "num_levels", "codebook_size", "level_sizes", "pack_bits")

_EVAL_REQUIRED = ("run_id", "dataset", "system", "split", "metric", "value")
_EVAL_OPTIONAL = ("seed", "history_rule", "created_at")
_EVAL_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("system", pa.string()),
        pa.field("seed", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("history_rule", pa.string()),
        pa.field("created_at", pa.timestamp("us")),
    ]
)


# --------------------------------------------------------------------------- connections


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


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables if missing and (re-)create the views and macros."""
    for ddl in (
        ITEMS_TABLE_DDL,
        CODEBOOKS_DDL,
        SEMANTIC_IDS_DDL,
        SEMANTIC_IDS_ITEM_INDEX_DDL,
        SEMANTIC_ID_VERSIONS_DDL,
        EVAL_RESULTS_DDL,
        *_ADDED_COLUMNS,
        *VIEWS_AND_MACROS_SQL,
    ):
        con.execute(ddl)


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# --------------------------------------------------------------------------- items


def upsert_items(path: str, items: pa.Table) -> dict[str, int]:
    """Load the catalogue into ``items`` in one transaction.

    New ids are inserted, rows whose ``content_hash`` changed are updated, ids missing from
    ``items`` are marked inactive (never deleted), and unchanged rows are not touched, so
    re-ingesting the same source changes nothing. Returns the counts of each case.
    """
    with _connect_writer(path, DEFAULT_LOCK_TIMEOUT_S) as con:
        con.register("incoming", items)
        try:
            with _transaction(con):
                counts = _counts(con)
                con.execute(
                    """
                    INSERT INTO items
                    SELECT i.item_id, i.title, i.fields, i.text, i.content_hash, TRUE,
                           now()::TIMESTAMP, now()::TIMESTAMP
                    FROM incoming i ANTI JOIN items t ON t.item_id = i.item_id
                    """
                )
                con.execute(
                    """
                    UPDATE items SET title = i.title, fields = i.fields, text = i.text,
                           content_hash = i.content_hash, active = TRUE,
                           updated_at = now()::TIMESTAMP
                    FROM incoming i
                    WHERE items.item_id = i.item_id
                      AND (items.content_hash <> i.content_hash OR NOT items.active)
                    """
                )
                con.execute(
                    """
                    UPDATE items SET active = FALSE, updated_at = now()::TIMESTAMP
                    WHERE active AND item_id NOT IN (SELECT item_id FROM incoming)
                    """
                )
        finally:
            con.unregister("incoming")
    logger.info("items table: %s", counts)
    return counts


def _counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    row = _first(
        con.execute(
            """
        SELECT
          count(*) FILTER (WHERE t.item_id IS NULL),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND (t.content_hash <> i.content_hash OR NOT t.active)),
          count(*) FILTER (WHERE t.item_id IS NOT NULL
                           AND t.content_hash = i.content_hash AND t.active)
        FROM incoming i LEFT JOIN items t ON t.item_id = i.item_id
        """
        )
    )
    removed = _first(
        con.execute(
            "SELECT count(*) FROM items "
            "WHERE active AND item_id NOT IN (SELECT item_id FROM incoming)"
        )
    )
    assert row is not None and removed is not None
    return {
        "new": int(row[0]),
        "changed": int(row[1]),
        "unchanged": int(row[2]),
        "removed": int(removed[0]),
    }


# --------------------------------------------------------------------------- semantic IDs


def _check_codebook_row(codebook_row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in _CODEBOOK_REQUIRED if codebook_row.get(k) is None]
    unknown = sorted(set(codebook_row) - set(_CODEBOOK_REQUIRED) - set(_CODEBOOK_OPTIONAL))
    if missing or unknown:
        raise ValueError(
            f"codebook row: missing {missing}, unknown {unknown}; expected keys "
            f"{list(_CODEBOOK_REQUIRED)} and optionally {list(_CODEBOOK_OPTIONAL)}"
        )
    row: dict[str, Any] = {
        k: codebook_row.get(k) for k in (*_CODEBOOK_REQUIRED, *_CODEBOOK_OPTIONAL)
    }
    row["level_sizes"] = [int(s) for s in row["level_sizes"]]
    for key in ("num_levels", "codebook_size", "pack_bits"):
        row[key] = int(row[key])
    bits, sizes = row["pack_bits"], row["level_sizes"]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"codebook row: level_sizes must be positive, got {sizes}")
    if bits < 1 or bits * len(sizes) > 63:
        raise ValueError(
            f"codebook row: {len(sizes)} levels x pack_bits {bits} do not fit in a BIGINT"
        )
    if max(sizes) > (1 << bits):
        raise ValueError(f"codebook row: a level of {max(sizes)} codes needs > {bits} bits")
    if row["stats"] is not None and not isinstance(row["stats"], str):
        row["stats"] = json.dumps(row["stats"], sort_keys=True)
    return row


#: Checks of an incoming semantic-ID table, run on an in-memory DuckDB before the
#: database file is opened: (description, SQL returning the first offending item_id).
_ROW_CHECKS = (
    (
        "has a NULL field",
        "item_id IS NULL OR codes IS NULL OR sid IS NULL OR packed IS NULL "
        "OR method IS NULL OR active IS NULL OR list_contains(codes, NULL)",
    ),
    ("has the wrong number of codes", "len(codes) <> $m"),
    (
        "has a code out of range for the codebook's level_sizes",
        "list_bool_or(list_transform(codes, lambda c, i: c < 0 OR c >= $sizes[i]))",
    ),
    (
        "has a method other than 'cluster' or 'generated'",
        "method NOT IN ('cluster', 'generated')",
    ),
    (
        "has a packed value that is not pack_codes(codes, pack_bits)",
        "packed <> list_sum(list_transform(codes, lambda c, i: c::BIGINT << ($bits * ($m - i))))",
    ),
    (
        "has a sid that is not format_sid(codes)",
        "sid <> array_to_string(list_transform(codes, "
        "lambda c, i: '<' || chr(96 + i::INTEGER) || '_' || c::VARCHAR || '>'), '')",
    ),
)


#: What :func:`write_semantic_id_version` takes: an Arrow table or a Parquet file path.
RowsInput: TypeAlias = pa.Table | str | os.PathLike[str]


@contextmanager
def _incoming(con: duckdb.DuckDBPyConnection, rows: RowsInput) -> Iterator[list[str]]:
    """Expose ``rows`` (an Arrow table or a Parquet file) as the view ``incoming``.

    Yields the input's column names. A Parquet file is streamed by DuckDB, never loaded
    whole into Python.
    """
    if isinstance(rows, pa.Table):
        con.register("incoming", rows)
        try:
            yield list(rows.column_names)
        finally:
            con.unregister("incoming")
        return
    literal = "'" + _local_path(os.fspath(rows)).replace("'", "''") + "'"
    con.execute(f"CREATE OR REPLACE TEMP VIEW incoming AS SELECT * FROM read_parquet({literal})")
    try:
        result = con.execute("SELECT * FROM incoming LIMIT 0")
        columns = [d[0] for d in result.description or []]
        result.fetchall()
        yield columns
    finally:
        con.execute("DROP VIEW IF EXISTS incoming")


def _check_rows(rows: RowsInput, codebook: Mapping[str, Any]) -> tuple[bool, int]:
    """Validate the input; returns (has a content_hash column, row count)."""
    params = {
        "m": len(codebook["level_sizes"]),
        "sizes": codebook["level_sizes"],
        "bits": codebook["pack_bits"],
    }
    with duckdb.connect(":memory:") as mem, _incoming(mem, rows) as columns:
        missing = [n for n in _REQUIRED_ROW_COLUMNS if n not in columns]
        if missing:
            raise ValueError(
                f"semantic-ID rows lack columns {missing}; expected {SEMANTIC_ID_ROWS_SCHEMA}"
            )
        for problem, condition in _ROW_CHECKS:
            used = {k: v for k, v in params.items() if f"${k}" in condition}
            bad = _first(
                mem.execute(
                    f"SELECT item_id, sid, codes FROM incoming WHERE {condition} LIMIT 1", used
                )
            )
            if bad is not None:
                raise ValueError(
                    f"semantic-ID rows: item {bad[0]!r} (sid {bad[1]!r}, codes {bad[2]}) "
                    f"{problem} (codebook {codebook['codebook_version']}: "
                    f"level_sizes {codebook['level_sizes']}, pack_bits {codebook['pack_bits']})"
                )
        count = _first(mem.execute("SELECT count(*) FROM incoming"))
    assert count is not None
    return "content_hash" in columns, int(count[0])


def _insert_codebook(con: duckdb.DuckDBPyConnection, row: Mapping[str, Any]) -> bool:
    """Insert the codebook row if its version is new; True when inserted."""
    existing = _first(
        con.execute(
            f"SELECT {', '.join(_CODEBOOK_LAYOUT)} FROM codebooks WHERE codebook_version = ?",
            [row["codebook_version"]],
        )
    )
    if existing is not None:
        stored = dict(zip(_CODEBOOK_LAYOUT, existing, strict=True))
        given = {k: row[k] for k in _CODEBOOK_LAYOUT}
        if stored != given:
            raise ValueError(
                f"codebook version {row['codebook_version']} already exists with a different "
                f"layout: stored {stored}, given {given}"
            )
        return False
    con.execute(
        """
        INSERT INTO codebooks (codebook_version, quantizer, num_levels, codebook_size,
                               level_sizes, pack_bits, collision_rate, stats, model_uri,
                               mlflow_run_id, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, coalesce(?, now()::TIMESTAMP))
        """,
        [
            row["codebook_version"],
            row["quantizer"],
            row["num_levels"],
            row["codebook_size"],
            row["level_sizes"],
            row["pack_bits"],
            row["collision_rate"],
            row["stats"],
            row["model_uri"],
            row["mlflow_run_id"],
            row["created_at"],
        ],
    )
    return True


def write_semantic_id_version(
    path: str,
    codebook_row: Mapping[str, Any],
    rows: RowsInput,
    counts: Mapping[str, int],
    note: str = "",
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    before_commit: Callable[[int], None] | None = None,
) -> int:
    """Write a new, complete semantic-ID version in one transaction; returns its number.

    ``codebook_row``: the ``codebooks`` columns (``codebook_version``, ``quantizer``,
    ``num_levels``, ``codebook_size``, ``level_sizes``, ``pack_bits``, optionally
    ``collision_rate``, ``stats`` (dict or JSON string), ``model_uri``, ``mlflow_run_id``,
    ``created_at``); inserted when the version is new, else checked against the stored
    layout. ``rows``: :data:`SEMANTIC_ID_ROWS_SCHEMA` as an Arrow table or a Parquet file
    path, every item of the version, removed ones with ``active = False``; validated
    (lengths, code ranges, ``packed``, ``sid``, ``method``) before the file is opened.
    ``counts``: new/changed/removed/unchanged (any str -> int, stored as JSON).

    Order inside the transaction: codebook row, all ID rows (``ORDER BY packed``), then
    the ``semantic_id_versions`` row, then COMMIT. ``before_commit(version)`` runs after
    the rows and before the version row (a hook for tests and progress reporting); an
    exception anywhere rolls everything back and the previous version stays current.
    Duplicate sids or item_ids violate the table's UNIQUE constraints: ValueError, and
    nothing is written.
    """
    codebook = _check_codebook_row(codebook_row)
    has_hash, row_count = _check_rows(rows, codebook)
    counts_json = json.dumps({str(k): int(v) for k, v in counts.items()}, sort_keys=True)
    content_hash = "content_hash" if has_hash else "NULL"
    with _connect_writer(path, lock_timeout_s) as con, _incoming(con, rows), _transaction(con):
        version = _next_version(con)
        created = _insert_codebook(con, codebook)
        try:
            con.execute(
                f"""
                INSERT INTO semantic_ids (version, codebook_version, item_id, codes,
                    c0, c1, c2, c3, sid, packed, method, active, content_hash, created_at)
                SELECT $version, $codebook_version, item_id, codes::INTEGER[],
                       codes[1], codes[2], codes[3], codes[4], sid, packed,
                       method, active, {content_hash}, now()::TIMESTAMP
                FROM incoming
                ORDER BY packed
                """,
                {"version": version, "codebook_version": codebook["codebook_version"]},
            )
        except duckdb.ConstraintException as exc:
            raise ValueError(
                f"semantic-ID version {version} rejected, nothing was written: {exc}"
            ) from exc
        if before_commit is not None:
            before_commit(version)
        con.execute(
            """
            INSERT INTO semantic_id_versions (version, codebook_version, created_at,
                item_count, row_count, counts, note, model_uri, mlflow_run_id)
            SELECT $version, $codebook_version, now()::TIMESTAMP,
                   count(*) FILTER (WHERE active), count(*), $counts, $note,
                   $model_uri, $mlflow_run_id
            FROM incoming
            """,
            {
                "version": version,
                "codebook_version": codebook["codebook_version"],
                "counts": counts_json,
                "note": note,
                "model_uri": codebook["model_uri"],
                "mlflow_run_id": codebook["mlflow_run_id"],
            },
        )
    logger.info(
        "semantic IDs: version %d (codebook %s%s), %d rows, %s",
        version,
        codebook["codebook_version"],
        ", new" if created else "",
        row_count,
        counts_json,
    )
    return version


def _next_version(con: duckdb.DuckDBPyConnection) -> int:
    row = _first(
        con.execute(
            """
        SELECT greatest(
            (SELECT coalesce(max(version), 0) FROM semantic_id_versions),
            (SELECT coalesce(max(version), 0) FROM semantic_ids)) + 1
        """
        )
    )
    assert row is not None
    return int(row[0])


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = "
        "current_database() UNION ALL "
        "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND database_name = "
        "current_database()",
        [name, name],
    ).fetchall()
    return sum(int(r[0]) for r in row) > 0


def latest_version(path: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S) -> int | None:
    """The newest complete semantic-ID version, or None when there is none (or no file)."""
    if not os.path.exists(_local_path(path)):
        return None
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "semantic_id_versions"):
            return None
        row = _first(con.execute("SELECT max(version) FROM semantic_id_versions"))
    return None if row is None or row[0] is None else int(row[0])


def current_ids(path: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S) -> pa.Table:
    """The active rows of the newest complete version (``current_semantic_ids``), by packed.

    Raises :class:`StoreError` when no version has been written.
    """
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "current_semantic_ids"):
            raise StoreError(
                f"{path} has no semantic IDs yet: run `store tokenize_catalogue` first"
            )
        return con.sql("SELECT * FROM current_semantic_ids ORDER BY packed").to_arrow_table()


def codebook_rows(path: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every ``codebooks`` row, oldest first, ``stats`` parsed from JSON."""
    if not os.path.exists(_local_path(path)):
        return []
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "codebooks"):
            return []
        rows = con.sql("SELECT * FROM codebooks ORDER BY created_at, codebook_version")
        out = rows.to_arrow_table().to_pylist()
    for row in out:
        if isinstance(row.get("stats"), str):
            row["stats"] = json.loads(row["stats"])
    return out


def current_rows(
    path: str, codebook_version: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> pa.Table | None:
    """Every row (active and inactive) of the newest version written under
    ``codebook_version``, by packed; None when there is none (or no database).

    The base a re-tokenization starts from: unchanged items keep these IDs and removed
    items are carried on inactive.
    """
    if not os.path.exists(_local_path(path)):
        return None
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "semantic_id_versions"):
            return None
        row = _first(
            con.execute(
                "SELECT max(version) FROM semantic_id_versions WHERE codebook_version = ?",
                [codebook_version],
            )
        )
        if row is None or row[0] is None:
            return None
        return con.sql(
            "SELECT * FROM semantic_ids WHERE version = $version ORDER BY packed",
            params={"version": int(row[0])},
        ).to_arrow_table()


def issued_codes(
    path: str, codebook_version: str, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> list[list[int]]:
    """Every distinct ID (as codes) in any complete version under ``codebook_version``,
    by packed: the IDs that must never be handed to another item."""
    if not os.path.exists(_local_path(path)):
        return []
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "semantic_id_versions"):
            return []
        rows = con.execute(
            """
            SELECT DISTINCT s.packed, s.codes
            FROM semantic_ids s JOIN semantic_id_versions v USING (version)
            WHERE s.codebook_version = ?
            ORDER BY s.packed
            """,
            [codebook_version],
        ).fetchall()
    return [list(codes) for _, codes in rows]


# --------------------------------------------------------------------------- evaluation


def write_eval_results(
    path: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> int:
    """Insert evaluation results in one transaction; returns the number of rows.

    Each row: ``run_id``, ``dataset``, ``system``, ``split``, ``metric``, ``value`` and
    optionally ``seed``, ``history_rule``, ``created_at`` (default: now). Writing the same
    (run_id, dataset, system, seed, split, metric, history_rule) twice is a ValueError and
    writes nothing.
    """
    if not rows:
        return 0
    now = datetime.now()
    records: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        missing = [k for k in _EVAL_REQUIRED if k not in row]
        unknown = sorted(set(row) - set(_EVAL_REQUIRED) - set(_EVAL_OPTIONAL))
        if missing or unknown:
            raise ValueError(
                f"eval result {index}: missing {missing}, unknown {unknown}; expected keys "
                f"{list(_EVAL_REQUIRED)} and optionally {list(_EVAL_OPTIONAL)}"
            )
        record = {name: row.get(name) for name in _EVAL_SCHEMA.names}
        record["created_at"] = record["created_at"] or now
        records.append(record)
    table = pa.Table.from_pylist(records, schema=_EVAL_SCHEMA)
    with _connect_writer(path, lock_timeout_s) as con:
        con.register("incoming_eval", table)
        try:
            with _transaction(con):
                try:
                    con.execute(
                        f"INSERT INTO eval_results ({', '.join(_EVAL_SCHEMA.names)}) "
                        "SELECT * FROM incoming_eval"
                    )
                except duckdb.ConstraintException as exc:
                    raise ValueError(f"eval results rejected, nothing was written: {exc}") from exc
        finally:
            con.unregister("incoming_eval")
    return table.num_rows


def read_eval_results(
    path: str, run_id: str | None = None, *, timeout_s: float = QUERY_LOCK_TIMEOUT_S
) -> list[dict[str, Any]]:
    """The ``eval_results`` rows (of one run when ``run_id`` is given), in a stable order."""
    if not os.path.exists(_local_path(path)):
        return []
    with connect_read_only_with_retry(path, timeout_s) as con:
        if not _has_table(con, "eval_results"):
            return []
        result = con.sql(
            "SELECT * FROM eval_results WHERE $run_id IS NULL OR run_id = $run_id "
            "ORDER BY run_id, dataset, system, seed, split, history_rule, metric",
            params={"run_id": run_id},
        )
        return result.to_arrow_table().to_pylist()


# --------------------------------------------------------------------------- queries


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
