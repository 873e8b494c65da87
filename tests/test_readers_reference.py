"""Each reader reads its format the way the format's own tool reads it (issue 15).

The reference behaviour is the spec: RecBole 1.2 splits atomic files with
``pandas.read_csv(sep="\\t", engine="python")``; the LC-Rec and Amazon loaders use
Python's ``json`` and ``ast.literal_eval``. Where the reference is silent (a key repeated
in a JSON object) or crashes (a 5000-digit integer, deep nesting, a time beyond int64),
the reader raises one DataError line naming file, record and field instead.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store_core.config import DataConfig, DataFormat
from store_core.errors import DataError
from store_core.readers import RawCatalog, read_source
from store_core.readers.fsutil import MAX_TIMESTAMP, parse_timestamp
from store_core.splits import Interaction, sequences


def read(fmt: str, path: Path, **data: Any) -> RawCatalog:
    return read_source(DataConfig.model_validate({"format": fmt, **data}), str(path))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def fields_of(catalog: RawCatalog) -> dict[str, dict[str, str]]:
    return {r["item_id"]: dict(r["fields"]) for r in catalog.items.to_pylist()}


def chronological(catalog: RawCatalog) -> list[str]:
    """Item ids of the first user in the order the split uses."""
    rows = [
        Interaction(r["user_id"], r["item_id"], r["timestamp"], r["source_order"])
        for r in catalog.interactions.to_pylist()
    ]
    (sequence,) = sequences(rows).values()
    return [row.item_id for row in sequence]


# --------------------------------------------------------------------------- time precision

#: File order I1, I2, I3; true order I3 (…050.0), I2 (…100.2), I1 (…100.9).
TIMES = ("1400000100.9", "1400000100.2", "1400000050.0")
EXPECTED_SECONDS = [1400000100.9, 1400000100.2, 1400000050.0]


def _recbole_times(root: Path) -> Path:
    rows = "".join(f"U1\tI{n}\t{t}\n" for n, t in enumerate(TIMES, start=1))
    write(root / "shop.inter", "user_id:token\titem_id:token\ttimestamp:float\n" + rows)
    write(root / "shop.item", "item_id:token\ttitle:token\nI1\ta\nI2\tb\nI3\tc\n")
    return root


def _tabular_csv_times(root: Path) -> Path:
    rows = "".join(f"U1,I{n},{t}\n" for n, t in enumerate(TIMES, start=1))
    write(root / "interactions.csv", "user_id,item_id,timestamp\n" + rows)
    write(root / "items.csv", "item_id,title\nI1,a\nI2,b\nI3,c\n")
    return root


def _tabular_parquet_times(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    millis = [1400000100900, 1400000100200, 1400000050000]
    pq.write_table(
        pa.table(
            {
                "user_id": ["U1"] * 3,
                "item_id": ["I1", "I2", "I3"],
                "timestamp": pa.array(millis, pa.timestamp("ms")),
            }
        ),
        root / "interactions.parquet",
    )
    pq.write_table(
        pa.table({"item_id": ["I1", "I2", "I3"], "title": list("abc")}), root / "items.parquet"
    )
    return root


def _amazon_times(root: Path) -> Path:
    reviews = "".join(
        json.dumps({"reviewerID": "U1", "asin": f"I{n}", "unixReviewTime": float(t)}) + "\n"
        for n, t in enumerate(TIMES, start=1)
    )
    write(root / "reviews_Shop.json", reviews)
    meta = "".join(
        json.dumps({"asin": f"I{n}", "title": t}) + "\n" for n, t in [(1, "a"), (2, "b"), (3, "c")]
    )
    write(root / "meta_Shop.json", meta)
    return root


def _movielens_times(root: Path) -> Path:
    rows = "".join(f"1\t{n}\t5\t{t}\n" for n, t in enumerate(TIMES, start=1))
    write(root / "u.data", rows)
    flags = "|0" * 19
    write(
        root / "u.item", "".join(f"{n}|Film {n}|01-Jan-1995||http://x{flags}\n" for n in (1, 2, 3))
    )
    return root


@pytest.mark.parametrize(
    ("fmt", "make", "order"),
    [
        ("recbole", _recbole_times, ["I3", "I2", "I1"]),
        ("tabular", _tabular_csv_times, ["I3", "I2", "I1"]),
        ("tabular", _tabular_parquet_times, ["I3", "I2", "I1"]),
        ("amazon", _amazon_times, ["I3", "I2", "I1"]),
        ("movielens", _movielens_times, ["3", "2", "1"]),
    ],
    ids=["recbole", "tabular-csv", "tabular-parquet-ms", "amazon", "movielens"],
)
def test_every_reader_keeps_fractional_seconds(
    fmt: str, make: Any, order: list[str], tmp_path: Path
) -> None:
    catalog = read(fmt, make(tmp_path / "src"))
    stamps = catalog.interactions.column("timestamp").to_pylist()
    assert stamps == EXPECTED_SECONDS  # the same float64 seconds from every reader
    assert chronological(catalog) == order  # I3, I2, I1: not truncated into a tie


def test_timestamp_parsing_is_exact_and_bounded() -> None:
    kw = {"file": "f", "record": "r", "field": "t"}
    assert parse_timestamp("1400000100.9", **kw) == 1400000100.9
    assert parse_timestamp(1400000100, **kw) == 1400000100.0
    assert parse_timestamp("-86400", **kw) == -86400.0  # before 1970 is a time too
    assert parse_timestamp(MAX_TIMESTAMP, **kw) == MAX_TIMESTAMP
    for bad in ("99999999999999999999", "1e30", 2**64 - 1, "nan", "inf", True):
        with pytest.raises(DataError) as info:
            parse_timestamp(bad, **kw)
        assert "field 't'" in str(info.value)


# --------------------------------------------------------------------------- RecBole quoting

QUOTED_ITEM = (
    "item_id:token\ttitle:token\tnote:token\n"
    'I1\t"Acme ""Pro"" Beaker, 250 ml"\tplain\n'
    'I2\t"tab\tinside"\t12" vinyl\n'
    'I3\t"two\nlines"\tx\n'
    "\n"
    "I4\tlast\ty\n"
)


def test_recbole_quoted_fields_read_as_pandas_reads_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "shop.inter", "user_id:token\titem_id:token\nU1\tI1\n")
    write(src / "shop.item", QUOTED_ITEM)
    catalog = read("recbole", src)
    got = fields_of(catalog)
    assert got["I1"]["title"] == 'Acme "Pro" Beaker, 250 ml'
    assert got["I2"] == {"title": "tab\tinside", "note": '12" vinyl'}
    assert got["I3"]["title"] == "two\nlines"
    # records name the line the row starts on: I4 is on line 7 (the quoted newline and
    # the blank line count as lines)
    assert catalog.items.column("record").to_pylist()[-1] == "line 7"

    pd = pytest.importorskip("pandas")
    reference = pd.read_csv(io.StringIO(QUOTED_ITEM), sep="\t", engine="python", dtype=str)
    for row in reference.itertuples(index=False):
        item_id, title, note = row
        assert got[item_id] == {"title": title.strip(), "note": note.strip()}


@pytest.mark.parametrize(
    ("body", "record", "reason"),
    [
        ('I1\t"never closed\nI2\tx\n', "line 2", "unexpected end of data"),
        ('I1\t"closed"then text\n', "line 2", "expected after"),
        ("I1\t" + "x" * 140_000 + "\n", "line 2", "field larger than field limit"),
    ],
    ids=["unterminated", "text-after-quote", "field-limit"],
)
def test_recbole_bad_quoting_is_one_line_error(
    body: str, record: str, reason: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write(src / "shop.inter", "user_id:token\titem_id:token\nU1\tI1\n")
    item = write(src / "shop.item", "item_id:token\ttitle:token\n" + body)
    with pytest.raises(DataError) as info:
        read("recbole", src)
    message = str(info.value)
    assert f"file {item}, record {record}" in message and reason in message
    assert "\n" not in message


def test_tabular_csv_quoting_matches_pandas(tmp_path: Path) -> None:
    src = tmp_path / "src"
    items = 'item_id,title\n001,"Acme ""Pro"" Beaker, 250 ml"\n'
    write(src / "interactions.csv", "user_id,item_id,timestamp\nU1,001,5\n")
    write(src / "items.csv", items)
    got = fields_of(read("tabular", src))
    assert got == {"001": {"title": 'Acme "Pro" Beaker, 250 ml'}}
    pd = pytest.importorskip("pandas")
    reference = pd.read_csv(io.StringIO(items), dtype=str)
    assert reference.iloc[0].tolist() == ["001", 'Acme "Pro" Beaker, 250 ml']


# --------------------------------------------------------------------------- JSON / literals


def test_amazon_2014_literal_lines_match_ast_literal_eval_and_gzip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    line = (
        "{'asin': 'B1', 'title': 'Acme \"Pro\" Beaker', "
        "'categories': [['Lab', 'Glass']], 'price': 3.5}"
    )
    src.mkdir()
    (src / "meta_Shop.json.gz").write_bytes(gzip.compress((line + "\n").encode()))
    reviews = json.dumps({"reviewerID": "A1", "asin": "B1", "unixReviewTime": 5}) + "\n"
    (src / "reviews_Shop.json.gz").write_bytes(gzip.compress(reviews.encode()))
    got = fields_of(read("amazon", src))
    reference = ast.literal_eval(line)
    assert got["B1"] == {"title": reference["title"], "categories": "Lab, Glass"}


def test_literal_lines_are_never_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    write(src / "meta_Shop.json", f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    write(
        src / "reviews_Shop.json",
        json.dumps({"reviewerID": "A", "asin": "B", "unixReviewTime": 1}) + "\n",
    )
    with pytest.raises(DataError, match="neither valid JSON"):
        read("amazon", src)
    assert not marker.exists()


def test_p5_repeated_mapping_key_keeps_both_records(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "user_sequence.txt", "u1 7\n")
    write(src / "item_meta.json", '{"7": {"title": "A"}, "7": {"title": "B"}}')
    catalog = read("p5", src)
    rows = catalog.items.to_pylist()
    assert [(r["item_id"], dict(r["fields"])["title"]) for r in rows] == [("7", "A"), ("7", "B")]
    assert rows[1]["record"] == "key '7' (repeated)"


# --------------------------------------------------------------------------- no traceback

HUGE = "9" * 5000


def _lcrec(root: Path, inter: str, item: str) -> Path:
    write(root / "Shop.inter.json", inter)
    write(root / "Shop.item.json", item)
    return root


def _amazon(root: Path, review: str, meta: str = '{"asin": "B1", "title": "t"}') -> Path:
    write(root / "reviews_Shop.json", review + "\n")
    write(root / "meta_Shop.json", meta + "\n")
    return root


def _recbole(root: Path, inter: str) -> Path:
    write(root / "shop.inter", "user_id:token\titem_id:token\ttimestamp:float\n" + inter)
    write(root / "shop.item", "item_id:token\ttitle:token\nI1\tx\n")
    return root


def _movielens(root: Path, data: str) -> Path:
    write(root / "u.data", data)
    write(root / "u.item", "1|Film|01-Jan-1995||http://x" + "|0" * 19 + "\n")
    return root


def _parquet(root: Path, column: pa.Array) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"user_id": ["U1"], "item_id": ["I1"], "timestamp": column}),
        root / "interactions.parquet",
    )
    pq.write_table(pa.table({"item_id": ["I1"], "title": ["x"]}), root / "items.parquet")
    return root


def _p5(root: Path, sequences: str) -> Path:
    write(root / "user_sequence.txt", sequences)
    write(root / "item_meta.json", '{"item_id": "1", "title": "x"}\n')
    return root


def _csv(root: Path, interactions: str, items: str = "item_id,title\n1,x\n") -> Path:
    write(root / "interactions.csv", interactions)
    write(root / "items.csv", items)
    return root


DEEP = "[" * 100_000 + "]" * 100_000

#: (format, build(root), file name, record, field) for inputs the reference tools crash
#: on or accept silently.
BAD_INPUTS: list[tuple[str, Any, str, str | None, str | None]] = [
    (
        "lcrec",
        lambda r: _lcrec(r, f'{{"u": [{HUGE}]}}', '{"1": {"title": "x"}}'),
        "Shop.inter.json",
        "user 'u' position 1",
        "item_id",
    ),
    ("lcrec", lambda r: _lcrec(r, '{"u": ["1"]}', DEEP), "Shop.item.json", None, None),
    (
        "lcrec",
        lambda r: _lcrec(r, '{"u": ["1"], "u": ["2"]}', '{"1": {"title": "x"}}'),
        "Shop.inter.json",
        "user 'u'",
        "user_id",
    ),
    (
        "lcrec",
        lambda r: _lcrec(r, '{"u": ["1"]}', '{"1": {"title": "x", "title": "y"}}'),
        "Shop.item.json",
        "key '1'",
        "title",
    ),
    (
        "amazon",
        lambda r: _amazon(r, f'{{"reviewerID": "A", "asin": {HUGE}, "unixReviewTime": 1}}'),
        "reviews_Shop.json",
        "line 1",
        "asin",
    ),
    (
        "amazon",
        lambda r: _amazon(r, f'{{"reviewerID": "A", "asin": "B1", "unixReviewTime": {HUGE}}}'),
        "reviews_Shop.json",
        "line 1",
        "unixReviewTime",
    ),
    (
        "amazon",
        lambda r: _amazon(r, '{"reviewerID": "A", "asin": "B1", "unixReviewTime": 1e30}'),
        "reviews_Shop.json",
        "line 1",
        "unixReviewTime",
    ),
    ("amazon", lambda r: _amazon(r, DEEP), "reviews_Shop.json", "line 1", None),
    (
        "amazon",
        lambda r: _amazon(
            r, "{'reviewerID': 'A', 'asin': 'B1', 'asin': 'B2', 'unixReviewTime': 1}"
        ),
        "reviews_Shop.json",
        "line 1",
        "asin",
    ),
    (
        "movielens",
        lambda r: _movielens(r, "1\t1\t5\t99999999999999999999\n"),
        "u.data",
        "line 1",
        "timestamp",
    ),
    ("recbole", lambda r: _recbole(r, "U1\tI1\t1e30\n"), "shop.inter", "line 2", "timestamp"),
    (
        "tabular",
        lambda r: _parquet(r, pa.array([2**64 - 1], pa.uint64())),
        "interactions.parquet",
        "row 1",
        "timestamp",
    ),
    (
        "movielens",
        lambda r: write(_movielens(r, "1\t1\t5\t1\n") / "u.genre", f"unknown|{HUGE}\n").parent,
        "u.genre",
        "line 1",
        None,
    ),
    ("p5", lambda r: _p5(r, "u1 1\nu2 1\nu1 1 1\n"), "user_sequence.txt", "line 3", "user_id"),
    (
        "tabular",
        lambda r: _csv(r, "user_id,item_id,timestamp\nu,1,5\n", "item_id,title,title\n1,a,b\n"),
        "items.csv",
        None,
        "title",
    ),
    (
        "tabular",
        lambda r: _csv(r, "user_id,item_id,timestamp\nu,1,1400000100.9\nu,1,1e30\n"),
        "interactions.csv",
        "row 2",
        "timestamp",
    ),
    (
        "tabular",
        lambda r: _parquet(r, pa.array([10**15], pa.timestamp("s"))),
        "interactions.parquet",
        "row 1",
        "timestamp",
    ),
]


@pytest.mark.parametrize(("fmt", "build", "name", "record", "field"), BAD_INPUTS)
def test_bad_inputs_are_one_line_data_errors(
    fmt: str, build: Any, name: str, record: str | None, field: str | None, tmp_path: Path
) -> None:
    src = build(tmp_path / "src")
    with pytest.raises(DataError) as info:
        read(fmt, src)
    error, message = info.value, str(info.value)
    assert error.file == str(src / name)
    assert error.record == record if record is not None else True
    assert error.field == field if field is not None else True
    assert "\n" not in message and len(message) < 600


@pytest.mark.parametrize("fmt", get_args(DataFormat))
def test_symlink_loop_as_data_path(fmt: str, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(DataError) as info:
        read(fmt, loop, name="Shop")
    assert str(loop) in str(info.value)
    assert "\n" not in str(info.value)


def test_lcrec_reads_as_json_load(tmp_path: Path) -> None:
    items = '{"1": {"title": "Caf\\u00e9 \\"Pro\\" mug", "sales": 12, "tags": ["a", ["b"]]}}'
    src = _lcrec(tmp_path / "src", '{"u": ["1", 1]}', items)
    catalog = read("lcrec", src)
    reference = json.loads(items)["1"]
    # strings as json gives them, lists flattened, numbers are not text
    assert fields_of(catalog)["1"] == {"title": reference["title"], "tags": "a, b"}
    assert catalog.interactions.column("item_id").to_pylist() == ["1", "1"]


def test_movielens_reads_as_pandas_reads_grouplens_files(tmp_path: Path) -> None:
    flags = "|0" * 18 + "|1"
    item = 'Caf\xe9 "Noir" (1995)|01-Jan-1995||http://x' + flags
    src = tmp_path / "src"
    src.mkdir()
    (src / "u.item").write_bytes(f"7|{item}\n".encode("latin-1"))
    (src / "u.data").write_text("196\t7\t3\t881250949\n")
    catalog = read("movielens", src)
    pd = pytest.importorskip("pandas")
    items = pd.read_csv(src / "u.item", sep="|", header=None, encoding="latin-1", dtype=str)
    data = pd.read_csv(src / "u.data", sep="\t", header=None, dtype=str)
    assert fields_of(catalog)["7"]["title"] == items.iloc[0, 1] == 'Café "Noir" (1995)'
    assert fields_of(catalog)["7"]["genres"] == "Western"
    row = catalog.interactions.to_pylist()[0]
    assert [row["user_id"], row["item_id"]] == data.iloc[0, :2].tolist()
    assert row["timestamp"] == float(data.iloc[0, 3])


def test_p5_sequences_split_on_whitespace(tmp_path: Path) -> None:
    src = _p5(tmp_path / "src", "u1 1 1\tx\n\nu2 1\n")
    write(
        src / "item_meta.json", '{"item_id": "1", "title": "a"}\n{"item_id": "x", "title": "b"}\n'
    )
    catalog = read("p5", src)
    pairs = [(r["user_id"], r["item_id"]) for r in catalog.interactions.to_pylist()]
    assert pairs == [("u1", "1"), ("u1", "1"), ("u1", "x"), ("u2", "1")]
