"""A DuckDB reader in its own process, run by the service tests while a writer works.

    python tests/duckdb_reader.py <store.duckdb> <stop-file> <report.json>

Until ``<stop-file>`` exists, opens a read-only connection (waiting while a writer holds
the file, as ``store query`` does) and reads, in one snapshot, the current version, its
``semantic_id_versions`` row counts, and what ``semantic_ids`` and the
``current_semantic_ids`` view actually hold for it. Writes every observation, every
error and the longest wait for the lock to ``<report.json>``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from store_core import storage

SNAPSHOT_SQL = """
SELECT v.version, v.row_count, v.item_count,
       (SELECT count(*) FROM semantic_ids s WHERE s.version = v.version),
       (SELECT count(*) FROM current_semantic_ids)
FROM current_semantic_id_version v
"""


def main(db: str, stop_file: str, report: str) -> None:
    observations: list[list[int]] = []
    errors: list[str] = []
    longest = 0.0
    while not Path(stop_file).exists():
        started = time.perf_counter()
        try:
            _, rows = storage.query(db, SNAPSHOT_SQL, timeout_s=120.0)
            observations.extend([int(v) for v in row] for row in rows)
        except Exception as exc:  # the test asserts there are none
            errors.append(f"{type(exc).__name__}: {exc}")
        longest = max(longest, time.perf_counter() - started)
        time.sleep(0.02)
    Path(report).write_text(
        json.dumps({"observations": observations, "errors": errors, "longest_s": longest})
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
