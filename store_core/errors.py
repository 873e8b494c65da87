"""Errors a user can hit. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error that is the user's input or config, not a bug."""


class ConfigError(StoreError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(StoreError):
    """Input data is missing or malformed.

    The message always names the file, and where known the record (line number or key)
    and the field, so the user can find and fix the offending input.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        record: str | int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = file
        self.record = record
        self.field = field
        where = []
        if file is not None:
            where.append(f"file {file}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class MissingInputError(DataError):
    """An input a verb needs does not exist yet because the verb that writes it has not
    run (``store evaluate`` before ``store train``, ``store query`` before ``store
    ingest``). The message names what is missing (a path, or words and a path) and the
    verb to run first: ``<what> not found: run `store <verb>` first``."""

    def __init__(self, what: str, verb: str, *, problem: str = "not found") -> None:
        StoreError.__init__(self, f"{what} {problem}: run `store {verb}` first")
        self.file, self.record, self.field = what, None, None
        self.what = what
        self.verb = verb
