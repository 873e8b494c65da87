"""Tests of the source format readers (store_core.readers)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store_core.config import DataConfig, DataFormat
from store_core.errors import ConfigError, DataError
from store_core.readers import READERS, RawCatalog, read_source
from store_core.readers.base import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA
from store_core.readers.fsutil import (
    iter_lines,
    join,
    open_text,
    parse_timestamp,
    read_text,
    to_text,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not present")
    return path


@pytest.fixture
def memfs() -> Iterator[fsspec.AbstractFileSystem]:
    """A cleared in-memory filesystem (cleared again afterwards)."""
    fs = fsspec.filesystem("memory")

    def clear() -> None:
        fs.store.clear()
        fs.pseudo_dirs.clear()
        fs.pseudo_dirs.append("")

    clear()
    yield fs
    clear()


def read(fmt: str, path: Path | str, **data: Any) -> RawCatalog:
    catalog = read_source(DataConfig.model_validate({"format": fmt, **data}), str(path))
    assert catalog.items.schema == RAW_ITEMS_SCHEMA
    assert catalog.interactions.schema == RAW_INTERACTIONS_SCHEMA
    return catalog


def items_of(catalog: RawCatalog) -> list[tuple[str, list[tuple[str, str]], str]]:
    return [(r["item_id"], r["fields"], r["record"]) for r in catalog.items.to_pylist()]


def inters_of(catalog: RawCatalog) -> list[tuple[str, str, int | None, int, str]]:
    return [
        (r["user_id"], r["item_id"], r["timestamp"], r["source_order"], r["record"])
        for r in catalog.interactions.to_pylist()
    ]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def write_gz(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


# --------------------------------------------------------------------------- registry / fsutil


def test_every_format_has_a_reader() -> None:
    assert set(READERS) == set(get_args(DataFormat))


def test_join_keeps_protocol_and_avoids_double_slash() -> None:
    assert join("memory://data/src", "a.json") == "memory://data/src/a.json"
    assert join("/tmp/src/", "a.json") == "/tmp/src/a.json"
    assert join("s3://bucket", "x") == "s3://bucket/x"


def test_lines_are_read_through_gzip_with_bom_and_crlf_stripped(tmp_path: Path) -> None:
    uri = str(write_gz(tmp_path / "f.txt.gz", "\ufeffa\r\nb\n\nc"))
    assert list(iter_lines(uri)) == [(1, "a"), (2, "b"), (3, ""), (4, "c")]
    assert open_text(uri) == ["a", "b", "", "c"]
    assert read_text(uri) == "a\r\nb\n\nc"


def test_missing_file_and_bad_bytes_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as missing:
        read_text(str(tmp_path / "nope.txt"))
    assert missing.value.file == str(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nab\xffc\n")
    for reader in (lambda u: list(iter_lines(u)), read_text):
        with pytest.raises(DataError, match="line 2") as err:
            reader(str(bad))
        assert err.value.record == "byte 5"
        assert "bad.txt" in str(err.value)


def test_to_text_and_timestamps() -> None:
    assert to_text("  x ") == "x"
    assert to_text(" ") is None
    assert to_text([["A", "B"], ["A", "C"], ""], dedupe=True) == "A, B, C"
    assert to_text(["A", "A"]) == "A, A"
    assert to_text(3) == "3"
    assert to_text(3, scalars=False) is None
    assert to_text({"a": 1}) is None
    assert to_text(float("nan")) is None
    assert parse_timestamp("12", file="f", record="r", field="t") == 12
    assert parse_timestamp(12.0, file="f", record="r", field="t") == 12
    # Fractions are kept, not truncated to a tie (issue 15).
    assert parse_timestamp("12.7", file="f", record="r", field="t") == 12.7
    with pytest.raises(DataError, match="unix timestamp in seconds"):
        parse_timestamp("soon", file="f", record="r", field="t")
    with pytest.raises(DataError, match="required field is missing"):
        parse_timestamp(None, file="f", record="r", field="t")


# --------------------------------------------------------------------------- movielens


def movielens_dir(root: Path, genre_file: bool = True) -> Path:
    write(root / "u.data", "1\t10\t5\t881250949\n2\t20\t2\t881250950\n\n1\t20\t4\t881250951\n")
    write(
        root / "u.item",
        "10|Les Misérables (1995)|01-Jan-1995||http://x|0|1|1\n20|unknown||||1|0|0\n",
        encoding="latin-1",
    )
    if genre_file:
        write(root / "u.genre", "unknown|0\nAction|1\nNoir Thing|2\n\n")
    return root


def test_movielens_reads_latin1_items_with_custom_genres(tmp_path: Path) -> None:
    root = movielens_dir(tmp_path)
    catalog = read("movielens", root)
    assert items_of(catalog) == [
        (
            "10",
            [
                ("title", "Les Misérables (1995)"),
                ("release_date", "01-Jan-1995"),
                ("genres", "Action, Noir Thing"),
            ],
            "line 1",
        ),
        ("20", [("title", "unknown"), ("genres", "unknown")], "line 2"),
    ]
    assert inters_of(catalog) == [
        ("1", "10", 881250949, 0, "line 1"),
        ("2", "20", 881250950, 1, "line 2"),
        ("1", "20", 881250951, 2, "line 4"),
    ]
    assert catalog.items_file == str(root / "u.item")
    assert catalog.interactions_file == str(root / "u.data")
    assert catalog.inputs == [str(root / n) for n in ("u.data", "u.item", "u.genre")]


def test_movielens_min_rating_and_standard_genres(tmp_path: Path) -> None:
    root = tmp_path / "ml"
    write(root / "u.data", "1\t10\t5\t100\n2\t10\t3\t101\n3\t10\t4\t102\n")
    flags = ["0"] * 19
    flags[3] = flags[5] = "1"
    write(root / "u.item", "10|Toy|||" + "|" + "|".join(flags) + "\n")
    catalog = read("movielens", root, min_rating=4)
    assert [r[0] for r in inters_of(catalog)] == ["1", "3"]
    assert [r[3] for r in inters_of(catalog)] == [0, 1]
    assert items_of(catalog)[0][1] == [("title", "Toy"), ("genres", "Animation, Comedy")]
    assert catalog.inputs == [str(root / "u.data"), str(root / "u.item")]


@pytest.mark.parametrize(
    ("file", "content", "message", "field"),
    [
        ("u.data", "1\t10\t5\t1\n1\t10\t5\n", "expected 4 fields", None),
        ("u.data", "1\t10\t5\t1\n1\t10\t5\tsoon\n", "unix timestamp in seconds", "timestamp"),
        ("u.item", "10|T|d|||0|1|1\n20|T|d|||0|2|1\n", "must be 0 or 1", "Action"),
    ],
)
def test_movielens_bad_lines(
    tmp_path: Path, file: str, content: str, message: str, field: str | None
) -> None:
    root = movielens_dir(tmp_path)
    write(root / file, content)
    with pytest.raises(DataError, match=message) as err:
        read("movielens", root)
    assert err.value.record == "line 2"
    assert err.value.field == field
    assert file in str(err.value) and "line 2" in str(err.value)


def test_movielens_missing_file(tmp_path: Path) -> None:
    root = movielens_dir(tmp_path)
    (root / "u.item").unlink()
    with pytest.raises(DataError, match="file not found") as err:
        read("movielens", root)
    assert err.value.file == str(root / "u.item")


def test_movielens_real_100k() -> None:
    catalog = read("movielens", dataset("ml-100k"))
    assert catalog.interactions.num_rows == 100_000
    assert catalog.items.num_rows == 1682
    assert len(set(catalog.interactions.column("user_id").to_pylist())) == 943
    item_id, fields, record = items_of(catalog)[0]
    assert (item_id, record) == ("1", "line 1")
    assert dict(fields)["title"] == "Toy Story (1995)"
    assert dict(fields)["genres"] == "Animation, Children's, Comedy"
    assert catalog.interactions.slice(0, 1).to_pylist()[0]["timestamp"] == 881250949


# --------------------------------------------------------------------------- lcrec

LCREC_ITEMS = {
    "0": {"title": "Beaker", "description": "", "brand": "Acme", "categories": ["Lab", "Glass"]},
    "1": {"title": "Gloves", "price": 3.5, "brand": " Safe "},
}


def put(fs: fsspec.AbstractFileSystem, path: str, data: Any) -> None:
    fs.pipe(path, data if isinstance(data, bytes) else json.dumps(data).encode())


def test_lcrec_from_memory_with_inferred_name(memfs: fsspec.AbstractFileSystem) -> None:
    put(memfs, "/src/Shop.inter.json", {"7": [0, 1], "3": [1]})
    put(memfs, "/src/Shop.item.json", LCREC_ITEMS)
    catalog = read("lcrec", "memory://src")
    assert items_of(catalog) == [
        ("0", [("title", "Beaker"), ("brand", "Acme"), ("categories", "Lab, Glass")], "key '0'"),
        ("1", [("title", "Gloves"), ("brand", "Safe")], "key '1'"),
    ]
    assert inters_of(catalog) == [
        ("7", "0", None, 0, "user '7' position 1"),
        ("7", "1", None, 1, "user '7' position 2"),
        ("3", "1", None, 2, "user '3' position 1"),
    ]
    assert catalog.interactions_file == "memory://src/Shop.inter.json"
    assert catalog.inputs == ["memory://src/Shop.inter.json", "memory://src/Shop.item.json"]


def test_lcrec_name_inference_needs_exactly_one(memfs: fsspec.AbstractFileSystem) -> None:
    for name in ("A", "B"):
        put(memfs, f"/src/{name}.inter.json", {"u": [1]})
        put(memfs, f"/src/{name}.item.json", {"1": {"title": name}})
    with pytest.raises(DataError, match=r"A\.inter\.json, B\.inter\.json"):
        read("lcrec", "memory://src")
    assert items_of(read("lcrec", "memory://src", name="B"))[0][1] == [("title", "B")]
    with pytest.raises(DataError, match="directory not found"):
        read("lcrec", "memory://elsewhere")


def test_lcrec_bad_inputs(memfs: fsspec.AbstractFileSystem) -> None:
    put(memfs, "/src/S.inter.json", {"u": [1, None]})
    put(memfs, "/src/S.item.json", {"1": {"title": "x"}})
    with pytest.raises(DataError, match="required field is missing") as err:
        read("lcrec", "memory://src")
    assert err.value.record == "user 'u' position 2"
    assert err.value.field == "item_id"

    put(memfs, "/src/S.inter.json", b'{"u": [1,\n 2,, 3]}')
    with pytest.raises(DataError, match="invalid JSON") as err:
        read("lcrec", "memory://src")
    assert err.value.record == "line 2 column 4"
    assert "S.inter.json" in str(err.value)

    put(memfs, "/src/S.inter.json", {"u": [1]})
    put(memfs, "/src/S.item.json", b'{"1": {"title": "caf\xe9"}}')
    with pytest.raises(DataError, match="not valid utf-8") as err:
        read("lcrec", "memory://src")
    assert err.value.record == "byte 20"
    assert err.value.file == "memory://src/S.item.json"

    with pytest.raises(ConfigError, match="no ratings"):
        read("lcrec", "memory://src", min_rating=3)


def test_lcrec_real_scientific() -> None:
    catalog = read("lcrec", dataset("scientific"))
    assert catalog.interactions.num_rows == 58_492
    assert catalog.items.num_rows == 4344
    assert len(set(catalog.interactions.column("user_id").to_pylist())) == 8317
    fields = dict(items_of(catalog)[0][1])
    assert list(fields) == ["title", "description", "brand", "categories"]
    assert fields["brand"] == "Sealed Unit Parts Co., Inc."
    assert inters_of(catalog)[:2] == [
        ("0", "0", None, 0, "user '0' position 1"),
        ("0", "1", None, 1, "user '0' position 2"),
    ]


# --------------------------------------------------------------------------- recbole

RECBOLE_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n"
    "186\t302\t5\t891717742.0\n"
    "22\t377\t1\t\n"
)
RECBOLE_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n"
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
    "377\tHeavyweights\t\tChildren's Comedy\n"
)


def test_recbole_ml100k_layout(tmp_path: Path) -> None:
    write(tmp_path / "ml-100k.inter", RECBOLE_INTER)
    write(tmp_path / "ml-100k.item", RECBOLE_ITEM)
    catalog = read("recbole", tmp_path)
    assert inters_of(catalog) == [
        ("196", "242", 881250949, 0, "line 2"),
        ("186", "302", 891717742, 1, "line 3"),
        ("22", "377", None, 2, "line 4"),
    ]
    assert items_of(catalog)[1:] == [
        (
            "302",
            [
                ("title", "L.A. Confidential"),
                ("release_year", "1997"),
                ("class", "Crime Film-Noir Mystery Thriller"),
            ],
            "line 3",
        ),
        ("377", [("title", "Heavyweights"), ("class", "Children's Comedy")], "line 4"),
    ]
    filtered = read("recbole", tmp_path, min_rating=3)
    assert [r[0] for r in inters_of(filtered)] == ["196", "186"]


def test_recbole_keeps_movie_title_when_title_exists(memfs: fsspec.AbstractFileSystem) -> None:
    put(memfs, "/rb/x.inter", b"item_id:token\tuser_id:token\n5\tu1\n")
    put(memfs, "/rb/x.item", b"title:token_seq\tmovie_title:token_seq\titem_id:token\nA\tB\t5\n")
    catalog = read("recbole", "memory://rb", name="x")
    assert items_of(catalog) == [("5", [("title", "A"), ("movie_title", "B")], "line 2")]
    assert inters_of(catalog) == [("u1", "5", None, 0, "line 2")]
    with pytest.raises(DataError, match="required column missing") as err:
        read("recbole", "memory://rb", name="x", min_rating=1)
    assert err.value.field == "rating"


@pytest.mark.parametrize(
    ("content", "record", "message"),
    [
        ("user_id:token\titem_id:token\n1\t2\n1\n", "line 3", "expected 2 tab-separated"),
        ("user_id:token\titem:token\n1\t2\n", "line 1", "required column missing"),
        ("user_id:token\titem_id:int\n1\t2\n", "line 1", "header column must be"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tx\n", "line 2", "timestamp"),
    ],
)
def test_recbole_bad_files(tmp_path: Path, content: str, record: str, message: str) -> None:
    write(tmp_path / "d.inter", content)
    write(tmp_path / "d.item", "item_id:token\n2\n")
    with pytest.raises(DataError, match=message) as err:
        read("recbole", tmp_path)
    assert err.value.record == record
    assert "d.inter" in str(err.value)


# --------------------------------------------------------------------------- p5


def test_p5_sequences_and_json_lines_meta(tmp_path: Path) -> None:
    write(tmp_path / "user_sequence.txt", "u1 i1 i2 i3\n\nu2 i2\nu3\n")
    write(
        tmp_path / "item_meta.json",
        json.dumps(
            {
                "item_id": "i1",
                "title": "Lipstick",
                "categories": [["Beauty", "Makeup"], ["Beauty", "Lips"]],
                "imUrl": "http://img",
                "price": 9.5,
            }
        )
        + "\n"
        + "{'asin': 'i2', 'title': 'Brush', 'description': '', 'brand': 'Bo'}\n"
        + json.dumps({"item_id": 3, "title": "Comb"})
        + "\n",
    )
    catalog = read("p5", tmp_path)
    assert items_of(catalog) == [
        (
            "i1",
            [("title", "Lipstick"), ("categories", "Beauty, Makeup, Lips"), ("price", "9.5")],
            "line 1",
        ),
        ("i2", [("title", "Brush"), ("brand", "Bo")], "line 2"),
        ("3", [("title", "Comb")], "line 3"),
    ]
    assert inters_of(catalog) == [
        ("u1", "i1", None, 0, "line 1 position 1"),
        ("u1", "i2", None, 1, "line 1 position 2"),
        ("u1", "i3", None, 2, "line 1 position 3"),
        ("u2", "i2", None, 3, "line 3 position 1"),
    ]


def test_p5_mapping_meta_and_custom_names(memfs: fsspec.AbstractFileSystem) -> None:
    put(memfs, "/p5/seq.txt", b"7 1 2\n")
    put(memfs, "/p5/meta.json.gz", gzip.compress(json.dumps({"1": {"title": "A"}}).encode()))
    catalog = read("p5", "memory://p5", interactions_file="seq.txt", items_file="meta.json.gz")
    assert items_of(catalog) == [("1", [("title", "A")], "key '1'")]
    assert [r[4] for r in inters_of(catalog)] == ["line 1 position 1", "line 1 position 2"]
    assert catalog.inputs == ["memory://p5/seq.txt", "memory://p5/meta.json.gz"]


def test_p5_bad_meta(tmp_path: Path) -> None:
    write(tmp_path / "user_sequence.txt", "u i\n")
    write(tmp_path / "item_meta.json", '{"item_id": "i"}\n{"title": "no id"}\n')
    with pytest.raises(DataError, match="required field is missing") as err:
        read("p5", tmp_path)
    assert (err.value.record, err.value.field) == ("line 2", "item_id")
    write(tmp_path / "item_meta.json", '{"item_id": "i"}\n{"item_id": "j",\n')
    with pytest.raises(DataError, match="neither valid JSON") as err:
        read("p5", tmp_path)
    assert err.value.record == "line 2"


# --------------------------------------------------------------------------- amazon

REVIEW_2018 = {
    "overall": 5.0,
    "verified": True,
    "reviewerID": "A1",
    "asin": "B001",
    "unixReviewTime": 1400000000,
}
META_2018 = {
    "asin": "B001",
    "title": "Pipette",
    "description": ["Accurate.", "", "Durable."],
    "brand": "LabCo",
    "category": ["Industrial & Scientific", "Lab"],
    "also_buy": ["B002"],
}
REVIEW_2014_LINE = (
    "{'reviewerID': 'A2', 'asin': 'B002', 'overall': 2.0, 'unixReviewTime': 1300000000}"
)
META_2014_LINE = (
    "{'asin': 'B002', 'title': \"Tom's Flask\", 'salesRank': {'Toys': 3}, "
    "'categories': [['Science', 'Glass'], ['Science', 'Flasks']]}"
)


def amazon_dir(root: Path) -> Path:
    write_gz(
        root / "reviews_Sci_5.json.gz", json.dumps(REVIEW_2018) + "\n" + REVIEW_2014_LINE + "\n"
    )
    write_gz(root / "meta_Sci.json.gz", json.dumps(META_2018) + "\n\n" + META_2014_LINE + "\n")
    return root


def test_amazon_strict_json_and_python_literals_gz(tmp_path: Path) -> None:
    root = amazon_dir(tmp_path)
    write(root / "notes.txt", "not json")
    catalog = read("amazon", root)
    assert catalog.interactions_file == str(root / "reviews_Sci_5.json.gz")
    assert catalog.items_file == str(root / "meta_Sci.json.gz")
    assert items_of(catalog) == [
        (
            "B001",
            [
                ("title", "Pipette"),
                ("description", "Accurate., Durable."),
                ("brand", "LabCo"),
                ("categories", "Industrial & Scientific, Lab"),
            ],
            "line 1",
        ),
        ("B002", [("title", "Tom's Flask"), ("categories", "Science, Glass, Flasks")], "line 3"),
    ]
    assert inters_of(catalog) == [
        ("A1", "B001", 1400000000, 0, "line 1"),
        ("A2", "B002", 1300000000, 1, "line 2"),
    ]
    assert [r[0] for r in inters_of(read("amazon", root, min_rating=4))] == ["A1"]


def test_amazon_plain_json_from_memory_with_explicit_names(
    memfs: fsspec.AbstractFileSystem,
) -> None:
    put(memfs, "/az/Sci.json", json.dumps(REVIEW_2018).encode())
    put(memfs, "/az/other.json", json.dumps(REVIEW_2018).encode())
    put(memfs, "/az/meta_Sci.json", json.dumps(META_2018).encode())
    with pytest.raises(DataError, match="cannot choose the reviews file"):
        read("amazon", "memory://az")
    catalog = read("amazon", "memory://az", interactions_file="Sci.json")
    assert catalog.inputs == ["memory://az/Sci.json", "memory://az/meta_Sci.json"]
    assert inters_of(catalog) == [("A1", "B001", 1400000000, 0, "line 1")]


@pytest.mark.parametrize(
    ("second_line", "message", "field"),
    [
        ({"reviewerID": "A2", "unixReviewTime": 1}, "required field is missing", "asin"),
        (
            {"reviewerID": "A2", "asin": "B", "unixReviewTime": "x"},
            "unix timestamp in seconds",
            "unixReviewTime",
        ),
        ('{"reviewerID": "A2", "asin": ', "neither valid JSON", None),
        ("[1, 2]", "expected an object", None),
    ],
)
def test_amazon_bad_review_lines(
    tmp_path: Path, second_line: Any, message: str, field: str | None
) -> None:
    root = amazon_dir(tmp_path)
    line = second_line if isinstance(second_line, str) else json.dumps(second_line)
    write_gz(root / "reviews_Sci_5.json.gz", json.dumps(REVIEW_2018) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        read("amazon", root)
    assert err.value.record == "line 2"
    assert err.value.field == field
    assert "reviews_Sci_5.json.gz" in str(err.value) and "line 2" in str(err.value)


def test_amazon_bad_encoding_and_missing_rating(tmp_path: Path) -> None:
    root = amazon_dir(tmp_path)
    (root / "reviews_Sci_5.json.gz").write_bytes(gzip.compress(b'{"reviewerID": "\xe9"}\n'))
    with pytest.raises(DataError, match="line 1") as err:
        read("amazon", root)
    assert err.value.record == "byte 16"
    amazon_dir(root)
    write_gz(
        root / "reviews_Sci_5.json.gz", '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}'
    )
    with pytest.raises(DataError, match="no rating") as err:
        read("amazon", root, min_rating=1)
    assert err.value.field == "overall"


# --------------------------------------------------------------------------- tabular


def test_tabular_parquet_from_memory(memfs: fsspec.AbstractFileSystem) -> None:
    interactions = pa.table(
        {
            "uid": pa.array([1, 2], pa.int64()),
            "iid": pa.array([10, 20], pa.int64()),
            "ts": pa.array([1_700_000_000_500, 1_700_000_001_000], pa.timestamp("ms")),
            "extra": ["a", "b"],
        }
    )
    items = pa.table(
        {
            "iid": pa.array([10, 20], pa.int64()),
            "title": ["Mug", None],
            "tags": [["kitchen", "cup"], []],
            "year": [2001, 2002],
        }
    )
    with fsspec.open("memory://tab/interactions.parquet", "wb") as handle:
        pq.write_table(interactions, handle)
    with fsspec.open("memory://tab/items.parquet", "wb") as handle:
        pq.write_table(items, handle)
    columns = {"user_id": "uid", "item_id": "iid", "timestamp": "ts"}
    catalog = read("tabular", "memory://tab", columns=columns)
    assert inters_of(catalog) == [
        ("1", "10", 1_700_000_000.5, 0, "row 1"),  # milliseconds kept (issue 15)
        ("2", "20", 1_700_000_001, 1, "row 2"),
    ]
    assert items_of(catalog) == [
        ("10", [("title", "Mug"), ("tags", "kitchen, cup"), ("year", "2001")], "row 1"),
        ("20", [("year", "2002")], "row 2"),
    ]
    subset = read("tabular", "memory://tab", columns={**columns, "text_fields": ["year"]})
    assert items_of(subset)[0][1] == [("year", "2001")]


def test_tabular_csv_keeps_ids_as_text(tmp_path: Path) -> None:
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,rating\n007,01,5,4\n8,02,,1\n")
    write(tmp_path / "items.csv", 'item_id,name,price\n01,"Pen, blue",1.50\n02,,\n')
    catalog = read("tabular", tmp_path)
    assert catalog.interactions_file == str(tmp_path / "interactions.csv")
    assert inters_of(catalog) == [("007", "01", 5, 0, "row 1"), ("8", "02", None, 1, "row 2")]
    assert items_of(catalog) == [
        ("01", [("name", "Pen, blue"), ("price", "1.50")], "row 1"),
        ("02", [], "row 2"),
    ]
    filtered = read("tabular", tmp_path, min_rating=3)
    assert [r[0] for r in inters_of(filtered)] == ["007"]
    no_time = read("tabular", tmp_path, columns={"timestamp": None})
    assert [r[2] for r in inters_of(no_time)] == [None, None]


def test_tabular_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as err:
        read("tabular", tmp_path)
    assert err.value.file == str(tmp_path / "interactions.parquet")
    write(tmp_path / "interactions.csv", "user,item_id\n1,2\n")
    write(tmp_path / "items.csv", "item_id,name\n2,x\n")
    with pytest.raises(DataError, match="column not found") as err:
        read("tabular", tmp_path)
    assert (err.value.file, err.value.field) == (str(tmp_path / "interactions.csv"), "user_id")
    columns = {"user_id": "user", "timestamp": None}
    assert inters_of(read("tabular", tmp_path, columns=columns)) == [("1", "2", None, 0, "row 1")]
    write(tmp_path / "interactions.csv", "user,item_id\n1,\n")
    with pytest.raises(DataError, match="record row 1, field 'item_id'"):
        read("tabular", tmp_path, columns=columns)
    write(tmp_path / "it.txt", "x")
    with pytest.raises(DataError, match="unsupported file type"):
        read("tabular", tmp_path, columns=columns, items_file="it.txt")
