"""Helpers every reader shares: file access over fsspec and building the raw tables.

File access
    Paths are fsspec URIs (a local path, ``memory://...``, ``s3://...``); :func:`join`
    appends a file name without touching the protocol, so error messages show the URI the
    user configured. ``.gz`` files are decompressed transparently (fsspec
    ``compression="infer"``). Every failure becomes a :class:`~store_core.errors.DataError`
    naming the file: a missing file is ``"file not found"``; bytes invalid in the expected
    encoding give ``record="byte N"`` (0-based offset in the decompressed stream) and the
    line number in the message.

Values
    :func:`to_text` turns a source value into the plain string stored in ``fields``
    (lists, also nested, are flattened and joined with ", "; empty values are dropped).
    :func:`parse_id`, :func:`parse_timestamp` and :func:`keep_rating` validate ids,
    unix-second timestamps and ratings with errors naming file, record and field.

Time
    Every reader gives timestamps as float64 unix seconds, fractions kept: RecBole's own
    loader reads ``timestamp:float`` as ``np.float64``, and a float64 holds any instant
    of years 1..9999 to better than a microsecond. Integer seconds, decimal strings, JSON
    numbers and Parquet timestamps/dates of any unit all pass through
    :func:`parse_timestamp` (or :func:`seconds_from_arrow`), so the same instant gives
    the same value whatever the reader. Values outside years 1..9999
    (:data:`MIN_TIMESTAMP`..:data:`MAX_TIMESTAMP`) are a DataError, not an overflow.

JSON
    :func:`load_json` and :func:`parse_record` read JSON the way Python's ``json`` module
    (what the LC-Rec and Amazon tools use) reads it, with three limits turned into
    DataErrors instead of tracebacks: an integer longer than Python's
    ``sys.get_int_max_str_digits()`` (4300 digits) becomes a :class:`HugeInt` that
    :func:`parse_id`, :func:`parse_timestamp` and :func:`parse_float` reject naming the
    field; nesting deeper than the parser's recursion limit; and a key repeated in one
    object, which ``json`` would resolve silently by keeping the last value. Objects are
    :class:`JsonObject` dicts that remember every ``(key, value)`` pair in order
    (:func:`object_pairs`), so readers can refuse or report the repeat. Python-literal
    lines (Amazon 2014) are parsed with :func:`ast.literal_eval`, never ``eval``, with the
    same repeated-key check.

Tables
    :class:`ItemRows` and :class:`InteractionRows` collect rows in source order and
    produce tables in the exact raw schemas; ``source_order`` is the 0-based index of the
    interaction among the rows the reader returns.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import math
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import IO, Any

import fsspec
import pyarrow as pa

from store_core.arrow_input import open_arrow_input
from store_core.errors import ConfigError, DataError
from store_core.readers.base import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA

# --------------------------------------------------------------------------- file access


def join(path: str, name: str) -> str:
    """``path/name`` for a local path or a ``proto://`` URI (no doubled slash)."""
    if not path:
        return name
    return path + name if path.endswith("/") else f"{path}/{name}"


def exists(uri: str) -> bool:
    """Whether ``uri`` exists (file or directory)."""
    fs, fs_path = fsspec.core.url_to_fs(uri)
    try:
        return bool(fs.exists(fs_path))
    except OSError as exc:  # e.g. a symlink loop, permission denied on a parent
        raise DataError(f"cannot access: {_os_reason(exc)}", file=uri) from None


def _os_reason(exc: OSError) -> str:
    """``strerror`` of an OSError (no traceback-style repr), else its text."""
    return exc.strerror or str(exc) or type(exc).__name__


def check_source(path: str) -> None:
    """DataError when ``path`` exists but cannot be accessed (a symlink loop, no
    permission); a missing path is left to the reader, which names the file it wanted."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    try:
        fs.info(fs_path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataError(
            f"cannot access the source: {_os_reason(exc)}", file=path, field="data.path"
        ) from None


def list_files(path: str) -> list[str]:
    """Names (not paths) of the files directly inside directory ``path``, sorted."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    try:
        entries = fs.ls(fs_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError("directory not found", file=path) from None
    except OSError as exc:  # e.g. a symlink loop
        raise DataError(f"cannot list directory: {_os_reason(exc)}", file=path) from None
    names = [
        str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        for entry in entries
        if entry.get("type") == "file"
    ]
    return sorted(names)


def infer_name(path: str, suffix: str) -> str:
    """The prefix of the single ``*<suffix>`` file in ``path`` (``Scientific.inter.json``
    -> ``Scientific``); DataError listing the candidates when there is not exactly one."""
    candidates = [n for n in list_files(path) if n.endswith(suffix) and len(n) > len(suffix)]
    if len(candidates) != 1:
        found = ", ".join(candidates) if candidates else "none"
        raise DataError(
            f"cannot infer the dataset name: expected exactly one '*{suffix}' file, found "
            f"{found}; set data.name",
            file=path,
        )
    return candidates[0][: -len(suffix)]


def find_one(path: str, pattern: str, what: str, names: list[str] | None = None) -> str:
    """The single file in ``path`` matching glob ``pattern`` (or in ``names``, a pre-filtered
    listing); DataError listing the candidates otherwise. Returns the file's URI."""
    pool = list_files(path) if names is None else names
    matches = [n for n in pool if fnmatch.fnmatch(n, pattern)]
    if len(matches) != 1:
        found = ", ".join(matches) if matches else "none"
        raise DataError(
            f"cannot choose the {what} file: expected exactly one file matching "
            f"'{pattern}', found {found}; set it in the config",
            file=path,
        )
    return join(path, matches[0])


@contextmanager
def _file_errors(uri: str) -> Iterator[None]:
    """Opening or reading ``uri`` failed: a DataError naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise DataError("file not found", file=uri) from None
    except IsADirectoryError:
        raise DataError("expected a file, found a directory", file=uri) from None
    except (OSError, EOFError, zlib.error) as exc:  # bad/truncated gzip, permission, loop
        reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise DataError(f"cannot read file: {reason}", file=uri) from None


@contextmanager
def open_binary(uri: str, *, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open ``uri`` for binary reading (decompressing ``.gz``); errors become DataError.
    For Python code; pyarrow's readers get :func:`open_arrow`."""
    with _file_errors(uri), fsspec.open(uri, "rb", compression=compression) as handle:
        yield handle


@contextmanager
def open_arrow(uri: str, *, compression: str | None = "infer") -> Iterator[pa.NativeFile]:
    """:func:`open_binary` as a native Arrow file for pyarrow's readers, never a Python
    file object (why: :mod:`store_core.arrow_input`); errors become DataError."""
    with _file_errors(uri), open_arrow_input(uri, compression=compression) as source:
        yield source


def _decode_error(uri: str, exc: UnicodeDecodeError, offset: int, line: int) -> DataError:
    return DataError(
        f"line {line}: bytes not valid {exc.encoding} ({exc.reason}); check the file's encoding",
        file=uri,
        record=f"byte {offset + exc.start}",
    )


def iter_lines(uri: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line (1-based, newline stripped)."""
    offset = 0
    with open_binary(uri) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise _decode_error(uri, exc, offset, number) from None
            offset += len(raw)
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text.rstrip("\r\n")


def read_text(uri: str, encoding: str = "utf-8") -> str:
    """The whole decoded text of ``uri``."""
    with open_binary(uri) as handle:
        data = handle.read()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _decode_error(uri, exc, 0, line) from None
    return text.removeprefix("\ufeff")


def open_text(uri: str, encoding: str = "utf-8") -> list[str]:
    """Every line of ``uri`` (newline stripped), decoded; see :func:`iter_lines`."""
    return [text for _, text in iter_lines(uri, encoding)]


class HugeInt(str):
    """A JSON integer too long for ``int()`` (more than ``sys.get_int_max_str_digits()``
    digits): kept as its digits so the field that holds it can be named in the error."""


class JsonObject(dict[Any, Any]):
    """A parsed JSON/Python-literal object; ``pairs`` keeps every ``(key, value)`` in
    source order, repeated keys included (the dict itself keeps the last, like ``json``)."""

    pairs: list[tuple[Any, Any]]


def _json_int(digits: str) -> int | HugeInt:
    try:
        return int(digits)
    except ValueError:  # exceeds the int max str digits limit
        return HugeInt(digits)


def _json_object(pairs: list[tuple[Any, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    obj.pairs = pairs
    return obj


def object_pairs(obj: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """Every ``(key, value)`` of a parsed object in source order, repeats included."""
    return obj.pairs if isinstance(obj, JsonObject) else list(obj.items())


def repeated_keys(obj: dict[Any, Any]) -> list[Any]:
    """Keys that occur more than once in ``obj`` with different values, in order."""
    first: dict[Any, Any] = {}
    repeated: list[Any] = []
    for key, value in object_pairs(obj):
        if key in first and first[key] != value and key not in repeated:
            repeated.append(key)
        first.setdefault(key, value)
    return repeated


def check_fields(obj: dict[Any, Any], *, file: str, record: str) -> None:
    """DataError when one record's object has a key twice with different values
    (``json`` and ``ast.literal_eval`` would silently keep the last)."""
    repeated = repeated_keys(obj)
    if repeated:
        raise DataError(
            "key appears twice in one object with different values",
            file=file,
            record=record,
            field=str(repeated[0]),
        )


def load_json_text(text: str) -> Any:
    """``json.loads`` with :class:`HugeInt` and :class:`JsonObject` (see module docs).

    Raises ``json.JSONDecodeError`` and ``RecursionError`` like ``json.loads``.
    """
    return json.loads(text, parse_int=_json_int, object_pairs_hook=_json_object)


def load_json(uri: str) -> Any:
    """Parse ``uri`` as one JSON document; syntax errors name the line and column."""
    text = read_text(uri)
    try:
        return load_json_text(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg}", file=uri, record=f"line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise DataError("JSON nested too deeply for Python's json parser", file=uri) from None


def _literal(text: str) -> Any:
    """``ast.literal_eval`` of ``text`` whose dicts are :class:`JsonObject`."""
    tree = ast.parse(text, mode="eval")

    def build(node: ast.AST) -> Any:
        if isinstance(node, ast.Dict):
            keys = [build(k) if k is not None else None for k in node.keys]
            if any(k is None for k in keys):
                raise ValueError("'**' is not a literal")
            return _json_object(list(zip(keys, (build(v) for v in node.values), strict=True)))
        if isinstance(node, ast.List):
            return [build(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(build(e) for e in node.elts)
        return ast.literal_eval(node)

    return build(tree.body)


def parse_record(text: str, *, file: str, record: str) -> Any:
    """One JSON-lines record: strict JSON, else a Python literal (Amazon 2014 style).

    The literal is read with :func:`ast.literal_eval` semantics (never ``eval``): only
    strings, numbers, tuples, lists, dicts, sets, booleans and None.
    """
    text = text.strip()
    try:
        return load_json_text(text)
    except json.JSONDecodeError as exc:
        json_error = exc.msg
    except RecursionError:
        raise DataError(
            "JSON nested too deeply for Python's json parser", file=file, record=record
        ) from None
    try:
        return _literal(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DataError(
            f"neither valid JSON ({json_error}) nor a Python literal", file=file, record=record
        ) from None


def json_object_lines(
    lines: Iterable[tuple[int, str]], *, file: str
) -> Iterator[tuple[str, dict[Any, Any]]]:
    """``(record, object)`` for each non-empty ``(line number, line)`` of a JSON-lines
    file: each line one object (:func:`parse_record`), its fields checked
    (:func:`check_fields`); ``record`` is ``"line N"``. DataError naming the file and line
    for a line that is not an object."""
    for number, line in lines:
        if not line.strip():
            continue
        record = f"line {number}"
        obj = parse_record(line, file=file, record=record)
        if not isinstance(obj, dict):
            raise DataError(
                f"expected an object, got {type(obj).__name__}", file=file, record=record
            )
        check_fields(obj, file=file, record=record)
        yield record, obj


# --------------------------------------------------------------------------- values


def to_text(value: object, *, scalars: bool = True, dedupe: bool = False) -> str | None:
    """A field value as a stripped string, or None when empty or not text.

    Strings are stripped; lists/tuples (also nested) are flattened and their non-empty
    items joined with ", " (``dedupe`` drops repeated items, e.g. Amazon category paths);
    other scalars (numbers, dates) become ``str(value)`` only when ``scalars`` (NaN
    dropped); dicts, bools, bytes and None are never text.
    """
    if isinstance(value, HugeInt):  # a number, not text
        return str(value) if scalars else None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list | tuple):
        parts: list[str] = []
        for item in _flatten(value):
            text = to_text(item, scalars=scalars)
            if text is not None and not (dedupe and text in parts):
                parts.append(text)
        return ", ".join(parts) or None
    if not scalars or value is None or isinstance(value, bool | dict | bytes):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value).strip() or None


def _flatten(values: Iterable[object]) -> Iterator[object]:
    for value in values:
        if isinstance(value, list | tuple):
            yield from _flatten(value)
        else:
            yield value


def text_fields(
    pairs: Iterable[tuple[str, object]], *, scalars: bool = True, dedupe: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """``(name, text)`` for each pair whose value has text (see :func:`to_text`), in order."""
    dedupe_keys = set(dedupe)
    result = []
    for name, value in pairs:
        text = to_text(value, scalars=scalars, dedupe=name in dedupe_keys)
        if text is not None:
            result.append((name, text))
    return result


def _huge(value: HugeInt, *, file: str, record: str, field: str) -> DataError:
    return DataError(
        f"integer with {len(value.lstrip('-'))} digits exceeds the "
        f"{sys.get_int_max_str_digits()}-digit limit of Python's int conversion",
        file=file,
        record=record,
        field=field,
    )


def parse_id(value: object, *, file: str, record: str, field: str) -> str:
    """An id as a non-empty string (JSON ints accepted); DataError otherwise, also for
    an integer too long for Python's ``int`` (:class:`HugeInt`)."""
    if isinstance(value, HugeInt):
        raise _huge(value, file=file, record=record, field=field)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is None:
        raise DataError("required field is missing", file=file, record=record, field=field)
    raise DataError(
        f"expected a non-empty string or integer id, got {_short(value)}",
        file=file,
        record=record,
        field=field,
    )


#: Earliest and latest accepted unix time in seconds: 0001-01-01T00:00:00Z and
#: 9999-12-31T23:59:59.999999Z, the range of Python's datetime and of every Arrow
#: timestamp unit down to microseconds.
MIN_TIMESTAMP = -62_135_596_800.0
MAX_TIMESTAMP = 253_402_300_799.999999


def parse_timestamp(value: object, *, file: str, record: str, field: str) -> float:
    """Unix seconds as a float64, fractions kept (see "Time" in the module docstring).

    Accepts ints, floats, Decimals and decimal strings (``"1400000100.9"``, ``"1.4e9"``).
    Raises DataError naming file, record and field for a missing value, text that is not
    a number, NaN/infinity, and a time outside years 1..9999 (``99999999999999999999``,
    ``1e30``), which would otherwise overflow int64 downstream.
    """
    if value is None:
        raise DataError("required field is missing", file=file, record=record, field=field)
    if isinstance(value, HugeInt):
        raise _huge(value, file=file, record=record, field=field)
    number: float | None = None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = _to_float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = _to_float(int(text))
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
    if number is None or not math.isfinite(number):
        raise DataError(
            f"expected a unix timestamp in seconds, got {_short(value)}",
            file=file,
            record=record,
            field=field,
        )
    if not MIN_TIMESTAMP <= number <= MAX_TIMESTAMP:
        raise DataError(
            f"timestamp {_short(value)} is out of range: expected unix seconds between "
            f"{int(MIN_TIMESTAMP)} (year 1) and {int(MAX_TIMESTAMP)} (year 9999)",
            file=file,
            record=record,
            field=field,
        )
    return number


def _to_float(value: int | float | Decimal) -> float:
    """``float(value)``, correctly rounded; inf for an int too large for a float."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def parse_float(value: object, *, file: str, record: str, field: str) -> float:
    """A finite float (ratings); DataError otherwise."""
    number: float | None = None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = _to_float(value)
    elif isinstance(value, str) and not isinstance(value, HugeInt):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise DataError(
            f"expected a number, got {_short(value)}", file=file, record=record, field=field
        )
    return number


def _short(value: object) -> str:
    """``repr(value)``, cut to 60 characters (a 5000-digit number stays one short line)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def keep_rating(
    min_rating: float | None, value: object, *, file: str, record: str, field: str
) -> bool:
    """True when ``min_rating`` is unset or the rating is ``>= min_rating``."""
    if min_rating is None:
        return True
    if value is None:
        raise DataError(
            "data.min_rating is set but the record has no rating",
            file=file,
            record=record,
            field=field,
        )
    return parse_float(value, file=file, record=record, field=field) >= min_rating


def reject_min_rating(min_rating: float | None, fmt: str) -> None:
    """ConfigError for formats without ratings when ``data.min_rating`` is set."""
    if min_rating is not None:
        raise ConfigError(f"data.min_rating is set but format '{fmt}' has no ratings")


# --------------------------------------------------------------------------- tables


class ItemRows:
    """Collects raw item rows in source order."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._fields: list[list[tuple[str, str]]] = []
        self._records: list[str] = []

    def add(self, item_id: str, fields: list[tuple[str, str]], record: str) -> None:
        self._ids.append(item_id)
        self._fields.append(fields)
        self._records.append(record)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(
            {"item_id": self._ids, "fields": self._fields, "record": self._records},
            schema=RAW_ITEMS_SCHEMA,
        )


class InteractionRows:
    """Collects raw interaction rows; ``source_order`` is 0, 1, 2... in insertion order."""

    def __init__(self) -> None:
        self._users: list[str] = []
        self._items: list[str] = []
        self._timestamps: list[float | None] = []
        self._records: list[str] = []

    def __len__(self) -> int:
        return len(self._users)

    def add(self, user_id: str, item_id: str, timestamp: float | None, record: str) -> None:
        self._users.append(user_id)
        self._items.append(item_id)
        self._timestamps.append(timestamp)
        self._records.append(record)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(
            {
                "user_id": self._users,
                "item_id": self._items,
                "timestamp": self._timestamps,
                "source_order": list(range(len(self._users))),
                "record": self._records,
            },
            schema=RAW_INTERACTIONS_SCHEMA,
        )
