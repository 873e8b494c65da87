"""Arrow never reads a file through a Python file object (store_core.arrow_input).

The fault this guards against: ``store recommend`` exited with SIGABRT ("terminate called
without an active exception") in about 1 of 15-25 runs, after its output was written,
because Arrow's thread pool destroyed a ``PyReadableFile`` (an fsspec handle handed to
``pq.read_table``) during interpreter finalization. The tests check the structural rule
(every pyarrow reader this project calls gets a native file) and that the native paths
read the same bytes and raise the same errors.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from store_core.arrow_input import open_arrow_input
from store_core.config import DataConfig
from store_core.data_files import read_interactions, read_parquet
from store_core.errors import DataError, MissingInputError
from store_core.readers import read_source

TABLE = pa.table({"user_id": ["1", "2", "2", "3"], "item_id": ["a", "b", "c", "a"]})


@pytest.fixture
def memfs() -> Iterator[fsspec.AbstractFileSystem]:
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    yield fs
    fs.store.clear()


@pytest.fixture
def sources(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every source handed to the pyarrow readers the project calls, in call order."""
    seen: list[Any] = []

    def spy(module: Any, name: str) -> None:
        real: Callable[..., Any] = getattr(module, name)

        def recording(source: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(source)
            return real(source, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    for module, name in ((pq, "read_table"), (pq, "ParquetFile"), (pacsv, "read_csv")):
        spy(module, name)
    spy(pacsv, "open_csv")
    return seen


def _native(source: Any) -> bool:
    return isinstance(source, pa.NativeFile) and not isinstance(source, pa.PythonFile)


def test_local_parquet_is_opened_by_arrow_and_a_remote_one_is_copied_into_arrow_memory(
    tmp_path: Path, memfs: fsspec.AbstractFileSystem
) -> None:
    local = tmp_path / "t.parquet"
    pq.write_table(TABLE, local)
    with fsspec.open("memory://d/t.parquet", "wb") as handle:
        pq.write_table(TABLE, handle)
    with open_arrow_input(str(local)) as source:
        assert isinstance(source, pa.OSFile)
        assert pq.read_table(source).equals(TABLE)
    with open_arrow_input("memory://d/t.parquet") as source:
        assert isinstance(source, pa.BufferReader)
        assert pq.read_table(source).equals(TABLE)
    assert source.closed


def test_compressed_input_is_decompressed_as_fsspec_does(tmp_path: Path) -> None:
    text = b"user_id,item_id\n1,a\n2,b\n"
    (tmp_path / "x.csv.gz").write_bytes(gzip.compress(text))
    (tmp_path / "x.csv").write_bytes(text)
    with open_arrow_input(str(tmp_path / "x.csv.gz"), compression="infer") as source:
        assert isinstance(source, pa.BufferReader)
        assert source.read() == text
    with open_arrow_input(str(tmp_path / "x.csv"), compression="infer") as source:
        assert isinstance(source, pa.OSFile)  # nothing to decompress: stays native
        assert source.read() == text


def test_open_errors_are_the_ones_fsspec_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), open_arrow_input(str(tmp_path / "missing.parquet")):
        pass
    with pytest.raises(FileNotFoundError), open_arrow_input("memory://nowhere/x.parquet"):
        pass
    with pytest.raises(IsADirectoryError), open_arrow_input(str(tmp_path)):
        pass
    with pytest.raises(MissingInputError, match=r"missing\.parquet"):
        read_parquet(str(tmp_path / "missing.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read columns"):
        read_parquet(str(tmp_path / "bad.parquet"))


def test_workspace_reads_with_filters_get_native_files(
    tmp_path: Path, memfs: fsspec.AbstractFileSystem, sources: list[Any]
) -> None:
    """``store recommend``'s read (one user's interactions, a filter) locally and from an
    fsspec URI: the same rows, and pyarrow is never handed a Python file object."""
    pq.write_table(TABLE, tmp_path / "interactions.parquet")
    with fsspec.open("memory://ws/data/interactions.parquet", "wb") as handle:
        pq.write_table(TABLE, handle)
    for data_dir in (str(tmp_path), "memory://ws/data"):
        rows = read_interactions(data_dir, ["item_id"], filters=[("user_id", "=", "2")])
        assert rows.column("item_id").to_pylist() == ["b", "c"]
    assert len(sources) == 2
    assert all(_native(source) for source in sources), [type(s).__name__ for s in sources]


def test_tabular_sources_get_native_files(
    tmp_path: Path, memfs: fsspec.AbstractFileSystem, sources: list[Any]
) -> None:
    """The tabular reader's Parquet and CSV (plain and .gz) paths."""
    pq.write_table(TABLE, tmp_path / "interactions.parquet")
    (tmp_path / "items.csv.gz").write_bytes(gzip.compress(b"item_id,title\na,A\nb,B\nc,C\n"))
    with fsspec.open("memory://src/interactions.csv", "wb") as handle:
        handle.write(b"user_id,item_id\n1,a\n2,b\n")
    with fsspec.open("memory://src/items.parquet", "wb") as handle:
        pq.write_table(pa.table({"item_id": ["a", "b"], "title": ["A", "B"]}), handle)
    base = {"format": "tabular", "columns": {"timestamp": None}}
    gz_items = DataConfig.model_validate({**base, "items_file": "items.csv.gz"})
    local = read_source(gz_items, str(tmp_path))
    remote = read_source(DataConfig.model_validate(base), "memory://src")
    assert local.interactions.num_rows == 4 and local.items.num_rows == 3
    assert remote.interactions.num_rows == 2 and remote.items.num_rows == 2
    kinds = {type(source).__name__ for source in sources}
    assert kinds == {"OSFile", "BufferReader"}, kinds
    assert all(_native(source) for source in sources)
