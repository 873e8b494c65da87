"""DuckDB: the only package that imports duckdb.

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
    ``cluster_levels`` (cluster levels L as the quantizer counts them), ``codebook_size`` (K),
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
    new/changed/restored/unchanged/removed, as :func:`upsert_items` counts the ``items``
    table, plus generated/reassigned), ``note``. It is inserted last in the writing
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

- One writer per workspace: the stages that write hold the workspace's writer lock
  (:mod:`store_core.locking`) from reading their base to their commit, and
  :func:`write_semantic_id_version` re-checks the base inside its transaction
  (``base=BaseVersion(n)``, :class:`StaleBaseError` when another version was committed
  since).

Within one process, DuckDB refuses to open the same file with a different configuration
(read-write and read-only together); use one mode per process at a time.
"""

from store_core.storage.checks import RowsInput
from store_core.storage.connection import (
    DEFAULT_LOCK_TIMEOUT_S,
    QUERY_LOCK_TIMEOUT_S,
    connect,
    connect_read_only_with_retry,
    logger,
    query,
)
from store_core.storage.evals import read_eval_results, write_eval_results
from store_core.storage.items import upsert_items
from store_core.storage.schema import (
    CODEBOOKS_DDL,
    EVAL_RESULTS_DDL,
    SEMANTIC_ID_ROWS_SCHEMA,
    SEMANTIC_ID_VERSIONS_DDL,
    SEMANTIC_IDS_DDL,
    SEMANTIC_IDS_ITEM_INDEX_DDL,
    SID_METHODS,
    VIEWS_AND_MACROS_SQL,
    ensure_schema,
)
from store_core.storage.versions import (
    BaseVersion,
    StaleBaseError,
    codebook_rows,
    current_ids,
    current_rows,
    issued_codes,
    latest_version,
    write_semantic_id_version,
)

__all__ = [
    "CODEBOOKS_DDL",
    "DEFAULT_LOCK_TIMEOUT_S",
    "EVAL_RESULTS_DDL",
    "QUERY_LOCK_TIMEOUT_S",
    "SEMANTIC_IDS_DDL",
    "SEMANTIC_IDS_ITEM_INDEX_DDL",
    "SEMANTIC_ID_ROWS_SCHEMA",
    "SEMANTIC_ID_VERSIONS_DDL",
    "SID_METHODS",
    "VIEWS_AND_MACROS_SQL",
    "BaseVersion",
    "RowsInput",
    "StaleBaseError",
    "codebook_rows",
    "connect",
    "connect_read_only_with_retry",
    "current_ids",
    "current_rows",
    "ensure_schema",
    "issued_codes",
    "latest_version",
    "logger",
    "query",
    "read_eval_results",
    "upsert_items",
    "write_eval_results",
    "write_semantic_id_version",
]
