"""store_core.data_files: the one reader of each ingested Parquet file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store_core import data_files
from store_core.errors import DataError, MissingInputError
from store_core.schemas import ITEMS_SCHEMA
from tests.conftest import REPO


def _items(directory: Path, texts: list[str]) -> None:
    n = len(texts)
    table = pa.table(
        {
            "item_id": [str(i) for i in range(n)],
            "title": [None] * n,
            "fields": [[] for _ in range(n)],
            "text": texts,
            "content_hash": ["h"] * n,
        },
        schema=ITEMS_SCHEMA,
    )
    pq.write_table(table, directory / data_files.ITEMS_FILE)


def test_items_are_read_once_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _items(tmp_path, ["a", "b"])
    reads: list[str] = []
    real = data_files.read_parquet

    def counted(uri: str, *args: object, **kwargs: object) -> pa.Table:
        reads.append(uri)
        return real(uri, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(data_files, "read_parquet", counted)
    data_files._read_whole.cache_clear()
    first = data_files.read_items(str(tmp_path), ["item_id", "text"])
    again = data_files.read_items(str(tmp_path), ["item_id", "text"])
    assert first.column("text").to_pylist() == again.column("text").to_pylist() == ["a", "b"]
    assert len(reads) == 1  # the second read is the kept table
    assert data_files.read_items(str(tmp_path)).column_names == ITEMS_SCHEMA.names
    assert len(reads) == 2  # other columns: read
    _items(tmp_path, ["a", "b", "c"])  # rewritten (re-ingest): size and mtime change
    stat = os.stat(tmp_path / data_files.ITEMS_FILE)
    os.utime(tmp_path / data_files.ITEMS_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_files.read_items(str(tmp_path), ["item_id", "text"]).num_rows == 3
    assert len(reads) == 3


def test_missing_or_broken_files_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="run `store ingest` first"):
        data_files.read_splits(str(tmp_path))
    with pytest.raises(MissingInputError):
        data_files.read_interactions(str(tmp_path), filters=[("user_id", "=", "1")])
    (tmp_path / data_files.ITEMS_FILE).write_bytes(b"not parquet")
    with pytest.raises(DataError) as info:
        data_files.read_items(str(tmp_path), ["item_id"])
    assert "\n" not in str(info.value) and data_files.ITEMS_FILE in str(info.value)
    _items(tmp_path, ["a"])
    with pytest.raises(DataError, match="nope"):
        data_files.read_items(str(tmp_path), ["item_id", "nope"])


def test_only_data_files_reads_the_workspace_parquet_files() -> None:
    """No library module or flow reads items/splits/interactions Parquet itself."""
    pattern = re.compile(r"pq\.read_table|pq\.ParquetFile|read_parquet\(")
    offenders = []
    for top in ("store_core", "flows"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path.name == "data_files.py" or "readers" in path.parts:
                continue  # readers/ read the raw sources, not the workspace
            text = path.read_text(encoding="utf-8")
            for name in ("ITEMS_FILE", "SPLITS_FILE", "INTERACTIONS_FILE"):
                if name in text and pattern.search(text):
                    offenders.append(f"{path.relative_to(REPO)} ({name})")
    assert offenders == []
