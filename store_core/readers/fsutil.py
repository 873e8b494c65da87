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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import pyarrow as pa

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
    return bool(fs.exists(fs_path))


def list_files(path: str) -> list[str]:
    """Names (not paths) of the files directly inside directory ``path``, sorted."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    try:
        entries = fs.ls(fs_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError("directory not found", file=path) from None
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
def open_binary(uri: str, *, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open ``uri`` for binary reading (decompressing ``.gz``); errors become DataError."""
    try:
        with fsspec.open(uri, "rb", compression=compression) as handle:
            yield handle
    except FileNotFoundError:
        raise DataError("file not found", file=uri) from None
    except IsADirectoryError:
        raise DataError("expected a file, found a directory", file=uri) from None
    except (OSError, EOFError) as exc:  # e.g. gzip.BadGzipFile, truncated gzip, permission
        raise DataError(f"cannot read file: {exc}", file=uri) from exc


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


def load_json(uri: str) -> Any:
    """Parse ``uri`` as one JSON document; syntax errors name the line and column."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg}", file=uri, record=f"line {exc.lineno} column {exc.colno}"
        ) from None


def parse_record(text: str, *, file: str, record: str) -> Any:
    """One JSON-lines record: strict JSON, else a Python literal (Amazon 2014 style)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        json_error = exc.msg
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DataError(
            f"neither valid JSON ({json_error}) nor a Python literal", file=file, record=record
        ) from None


# --------------------------------------------------------------------------- values


def to_text(value: object, *, scalars: bool = True, dedupe: bool = False) -> str | None:
    """A field value as a stripped string, or None when empty or not text.

    Strings are stripped; lists/tuples (also nested) are flattened and their non-empty
    items joined with ", " (``dedupe`` drops repeated items, e.g. Amazon category paths);
    other scalars (numbers, dates) become ``str(value)`` only when ``scalars`` (NaN
    dropped); dicts, bools, bytes and None are never text.
    """
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


def parse_id(value: object, *, file: str, record: str, field: str) -> str:
    """An id as a non-empty string (JSON ints accepted); DataError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is None:
        raise DataError("required field is missing", file=file, record=record, field=field)
    raise DataError(
        f"expected a non-empty string or integer id, got {value!r}",
        file=file,
        record=record,
        field=field,
    )


def parse_timestamp(
    value: object, *, file: str, record: str, field: str, allow_fraction: bool = False
) -> int:
    """Unix seconds as an int. Integral floats are accepted; other fractions only with
    ``allow_fraction`` (truncated, for RecBole ``timestamp:float``)."""
    number: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
    if number is not None and math.isfinite(number) and (allow_fraction or number.is_integer()):
        return int(number)
    if value is None:
        raise DataError("required field is missing", file=file, record=record, field=field)
    raise DataError(
        f"expected an integer unix timestamp, got {value!r}", file=file, record=record, field=field
    )


def parse_float(value: object, *, file: str, record: str, field: str) -> float:
    """A finite float (ratings); DataError otherwise."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise DataError(f"expected a number, got {value!r}", file=file, record=record, field=field)
    return number


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
        self._timestamps: list[int | None] = []
        self._records: list[str] = []

    def __len__(self) -> int:
        return len(self._users)

    def add(self, user_id: str, item_id: str, timestamp: int | None, record: str) -> None:
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
