"""Evaluation results: :func:`write_eval_results` and :func:`read_eval_results`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from store_core.storage.connection import (
    DEFAULT_LOCK_TIMEOUT_S,
    QUERY_LOCK_TIMEOUT_S,
    _connect_writer,
    _has_table,
    _local_path,
    _transaction,
    connect_read_only_with_retry,
)

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
